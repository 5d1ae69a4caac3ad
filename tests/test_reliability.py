"""Bad input ends in a clear error, a crash loses nothing, faults are caught (issue: reliability)."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import barkgpt
from barkgpt import CheckpointError, ConfigError, GPTConfig, ops
from barkgpt.checkpoint import latest_checkpoint, list_checkpoints, save_training_checkpoint
from barkgpt.reference import attention_math, layer_norm_math

USER_ERRORS = (ValueError, TypeError, IndexError)
ENV = {**os.environ, "BARKGPT_BACKEND": "torch", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TRAIN = [sys.executable, "-m", "barkgpt", "train", "--steps", "30", "--batch-size", "16", "--eval-every", "10",
         "--no-progress", "--no-sample", "--backend", "torch"]


def _final_state(out):
    """Weights of the final model and the loss history of the last checkpoint."""
    from safetensors.torch import load_file

    weights = load_file(os.path.join(out, "model.safetensors"))
    with open(os.path.join(latest_checkpoint(out), "state.json")) as f:
        state = json.load(f)
    return weights, state["losses"], state["val_history"]


def _assert_same_run(a, b):
    wa, la, va = _final_state(a)
    wb, lb, vb = _final_state(b)
    assert la == lb and va == vb
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def dropout_config(tmp_path_factory):
    p = tmp_path_factory.mktemp("cfg") / "bark-dropout.json"
    GPTConfig.preset("bark", dropout=0.1).to_json(str(p))  # dropout: the RNG state must survive too
    return str(p)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, dropout_config):
    out = str(tmp_path_factory.mktemp("ref") / "run")
    subprocess.run(TRAIN + ["--config", dropout_config, "--save-every", "5", "--out", out], env=ENV, check=True,
                   capture_output=True)
    return out


def _kill_when(cmd, ready, delay, timeout=60):
    """Start cmd, wait until ready() is true, wait delay seconds, SIGKILL it. True if it was killed."""
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not ready():
        if p.poll() is not None or time.time() - t0 > timeout:
            p.wait()
            return False
        time.sleep(0.005)
    time.sleep(delay)
    killed = p.poll() is None
    p.send_signal(signal.SIGKILL)
    p.wait()
    return killed


def test_sigkill_mid_run_then_resume_is_bitwise_identical(tmp_path, reference_run, dropout_config):
    out = str(tmp_path / "run")
    killed = _kill_when(TRAIN + ["--config", dropout_config, "--save-every", "5", "--out", out],
                        lambda: len(list_checkpoints(out)) >= 2, delay=0.05)
    assert killed, "the run finished before it could be killed"
    assert list_checkpoints(out)[-1][0] < 30
    subprocess.run(TRAIN + ["--out", out, "--resume"], env=ENV, check=True, capture_output=True)
    _assert_same_run(out, reference_run)


CTRL_C_RUN = """
import os, signal, sys
import barkgpt
# SIGINT arrives (from the process itself, so exactly then) as step 10 ends
hook = lambda step, loss: os.kill(os.getpid(), signal.SIGINT) if step == 10 else None
try:
    barkgpt.train(model=barkgpt.GPTConfig.from_json(sys.argv[1]).to_dict(), steps=30, batch_size=16,
                  eval_every=10, save_every=100, progress=False, sample=False, backend="torch",
                  out=sys.argv[2], on_step=hook)
except KeyboardInterrupt:
    sys.exit(130)
