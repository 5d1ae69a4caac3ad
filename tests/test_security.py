"""Security and fault findings outside the training loop (issue 18, items 1-3, 7-9, 11, 13-15).

Each test reproduces one finding: it fails on the code before its fix.
"""

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import warnings

import numpy as np
import pytest
import torch

import barkgpt
from barkgpt import CheckpointError, ConfigError, GPTConfig, ops
from barkgpt import checkpoint as ckpt
from helpers import REPO, run_python

CPP_DISABLED = os.environ.get("BARKGPT_NO_CPP", "") not in ("", "0")


# ---- item 9: the raw C++ backward ops check the shapes of every tensor they read -------------

def _cpp_ops():
    if CPP_DISABLED:
        pytest.skip("BARKGPT_NO_CPP is set: the cpp backend is disabled on purpose")
    import barkgpt._cpp  # noqa: F401  (builds the extension on first use; a failure is an error)
    return torch.ops.barkgpt_cpp


def _ln_args(rows=6, n=40):
    x = torch.randn(rows, n)
    w, b = torch.randn(n), torch.randn(n)
    _, mean, rstd = _cpp_ops().layer_norm_fwd(x, w, b, 1e-5)
    return [torch.randn(rows, n), x, w, b, mean, rstd]


@pytest.mark.parametrize("which, bad", [
    (4, torch.zeros(2)),            # mean shorter than the rows
    (5, torch.zeros(2)),            # rstd shorter than the rows
    (4, torch.zeros(6, 1)),         # mean of the right size, wrong shape
    (2, torch.zeros(3)),            # weight shorter than a row
    (3, torch.zeros(3)),            # bias shorter than a row
    (2, torch.zeros(40, 2)),        # weight 2-D
])
def test_cpp_layer_norm_bwd_checks_its_arguments(which, bad):
    args = _ln_args()
    args[which] = bad
    with pytest.raises(RuntimeError, match="layer_norm backward: (mean|weight|bias)"):
        _cpp_ops().layer_norm_bwd(*args)


def test_cpp_layer_norm_bwd_accepts_its_own_forward():
    args = _ln_args()
    dx, dw, db = _cpp_ops().layer_norm_bwd(*args)
    assert dx.shape == args[1].shape and dw.shape == db.shape == (40,)
    assert torch.isfinite(dx).all() and torch.isfinite(dw).all()


@pytest.mark.parametrize("lse_shape", [(1, 2, 3), (1, 2), (2, 2, 17), (1, 2, 17, 1), (34,)])
def test_cpp_attention_bwd_checks_lse(lse_shape):
    q, k, v = (torch.randn(1, 2, 17, 8) for _ in range(3))
    out, lse = _cpp_ops().attention_fwd(q, k, v, True)
    with pytest.raises(RuntimeError, match=r"attention backward: lse must have shape \(B, H, T\)"):
        _cpp_ops().attention_bwd(torch.randn_like(out), q, k, v, out, torch.zeros(lse_shape), True)


def test_cpp_attention_bwd_names_bad_grad_shape():
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    out, lse = _cpp_ops().attention_fwd(q, k, v, True)
    with pytest.raises(RuntimeError, match="grad and out must have q's shape"):
        _cpp_ops().attention_bwd(torch.randn(1, 2, 4, 8), q, k, v, out, lse, True)


@pytest.mark.parametrize("vocab, positions", [(-3, 8), (10, -1)])
def test_cpp_embedding_bwd_checks_sizes(vocab, positions):
    grad, idx = torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(RuntimeError, match="vocab_size and num_positions must be >= 0"):
        _cpp_ops().embedding_add_bwd(grad, idx, vocab, positions)


# ---- checkpoints: helpers ------------------------------------------------------------------------

def _tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return barkgpt.BarkGPT(GPTConfig.preset("bark", **overrides), backend="torch")


