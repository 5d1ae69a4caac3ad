"""Launch helpers shared by the Triton kernels.

* ``interpret_mode``: whether kernels run in Triton's interpreter (``TRITON_INTERPRET=1``).
* ``device_ctx``: launch on the tensor's own GPU (``torch.cuda.device``), not the current one.
* ``num_programs_target``: how many programs fill the device; fixes the number of partial
  sums the deterministic reductions use (depends only on the device, so repeated runs on one
  device reduce in the same order and are bitwise equal).
* ``as_rows``: a 2-D ``(rows, N)`` view of any-rank tensor without copying when the strides
  allow it (transposed or expanded last-dim views stay views; their strides go to the kernel).
* ``sum_partials``: sums a ``(G, K)`` fp32 buffer of per-program partials over G in a fixed
  order (the second stage of every no-atomics reduction) and writes the K values, in any
  dtype, to one output or split across two.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

# Under TRITON_INTERPRET=1 every program is a Python loop iteration: a small "device" keeps
# CPU tests quick while still giving each persistent program several tiles to walk.
_INTERPRET_SMS = 2


def interpret_mode() -> bool:
    """TRITON_INTERPRET=1: kernels run on CPU tensors in Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device_ctx(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _cuda_arch(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def cuda_arch(device: torch.device) -> Optional[int]:
    """Compute capability of a CUDA device as ``10 * major + minor`` (90 for an H100), else None."""
    if device.type != "cuda":
        return None
    return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())


def sm_count(device) -> int:
    """Streaming multiprocessors of ``device`` (an int passes through: configs can be computed
    for a device that is not here, as benchmarks/compile_check.py does)."""
    if isinstance(device, int):
        return device
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return _INTERPRET_SMS


def resident_blocks(kernel, args, kwargs, device: torch.device, fallback: int) -> int:
    """Blocks of ``kernel`` (launched with ``args``/``kwargs``) one SM holds at once, from the
    compiled kernel's registers and shared memory: a persistent grid of exactly this many blocks
    per SM runs in one wave. ``fallback`` off CUDA (the interpreter) or if the compiled kernel
    cannot be inspected. Compiles (or finds in Triton's cache) the exact specialization the
    following launch uses, so the launch itself compiles nothing more."""
    if device.type != "cuda":
        return fallback
    num_warps = kwargs.get("num_warps", 4)
    key = (kernel.fn.__qualname__ if hasattr(kernel, "fn") else id(kernel), device.index,
           tuple(sorted(kwargs.items())),
           tuple((a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else
                 (a == 1, a % 16 == 0) if isinstance(a, int) else type(a) for a in args))
    hit = _RESIDENT.get(key)
    if hit is not None:
        return hit
    try:
        compiled = kernel.warmup(*args, grid=(1,), **kwargs)
        compiled._init_handles()  # loads the module: fills n_regs (Triton >= 3.0)
        n_regs, shared = int(compiled.n_regs), int(compiled.metadata.shared)
    except Exception:  # pragma: no cover - private Triton API changed: keep the estimate
        return fallback
    props = torch.cuda.get_device_properties(device)
    regs_per_sm = getattr(props, "regs_per_multiprocessor", 65536)
    threads_per_sm = getattr(props, "max_threads_per_multi_processor", 2048)
    smem_per_sm = getattr(props, "shared_memory_per_multiprocessor", 0)
    blocks = blocks_per_sm(n_regs, num_warps, shared, regs_per_sm, threads_per_sm, smem_per_sm)
    _RESIDENT[key] = blocks
    return blocks


_RESIDENT: dict = {}


def blocks_per_sm(n_regs: int, num_warps: int, shared: int, regs_per_sm: int = 65536,
                  threads_per_sm: int = 2048, smem_per_sm: int = 0, max_blocks: int = 16) -> int:
    """CUDA's occupancy rule: registers are allocated per warp in units of 256, threads and
    shared memory per SM are capped; at most ``max_blocks`` (16 on sm_86, more elsewhere)."""
    regs_per_warp = -(-max(n_regs, 1) * 32 // 256) * 256
    by_regs = (regs_per_sm // regs_per_warp) // num_warps
    by_threads = threads_per_sm // (32 * num_warps)
    by_smem = smem_per_sm // shared if shared and smem_per_sm else max_blocks
    return max(1, min(by_regs, by_threads, by_smem, max_blocks))


def pow2_floor(n: int) -> int:
    return 1 << (max(int(n), 1).bit_length() - 1)


def warps_for(tile_elems: int, max_warps: int = 16, per_thread: int = 16) -> int:
    """About ``per_thread`` elements per thread: enough independent loads in flight without
    running out of registers (checked with cuobjdump -res-usage on sm_90: no spills)."""
    return max(1, min(max_warps, tile_elems // (32 * per_thread)))


def as_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` as ``(rows, n)``; a view when strides allow (last dim may have any stride)."""
    try:
        return t.view(-1, n)
    except RuntimeError:  # leading dims not mergeable (e.g. a permuted 3-D view): copy once
        return t.reshape(-1, n)


@triton.jit
def _sum_partials_kernel(
    P,  # (G, K) fp32 contiguous partial sums; columns [0, N0) go to OUT0, [N0, K) to OUT1
    OUT0, OUT1,  # contiguous, any float dtype (OUT1 unused when K == N0)
    G, K, N0,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < K
    acc = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        ptrs = P + g.to(tl.int64)[:, None] * K + cols[None, :]
        acc += tl.load(ptrs, mask=(g < G)[:, None] & col_ok[None, :], other=0.0)
    total = tl.sum(acc, 0)
    tl.store(OUT0 + cols, total.to(OUT0.dtype.element_ty), mask=cols < N0)
    tl.store(OUT1 + (cols - N0), total.to(OUT1.dtype.element_ty), mask=col_ok & (cols >= N0))


class PartialsConfig(NamedTuple):
    block_g: int
    block_n: int
    num_warps: int


def partials_config(G: int, K: int, sms: int = 132) -> PartialsConfig:
    """Column blocks narrow enough for ~2 programs per SM (LayerNorm's dW/dB at N = 768 is
    K = 1536 columns: 64-wide blocks gave 24 programs on a 132-SM GPU, 16-wide give 96), but
    at least 16 columns (64-byte row segments) so each row read stays one coalesced piece."""
    block_n = min(triton.next_power_of_2(K), 64)
    while block_n > 16 and triton.cdiv(K, block_n) < 2 * sms:
        block_n //= 2
    block_g = max(1, min(triton.next_power_of_2(G), 4096 // block_n))
    return PartialsConfig(block_g, block_n, warps_for(block_g * block_n, 8))


def sum_partials(partials: torch.Tensor, out: torch.Tensor, out2: Optional[torch.Tensor] = None) -> None:
    """``concat(out, out2)[:] = partials.sum(0)`` in a fixed order, in one launch.

    ``partials`` (G, K) fp32 contiguous; ``out`` (and ``out2``) contiguous tensors of any float
    dtype whose sizes add up to K (two outputs let LayerNorm reduce dweight and dbias together)."""
    G, K = partials.shape
    n0 = out.numel()
    assert partials.is_contiguous() and out.is_contiguous()
    assert K == n0 + (out2.numel() if out2 is not None else 0)
    assert out2 is None or out2.is_contiguous()
    if K == 0:
        return
    cfg = partials_config(G, K, sm_count(partials.device))
    with device_ctx(partials):
        _sum_partials_kernel[(triton.cdiv(K, cfg.block_n),)](
            partials, out, out2 if out2 is not None else out, G, K, n0,
            BLOCK_G=cfg.block_g, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps)
