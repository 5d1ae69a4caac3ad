import json
import os

import pytest
import torch

import barkgpt
from barkgpt import TrainingError
from barkgpt.data import BarkCorpus
from barkgpt.train import TrainConfig, lr_at

FAST = dict(progress=False, sample=False, backend="torch", log=lambda m: None)


def test_default_bark_run_reaches_the_corpus_optimum(tmp_path):
    r = barkgpt.train(out=str(tmp_path / "run"), **FAST)  # the defaults of `barkgpt train`
    assert r.optimal_loss == pytest.approx(BarkCorpus().optimal_loss(BarkCorpus().val))
    assert r.final_val_loss <= 1.03 * r.optimal_loss
    assert r.final_val_loss < BarkCorpus().unigram_loss()
    m = barkgpt.load(r.out_dir)  # the run directory loads as its final model
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), r.model.state_dict().values()))
    lines = [json.loads(x) for x in open(os.path.join(r.out_dir, "metrics.jsonl"))]
    assert any("val_loss" in e for e in lines) and any("tokens_per_sec" in e for e in lines)


def test_short_run_beats_unigram(tmp_path):
    r = barkgpt.train(steps=60, eval_every=60, out=str(tmp_path / "r"), **FAST)
    assert r.final_val_loss < BarkCorpus().unigram_loss()
    assert len(r.losses) == 60 and r.losses[-1] < r.losses[0]


class Crash(Exception):
    pass


def crash_at(n):
    def hook(step, loss):
        if step == n:
            raise Crash(f"simulated crash after step {n}")
    return hook


def test_resume_matches_uninterrupted_bitwise(tmp_path):
    # dropout on: the RNG state must be restored too
    model = barkgpt.GPTConfig.preset("bark", dropout=0.1).to_dict()
    common = dict(steps=30, eval_every=10, save_every=10, batch_size=16, model=model, **FAST)
    full = barkgpt.train(out=str(tmp_path / "full"), **common)
    with pytest.raises(Crash):  # dies at step 25: the checkpoint of step 20 is the last one
        barkgpt.train(out=str(tmp_path / "part"), on_step=crash_at(25), **common)
    resumed = barkgpt.train(out=str(tmp_path / "part"), resume=True, **FAST)
    assert resumed.losses == full.losses
    assert resumed.val_history == full.val_history
    for a, b in zip(resumed.model.state_dict().values(), full.model.state_dict().values()):
        assert torch.equal(a, b)
    # metrics logged after step 20 by the crashed run were dropped, then logged again once
    steps = [json.loads(x)["step"] for x in open(tmp_path / "part" / "metrics.jsonl")]
    assert steps == [json.loads(x)["step"] for x in open(tmp_path / "full" / "metrics.jsonl")]


def test_interrupt_saves_a_checkpoint_at_the_step_boundary(tmp_path):
    def interrupt(step, loss):
        if step == 7:
            raise KeyboardInterrupt
    out = str(tmp_path / "r")
    with pytest.raises(KeyboardInterrupt):
        barkgpt.train(steps=12, save_every=0, eval_every=100, out=out, on_step=interrupt, **FAST)
    assert barkgpt.checkpoint.latest_checkpoint(out).endswith("step_00000007")
    full = barkgpt.train(steps=12, save_every=0, eval_every=100, out=str(tmp_path / "f"), **FAST)
    assert barkgpt.train(out=out, resume=True, **FAST).losses == full.losses


