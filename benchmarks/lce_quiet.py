"""python benchmarks/lce_quiet.py CASE[,CASE...] [ROUNDS] (cases: the SHAPES of test_bench_linear_cross_entropy.py)

Quiet-machine timing for issue #15: fused linear + cross-entropy vs eager / compile / chunked,
fwd+bwd, same process, providers interleaved per round, median of rounds."""
import os, sys, time, statistics
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
import torch.nn.functional as F
import test_bench_linear_cross_entropy as L
from barkgpt import ops

def run(fn, x, w, t):
    x.grad = w.grad = None
    loss = fn(x, w, t)
    loss.backward()

provs = {
    "cpp": lambda x, w, t: ops.linear_cross_entropy(x, w, t, backend="cpp"),
    "eager": L.eager_lce,
    "chunked": L.chunked_lce,
    "compile": torch.compile(L.eager_lce),
}
cases = sys.argv[1].split(",")
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 7
print("torch", torch.__version__, "threads", torch.get_num_threads())
for case in cases:
    N, C, V = L.SHAPES[case]
    x, w, t = L.make_inputs(N, C, V, "cpu", torch.float32)
    names = list(provs)
    for n in names:  # warm-up (compiles)
        run(provs[n], x, w, t); run(provs[n], x, w, t)
    times = {n: [] for n in names}
    for r in range(rounds):
        for n in names:
            t0 = time.perf_counter(); run(provs[n], x, w, t); times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) for n, v in times.items()}
    line = "  ".join(f"{n} {1e3*med[n]:.2f} ms ({med['eager']/med[n]:.2f}x eager)" for n in names)
    print(f"{case} (N={N}, C={C}, V={V}) fwd+bwd medians of {rounds}: {line}", flush=True)
