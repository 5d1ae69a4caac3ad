"""One cached decode step of BarkGPT on the cpp backend, with the fused C++ step
(ops.decode_step, csrc/decode.cpp) and with the module loop it replaces.

    python benchmarks/decode_step.py [--rounds N] [--steps N] [--threads N] [--size gpt2|small]
                                     [--batch B] [--offset P] [--pages huge|small|both]

GPT-2 small's shape by default (12 layers, 12 heads, 768 wide, vocabulary 50257), random
weights, fp32, batch 1, one new token at position --offset (16: a prompt of 16). Each round
times --steps steps of each path, alternating the paths round by round so machine noise hits
both alike (the cache length is reset before every step, so every step attends to the same
--offset + 1 positions), and prints the median and minimum per-step times and their ratio
(loop / fused > 1: the fused step is faster), plus the time BarkGPT takes to collect the
weights for the fused call (warm, back to back; generate does it once per call). The weights are in huge pages, as generate puts them
(--pages small: not; --pages both: also the fused step on a copy in 4 KiB pages, alternately).
Time it on a quiet machine; the numbers mean nothing on a busy one.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from barkgpt import BarkGPT, GPTConfig, ops
from barkgpt.model import KVCache

SIZES = {
    "gpt2": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768,
                 activation="gelu_tanh", tie_embeddings=True),
    "small": dict(vocab_size=512, block_size=128, n_layer=4, n_head=4, n_embd=128),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20, help="rounds per path (default 20)")
    ap.add_argument("--steps", type=int, default=10, help="decode steps per round (default 10)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--size", choices=sorted(SIZES), default="gpt2")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--offset", type=int, default=16, help="cached positions before the step (default 16)")
    ap.add_argument("--pages", choices=("huge", "small", "both"), default="huge",
                    help="weights in huge pages as generate puts them (default), left in 4 KiB pages, or "
                         "both: the fused step timed on two copies of the model, alternately")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if ops.unavailable_reason("cpp", "cpu") is not None:
        raise SystemExit(f"the cpp backend is unavailable: {ops.unavailable_reason('cpp', 'cpu')}")

    torch.manual_seed(0)
    cfg = GPTConfig(**SIZES[args.size])
    model = BarkGPT(cfg, backend="cpp").eval()
    small_pages = copy.deepcopy(model) if args.pages == "both" else None
    if args.pages != "small" and ops.use_cpu_hugepages(model) == 0:
        print("note: no weights were moved to huge pages (BARKGPT_CPU_HUGEPAGES=0, or none here)")
    B, P = args.batch, args.offset
    if not 1 <= P < cfg.block_size:
        raise SystemExit(f"--offset must be in 1..{cfg.block_size - 1}")
    idx = torch.randint(0, cfg.vocab_size, (B, P + 1))
    cache = KVCache(cfg, B, torch.float32, "cpu")

    def step():
        cache.length = P
        model.forward_cached(idx[:, P:], cache)

    times = {True: [], False: []}
    with torch.no_grad():
        model.forward_cached(idx[:, :P], cache)  # the prefill fills positions 0..P-1
        for fused in (True, False):  # warm-up, and the two paths agree bitwise
            model.fused_decode = fused
            for _ in range(3):
                step()
        cache.length = P
        model.fused_decode = True
        a = model.forward_cached(idx[:, P:], cache)
        cache.length = P
        model.fused_decode = False
        b = model.forward_cached(idx[:, P:], cache)
        if not torch.equal(a, b):
            raise SystemExit("the fused step and the module loop disagree")
        for _ in range(args.rounds):
            for fused in (True, False):
                model.fused_decode = fused
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step()
                times[fused].append((time.perf_counter() - t0) / args.steps * 1e3)
        cache.length = P
        model.fused_decode = True
        if model._fused_step_weights(cache) is None:
            raise SystemExit("the model would not take the fused path")
        t0 = time.perf_counter()
        for _ in range(1000):
            model._fused_step_weights(cache)
        collect_us = (time.perf_counter() - t0) / 1000 * 1e6

        if small_pages is not None:  # the fused step, huge pages vs 4 KiB pages, alternately
            model.fused_decode = True
            pages = {"huge": [], "small": []}
            for _ in range(args.rounds):
                for name, m in (("huge", model), ("small", small_pages)):
                    t0 = time.perf_counter()
                    for _ in range(args.steps):
                        cache.length = P
                        m.forward_cached(idx[:, P:], cache)
                    pages[name].append((time.perf_counter() - t0) / args.steps * 1e3)

    fused_med, loop_med = statistics.median(times[True]), statistics.median(times[False])
    print(f"decode step, {args.size} shape, batch {B}, offset {P}, {args.threads} threads, fp32, "
          f"torch {torch.__version__}, products via {ops.cpu_gemm_library()}")
    print("| path | median ms | min ms |")
    print("|---|---|---|")
    print(f"| fused (ops.decode_step) | {fused_med:.3f} | {min(times[True]):.3f} |")
    print(f"| module loop | {loop_med:.3f} | {min(times[False]):.3f} |")
    print(f"loop / fused (median): {loop_med / fused_med:.3f}x; collecting the weights: {collect_us:.1f} us per call")
    if small_pages is not None:
        h, sm = statistics.median(pages["huge"]), statistics.median(pages["small"])
        print(f"fused step, weights in huge pages: {h:.3f} ms (min {min(pages['huge']):.3f}); in 4 KiB pages: "
              f"{sm:.3f} ms (min {min(pages['small']):.3f}); small / huge (median): {sm / h:.3f}x")


if __name__ == "__main__":
    main()