def _rewrite(directory, name, data, manifest=None):
    """What an attacker (or a crafted download) can do: change a file and the manifest with it."""
    directory = str(directory)
    if data is not None:
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)
    mpath = os.path.join(directory, ckpt.MANIFEST_FILE)
    with open(mpath) as f:
        m = json.load(f)
    if manifest is not None:
        m["sha256"] = manifest
    elif data is not None:
        import hashlib
        m["sha256"][name] = hashlib.sha256(data).hexdigest()
    with open(mpath, "w") as f:
        json.dump(m, f)


def _config_bytes(**changes):
    d = GPTConfig.preset("bark").to_dict()
    d.update(changes)
    return json.dumps(d).encode()


# ---- item 2: manifest entries are plain names of regular files; config and weights are listed ----

@pytest.mark.parametrize("entry", ["../secret.txt", "{abs}", "sub/../../secret.txt", "..", ""])
def test_manifest_entries_outside_the_directory_are_refused(tmp_path, entry):
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    d = tmp_path / "model"
    _tiny().save(str(d))
    with open(d / ckpt.MANIFEST_FILE) as f:
        hashes = json.load(f)["sha256"]
    hashes[entry.format(abs=str(secret))] = "0" * 64
    _rewrite(d, None, None, manifest=hashes)
    with pytest.raises(CheckpointError, match="not a file name inside"):
        barkgpt.load(str(d))