def test_gradient_accumulation_equals_big_batch(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    model = dict(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=16)
    common = dict(data=str(text), model=model, steps=4, eval_every=4, save_every=0, **FAST)
    big = barkgpt.train(out=str(tmp_path / "a"), batch_size=8, grad_accum=1, **common)
    acc = barkgpt.train(out=str(tmp_path / "b"), batch_size=4, grad_accum=2, **common)
    # same windows in the same order (one generator), so the same gradient up to fp32 rounding
    for a, b in zip(big.model.parameters(), acc.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(big.losses), torch.tensor(acc.losses), rtol=1e-5, atol=1e-6)
    wrong = barkgpt.train(out=str(tmp_path / "c"), batch_size=4, grad_accum=2, lr=5e-2, **common)
    assert not torch.allclose(wrong.model.head.weight, big.model.head.weight)


def test_schedule():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(100, cfg) == pytest.approx(0.1)


def test_existing_run_dir_is_not_overwritten(tmp_path):
    barkgpt.train(steps=2, eval_every=2, out=str(tmp_path / "r"), **FAST)
    with pytest.raises(TrainingError, match="already holds a training run; pass --resume"):
        barkgpt.train(steps=2, out=str(tmp_path / "r"), **FAST)
    with pytest.raises(TrainingError, match="nothing to resume"):
        barkgpt.train(steps=2, out=str(tmp_path / "empty"), resume=True, **FAST)


@pytest.mark.parametrize("kw, msg", [
    (dict(steps=0), "steps must be a positive integer"),
    (dict(lr=-1.0), "lr must be a positive number"),
    (dict(dtype="int8"), "dtype must be auto"),
    (dict(device="tpu"), "unknown device"),
    (dict(data="/nonexistent.txt"), "does not exist"),
])
def test_bad_settings(tmp_path, kw, msg):
    with pytest.raises((TrainingError, barkgpt.DataError), match=msg):
        barkgpt.train(out=str(tmp_path / "r"), **{**FAST, **kw})


def test_unknown_option():
    with pytest.raises(TypeError, match="unknown option 'stpes'"):
        barkgpt.train(stpes=3)


def test_nonfinite_loss_stops_and_keeps_checkpoint(tmp_path, monkeypatch):
    from barkgpt.model import BarkGPT

    real = BarkGPT.loss_from_logits
    calls = {"n": 0}

    def poisoned(logits, targets, ignore_index=-100):
        calls["n"] += 1
        loss = real(logits, targets, ignore_index)
        return loss * float("nan") if calls["n"] == 6 else loss

    monkeypatch.setattr(BarkGPT, "loss_from_logits", staticmethod(poisoned))
    out = str(tmp_path / "r")
    with pytest.raises(TrainingError, match="non-finite loss at step 5.*step_00000004"):
        barkgpt.train(steps=10, save_every=2, eval_every=100, out=out, **FAST)
    assert barkgpt.checkpoint.latest_checkpoint(out).endswith("step_00000004")
    calls["n"] = 0
    r = barkgpt.train(steps=10, save_every=2, eval_every=100, out=out + "2", on_nonfinite="skip", **FAST)
    assert len(r.losses) == 10 and r.losses[5] != r.losses[5]  # NaN recorded for the skipped step


def test_bf16_autocast_on_cpu_trains(tmp_path):
    r = barkgpt.train(steps=40, eval_every=40, dtype="bfloat16", out=str(tmp_path / "r"), **FAST)
    assert all(l == l for l in r.losses) and r.final_val_loss < BarkCorpus().unigram_loss()
    assert all(p.dtype == torch.float32 for p in r.model.parameters())  # fp32 master weights


def test_fp16_needs_a_gpu(tmp_path):
    with pytest.raises(TrainingError, match="float16 autocast needs a CUDA GPU"):
        barkgpt.train(steps=2, dtype="float16", device="cpu", out=str(tmp_path / "r"), **FAST)


def test_metrics_report_mfu_against_the_peak(tmp_path, monkeypatch):
    monkeypatch.setenv("BARKGPT_PEAK_TFLOPS", "1")  # a known peak so MFU is defined on a CPU
    r = barkgpt.train(steps=10, eval_every=10, log_every=5, out=str(tmp_path / "r"), **FAST)
    logs = [e for e in map(json.loads, open(tmp_path / "r" / "metrics.jsonl")) if "tokens_per_sec" in e]
    assert logs
    for e in logs:
        assert e["mfu"] == pytest.approx(r.model.flops_per_token() * e["tokens_per_sec"] / 1e12)
