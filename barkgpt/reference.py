"""Pure-PyTorch reference ops: the fallback backend, the test oracle and the benchmark baseline.

Semantics every backend must match:

* ``layer_norm_ref(x, weight, bias, eps)``: normalize over the last dim of ``x`` (any rank),
  math in fp32 (fp64 for fp64), result in ``x.dtype``. ``bias`` may be None.
* ``attention_ref(q, k, v, causal)``: ``(B, H, T, D)`` inputs, scale ``1/sqrt(D)``,
  the meaning of ``F.scaled_dot_product_attention`` (no dropout).
* ``cached_attention_ref(q, k, v, start, offset)``: attention of queries ``(B, H, Tq, D)`` at
  positions ``offset .. offset + Tq - 1`` against a key/value cache ``(B, H, S, D)`` (S >=
  ``offset + Tq``, keys past ``offset + Tq`` unused): query ``i`` of row ``b`` sees keys ``j`` with
  ``start[b] <= j <= offset + i`` (``start`` None: 0), scale ``1/sqrt(D)``; a query that sees no
  key gives zeros. Math in fp32 (fp64 for fp64), result in ``q.dtype``. Inference only.
* ``embedding_add_ref(idx, tok_weight, pos_weight)``: ``tok_weight[idx] + pos_weight[:T]``
  for ``idx`` of shape ``(B, T)``.
* ``linear_cross_entropy_ref(x, weight, targets, bias, ignore_index, reduction)``: the
  cross-entropy of ``x @ weight.T (+ bias)`` against ``targets``, math in fp32 (fp64 for fp64),
  a 0-d loss in that type; "mean" is over targets != ignore_index (0 when all are ignored).

Backward is PyTorch autograd through these definitions.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ._checks import check_targets, check_token_ids


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   eps: float = 1e-5) -> torch.Tensor:
    n = x.shape[-1]
    acc = torch.promote_types(x.dtype, torch.float32)  # at least fp32 math (float64 stays float64)
    b = bias.to(acc) if bias is not None else None
    return F.layer_norm(x.to(acc), (n,), weight.to(acc), b, eps).to(x.dtype)


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    # SDPA's fused kernels treat a query row whose scores are all NaN or -inf as fully masked and
    # return zeros for it; the definition (and the cpp and triton backends) give NaN, so bad
    # input shows instead of being hidden. Such a row is exactly a query row with a non-finite
    # element (finite q and k give finite scores). x - x is 0 for every finite x and NaN for
    # NaN/inf, so the row sums below are exactly 0 or NaN (no overflow) and adding them changes
    # nothing else: two cheap O(B*H*T*D) passes and an add next to SDPA's O(B*H*T*T*D), no
    # host sync, and on a detached q, so autograd adds only the add's pass-through.
    qd = q.detach()
    return out + (qd - qd).sum(dim=-1, keepdim=True)  # (B, H, T, 1): 0, or NaN for a bad row


def cached_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: Optional[torch.Tensor],
                         offset: int) -> torch.Tensor:
    Tq, D = q.shape[-2], q.shape[-1]
    L = offset + Tq  # keys in use
    acc = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf = q.to(acc), k[:, :, :L].to(acc), v[:, :, :L].to(acc)
    s = (qf @ kf.transpose(-2, -1)) * (1.0 / math.sqrt(D))  # (B, H, Tq, L)
    kpos = torch.arange(L, device=q.device)
    ok = kpos[None, :] <= (offset + torch.arange(Tq, device=q.device))[:, None]  # (Tq, L)
    ok = ok[None, None]
    if start is not None:
        ok = ok & (kpos[None, None, None, :] >= start.to(q.device)[:, None, None, None])
    s = s.masked_fill(~ok, float("-inf"))
    any_key = ok.any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(~any_key, 0.0), dim=-1) * any_key  # no key: zeros, not NaN
    return (p @ vf).to(q.dtype)


def embedding_add_ref(idx: torch.Tensor, tok_weight: torch.Tensor, pos_weight: torch.Tensor) -> torch.Tensor:
    check_token_ids(idx, tok_weight.shape[0])
    T = idx.shape[-1]
    return F.embedding(idx, tok_weight) + pos_weight[:T]


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ weight.T + bias``: torch's own ``F.linear``."""
    return F.linear(x, weight, bias)


def linear_cross_entropy_ref(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                             reduction: str = "mean") -> torch.Tensor:
    # Materializes the (N, V) logits: the oracle and the plain path for tiny vocabularies.
    V = weight.shape[0]
    check_targets(targets, V, ignore_index)
    acc = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)
    logits = x.reshape(-1, x.shape[-1]).to(acc) @ weight.to(acc).t()
    if bias is not None:
        logits = logits + bias.to(acc)
    t = targets.reshape(-1).long()
    loss = F.cross_entropy(logits, t, ignore_index=ignore_index, reduction="sum")
    if reduction == "sum":
        return loss
    # F.cross_entropy's "mean" gives nan (0 / 0) when every target is ignored; this gives 0.
    return loss / (t != ignore_index).sum().clamp_min(1).to(acc)


# --- explicit textbook forms, used by the tests as an independent oracle -------------------

def attention_math(q, k, v, causal=True):
    """softmax(q k^T / sqrt(D) + mask) v, materializing the T x T matrix."""
    D = q.shape[-1]
    s = (q @ k.transpose(-2, -1)) / (D ** 0.5)
    if causal:
        T, S = q.shape[-2], k.shape[-2]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def linear_cross_entropy_math(x, weight, targets, bias=None, ignore_index=-100, reduction="mean"):
    """-log softmax(x W^T + b)[target], by hand (log-sum-exp), summed or averaged over kept rows."""
    z = x.reshape(-1, x.shape[-1]) @ weight.t()
    if bias is not None:
        z = z + bias
    t = targets.reshape(-1)
    keep = t != ignore_index
    m = z.max(-1, keepdim=True).values.detach()
    lse = (z - m).exp().sum(-1).log() + m.squeeze(-1)
    zt = z.gather(1, torch.where(keep, t, 0)[:, None]).squeeze(1)
    total = torch.where(keep, lse - zt, torch.zeros_like(lse)).sum()
    return total if reduction == "sum" else total / max(int(keep.sum()), 1)


def layer_norm_math(x, weight, bias, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + eps) * weight
    return y + bias if bias is not None else y
