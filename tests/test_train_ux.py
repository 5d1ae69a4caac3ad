"""What a new user met (issue 21): evaluation size and progress, plain log lines, per-preset
defaults, bits per byte on text, extending a finished run's schedule."""

import contextlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import barkgpt
from barkgpt import TrainingError
from barkgpt.config import GPTConfig, TRAIN_DEFAULTS
from barkgpt.train import TrainConfig, lr_at

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _quiet(**kw):
    return dict(dict(progress=False, sample=False, backend="torch", log=lambda m: None), **kw)


def _metrics(out_dir):
    return [json.loads(x) for x in open(os.path.join(out_dir, "metrics.jsonl"))]


def _text(tmp_path, n=30_000, seed=0):
    rng = np.random.default_rng(seed)
    words = [b"the ", b"dog ", b"barks ", b"at ", b"a ", b"cat ", b"\n"]
    data = b"".join(words[i] for i in rng.integers(0, len(words), n // 4))
    p = tmp_path / "corpus.txt"
    p.write_bytes(data)
    return str(p)


TINY = GPTConfig(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=16).to_dict()


# ---- 1. evaluation size and progress ------------------------------------------------------------

def test_eval_size_is_what_was_asked_and_is_stated(tmp_path):
    lines = []
    data = _text(tmp_path)
    r = barkgpt.train(**_quiet(log=lines.append), data=data, model=TINY, steps=4, eval_every=2, batch_size=4,
                      eval_tokens=100, out=str(tmp_path / "a"))
    # 100 tokens round up to 7 windows of 16
    assert any("evaluation every 2 steps: 7 windows = 112 tokens" in x for x in lines), lines
    assert any(x.startswith("step 2: evaluating 7 windows (112 tokens)") for x in lines), lines
    evals = [e for e in _metrics(r.out_dir) if "val_loss" in e]
    assert [e["eval_tokens"] for e in evals] == [112, 112]
    r = barkgpt.train(**_quiet(log=lines.append), data=data, model=TINY, steps=2, eval_every=2, batch_size=4,
                      eval_batches=3, out=str(tmp_path / "b"))
    assert [e["eval_tokens"] for e in _metrics(r.out_dir) if "val_loss" in e] == [3 * 4 * 16]
    with pytest.raises(TrainingError, match="eval_tokens or eval_batches"):
        barkgpt.train(**_quiet(), data=data, model=TINY, eval_tokens=10, eval_batches=1, out=str(tmp_path / "c"))


def test_default_eval_size_follows_the_run():
    gpt2 = TrainConfig(preset="gpt2", batch_size=1, eval_every=2)
    # the run: batch 1, eval every 2 steps; evaluation is now a window, not 256 of them
    assert gpt2.eval_windows(1024, tokens_per_step=1024) == 1
    assert TrainConfig(preset="gpt2", batch_size=8).eval_windows(1024, 8 * 1024) == 128  # the preset's cap
    bark = TrainConfig(preset="bark")
    assert bark.eval_windows(32, 64 * 32) == 2048  # the bark corpus's whole held-out set, as before


def test_eval_progress_lines_while_evaluating(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules["barkgpt.train"], "EVAL_PROGRESS_EVERY_S", 0.0)
    lines = []
    barkgpt.train(**_quiet(log=lines.append), data=_text(tmp_path), model=TINY, steps=1, eval_every=1,
                  batch_size=2, eval_batches=3, out=str(tmp_path / "a"))
    assert [x for x in lines if "evaluated" in x] == ["step 1: evaluated 2/6 windows", "step 1: evaluated 4/6 windows"]


# ---- 2. plain log lines -------------------------------------------------------------------------

def test_plain_log_lines_every_log_every_steps(tmp_path):
    lines = []
    barkgpt.train(**_quiet(log=lines.append, progress=True), steps=25, log_every=10, eval_every=20,
                  out=str(tmp_path / "a"))  # progress=True, but pytest's stderr is not a terminal
    steps = [x for x in lines if x.startswith("step ") and "/25 |" in x]
    assert [x.split(" |")[0] for x in steps] == ["step 1/25", "step 10/25", "step 20/25", "step 25/25"]
    for x in steps[1:]:
        assert " | loss " in x and " | lr " in x and " tok/s | ETA " in x, x
    assert "| val " in steps[2]  # the evaluation at step 20
    assert not any("\r" in x for x in lines)


def test_cli_writes_plain_lines_to_a_pipe(tmp_path):
    env = dict(os.environ, BARKGPT_BACKEND="torch", PYTHONPATH=REPO)
    p = subprocess.run([sys.executable, "-m", "barkgpt", "train", "--steps", "20", "--log-every", "5",
                        "--no-sample", "--out", str(tmp_path / "r")], capture_output=True, text=True, env=env,
                       cwd=str(tmp_path), timeout=300)
    assert p.returncode == 0, p.stderr
    assert "\r" not in p.stderr
    assert [x.split(" |")[0] for x in p.stderr.splitlines() if "/20 |" in x] == \
        ["step 1/20", "step 5/20", "step 10/20", "step 15/20", "step 20/20"]


def test_first_step_under_compile_says_compiling(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda m, *a, **k: m)  # the messages, not the compiler
    lines = []
    barkgpt.train(**_quiet(log=lines.append), steps=10, log_every=5, compile=True, out=str(tmp_path / "a"))
    assert "compiling the model (torch.compile): the first step takes longer" in lines
    first = next(x for x in lines if x.startswith("step 1/10"))
    assert "compiled in " in first and "ETA" not in first
    assert "ETA" in next(x for x in lines if x.startswith("step 5/10"))


# ---- 3. per-preset defaults ----------------------------------------------------------------------

def test_each_preset_has_its_defaults_and_flags_win(tmp_path):
    assert TrainConfig(preset="gpt2").defaults()["lr"] == 6e-4
    assert set(TRAIN_DEFAULTS) == set(barkgpt.config.PRESETS)
    data = _text(tmp_path)
    r = barkgpt.train(**_quiet(), preset="small", data=data, steps=1, eval_every=1, eval_batches=1,
                      out=str(tmp_path / "a"))
    saved = json.load(open(os.path.join(r.out_dir, "train_config.json")))
    assert (saved["lr"], saved["batch_size"], saved["warmup_steps"]) == (3e-3, 32, 0)
    r = barkgpt.train(**_quiet(), preset="small", data=data, steps=1, eval_every=1, eval_batches=1, lr=1e-3,
                      batch_size=2, out=str(tmp_path / "b"))
    saved = json.load(open(os.path.join(r.out_dir, "train_config.json")))
    assert (saved["lr"], saved["batch_size"]) == (1e-3, 2)


def test_presets_command_shows_the_defaults():
    p = subprocess.run([sys.executable, "-m", "barkgpt", "presets"], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=REPO), timeout=120)
    assert p.returncode == 0
    gpt2 = next(x for x in p.stdout.splitlines() if x.startswith("gpt2 "))
    assert "0.0006" in gpt2 and " 8 " in gpt2 and "<= 700" in gpt2


def test_gpt2_defaults_do_not_diverge(tmp_path):
    # GPT-2's width and heads (768, 12) and its training defaults (lr, warmup cap, batch), two
    # layers and a short block so that CI on 2 cores runs it: the loss falls and stays finite.
    cfg = GPTConfig.preset("gpt2", n_layer=2, block_size=32, vocab_size=256)
    d = TRAIN_DEFAULTS["gpt2"]
    r = barkgpt.train(**_quiet(), model=cfg.to_dict(), data=_text(tmp_path, 200_000), steps=25,
                      lr=d["lr"], batch_size=d["batch_size"], eval_every=25, eval_batches=2,
                      out=str(tmp_path / "g"))
    assert all(math.isfinite(x) for x in r.losses)
    assert np.mean(r.losses[-5:]) < 0.6 * r.losses[0]  # from ln(256) = 5.5 towards the corpus
    assert r.final_val_loss < 0.6 * math.log(256)


def test_small_defaults_do_not_diverge(tmp_path):
    r = barkgpt.train(**_quiet(), preset="small", data=_text(tmp_path, 200_000), steps=30, eval_every=30,
                      eval_batches=2, out=str(tmp_path / "s"))
    assert all(math.isfinite(x) for x in r.losses)
    assert np.mean(r.losses[-5:]) < 0.6 * r.losses[0]


# ---- 4. bits per byte on text --------------------------------------------------------------------

def test_bits_per_byte_on_a_byte_corpus(tmp_path):
    lines = []
    r = barkgpt.train(**_quiet(log=lines.append), data=_text(tmp_path), model=TINY, steps=3, eval_every=3,
                      batch_size=4, eval_batches=2, out=str(tmp_path / "a"))
    assert r.final_val_bpb == pytest.approx(r.final_val_loss / math.log(2), rel=1e-12)  # 1 byte per token
    assert r.final_val_ppl == pytest.approx(math.exp(r.final_val_loss))
    last = [e for e in _metrics(r.out_dir) if "val_loss" in e][-1]
    assert last["val_bpb"] == pytest.approx(r.final_val_bpb) and last["val_ppl"] == pytest.approx(r.final_val_ppl)
    assert any(f"{r.final_val_bpb:.4f} bits per byte" in x for x in lines if x.startswith("done:"))
    assert sum("nats per token" in x for x in lines) == 1  # the unit, said once
    bark = barkgpt.train(**_quiet(), steps=2, eval_every=2, out=str(tmp_path / "b"))
    assert bark.final_val_bpb is None  # bark words are not bytes of text


def test_bits_per_byte_on_bpe_tokens_counts_the_text_bytes(tmp_path):
    pytest.importorskip("tokenizers")
    from barkgpt.data import tokenize_file, load_dataset
    from barkgpt.train import evaluate_stats

    src = tmp_path / "c.txt"
    src.write_text("".join(f"naïve café {i % 7} 你好 the quick brown fox\n" for i in range(2000)), encoding="utf-8")
    out = tokenize_file(str(src), vocab_size=300, progress=False)
    r = barkgpt.train(**_quiet(), data=out, model=dict(TINY, vocab_size=300), steps=3, eval_every=3,
                      batch_size=4, eval_batches=2, out=str(tmp_path / "a"))
    ds = load_dataset(out, 16)
    nats, n_bytes = 0.0, 0
    with torch.no_grad():
        for x, y in ds.eval_batches(4, 8):
            logits = r.model(x)
            nats += torch.nn.functional.cross_entropy(logits.reshape(-1, 300), y.reshape(-1), reduction="sum").item()
            n_bytes += len(ds.tokenizer.decode(y.reshape(-1).tolist()).encode("utf-8"))
    stats = evaluate_stats(r.model, ds, 4, torch.device("cpu"), contextlib.nullcontext, windows=8,
                           token_bytes=ds.token_bytes)
    assert stats["bpb"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-9)
    assert stats["bpb"] < stats["loss"] / math.log(2)  # more than one byte per token


# ---- 7. extending a run ----------------------------------------------------------------------------

def test_extending_a_finished_run_continues_at_the_minimum_lr(tmp_path):
    out = str(tmp_path / "r")
    barkgpt.train(**_quiet(), steps=40, log_every=1, out=out)
    lines = []
    barkgpt.train(**_quiet(log=lines.append), out=out, resume=True, steps=60)
    lrs = {e["step"]: e["lr"] for e in _metrics(out) if "lr" in e}
    assert lrs[40] == pytest.approx(1e-3)  # the decayed end of the 40-step schedule
    assert all(lrs[s] == pytest.approx(1e-3) for s in range(41, 61))  # no jump back up
    assert any("steps 40 -> 60" in x for x in lines)


def test_more_steps_mid_run_decay_from_where_the_lr_is(tmp_path):
    out = str(tmp_path / "r")

    class Stop(Exception):
        pass

    def stop_at_20(step, loss):
        if step == 20:
            raise Stop

    with pytest.raises(Stop):
        barkgpt.train(**_quiet(on_step=stop_at_20), steps=40, log_every=1, save_every=10, out=out)
    before = TrainConfig(lr=1e-2, steps=40, warmup_steps=2)
    barkgpt.train(**_quiet(), out=out, resume=True, steps=80)
    lrs = {e["step"]: e["lr"] for e in _metrics(out) if "lr" in e}
    assert lrs[21] == pytest.approx(lr_at(20, before))  # the step after the resume: the lr it had reached
    seq = [lrs[s] for s in range(21, 81)]
    assert all(a >= b for a, b in zip(seq, seq[1:]))  # then only down ...
    assert lrs[80] == pytest.approx(1e-3)  # ... to the minimum at the new last step


def test_lr_at_with_a_replanned_decay():
    cfg = TrainConfig(lr=1.0, steps=100, warmup_steps=10, min_lr_ratio=0.1, decay_from=[50, 0.4])
    assert lr_at(49, cfg) == lr_at(49, TrainConfig(lr=1.0, steps=100, warmup_steps=10, min_lr_ratio=0.1))
    assert lr_at(50, cfg) == pytest.approx(0.4) and lr_at(99, cfg) == pytest.approx(0.1)


# ---- 8. Ctrl-C with several processes --------------------------------------------------------------

def _interrupt_after_step(cmd, tmp_path, step=20, timeout=240):
    """Start ``cmd``, send SIGINT (what Ctrl-C sends to the launcher in the foreground) once the
    plain log shows ``step``, and return (returncode, stderr)."""
    import signal
    import time

    env = dict(os.environ, BARKGPT_BACKEND="torch", PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    err = open(tmp_path / "stderr.txt", "w+")
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=str(tmp_path), text=True)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and p.poll() is None:
            time.sleep(0.5)
            if f"step {step}/" in (tmp_path / "stderr.txt").read_text():
                break
        assert p.poll() is None, (tmp_path / "stderr.txt").read_text()
        p.send_signal(signal.SIGINT)
        p.wait(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    return p.returncode, (tmp_path / "stderr.txt").read_text()


TRAIN_ARGS = ["train", "--device", "cpu", "--steps", "100000", "--batch-size", "4", "--log-every", "20",
              "--eval-every", "1000", "--no-sample", "--out", "run"]


def test_ctrl_c_with_nproc_per_node_is_one_clean_message(tmp_path):
    rc, err = _interrupt_after_step([sys.executable, "-m", "barkgpt", *TRAIN_ARGS, "--nproc-per-node", "2"],
                                    tmp_path)
    assert rc == 130, err
    assert err.count("stopping at the next step boundary") == 1, err
    assert err.count("interrupted: saved") == 1, err
    assert "Traceback" not in err and "SignalException" not in err and "death signal" not in err, err
    assert "barkgpt: interrupted" not in err  # the saved message says it
    assert os.listdir(tmp_path / "run" / "checkpoints")


def test_ctrl_c_under_torchrun_says_it_once_per_run(tmp_path):
    # torchrun's own process still prints its SignalException traceback (outside barkgpt); the
    # training processes say once, through rank 0, that they stopped and what they saved.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "barkgpt", *TRAIN_ARGS]
    rc, err = _interrupt_after_step(cmd, tmp_path)
    assert err.count("stopping at the next step boundary") == 1, err
    assert err.count("interrupted: saved") == 1, err
    assert "barkgpt: interrupted" not in err


def test_an_error_with_nproc_per_node_is_one_line(tmp_path):
    (tmp_path / "taken").write_text("a file")
    env = dict(os.environ, BARKGPT_BACKEND="torch", PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "barkgpt", "train", "--nproc-per-node", "2", "--device", "cpu",
                        "--steps", "2", "--out", "taken"], capture_output=True, text=True, env=env,
                       cwd=str(tmp_path), timeout=240)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        "barkgpt train: error: --out 'taken' is a file, not a directory; choose another --out"], p.stderr
