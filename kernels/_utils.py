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
from typing import Optional

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


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return _INTERPRET_SMS


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
    # Narrow column blocks: enough programs to spread G x K over the device.
    block_n = min(triton.next_power_of_2(K), 64)
    block_g = max(1, min(triton.next_power_of_2(G), 4096 // block_n))
    with device_ctx(partials):
        _sum_partials_kernel[(triton.cdiv(K, block_n),)](
            partials, out, out2 if out2 is not None else out, G, K, n0,
            BLOCK_G=block_g, BLOCK_N=block_n, num_warps=warps_for(block_g * block_n, 8))
