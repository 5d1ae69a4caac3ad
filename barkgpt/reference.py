"""Pure-PyTorch reference ops: the fallback backend, the test oracle and the benchmark baseline.

Semantics every backend must match:

* ``layer_norm_ref(x, weight, bias, eps)``: normalize over the last dim of ``x`` (any rank),
  math in fp32 (fp64 for fp64), result in ``x.dtype``. ``bias`` may be None.
* ``attention_ref(q, k, v, causal)``: ``(B, H, T, D)`` inputs, scale ``1/sqrt(D)``,
  the meaning of ``F.scaled_dot_product_attention`` (no dropout).
* ``embedding_add_ref(idx, tok_weight, pos_weight)``: ``tok_weight[idx] + pos_weight[:T]``
  for ``idx`` of shape ``(B, T)``.

Backward is PyTorch autograd through these definitions.
"""

from __future__ import annotations

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
