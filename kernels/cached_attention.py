"""Attention against a K/V cache in Triton (generation): flash-decoding.

Queries (B, H, Tq, D) sit at positions ``offset .. offset + Tq - 1`` of a cache (B, H, S, D);
query ``i`` of row ``b`` sees keys ``start[b] .. offset + i``. A decode step has one query per
(batch, head): one program per (batch, head) would leave most of a GPU idle, so the cached
length is split too (Dao et al., "Flash-Decoding"):

1. ``_cached_attention_fwd_kernel``: one program per (key split, batch * head, query tile)
   walks its keys with an online softmax (base 2) and writes an unnormalized partial result
   with its running max and sum (fp32).
2. ``_cached_attention_combine_kernel``: one program per query row rescales the splits'
   partials to a common max and normalizes. A row that sees no key gives zeros.

Inference only: no backward. Launcher ``cached_attention_fwd``; barkgpt/_triton.py registers it
against the op's declaration (barkgpt/opdecls.py). Head dims 1..256 are padded inside the
kernel to a power of two >= 16 (``tl.dot`` needs 16) with masked loads; fp32 uses
``input_precision="ieee"``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from . import _attention_config as _cfg
from ._utils import device_ctx, interpret_mode, sm_count

LOG2E: tl.constexpr = 1.4426950408889634
MAX_HEAD_DIM = 256
MAX_SPLITS = 64  # the combine kernel holds (splits, head dim) in one program
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_GRID_AXIS_LIMIT = 65535


# ---- 1. kernels ----------------------------------------------------------------------------

@triton.jit
def _cached_attention_fwd_kernel(
    Q, K, V, START,  # Q (B, H, Tq, D), K/V (B, H, S, D): any strides; START (B,) int64
    ACC, M, L,  # partials: ACC (splits, B*H*Tq, D) fp32, M/L (splits, B*H*Tq) fp32 (base-2 max, sum)
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd,
    H, Tq, D, offset, split_len, rows, qk_scale,
    HAS_START: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_s = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    pid_m = tl.program_id(2).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Tq
    d_ok = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    # keys of this split, cut to what the tile's queries may see
    lo = pid_s * split_len
    if HAS_START:
        lo = tl.maximum(lo, tl.load(START + b))
    hi = tl.minimum((pid_s + 1) * split_len, offset + tl.minimum(pid_m * BLOCK_M + BLOCK_M, Tq))
    qpos = offset + offs_m
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    K_bh = K + b * skb + h * skh
    V_bh = V + b * svb + h * svh
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        kT = tl.load(K_bh + offs_n[None, :] * skt + offs_d[:, None] * skd,
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, kT, input_precision=PRECISION) * qk_scale
        ok = n_ok[None, :] & (offs_n[None, :] <= qpos[:, None])
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V_bh + offs_n[:, None] * svt + offs_d[None, :] * svd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    row = pid_bh * Tq + offs_m  # query row index in (B*H*Tq)
    tl.store(ACC + (pid_s * rows + row)[:, None] * D + offs_d[None, :], acc, mask=m_ok[:, None] & d_ok[None, :])
    tl.store(M + pid_s * rows + row, m_i, mask=m_ok)
    tl.store(L + pid_s * rows + row, l_i, mask=m_ok)


@triton.jit
def _cached_attention_combine_kernel(
    ACC, M, L, OUT,  # partials as above; OUT (B*H*Tq, D) contiguous, the output's dtype
    n_splits, rows, D,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < n_splits
    d_ok = offs_d < D
    m = tl.load(M + offs_s * rows + r, mask=s_ok, other=float("-inf"))
    l = tl.load(L + offs_s * rows + r, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.math.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # splits without keys: 0
    denom = tl.sum(w * l, 0)
    acc = tl.load(ACC + (offs_s[:, None] * rows + r) * D + offs_d[None, :],
                  mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    o = tl.sum(acc * w[:, None], 0)
    o = tl.where(denom > 0, o / tl.where(denom > 0, denom, 1.0), 0.0)
    tl.store(OUT + r * D + offs_d, o.to(OUT.dtype.element_ty), mask=d_ok)


# ---- 2. launcher ---------------------------------------------------------------------------

def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


# Key tile, warps and pipeline depth of the split kernel per padded head dim, compiled for
# sm_80/86/89/90 by benchmarks/compile_check.py (no spill, shared memory within 99 KB). fp32
# "ieee" dots keep whole operand tiles in registers and its K/V tiles are twice as wide as 16-bit
# ones: the 16-bit tiles with 3 stages need 140 KB at D=128 (over sm_86/89's 99 KB) and spill
# 60 words on sm_90 (and 2 words at D=8, 24, 256 on some), so fp32 gets smaller tiles, mostly
# with 2 stages; at D=256 only (16, 4 warps, 3 stages) compiles cleanly on all four. Checked
# under triton 3.9 and 3.6 (the 64-key fp32 tile spills 2 words at D=8 on sm_80 and D=24 on
# sm_90 under 3.6).
_TILES_16BIT = {16: (64, 4, 3), 32: (64, 4, 3), 64: (64, 4, 3), 128: (64, 8, 3), 256: (32, 8, 3)}
_TILES_FP32 = {16: (32, 4, 2), 32: (32, 4, 2), 64: (64, 4, 2), 128: (32, 8, 2), 256: (16, 4, 3)}
_INTERPRET_TILE = (16, 4, 1)  # the interpreter: small key tiles keep CPU tests fast


def split_tiles(block_d: int, dtype: torch.dtype, interpret: bool = False):
    """(BLOCK_N, num_warps, num_stages) of the split kernel for padded head dim ``block_d``."""
    if interpret:
        return _INTERPRET_TILE
    return (_TILES_FP32 if dtype == torch.float32 else _TILES_16BIT)[block_d]


def combine_warps(block_d: int) -> int:
    return 1 if block_d <= 64 else 4


def _num_splits(programs: int, keys: int, block_n: int, device: torch.device) -> int:
    """Enough key splits for about two programs per SM, each split at least one key tile."""
    want = triton.cdiv(2 * sm_count(device), max(programs, 1))
    return max(1, min(want, triton.cdiv(keys, block_n), MAX_SPLITS))


def cached_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: Optional[torch.Tensor],
                         offset: int, num_splits: Optional[int] = None) -> torch.Tensor:
    """``out`` (B, H, Tq, D), contiguous, in q.dtype. ``num_splits``: force the key split count
    (tests); None picks one from the device's SM count."""
    B, H, Tq, D = q.shape
    out = torch.empty((B, H, Tq, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    keys = offset + Tq
    block_d = _cfg.padded_head_dim(D)
    block_m = 16  # tl.dot's minimum; a decode step uses one row of it
    block_n, warps, stages = split_tiles(block_d, q.dtype, interpret_mode())
    n_m = triton.cdiv(Tq, block_m)
    if num_splits is None:
        num_splits = _num_splits(B * H * n_m, keys, block_n, q.device)
    num_splits = max(1, min(int(num_splits), keys, MAX_SPLITS))
    split_len = triton.cdiv(triton.cdiv(keys, num_splits), block_n) * block_n
    num_splits = triton.cdiv(keys, split_len)
    rows = B * H * Tq
    acc = torch.empty((num_splits, rows, D), dtype=torch.float32, device=q.device)
    m = torch.empty((num_splits, rows), dtype=torch.float32, device=q.device)
    lsum = torch.empty((num_splits, rows), dtype=torch.float32, device=q.device)
    has_start = start is not None
    st = start.to(device=q.device, dtype=torch.int64).contiguous() if has_start else q
    with device_ctx(q):
        _cached_attention_fwd_kernel[(num_splits, B * H, n_m)](
            q, k, v, st, acc, m, lsum,
            *q.stride(), *k.stride(), *v.stride(),
            H, Tq, D, offset, split_len, rows, LOG2E / math.sqrt(D),
            HAS_START=has_start, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
            PRECISION=_precision(q.dtype), num_warps=warps, num_stages=stages,
        )
        _cached_attention_combine_kernel[(rows,)](
            acc, m, lsum, out, num_splits, rows, D,
            BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d,
            num_warps=combine_warps(block_d),
        )
    return out


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start, offset) -> None:
    """What these kernels cannot take, beyond dtype (the caller has checked shapes and devices)."""
    B, H, Tq, D = q.shape
    if D > MAX_HEAD_DIM:
        raise ValueError(f"triton cached_attention supports head dims up to {MAX_HEAD_DIM}, got {D}; "
                         f"use backend='torch'")
    if B * H > _GRID_AXIS_LIMIT or triton.cdiv(Tq, 16) > _GRID_AXIS_LIMIT:
        raise ValueError(f"triton cached_attention supports B * H and Tq / 16 up to {_GRID_AXIS_LIMIT}, "
                         f"got B*H={B * H}, Tq={Tq}")
