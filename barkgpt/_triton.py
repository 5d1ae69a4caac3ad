"""The ``"triton"`` backend: the Triton kernels of ``barkgpt.kernels`` registered against the op
declarations (barkgpt/opdecls.py) as ``barkgpt_triton::<op>_fwd`` / ``_bwd`` ops.

Importing this module imports Triton (an ImportError marks the backend unavailable) and wires
each op with ``registry.register_kernels``: custom ops with the declared schemas, fake kernels and
autograd, so ``torch.compile(fullgraph=True)`` sees each op as one node. Runs on CUDA tensors,
and on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``, for tests).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from . import kernels, opdecls, reference
from .kernels import attention as _attention
from .kernels import cached_attention as _cached_attention
from .kernels import embedding as _embedding
from .kernels import layer_norm as _layer_norm
from .kernels import linear_cross_entropy as _lce
from .registry import Impl, register_impl, register_kernels

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
register_kernels(opdecls.CACHED_ATTENTION, "triton", _NS, _cached_attention.cached_attention_fwd, None,
                 dtypes=_cached_attention.SUPPORTED_DTYPES, precheck=_cached_attention.check_inputs,
                 failure=kernel_failure)


# linear_cross_entropy: the declared kernels under torch.compile; eager calls go through
# opdecls.linear_cross_entropy_eager (no gradient work under no_grad), after the target check.
def _lce_kernel(x, weight, targets, bias, ignore_index, reduction, compute_grad, chunk_rows):
    opdecls.LINEAR_CROSS_ENTROPY.kernel_check(x, weight, targets, bias, ignore_index, reduction)
    return _lce.linear_cross_entropy_fwd_ex(x, weight, targets, bias, ignore_index, reduction, compute_grad,
                                            chunk_rows)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                         reduction: str = "mean", chunk_rows: int = 0) -> torch.Tensor:
    """The triton backend's linear_cross_entropy; ``chunk_rows`` > 0 sets the rows per chunk (tests)."""
    if torch.compiler.is_compiling():
        return _lce_declared(x, weight, targets, bias, ignore_index, reduction)
    return opdecls.linear_cross_entropy_eager(_lce_kernel, x, weight, targets, bias, ignore_index, reduction,
                                              chunk_rows)


_lce_impl = register_kernels(opdecls.LINEAR_CROSS_ENTROPY, "triton", _NS, _lce.linear_cross_entropy_fwd,
                             _lce.linear_cross_entropy_bwd, dtypes=_lce.SUPPORTED_DTYPES,
                             failure=kernel_failure)
_lce_declared = _lce_impl.call
register_impl(dataclasses.replace(_lce_impl, call=linear_cross_entropy))


# linear: on the GPU the products belong to cuBLAS (what F.linear calls); a Triton GEMM would not
# beat it at these shapes, so the triton backend's linear is torch's.
register_impl(Impl("linear", "triton", reference.linear_ref,
                   (torch.float16, torch.bfloat16, torch.float32, torch.float64)))
