"""The head of a cached decode step: the full fp32 head against the fp16 screen plus the exact
recompute of its candidates (ops.head_topk_logits, csrc/head_screen.cpp), and how many candidates
a greedy generation of the random-weights GPT-2-shaped model of bench_generate.py needs.

    python benchmarks/head_screen_bench.py [--rounds N] [--reps N] [--threads N] [--layers N]
                                           [--new-tokens N]

Head timing: V = 50257, C = 768 (GPT-2 small's tied head, 154 MB in fp32), batch 1 and 8, k = 1
(greedy) and 40 (generate's default top_k); x is a random row of unit scale, as after ln_f. Each
round times --reps calls of each path, alternating the paths round by round so machine noise
hits both alike; the table gives the medians over rounds of the per-call time, their ratio
(full / screened > 1: the screen is faster) and the screened calls' mean candidate count. The
head (154 MB) is far larger than any cache, so every call streams it from memory, as a decode
step does. Also timed: building the fp16 copy (once per generate call). Then the model of
bench_generate.build_models (random weights, --layers layers) generates --new-tokens tokens
greedily from a 16-token prompt at batch 1 and 8, with the screen counting its candidates, and
the whole greedy generate call is timed with the screen on and off (--gen-rounds, alternating).
Time it on a quiet machine; the numbers mean nothing on a busy one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from barkgpt import ops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _time(fn, reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def head_rows(rounds: int, reps: int):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(50257, 768, generator=g) * 0.02
    screen = ops.HeadScreen()
    builds = []
    for _ in range(4):  # the first one also maps the memory for the first time
        screen.clear()
        t0 = time.perf_counter()
        screen.update(w)
        builds.append(time.perf_counter() - t0)
    build = statistics.median(builds[1:])
    rows = []
    for B in (1, 8):
        x = torch.randn(B, 768, generator=g)
        for k in (1, 40):
            full = lambda: ops.linear(x, w, None, backend="cpp")  # noqa: E731
            scr = lambda: ops.head_topk_logits(x, w, k, screen, backend="cpp")  # noqa: E731
            full(), scr()
            before = dict(screen.stats)
            tf, ts = [], []
            for _ in range(rounds):
                tf.append(_time(full, reps))
                ts.append(_time(scr, reps))
            n = screen.stats["screened"] - before["screened"]
            cand = (screen.stats["candidates"] - before["candidates"]) / n if n else float("nan")
            mf, ms = statistics.median(tf), statistics.median(ts)
            rows.append((B, k, mf * 1e3, ms * 1e3, mf / ms, cand, screen.stats["full"] - before["full"]))
    return build, rows


def generate_candidates(model, new_tokens: int):
    from bench_generate import PROMPT

    screens = []
    real = ops.head_topk_logits

    def counting(x, weight, k, screen, backend=None):
        if not any(s is screen for s in screens):
            screens.append(screen)
        return real(x, weight, k, screen, backend=backend)

    ops.head_topk_logits = counting
    out = []
    try:
        for B in (1, 8):
            screens.clear()
            idx = torch.randint(0, 50257, (B, PROMPT), generator=torch.Generator().manual_seed(B))
            model.generate(idx, new_tokens, greedy=True)
            st = screens[0].stats
            out.append((B, st["screened"], st["full"], st["candidates"] / max(1, st["screened"])))
    finally:
        ops.head_topk_logits = real
    return out


def generate_times(model, new_tokens: int, rounds: int):
    """Median seconds of a greedy generate call with the screen on and off (alternating), B 1 and 8."""
    from bench_generate import PROMPT

    out = []
    for B in (1, 8):
        idx = torch.randint(0, 50257, (B, PROMPT), generator=torch.Generator().manual_seed(B))
        times = {True: [], False: []}
        tokens = {}
        for r in range(rounds + 1):  # the first round warms up
            for on in (True, False):
                model.head_screen = on
                t0 = time.perf_counter()
                tokens[on] = model.generate(idx, new_tokens, greedy=True)
                if r:
                    times[on].append(time.perf_counter() - t0)
        del model.head_screen
        on, off = statistics.median(times[True]), statistics.median(times[False])
        out.append((B, B * new_tokens / on, B * new_tokens / off, off / on, torch.equal(tokens[True], tokens[False])))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--layers", type=int, default=12, help="layers of the generating model (default 12)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--gen-rounds", type=int, default=3,
                    help="timed greedy generate calls per setting, screen on and off (0: skip)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    why = ops.unavailable_reason("cpp", "cpu")  # (loads the cpp backend)
    if why is not None:
        raise SystemExit(f"the head screen needs the cpp backend: {why}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpp gemm {ops.cpu_gemm_library()}")
    build, rows = head_rows(args.rounds, args.reps)
    print(f"\nbuilding the fp16 copy of a 50257 x 768 head: {build * 1e3:.1f} ms (median of 3; once per generate call)\n")
    print("| B | k | full head ms | screen + exact ms | full / screened | mean candidates | full-head fallbacks |")
    print("|---|---|---|---|---|---|---|")
    for B, k, mf, ms, r, cand, fb in rows:
        print(f"| {B} | {k} | {mf:.3f} | {ms:.3f} | {r:.2f}x | {cand:.1f} | {fb} |")
    print(f"\ngreedy generate, bench_generate's random GPT-2-shaped model ({args.layers} layers), "
          f"prompt 16, {args.new_tokens} new tokens:")
    from bench_generate import build_models

    model = build_models(args.layers, "cpu", backend="cpp")[0]
    print("| B | screened steps | full-head steps | mean candidates per step (union over the batch) |")
    print("|---|---|---|---|")
    for B, n, fb, cand in generate_candidates(model, args.new_tokens):
        print(f"| {B} | {n} | {fb} | {cand:.1f} |")
    if args.gen_rounds > 0:
        print(f"\ngreedy generate tokens/s (prefill included, median of {args.gen_rounds}), screen on and off:")
        print("| B | screen on | screen off | on / off | same tokens |")
        print("|---|---|---|---|---|")
        for B, ton, toff, r, same in generate_times(model, args.new_tokens, args.gen_rounds):
            print(f"| {B} | {ton:.1f} | {toff:.1f} | {r:.2f}x | {same} |")


if __name__ == "__main__":
    main()
