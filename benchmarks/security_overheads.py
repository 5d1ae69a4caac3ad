"""What the checks of issue 18 cost, to be timed on a quiet machine.

1. The torch backend's attention (``reference.attention_ref``: SDPA plus the non-finite-row
   guard) against bare ``F.scaled_dot_product_attention``, forward and forward + backward, at
   the presets' attention shapes; the ratio is the guard's cost.
2. The one-time scan of a ``.bin`` token file at load (``data._check_token_ids_in_file``) on a
   memory-mapped file, in tokens/s and GB/s; it should run at about disk/page-cache speed.

    python benchmarks/security_overheads.py [--tokens 200000000] [--device cpu]

Medians of repeated runs, after warm-up; ratios are measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from barkgpt.data import _check_token_ids_in_file
from barkgpt.reference import attention_ref

# (name, batch, heads, T, head_dim): the presets' attention at their training batch sizes
SHAPES = [("bark", 64, 2, 32, 16), ("small", 32, 2, 128, 64), ("gpt2", 8, 12, 1024, 64)]


def _median_s(fn, device, min_time=0.5, warmup=3):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn()
    sync()
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < min_time or len(times) < 5:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def attention(device, dtype):
    print(f"attention on {device} {dtype}: attention_ref (SDPA + guard) vs bare SDPA")
    for name, b, h, t, d in SHAPES:
        q, k, v = (torch.randn(b, h, t, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        g = torch.randn(b, h, t, d, device=device, dtype=dtype)

        def fwd(f):
            def run():
                with torch.no_grad():
                    return f(q, k, v)
            return run

        def step(f):
            return lambda: torch.autograd.grad(f(q, k, v), (q, k, v), g)

        sdpa = lambda a, b_, c: F.scaled_dot_product_attention(a, b_, c, is_causal=True)  # noqa: E731
        ref = lambda a, b_, c: attention_ref(a, b_, c, True)  # noqa: E731
        for mode, wrap in (("fwd", fwd), ("fwd+bwd", step)):
            base, guarded = _median_s(wrap(sdpa), device), _median_s(wrap(ref), device)
            print(f"  {name:6s} {mode:8s} sdpa {base * 1e6:9.1f} us  attention_ref {guarded * 1e6:9.1f} us  "
                  f"ratio {guarded / base:.3f}")


def token_scan(n_tokens):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "tok.bin")
        data = np.memmap(path, dtype=np.uint32, mode="w+", shape=(n_tokens,))
        for i in range(0, n_tokens, 1 << 24):
            data[i:i + (1 << 24)] = np.arange(i, min(i + (1 << 24), n_tokens), dtype=np.uint32) % 50257
        data.flush()
        del data
        mm = np.memmap(path, dtype=np.uint32, mode="r")
        s = _median_s(lambda: _check_token_ids_in_file(path, mm, 50304, n_tokens), torch.device("cpu"),
                      min_time=1.0, warmup=1)
        print(f"token-file scan: {n_tokens} uint32 tokens in {s:.3f} s = {n_tokens / s / 1e6:.0f} M tokens/s, "
              f"{n_tokens * 4 / s / 1e9:.2f} GB/s (page cache warm)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--tokens", type=int, default=100_000_000)
    a = p.parse_args()
    attention(torch.device(a.device), getattr(torch, a.dtype))
    token_scan(a.tokens)
