"""The training loop's pieces, each on its own: the state a checkpoint holds, one step, the
evaluation, the save and the interrupt handling (barkgpt/train.py)."""

import json
import math
import os
import signal

import pytest
import torch

import barkgpt
from barkgpt import checkpoint as ckpt
from barkgpt.distributed import World
from barkgpt.model import BarkGPT
from barkgpt.train import (Interrupts, TrainConfig, TrainingError, _rng_tensors, evaluate, lr_at, on_interrupt,
                           read_steps, save_checkpoint, setup, train_step)

TINY = dict(model=barkgpt.GPTConfig.preset("bark-tiny", dropout=0.1).to_dict(), batch_size=4, steps=10,
            backend="torch", progress=False, sample=False, device="cpu")


def make(tmp_path, name="r", resumed=None, **kw):
    cfg = TrainConfig(out=str(tmp_path / name), **{**TINY, **kw})
    cfg.validate()
    messages = []
    run, state = setup(cfg, World(), resumed, messages.append)
    run.messages = messages
    return run, state


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- the state ---------------------------------------------------------------------------------

def test_state_round_trips_through_a_checkpoint(tmp_path):
    run, state = make(tmp_path)
    for _ in range(3):
        train_step(run, state)
    read_steps(run, state)  # (the loop reads before it saves)
    assert len(state.losses) == 3
    state.record_eval(1.5)
    path = save_checkpoint(state, run.out_dir)
    run.metrics.close()
    loaded = ckpt.load_training_checkpoint(path)
    # state.json holds the state's fields and nothing else (the step is the saver's)
    assert set(loaded["state"]) == {"train_config", "losses", "val_history", "best_val_loss", "best_step",
                                    "dataset", "world_size", "step"}
    run2, back = make(tmp_path, "r", resumed=loaded)  # (the directory exists: as on --resume)
    assert (back.step, back.losses, back.val_history) == (3, state.losses, [{"step": 3, "val_loss": 1.5}])
    assert (back.best_val_loss, back.best_step, back.dataset) == (1.5, 3, state.dataset)
    assert same(weights(back.model), weights(state.model))
    assert back.rng.keys() == state.rng.keys() and all(torch.equal(back.rng[k], state.rng[k]) for k in state.rng)
    assert back.data_gen.get_state().equal(state.data_gen.get_state())
    a, b = back.optimizer.state_dict(), state.optimizer.state_dict()
    assert json.dumps(a["param_groups"]) == json.dumps(b["param_groups"])  # (betas come back as a list)
    assert all(torch.equal(a["state"][i][k], b["state"][i][k]) for i in b["state"] for k in b["state"][i])
    # and the restored state steps exactly as the saved one does (dropout draws from the
    # process's RNG, which both share here: each starts from its state's)
    torch.set_rng_state(state.rng["rng.cpu"])
    r1 = train_step(run, state)
    torch.set_rng_state(back.rng["rng.cpu"])
    r2 = train_step(run2, back)
    read_steps(run, state), read_steps(run2, back)
    assert r1.loss == r2.loss and same(weights(back.model), weights(state.model))
    run2.metrics.close()


def test_end_step_and_record_eval(tmp_path):
    run, state = make(tmp_path)
    run.metrics.close()
    state.end_step(run.device)
    state.losses.append(2.0)
    state.record_eval(3.0)
    state.end_step(run.device)
    state.losses.append(1.0)
    state.record_eval(2.5)
    state.record_eval(2.7)  # not better: the best stays
    assert state.step == 2 and state.losses == [2.0, 1.0]
    assert (state.best_val_loss, state.best_step) == (2.5, 2)
    assert all(torch.equal(state.rng[k], v) for k, v in _rng_tensors(state.data_gen, run.device).items())


# ---- one step ------------------------------------------------------------------------------------

def test_train_step_updates_and_advances_the_state(tmp_path):
    run, state = make(tmp_path)
    run.metrics.close()
    before = weights(state.model)
    gen_before = state.data_gen.get_state()
    interrupts = Interrupts(install=False)
    r = train_step(run, state, interrupts)
    assert (r.step, state.step, state.losses, run.pending) == (1, 1, [], [r]) and not r.read  # not read yet
    read_steps(run, state)
    assert r.read and state.losses == [r.loss] and run.pending == []
    assert math.isfinite(r.loss) and r.grad_norm > 0 and not r.skipped and not r.stop
    assert not same(before, weights(state.model))
    assert not state.data_gen.get_state().equal(gen_before)  # the data position moved on
    assert state.rng["rng.data"].equal(state.data_gen.get_state())  # and is what a save records
    assert all(p.grad is None for p in state.model.parameters())
    assert interrupts.updating == 1  # until the loop ends the step's bookkeeping
    assert r.lr == pytest.approx(lr_at(0, state.cfg))
    interrupts.requested = True  # a Ctrl-C that came during the step: the step reports it
    assert train_step(run, state, interrupts).stop


