"""Argument-check helpers for the op declarations (barkgpt/opdecls.py): a user error gets a message,
not a deep traceback."""

from __future__ import annotations

from typing import Optional

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - old torch
        return False


def tensor(name: str, t) -> torch.Tensor:
    """``t`` if it is a tensor, else a TypeError naming the argument."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def same_device(op: str, **tensors: Optional[torch.Tensor]) -> None:
    """All given tensors (None skipped) on one device, else a ValueError listing them."""
    devs = {n: t.device for n, t in tensors.items() if t is not None}
    if len(set(devs.values())) > 1:
        desc = ", ".join(f"{n} on {d}" for n, d in devs.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {desc}; move them with .to(device)")


def float_tensor(op: str, name: str, t: torch.Tensor) -> None:
    """A floating dtype barkgpt's ops accept, else a TypeError."""
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}")


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


def check_targets(targets: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise if a target other than ``ignore_index`` is outside [0, num_classes). One reduction (a
    sync on GPU); skipped while torch.compile traces (the op body runs it at execution time) and
    while a CUDA graph is captured (no sync allowed; the kernels then treat such targets as ignored)."""
    if _is_compiling() or targets.numel() == 0:
        return
    if targets.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    bad = ((targets < 0) | (targets >= num_classes)) & (targets != ignore_index)
    if bool(bad.any()):
        value = int(targets[bad].flatten()[0])
        raise IndexError(f"target {value} is out of range for {num_classes} classes (valid targets are "
                         f"0..{num_classes - 1}, or ignore_index={ignore_index}); check the labels "
                         f"and vocab_size")
