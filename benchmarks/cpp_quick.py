"""Quick same-run speed check of the C++ CPU kernels (barkgpt._cpp) against PyTorch eager.

    python benchmarks/cpp_quick.py [--op layer_norm|attention|embedding|step] [--reps N]

For every preset-sized shape it times the forward (no grad) and forward+backward (random
upstream gradient) of the cpp op and of its PyTorch eager counterpart (F.layer_norm;
F.embedding + add; F.scaled_dot_product_attention), alternating the two in the same loop so
machine noise hits both alike, and prints a Markdown table of medians and the ratio torch/cpp
(> 1 means cpp is faster). The pytest-benchmark suite lives in benchmarks/.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import barkgpt._cpp as cpp


def _pair(fa, fb, reps, inner):
    """Per-call times (us) of fa and fb over `reps` rounds of `inner` calls, timed alternately
    so machine noise hits both alike: (median a, median b, min a, min b)."""
    for _ in range(3):
        fa(), fb()
    ta, tb = [], []
    for _ in range(reps):
        for f, ts in ((fa, ta), (fb, tb)):
            t0 = time.perf_counter()
            for _ in range(inner):
                f()
            ts.append((time.perf_counter() - t0) / inner * 1e6)
    return statistics.median(ta), statistics.median(tb), min(ta), min(tb)


def _fns(make_inputs, fn, grad_shape):
    inputs = make_inputs()
    params = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    g = torch.randn(grad_shape, dtype=params[0].dtype)

    def fwd():
        with torch.no_grad():
            fn(*inputs)

    def fwd_bwd():
        torch.autograd.grad(fn(*inputs), params, g)

    return fwd, fwd_bwd


def _bench_case(name, make_inputs, f_cpp, f_torch, grad_shape, reps, inner):
    fc = _fns(make_inputs, f_cpp, grad_shape)
    ft = _fns(make_inputs, f_torch, grad_shape)
    for kind, a, b in (("fwd", fc[0], ft[0]), ("fwd+bwd", fc[1], ft[1])):
        mc, mt, lc, lt = _pair(a, b, reps, inner)
        print(f"| {name} | {kind} | {mc:9.1f} | {mt:9.1f} | **{mt / mc:5.2f}x** | {lt / lc:5.2f}x |", flush=True)


def bench_layer_norm(reps, inner, dtype):
    for (B, T, C) in [(32, 32, 8), (32, 32, 32), (8, 256, 32), (8, 128, 128), (4, 1024, 768)]:
        def mk():
            x = torch.randn(B, T, C, dtype=dtype, requires_grad=True)
            w = torch.randn(C, requires_grad=True)
            b = torch.randn(C, requires_grad=True)
            return x, w, b
        if dtype == torch.float32:
            ref = lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)  # noqa: E731
        else:  # eager bf16 with fp32 params needs the casts the model would do
            ref = lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w.to(x.dtype), b.to(x.dtype), 1e-5)  # noqa: E731
        big = B * T * C > 1_000_000
        _bench_case(f"layer_norm {dtype} B={B} T={T} C={C}", mk,
                    lambda x, w, b: cpp.layer_norm(x, w, b, 1e-5), ref, (B, T, C),
                    max(5, reps // 3) if big else reps, 1 if big else inner)


def bench_embedding(reps, inner, dtype):
    for (V, B, T, C) in [(9, 32, 32, 8), (9, 32, 32, 32), (9, 8, 256, 32), (256, 8, 128, 128), (50304, 4, 1024, 768)]:
        def mk():
            idx = torch.randint(0, V, (B, T))
            tok = torch.randn(V, C, dtype=dtype, requires_grad=True)
            pos = torch.randn(max(T, 32), C, dtype=dtype, requires_grad=True)
            return idx, tok, pos
        big = V * C > 1_000_000
        _bench_case(f"embedding_add {dtype} V={V} B={B} T={T} C={C}", mk, cpp.embedding_add,
                    lambda idx, tok, pos: F.embedding(idx, tok) + pos[: idx.shape[1]], (B, T, C),
                    max(5, reps // 3) if big else reps, 1 if big else inner)


def bench_attention(reps, inner, dtype):
    cases = [(32, 8, 32, 1, True), (32, 2, 32, 4, True), (32, 2, 32, 16, True), (8, 2, 256, 16, False),
             (8, 2, 128, 64, True), (1, 12, 1024, 64, True)]
    for (B, H, T, D, causal) in cases:
        def mk():
            return tuple(torch.randn(B, H, T, D, dtype=dtype, requires_grad=True) for _ in range(3))
        r = inner if T <= 256 else 1
        _bench_case(f"attention {dtype} B={B} H={H} T={T} D={D} causal={causal}", mk,
                    lambda q, k, v: cpp.attention(q, k, v, causal),
                    lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                    (B, H, T, D), reps if T <= 256 else max(3, reps // 4), r)


def bench_step(reps, inner, dtype):
    """One optimizer step (forward, loss, backward, AdamW as barkgpt.train configures it) of
    whole presets, "cpp" vs "torch"."""
    from barkgpt import BarkGPT, GPTConfig
    for preset, B in (("bark", 32), ("bark-tiny", 32), ("bark-article", 8), ("small", 8)):
        config = GPTConfig.preset(preset)
        T = config.block_size
        idx = torch.randint(0, config.vocab_size, (B, T))
        tgt = torch.randint(0, config.vocab_size, (B, T))
        steps = []
        for backend in ("cpp", "torch"):
            torch.manual_seed(0)
            model = BarkGPT(config, backend=backend)
            opt = model.configure_optimizers(learning_rate=1e-3)

            def step(model=model, opt=opt):
                _, loss = model(idx, tgt)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            steps.append(step)
        mc, mt, lc, lt = _pair(steps[0], steps[1], max(5, reps // 2), max(1, inner // 2))
        print(f"| train step {preset} B={B} T={T} | fwd+bwd+AdamW | {mc:9.1f} | {mt:9.1f} | **{mt / mc:5.2f}x** "
              f"| {lt / lc:5.2f}x |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--op", choices=["layer_norm", "attention", "embedding", "step", "all"], default="all")
    p.add_argument("--reps", type=int, default=21)
    p.add_argument("--inner", type=int, default=10)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpp build: {cpp.BUILD}")
    print("| case | pass | cpp median (us) | torch median (us) | torch/cpp (medians) | torch/cpp (minima) |")
    print("|---|---|---:|---:|---:|---:|")
    if args.op in ("layer_norm", "all"):
        bench_layer_norm(args.reps, args.inner, dtype)
    if args.op in ("embedding", "all"):
        bench_embedding(args.reps, args.inner, dtype)
    if args.op in ("attention", "all"):
        bench_attention(args.reps, args.inner, dtype)
    if args.op in ("step", "all"):
        bench_step(args.reps, args.inner, dtype)


if __name__ == "__main__":
    main()