def test_train_step_is_reproducible(tmp_path):
    (ra, a), (rb, b) = make(tmp_path, "a"), make(tmp_path, "b")
    ra.metrics.close(), rb.metrics.close()
    torch.set_rng_state(a.rng["rng.cpu"])  # dropout draws from the process's RNG
    for _ in range(3):
        train_step(ra, a)
    read_steps(ra, a)
    torch.set_rng_state(b.rng["rng.cpu"])
    for _ in range(3):
        train_step(rb, b)
        read_steps(rb, b)  # read every step, or once: the same
    la, lb = a.losses, b.losses
    assert la == lb and same(weights(a.model), weights(b.model))


def _poison(monkeypatch):
    real = BarkGPT.loss_from_logits
    monkeypatch.setattr(BarkGPT, "loss_from_logits",
                        staticmethod(lambda logits, y, ignore=-100: real(logits, y, ignore) * float("nan")))


def test_train_step_skips_a_nonfinite_step(tmp_path, monkeypatch):
    run, state = make(tmp_path, on_nonfinite="skip")
    run.metrics.close()
    before = weights(state.model)
    _poison(monkeypatch)
    r = train_step(run, state)
    assert all(p.grad is None for p in state.model.parameters())
    assert same(before, weights(state.model))  # the update was cancelled on the device
    read_steps(run, state)
    assert r.skipped and r.what == "loss" and run.skipped == 1
    assert state.step == 1 and math.isnan(state.losses[0])
    # the optimizer's step count did not move either: the next real step is its first
    monkeypatch.undo()
    train_step(run, state)
    assert all(int(s["step"]) == 1 for s in state.optimizer.state.values())


def test_train_step_stops_on_a_nonfinite_step(tmp_path, monkeypatch):
    run, state = make(tmp_path)
    run.metrics.close()
    before = weights(state.model)
    _poison(monkeypatch)
    train_step(run, state)
    with pytest.raises(TrainingError, match="non-finite loss at step 1"):
        read_steps(run, state)  # at the next boundary (the update was cancelled on the device)
    assert state.losses == [] and same(before, weights(state.model))


# ---- evaluation ------------------------------------------------------------------------------------

def test_evaluate_is_the_mean_over_every_real_target(tmp_path):
    run, state = make(tmp_path)
    run.metrics.close()
    model, data = state.model, run.dataset
    model.train()
    got = evaluate(model, data, 3, run.device, run.amp)
    assert model.training  # the mode is restored
    total, count = 0.0, 0
    with torch.no_grad():
        model.eval()
        for x, y in data.eval_batches(1000):
            logits = model(x)
            per = torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), y.flatten(),
                                                    ignore_index=data.ignore_index, reduction="sum")
            total, count = total + float(per), count + int((y != data.ignore_index).sum())
    assert count and got == pytest.approx(total / count, rel=1e-6)


# ---- saving ------------------------------------------------------------------------------------------

def test_save_checkpoint_keeps_the_last_and_the_best(tmp_path):
    run, state = make(tmp_path, keep_last=2)
    run.metrics.close()
    for step in range(1, 6):
        state.end_step(run.device)
        state.losses.append(1.0)
        state.record_eval({2: 0.5}.get(step, 1.0))
        path = save_checkpoint(state, run.out_dir)
        assert path.endswith(f"step_{step:08d}")
    assert [s for s, _ in ckpt.list_checkpoints(run.out_dir)] == [2, 4, 5]
    saved = json.load(open(os.path.join(path, "state.json")))
    assert saved["step"] == 5 and saved["best_step"] == 2 and saved["losses"] == [1.0] * 5


# ---- interrupts ---------------------------------------------------------------------------------------

