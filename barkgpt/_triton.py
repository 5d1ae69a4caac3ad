"""The ``"triton"`` backend: the Triton kernels of ``barkgpt.kernels`` registered against the op
declarations (barkgpt/opdecls.py) as ``barkgpt_triton::<op>_fwd`` / ``_bwd`` ops.

Importing this module imports Triton (an ImportError marks the backend unavailable) and wires
each op with ``registry.register_kernels``: custom ops with the declared schemas, fake kernels and
autograd, so ``torch.compile(fullgraph=True)`` sees each op as one node. Runs on CUDA tensors,
and on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``, for tests).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import kernels, opdecls
from .kernels import attention as _attention
from .kernels import embedding as _embedding
from .kernels import layer_norm as _layer_norm
from .registry import register_kernels

_NS = "barkgpt_triton"


def unavailable_reason(device_type: str) -> Optional[str]:
    if device_type == "cuda":
        return None
    if device_type == "cpu" and kernels.interpret_mode():
        return None
    if device_type == "cpu":
        return "Triton kernels need a CUDA GPU (set TRITON_INTERPRET=1 to run them on CPU tensors, slowly)"
    return f"Triton kernels do not run on {device_type} tensors"


def kernel_failure(e: BaseException) -> Optional[str]:
    """Why a Triton kernel cannot run on this GPU, if ``e`` says so: a compile error (ptxas, an
    unsupported instruction or dtype for the architecture), too much shared memory or too many
    threads, or a CUDA error from the launch itself. None for anything else (a bug, bad inputs,
    out of memory), which the caller sees as is. Errors of the interpreter are never such a
    failure: it runs on the CPU."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import InterpreterError, OutOfResources

    kinds = (CompilationError, OutOfResources)
    ptxas = getattr(__import__("triton.runtime.errors", fromlist=["PTXASError"]), "PTXASError", None)
    if ptxas is not None:
        kinds += (ptxas,)
    if isinstance(e, InterpreterError):
        return None
    if isinstance(e, kinds) or (type(e) is RuntimeError and str(e).startswith("Triton Error [CUDA]")):
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"{type(e).__name__}: {first}"[:300]
    return None


def _attention_fake(q, k, v, causal):
    # the output is laid out (B, T, H, D) in memory: the model's head merge is then a view
    B, H, T, D = q.shape
    return _attention.empty_out(q), q.new_empty((B, H, T), dtype=torch.float32)


register_kernels(opdecls.LAYER_NORM, "triton", _NS, _layer_norm.layer_norm_fwd, _layer_norm.layer_norm_bwd,
                 dtypes=_layer_norm.SUPPORTED_DTYPES, failure=kernel_failure)
register_kernels(opdecls.ATTENTION, "triton", _NS, _attention.attention_fwd, _attention.attention_bwd,
                 dtypes=_attention.SUPPORTED_DTYPES, fake=_attention_fake, precheck=_attention.check_inputs,
                 failure=kernel_failure)
def _check_ids(idx, tok_weight, pos_weight):
    # On CUDA the forward kernel flags out-of-range ids and a later call raises: the host check
    # (a reduction read back with int()) would make every call wait for the GPU.
    if not _embedding.ids_checked_on_device(idx):
        opdecls.EMBEDDING_ADD.kernel_check(idx, tok_weight, pos_weight)


register_kernels(opdecls.EMBEDDING_ADD, "triton", _NS, _embedding.embedding_add_fwd,
                 _embedding.embedding_add_bwd, dtypes=_embedding.SUPPORTED_DTYPES,
                 prepare=opdecls.promote_tables, kernel_check=_check_ids, failure=kernel_failure)