def test_manifest_naming_a_fifo_is_refused_without_hanging(tmp_path):
    d = tmp_path / "model"
    _tiny().save(str(d))
    os.mkfifo(d / "pipe")
    with open(d / ckpt.MANIFEST_FILE) as f:
        hashes = json.load(f)["sha256"]
    _rewrite(d, None, None, manifest={**hashes, "pipe": "0" * 64})
    code = f"""
        import barkgpt
        try:
            barkgpt.load({str(d)!r})
        except barkgpt.CheckpointError as e:
            print("REFUSED", e)
    """
    try:
        r = run_python(code, env={"BARKGPT_BACKEND": "torch"}, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("loading a checkpoint whose manifest names a FIFO hung")
    assert "REFUSED" in r.stdout and "not a regular file" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("dropped", [ckpt.CONFIG_FILE, ckpt.MODEL_FILE])
def test_config_and_weights_must_be_listed(tmp_path, dropped):
    d = tmp_path / "model"
    _tiny().save(str(d))
    with open(d / ckpt.MANIFEST_FILE) as f:
        hashes = json.load(f)["sha256"]
    del hashes[dropped]
    _rewrite(d, None, None, manifest=hashes)
    with pytest.raises(CheckpointError, match=f"does not list {dropped}"):
        barkgpt.load(str(d))


def test_an_unlisted_tokenizer_is_not_loaded(tmp_path):
    d = tmp_path / "model"
    _tiny().save(str(d))
    (d / ckpt.TOKENIZER_FILE).write_text(json.dumps({"type": "bark"}))  # planted after the save
    with pytest.raises(CheckpointError, match="tokenizer.json is not listed"):
        barkgpt.load(str(d))


def test_a_training_checkpoint_must_list_its_state(tmp_path):
    model = _tiny()
    opt = torch.optim.AdamW(model.parameters())
    path = ckpt.save_training_checkpoint(str(tmp_path), 1, model, opt, {"x": 1}, {})
    with open(os.path.join(path, ckpt.MANIFEST_FILE)) as f:
        hashes = json.load(f)["sha256"]
    del hashes["state.json"]
    _rewrite(path, None, None, manifest=hashes)
    with pytest.raises(CheckpointError, match="does not list state.json"):
        ckpt.load_training_checkpoint(path)


# ---- items 3 and 8: weights are checked against the config before anything is allocated ----------

def _load_capped(directory):
    """barkgpt.load in a child process whose address space is capped at 4 GB, so that a loader
    that does allocate what a crafted config asks for fails there, not on the machine."""
    code = f"""
        import resource, barkgpt
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            barkgpt.load({str(directory)!r})
        except barkgpt.CheckpointError as e:
            print("REFUSED", e)
        except BaseException as e:
            print("OTHER", type(e).__name__, str(e)[:300])
        print("GROWTH_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
    """
    r = run_python(code, env={"BARKGPT_BACKEND": "torch"}, timeout=300)
    assert "GROWTH_KB" in r.stdout, r.stdout + r.stderr
    return r.stdout, int(r.stdout.split("GROWTH_KB")[1].split()[0]) / 1024


@pytest.mark.parametrize("changes, match", [
    (dict(vocab_size=5_000_000), "token_emb.weight has shape [9, 32], the config needs [5000000, 32]"),
    (dict(vocab_size=1_000_000_000), "token_emb.weight has shape [9, 32], the config needs [1000000000, 32]"),
    (dict(n_layer=10**9), "the config says n_layer=1000000000, the weights hold 2 layers"),
    (dict(block_size=10**8), "pos_emb.weight has shape [32, 32], the config needs [100000000, 32]"),
])
def test_a_huge_config_fails_before_allocating(tmp_path, changes, match):
    d = tmp_path / "model"
    _tiny().save(str(d))
    _rewrite(d, ckpt.CONFIG_FILE, _config_bytes(**changes))
    out, growth_mb = _load_capped(d)
    assert "REFUSED" in out and match in out, out
    assert growth_mb < 200, f"peak memory grew by {growth_mb:.0f} MB loading a 20 KB checkpoint"


@pytest.mark.parametrize("changes, match", [
    (dict(n_layer=3), "the config says n_layer=3, the weights hold 2 layers"),
    (dict(n_embd=64), r"token_emb.weight has shape \[9, 32\], the config needs \[9, 64\]"),
    (dict(bias=False), "unexpected tensors"),
])
def test_a_config_that_does_not_fit_the_weights_is_named(tmp_path, changes, match):
    d = tmp_path / "model"
    _tiny().save(str(d))
    _rewrite(d, ckpt.CONFIG_FILE, _config_bytes(**changes))
    with pytest.raises(CheckpointError, match=match):
        barkgpt.load(str(d))


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.uint8, torch.int32])
def test_non_floating_weights_are_refused(tmp_path, dtype):
    from safetensors.torch import save

    d = tmp_path / "model"
    model = _tiny()
    model.save(str(d))
    sd = model.export_state_dict()
    sd["token_emb.weight"] = torch.ones(sd["token_emb.weight"].shape, dtype=dtype)
    _rewrite(d, ckpt.MODEL_FILE, save({k: v.contiguous() for k, v in sd.items()}))
    with pytest.raises(CheckpointError, match="token_emb.weight holds .* values; weights must be floating point"):
        barkgpt.load(str(d))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_floating_weights_of_another_precision_load(tmp_path, dtype):
    from safetensors.torch import save

    d = tmp_path / "model"
    model = _tiny()
    model.save(str(d))
    sd = {k: v.to(dtype).contiguous() for k, v in model.export_state_dict().items()}
    _rewrite(d, ckpt.MODEL_FILE, save(sd))
    loaded = barkgpt.load(str(d))
    torch.testing.assert_close(loaded.token_emb.weight, sd["token_emb.weight"].float())


