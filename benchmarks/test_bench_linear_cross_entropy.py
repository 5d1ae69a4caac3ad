"""Language-model head + loss, fwd+bwd: barkgpt's fused linear_cross_entropy vs the plain ones.

Providers: the barkgpt backends (``ops.linear_cross_entropy``), eager ``F.cross_entropy(x @ W.T)``,
``torch.compile`` of it, and ``chunked``: the plain PyTorch loop over 256-row chunks the issue
(#15) gives for scale (matmul, softmax, subtract the one-hot, two matmuls for the gradients),
eager and compiled (``compile-chunked``). Shapes (N rows, C, V): bark (2048, 32, 9), bytes
(4096, 256, 256), and with BARKGPT_BENCH_SIZE=full (or on CUDA) the GPT-2 head at N = 4096 and
8192 (768, 50304). FLOP model: 6 N C V for fwd+bwd (three matmuls).

Memory (``test_linear_cross_entropy_memory``), the extra memory of head + loss above the inputs and
the weight gradient:
* CPU: in a fresh subprocess per (shape, provider): one warm-up fwd+bwd (compiles, fills caches),
  outputs dropped, ``malloc_trim(0)``, the peak RSS reset (``/proc/self/clear_refs``), then one
  fwd+bwd; extra = peak RSS (VmHWM) - RSS before the call - the weight gradient's bytes;
* CUDA: ``torch.cuda.max_memory_allocated`` growth over one call, minus the weight gradient.
Run it alone with ``pytest benchmarks/test_bench_linear_cross_entropy.py -k memory``; the CPU
memory run needs about 4 GB free at the GPT-2 shapes (eager's logits and their gradient).
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import _bench as B  # noqa: E402
from barkgpt import ops  # noqa: E402
from barkgpt.reference import linear_cross_entropy_ref  # noqa: E402

SHAPES = {"bark": (2048, 32, 9), "bytes": (4096, 256, 256),
          "gpt2-4096": (4096, 768, 50304), "gpt2-8192": (8192, 768, 50304)}
# The vocabulary sweep sets BarkGPT.fused_loss_min_vocab (the plain path below it): the smallest
# V at which barkgpt-cpp / eager stays >= 1.0 (time only, small logits).
SWEEP = {f"sweep-V{v}": (4096, 64, v) for v in (16, 32, 64, 128)}
SHAPES.update(SWEEP)
CASES = ["bark", "bytes"] + list(SWEEP)
if B.IS_CUDA or B.SIZE == "full":
    CASES += ["gpt2-4096", "gpt2-8192"]
MEMORY_CASES = [c for c in CASES if not c.startswith("sweep")]
CHUNK = 256


def eager_lce(x, w, t):
    return F.cross_entropy((x @ w.t()).float(), t)


class _ChunkedLCE(torch.autograd.Function):
    """The issue's plain PyTorch loop: per 256-row chunk, logits, softmax, minus the one-hot, and
    the two gradient matmuls in the forward; the backward scales."""

    @staticmethod
    def forward(ctx, x, w, t):
        N = x.shape[0]
        dx = torch.empty_like(x)
        dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for r0 in range(0, N, CHUNK):
            xc, tc = x[r0:r0 + CHUNK], t[r0:r0 + CHUNK]
            z = (xc @ w.t()).float()
            lse = torch.logsumexp(z, -1)
            total += (lse - z.gather(1, tc[:, None]).squeeze(1)).sum()
            g = torch.softmax(z, -1)
            g[torch.arange(len(tc), device=x.device), tc] -= 1
            g = (g / N).to(x.dtype)
            dx[r0:r0 + CHUNK] = g @ w
            dw += (g.t() @ xc).float()
        ctx.save_for_backward(dx, dw.to(w.dtype))
        return total / N

    @staticmethod
    def backward(ctx, gl):
        dx, dw = ctx.saved_tensors
        return dx * gl, dw * gl, None


def chunked_lce(x, w, t):
    return _ChunkedLCE.apply(x, w, t)


def _compiled_chunked(x, w, t):
    # The same loop as plain differentiable ops, so that torch.compile sees (and fuses) it.
    N = x.shape[0]
    total = x.new_zeros((), dtype=torch.float32)
    for r0 in range(0, N, CHUNK):
        total = total + F.cross_entropy((x[r0:r0 + CHUNK] @ w.t()).float(), t[r0:r0 + CHUNK], reduction="sum")
    return total / N


PROVIDERS = [f"barkgpt-{b}" for b in B.barkgpt_backends()] + ["eager", "compile", "chunked", "compile-chunked"]


def provider_fn(provider):
    if provider == "chunked":
        return chunked_lce
    if provider == "compile-chunked":
        return B.compiled(_compiled_chunked)
    return B.provider_call(provider, eager_lce,
                           lambda x, w, t, backend: ops.linear_cross_entropy(x, w, t, backend=backend))


def make_inputs(N, C, V, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(V, C, generator=g) / C ** 0.5).to(device, dtype).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g).to(device)
    return [x, w, t]


@pytest.mark.bench_priority(3)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES)
def test_linear_cross_entropy(benchmark, case, provider):
    N, C, V = SHAPES[case]
    B.run_op(benchmark, group="linear_cross_entropy", case=f"{case} N={N} C={C} V={V}",
             shape={"N": N, "C": C, "V": V}, provider=provider, mode="fwd+bwd",
             make_args=lambda: make_inputs(N, C, V, B.DEVICE, B.DTYPE), diff_argnums=(0, 1),
             call=provider_fn(provider), reference=lambda x, w, t: linear_cross_entropy_ref(x, w, t),
             nflops=6.0 * N * C * V)


# ---- memory ----------------------------------------------------------------------------------

def _rss_kb(field):
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _measure_here(provider, N, C, V, dtype_name):
    """Extra bytes of one fwd+bwd (above inputs and the weight gradient), in this process."""
    import ctypes
    import gc

    dtype = getattr(torch, dtype_name)
    dev = B.DEVICE
    fn = provider_fn(provider)
    x, w, t = make_inputs(N, C, V, dev, dtype)
    dw_bytes = w.numel() * w.element_size()

    def step():
        gx, gw = torch.autograd.grad(fn(x, w, t), (x, w))
        return gx, gw

    out = step()  # warm-up: compiles, builds the C++ kernels, fills allocator caches
    del out
    gc.collect()
    if B.IS_CUDA:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        out = step()
        torch.cuda.synchronize(dev)
        extra = torch.cuda.max_memory_allocated(dev) - base
        how = "torch.cuda.max_memory_allocated growth over one fwd+bwd"
    else:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")  # VmHWM := VmRSS
        base = _rss_kb("VmRSS") * 1024
        out = step()
        extra = _rss_kb("VmHWM") * 1024 - base
        how = "peak RSS growth (VmHWM after clear_refs) over one fwd+bwd, after a warm-up call"
    del out
    return {"extra_bytes": extra - dw_bytes, "dw_bytes": dw_bytes, "how": how,
            "logits_bytes": N * V * 4}


@pytest.mark.bench_priority(3)
@pytest.mark.parametrize("case", MEMORY_CASES)
def test_linear_cross_entropy_memory(case):
    N, C, V = SHAPES[case]
    dt = str(B.DTYPE).replace("torch.", "")
    results = {}
    for provider in PROVIDERS:
        rec = {"group": "linear_cross_entropy", "case": f"{case} N={N} C={C} V={V}", "mode": "memory",
               "provider": provider, "shape": {"N": N, "C": C, "V": V}, "dtype": dt}
        B.check_budget(rec)
        if B.IS_CUDA:
            res = _measure_here(provider, N, C, V, dt)
        else:  # a fresh process: the peak of one call, nothing left over from other benchmarks
            code = (f"import sys; sys.path.insert(0, {HERE!r}); import json, test_bench_linear_cross_entropy as m; "
                    f"print(json.dumps(m._measure_here({provider!r}, {N}, {C}, {V}, {dt!r})))")
            p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800,
                               env=dict(os.environ, BARKGPT_BENCH_DEVICE=str(B.DEVICE)))
            assert p.returncode == 0, p.stderr[-2000:]
            res = json.loads(p.stdout.strip().splitlines()[-1])
        results[provider] = res
        B.add_record(dict(rec, status="memory", extra_mb=res["extra_bytes"] / 2**20, how=res["how"],
                          logits_mb=res["logits_bytes"] / 2**20))
    eager = results["eager"]["extra_bytes"]
    print(f"\n{case}: extra memory (MB) " + ", ".join(
        f"{p} {r['extra_bytes'] / 2**20:.1f} ({r['extra_bytes'] / max(eager, 1):.3f}x eager)"
        for p, r in results.items()))


if __name__ == "__main__":  # python benchmarks/test_bench_linear_cross_entropy.py PROVIDER N C V [dtype]
    a = sys.argv[1:]
    print(json.dumps(_measure_here(a[0], int(a[1]), int(a[2]), int(a[3]), a[4] if len(a) > 4 else "float32")))
