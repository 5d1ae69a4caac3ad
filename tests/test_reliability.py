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
    out = str(tmp_path / "run")
    r = subprocess.run([sys.executable, "-c", CTRL_C_RUN, dropout_config, out], env=ENV, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 130, r.stderr
    assert "stopping at the next step boundary" in r.stderr and "interrupted: saved" in r.stderr
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