def test_a_header_claiming_more_bytes_than_the_file_holds_is_refused(tmp_path):
    d = tmp_path / "model"
    _tiny().save(str(d))
    data = (d / ckpt.MODEL_FILE).read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["token_emb.weight"]["shape"] = [9_000_000, 32]
    raw = json.dumps(header).encode()
    _rewrite(d, ckpt.MODEL_FILE, len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        barkgpt.load(str(d))


# ---- item 11: a damaged final model falls back to the newest intact checkpoint ---------------------

def _run_dir(tmp_path):
    out = tmp_path / "run"
    early, late = _tiny(1), _tiny(2)
    for step, model in ((4, early), (8, late)):
        ckpt.save_training_checkpoint(str(out), step, model, torch.optim.AdamW(model.parameters()), {}, {})
    ckpt.save_model(late, str(out), step=8)
    return out, early, late


def test_a_killed_final_save_falls_back_to_the_newest_checkpoint(tmp_path):
    out, _, late = _run_dir(tmp_path)
    # killed after the new weights were renamed into place, before the manifest was
    (out / ckpt.MODEL_FILE).write_bytes(ckpt._tensors_bytes(_tiny(3).export_state_dict()))
    with pytest.warns(UserWarning, match=r"(?s)model.safetensors does not match its recorded checksum.*"
                                         r"newest intact checkpoint instead: .*step_00000008"):
        model = barkgpt.load(str(out))
    torch.testing.assert_close(model.token_emb.weight, late.token_emb.weight, rtol=0, atol=0)


def test_a_damaged_newest_checkpoint_falls_back_to_an_older_one(tmp_path):
    out, early, _ = _run_dir(tmp_path)
    os.remove(out / ckpt.MANIFEST_FILE)  # the first final save was killed: no manifest yet
    with open(out / "checkpoints" / "step_00000008" / ckpt.MODEL_FILE, "r+b") as f:
        f.truncate(100)
    with pytest.warns(UserWarning, match="step_00000004"):
        model = barkgpt.load(str(out))
    torch.testing.assert_close(model.token_emb.weight, early.token_emb.weight, rtol=0, atol=0)


def test_nothing_intact_raises_the_newest_error(tmp_path):
    out, _, _ = _run_dir(tmp_path)
    for p in [out / ckpt.MODEL_FILE] + [out / "checkpoints" / s / ckpt.MODEL_FILE
                                        for s in ("step_00000004", "step_00000008")]:
        p.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=re.escape(f"{out / ckpt.MODEL_FILE} does not match")):
        barkgpt.load(str(out))


# ---- item 13: a path is a path, even when it starts with "{" ------------------------------------

def test_a_run_under_a_brace_directory_loads(tmp_path):
    d = tmp_path / "{runs}" / "a"
    model = _tiny()
    model.save(str(d))
    assert GPTConfig.from_json(str(d / "config.json")) == model.config
    assert GPTConfig.from_json_file(str(d / "config.json")) == model.config
    torch.testing.assert_close(barkgpt.load(str(d)).token_emb.weight, model.token_emb.weight)


def test_json_text_and_path_are_separate():
    c = GPTConfig.preset("bark")
    assert GPTConfig.from_json_text(c.to_json()) == c
    with pytest.raises(ConfigError, match="does not exist"):
        GPTConfig.from_json_file(c.to_json())  # text given as a path is a missing file
    with pytest.raises(ConfigError, match="if '{runs}/x.json' is meant as a file path, it does not exist"):
        GPTConfig.from_json("{runs}/x.json")


# ---- item 14: files and directories honour the umask -----------------------------------------------

@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_saved_files_honour_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        model = _tiny()
        model.save(str(tmp_path / "m"))
        path = ckpt.save_training_checkpoint(str(tmp_path / "run"), 1, model,
                                             torch.optim.AdamW(model.parameters()), {}, {})
        ckpt.atomic_write_bytes(str(tmp_path / "run" / "metrics.jsonl"), b"{}\n")
    finally:
        os.umask(old)
    files = [tmp_path / "m" / n for n in os.listdir(tmp_path / "m")] + \
            [os.path.join(path, n) for n in os.listdir(path)] + [tmp_path / "run" / "metrics.jsonl"]
    for f in files:
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o666 & ~mask, f
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o777 & ~mask


# ---- item 7: every backend propagates a non-finite input through attention -------------------------

def _attention_backends():
    return [b for b in ops.available_backends("cpu")]


@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_propagates_non_finite_like_the_definition(where, value, causal):
    from barkgpt.reference import attention_math

    q, k, v = (torch.randn(2, 2, 7, 8) for _ in range(3))
    {"q": q, "k": k, "v": v}[where][1, 0, 3, 5] = value
    want = ~torch.isfinite(attention_math(q, k, v, causal=causal)).all(-1)  # rows with a NaN or inf
    assert want.any()
    for backend in _attention_backends():
        got = ops.attention(q, k, v, causal=causal, backend=backend)
        assert torch.equal(~torch.isfinite(got).all(-1), want), (backend, where, value)
        # the rows the definition keeps finite are the definition's
        torch.testing.assert_close(torch.where(want[..., None], 0, got),
                                   torch.where(want[..., None], 0, attention_math(q, k, v, causal=causal)),
                                   rtol=1e-5, atol=1e-5, equal_nan=True)


