"""LayerNorm over the last dimension in Triton: forward and backward (dx, dweight, dbias).

Three layers (Liger style):

1. ``@triton.jit`` kernels. Rows are processed in tiles of ``BLOCK_M`` rows x ``BLOCK_N``
   columns, so narrow widths (8, 32, 128) give each program many rows instead of a mostly
   idle single row. A row up to ``_MAX_FUSED_N`` columns stays in registers; wider rows loop
   over column chunks (mean pass, centred-variance pass, normalize pass). All math is fp32
   and masked lanes are zeroed before every reduction. The forward saves mean and rstd (fp32)
   per row. The backward runs a persistent grid of G programs; each walks row tiles
   ``pid, pid + G, ...`` in a fixed order and keeps its dweight/dbias partial sums in fp32
   (registers, or its own row of the partial buffer for chunked widths); a second kernel
   sums the G partials in a fixed order. No atomics: repeated backward passes are bitwise equal.
2. Launchers ``layer_norm_fwd`` / ``layer_norm_bwd``: flatten to rows (a view when the
   strides allow; any row and column stride goes to the kernel), pick tiles with a fixed
   heuristic (no autotune, so the first call on a shape equals the second), allocate, and
   launch on the tensor's device.
3. The ``torch.library`` ops ``barkgpt_triton::layer_norm_fwd`` / ``layer_norm_bwd``, their fake
   kernels and autograd are wired from the op's declaration by barkgpt/_triton.py.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._utils import as_rows, device_ctx, pow2_floor, resident_blocks, sm_count, sum_partials, warps_for

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Widest row kept whole in registers; wider rows loop over chunks (tests lower it to cover
# the chunked path at small widths).
_MAX_FUSED_N = 8192
_LOOP_BLOCK_N_FWD = 4096
_LOOP_BLOCK_N_BWD = 1024
# Elements per program tile: the backward keeps ~5 fp32 values per element live.
_FWD_TILE = 4096
_BWD_TILE = 2048
# Rows per tile in the chunked backward: each tile read-modify-writes the program's partial
# row once per chunk, so several rows share that traffic.
_LOOP_BWD_ROWS = 4


# ---- 1. kernels ----------------------------------------------------------------------------

@triton.jit
def _layer_norm_fwd_kernel(
    X,  # (M, N) any strides
    W,  # (N,) contiguous
    B,  # (N,) contiguous, or a dummy when not HAS_BIAS
    Y,  # (M, N) contiguous, x.dtype
    MEAN, RSTD,  # (M,) fp32
    stride_xm, stride_xn, M, N, eps,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols0 = tl.arange(0, BLOCK_N)
    x_rows = X + rows[:, None] * stride_xm
    y_rows = Y + rows[:, None] * N
    if SINGLE:
        col_ok = cols0 < N
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_rows + cols0[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, 1) / N
        xc = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, 1) / N
        rstd = tl.rsqrt(var + eps)
        w = tl.load(W + cols0, mask=col_ok, other=0.0).to(tl.float32)
        y = xc * rstd[:, None] * w[None, :]
        if HAS_BIAS:
            y += tl.load(B + cols0, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_rows + cols0[None, :], y.to(Y.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + cols0
            mask = row_ok[:, None] & (cols < N)[None, :]
            acc += tl.load(x_rows + cols[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(acc, 1) / N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + cols0
            mask = row_ok[:, None] & (cols < N)[None, :]
            x = tl.load(x_rows + cols[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
            xc = tl.where(mask, x - mean[:, None], 0.0)
            acc += xc * xc
        rstd = tl.rsqrt(tl.sum(acc, 1) / N + eps)
        for start in range(0, N, BLOCK_N):
            cols = start + cols0
            col_ok = cols < N
            mask = row_ok[:, None] & col_ok[None, :]
            x = tl.load(x_rows + cols[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
            y = (x - mean[:, None]) * rstd[:, None] * w[None, :]
            if HAS_BIAS:
                y += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(y_rows + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _layer_norm_bwd_kernel(
    DY,  # (M, N) any strides, x.dtype
    X,  # (M, N) any strides
    W,  # (N,) contiguous
    MEAN, RSTD,  # (M,) fp32
    DX,  # (M, N) contiguous, x.dtype
    PART,  # (G, K) fp32 partials, one row per program: dweight in [0, N), dbias in [N, 2N)
           # when HAS_BIAS (K = 2N, else K = N); zeroed beforehand when not SINGLE
    stride_dym, stride_dyn, stride_xm, stride_xn, M, N, K,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE: tl.constexpr,
):
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    n_tiles = tl.cdiv(M, BLOCK_M)
    cols0 = tl.arange(0, BLOCK_N)
    dw_row = PART + pid.to(tl.int64) * K
    db_row = dw_row + N
    if SINGLE:
        col_ok = cols0 < N
        w = tl.load(W + cols0, mask=col_ok, other=0.0).to(tl.float32)
        # 2-D accumulators: the cross-row sum happens once, after the loop.
        dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for tile in range(pid, n_tiles, n_prog):
            rows = tl.cast(tile, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = rows < M
            mask = row_ok[:, None] & col_ok[None, :]
            x = tl.load(X + rows[:, None] * stride_xm + cols0[None, :] * stride_xn,
                        mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows[:, None] * stride_dym + cols0[None, :] * stride_dyn,
                         mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            wdy = dy * w[None, :]
            c1 = tl.sum(xhat * wdy, 1) / N
            c2 = tl.sum(wdy, 1) / N
            dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
            tl.store(DX + rows[:, None] * N + cols0[None, :], dx.to(DX.dtype.element_ty), mask=mask)
            dw_acc += dy * xhat
            if HAS_BIAS:
                db_acc += dy
        tl.store(dw_row + cols0, tl.sum(dw_acc, 0), mask=col_ok)
        if HAS_BIAS:
            tl.store(db_row + cols0, tl.sum(db_acc, 0), mask=col_ok)
    else:
        for tile in range(pid, n_tiles, n_prog):
            rows = tl.cast(tile, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = rows < M
            mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
            acc1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                cols = start + cols0
                col_ok = cols < N
                mask = row_ok[:, None] & col_ok[None, :]
                x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xn,
                            mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
                             mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
                xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
                wdy = dy * w[None, :]
                acc1 += xhat * wdy
                acc2 += wdy
            c1 = tl.sum(acc1, 1) / N
            c2 = tl.sum(acc2, 1) / N
            for start in range(0, N, BLOCK_N):
                cols = start + cols0
                col_ok = cols < N
                mask = row_ok[:, None] & col_ok[None, :]
                x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xn,
                            mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
                             mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
                xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
                dx = (dy * w[None, :] - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
                tl.store(DX + rows[:, None] * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
                # This program owns its partial row: plain read-modify-write, no atomics.
                dw_ptrs = dw_row + cols
                tl.store(dw_ptrs, tl.load(dw_ptrs, mask=col_ok, other=0.0) + tl.sum(dy * xhat, 0), mask=col_ok)
                if HAS_BIAS:
                    db_ptrs = db_row + cols
                    tl.store(db_ptrs, tl.load(db_ptrs, mask=col_ok, other=0.0) + tl.sum(dy, 0), mask=col_ok)
            # The next tile's read of the partial row may run on other threads than this store.
            tl.debug_barrier()


# ---- 2. launchers --------------------------------------------------------------------------

class _Config(NamedTuple):
    block_m: int
    block_n: int
    single: bool
    num_warps: int


def _fwd_config(M: int, N: int, device: torch.device) -> _Config:
    n_pow2 = triton.next_power_of_2(N)
    if n_pow2 <= _MAX_FUSED_N:
        block_n, single = n_pow2, True
    else:
        block_n, single = min(_LOOP_BLOCK_N_FWD, _MAX_FUSED_N), False
    # Many rows per program for narrow widths, but keep ~2 programs per SM when rows allow.
    block_m = max(1, min(_FWD_TILE // block_n, pow2_floor(triton.cdiv(M, 2 * sm_count(device)))))
    return _Config(block_m, block_n, single, warps_for(block_m * block_n))


# Blocks per SM assumed where the compiled kernel cannot be asked (the interpreter): 8 elements
# per thread compile to ~76 registers (sm_90), and 65536 / (76 x 256 threads) holds 3 blocks of
# 8 warps, not the 4 a 64-register budget would.
_BWD_WARPS_PER_SM = 24


def _bwd_config(M: int, N: int, device, blocks_per_sm: Optional[int] = None) -> Tuple[_Config, int]:
    """Tile config and the number of persistent programs G (= partial-sum rows).

    The backward keeps x, dy, xhat, w*dy and two accumulators live per element (8 elements per
    thread). G is ``blocks_per_sm`` (what the compiled kernel's registers allow, from
    ``_utils.resident_blocks``; by default ``_BWD_WARPS_PER_SM`` warps' worth) times the SMs,
    so all programs run in one wave; each then walks its share of row tiles."""
    n_pow2 = triton.next_power_of_2(N)
    sms = sm_count(device)
    if n_pow2 <= _MAX_FUSED_N:
        block_n, single = n_pow2, True
        block_m = max(1, min(_BWD_TILE // block_n, pow2_floor(triton.cdiv(M, 4 * sms))))
    else:
        block_n, single = min(_LOOP_BLOCK_N_BWD, _MAX_FUSED_N), False
        block_m = max(1, min(_LOOP_BWD_ROWS, pow2_floor(triton.cdiv(M, 4 * sms))))
    warps = warps_for(block_m * block_n, max_warps=32, per_thread=8)
    if blocks_per_sm is None:
        blocks_per_sm = max(1, _BWD_WARPS_PER_SM // warps)
    grid = max(1, min(sms * blocks_per_sm, triton.cdiv(M, block_m)))
    return _Config(block_m, block_n, single, warps), grid


def layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``y`` (x.shape, x.dtype, contiguous) and fp32 ``mean``, ``rstd`` of shape x.shape[:-1]."""
    N = x.shape[-1]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mean = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if y.numel() == 0:
        return y, mean.zero_(), rstd.zero_()
    x2 = as_rows(x, N)
    M = x2.shape[0]
    w = weight.contiguous()
    b = bias.contiguous() if bias is not None else w
    cfg = _fwd_config(M, N, x.device)
    with device_ctx(x):
        _layer_norm_fwd_kernel[(triton.cdiv(M, cfg.block_m),)](
            x2, w, b, y, mean, rstd, x2.stride(0), x2.stride(1), M, N, eps,
            HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SINGLE=cfg.single,
            num_warps=cfg.num_warps)
    return y, mean, rstd


def layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   mean: torch.Tensor, rstd: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx (x.dtype, contiguous), dweight (weight.dtype), dbias (bias.dtype; empty if bias is None)."""
    N = x.shape[-1]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dw = torch.empty(N, dtype=weight.dtype, device=x.device)
    # Without a bias, dbias is zeros of weight's shape (the declared contract; the caller drops it).
    db = torch.empty(N, dtype=(bias if bias is not None else weight).dtype, device=x.device)
    if bias is None or dx.numel() == 0:
        db.zero_()
    if dx.numel() == 0:
        return dx, dw.zero_(), db
    x2, dy2 = as_rows(x, N), as_rows(dy, N)
    M = x2.shape[0]
    cfg, _ = _bwd_config(M, N, x.device)
    K = 2 * N if bias is not None else N
    w = weight.contiguous()
    meta = dict(HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SINGLE=cfg.single,
                num_warps=cfg.num_warps)
    with device_ctx(x):
        # The partial buffer only sizes the grid; a stand-in of the launch's dtype specializes alike.
        probe = (dy2, x2, w, mean, rstd, dx, rstd, dy2.stride(0), dy2.stride(1), x2.stride(0), x2.stride(1), M, N, K)
        fits = resident_blocks(_layer_norm_bwd_kernel, probe, meta, x.device, max(1, _BWD_WARPS_PER_SM // cfg.num_warps))
        cfg, grid = _bwd_config(M, N, x.device, fits)
        part = (torch.empty if cfg.single else torch.zeros)((grid, K), dtype=torch.float32, device=x.device)
        _layer_norm_bwd_kernel[(grid,)](
            dy2, x2, w, mean, rstd, dx, part,
            dy2.stride(0), dy2.stride(1), x2.stride(0), x2.stride(1), M, N, K, **meta)
    sum_partials(part, dw, db if bias is not None else None)
    return dx, dw, db