def test_interrupt_between_steps_saves_the_last_whole_step(tmp_path):
    run, state = make(tmp_path)
    run.metrics.close()
    interrupts = Interrupts(install=False)
    for _ in range(3):
        train_step(run, state, interrupts)
        interrupts.end_step()
    on_interrupt(run, state, interrupts)
    assert [s for s, _ in ckpt.list_checkpoints(run.out_dir)] == [3] and interrupts.saved_step == 3
    assert run.messages[-1].startswith("interrupted: saved ") and "--resume" in run.messages[-1]
    on_interrupt(run, state, interrupts)  # already saved: not again
    assert [s for s, _ in ckpt.list_checkpoints(run.out_dir)] == [3]


def test_interrupt_during_an_update_saves_nothing(tmp_path):
    run, state = make(tmp_path)
    run.metrics.close()
    interrupts = Interrupts(install=False)
    train_step(run, state, interrupts)  # step 1's bookkeeping (evaluation, save) not ended
    read_steps(run, state)
    on_interrupt(run, state, interrupts)
    assert ckpt.list_checkpoints(run.out_dir) == []
    assert "in the middle of step 1's update: not saved" in run.messages[-1]
    # ... unless the step's save had been written just before
    interrupts.saved_step = 1
    on_interrupt(run, state, interrupts)
    assert ckpt.list_checkpoints(run.out_dir) == [] and run.messages[-1].startswith("interrupted: saved")


def test_interrupts_turn_the_first_ctrl_c_into_a_request():
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    interrupts = Interrupts()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert interrupts.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        interrupts.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ---- no host reads between log boundaries (issue #19 item 4) ------------------------------------------

READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")


def test_no_host_reads_between_log_boundaries(tmp_path, monkeypatch):
    # Every read of a tensor's value by the training loop (barkgpt/train.py) waits for the GPU.
    # Between log boundaries there must be none: counted per step, by the step they follow.
    import sys

    train_mod = sys.modules["barkgpt.train"]
    reads, step_of_read = [], {"step": 0}
    for name in READS:
        real = getattr(torch.Tensor, name)

        def counting(self, *a, _real=real, _name=name, **kw):
            if sys._getframe(1).f_code.co_filename == train_mod.__file__:
                reads.append((step_of_read["step"], _name))
            return _real(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, counting)
    real_step = train_mod.train_step

    def step(run, state, *a):
        step_of_read["step"] = state.step + 1
        return real_step(run, state, *a)
    monkeypatch.setattr(train_mod, "train_step", step)
    r = barkgpt.train(out=str(tmp_path / "r"), log_every=5, eval_every=10, save_every=10, steps=20,
                      **{k: v for k, v in TINY.items() if k != "steps"}, log=lambda m: None)
    assert len(r.losses) == 20 and all(math.isfinite(x) for x in r.losses)
    by_step = {s for s, _ in reads}
    assert by_step <= {5, 10, 15, 20}, sorted(reads)  # the log boundaries only
    assert {5, 10, 15, 20} <= by_step  # where the steps' numbers are read (the count can fail)


def test_deferred_nonfinite_stop_and_skip_keep_their_behaviour(tmp_path, monkeypatch):
    # A non-finite step between boundaries: with "stop" the run ends at the next boundary
    # naming that step, nothing after the last good checkpoint saved; with "skip" it is dropped.
    real = BarkGPT.loss_from_logits
    calls = {"n": 0}

    def poisoned(logits, y, ignore=-100):
        calls["n"] += 1
        loss = real(logits, y, ignore)
        return loss * float("nan") if calls["n"] == 7 else loss
    monkeypatch.setattr(BarkGPT, "loss_from_logits", staticmethod(poisoned))
    kw = dict(TINY, steps=12, log_every=5, eval_every=100, save_every=5, log=lambda m: None)
    with pytest.raises(TrainingError, match="non-finite loss at step 7.*step_00000005"):
        barkgpt.train(out=str(tmp_path / "stop"), **kw)
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path / "stop"))] == [5]
    calls["n"] = 0
    r = barkgpt.train(out=str(tmp_path / "skip"), on_nonfinite="skip", **kw)
    assert math.isnan(r.losses[6]) and sum(map(math.isnan, r.losses)) == 1
    events = [json.loads(x) for x in open(tmp_path / "skip" / "metrics.jsonl")]
    assert [e["step"] for e in events if e.get("event") == "skipped_nonfinite"] == [7]
    assert [e["step"] for e in events if "loss" in e] == [5, 10, 12]