"""


def test_ctrl_c_finishes_the_step_saves_and_resumes_bitwise(tmp_path, reference_run, dropout_config):
    # The first SIGINT is honoured at the step boundary it arrives at: a checkpoint there, and a
    # resume that ends exactly like the uninterrupted run.
    _interrupt_then_resume(tmp_path, reference_run, CTRL_C_RUN, dropout_config, 130,
                           ["stopping at the next step boundary", "interrupted: saved"])


def _interrupt_then_resume(tmp_path, reference_run, script, config, returncode, messages):
    """Run ``script`` (a run that signals itself mid-training), expect it to exit with
    ``returncode`` saying ``messages`` with one checkpoint at step 10, resume it, and compare
    with the uninterrupted run."""
    out = str(tmp_path / "run")
    r = subprocess.run([sys.executable, "-c", script, config, out], env=ENV, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == returncode, r.stderr
    for m in messages:
        assert m in r.stderr, r.stderr
    assert [s for s, _ in list_checkpoints(out)] == [10]
    subprocess.run(TRAIN + ["--out", out, "--resume"], env=ENV, check=True, capture_output=True)
    _assert_same_run(out, reference_run)


def test_sigkill_during_saves_never_loses_the_last_checkpoint(tmp_path, reference_run, dropout_config):
    # --save-every 1: the process spends most of its time saving, so random kills land mid-save.
    out = str(tmp_path / "run")
    cmd = TRAIN + ["--config", dropout_config, "--save-every", "1", "--out", out]
    rng = random.Random(0)
    kills = 0
    for attempt in range(4):
        before = list_checkpoints(out)
        killed = _kill_when(cmd if attempt == 0 else TRAIN + ["--out", out, "--resume", "--save-every", "1"],
                            lambda: len(list_checkpoints(out)) > len(before) + 1, delay=rng.uniform(0, 0.05))
        kills += killed
        ck = list_checkpoints(out)
        assert ck, "no checkpoint survived"
        for _, path in ck:  # every checkpoint that is visible is complete and loads
            barkgpt.checkpoint.load_training_checkpoint(path)
        if not killed:
            break
    assert kills >= 1
    if list_checkpoints(out)[-1][0] < 30 or not os.path.exists(os.path.join(out, "model.safetensors")):
        subprocess.run(TRAIN + ["--out", out, "--resume", "--save-every", "1"], env=ENV, check=True,
                       capture_output=True)
    _assert_same_run(out, reference_run)


def test_keeps_last_n_and_best(tmp_path):
    m = barkgpt.BarkGPT(GPTConfig.preset("bark-tiny"), backend="torch")
    opt = m.configure_optimizers()
    out = str(tmp_path)
    for step in range(1, 8):
        save_training_checkpoint(out, step, m, opt, {"x": 1}, {"t": torch.zeros(1)}, keep_last=2, keep_steps=(3,))
    assert [s for s, _ in list_checkpoints(out)] == [3, 6, 7]
    # a save killed midway leaves only a .tmp- directory, which is never taken for a checkpoint
    os.makedirs(os.path.join(out, "checkpoints", ".tmp-step_00000008-x"))
    assert latest_checkpoint(out).endswith("step_00000007")


def test_deterministic_mode_gives_identical_weights(tmp_path):
    kw = dict(steps=8, eval_every=8, save_every=0, deterministic=True, progress=False, sample=False,
              model=GPTConfig.preset("bark", dropout=0.1).to_dict(), log=lambda m: None)
    a = barkgpt.train(out=str(tmp_path / "a"), **kw)
    b = barkgpt.train(out=str(tmp_path / "b"), **kw)
    assert not torch.are_deterministic_algorithms_enabled()  # the process setting is restored
    assert a.losses == b.losses
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_deterministic_mode_gives_identical_weights_on_gpu(tmp_path, backend):
    # bf16 autocast, dropout on, the bark-article shapes (several attention tiles, T=256)
    kw = dict(steps=6, eval_every=6, save_every=0, deterministic=True, progress=False, sample=False,
              device="cuda", backend=backend, batch_size=16, log=lambda m: None,
              model=GPTConfig.preset("bark-article", dropout=0.1).to_dict())
    a = barkgpt.train(out=str(tmp_path / "a"), **kw)
    b = barkgpt.train(out=str(tmp_path / "b"), **kw)
    assert not torch.are_deterministic_algorithms_enabled()
    assert a.losses == b.losses
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_pickle_is_never_loaded(tmp_path):
    evil = tmp_path / "m"
    evil.mkdir()
    torch.save({"token_emb.weight": torch.zeros(2, 2)}, str(evil / "model.safetensors"))  # a pickle
    GPTConfig.preset("bark").to_json(str(evil / "config.json"))
    with pytest.raises(CheckpointError, match="not a barkgpt checkpoint"):
        barkgpt.load(str(evil))
    # even with a forged manifest the file is parsed as safetensors only
    import hashlib
    man = {n: hashlib.sha256((evil / n).read_bytes()).hexdigest() for n in ("model.safetensors", "config.json")}
    (evil / "manifest.json").write_text(json.dumps({"format": "barkgpt", "version": 1, "sha256": man}))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        barkgpt.load(str(evil))


def test_resume_refuses_a_different_model(tmp_path):
    out = str(tmp_path / "r")
    barkgpt.train(steps=2, eval_every=2, out=out, progress=False, sample=False, log=lambda m: None)
    with pytest.raises(barkgpt.TrainingError, match="preset='small' differs from the run being resumed"):
        barkgpt.train(out=out, resume=True, preset="small", log=lambda m: None)


@pytest.mark.parametrize("backend", ops.available_backends("cpu"))
def test_out_of_range_ids_raise_on_every_backend(backend):
    m = barkgpt.BarkGPT(GPTConfig.preset("bark-tiny"), backend=backend)
    for bad in (9, -1, 10**6):
        with pytest.raises(IndexError, match=f"token id {bad} is out of range for a vocabulary of 9"):
            m(torch.tensor([[1, 2, bad]]))


# ---- fuzzing: a result that matches the definition, or a clear error; never a crash ---------------

dims = st.integers(min_value=0, max_value=6)
dtypes = st.sampled_from([torch.float32, torch.float64, torch.int64, torch.float16])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=st.lists(dims, min_size=0, max_size=3), wlen=dims, dtype=dtypes, bias=st.booleans(),
       eps=st.sampled_from([1e-5, 0.0, -1.0, 1e-3]), scale=st.sampled_from([1.0, 1e4, 1e-4]))
def test_fuzz_layer_norm(shape, wlen, dtype, bias, eps, scale):
    x = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype) if dtype.is_floating_point else \
        torch.randint(0, 5, shape, dtype=dtype)
    w = torch.randn(wlen, dtype=torch.float64).to(dtype if dtype.is_floating_point else torch.float32)
    b = torch.randn(wlen, dtype=w.dtype) if bias else None
    try:
        y = ops.layer_norm(x, w, b, eps)
    except USER_ERRORS as e:
        assert str(e)
        return
    assert y.shape == x.shape and y.dtype == x.dtype
    want = layer_norm_math(x.double(), w.double(), None if b is None else b.double(), eps)
    tol = 1e-2 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(0, 2), H=st.integers(1, 3), T=st.integers(0, 9), D=st.integers(0, 9),
       Tk=st.integers(0, 9), causal=st.booleans(), rank=st.sampled_from([3, 4, 5]),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.int64]))
def test_fuzz_attention(B, H, T, D, Tk, causal, rank, dtype):
    shape_q = (B, H, T, D)[:rank] if rank <= 4 else (B, H, T, D, 1)
    shape_k = (B, H, Tk, D)[:rank] if rank <= 4 else (B, H, Tk, D, 1)
    mk = (lambda s: torch.randn(s, dtype=dtype)) if dtype.is_floating_point else \
        (lambda s: torch.randint(0, 3, s, dtype=dtype))
    q, k, v = mk(shape_q), mk(shape_k), mk(shape_k)
    try:
        y = ops.attention(q, k, v, causal)
    except USER_ERRORS as e:
        assert str(e)
        return
    assert y.shape == q.shape
    if T and D:
        torch.testing.assert_close(y.double(), attention_math(q.double(), k.double(), v.double(), causal),
                                   rtol=1e-4, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(B=st.integers(0, 3), T=st.integers(0, 6), V=st.integers(1, 6), P=st.integers(1, 6),
       lo=st.integers(-3, 0), hi=st.integers(1, 9), dtype=st.sampled_from([torch.int64, torch.int32, torch.float32]))
def test_fuzz_embedding_add(B, T, V, P, lo, hi, dtype):
    idx = torch.randint(lo, hi, (B, T)).to(dtype)
    tok, pos = torch.randn(V, 4), torch.randn(P, 4)
    try:
        y = ops.embedding_add(idx, tok, pos)
    except USER_ERRORS as e:
        assert str(e)
        return
    assert idx.numel() == 0 or (int(idx.min()) >= 0 and int(idx.max()) < V)  # never a silent wrong read
    torch.testing.assert_close(y, tok[idx.long()] + pos[:T])


config_values = st.one_of(st.integers(-2, 70), st.floats(allow_nan=True), st.booleans(), st.none(),
                          st.text(max_size=5), st.lists(st.integers(), max_size=2))


@settings(max_examples=200, deadline=None)
@given(d=st.dictionaries(st.sampled_from(["vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dropout",
                                          "bias", "norm_first", "activation", "causal", "ffn_hidden",
                                          "tie_embeddings", "layer_norm_eps", "extra"]),
                         config_values, max_size=14))
def test_fuzz_config_loader(d):
    try:
        c = GPTConfig.from_dict(d)
    except ConfigError as e:
        assert str(e)
        return
    # anything accepted is a model we can build
    assert c.n_embd % c.n_head == 0 and c.vocab_size > 0 and c.block_size > 0
    assert GPTConfig.from_json(c.to_json()) == c


@settings(max_examples=40, deadline=None)
@given(text=st.text(max_size=40))
def test_fuzz_config_json_text(text):
    try:
        GPTConfig.from_json("{" + text)
    except ConfigError as e:
        assert str(e)


def test_a_kill_while_pruning_never_leaves_a_partial_checkpoint(tmp_path, monkeypatch):
    # Pruning deletes old checkpoints file by file: a kill in the middle must not leave a
    # checkpoint that is still listed but has lost files (seen as "model.safetensors is missing").
    import shutil

    m = barkgpt.BarkGPT(GPTConfig.preset("bark-tiny"), backend="torch")
    opt = m.configure_optimizers()
    out = str(tmp_path)
    for step in (1, 2):
        save_training_checkpoint(out, step, m, opt, {"x": 1}, {"t": torch.zeros(1)}, keep_last=2)
    real_rmtree = shutil.rmtree

    def killed_midway(path, *a, **kw):  # deletes one file, then the process "dies"
        if os.path.isdir(path) and os.path.exists(os.path.join(path, "model.safetensors")):
            os.unlink(os.path.join(path, "model.safetensors"))
            raise KeyboardInterrupt
        return real_rmtree(path, *a, **kw)

    monkeypatch.setattr(barkgpt.checkpoint.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        save_training_checkpoint(out, 3, m, opt, {"x": 1}, {"t": torch.zeros(1)}, keep_last=2)
    monkeypatch.undo()
    for _, path in list_checkpoints(out):  # every checkpoint still listed is complete
        barkgpt.checkpoint.load_training_checkpoint(path)
    assert [s for s, _ in list_checkpoints(out)] == [2, 3]


# ---- issue #18: concurrent runs, changed data, resume settings, metrics, foreign --out, umask, SIGTERM ----

def _wait_for(cond, timeout=120):
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def test_a_second_run_on_the_same_out_is_refused_naming_the_first(tmp_path):
    # 18.4: two runs on one --out corrupted it; now the directory is locked while a run uses it
    out = str(tmp_path / "run")
    first = subprocess.Popen(TRAIN[:5] + ["100000", "--save-every", "2"] + TRAIN[6:] + ["--out", out], env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: list_checkpoints(out) or first.poll() is not None)
        assert first.poll() is None
        for kw in (dict(), dict(resume=True)):  # neither a new run nor a resume may share it
            with pytest.raises(barkgpt.TrainingError, match=rf"in use by another barkgpt run \(pid {first.pid}\b"):
                barkgpt.train(steps=4, out=out, progress=False, sample=False, log=lambda m: None, **kw)
        r = subprocess.run(TRAIN + ["--out", out, "--resume"], env=ENV, capture_output=True, text=True)
        assert r.returncode == 2 and f"pid {first.pid}" in r.stderr and "Traceback" not in r.stderr, r.stderr
    finally:
        first.kill()
        first.wait()
    # the lock died with its process: a killed run never blocks its resume
    r = barkgpt.train(out=out, resume=True, steps=list_checkpoints(out)[-1][0] + 1, progress=False, sample=False,
                      log=lambda m: None, backend="torch")
    assert len(r.losses) == list_checkpoints(out)[-1][0]


TEXT = "the quick brown fox jumps over the lazy dog. " * 400
TINY_TEXT = dict(model=dict(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=16), eval_every=100,
                 progress=False, sample=False, backend="torch", log=lambda m: None)


def _crashed_text_run(tmp_path):
    data = tmp_path / "t.txt"
    data.write_text(TEXT)

    def crash(step, loss):
        if step == 3:
            raise RuntimeError("crash")
    out = str(tmp_path / "r")
    with pytest.raises(RuntimeError):
        barkgpt.train(data=str(data), steps=6, save_every=2, out=out, on_step=crash, **TINY_TEXT)
    return data, out


@pytest.mark.parametrize("change", ["shorter", "same size"])
def test_resume_refuses_changed_data_unless_told(tmp_path, change):
    # 18.5: --resume after the data file changed continued silently
    data, out = _crashed_text_run(tmp_path)
    new = TEXT[:len(TEXT) // 2] if change == "shorter" else TEXT.replace("quick", "QUICK")
    data.write_text(new)
    with pytest.raises(barkgpt.TrainingError, match=r"data .*t\.txt.* changed since .*--allow-data-change"):
        barkgpt.train(out=out, resume=True, **TINY_TEXT)
    from barkgpt import cli
    assert cli.main(["train", "--out", out, "--resume", "--no-progress", "--no-sample"]) == 2
    # told so, it goes on (and records the new data, so the next resume does not ask again)
    r = barkgpt.train(out=out, resume=True, allow_data_change=True, **TINY_TEXT)
    assert len(r.losses) == 6
    r = barkgpt.train(out=out, resume=True, steps=7, **TINY_TEXT)
    assert len(r.losses) == 7
    assert cli.main(["train", "--out", out, "--resume", "--steps", "8", "--no-progress", "--no-sample",
                     "--allow-data-change"]) == 0


def test_resume_accepts_unchanged_data(tmp_path):
    data, out = _crashed_text_run(tmp_path)
    os.utime(data)  # touched, not changed
    assert len(barkgpt.train(out=out, resume=True, **TINY_TEXT).losses) == 6


def test_python_api_refuses_conflicting_settings_on_resume(tmp_path):
    # 18.6: a TrainConfig passed with resume=True was silently replaced by the stored run
    from barkgpt.train import TrainConfig

    out = str(tmp_path / "r")
    barkgpt.train(steps=2, eval_every=2, out=out, progress=False, sample=False, log=lambda m: None)
    with pytest.raises(barkgpt.TrainingError, match="preset='small' differs from the run being resumed"):
        barkgpt.train(TrainConfig(out=out, preset="small", lr=0.5, batch_size=2), resume=True, log=lambda m: None)
    with pytest.raises(barkgpt.TrainingError, match="lr=0.5 differs from the run being resumed"):
        barkgpt.train(TrainConfig(out=out, lr=0.5), resume=True, log=lambda m: None)
    with pytest.raises(barkgpt.TrainingError, match="batch_size=2 differs"):  # keywords over the config
        barkgpt.train(TrainConfig(out=out), resume=True, batch_size=2, log=lambda m: None)
    # settings a resume may change, and the run's own values, are accepted
    r = barkgpt.train(TrainConfig(out=out, steps=4, preset="bark", progress=False, sample=False), resume=True,
                      log=lambda m: None)
    assert len(r.losses) == 4


def test_a_corrupt_metrics_file_never_breaks_resume(tmp_path):
    # 18.10: a line `null` gave an AttributeError, {"step": "7"} a TypeError
    data, out = _crashed_text_run(tmp_path)
    path = os.path.join(out, "metrics.jsonl")
    good = open(path, "rb").read()
    with open(path, "ab") as f:
        f.write(b'null\n{"step": "7"}\n[1, 2]\n{"loss": 1.0}\n\xff\xfe not utf-8\n{"step": true}\n{"step": 1.5}\n{"step": 2, "tor')
    said = []
    r = barkgpt.train(out=out, resume=True, **{**TINY_TEXT, "log": said.append})
    assert len(r.losses) == 6
    assert any("metrics.jsonl" in m and "7 unreadable lines" in m for m in said), said
    lines = [json.loads(x) for x in open(path, "rb")]  # every line is valid again
    assert all(isinstance(e, dict) and type(e["step"]) is int for e in lines)
    assert open(path, "rb").read().startswith(good)


def test_a_non_empty_out_that_is_not_a_run_is_refused(tmp_path):
    # 18.12: a foreign config.json / manifest.json in --out were overwritten
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text('{"not": "barkgpt"}')
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(barkgpt.TrainingError, match=r"not empty and is not a barkgpt run.*config\.json.*notes\.txt"):
        barkgpt.train(steps=2, out=str(out), progress=False, sample=False, log=lambda m: None)
    assert (out / "config.json").read_text() == '{"not": "barkgpt"}' and sorted(os.listdir(out)) == ["config.json",
                                                                                                 "notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty directory is fine
    barkgpt.train(steps=2, eval_every=2, out=str(empty), progress=False, sample=False, log=lambda m: None)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_run_files_honour_the_umask(tmp_path, umask):
    # 18.14: the rewritten metrics file was 0600 whatever the umask
    old = os.umask(umask)
    try:
        data, out = _crashed_text_run(tmp_path)
        barkgpt.train(out=out, resume=True, **TINY_TEXT)  # rewrites metrics.jsonl
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    for name in ("metrics.jsonl", "train_config.json"):
        assert oct(os.stat(os.path.join(out, name)).st_mode & 0o777) == oct(want), name
    assert oct(os.stat(out).st_mode & 0o777) == oct(0o777 & ~umask)


SIGTERM_RUN = CTRL_C_RUN.replace("signal.SIGINT", "signal.SIGTERM").replace("except KeyboardInterrupt:",
                                                                            "except Terminated:") \
    .replace("sys.exit(130)", "sys.exit(143)").replace("import barkgpt\n", "import barkgpt\nfrom barkgpt.train import Terminated\n")


def test_sigterm_finishes_the_step_saves_and_resumes_bitwise(tmp_path, reference_run, dropout_config):
    # 18.16: SIGTERM (timeout, Slurm, container stops) killed the run without saving
    _interrupt_then_resume(tmp_path, reference_run, SIGTERM_RUN, dropout_config, 143,
                           ["SIGTERM", "stopping at the next step boundary", "terminated (SIGTERM): saved"])


def test_sigterm_to_the_cli_saves_and_exits_non_zero(tmp_path):
    out = str(tmp_path / "run")
    p = subprocess.Popen(TRAIN[:5] + ["100000", "--save-every", "0"] + TRAIN[6:] + ["--out", out], env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: os.path.exists(os.path.join(out, "metrics.jsonl")) and
              os.path.getsize(os.path.join(out, "metrics.jsonl")) > 0 or p.poll() is not None)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err
    assert list_checkpoints(out), "nothing saved"
    step = list_checkpoints(out)[-1][0]
    assert f"terminated (SIGTERM): saved {latest_checkpoint(out)}" in err
    assert "Traceback" not in err
    r = barkgpt.train(out=out, resume=True, steps=step + 1, progress=False, sample=False, log=lambda m: None)
    assert len(r.losses) == step + 1


def test_resume_of_a_missing_directory_says_it_does_not_exist(tmp_path):
    with pytest.raises(barkgpt.TrainingError, match=r"does not exist"):
        barkgpt.train(out=str(tmp_path / "nope"), resume=True, log=lambda m: None)


def test_sigterm_under_torchrun_stops_every_rank_saves_and_resumes(tmp_path):
    # torchrun passes a SIGTERM it gets on to its processes: they stop at one step, rank 0 saves
    data = tmp_path / "t.txt"
    data.write_text(TEXT)
    model = tmp_path / "m.json"
    model.write_text(json.dumps(TINY_TEXT["model"]))
    out = str(tmp_path / "run")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("BARKGPT_BACKEND", None)
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "barkgpt", "train", "--data", str(data), "--config", str(model), "--steps", "100000",
                          "--save-every", "0", "--eval-every", "100000", "--batch-size", "4", "--device", "cpu",
                          "--backend", "torch", "--out", out, "--no-progress", "--no-sample"],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(out, "metrics.jsonl")
    try:
        _wait_for(lambda: (os.path.exists(metrics) and os.path.getsize(metrics) > 0) or p.poll() is not None, 240)
        assert p.poll() is None, p.communicate()[1]
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode != 0
    ck = list_checkpoints(out)
    assert ck, err
    assert err.count(f"terminated (SIGTERM): saved {ck[-1][1]}") == 1, err  # rank 0 says it, once
    assert err.count("barkgpt: SIGTERM: stopping at the next step boundary") == 1, err
    r = barkgpt.train(out=out, resume=True, steps=ck[-1][0] + 1, progress=False, sample=False, log=lambda m: None)
    assert len(r.losses) == ck[-1][0] + 1
