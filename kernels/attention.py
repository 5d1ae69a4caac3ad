"""Flash-style scaled dot-product attention in Triton: forward and backward, causal or not.

Three layers (Liger style):

1. ``@triton.jit`` kernels. The forward walks K/V tiles with an online softmax in base 2
   (``exp2`` with ``log2(e)`` folded into the scale), never builds the T x T matrix and saves
   the natural log-sum-exp per query row. The backward recomputes probabilities from it in
   two passes: one owns a Q tile, computes ``delta = rowsum(dO * O)`` for its rows (the usual
   preprocess step, folded in) and sweeps K/V tiles for dQ; then one owns a K/V tile and
   sweeps Q tiles for dK and dV, reading delta. Every output tile is written by exactly one
   program with a fixed loop order: no atomics, so repeated backward passes are bitwise equal.
2. Launchers ``attention_fwd`` / ``attention_bwd``: allocate, pick tiles from
   ``_attention_config``, launch on the tensors' device. Inputs may be any strided views
   (q, k, v sliced out of a fused qkv projection, a transposed dO): every stride is passed.
3. The ``torch.library`` ops ``barkgpt_triton::attention_fwd`` / ``attention_bwd``, their fake
   kernels and autograd are wired from the op's declaration by barkgpt/_triton.py (with
   ``empty_out`` as the forward's layout).

Head dims 1..256 are padded inside the kernels to a power of two >= 16 (``tl.dot`` needs 16)
with masked loads. Causal runs visit only tiles at or below the diagonal and mask only the
diagonal band. fp32 inputs use ``input_precision="ieee"`` so they match an fp32 reference;
fp16/bf16 use tensor cores; all accumulation is fp32.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
import triton
import triton.language as tl

from . import _attention_config as _cfg
from ._utils import cuda_arch, device_ctx, interpret_mode

# Globals a @triton.jit function reads must be tl.constexpr *instances*: compiled Triton rejects
# a plain float annotated `: tl.constexpr` (NameError at compile time; only the interpreter
# accepted it, so CPU tests passed while every GPU compile failed: benchmarks/compile_check.py).
_LOG2E_F = 1.4426950408889634
LOG2E = tl.constexpr(_LOG2E_F)
LN2 = tl.constexpr(0.6931471805599453)
MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_GRID_X_LIMIT = 2**31 - 1  # CUDA limit for grid dim 0 (batch x heads)
_GRID_Y_LIMIT = 65535  # CUDA limit for grid dim 1 (sequence tiles)
_MIN_BLOCK = 16  # the smallest tile any table gives: bounds the number of sequence tiles


# ---- 1. kernels ----------------------------------------------------------------------------

@triton.jit
def _attention_fwd_inner(acc, l_i, m_i, q, kT_ptrs, v_ptrs, stride_kt, stride_vt,
                         offs_m, offs_n0, offs_d, T, D, qk_scale, lo, hi,
                         BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                         EVEN_D: tl.constexpr, PRECISION: tl.constexpr):
    """Fold K/V rows [lo, hi) into the running (acc, l_i, m_i). MASKED tiles may cross T and,
    when CAUSAL, the diagonal; unmasked tiles are fully valid and skip every select."""
    d_ok = offs_d < D
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        row = tl.cast(start_n, tl.int64)
        if MASKED:
            n_ok = offs_n < T
            kT = tl.load(kT_ptrs + row * stride_kt, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs + row * stride_vt, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        elif EVEN_D:
            kT = tl.load(kT_ptrs + row * stride_kt)
            v = tl.load(v_ptrs + row * stride_vt)
        else:
            kT = tl.load(kT_ptrs + row * stride_kt, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs + row * stride_vt, mask=d_ok[None, :], other=0.0)
        s = tl.dot(q, kT, input_precision=PRECISION)  # (BLOCK_M, BLOCK_N) fp32, unscaled
        if MASKED:
            keep = n_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            s = tl.where(keep, s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
        else:
            # qk_scale > 0, so max(s) * scale == max(s * scale) exactly.
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attention_fwd_kernel(
    Q, K, V, O, LSE,  # Q/K/V/O: (B, H, T, D) any strides; LSE: (B, H, T) fp32 contiguous
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    H, T, D, qk_scale,  # qk_scale = log2(e) / sqrt(D)
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
):
    # The causal band starts at row0, a multiple of BLOCK_N only if BLOCK_N divides BLOCK_M:
    # otherwise the unmasked loop would take a tile crossing the diagonal.
    tl.static_assert(BLOCK_M % BLOCK_N == 0, "attention fwd: BLOCK_N must divide BLOCK_M")
    # Grid (B * H, query tiles): blocks start in order of their linear index, batch-heads fastest,
    # so every head's heaviest causal tile (the last) starts before any head's lighter ones.
    pid_m = tl.program_id(1)
    if CAUSAL:
        pid_m = tl.num_programs(1) - 1 - pid_m
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh - b * H
    row0 = pid_m * BLOCK_M
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T
    d_ok = offs_d < D

    q_ptrs = (Q + b * stride_qb + h * stride_qh + row0.to(tl.int64) * stride_qt
              + tl.arange(0, BLOCK_M)[:, None] * stride_qt + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    kT_ptrs = K + b * stride_kb + h * stride_kh + offs_n0[None, :] * stride_kt + offs_d[:, None] * stride_kd
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n0[:, None] * stride_vt + offs_d[None, :] * stride_vd

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        # Keys before row0 are visible to every row of the tile; the band [row0, row0 + BLOCK_M)
        # holds the diagonal; keys past it are never visited.
        mask_lo = row0
        hi = tl.minimum(row0 + BLOCK_M, T)
    else:
        mask_lo = (T // BLOCK_N) * BLOCK_N
        hi = T
    acc, l_i, m_i = _attention_fwd_inner(acc, l_i, m_i, q, kT_ptrs, v_ptrs, stride_kt, stride_vt,
                                         offs_m, offs_n0, offs_d, T, D, qk_scale, 0, mask_lo,
                                         BLOCK_N, False, CAUSAL, EVEN_D, PRECISION)
    acc, l_i, m_i = _attention_fwd_inner(acc, l_i, m_i, q, kT_ptrs, v_ptrs, stride_kt, stride_vt,
                                         offs_m, offs_n0, offs_d, T, D, qk_scale, mask_lo, hi,
                                         BLOCK_N, True, CAUSAL, EVEN_D, PRECISION)
    # Every row (padding rows included) saw at least one unmasked key, so l_i > 0.
    acc = acc / l_i[:, None]
    lse = (m_i + tl.math.log2(l_i)) * LN2  # back to natural log
    tl.store(LSE + (b * H + h) * T + offs_m, lse, mask=m_ok)
    o_ptrs = (O + b * stride_ob + h * stride_oh + row0.to(tl.int64) * stride_ot
              + tl.arange(0, BLOCK_M)[:, None] * stride_ot + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _attention_bwd_dkdv_inner(dk, dv, k, v, qT_ptrs, do_ptrs, stride_qt, stride_dot, LSE_bh, DELTA_bh,
                              offs_n, offs_m0, offs_d, T, D, qk_scale, lo, hi,
                              BLOCK_M: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                              EVEN_D: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate the contributions of query rows [lo, hi) to this program's dK, dV tile.
    Works on transposed scores (keys x queries) so no tile needs a transpose but dO's."""
    d_ok = offs_d < D
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        row = tl.cast(start_m, tl.int64)
        if MASKED:
            m_ok = offs_m < T
            qT = tl.load(qT_ptrs + row * stride_qt, mask=m_ok[None, :] & d_ok[:, None], other=0.0)
            do = tl.load(do_ptrs + row * stride_dot, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            lse = tl.load(LSE_bh + offs_m, mask=m_ok, other=0.0)
            delta = tl.load(DELTA_bh + offs_m, mask=m_ok, other=0.0)
        else:
            if EVEN_D:
                qT = tl.load(qT_ptrs + row * stride_qt)
                do = tl.load(do_ptrs + row * stride_dot)
            else:
                qT = tl.load(qT_ptrs + row * stride_qt, mask=d_ok[:, None], other=0.0)
                do = tl.load(do_ptrs + row * stride_dot, mask=d_ok[None, :], other=0.0)
            lse = tl.load(LSE_bh + offs_m)
            delta = tl.load(DELTA_bh + offs_m)
        sT = tl.dot(k, qT, input_precision=PRECISION)  # (BLOCK_N, BLOCK_M)
        logit = sT * qk_scale - (lse * LOG2E)[None, :]
        if MASKED:
            # Select before exp2: a future key can score far above the row's lse (overflow).
            keep = m_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_m[None, :] >= offs_n[:, None])
            logit = tl.where(keep, logit, float("-inf"))
        pT = tl.math.exp2(logit)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA,  # (B, H, T, D) any strides; LSE/DELTA (B, H, T) fp32
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dkb, stride_dkh, stride_dkt, stride_dkd,
    stride_dvb, stride_dvh, stride_dvt, stride_dvd,
    H, T, D, qk_scale, sm_scale,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
):
    # The causal band ends at col0 + BLOCK_N, a multiple of BLOCK_M only if BLOCK_M divides BLOCK_N.
    tl.static_assert(BLOCK_N % BLOCK_M == 0, "attention dK/dV: BLOCK_M must divide BLOCK_N")
    # Grid (B * H, key tiles): causal early key tiles see the most queries, and with batch-heads
    # fastest they start first for every head.
    pid_n = tl.program_id(1)
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh - b * H
    col0 = pid_n * BLOCK_N
    offs_n = col0 + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < T
    d_ok = offs_d < D
    nd_mask = n_ok[:, None] & d_ok[None, :]
    rows_n = col0.to(tl.int64) + tl.arange(0, BLOCK_N)[:, None]

    k = tl.load(K + b * stride_kb + h * stride_kh + rows_n * stride_kt + offs_d[None, :] * stride_kd,
                mask=nd_mask, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + rows_n * stride_vt + offs_d[None, :] * stride_vd,
                mask=nd_mask, other=0.0)
    qT_ptrs = Q + b * stride_qb + h * stride_qh + offs_m0[None, :] * stride_qt + offs_d[:, None] * stride_qd
    do_ptrs = DO + b * stride_dob + h * stride_doh + offs_m0[:, None] * stride_dot + offs_d[None, :] * stride_dod
    LSE_bh = LSE + (b * H + h) * T
    DELTA_bh = DELTA + (b * H + h) * T

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    t_full = (T // BLOCK_M) * BLOCK_M  # query tiles below this need no bounds check
    if CAUSAL:
        # Queries before col0 see none of these keys (skipped); the band [col0, col0 + BLOCK_N)
        # holds the diagonal; queries after it see every key of the tile.
        band_hi = tl.minimum(col0 + BLOCK_N, T)
        dk, dv = _attention_bwd_dkdv_inner(dk, dv, k, v, qT_ptrs, do_ptrs, stride_qt, stride_dot, LSE_bh,
                                           DELTA_bh, offs_n, offs_m0, offs_d, T, D, qk_scale, col0, band_hi,
                                           BLOCK_M, True, True, EVEN_D, PRECISION)
        full_lo = col0 + BLOCK_N
    else:
        full_lo = 0
    full_hi = tl.maximum(t_full, full_lo)
    dk, dv = _attention_bwd_dkdv_inner(dk, dv, k, v, qT_ptrs, do_ptrs, stride_qt, stride_dot, LSE_bh,
                                       DELTA_bh, offs_n, offs_m0, offs_d, T, D, qk_scale, full_lo, full_hi,
                                       BLOCK_M, False, False, EVEN_D, PRECISION)
    dk, dv = _attention_bwd_dkdv_inner(dk, dv, k, v, qT_ptrs, do_ptrs, stride_qt, stride_dot, LSE_bh,
                                       DELTA_bh, offs_n, offs_m0, offs_d, T, D, qk_scale, full_hi, T,
                                       BLOCK_M, True, False, EVEN_D, PRECISION)
    dk = dk * sm_scale
    tl.store(DK + b * stride_dkb + h * stride_dkh + rows_n * stride_dkt + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=nd_mask)
    tl.store(DV + b * stride_dvb + h * stride_dvh + rows_n * stride_dvt + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=nd_mask)


@triton.jit
def _attention_bwd_dq_inner(dq, q, do, lse2, delta, kT_ptrs, vT_ptrs, stride_kt, stride_vt,
                            offs_m, offs_n0, offs_d, T, D, qk_scale, lo, hi,
                            BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                            EVEN_D: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate the contributions of key rows [lo, hi) to this program's dQ tile."""
    d_ok = offs_d < D
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        row = tl.cast(start_n, tl.int64)
        if MASKED:
            n_ok = offs_n < T
            kT = tl.load(kT_ptrs + row * stride_kt, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            vT = tl.load(vT_ptrs + row * stride_vt, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        elif EVEN_D:
            kT = tl.load(kT_ptrs + row * stride_kt)
            vT = tl.load(vT_ptrs + row * stride_vt)
        else:
            kT = tl.load(kT_ptrs + row * stride_kt, mask=d_ok[:, None], other=0.0)
            vT = tl.load(vT_ptrs + row * stride_vt, mask=d_ok[:, None], other=0.0)
        s = tl.dot(q, kT, input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
        logit = s * qk_scale - lse2[:, None]
        if MASKED:
            keep = n_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            logit = tl.where(keep, logit, float("-inf"))
        p = tl.math.exp2(logit)
        dp = tl.dot(do, vT, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=PRECISION)
    return dq


@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, O, DO, DQ, LSE, DELTA,  # (B, H, T, D) any strides; LSE/DELTA (B, H, T) fp32
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    H, T, D, qk_scale, sm_scale,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
):
    tl.static_assert(BLOCK_M % BLOCK_N == 0, "attention dQ: BLOCK_N must divide BLOCK_M")
    # Grid (B * H, query tiles), heaviest causal tiles first for every head (as in the forward).
    pid_m = tl.program_id(1)
    if CAUSAL:
        pid_m = tl.num_programs(1) - 1 - pid_m
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh - b * H
    row0 = pid_m * BLOCK_M
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T
    d_ok = offs_d < D
    md_mask = m_ok[:, None] & d_ok[None, :]
    rows_m = row0.to(tl.int64) + tl.arange(0, BLOCK_M)[:, None]

    q = tl.load(Q + b * stride_qb + h * stride_qh + rows_m * stride_qt + offs_d[None, :] * stride_qd,
                mask=md_mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows_m * stride_dot + offs_d[None, :] * stride_dod,
                 mask=md_mask, other=0.0)
    # Padding rows get lse = +inf so their probabilities are exactly 0.
    lse2 = tl.load(LSE + (b * H + h) * T + offs_m, mask=m_ok, other=float("inf")) * LOG2E
    # The "preprocess" step lives here: this program owns these query rows and already holds dO.
    # dK/dV runs after this kernel and reads delta back.
    o = tl.load(O + b * stride_ob + h * stride_oh + rows_m * stride_ot + offs_d[None, :] * stride_od,
                mask=md_mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + (b * H + h) * T + offs_m, delta, mask=m_ok)
    kT_ptrs = K + b * stride_kb + h * stride_kh + offs_n0[None, :] * stride_kt + offs_d[:, None] * stride_kd
    vT_ptrs = V + b * stride_vb + h * stride_vh + offs_n0[None, :] * stride_vt + offs_d[:, None] * stride_vd

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        mask_lo = row0
        hi = tl.minimum(row0 + BLOCK_M, T)
    else:
        mask_lo = (T // BLOCK_N) * BLOCK_N
        hi = T
    dq = _attention_bwd_dq_inner(dq, q, do, lse2, delta, kT_ptrs, vT_ptrs, stride_kt, stride_vt,
                                 offs_m, offs_n0, offs_d, T, D, qk_scale, 0, mask_lo,
                                 BLOCK_N, False, CAUSAL, EVEN_D, PRECISION)
    dq = _attention_bwd_dq_inner(dq, q, do, lse2, delta, kT_ptrs, vT_ptrs, stride_kt, stride_vt,
                                 offs_m, offs_n0, offs_d, T, D, qk_scale, mask_lo, hi,
                                 BLOCK_N, True, CAUSAL, EVEN_D, PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + rows_m * stride_dqt + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=md_mask)


# ---- 2. launchers --------------------------------------------------------------------------

def _precision(dtype: torch.dtype) -> str:
    # "ieee" keeps fp32 exact vs an fp32 reference (no TF32); ignored for 16-bit inputs.
    return "ieee" if dtype == torch.float32 else "tf32"


def empty_out(q: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) output laid out as (B, T, H, D) in memory, like PyTorch's flash backend:
    the model's ``y.transpose(1, 2).reshape(B, T, C)`` is then a free view."""
    B, H, T, D = q.shape
    return torch.empty_strided((B, H, T, D), (T * H * D, D, H * D, 1), dtype=q.dtype, device=q.device)


def _strides(t: torch.Tensor):
    return tuple(t.stride())


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns ``out`` (B, H, T, D) in q.dtype and the natural-log ``lse`` (B, H, T) in fp32."""
    B, H, T, D = q.shape
    out = empty_out(q)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        lse.fill_(float("-inf") if D > 0 else 0.0)
        return out, lse
    cfg = _cfg.tile_config("fwd", D, T, q.dtype, interpret_mode(), arch=cuda_arch(q.device))
    block_d = _cfg.padded_head_dim(D)
    qk_scale = _LOG2E_F / math.sqrt(D)
    grid = (B * H, triton.cdiv(T, cfg.block_m))
    with device_ctx(q):
        _attention_fwd_kernel[grid](
            q, k, v, out, lse,
            *_strides(q), *_strides(k), *_strides(v), *_strides(out),
            H, T, D, qk_scale,
            CAUSAL=causal, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
            EVEN_D=(block_d == D), PRECISION=_precision(q.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return out, lse


def attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, causal: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (contiguous, in q.dtype) from the upstream gradient ``do`` (any strides)."""
    B, H, T, D = q.shape
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dv = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if dq.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    interp = interpret_mode()
    block_d = _cfg.padded_head_dim(D)
    even_d = block_d == D
    precision = _precision(q.dtype)
    sm_scale = 1.0 / math.sqrt(D)
    qk_scale = sm_scale * _LOG2E_F
    delta = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    arch = cuda_arch(q.device)
    cfg_kv = _cfg.tile_config("dkdv", D, T, q.dtype, interp, arch=arch)
    cfg_q = _cfg.tile_config("dq", D, T, q.dtype, interp, arch=arch)
    with device_ctx(q):
        # dQ first: it also writes delta = rowsum(dO * O), which dK/dV reads.
        _attention_bwd_dq_kernel[(B * H, triton.cdiv(T, cfg_q.block_m))](
            q, k, v, out, do, dq, lse, delta,
            *_strides(q), *_strides(k), *_strides(v), *_strides(out), *_strides(do), *_strides(dq),
            H, T, D, qk_scale, sm_scale,
            CAUSAL=causal, BLOCK_M=cfg_q.block_m, BLOCK_N=cfg_q.block_n, BLOCK_D=block_d,
            EVEN_D=even_d, PRECISION=precision, num_warps=cfg_q.num_warps, num_stages=cfg_q.num_stages,
        )
        _attention_bwd_dkdv_kernel[(B * H, triton.cdiv(T, cfg_kv.block_n))](
            q, k, v, do, dk, dv, lse, delta,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
            H, T, D, qk_scale, sm_scale,
            CAUSAL=causal, BLOCK_M=cfg_kv.block_m, BLOCK_N=cfg_kv.block_n, BLOCK_D=block_d,
            EVEN_D=even_d, PRECISION=precision, num_warps=cfg_kv.num_warps, num_stages=cfg_kv.num_stages,
        )
    return dq, dk, dv


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> None:
    """What these kernels cannot take, beyond dtype (the caller has checked shapes and devices)."""
    B, H, T, D = q.shape
    if D > MAX_HEAD_DIM:
        raise ValueError(f"triton attention supports head dims up to {MAX_HEAD_DIM}, got {D}; "
                         f"use backend='torch' or fewer, wider heads")
    if B * H > _GRID_X_LIMIT:
        raise ValueError(f"triton attention supports at most {_GRID_X_LIMIT} batch rows x heads, got B={B}, H={H}")
    if triton.cdiv(T, _MIN_BLOCK) > _GRID_Y_LIMIT:
        raise ValueError(f"triton attention supports sequences up to {_GRID_Y_LIMIT * _MIN_BLOCK} tokens, got T={T}")
