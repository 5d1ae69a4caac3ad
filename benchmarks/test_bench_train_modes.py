"""The bark presets trained by the real ``barkgpt.train``, eager against ``cuda_graph=True``
(issue 19 item 5): steps per second of the whole training loop (data, step, bookkeeping), and
whether the two modes give the same losses.

Steps/s is the difference of two runs, ``STEPS_SHORT`` and ``STEPS_LONG`` steps, after a
warm-up run that compiles the kernels: setup, capture, the final evaluation and save are in
both and cancel, the extra steps are what is timed. The graph run's losses are compared with the
eager run's (same seed): ``losses_equal`` (bitwise) and ``max_loss_diff``. Without CUDA the
graph mode is refused; the record says so (the dry run of benchmarks/run_gpu.sh checks this
plumbing on a CPU).
"""

import os
import shutil
import tempfile

import pytest
import torch

import _bench as B
import barkgpt
from barkgpt import GPTConfig, TrainingError, ops
from barkgpt.config import train_defaults

PRESETS = ("bark-tiny", "bark")
# On CPU (the dry run of run_gpu.sh) 2 vs 4 steps left 2 steps of a few ms against the noise of
# two whole train() calls: the difference came out <= 0 in some suite runs.
STEPS_SHORT, STEPS_LONG = (20, 220) if B.IS_CUDA else (4, 44)
_eager_losses = {}


def _train(preset, mode, steps, out):
    return barkgpt.train(preset=preset, steps=steps, out=out, device=B.DEVICE.type, cuda_graph=mode == "cuda-graph",
                         eval_every=10 ** 6, eval_batches=1, save_every=0, sample=False, progress=False,
                         log=lambda m: None, dtype="bfloat16" if B.DTYPE == torch.bfloat16 and B.IS_CUDA else "float32")


@pytest.mark.bench_priority(4)  # cheap: before the GPT-2 training step and its compiles
@pytest.mark.parametrize("mode", ["eager", "cuda-graph"])
@pytest.mark.parametrize("preset", PRESETS)
def test_train_modes(preset, mode):
    cfg = GPTConfig.preset(preset)
    rec = {"group": "train_mode", "case": preset, "provider": mode, "mode": "train loop",
           "backend": ops.resolve_backend(None, B.DEVICE), "shape": {"n_layer": cfg.n_layer, "n_embd": cfg.n_embd},
           "steps": [STEPS_SHORT, STEPS_LONG], "dtype": str(B.DTYPE).replace("torch.", "") if B.IS_CUDA else "float32"}
    B.check_budget(rec)
    tmp = tempfile.mkdtemp(prefix="barkgpt-train-modes-")
    try:
        try:
            _train(preset, mode, 2, os.path.join(tmp, "warm"))  # kernels compiled, caches warm
        except TrainingError as e:
            if mode == "cuda-graph" and not B.IS_CUDA:
                B.add_record(dict(rec, status=f"refused: {e}"))
                pytest.skip(f"cuda_graph needs CUDA: {e}")
            raise
        times = {}
        for steps in (STEPS_SHORT, STEPS_LONG):
            t0 = B.now()
            r = _train(preset, mode, steps, os.path.join(tmp, f"r{steps}"))
            times[steps] = B.now() - t0
        per_step = (times[STEPS_LONG] - times[STEPS_SHORT]) / (STEPS_LONG - STEPS_SHORT)
        tokens = train_defaults(preset, cfg)["batch_size"] * cfg.block_size  # per step
        rec.update(run_s={str(k): v for k, v in times.items()}, final_loss=r.losses[-1])
        if per_step > 0:
            rec.update(status="ok", median_s=per_step, steps_per_s=1.0 / per_step, tokens_per_s=tokens / per_step)
        else:  # the extra steps drowned in the two runs' noise: no rate to report
            rec.update(status=f"inconclusive: the {STEPS_LONG}-step run took no longer than the {STEPS_SHORT}-step one")
        if mode == "eager":
            _eager_losses[preset] = r.losses
        elif preset in _eager_losses:
            ref = _eager_losses[preset]
            rec["losses_equal"] = r.losses == ref
            rec["max_loss_diff"] = max(abs(a - b) for a, b in zip(r.losses, ref))
        B.add_record(rec)
        assert all(x == x for x in r.losses), f"{mode}: non-finite loss"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
