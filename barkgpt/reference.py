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

Backward is PyTorch autograd through these definitions.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ._checks import check_token_ids


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   eps: float = 1e-5) -> torch.Tensor:
    n = x.shape[-1]
    acc = torch.promote_types(x.dtype, torch.float32)  # at least fp32 math (float64 stays float64)
    b = bias.to(acc) if bias is not None else None
    return F.layer_norm(x.to(acc), (n,), weight.to(acc), b, eps).to(x.dtype)


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


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


def layer_norm_math(x, weight, bias, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + eps) * weight
    return y + bias if bias is not None else y
