"""python benchmarks/preset_steps.py [--presets P ...] [--steps N] [--backend B]

Median training-step time (forward, backward, AdamW step; eager) of each preset at its default
batch (gpt2: batch 1 x 256 tokens, so a CPU step takes about a second), on whatever barkgpt is
importable: run it with PYTHONPATH pointing at two checkouts, alternately, to compare revisions
in the same session (benchmarks/results/ says how it was used). Prints one JSON line per preset."""
import argparse
import json
import statistics
import time

import torch

import barkgpt
from barkgpt.config import TRAIN_DEFAULTS

SHAPES = {"gpt2": (1, 256)}  # (batch, tokens) overrides


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["bark-tiny", "bark", "bark-article", "small", "gpt2"])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--backend", default=None)
    a = ap.parse_args(argv)
    for name in a.presets:
        cfg = barkgpt.GPTConfig.preset(name)
        B, T = SHAPES.get(name, (TRAIN_DEFAULTS[name]["batch_size"], cfg.block_size))
        torch.manual_seed(0)
        m = barkgpt.BarkGPT(cfg, backend=a.backend)
        opt = m.configure_optimizers(0.1, 1e-3, device_type="cpu")
        g = torch.Generator().manual_seed(1)
        x = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
        y = torch.randint(0, cfg.vocab_size, (B, T), generator=g)

        def step():
            _, loss = m(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(3):
            step()
        times = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        print(json.dumps({"preset": name, "batch": B, "tokens": T, "backend": m.resolved_backend(),
                          "threads": torch.get_num_threads(), "step_ms": 1e3 * statistics.median(times),
                          "barkgpt": barkgpt.__file__}), flush=True)


if __name__ == "__main__":
    main()
