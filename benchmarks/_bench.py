"""Machinery shared by the benchmark modules: settings, providers, timing, correctness checks, records.

Timing (every benchmark goes through :func:`measure`):

* warm-up is excluded: correctness is checked first (that call compiles / autotunes), then the
  timed callable runs until at least 3 calls and ``WARMUP_S`` have passed;
* the clock is read after ``torch.cuda.synchronize()`` on CUDA (pytest-benchmark's timer is
  replaced by a synchronizing one), and each round runs enough iterations to make the one
  synchronization per round negligible;
* the reported figure is the median over rounds (per call);
* inputs rotate through enough independent sets to cover twice the last-level cache (CPU L3,
  GPU L2), so small shapes are not timed out of a warm cache.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import pytest
import torch

try:
    import resource
except ImportError:  # not on Windows
    resource = None

from barkgpt import ops

# ---- settings (environment) ------------------------------------------------------------------

DEVICE = torch.device(os.environ.get("BARKGPT_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
IS_CUDA = DEVICE.type == "cuda"
SIZE = (os.environ.get("BARKGPT_BENCH_SIZE") or ("full" if IS_CUDA else "small")).lower()
if SIZE not in ("small", "full"):
    raise ValueError(f"BARKGPT_BENCH_SIZE must be 'small' or 'full', got {SIZE!r}")
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
_dt = (os.environ.get("BARKGPT_BENCH_DTYPE") or ("bf16" if IS_CUDA else "fp32")).lower()
if _dt not in _DTYPES:
    raise ValueError(f"BARKGPT_BENCH_DTYPE must be fp32, bf16 or fp16, got {_dt!r}")
DTYPE = _DTYPES[_dt]
# Stop starting new benchmarks after this many seconds (the results of those run are kept).
BUDGET_S = float(os.environ.get("BARKGPT_BENCH_BUDGET_S") or 0) or None
# Seconds of timed rounds per benchmark (after warm-up).
MEASURE_S = float(os.environ.get("BARKGPT_BENCH_MEASURE_S") or (0.1 if IS_CUDA else 0.15))
WARMUP_S = 0.05 if IS_CUDA else 0.03
# CUDA: a round this long makes its one synchronization negligible. CPU: short rounds, so that
# the ones another process interrupts stay a minority the median ignores.
ROUND_S = 2e-3 if IS_CUDA else 2e-4
MIN_ROUNDS, MAX_ROUNDS = (5 if IS_CUDA else 20), 300
MAX_SETS = 64
GRAPH_MEM_CAP = (4 << 30) if IS_CUDA else (1 << 30)  # bytes of autograd graphs built per bwd round

STATE: Dict[str, Any] = {"t0": time.time(), "records": [], "budget_skipped": 0}

# ---- what is available -----------------------------------------------------------------------


def barkgpt_backends() -> List[str]:
    """barkgpt backends that run on DEVICE. Triton on CPU tensors is the interpreter, a
    correctness tool: timing it says nothing, so it is left out."""
    return [b for b in ops.available_backends(DEVICE) if not (b == "triton" and DEVICE.type == "cpu")]


def backend_status() -> Dict[str, str]:
    out = {}
    for b in ops.BACKENDS:
        reason = ops.unavailable_reason(b, DEVICE)
        if b == "triton" and DEVICE.type == "cpu" and reason is None:
            reason = "interpreter only on CPU (not timed)"
        out[b] = "available" if reason is None else reason
    return out


def _cache_bytes() -> int:
    if IS_CUDA:
        return int(torch.cuda.get_device_properties(DEVICE).L2_cache_size)
    best = 0
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path, encoding="utf-8") as f:
                s = f.read().strip().upper()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], 1)
        digits = s.rstrip("KMG")
        if digits.isdigit():
            best = max(best, int(digits) * mult)
    return best or (32 << 20)


CACHE_BYTES = _cache_bytes()


def n_sets(set_bytes: float) -> int:
    """How many input sets to rotate through so that together they cover 2x the cache."""
    return int(min(MAX_SETS, max(1, math.ceil(2 * CACHE_BYTES / max(set_bytes, 1.0)))))


def tensor_bytes(*objs) -> int:
    total = 0
    for o in objs:
        if isinstance(o, torch.Tensor):
            total += o.numel() * o.element_size()
        elif isinstance(o, (list, tuple)):
            total += tensor_bytes(*o)
    return total


# ---- timing ----------------------------------------------------------------------------------


_COMPILED: Dict[Callable, Callable] = {}


def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)``, made once per function for the whole session (static shapes)."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


def backend_of(provider: str) -> str:
    """"barkgpt-cpp" -> "cpp"."""
    return provider.split("-", 1)[1]


def provider_call(provider: str, eager: Callable, barkgpt_op: Callable) -> Callable:
    """The function a provider times: ``eager`` itself ("eager"), compiled ("compile"), or
    ``barkgpt_op(*args, backend=...)`` for "barkgpt-<backend>"."""
    if provider == "eager":
        return eager
    if provider == "compile":
        return compiled(eager)
    backend = backend_of(provider)
    return lambda *args: barkgpt_op(*args, backend=backend)


def now() -> float:
    """Wall clock after the device has finished everything queued so far."""
    if IS_CUDA:
        torch.cuda.synchronize(DEVICE)
    return time.perf_counter()


def check_budget(record: Dict[str, Any]) -> None:
    if BUDGET_S is not None and time.time() - STATE["t0"] > BUDGET_S:
        STATE["budget_skipped"] += 1
        add_record(dict(record, status="skipped: time budget spent"))
        pytest.skip(f"BARKGPT_BENCH_BUDGET_S={BUDGET_S:g} s spent")


def peak_memory_mb(fn: Callable[[], Any]) -> Optional[float]:
    """Extra device memory one call of ``fn`` allocates at its peak (CUDA only)."""
    if not IS_CUDA:
        return None
    torch.cuda.synchronize(DEVICE)
    torch.cuda.reset_peak_memory_stats(DEVICE)
    base = torch.cuda.memory_allocated(DEVICE)
    fn()
    torch.cuda.synchronize(DEVICE)
    return (torch.cuda.max_memory_allocated(DEVICE) - base) / 2**20


def measure(benchmark, fn: Callable[..., Any], *, warm_calls: int = 3, measure_s: Optional[float] = None,
            setup: Optional[Callable[[], Any]] = None, calls: int = 1) -> Dict[str, Any]:
    """Warm up, then time ``fn`` with pytest-benchmark; returns the median and spread per call.

    Without ``setup``, ``fn()`` is one call (it rotates its own inputs) and each round runs it
    enough times to last ROUND_S. With ``setup``, each round first runs ``setup()`` untimed and
    then times ``fn(setup_result)``, which makes ``calls`` calls; the stats are scaled to one call.
    """
    if benchmark.disabled:  # --benchmark-disable: run once as a smoke test
        fn(setup()) if setup else fn()
        return {"median_s": None}
    measure_s = MEASURE_S if measure_s is None else measure_s
    one = (lambda: fn(setup())) if setup else fn
    t0 = now()
    n = 0
    while n < warm_calls or now() - t0 < WARMUP_S:
        one()
        n += 1
    if setup:
        arg = setup()
        t = now()
        fn(arg)
        est = max(now() - t, 1e-7)
        iterations = 1
    else:
        t = now()
        for _ in range(2):
            fn()
        est = max((now() - t) / 2, 1e-7)
        iterations = max(1, int(round(ROUND_S / est))) if est < ROUND_S else 1
    rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, measure_s / (est * iterations))))
    if not hasattr(benchmark, "_timer"):
        raise RuntimeError("this pytest-benchmark has no BenchmarkFixture._timer; the suite needs a "
                           "synchronizing timer (pytest-benchmark 4 or 5)")
    benchmark._timer = now
    if setup:
        benchmark.pedantic(fn, setup=lambda: ((setup(),), {}), rounds=rounds, iterations=1, warmup_rounds=0)
        # Rounds made ``calls`` calls each: scale to one call (before any statistic is computed).
        benchmark.stats.stats.data[:] = [d / calls for d in benchmark.stats.stats.data]
        benchmark.stats.iterations = calls
        faults = None  # the untimed setup's faults would be counted too
    else:
        f0 = minor_faults()
        benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=0)
        f1 = minor_faults()
        faults = (f1 - f0) / (rounds * iterations) if f0 is not None and f1 is not None else None
    s = benchmark.stats.stats
    return {"median_s": s.median, "q1_s": s.q1, "q3_s": s.q3, "min_s": s.min, "rounds": rounds,
            "iterations": calls if setup else iterations, "faults_per_call": faults}


def minor_faults() -> Optional[int]:
    """Minor page faults of this process so far (CPU runs on Unix), else None. A CPU op whose
    outputs come from fresh mappings takes one per 4 KiB page it first touches, and on a VM that
    can cost more than the op: the reports show faults per call next to the times."""
    if IS_CUDA or resource is None:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# ---- correctness -----------------------------------------------------------------------------

# Relative error ||got - ref|| / ||ref|| allowed against a reference in higher precision
# (fp64 on CPU, fp32 on CUDA). fp32 on CUDA allows TF32 matmul units.
TOL = {torch.float32: 2e-3 if IS_CUDA else 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
REF_DTYPE = torch.float32 if IS_CUDA else torch.float64


def assert_close(what: str, got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> float:
    got = got.detach().to(torch.float64)
    ref = ref.detach().to(torch.float64)
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    assert bool(torch.isfinite(got).all()), f"{what}: non-finite values"
    err = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
    tol = TOL[dtype]
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e} against the {REF_DTYPE} reference"
    return err


def is_unsupported(e: Exception) -> bool:
    """An SDPA backend refusing these inputs (as opposed to a bug)."""
    msg = str(e)
    return isinstance(e, RuntimeError) and ("No available kernel" in msg or "No viable backend" in msg)


# ---- records ---------------------------------------------------------------------------------


def add_record(rec: Dict[str, Any]) -> None:
    try:
        rec["loadavg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    STATE["records"].append(rec)
    # BARKGPT_BENCH_JSONL: every record also goes to this file the moment it exists, so a run that
    # is killed (a device time limit) keeps what it measured.
    stream = os.environ.get("BARKGPT_BENCH_JSONL")
    if stream:
        with open(stream, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, default=str) + "\n")


_checked: Dict[tuple, Any] = {}


def run_op(benchmark, *, group: str, case: str, shape: Dict[str, Any], provider: str, mode: str,
           make_args: Callable[[], Sequence[Any]], diff_argnums: Sequence[int],
           call: Callable[..., torch.Tensor], reference: Callable[..., torch.Tensor],
           nbytes: Optional[float] = None, nflops: Optional[float] = None,
           context: Optional[Callable[[], Any]] = None, may_be_unsupported: bool = False) -> Dict[str, Any]:
    """Check ``call`` against ``reference`` once, then time one of its modes.

    ``make_args()`` builds one fresh input set (the differentiable ones requiring grad);
    ``reference(*args)`` gets the same inputs upcast to REF_DTYPE. mode "fwd" times a training
    forward (inputs require grad, so what backward needs is saved), "bwd" the backward alone
    (graphs built beforehand, ``retain_graph``), "fwd+bwd" both.
    """
    rec = {"group": group, "case": case, "shape": shape, "provider": provider, "mode": mode,
           "dtype": str(DTYPE).replace("torch.", ""), "bytes": nbytes, "flops": nflops}
    check_budget(rec)
    benchmark.group = f"{group} {mode} {case}"
    benchmark.extra_info.update({"provider": provider, "mode": mode, "case": case})
    key = (group, case, provider)
    ctx = context or contextlib.nullcontext
    with ctx():
        if key not in _checked:
            try:
                _checked[key] = _check(case, provider, make_args, diff_argnums, call, reference)
            except Exception as e:  # noqa: BLE001 - only SDPA refusals are turned into skips
                if may_be_unsupported and is_unsupported(e):
                    _checked[key] = f"unsupported: {str(e).splitlines()[0][:160]}"
                else:
                    raise
        if isinstance(_checked[key], str):
            add_record(dict(rec, status=_checked[key]))
            pytest.skip(f"{provider} refuses {case}")
        errors = _checked[key]

        first = [a for a in make_args()]
        out0 = call(*first)
        per_set = tensor_bytes(first, out0) * 2  # + upstream grad and input grads
        sets = [first] + [list(make_args()) for _ in range(n_sets(per_set) - 1)]
        grads = [torch.randn_like(out0)] + [torch.randn_like(out0) for _ in sets[1:]]
        del out0
        diffs = [[s[i] for i in diff_argnums] for s in sets]
        n = len(sets)
        pos = [0]

        def nxt() -> int:
            i = pos[0]
            pos[0] = (i + 1) % n
            return i

        calls = 1
        if mode == "fwd":
            def fn():
                call(*sets[nxt()])
        elif mode == "bwd":
            # Each round builds fresh graphs (untimed) and times their backwards; no retain_graph,
            # which compiled backwards with donated buffers refuse.
            t = now()
            torch.autograd.grad(call(*sets[0]), diffs[0], grads[0])
            est = max(now() - t, 1e-7)  # fwd + bwd: an overestimate of one backward
            calls = max(1, min(256, math.ceil(ROUND_S / est), int(GRAPH_MEM_CAP / per_set)))

            def setup():
                return [(call(*sets[i]), i) for i in (nxt() for _ in range(calls))]

            def fn_batch(graphs):
                for out, i in graphs:
                    torch.autograd.grad(out, diffs[i], grads[i])
        elif mode == "fwd+bwd":
            def fn():
                i = nxt()
                torch.autograd.grad(call(*sets[i]), diffs[i], grads[i])
        else:
            raise ValueError(f"unknown mode {mode!r}")

        if mode == "bwd":
            one = [(call(*sets[0]), 0)]
            mem = peak_memory_mb(lambda: fn_batch(one))
            del one
            timing = measure(benchmark, fn_batch, setup=setup, calls=calls)
        else:
            mem = peak_memory_mb(fn)
            timing = measure(benchmark, fn)
    med = timing.get("median_s")
    rec.update(timing, status="ok", n_sets=n, peak_mem_mb=mem, max_rel_err=errors)
    if med:
        rec["gbps"] = nbytes / med / 1e9 if nbytes else None
        rec["tflops"] = nflops / med / 1e12 if nflops else None
    benchmark.extra_info.update({k: rec.get(k) for k in ("gbps", "tflops", "peak_mem_mb", "n_sets", "bytes", "flops")})
    add_record(rec)
    return rec


def _check(case, provider, make_args, diff_argnums, call, reference) -> float:
    """Output and every input gradient (random upstream gradient) against the reference;
    returns the largest relative error."""
    args = list(make_args())
    out = call(*args)
    g = torch.randn_like(out)
    diff = [args[i] for i in diff_argnums]
    grads = torch.autograd.grad(out, diff, g)
    ref_args = [a.detach().to(REF_DTYPE).requires_grad_(a.requires_grad)
                if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    ref_out = reference(*ref_args)
    ref_grads = torch.autograd.grad(ref_out, [ref_args[i] for i in diff_argnums], g.to(REF_DTYPE))
    worst = assert_close(f"{provider} {case} output", out, ref_out, DTYPE)
    for i, (a, b) in zip(diff_argnums, zip(grads, ref_grads)):
        worst = max(worst, assert_close(f"{provider} {case} grad of input {i}", a, b, DTYPE))
    return worst
