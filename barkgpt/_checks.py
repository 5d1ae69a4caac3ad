"""Argument checks shared by every backend: a user error gets a message, not a deep traceback."""

from __future__ import annotations

from typing import Optional

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - old torch
        return False


def _tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _same_device(op: str, **tensors: Optional[torch.Tensor]) -> None:
    devs = {n: t.device for n, t in tensors.items() if t is not None}
    if len(set(devs.values())) > 1:
        desc = ", ".join(f"{n} on {d}" for n, d in devs.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {desc}; move them with .to(device)")


def _float(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}")


def check_layer_norm_args(x, weight, bias, eps) -> None:
    op = "layer_norm"
    _tensor("x", x), _tensor("weight", weight)
    if bias is not None:
        _tensor("bias", bias)
    _same_device(op, x=x, weight=weight, bias=bias)
    _float(op, "x", x), _float(op, "weight", weight)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dimension, got a scalar")
    n = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != n:
        raise ValueError(f"{op}: weight must have shape ({n},) to match x's last dim, got {tuple(weight.shape)}")
    if bias is not None:
        _float(op, "bias", bias)
        if bias.dim() != 1 or bias.shape[0] != n:
            raise ValueError(f"{op}: bias must have shape ({n},) to match x's last dim, got {tuple(bias.shape)}")
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"{op}: eps must be a positive number, got {eps!r}")


def check_attention_args(q, k, v) -> None:
    op = "attention"
    for n, t in (("q", q), ("k", k), ("v", v)):
        _tensor(n, t)
        _float(op, n, t)
        if t.dim() != 4:
            raise ValueError(f"{op}: {n} must have shape (B, H, T, D), got {tuple(t.shape)}")
    _same_device(op, q=q, k=k, v=v)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{op}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"{op}: q, k, v must have the same shape (B, H, T, D), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")


def check_embedding_args(idx, tok_weight, pos_weight) -> None:
    op = "embedding_add"
    _tensor("idx", idx), _tensor("tok_weight", tok_weight), _tensor("pos_weight", pos_weight)
    _same_device(op, idx=idx, tok_weight=tok_weight, pos_weight=pos_weight)
    if idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: idx must hold integer token ids (int64 or int32), got {idx.dtype}")
    if idx.dim() != 2:
        raise ValueError(f"{op}: idx must have shape (B, T), got {tuple(idx.shape)}")
    _float(op, "tok_weight", tok_weight), _float(op, "pos_weight", pos_weight)
    if tok_weight.dim() != 2 or pos_weight.dim() != 2:
        raise ValueError(f"{op}: tok_weight and pos_weight must be 2-D tables, got "
                         f"{tuple(tok_weight.shape)} and {tuple(pos_weight.shape)}")
    if tok_weight.shape[1] != pos_weight.shape[1]:
        raise ValueError(f"{op}: token and position tables must have the same width, got "
                         f"{tok_weight.shape[1]} and {pos_weight.shape[1]}")
    if idx.shape[1] > pos_weight.shape[0]:
        raise ValueError(f"{op}: sequence length {idx.shape[1]} exceeds the position table's "
                         f"{pos_weight.shape[0]} rows (block_size); crop the input")


def check_token_ids(idx: torch.Tensor, vocab_size: int) -> None:
    """Raise if any id is outside [0, vocab_size). Costs one reduction (a sync on GPU);
    skipped while torch.compile traces (the op body then runs it at execution time) and while a
    CUDA graph is captured (no sync is allowed there: the kernels mask such ids instead)."""
    if _is_compiling() or idx.numel() == 0:
        return
    if idx.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    lo, hi = torch.aminmax(idx)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise IndexError(f"token id {bad} is out of range for a vocabulary of {vocab_size} "
                         f"(valid ids are 0..{vocab_size - 1}); check the tokenizer and vocab_size")
