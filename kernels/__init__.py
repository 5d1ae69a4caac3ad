"""Triton GPU kernels, shipped as ``barkgpt.kernels``: launchers only.

Each op's file has its ``@triton.jit`` kernels and plain launchers ``<op>_fwd`` / ``<op>_bwd``
following the op's declared kernel contract (barkgpt/opdecls.py). This package imports nothing
from barkgpt: barkgpt/_triton.py (the ``"triton"`` backend) registers the launchers as
``torch.library`` ops with fake kernels and autograd.

Use relative imports only: this folder must never be importable as a top-level ``kernels``.
"""

from __future__ import annotations

import triton  # noqa: F401  (an ImportError here marks the backend unavailable)

from ._utils import interpret_mode  # noqa: E402,F401

if interpret_mode():
    from ._compat import patch_interpreter_index

    patch_interpreter_index()  # triton 3.6 + numpy >= 2.4 (see _compat)

from .attention import attention_bwd, attention_fwd  # noqa: E402,F401
from .cached_attention import cached_attention_fwd  # noqa: E402,F401
from .embedding import embedding_add_bwd, embedding_add_fwd  # noqa: E402,F401
from .layer_norm import layer_norm_bwd, layer_norm_fwd  # noqa: E402,F401
from .linear_cross_entropy import linear_cross_entropy_bwd, linear_cross_entropy_fwd  # noqa: E402,F401
