"""The head of a cached decode step: the full fp32 head against the screen (int8 and fp16 copies)
plus the exact recompute of its candidates (ops.head_topk_logits, csrc/head_screen.cpp), and how
many candidates a greedy generation of the random-weights GPT-2-shaped model of bench_generate.py
needs with each copy.

    python benchmarks/head_screen_bench.py [--rounds N] [--reps N] [--threads N] [--layers N]
                                           [--new-tokens N] [--gen-rounds N]

Head timing: V = 50257, C = 768 (GPT-2 small's tied head, 154 MB in fp32; the int8 copy 38.6 MB,
the fp16 copy 77 MB), batch 1 and 8, k = 1 (greedy) and 40 (generate's default top_k); x is a
random row of unit scale, as after ln_f. Each round times --reps calls of each path (full, int8,
fp16), in turn, so machine noise hits all alike; the table gives the medians over rounds of the
per-call time, the ratios full / screened (> 1: the screen is faster) and the screened calls' mean
candidate count. The head is far larger than any cache, so every call streams it from memory, as
a decode step does. Also timed: building each copy (once per generate call). Then the model of
bench_generate.build_models (random weights, --layers layers) generates --new-tokens tokens
greedily from a 16-token prompt at batch 1 and 8 with each precision ("auto", "int8", "fp16"),
the screens counting their candidates, and the whole greedy generate call is timed with the
screen off, int8 and fp16 (--gen-rounds, in turn). Time it on a quiet machine; the numbers mean
nothing on a busy one.
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


PRECISIONS = ("int8", "fp16")


def head_rows(rounds: int, reps: int):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(50257, 768, generator=g) * 0.02
    screens = {p: ops.HeadScreen(p) for p in PRECISIONS}
    build = {}
    for p, screen in screens.items():
        builds = []
        for _ in range(4):  # the first one also maps the memory for the first time
            screen.clear()
            t0 = time.perf_counter()
            screen.update(w)
            builds.append(time.perf_counter() - t0)
        build[p] = statistics.median(builds[1:])
    rows = []
    for B in (1, 8):
        x = torch.randn(B, 768, generator=g)
        for k in (1, 40):
            paths = {"full": lambda: ops.linear(x, w, None, backend="cpp")}  # noqa: E731
            for p, screen in screens.items():
                paths[p] = lambda screen=screen: ops.head_topk_logits(x, w, k, screen, backend="cpp")  # noqa: E731
            for fn in paths.values():
                fn()
            before = {p: dict(sc.stats) for p, sc in screens.items()}
            times = {name: [] for name in paths}
            for _ in range(rounds):
                for name, fn in paths.items():
                    times[name].append(_time(fn, reps))
            med = {name: statistics.median(t) for name, t in times.items()}
            row = {"B": B, "k": k, "full": med["full"] * 1e3}
            for p, sc in screens.items():
                n = sc.stats["screened"] - before[p]["screened"]
                row[p] = med[p] * 1e3
                row[p + "_ratio"] = med["full"] / med[p]
                row[p + "_cand"] = (sc.stats["candidates"] - before[p]["candidates"]) / n if n else float("nan")
                row[p + "_fallbacks"] = sc.stats["full"] - before[p]["full"]
            rows.append(row)
    return build, rows


def copy_memory(rounds: int, reps: int):
    """Median ms of a batch-1 greedy screened call per precision with the copy where generate puts
    it (a block of the kernels' output cache) and in a fresh hugepage_empty block, in turn (both are
    advised for huge pages as a whole since the cache's blocks are whole 2 MiB pages)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(50257, 768, generator=g) * 0.02
    x = torch.randn(1, 768, generator=g)
    lib = torch.ops.barkgpt_cpp
    out = {}
    for p in PRECISIONS:
        cached = ops.HeadScreen(p)
        cached.update(w)
        fresh = ops.HeadScreen(p)
        fresh.update(w)
        wq = lib.hugepage_empty(list(fresh.wq.shape), fresh.wq.dtype)
        wq.copy_(fresh.wq)
        fresh.wq = wq
        fns = {name: (lambda sc=sc: ops.head_topk_logits(x, w, 1, sc, backend="cpp"))
               for name, sc in (("cache", cached), ("hugepage_empty", fresh))}
        times = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                times[name].append(_time(fn, reps))
        out[p] = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        out[p]["backed"] = (lib.is_hugepage_backed(cached.wq), lib.is_hugepage_backed(fresh.wq))
    return out


def generate_candidates(model, new_tokens: int, precision: str):
    from bench_generate import PROMPT

    screens = []
    real = ops.head_topk_logits

    def counting(x, weight, k, screen, backend=None):
        if not any(s is screen for s in screens):
            screens.append(screen)
        return real(x, weight, k, screen, backend=backend)

    ops.head_topk_logits = counting
    model.head_screen_precision = precision
    out = []
    try:
        for B in (1, 8):
            screens.clear()
            idx = torch.randint(0, 50257, (B, PROMPT), generator=torch.Generator().manual_seed(B))
            model.generate(idx, new_tokens, greedy=True)
            st = screens[0].stats
            out.append((B, st["screened"], st["full"], st["candidates"] / max(1, st["screened"]),
                        st["switches"], st["precision"]))
    finally:
        ops.head_topk_logits = real
        del model.head_screen_precision
    return out


def generate_times(model, new_tokens: int, rounds: int):
    """Median tokens/s of a greedy generate call with the screen off, int8 and fp16 (in turn), B 1
    and 8, and whether all three gave the same tokens."""
    from bench_generate import PROMPT

    settings = {"off": (False, "auto"), "int8": (True, "int8"), "fp16": (True, "fp16")}
    out = []
    for B in (1, 8):
        idx = torch.randint(0, 50257, (B, PROMPT), generator=torch.Generator().manual_seed(B))
        times = {name: [] for name in settings}
        tokens = {}
        for r in range(rounds + 1):  # the first round warms up
            for name, (on, precision) in settings.items():
                model.head_screen, model.head_screen_precision = on, precision
                t0 = time.perf_counter()
                tokens[name] = model.generate(idx, new_tokens, greedy=True)
                if r:
                    times[name].append(time.perf_counter() - t0)
        del model.head_screen, model.head_screen_precision
        tps = {name: B * new_tokens / statistics.median(t) for name, t in times.items()}
        same = all(torch.equal(tokens[name], tokens["off"]) for name in settings)
        out.append((B, tps, same))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--layers", type=int, default=12, help="layers of the generating model (default 12)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--gen-rounds", type=int, default=3,
                    help="timed greedy generate calls per setting: screen off, int8, fp16 (0: skip)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    why = ops.unavailable_reason("cpp", "cpu")  # (loads the cpp backend)
    if why is not None:
        raise SystemExit(f"the head screen needs the cpp backend: {why}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpp gemm {ops.cpu_gemm_library()}")
    build, rows = head_rows(args.rounds, args.reps)
    print("\nbuilding the copy of a 50257 x 768 head (median of 3; once per generate call): "
          + ", ".join(f"{p} {build[p] * 1e3:.1f} ms" for p in PRECISIONS) + "\n")
    print("| B | k | full head ms | int8 screen + exact ms | fp16 screen + exact ms | full / int8 | full / fp16 "
          "| int8 / fp16 time | mean candidates int8 | mean candidates fp16 | full-head fallbacks int8 / fp16 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['B']} | {r['k']} | {r['full']:.3f} | {r['int8']:.3f} | {r['fp16']:.3f} | {r['int8_ratio']:.2f}x "
              f"| {r['fp16_ratio']:.2f}x | {r['int8'] / r['fp16']:.2f} | {r['int8_cand']:.1f} | {r['fp16_cand']:.1f} "
              f"| {r['int8_fallbacks']} / {r['fp16_fallbacks']} |")
    print("\nthe copy's memory, B = 1, k = 1: ms per screened call")
    print("| precision | output-cache block | hugepage_empty block | cache / hugepage_empty | is_hugepage_backed |")
    print("|---|---|---|---|---|")
    for p, r in copy_memory(args.rounds, args.reps).items():
        print(f"| {p} | {r['cache']:.3f} | {r['hugepage_empty']:.3f} | {r['cache'] / r['hugepage_empty']:.3f} "
              f"| {r['backed'][0]} / {r['backed'][1]} |")
    print(f"\ngreedy generate, bench_generate's random GPT-2-shaped model ({args.layers} layers), "
          f"prompt 16, {args.new_tokens} new tokens:")
    from bench_generate import build_models

    model = build_models(args.layers, "cpu", backend="cpp")[0]
    print("| precision | B | screened steps | full-head steps | mean candidates per step (union over the batch) "
          "| switches | precision at the end |")
    print("|---|---|---|---|---|---|---|")
    for precision in ("auto",) + PRECISIONS:
        for B, n, fb, cand, sw, final in generate_candidates(model, args.new_tokens, precision):
            print(f"| {precision} | {B} | {n} | {fb} | {cand:.1f} | {sw} | {final} |")
    if args.gen_rounds > 0:
        print(f"\ngreedy generate tokens/s (prefill included, median of {args.gen_rounds}), screen off, int8, fp16:")
        print("| B | off | int8 | fp16 | int8 / off | fp16 / off | int8 / fp16 | same tokens |")
        print("|---|---|---|---|---|---|---|---|")
        for B, tps, same in generate_times(model, args.new_tokens, args.gen_rounds):
            print(f"| {B} | {tps['off']:.1f} | {tps['int8']:.1f} | {tps['fp16']:.1f} | {tps['int8'] / tps['off']:.2f}x "
                  f"| {tps['fp16'] / tps['off']:.2f}x | {tps['int8'] / tps['fp16']:.2f}x | {same} |")


if __name__ == "__main__":
    main()
