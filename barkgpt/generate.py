"""Sampling: temperature, top-k, top-p (nucleus) or greedy."""

from __future__ import annotations

import math
from typing import Optional

import torch


def sample_next(logits: torch.Tensor, temperature: float = 0.8, top_k: Optional[int] = 40,
                top_p: Optional[float] = None, greedy: bool = False,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V).

    Samples from ``softmax(logits / temperature)`` after the top-k / top-p cuts. ``temperature``
    is a finite number >= 0; 0 (or ``greedy``) takes the most likely token. Any positive
    temperature, however small (1e-40, 1e-320), samples its exact distribution without
    overflowing: as temperature -> 0 that becomes the most likely token (tokens tied for the
    top logit share the probability equally), so tiny temperatures behave like greedy.
    """
    if greedy or temperature == 0:
        return logits.argmax(dim=-1)
    if not temperature > 0 or math.isinf(temperature):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    # softmax is unchanged by subtracting the row maximum; after it every logit is <= 0, so
    # dividing by a tiny temperature gives -inf (probability 0) instead of overflowing to +inf
    # (inf - inf = nan in softmax). The maximum itself stays 0, also when the temperature
    # underflows to 0 in the logits' dtype (0 / 0 would be nan).
    # The top-k cut is taken on the logits themselves, before the temperature: the kept tokens
    # are exactly those whose logit is >= the k-th largest (after scaling, rounding could tie a
    # smaller logit with the k-th and keep it too). It also means only the k largest logits
    # matter, which the screened head of cached generation relies on (ops.head_topk_logits).
    if top_k is not None and top_k > 0 and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    logits = torch.where(shifted == 0, shifted, shifted / temperature)
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) > top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