def test_attention_torch_backend_keeps_gradients_and_dtype():
    from barkgpt.reference import attention_ref

    q, k, v = (torch.randn(1, 2, 9, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: attention_ref(a, b, c, True), (q, k, v))
    h = torch.randn(1, 2, 9, 8, dtype=torch.float16)
    h[0, 1, 2, 0] = float("nan")
    out = attention_ref(h, h, h, False)
    assert out.dtype == torch.float16 and torch.isnan(out[0, 1, 2]).all() and torch.isfinite(out[0, 0]).all()


def test_attention_torch_backend_propagates_nan_under_torch_compile():
    # the guard must not be simplified away by the compiler (x - x is not 0 for NaN or inf)
    from barkgpt.reference import attention_ref

    f = torch.compile(lambda q, k, v: attention_ref(q, k, v, True), fullgraph=True)
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    for value in (float("nan"), float("-inf")):
        q[0, 0, 2, 1] = value
        bad = torch.isnan(f(q, k, v)).any(-1)
        assert bad[0, 0, 2] and bad.sum() == 1, value


def test_model_with_a_nan_query_weight_gives_nan_on_torch_like_cpp():
    model = _tiny()
    with torch.no_grad():
        model.layers[0].attn.qkv.weight[0, 0] = float("nan")  # first head's query, one channel
    idx = torch.randint(0, 9, (2, 8))
    for backend in _attention_backends():
        model.set_backend(backend)
        logits, _ = model(idx)
        assert torch.isnan(logits).all(), backend


# ---- item 15: a token file is checked once at load; the error names file, position and id ---------

def _token_file(tmp_path, ids, dtype, vocab):
    path = tmp_path / "tok.bin"
    np.asarray(ids, dtype=dtype).tofile(path)
    (tmp_path / "tok.json").write_text(json.dumps({"vocab_size": vocab, "dtype": np.dtype(dtype).name}))
    return str(path)


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.int32, np.int64])
@pytest.mark.parametrize("at, split", [(0, "training"), (517, "training"), (950, "validation"), (999, "validation")])
def test_a_bad_token_id_is_named_at_load(tmp_path, dtype, at, split):
    from barkgpt.data import DataError, TextCorpus

    ids = np.arange(1000) % 300
    ids[at] = 5000
    path = _token_file(tmp_path, ids, dtype, 300)
    with pytest.raises(DataError, match=rf"{re.escape(path)}.*token id 5000 at position {at} .*{split} split.*"
                                        r"vocabulary of 300"):
        TextCorpus(path, block_size=8)


def test_a_negative_token_id_is_named(tmp_path):
    from barkgpt.data import DataError, TextCorpus

    ids = np.arange(1000) % 300
    ids[42] = -1
    with pytest.raises(DataError, match="token id -1 at position 42"):
        TextCorpus(_token_file(tmp_path, ids, np.int32, 300), block_size=8)


def test_token_file_check_reads_in_chunks(tmp_path):
    from barkgpt.data import DataError, _check_token_ids_in_file

    data = np.memmap(_token_file(tmp_path, np.arange(1000) % 300, np.uint16, 300), dtype=np.uint16, mode="r")
    _check_token_ids_in_file("f", data, 300, 900, chunk=7)  # all good, chunks not dividing the length
    bad = np.array(data)
    bad[998] = 300
    with pytest.raises(DataError, match="token id 300 at position 998"):
        _check_token_ids_in_file("f", bad, 300, 900, chunk=7)
    _check_token_ids_in_file("f", bad, 65536, 900, chunk=7)  # uint16 cannot exceed it: nothing read


