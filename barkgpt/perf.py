"""Performance accounting: peak FLOP/s per device, MFU, and the FLOP/byte models the benchmarks report.

GPU peak rates are dense (no 2:4 sparsity) tensor-core rates from the vendors' datasheets, looked
up by ``torch.cuda.get_device_name`` and the dtype the matmuls run in. A GPU or dtype missing from
the table gives ``None`` (MFU "n/a"), never a guessed figure. A CPU's peak is measured on this
machine (a short matmul probe, cached). ``BARKGPT_PEAK_TFLOPS`` overrides both.
"""

from __future__ import annotations

import os
import re
from typing import Dict, List, Optional, Tuple

import torch

PEAK_ENV_VAR = "BARKGPT_PEAK_TFLOPS"

# (pattern on the device name, short kind, dense TFLOP/s per matmul dtype). First match wins, so
# the specific variants (PCIe, NVL) come before the plain name. "tf32" is fp32 matmuls on tensor
# cores (allow_tf32 / float32_matmul_precision != "highest"); "fp32" is plain CUDA-core fp32.
_PEAKS: List[Tuple[str, str, Dict[str, float]]] = [
    (r"GH200", "gh200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"H200 NVL", "h200-nvl", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"H200", "h200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"H100.*PCIe", "h100-pcie", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    (r"H100 NVL", "h100-nvl", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 59.8}),
    (r"H100", "h100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM5 ("H100 80GB HBM3")
    (r"B200", "b200", {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0}),
    (r"A100", "a100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"L40S", "l40s", {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6}),
    (r"L40", "l40", {"bf16": 181.0, "fp16": 181.0, "tf32": 90.5, "fp32": 90.5}),
    (r"L4\b", "l4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"A10G", "a10g", {}),  # no public datasheet rates: MFU n/a unless BARKGPT_PEAK_TFLOPS is set
    (r"A10\b", "a10", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"RTX 4090", "rtx4090", {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6}),
    (r"V100.*PCIE", "v100-pcie", {"fp16": 112.0, "fp32": 14.0}),
    (r"V100", "v100", {"fp16": 125.0, "fp32": 15.7}),
    (r"T4\b", "t4", {"fp16": 65.0, "fp32": 8.1}),
]

_DTYPE_KEYS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def device_name(device=None) -> str:
    """Marketing name of a CUDA device (``torch.cuda.get_device_name``), or the CPU model."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return cpu_model()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


def _lookup(name: str) -> Optional[Tuple[str, Dict[str, float]]]:
    for pattern, kind, peaks in _PEAKS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return kind, peaks
    return None


def device_kind(device=None) -> str:
    """Short name for result files: 'cpu', 'h100', 'h200', 'a100', ... ('cuda' for an unknown GPU)."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type != "cuda":
        return dev.type
    hit = _lookup(torch.cuda.get_device_name(dev))
    return hit[0] if hit else "cuda"


def matmul_dtype_key(dtype: torch.dtype, tf32: Optional[bool] = None) -> Optional[str]:
    """Table key for matmuls in ``dtype``; fp32 counts as tf32 when tensor cores are allowed."""
    key = _DTYPE_KEYS.get(dtype)
    if key == "fp32":
        if tf32 is None:
            tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
        return "tf32" if tf32 else "fp32"
    return key


def peak_flops(name: Optional[str] = None, dtype: torch.dtype = torch.bfloat16,
               tf32: Optional[bool] = None, device=None) -> Optional[float]:
    """Dense peak FLOP/s of device ``name`` (or of ``device``) for matmuls in ``dtype``; None if unknown.

    GPUs: the datasheet table. ``device="cpu"``: this machine's matmul rate, measured once and
    cached (:func:`measured_cpu_peak`; :func:`peak_source` says "measured"). ``BARKGPT_PEAK_TFLOPS``
    (a number in TFLOP/s) overrides both for every device.
    """
    env = os.environ.get(PEAK_ENV_VAR)
    if env:
        return float(env) * 1e12
    if name is None:
        dev = torch.device(device) if device is not None else None
        if dev is not None and dev.type == "cpu":
            return measured_cpu_peak(dtype)
        if dev is None or dev.type != "cuda":
            return None
        name = torch.cuda.get_device_name(dev)
    hit = _lookup(name)
    key = matmul_dtype_key(dtype, tf32)
    if hit is None or key is None or key not in hit[1]:
        return None
    return hit[1][key] * 1e12


# ---- measured CPU peak -------------------------------------------------------------------------
# CPUs have no datasheet row: their matmul rate depends on the ISA (AVX2, AVX-512, AMX), the core
# count and the BLAS torch ships. So it is measured: a short square-matmul probe in the dtype, at
# the threads torch uses, the best of several repetitions (the rate the hardware can sustain, not
# an average over whatever else runs). Cached per CPU model, torch version, threads and dtype.

_CPU_PEAK_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16"}
_cpu_peak_memo: Dict[str, Optional[float]] = {}


def _peak_cache_path() -> str:
    root = os.environ.get("BARKGPT_CACHE_DIR")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                            "barkgpt")
    return os.path.join(root, "cpu_peak.json")


def _cpu_peak_key(dtype: torch.dtype) -> str:
    return f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads | " \
           f"best of ATen and oneDNN | {_CPU_PEAK_DTYPES[dtype]}"


def _onednn_matmul():
    """``a @ b`` through oneDNN (libtorch's mkldnn linear op), or None where torch has none."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        linear = torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None
    return lambda a, b: linear(a, b.t(), None, "none", [], "")


def probe_matmul_flops(dtype: torch.dtype = torch.float32, n: int = 512, seconds: float = 0.3) -> float:
    """FLOP/s of the fastest of repeated ``n x n @ n x n`` matmuls in ``dtype`` on the CPU
    (2 n^3 FLOPs each), repeated for about ``seconds`` after a warm-up, through ATen
    (``torch.mm``: MKL) and through oneDNN, which the cpp backend uses (on AMD CPUs MKL runs its
    AVX2 code, at about half of what oneDNN gets from AVX-512): the faster one is the peak."""
    import time

    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    candidates = [lambda: torch.mm(a, b, out=out)]
    onednn = _onednn_matmul()
    if onednn is not None:
        try:
            onednn(a[:2, :2], b[:2, :2])
            candidates.append(lambda: onednn(a, b))
        except RuntimeError:
            pass
    best = float("inf")
    for fn in candidates:
        for _ in range(2):  # warm-up: page in, let the library pick its kernels and threads
            fn()
        end = time.perf_counter() + seconds / len(candidates)
        reps = 0
        while reps < 3 or time.perf_counter() < end:
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
            reps += 1
    return 2.0 * n ** 3 / best


def measured_cpu_peak(dtype: torch.dtype = torch.float32, refresh: bool = False) -> Optional[float]:
    """This CPU's matmul FLOP/s in ``dtype`` (float32 or bfloat16; None for others), measured by
    :func:`probe_matmul_flops` on first use and cached in ``~/.cache/barkgpt/cpu_peak.json``
    (``BARKGPT_CACHE_DIR`` moves it) per CPU model, torch version, thread count and dtype.
    ``refresh=True`` measures again. A measurement, not a datasheet figure: on a busy machine it
    is low, and MFU against it high."""
    import json

    if dtype not in _CPU_PEAK_DTYPES:
        return None
    key = _cpu_peak_key(dtype)
    if not refresh and key in _cpu_peak_memo:
        return _cpu_peak_memo[key]
    path = _peak_cache_path()
    cache: Dict[str, float] = {}
    try:
        with open(path, encoding="utf-8") as f:
            cache = json.load(f)
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        pass
    value = cache.get(key)
    if refresh or not isinstance(value, (int, float)) or not value > 0:
        value = probe_matmul_flops(dtype)
        cache[key] = value
        try:  # a private temp file renamed over the cache: concurrent writers never tear it
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(cache, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except OSError:
            pass  # read-only home: measured again next process, still correct
    _cpu_peak_memo[key] = float(value)
    return float(value)


def peak_source(device=None, name: Optional[str] = None) -> Optional[str]:
    """Where :func:`peak_flops` gets its figure for this device: "env" (BARKGPT_PEAK_TFLOPS),
    "measured" (a CPU), "datasheet" (a GPU in the table) or None (unknown)."""
    if os.environ.get(PEAK_ENV_VAR):
        return "env"
    if name is None:
        dev = torch.device(device) if device is not None else None
        if dev is not None and dev.type == "cpu":
            return "measured"
        if dev is None or dev.type != "cuda":
            return None
        name = torch.cuda.get_device_name(dev)
    return "datasheet" if _lookup(name) is not None else None


def mfu(flops_per_token: float, tokens_per_s: float, peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilization: achieved FLOP/s over the device peak (a fraction), None if no peak."""
    if not peak:
        return None
    return flops_per_token * tokens_per_s / peak


# ---- FLOP and byte models the benchmarks report against --------------------------------------
# Modes: "fwd", "bwd", "fwd+bwd". Bytes are the fewest a kernel must move through memory: each
# input read once, each output written once.

def attention_flops(B: int, H: int, T: int, D: int, causal: bool, mode: str) -> float:
    """QK^T and PV: 4*B*H*T*T*D forward, halved when causal; backward 2.5x forward."""
    fwd = 4.0 * B * H * T * T * D * (0.5 if causal else 1.0)
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


def attention_bytes(B: int, H: int, T: int, D: int, elem: int, mode: str) -> float:
    """fwd reads q, k, v, writes o and the fp32 log-sum-exp; bwd reads q, k, v, o, do, lse,
    writes dq, dk, dv."""
    t = B * H * T * D * elem
    lse = B * H * T * 4
    fwd = 4 * t + lse
    bwd = 8 * t + lse
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def layer_norm_bytes(rows: int, n: int, elem: int, param_elem: int, mode: str, bias: bool = True) -> float:
    """fwd reads x, w, b, writes y, mean, rstd (fp32); bwd reads dy, x, w, mean, rstd,
    writes dx, dw, db."""
    x = rows * n * elem
    p = n * param_elem
    stats = 2 * rows * 4
    nb = 1 if bias else 0
    fwd = 2 * x + (1 + nb) * p + stats
    bwd = 3 * x + p + stats + (1 + nb) * p
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def embedding_bytes(B: int, T: int, C: int, V: int, elem: int, idx_elem: int, mode: str) -> float:
    """fwd reads idx, one token row per position and the T position rows, writes out;
    bwd reads dout and idx, writes the whole token-table grad (V x C) and the position grad."""
    out = B * T * C * elem
    ids = B * T * idx_elem
    pos = T * C * elem
    fwd = ids + out + pos + out
    bwd = out + ids + V * C * elem + pos
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]
