"""Public functional ops and their backend dispatch.

Each op has one entry here and one reference in ``reference.py``. A backend is a module
exposing ``layer_norm(x, weight, bias, eps)``, ``attention(q, k, v, causal)`` and
``embedding_add(idx, tok_weight, pos_weight)`` (differentiable, registered with
``torch.library`` so ``torch.compile(fullgraph=True)`` sees them as single ops), plus
``unavailable_reason(device_type) -> str | None``.

Backends: ``"triton"`` (GPU; CPU tensors only under ``TRITON_INTERPRET=1``), ``"cpp"``
(CPU, the C++ extension in csrc/), ``"torch"`` (everywhere, reference.py).
Choice, first match wins: the ``backend=`` argument of the call, the model's ``backend``,
the ``BARKGPT_BACKEND`` environment variable, then auto: CUDA -> triton, CPU -> cpp,
falling back to torch with one warning. A backend named explicitly that cannot run raises
``BackendUnavailable`` with the reason; it never silently falls back.
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from types import ModuleType
from typing import Dict, List, Optional, Tuple, Union

import torch

from . import reference
from ._checks import check_attention_args, check_embedding_args, check_layer_norm_args

BACKENDS: Tuple[str, ...] = ("triton", "cpp", "torch")
ENV_VAR = "BARKGPT_BACKEND"
AUTO_NAMES = ("auto", "", None)


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


class _TorchBackend:
    """The pure-PyTorch backend: reference.py, differentiated by autograd."""

    @staticmethod
    def unavailable_reason(device_type: str) -> Optional[str]:
        return None

    layer_norm = staticmethod(reference.layer_norm_ref)
    attention = staticmethod(reference.attention_ref)
    embedding_add = staticmethod(reference.embedding_add_ref)


# Where the non-torch backends live; imported lazily (triton and the C++ build are slow/optional).
_BACKEND_MODULES = {"triton": "barkgpt.kernels", "cpp": "barkgpt._cpp"}

_lock = threading.Lock()
_loaded: Dict[str, Union[ModuleType, type]] = {"torch": _TorchBackend}
_load_errors: Dict[str, str] = {}
_warned: set = set()


def _load(name: str):
    """Return the backend module, or None with the reason recorded in _load_errors."""
    if name in _loaded:
        return _loaded[name]
    if name in _load_errors:
        return None
    with _lock:
        if name in _loaded or name in _load_errors:
            return _loaded.get(name)
        try:
            mod = importlib.import_module(_BACKEND_MODULES[name])
        except Exception as e:  # ImportError, build failures ... all mean "not available"
            _load_errors[name] = f"{type(e).__name__}: {e}"
            return None
        _loaded[name] = mod
    # A loaded backend's complaint about a setting (a bad BARKGPT_CPU_CACHE_MB), once, at the
    # caller: the backend stays loaded even where warnings are errors.
    if getattr(mod, "LOAD_WARNING", None):
        warnings.warn(mod.LOAD_WARNING, UserWarning, stacklevel=3)
    return mod


def _device_type(device) -> str:
    if device is None:
        return "cpu"
    return torch.device(device).type


def unavailable_reason(name: str, device="cpu") -> Optional[str]:
    """None if backend ``name`` can run on ``device``, else a sentence saying why not."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)} (or 'auto')")
    mod = _load(name)
    if mod is None:
        return f"the {name} backend failed to load ({_load_errors[name]})"
    return mod.unavailable_reason(_device_type(device))


def available_backends(device="cpu") -> List[str]:
    """Backends that can run on ``device`` (a torch.device, 'cpu', 'cuda', ...), in preference order."""
    return [b for b in BACKENDS if unavailable_reason(b, device) is None]


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def resolve_backend(backend: Optional[str], device) -> str:
    """The backend that will run for tensors on ``device`` given a requested name (or None)."""
    name = backend if backend not in AUTO_NAMES else os.environ.get(ENV_VAR) or None
    dev = _device_type(device)
    if name not in AUTO_NAMES:
        name = name.lower()
        reason = unavailable_reason(name, dev)
        if reason is not None:
            raise BackendUnavailable(f"backend {name!r} was requested for {dev} tensors but cannot run: {reason}")
        return name
    preferred = "triton" if dev == "cuda" else "cpp" if dev == "cpu" else "torch"
    if preferred == "torch":
        return "torch"
    reason = unavailable_reason(preferred, dev)
    if reason is None:
        return preferred
    _warn_once(f"{preferred}:{dev}", f"barkgpt: the {preferred} backend is unavailable for {dev} tensors "
                                     f"({reason}); using the torch backend")
    return "torch"


@torch.compiler.assume_constant_result
def _resolve_for_trace(backend: Optional[str], device_type: str) -> str:
    # torch.compile evaluates this eagerly while tracing (imports, locks and warnings cannot be
    # traced) and bakes the name into the graph: dispatch costs nothing in compiled code.
    return resolve_backend(backend, device_type)


_CPU_CACHE_FIELDS = ("idle_bytes", "idle_blocks", "reuses", "new_blocks", "limit_bytes", "live_bytes")


def cpu_cache_info() -> Dict[str, int]:
    """What the cpp kernels keep for reuse (csrc/outputs.cpp): bytes and blocks kept idle, how
    many outputs reused a block or needed a new one, the limit on idle bytes, and bytes held by
    live outputs. All zeros while the cpp backend has not been loaded."""
    if "cpp" not in _loaded:
        return dict.fromkeys(_CPU_CACHE_FIELDS, 0)
    return dict(zip(_CPU_CACHE_FIELDS, torch.ops.barkgpt_cpp.output_cache_info()))


def empty_cpu_cache() -> None:
    """Give the memory the cpp kernels keep for reuse (idle output blocks) back to the OS, like
    ``torch.cuda.empty_cache()``. Tensors in use are untouched."""
    if "cpp" in _loaded:
        torch.ops.barkgpt_cpp.output_cache_release()


def get_backend(backend: Optional[str], device):
    dev = _device_type(device)
    return _loaded[_resolve_for_trace(backend, dev)]


# ---- the ops -----------------------------------------------------------------------------

def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               eps: float = 1e-5, backend: Optional[str] = None) -> torch.Tensor:
    """LayerNorm over the last dim of ``x`` (any rank); fp32 math, result in ``x.dtype``."""
    check_layer_norm_args(x, weight, bias, eps)
    return get_backend(backend, x.device).layer_norm(x, weight, bias, float(eps))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              backend: Optional[str] = None) -> torch.Tensor:
    """Scaled dot-product self-attention on ``(B, H, T, D)`` tensors, scale ``1/sqrt(D)``."""
    check_attention_args(q, k, v)
    return get_backend(backend, q.device).attention(q, k, v, bool(causal))


def embedding_add(idx: torch.Tensor, tok_weight: torch.Tensor, pos_weight: torch.Tensor,
                  backend: Optional[str] = None) -> torch.Tensor:
    """``tok_weight[idx] + pos_weight[:T]`` for token ids ``idx`` of shape ``(B, T)``."""
    check_embedding_args(idx, tok_weight, pos_weight)
    return get_backend(backend, idx.device).embedding_add(idx, tok_weight, pos_weight)