def test_a_bad_validation_token_stops_training_before_the_first_step(tmp_path):
    ids = np.arange(2000) % 50
    ids[1990] = 50
    path = _token_file(tmp_path, ids, np.uint16, 50)
    with pytest.raises(Exception, match="token id 50 at position 1990"):
        barkgpt.train(model=GPTConfig.preset("bark", vocab_size=64).to_dict(), data=path, steps=2,
                      batch_size=2, out=str(tmp_path / "run"), progress=False, sample=False,
                      backend="torch", log=lambda msg: None)


# ---- item 1: the C++ build cache: nothing another user could have written is loaded -------------

ATTACKER = 1002
_EVIL_C = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
  FILE *f = fopen(MARKER, "w");
  if (f) { fputs("the planted library ran\n", f); fclose(f); }
}
"""


def _planted_library(tmp_path):
    """A shared library whose constructor writes a marker file: proof that it was loaded."""
    if shutil.which("cc") is None:
        pytest.skip("needs a C compiler to build the planted library")
    marker = tmp_path / "PLANTED_LIBRARY_RAN"
    src = tmp_path / "planted.c"
    src.write_text(_EVIL_C.replace("MARKER", json.dumps(str(marker))))
    lib = tmp_path / "planted.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    return lib.read_bytes(), marker


def _build_paths():
    if CPP_DISABLED:
        pytest.skip("BARKGPT_NO_CPP is set: the cpp backend is disabled on purpose")
    import barkgpt._cpp as cpp

    if cpp.BUILD != "jit":
        pytest.skip(f"the kernels here are not a JIT build ({cpp.BUILD}): no cache path to plant at")
    # A victim with the same torch, flags and sources looks for the library at the same place.
    return os.path.basename(os.path.dirname(cpp.LIBRARY)), os.path.basename(cpp.LIBRARY)


def _plant(cache_cpp_dir, lib_bytes, uid=None):
    """Put a library and its '.done' marker where the JIT build of these sources would be, as
    ``uid`` (a forked child that drops to it) or as ourselves."""
    build_name, lib_name = _build_paths()

    def write():
        d = os.path.join(cache_cpp_dir, build_name)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, lib_name), "wb") as f:
            f.write(lib_bytes)
        with open(os.path.join(d, lib_name + ".done"), "w") as f:
            f.write("done\n")

    if uid is None:
        write()
        return
    pid = os.fork()
    if pid == 0:  # the attacker: another uid, no groups
        code = 1
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            os.umask(0o022)
            write()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "planting as the second uid failed"


def _victim(env, cmd=("-m", "barkgpt", "info")):
    full = dict(os.environ, PYTHONPATH=REPO, **env)
    full.pop("BARKGPT_BACKEND", None)
    full.pop("BARKGPT_NO_CPP", None)
    return subprocess.run([sys.executable, *cmd], cwd=REPO, env=full, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def sticky_tmp():
    """A fresh world-writable sticky directory, like /tmp, that a second uid can reach."""
    d = tempfile.mkdtemp(prefix="barkgpt-sec-", dir="/tmp")
    os.chmod(d, 0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="needs root to act as a second uid (the mode-based tests below still run)")
def test_a_library_planted_by_another_uid_in_the_temp_fallback_is_not_loaded(tmp_path, sticky_tmp):
    lib_bytes, marker = _planted_library(tmp_path)
    # No usable ~/.cache (as with HOME=/nonexistent): the cache falls back to <tmp>/barkgpt-<uid>,
    # which the attacker created first.
    _plant(os.path.join(sticky_tmp, f"barkgpt-{os.geteuid()}", "cpp"), lib_bytes, uid=ATTACKER)
    assert os.stat(os.path.join(sticky_tmp, f"barkgpt-{os.geteuid()}")).st_uid == ATTACKER
    r = _victim({"TMPDIR": sticky_tmp, "XDG_CACHE_HOME": "/dev/null/cache", "BARKGPT_CACHE_DIR": ""})
    assert not marker.exists(), "barkgpt loaded a library planted by another user"
    assert r.returncode == 0, r.stderr
    assert f"owned by uid {ATTACKER}, not by you" in r.stdout and "refusing to build or load" in r.stdout, r.stdout
    assert "cpu   auto -> torch" in r.stdout


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to act as a second uid")
def test_a_shared_cache_dir_owned_by_another_uid_is_refused(tmp_path, sticky_tmp):
    lib_bytes, marker = _planted_library(tmp_path)
    shared = os.path.join(sticky_tmp, "shared-cache")
    _plant(os.path.join(shared, "cpp"), lib_bytes, uid=ATTACKER)  # the attacker's own dir, 0755
    r = _victim({"BARKGPT_CACHE_DIR": shared})
    assert not marker.exists(), "barkgpt loaded a library from a cache owned by another user"
    assert f"owned by uid {ATTACKER}" in r.stdout, r.stdout


@pytest.mark.parametrize("mode_of", ["cache", "cpp", "build", "library"])
def test_group_or_other_writable_cache_or_library_is_refused(tmp_path, mode_of):
    lib_bytes, marker = _planted_library(tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    _plant(str(cache / "cpp"), lib_bytes)
    build_name, lib_name = _build_paths()
    target = {"cache": cache, "cpp": cache / "cpp", "build": cache / "cpp" / build_name,
              "library": cache / "cpp" / build_name / lib_name}[mode_of]
    os.chmod(cache / "cpp", 0o700)
    os.chmod(cache / "cpp" / build_name, 0o700)
    os.chmod(target, 0o777 if mode_of != "library" else 0o666)  # a shared directory, or a writable file
    r = _victim({"BARKGPT_CACHE_DIR": str(cache)})
    assert not marker.exists(), f"barkgpt loaded a library from a cache whose {mode_of} others can write"
    assert "is writable by group or others" in r.stdout and "refusing to build or load" in r.stdout, r.stdout


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to chgrp")
def test_group_writable_is_refused_unless_the_group_is_ours_alone(tmp_path):
    import grp
    import pwd

    from barkgpt import _cache_dir

    d = tmp_path / "c"
    d.mkdir(mode=0o700)
    os.chmod(d, 0o770)
    os.chown(d, -1, ATTACKER)  # a group another user may be in
    with pytest.raises(_cache_dir.UnsafeCacheDir, match="writable by group or others"):
        _cache_dir.private_dir(str(d / "cpp"))
    me = pwd.getpwuid(os.geteuid())
    group = grp.getgrgid(os.getegid())
    if group.gr_name != me.pw_name or any(m != me.pw_name for m in group.gr_mem):
        pytest.skip("our primary group is not a user private group here")
    os.chown(d, -1, os.getegid())  # umask 002 with a user private group: only we are in it
    assert _cache_dir.private_dir(str(d / "cpp")) == str(d / "cpp")


def test_the_fallback_is_created_private_even_under_umask_0(sticky_tmp):
    code = """
        import os, stat
        os.umask(0)
        from barkgpt import _cache_dir
        root = _cache_dir.cache_root()
        print("ROOT", root)
        for p in (root, os.path.dirname(root)):
            print("MODE", oct(stat.S_IMODE(os.stat(p).st_mode)))
    """
    r = run_python(code, env={"TMPDIR": sticky_tmp, "XDG_CACHE_HOME": "/dev/null/cache", "BARKGPT_CACHE_DIR": ""})
    assert f"ROOT {sticky_tmp}/barkgpt-{os.geteuid()}/cpp" in r.stdout, r.stdout + r.stderr
    assert r.stdout.count("MODE 0o700") == 2, r.stdout


def test_a_symlinked_cache_is_checked_where_it_points(tmp_path):
    from barkgpt import _cache_dir

    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    assert _cache_dir.private_dir(str(tmp_path / "link" / "cpp")) == str(tmp_path / "link" / "cpp")
    os.chmod(real, 0o777)
    with pytest.raises(_cache_dir.UnsafeCacheDir, match=f"{real} is writable by group or others"):
        _cache_dir.private_dir(str(tmp_path / "link" / "cpp"))


def test_the_default_cache_still_loads():
    if CPP_DISABLED:
        pytest.skip("BARKGPT_NO_CPP is set")
    import barkgpt._cpp as cpp
    from barkgpt import _cache_dir

    assert cpp.BUILD in ("jit", "prebuilt", "loaded")
    if cpp.BUILD == "jit":
        assert _cache_dir.check_library(cpp.LIBRARY) == cpp.LIBRARY


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to chown")
def test_check_library_trusts_only_the_owners_it_is_given(tmp_path):
    from barkgpt import _cache_dir

    d = tmp_path / "pkg"
    d.mkdir(mode=0o755)
    lib = d / "_C.so"
    lib.write_bytes(b"\0")
    os.chmod(lib, 0o755)
    assert _cache_dir.check_library(str(lib)) == str(lib)
    os.chown(lib, ATTACKER, ATTACKER)
    with pytest.raises(_cache_dir.UnsafeCacheDir, match=f"owned by uid {ATTACKER}"):
        _cache_dir.check_library(str(lib))
    # the prebuilt barkgpt._C: its package's owner (who controls barkgpt's Python code anyway)
    assert _cache_dir.check_library(str(lib), owners=(0, ATTACKER)) == str(lib)
    os.chmod(lib, 0o775)
    with pytest.raises(_cache_dir.UnsafeCacheDir, match="writable by group or others"):
        _cache_dir.check_library(str(lib), owners=(0, ATTACKER))
    os.mkfifo(d / "fifo")
    with pytest.raises(_cache_dir.UnsafeCacheDir, match="not a regular file"):
        _cache_dir.check_library(str(d / "fifo"))


def test_our_own_build_under_umask_002_is_loadable(tmp_path, monkeypatch):
    # The linker honours the umask: under 002 the fresh library is group-writable. Where the
    # group is shared (not the user's own), it must still be usable: the build makes it go-w.
    if CPP_DISABLED:
        pytest.skip("BARKGPT_NO_CPP is set")
    import barkgpt._cpp as cpp
    from barkgpt import _cache_dir
    from torch.utils import cpp_extension

    monkeypatch.setenv("BARKGPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpp, "_compiler_problem", lambda: None)
    monkeypatch.setattr(_cache_dir, "_own_group", lambda gid: False)

    def fake_load(name, sources, build_directory, **kwargs):
        path = os.path.join(build_directory, name + cpp_extension.LIB_EXT)
        with open(path, "wb") as f:
            f.write(b"a library")
        os.chmod(path, 0o775 & ~0o002)

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    old = os.umask(0o002)
    try:
        lib = cpp._jit_build(cpp.source_dir())
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(lib).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(os.path.dirname(lib)).st_mode) == 0o700


# ---- a kill while old checkpoints are pruned leaves no half-deleted checkpoint in sight ------------

def test_a_kill_mid_prune_leaves_only_complete_checkpoints(tmp_path, monkeypatch):
    model = _tiny()
    opt = torch.optim.AdamW(model.parameters())
    for step in (1, 2):
        ckpt.save_training_checkpoint(str(tmp_path), step, model, opt, {}, {}, keep_last=2)
    real_rmtree = shutil.rmtree

    def killed_rmtree(path, *a, **k):  # deletes one file, then the process dies
        victim = sorted(os.listdir(path))[-1]
        os.remove(os.path.join(path, victim))
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_rmtree)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_training_checkpoint(str(tmp_path), 3, model, opt, {}, {}, keep_last=2)
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    steps = [s for s, _ in ckpt.list_checkpoints(str(tmp_path))]
    assert steps == [2, 3]
    for _, path in ckpt.list_checkpoints(str(tmp_path)):
        ckpt.load_training_checkpoint(path)  # every visible checkpoint is complete
    ckpt.save_training_checkpoint(str(tmp_path), 4, model, opt, {}, {}, keep_last=2)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_00000003", "step_00000004"]
