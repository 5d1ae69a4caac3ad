"""Fused linear + cross-entropy in Triton: the loss of ``x @ W.T (+ b)`` without the (N, V) logits.

Three layers (Liger style):

1. ``_linear_cross_entropy_fwd_kernel``: one program per row of a logits chunk. A first pass
   over the row in ``BLOCK_V`` blocks keeps an online log-sum-exp (running max and rescaled sum,
   fp32) and the row's loss ``lse - z[target]``; a second pass overwrites the row, in place, with
   its gradient ``(softmax - onehot(target)) * scale`` (scale = 1/kept targets for "mean", 1 for
   "sum", read from a device scalar so counting the kept targets needs no host sync). Ignored
   rows get loss 0 and a zero gradient.
2. Launcher ``linear_cross_entropy_fwd``: rows go through in chunks; per chunk cuBLAS computes
   the logits into one preallocated buffer (``torch.mm``/``addmm`` ``out=``), the kernel turns
   them into their gradient, and cuBLAS again gives ``dx = G W`` and ``dW += G^T x`` (fp32
   accumulation; ``db += sum(G)``). The gradients are complete after the forward; the backward
   only scales them by the upstream gradient. Chunks have about as many logits as x has
   elements, so the extra memory stays near the size of x instead of N x V.
3. barkgpt/_triton.py registers ``linear_cross_entropy_fwd`` / ``_bwd`` against the op's
   declaration (barkgpt/opdecls.py): torch.library ops with fake kernels and autograd.

Targets other than ignore_index outside [0, V) raise IndexError on the host before any launch
(the declaration's kernel_check: one reduction, a sync); while a CUDA graph is captured that
check cannot run and the kernel treats such targets as ignored instead of reading outside the row.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._utils import device_ctx, warps_for

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_MAX_BLOCK_V = 4096  # columns per block of the row loops
_MIN_CHUNK_ROWS = 128  # below this the cuBLAS calls per chunk are too small to fill a GPU


# ---- 1. kernel -----------------------------------------------------------------------------

@triton.jit
def _linear_cross_entropy_fwd_kernel(
    Z,  # (R, V) logits chunk, row stride stride_z; overwritten with the gradient when GRAD
    TGT,  # (R,) int64 targets of the chunk's rows
    LOSS,  # (R,) fp32 per-row loss (0 for ignored rows)
    SCALE,  # (1,) fp32: 1 / kept targets ("mean") or 1 ("sum")
    V, stride_z, ignore_index,
    GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_z
    t = tl.load(TGT + row)
    keep = (t != ignore_index) & (t >= 0) & (t < V)
    t_safe = tl.where(keep, t, 0)
    cols0 = tl.arange(0, BLOCK_V)
    # Online log-sum-exp: m is the running max, s the sum of exp(z - m) so far.
    m = tl.max(tl.full([BLOCK_V], -float("inf"), tl.float32), 0)
    s = tl.sum(tl.zeros([BLOCK_V], tl.float32), 0)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        z = tl.load(z_row + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        m = m_new
    zt = tl.load(z_row + t_safe).to(tl.float32)
    lse = m + tl.log(s)
    tl.store(LOSS + row, tl.where(keep, lse - zt, 0.0))
    if GRAD:
        sc = tl.load(SCALE)
        k = tl.where(keep, sc / s, 0.0)
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            col_ok = cols < V
            z = tl.load(z_row + cols, mask=col_ok, other=0.0).to(tl.float32)
            g = tl.exp(z - m) * k
            g = tl.where((cols == t) & keep, g - sc, g)
            tl.store(z_row + cols, g.to(Z.dtype.element_ty), mask=col_ok)


# ---- 2. launcher ---------------------------------------------------------------------------

def _chunk_rows(N: int, V: int, C: int, requested: int) -> int:
    if N <= 0:
        return 1
    if requested > 0:
        return min(requested, N)
    # About as many logits per chunk as x has elements, at least _MIN_CHUNK_ROWS rows.
    return min(N, max(_MIN_CHUNK_ROWS, triton.next_power_of_2(triton.cdiv(N * max(C, 1), V))))


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, accumulated into the fp32 ``acc`` in place (no weight-sized temporary)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if a.is_cuda:
        try:  # cuBLAS: half inputs, fp32 accumulation and output, beta = 1 on acc itself
            torch.ops.aten.addmm.dtype_out(acc, a, b, torch.float32, out=acc)
            return
        except (RuntimeError, TypeError, AttributeError):  # older torch: upcast the chunk
            pass
    acc.addmm_(a.float(), b.float())


def linear_cross_entropy_fwd_ex(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                bias: Optional[torch.Tensor], ignore_index: int, reduction: str,
                                compute_grad: bool, chunk_rows: int = 0
                                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dx, dweight, dbias): the 0-d fp32 loss and its gradients (x's, weight's and bias's
    dtypes), or empty (0,) gradients when not ``compute_grad`` (dbias also without a bias).
    The caller has checked the targets' range (the declaration's kernel_check)."""
    V, C = weight.shape
    N = targets.numel()
    dev = x.device
    cdt = x.dtype if bias is None else torch.promote_types(x.dtype, bias.dtype)
    cdt = torch.promote_types(cdt, weight.dtype)
    x2 = x.reshape(N, C)
    W = weight.to(cdt)
    b = bias.to(cdt) if bias is not None else None
    t = targets.reshape(N).to(torch.int64)
    if reduction == "mean":
        scale = 1.0 / (t != ignore_index).sum().clamp_min(1).to(torch.float32).reshape(1)
    else:
        scale = torch.ones(1, dtype=torch.float32, device=dev)
    row_loss = torch.empty(N, dtype=torch.float32, device=dev)
    grad = bool(compute_grad)
    dx = torch.empty((N, C) if grad else (0,), dtype=x.dtype, device=dev)
    dw = torch.zeros((V, C), dtype=torch.float32, device=dev) if grad else None
    db = torch.zeros(V, dtype=torch.float32, device=dev) if grad and bias is not None else None
    R = _chunk_rows(N, V, C, chunk_rows)
    buf = torch.empty((R if N > 0 else 0, V), dtype=cdt, device=dev)
    block_v = min(_MAX_BLOCK_V, triton.next_power_of_2(V))
    with device_ctx(x):
        for r0 in range(0, N, R):
            r = min(R, N - r0)
            xc = x2[r0:r0 + r].to(cdt)
            zc = buf[:r]
            if C == 0:
                zc.copy_(b.expand(r, V)) if b is not None else zc.zero_()
            elif b is not None:
                torch.addmm(b, xc, W.t(), out=zc)
            else:
                torch.mm(xc, W.t(), out=zc)
            _linear_cross_entropy_fwd_kernel[(r,)](
                zc, t[r0:r0 + r], row_loss[r0:r0 + r], scale, V, zc.stride(0), ignore_index,
                GRAD=grad, BLOCK_V=block_v, num_warps=warps_for(block_v, 8))
            if not grad:
                continue
            if C > 0:
                if x.dtype == cdt:
                    torch.mm(zc, W, out=dx[r0:r0 + r])
                else:
                    dx[r0:r0 + r] = torch.mm(zc, W)
                _addmm_fp32_(dw, zc.t(), xc)
            if db is not None:
                db += zc.sum(0, dtype=torch.float32)
    loss = row_loss.sum() * scale[0] if N > 0 else torch.zeros((), dtype=torch.float32, device=dev)
    if not grad:
        db_like = bias if bias is not None else weight
        return loss, dx, weight.new_empty((0,)), db_like.new_empty((0,))
    dbias = db.to(bias.dtype) if bias is not None else weight.new_empty((0,))
    return loss, dx.view(x.shape), dw.to(weight.dtype), dbias


def linear_cross_entropy_fwd(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             bias: Optional[torch.Tensor], ignore_index: int, reduction: str
                             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The declared forward kernel: the loss and all its gradients, chunk size chosen from V."""
    return linear_cross_entropy_fwd_ex(x, weight, targets, bias, ignore_index, reduction, True, 0)


def linear_cross_entropy_bwd(grad_loss: torch.Tensor, dx: torch.Tensor, dweight: torch.Tensor,
                             dbias: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The declared backward kernel: the forward's gradients times the upstream gradient."""
    return dx * grad_loss, dweight * grad_loss, dbias * grad_loss
