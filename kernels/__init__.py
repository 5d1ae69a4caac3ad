"""Triton GPU kernels, shipped as ``barkgpt.kernels`` (the ``"triton"`` backend of barkgpt.ops).

Use relative imports only: this folder must never be importable as a top-level ``kernels``.
"""

from __future__ import annotations

import os
from typing import Optional

import triton  # noqa: F401  (an ImportError here marks the backend unavailable)


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason(device_type: str) -> Optional[str]:
    if device_type == "cuda":
        return None
    if device_type == "cpu" and interpret_mode():
        return None
    if device_type == "cpu":
        return "Triton kernels need a CUDA GPU (set TRITON_INTERPRET=1 to run them on CPU tensors, slowly)"
    return f"Triton kernels do not run on {device_type} tensors"


from .attention import attention  # noqa: E402,F401
from .embedding import embedding_add  # noqa: E402,F401
from .layer_norm import layer_norm  # noqa: E402,F401
