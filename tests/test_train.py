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
    # cosine from step 10 (1.0) to the last step, 99 (exactly the minimum): midpoint at 54.5
    assert lr_at(54, cfg) + lr_at(55, cfg) == pytest.approx(2 * 0.55)
    assert lr_at(54, cfg) > 0.55 > lr_at(55, cfg)
    assert lr_at(98, cfg) > 0.1
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=1e-12)
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
    from barkgpt import ops

    # The training forward's loss is the fused head + loss (ops.linear_cross_entropy; evaluation
    # does not call it here).
    real = ops.linear_cross_entropy
    calls = {"n": 0}

    poison_at = {6}  # training forward number = step number (eval_every=100: no eval calls between)

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] in poison_at else loss

    monkeypatch.setattr(ops, "linear_cross_entropy", poisoned)
    out = str(tmp_path / "r")
    with pytest.raises(TrainingError, match="non-finite loss at step 6.*step_00000004.*--skip-nonfinite"):
        barkgpt.train(steps=10, save_every=2, eval_every=100, out=out, **FAST)
    assert barkgpt.checkpoint.latest_checkpoint(out).endswith("step_00000004")
    calls["n"] = 0
    r = barkgpt.train(steps=10, save_every=2, eval_every=100, out=out + "2", on_nonfinite="skip", **FAST)
    assert len(r.losses) == 10 and r.losses[5] != r.losses[5]  # NaN recorded for the skipped step
    # the skipped step 6 still ended its step: the checkpoint due there was written
    assert [s for s, _ in barkgpt.checkpoint.list_checkpoints(out + "2")] == [6, 8, 10]
    events = [json.loads(x) for x in open(tmp_path / "r2" / "metrics.jsonl")]
    assert [e["step"] for e in events if e.get("event") == "skipped_nonfinite"] == [6]
    # a skipped last step still gets the final evaluation and checkpoint
    calls["n"], poison_at = 0, {10}
    r = barkgpt.train(steps=10, save_every=4, eval_every=100, out=out + "3", on_nonfinite="skip", **FAST)
    assert r.losses[9] != r.losses[9] and r.val_history[-1]["step"] == 10
    assert barkgpt.checkpoint.latest_checkpoint(out + "3").endswith("step_00000010")


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


def test_accumulated_gradient_is_the_mean_over_all_real_targets(tmp_path, monkeypatch):
    # The bark corpus pads its sequences (ignored targets), so micro-batches hold different
    # numbers of real targets: the step's gradient must still be that of the mean over all of them.
    from barkgpt.model import BarkGPT

    grads = {}
    real_clip = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *args, **kwargs):  # sees the accumulated gradients before the update
        params = list(params)
        grads.update({id(p): p.grad.detach().clone() for p in params})
        return real_clip(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    config = barkgpt.GPTConfig.preset("bark-tiny")
    r = barkgpt.train(model=config.to_dict(), steps=1, batch_size=4, grad_accum=4, grad_clip=1e9, seed=7,
                      eval_every=100, save_every=0, out=str(tmp_path / "r"), **FAST)
    # the same initial weights and micro-batches, as one batch: the mean over every real target
    torch.manual_seed(7)
    ref = BarkGPT(config, backend="torch")
    data = BarkCorpus(block_size=config.block_size)
    gen = torch.Generator().manual_seed(7 + 1)
    xs, ys = zip(*[data.get_batch(4, gen) for _ in range(4)])
    counts = [int((y != data.ignore_index).sum()) for y in ys]
    assert len(set(counts)) > 1  # the case that matters: unequal numbers of real targets
    _, loss = ref(torch.cat(xs), torch.cat(ys), data.ignore_index)
    loss.backward()
    assert r.losses[0] == pytest.approx(loss.item(), rel=1e-6)
    for (name, p), (_, q) in zip(r.model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(grads[id(p)], q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_load_gives_the_newest_state_of_a_resumed_run(tmp_path):
    out = str(tmp_path / "r")
    barkgpt.train(steps=6, save_every=2, eval_every=100, out=out, **FAST)
    with pytest.raises(Crash):  # resumed to 12, dies after the checkpoint of step 10
        barkgpt.train(out=out, resume=True, steps=12, on_step=crash_at(11), **FAST)
    m = barkgpt.load(out)
    ck = barkgpt.checkpoint.load(barkgpt.checkpoint.latest_checkpoint(out))
    assert barkgpt.checkpoint.latest_checkpoint(out).endswith("step_00000010")
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), ck.state_dict().values()))
    done = barkgpt.train(out=out, resume=True, steps=12, **FAST)
    m = barkgpt.load(out)  # finished again: the final model (step 12)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), done.model.state_dict().values()))


def test_run_directory_only_for_runs_that_start(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TrainingError, match="unknown preset 'nope'"):
        barkgpt.train(preset="nope", **FAST)
    with pytest.raises(barkgpt.DataError, match="does not exist"):
        barkgpt.train(data="missing.txt", **FAST)
    with pytest.raises(TrainingError, match="float16 autocast needs a CUDA GPU"):
        barkgpt.train(dtype="float16", device="cpu", **FAST)
    assert not os.path.exists("runs")  # no empty run directories left behind
    (tmp_path / "afile").write_text("x")
    with pytest.raises(TrainingError, match="is a file, not a directory"):
        barkgpt.train(steps=1, out="afile", **FAST)


def test_new_run_starts_a_new_metrics_file(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 5, "loss": 9.9}\n{"step": 10, "loss": 9.9}\n')  # a crash's
    barkgpt.train(steps=4, eval_every=4, log_every=2, out=str(out), **FAST)
    assert [json.loads(x)["step"] for x in open(out / "metrics.jsonl")] == [2, 4, 4]


def test_resume_from_another_directory_with_a_relative_data_path(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "t.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    common = dict(model=dict(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=16), eval_every=100, **FAST)
    monkeypatch.chdir(tmp_path / "a")
    with pytest.raises(Crash):
        barkgpt.train(data="t.txt", steps=6, save_every=2, out=str(tmp_path / "r"), on_step=crash_at(5), **common)
    monkeypatch.chdir(tmp_path)
    r = barkgpt.train(out=str(tmp_path / "r"), resume=True, **FAST)
    assert len(r.losses) == 6
    # naming the same file again (now by another relative path) is not a change of data
    barkgpt.train(out=str(tmp_path / "r"), resume=True, data="a/t.txt", steps=8, **FAST)


def test_resume_of_a_run_that_stored_a_relative_data_path(tmp_path, monkeypatch):
    # Runs made before data paths were stored absolute hold "t.txt": resuming them from the same
    # directory, with or without naming the data again, must still work.
    import hashlib

    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    common = dict(model=dict(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=16), eval_every=100, **FAST)
    with pytest.raises(Crash):
        barkgpt.train(data="t.txt", steps=6, save_every=2, out="r", on_step=crash_at(3), **common)
    ck = tmp_path / "r" / "checkpoints" / "step_00000002"
    state = json.loads((ck / "state.json").read_text())
    assert state["train_config"]["data"] == str(tmp_path / "t.txt")
    state["train_config"]["data"] = "t.txt"  # as an older barkgpt wrote it
    (ck / "state.json").write_text(json.dumps(state))
    manifest = json.loads((ck / "manifest.json").read_text())
    manifest["sha256"]["state.json"] = hashlib.sha256((ck / "state.json").read_bytes()).hexdigest()
    (ck / "manifest.json").write_text(json.dumps(manifest))
    r = barkgpt.train(out="r", resume=True, data="t.txt", **FAST)
    assert len(r.losses) == 6
