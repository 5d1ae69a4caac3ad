"""Public functional ops and their backend dispatch, read from the op registry.

Every op declared in ``barkgpt/opdecls.py`` (``barkgpt.registry.OPS``) is a function here with
the declared arguments plus ``backend=``: ``layer_norm``, ``attention``, ``embedding_add``. Each
call runs the declaration's argument checks, then the implementation of the chosen backend.

Backends (``barkgpt.registry.BACKENDS``, declared below): ``"triton"`` (GPU; CPU tensors only
under ``TRITON_INTERPRET=1``), ``"cpp"`` (CPU, the C++ extension in csrc/), ``"torch"``
(everywhere: each declaration's reference). Choice, first match wins: the ``backend=`` argument
of the call, the model's ``backend``, the ``BARKGPT_BACKEND`` environment variable, then auto:
the backends whose ``auto_devices`` list the tensors' device type, in order (CUDA: triton,
CPU: cpp), then torch. Under auto, a backend that cannot run, lacks the op or does not take the
inputs' dtype is skipped with one warning. A backend named explicitly that cannot run or lacks
the op raises ``BackendUnavailable`` saying why (a dtype it does not take: TypeError); it never
silently falls back. A kernel that fails to compile or launch on the device (the backend's
``Impl.failure`` says which errors mean that: e.g. Triton's out-of-resources on a GPU with less
shared memory) marks the op failed for that backend on that device type: the call and every
later one under auto run on the next backend, with one warning giving the reason; a backend
named explicitly raises ``BackendUnavailable`` with it. (Eager calls; a compiled graph calls the
kernel directly.)
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from typing import Dict, List, Optional, Sequence

import torch

from . import opdecls, registry
from ._checks import FLOAT_DTYPES
from .registry import BackendSpec, BackendUnavailable, Impl, OpDecl

__all__ = ["BackendUnavailable", "BACKENDS", "ENV_VAR", "available_backends", "unavailable_reason",
           "resolve_backend", "cpu_cache_info", "empty_cpu_cache", "cpu_gemm_library",
           "use_cpu_hugepages", "cpu_hugepage_mode", "cpu_hugepages_enabled",
           "decode_layers", "decode_step", "decode_layers_available", "HeadScreen",
           "head_topk_logits", "head_topk_available"] + list(registry.OPS)

ENV_VAR = "BARKGPT_BACKEND"
AUTO_NAMES = ("auto", "", None)

# The backends, in auto-preference order. A new backend: one module that registers its Impls
# when imported (see barkgpt/_cpp.py) and one line here.
registry.declare_backend(BackendSpec("triton", "barkgpt._triton", ("cuda",),
                                     "Triton GPU kernels (kernels/); CPU tensors under TRITON_INTERPRET=1"))
registry.declare_backend(BackendSpec("cpp", "barkgpt._cpp", ("cpu",), "C++ CPU kernels (csrc/)"))
registry.declare_backend(BackendSpec("torch", None, ("*",), "pure PyTorch: each op's reference"))

BACKENDS = tuple(registry.BACKENDS)

# The torch backend: every declared op's reference, differentiated by autograd.
for _decl in registry.OPS.values():
    registry.register_impl(Impl(_decl.name, "torch", _decl.reference, FLOAT_DTYPES))

_lock = threading.Lock()
_loaded: Dict[str, object] = {"torch": None}  # backend name -> its module (None: no module)
_load_errors: Dict[str, str] = {}
_warned: set = set()


def _load(name: str) -> bool:
    """Import backend ``name``'s module (registering its Impls); False with the reason recorded."""
    if name in _loaded:
        return True
    if name in _load_errors:
        return False
    with _lock:
        if name in _loaded or name in _load_errors:
            return name in _loaded
        try:
            mod = importlib.import_module(registry.BACKENDS[name].module)
        except Exception as e:  # ImportError, build failures ... all mean "not available"
            _load_errors[name] = f"{type(e).__name__}: {e}"
            return False
        _loaded[name] = mod
    # A loaded backend's complaint about a setting (a bad BARKGPT_CPU_CACHE_MB), once, at the
    # caller: the backend stays loaded even where warnings are errors.
    if getattr(mod, "LOAD_WARNING", None):
        warnings.warn(mod.LOAD_WARNING, UserWarning, stacklevel=3)
    return True


def _device_type(device) -> str:
    if device is None:
        return "cpu"
    return torch.device(device).type


def _check_name(name: str) -> str:
    if name not in registry.BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)} (or 'auto')")
    return name


def unavailable_reason(name: str, device="cpu") -> Optional[str]:
    """None if backend ``name`` can run on ``device``, else a sentence saying why not."""
    _check_name(name)
    if not _load(name):
        return f"the {name} backend failed to load ({_load_errors[name]})"
    mod = _loaded[name]
    return None if mod is None else mod.unavailable_reason(_device_type(device))


def available_backends(device="cpu") -> List[str]:
    """Backends that can run on ``device`` (a torch.device, 'cpu', 'cuda', ...), in preference order."""
    return [b for b in BACKENDS if unavailable_reason(b, device) is None]


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def _auto_chain(dev: str) -> List[str]:
    chain = [b.name for b in registry.BACKENDS.values() if dev in b.auto_devices]
    return chain + [b.name for b in registry.BACKENDS.values() if "*" in b.auto_devices and b.name not in chain]


# (op, backend, device type) -> why that backend's kernel for the op failed to compile or launch
# here: auto dispatch skips it from then on (one warning), an explicit request raises.
_kernel_failures: Dict[tuple, str] = {}


def _why_not(name: str, op: Optional[str], dev: str, dtypes: Sequence[torch.dtype]) -> Optional[str]:
    """Why backend ``name`` cannot run op ``op`` here (None: it can). Loads the backend."""
    reason = unavailable_reason(name, dev)
    if reason is not None or op is None:
        return reason
    impl = registry.implementation(op, name)
    if impl is None:
        return f"the {name} backend has no {op} op"
    failed = _kernel_failures.get((op, name, dev))
    if failed is not None:
        return f"its {op} kernel failed to compile or launch on this {dev} device ({failed})"
    bad = [d for d in dtypes if d not in impl.dtypes]
    if bad:
        ok = ", ".join(str(d).replace("torch.", "") for d in impl.dtypes)
        return f"the {name} backend's {op} supports {ok}, not {str(bad[0]).replace('torch.', '')}"
    return None


def resolve_backend(backend: Optional[str], device, op: Optional[str] = None,
                    dtypes: Sequence[torch.dtype] = ()) -> str:
    """The backend that will run (op ``op`` on inputs of ``dtypes``) for tensors on ``device``
    given a requested name (or None: auto)."""
    name = backend if backend not in AUTO_NAMES else os.environ.get(ENV_VAR) or None
    dev = _device_type(device)
    if name not in AUTO_NAMES:
        name = _check_name(name.lower())
        reason = _why_not(name, None, dev, ())
        if reason is not None:
            raise BackendUnavailable(f"backend {name!r} was requested for {dev} tensors but cannot run: {reason}")
        if op is not None:
            reason = _why_not(name, op, dev, dtypes)
            if (op, name, dev) in _kernel_failures:
                raise BackendUnavailable(f"backend {name!r} was requested for {op} but {reason}; "
                                         f"backend='torch' runs it")
            if reason is not None and registry.implementation(op, name) is not None:
                raise TypeError(f"{reason}; use backend='torch' for these inputs")
            if reason is not None:
                raise BackendUnavailable(f"backend {name!r} was requested for {op} but {reason}; "
                                         f"available for {op}: {', '.join(_providers(op))}")
        return name
    skipped = []
    for cand in _auto_chain(dev):
        # A backend that cannot run here is warned about once; one that lacks the op or the
        # inputs' dtype, once per op.
        reason, for_op = _why_not(cand, None, dev, ()), None
        if reason is None and op is not None:
            reason, for_op = _why_not(cand, op, dev, dtypes), op
        if reason is None:
            for s, o, why in skipped:
                _warn_once(f"{s}:{o}:{dev}:{why}", f"barkgpt: the {s} backend is unavailable for {dev} tensors"
                                                   f"{'' if o is None else ' (' + o + ')'} ({why}); "
                                                   f"using the {cand} backend")
            return cand
        skipped.append((cand, for_op, reason))
    raise BackendUnavailable(f"no backend can run {op or 'barkgpt ops'} on {dev} tensors: "
                             + "; ".join(f"{s}: {why}" for s, _, why in skipped))


def _providers(op: str) -> List[str]:
    return [b for b in BACKENDS if registry.implementation(op, b) is not None]


@torch.compiler.assume_constant_result
def _resolve_for_trace(op: str, backend: Optional[str], device_type: str, dtypes: tuple) -> str:
    # torch.compile evaluates this eagerly while tracing (imports, locks and warnings cannot be
    # traced) and bakes the name into the graph: dispatch costs nothing in compiled code.
    return resolve_backend(backend, device_type, op, dtypes)


_resolved: Dict[tuple, Impl] = {}
_is_compiling = torch.compiler.is_compiling


def _implementation(op: str, backend: Optional[str], device_type: str, dtypes: tuple) -> Impl:
    if _is_compiling():
        return registry.implementation(op, _resolve_for_trace(op, backend, device_type, dtypes))
    # Eager calls: resolved once per (request, device, dtypes, environment, registry version); a
    # resolution costs tens of microseconds, as much as a small kernel.
    key = (op, backend, device_type, dtypes, os.environ.get(ENV_VAR), registry.version())
    impl = _resolved.get(key)
    if impl is None:
        impl = registry.implementation(op, resolve_backend(backend, device_type, op, dtypes))
        _resolved[key] = impl
    return impl


def _after_kernel_failure(op: str, backend: Optional[str], device_type: str, dtypes: tuple, impl: Impl,
                          error: BaseException) -> Optional[Impl]:
    """``impl`` raised ``error``. None if that is not a kernel failing to compile or launch on
    this device (the caller re-raises it). Otherwise the op is marked failed for that backend on
    this device type and the implementation to use now is returned: under auto, the next
    backend (``resolve_backend`` warns once, with the reason); a backend asked for by name
    raises BackendUnavailable with the reason."""
    reason = impl.failure(error) if impl.failure is not None else None
    if reason is None:
        return None
    _kernel_failures[(op, impl.backend, device_type)] = reason
    _resolved.clear()
    return registry.implementation(op, resolve_backend(backend, device_type, op, dtypes))


# ---- the public ops, one per declaration ------------------------------------------------------

def _public(decl: OpDecl):
    """The public function of ``decl``: its arguments plus ``backend=``, checks, then dispatch."""
    names = decl.arg_names
    first = next(a.name for a in decl.args if a.type == "Tensor")
    dtype_of = ", ".join(f"{n}.dtype" if decl.args[names.index(n)].type == "Tensor"
                         else f"({n}.dtype if {n} is not None else None)" for n in decl.checked_dtype_args)
    params = ", ".join(names)
    src = (f"def {decl.name}({params}, backend):\n"
           f"    _check({params})\n"
           f"    _dtypes = tuple(d for d in ({dtype_of},) if d is not None)\n"
           f"    _impl = _implementation({decl.name!r}, backend, {first}.device.type, _dtypes)\n"
           f"    if _impl.precheck is not None:\n"
           f"        _impl.precheck({params})\n"
           f"    try:\n"
           f"        return _impl.call({params})\n"
           f"    except Exception as _e:\n"
           f"        _next = _after_kernel_failure({decl.name!r}, backend, {first}.device.type, _dtypes, _impl, _e)\n"
           f"        if _next is None:\n"
           f"            raise\n"
           f"    if _next.precheck is not None:\n"
           f"        _next.precheck({params})\n"
           f"    return _next.call({params})\n")
    scope = {"_check": decl.check, "_implementation": _implementation, "_after_kernel_failure": _after_kernel_failure}
    exec(compile(src, f"<barkgpt.ops.{decl.name}>", "exec"), scope)  # noqa: S102 - our own source
    fn = scope[decl.name]
    defaults = [a.default for a in decl.args]
    first_default = next((i for i, d in enumerate(defaults) if d is not registry.REQUIRED), len(defaults))
    fn.__defaults__ = tuple(defaults[first_default:]) + (None,)
    fn.__doc__ = decl.doc
    fn.__module__ = __name__
    fn.__qualname__ = decl.name
    return fn


for _decl in registry.OPS.values():
    globals()[_decl.name] = _public(_decl)
del _decl

_CPU_CACHE_FIELDS = ("idle_bytes", "idle_blocks", "reuses", "new_blocks", "limit_bytes", "live_bytes")


def cpu_cache_info() -> Dict[str, int]:
    """What the cpp kernels keep for reuse (csrc/outputs.cpp): bytes and blocks kept idle, how
    many outputs reused a block or needed a new one, the limit on idle bytes, and bytes held by
    live outputs. All zeros while the cpp backend has not been loaded."""
    if "cpp" not in _loaded:
        return dict.fromkeys(_CPU_CACHE_FIELDS, 0)
    return dict(zip(_CPU_CACHE_FIELDS, torch.ops.barkgpt_cpp.output_cache_info()))


def cpu_gemm_library() -> Optional[str]:
    """Where the cpp kernels send their fp32 matrix products: ``"onednn"`` or ``"aten"`` (MKL's
    sgemm), or None while the cpp backend has not been loaded. oneDNN is chosen when it can run
    here; ``BARKGPT_CPU_GEMM=aten`` (or ``onednn``), set before barkgpt loads the backend, forces
    one (csrc/gemm.h says why oneDNN is preferred)."""
    if "cpp" not in _loaded:
        return None
    return torch.ops.barkgpt_cpp.gemm_library()


def cpu_hugepage_mode() -> Optional[str]:
    """The kernel's transparent huge page mode as the cpp backend reads it: ``"always"``,
    ``"madvise"``, ``"never"`` or ``""`` (unknown, or not Linux); None while the cpp backend has
    not been loaded. ``use_cpu_hugepages`` moves nothing under ``"never"`` or ``""``."""
    if "cpp" not in _loaded:
        return None
    return torch.ops.barkgpt_cpp.hugepage_mode()


def cpu_hugepages_enabled() -> bool:
    """Whether barkgpt puts CPU memory it streams at decode time (the weights, the screened head's
    copy) in huge pages: the cpp backend is loaded, the kernel has transparent huge pages
    (``always`` or ``madvise``) and ``BARKGPT_CPU_HUGEPAGES`` is not ``0``."""
    return (os.environ.get("BARKGPT_CPU_HUGEPAGES", "1").strip() != "0"
            and cpu_hugepage_mode() not in (None, "", "never"))


def use_cpu_hugepages(module: torch.nn.Module, min_bytes: int = 2 << 20) -> int:
    """Move ``module``'s CPU floating-point parameters of at least ``min_bytes`` into memory
    advised for transparent huge pages (csrc/outputs.cpp), in place: same values, same
    ``Parameter`` objects (ties, optimizers and hooks keep working), only ``p.data`` changes.
    A decode step streams every weight once; huge pages made that stream 10-25% faster on the
    machine barkgpt is developed on. ``generate`` calls this on CPU with the cpp backend. Needs
    the cpp backend's library (loads it). Returns the bytes moved (0 when there is nothing to
    move, the cpp backend is unavailable, the system has no transparent huge pages, or
    ``BARKGPT_CPU_HUGEPAGES=0``). Parameters already moved stay."""
    if not _load("cpp") or not cpu_hugepages_enabled():
        return 0
    lib = torch.ops.barkgpt_cpp
    moved = 0
    with torch.no_grad():
        for p in module.parameters():
            t = p.data
            if (t.device.type != "cpu" or not t.is_floating_point() or t.nbytes < min_bytes
                    or not t.is_contiguous() or lib.is_hugepage_backed(t)):
                continue
            new = lib.hugepage_empty(list(t.shape), t.dtype)
            new.copy_(t)
            p.data = new
            moved += t.nbytes
    return moved


def empty_cpu_cache() -> None:
    """Give the memory the cpp kernels keep for reuse (idle output blocks) back to the OS, like
    ``torch.cuda.empty_cache()``. Tensors in use are untouched."""
    if "cpp" in _loaded:
        torch.ops.barkgpt_cpp.output_cache_release()


# ---- the cpp backend's fused decode step (csrc/decode.cpp) ----------------------------------------
# Not a declared op: inference only, no autograd, no reference of its own. Its reference is the
# model's module loop, which it equals bitwise (tests/test_decode_fused.py). BarkGPT.forward_cached
# uses it where that loop would run layer_norm, linear and cached_attention on the cpp backend.
_DECODE_OPS = ("layer_norm", "linear", "cached_attention")


def decode_layers_available(backend: Optional[str], device, dtype: torch.dtype) -> bool:
    """Whether ``decode_layers`` can stand in for the blocks' ops: the cpp backend is loaded and is
    what layer_norm, linear and cached_attention resolve to for ``backend`` (a name or None: auto)
    on ``device`` with inputs of ``dtype``. False where resolving raises (the module loop then
    raises the same error)."""
    return _device_type(device) == "cpu" and _runs_on_cpp(_DECODE_OPS, backend, dtype)


def _runs_on_cpp(op_names: Sequence[str], backend: Optional[str], dtype: torch.dtype) -> bool:
    """Whether every op of ``op_names`` resolves to the loaded cpp backend for CPU inputs of
    ``dtype`` under ``backend`` (a name or None: auto); False where resolving raises."""
    try:
        impls = [_implementation(op, backend, "cpu", (dtype,)) for op in op_names]
    except (BackendUnavailable, TypeError, ValueError):
        return False
    return "cpp" in _loaded and all(impl.backend == "cpp" for impl in impls)


def decode_layers(x: torch.Tensor, weights: Sequence[torch.Tensor], k_cache: torch.Tensor, v_cache: torch.Tensor,
                  start: Optional[torch.Tensor], offset: int, n_head: int, bias: bool, norm_first: bool,
                  activation: str, eps: float) -> torch.Tensor:
    """Every block of a cached generation step in one C++ call (cpp backend, CPU, inference only).

    ``x`` (B, T, C): the step's embedded tokens at positions ``offset ..``; ``weights``: each
    layer's norm1, attn.qkv, attn.proj, norm2, ff.fc, ff.proj weights in that order, each followed
    by its bias when ``bias`` (12 per layer with biases, 6 without); ``k_cache``/``v_cache``
    (n_layer, B, n_head, S, head_dim) receive the step's keys and values in place; ``start`` (B,)
    or None: each row's first real position (left padding). Returns the hidden states (B, T, C)
    before ln_f, bitwise what the blocks' forward gives in eval mode on the cpp backend. Bad
    shapes, counts or dtypes raise RuntimeError."""
    if not _load("cpp"):
        raise BackendUnavailable(f"decode_layers needs the cpp backend, which failed to load ({_load_errors['cpp']})")
    return torch.ops.barkgpt_cpp.decode_layers(x, list(weights), k_cache, v_cache, start, int(offset), int(n_head),
                                               bool(bias), bool(norm_first), activation, float(eps))


def decode_step(idx: torch.Tensor, tok_emb: torch.Tensor, pos_emb: torch.Tensor, weights: Sequence[torch.Tensor],
                k_cache: torch.Tensor, v_cache: torch.Tensor, start: Optional[torch.Tensor], offset: int, n_head: int,
                bias: bool, norm_first: bool, activation: str, eps: float, ln_f_weight: torch.Tensor,
                ln_f_bias: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`decode_layers` with the rest of a cached step's trunk, in the same one C++ call:
    from the step's token ids ``idx`` (B, T) (int64 or int32) through the embedding ``tok_emb[idx] +
    pos_emb[pos]`` (positions ``offset ..`` minus each row's ``start``, at least 0), every block,
    and ln_f (``ln_f_weight``, ``ln_f_bias``, ``eps``) of the last position: (B, 1, C), bitwise
    what BarkGPT.forward_cached computes before its head in eval mode on the cpp backend. An id
    outside the vocabulary raises IndexError, other bad arguments RuntimeError, before the
    caches are touched."""
    if not _load("cpp"):
        raise BackendUnavailable(f"decode_step needs the cpp backend, which failed to load ({_load_errors['cpp']})")
    return torch.ops.barkgpt_cpp.decode_step(idx, tok_emb, pos_emb, list(weights), k_cache, v_cache, start,
                                             int(offset), int(n_head), bool(bias), bool(norm_first), activation,
                                             float(eps), ln_f_weight, ln_f_bias)


# ---- exact greedy / top-k head through an int8 or fp16 screen (csrc/head_screen.cpp) ----------
# Not a declared op: inference only, no autograd. Its reference is the full head
# linear(x, weight), which it equals bitwise at every row it returns (tests/test_head_screen.py).
#
# Why: a batch-1 decode step streams every weight once; the head is the largest (GPT-2: 154 MB of
# 494 MB in fp32), yet greedy decoding needs only each row's argmax and top-k sampling its k
# largest logits. The screen reads a smaller copy of the head (int8 with a scale per row: a
# quarter of its bytes; or fp16: half), bounds the error of every approximate logit, and
# recomputes exactly only the rows that can be among the top k.
#
# The fp16 bound. For a head row w (fp32), its fp16 copy h, and the input row x (fp32, C = K
# terms): the full head computes f = fl(w.x) with the few-row kernel (gemm.cpp: 16 fixed lanes,
# then a tree of 4 adds; each term goes through at most ceil(K/16) + 4 roundings, one more where
# the product is rounded before the add), the screen computes a = fl(h.x) the same way (h widens
# to fp32 exactly). With n = K + 5 >= that many roundings, u = 2^-24 and g = n u / (1 - n u), the
# standard dot-product error bound gives |fl(w.x) - w.x| <= g sum|w_i x_i| + (underflow), and
# Cauchy-Schwarz gives sum|w_i x_i| <= ||w|| ||x||, |w.x - h.x| <= ||w - h|| ||x||. So
#     |f - a| <= ||x|| (||w - h|| + g (||w|| + ||h||)) + A,
# A = (K + 16) 2^-148 covering both sums' gradual underflow (each rounding of a subnormal result
# is off by at most 2^-150, and a sum has at most K + 15 of them). It needs no overflow in either
# sum: every partial sum is at most (1 + g) ||w|| ||x||, so calls with ||x|| max(||w||, ||h||)
# >= 2^100 take the full head. The per-row factor (||w - h|| + g (||w|| + ||h||)) is computed once
# in float64 and multiplied by 1 + 2^-20 (far above the relative error of the float64 norms and of
# ||x||); every fp32 step after it is rounded outwards (the float64 -> fp32 casts by one nextafter
# step; ||x|| * factor, + A, a - E and a + E in the kernel by directed rounding, or a nextafter
# step without AVX-512), so the fp32 E is >= the true bound, lo <= a - E and hi >= a + E.
# Rows whose copy overflows fp16 (|w_i| >= 65520) get an infinite bound: always candidates.
# Both bounds assume IEEE's default mode: round to nearest, subnormals kept. Under flush-to-zero /
# denormals-are-zero (torch.set_flush_denormal(True)) a product is off by up to 2^-126, far beyond
# A, so the kernel declines (info -1, the full head) when a thread it runs on is in another mode.
#
# The int8 bound. The copy is q (integers in [-127, 127], int8) and a scale s >= 0 per row
# (head_screen_prepare_int8: s ~ max|w_i| / 127, raised until 127 s >= max|w_i|; 0 for a row of
# zeros). The decoded row d = s q is exact in float64, so ||w||, ||d||, ||w - d|| and ||q|| are
# those of the copy actually read. The kernel computes p = fl(q.x) with the same summation (q
# widens to fp32 exactly) and a = fl(s p), one more rounding. With P = q.x exactly (so s P = d.x):
#   |f - w.x|  <= g ||w|| ||x|| + A1                             (as above, A1 = (K + 16) 2^-149)
#   |w.x - d.x| <= ||w - d|| ||x||                               (Cauchy-Schwarz)
#   |s p - s P| <= s (g sum|q_i x_i| + A1) <= g ||d|| ||x|| + s A1 (s >= 0, s sum|q_i x_i| = sum|d_i x_i|)
#   |a - s p|  <= u s |p| + 2^-150 <= u (1 + g) ||d|| ||x|| + u s A1 + 2^-150
#                 (a rounding to nearest; s |p| <= s |P| + s |p - P| and s |P| <= ||d|| ||x||)
# so, summing,
#     |f - a| <= ||x|| (||w - d|| + g ||w|| + (g + u (1 + g)) ||d||) + A1 (1 + (1 + u) s) + 2^-150
#             <= ||x|| factor_v + (K + 16) 2^-148 (1 + s_max),
# s_max the largest scale of the rows screened. Subnormal s and x, and zero rows (s = 0, q = 0:
# a = 0 and f = +-0, within the absolute term) are covered by the underflow terms; s is never
# scaled by 127 in fp32 (prepare checks 127 s >= max|w| in float64), so no overflow there. No
# overflow in the sums: partial sums are at most (1 + g) ||w|| ||x||, (1 + g) ||q|| ||x|| and,
# for s p, (1 + u) (1 + g) ||d|| ||x|| + a subnormal, so calls with ||x|| max(||w||, ||d||, ||q||)
# >= 2^100 take the full head, and rows with max(||w||, ||d||) >= 2^64 (weights far beyond any
# trained model's) are made always-candidates so that they do not hold the others back. The
# float64 factor and fp32 rounding outwards are as for fp16. A non-finite weight declines the copy.
# The int8 bound is about 25x wider than fp16's on Gaussian rows (the median ratio of the factors
# at GPT-2's shape; more for rows with outliers, which set the scale): a few candidates per step
# at GPT-2's shape with random weights, but a trained model whose final hidden state has outlier
# dimensions may get many; see HeadScreen.
#
# The selection. Per row of x: lo_v <= f_v <= hi_v for every v. Let L be the k-th largest lo
# and F the k-th largest exact logit. The k rows with the largest lo have f >= lo >= L, so at
# least k exact logits are >= L, i.e. F >= L. Any v with f_v >= F then has hi_v >= f_v >= F >= L:
# the candidates {v : hi_v >= L} hold every row of the exact top k, ties at the k-th value
# included (so argmax's first index and the top-k cut are unchanged). head_screen_topk does the
# whole step in C++: ||x||, the intervals, L per row, the candidates and their union over the
# rows of x, and their exact recompute with the few-row kernel straight from the head's rows: its
# arithmetic for one output depends only on K, not on which rows are computed together, so they
# equal the full head's values bitwise.

_ALWAYS_BOUND = float("inf")
HEAD_SCREEN_PRECISIONS = ("auto", "int8", "fp16")
_ALWAYS_NORM = 2.0 ** 64  # int8 rows with larger norms are always candidates (see above)

# "auto" starts in int8 and moves to fp16 (for the rest of the screen's life: one generate call)
# when a screened call's candidates (the union over the batch) exceed V / this, or a row has more
# than V / HEAD_SCREEN_MAX_FRACTION. Bytes: the int8 copy saves C V bytes a step over fp16, and
# each candidate costs an exact fp32 row read out of the stream, ~2 x 4 C bytes counting the
# random access as double, so int8 breaks even around (n_int8 - n_fp16) = V / 8 candidates.
# fp16's own candidates (unknown while int8 runs) are far fewer (a ~25x narrower bound), so V / 16
# switches while int8 still saves at least half of what it can (GPT-2: 3141 rows, 19 MB against
# 38.6 MB saved).
HEAD_SCREEN_INT8_MAX_FRACTION = 16


class HeadScreen:
    """The screen's copy of a head weight (int8 with a scale per row, or fp16) and its per-row
    error-bound factors, for :func:`head_topk_logits`. A cache, not model state: never in a
    state_dict or a checkpoint (pickling or copying it keeps none of its tensors). Rebuilt whenever
    the weight it was built from changes: another tensor, or the same tensor modified in place (an
    optimizer step, ``load_state_dict``), as seen by its version counter. Writes through
    ``weight.data`` and fused optimizer steps (torch's ``fused=True`` AdamW leaves the counter
    unchanged) bypass it: call :meth:`clear` after them. ``BarkGPT.generate`` uses a new one for
    every call.

    ``precision``: ``"int8"`` or ``"fp16"`` forces that copy; ``"auto"`` (the default) starts in
    int8 (a quarter of the head's bytes) and switches for good to fp16 (half, but a bound ~25x
    narrower) once a screened call has more than V / HEAD_SCREEN_INT8_MAX_FRACTION candidates or a
    row with more than V / HEAD_SCREEN_MAX_FRACTION (see the bytes behind it in ops.py).

    ``stats``: calls, calls ``screened``, calls that took the ``full`` head, ``candidates`` summed
    over screened calls (rows recomputed exactly), ``builds`` of the copy, ``switches`` from int8
    to fp16, and the ``precision`` of the copy now in use."""

    def __init__(self, precision: str = "auto"):
        if precision not in HEAD_SCREEN_PRECISIONS:
            raise ValueError(f"HeadScreen precision must be one of {HEAD_SCREEN_PRECISIONS}, got {precision!r}")
        self.mode = precision
        self.precision = "fp16" if precision == "fp16" else "int8"
        self._key = None
        self.wq: Optional[torch.Tensor] = None  # (V, C) int8 or fp16, or None: this weight cannot be screened
        self.scale: Optional[torch.Tensor] = None  # (V,) fp32 for the int8 copy: row v is scale[v] * wq[v]
        self.factor: Optional[torch.Tensor] = None  # (V,) fp32, the bound per unit of ||x||
        self.always: Optional[torch.Tensor] = None  # (n,) int64, rows with an infinite bound
        self.max_norm = 0.0  # max over the other rows of the norms that bound the sums (see above)
        self.abs_err = 0.0  # the bound's absolute term (underflow)
        self.stats = dict.fromkeys(("calls", "screened", "full", "candidates", "builds", "switches"), 0)
        self.stats["precision"] = self.precision

    def clear(self) -> None:
        """Drop the copy; the next use rebuilds it."""
        self._key, self.wq, self.scale, self.factor, self.always = None, None, None, None, None
        self.max_norm = self.abs_err = 0.0

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.wq, self.scale, self.factor, self.always) if t is not None)

    def __getstate__(self):
        return {"mode": self.mode, "precision": self.precision, "stats": dict(self.stats)}

    def __setstate__(self, state):
        self.__init__(state.get("mode", "auto"))
        self.precision = state.get("precision", self.precision)
        self.stats.update(state.get("stats", {}))

    @staticmethod
    def _key_of(weight: torch.Tensor) -> tuple:
        return (weight.data_ptr(), weight._version, tuple(weight.shape), weight.stride(), weight.dtype,
                weight.device)

    def update(self, weight: torch.Tensor) -> bool:
        """Make the copy match ``weight`` (V, C) fp32 on CPU (rebuilt only if it changed). False
        when it cannot be screened (non-finite values, C too large for the bound, not fp32 on
        CPU, the cpp backend unavailable)."""
        key = self._key_of(weight)
        if key == self._key:
            return self.wq is not None
        self.clear()
        self.stats["builds"] += 1
        w = weight.detach()
        V, C = w.shape
        n = C + 5
        self._key = key
        if n * 2.0 ** -24 >= 0.5 or w.device.type != "cpu" or w.dtype != torch.float32 or not _load("cpp"):
            return False
        u = 2.0 ** -24
        g = n * u / (1 - n * u)
        # one pass over w: the copy and its float64 norms per row (in the kernels' output cache,
        # in huge pages, where cpu_hugepages_enabled(): a fresh copy in 4 KiB pages spent most of
        # its time in page faults)
        hugepages = cpu_hugepages_enabled()
        if self.precision == "int8":
            wq, scale, nrm = torch.ops.barkgpt_cpp.head_screen_prepare_int8(w, hugepages)
            nw, nd, ne, nq = nrm.unbind(1)
            factor = ne + g * nw + (g + u * (1 + g)) * nd
            norms = torch.maximum(torch.maximum(nw, nd), nq)
            huge = torch.maximum(nw, nd) >= _ALWAYS_NORM
        else:
            wq, nrm = torch.ops.barkgpt_cpp.head_screen_prepare(w, hugepages)
            nw, nh, nd = nrm.unbind(1)
            scale = None
            factor = nd + g * (nw + nh)
            norms = torch.maximum(nw, nh)
            huge = None
        if not bool(torch.isfinite(nw).all()):  # inf or nan in w (finite fp32 squares cannot overflow float64)
            return False
        f32 = (factor * (1 + 2.0 ** -20)).float()
        f32 = torch.nextafter(f32, torch.full_like(f32, float("inf")))
        always = ~torch.isfinite(f32)  # the fp16 copy overflowed (or the factor exceeds fp32)
        if huge is not None:
            always |= huge
        self.factor = f32.masked_fill(always, _ALWAYS_BOUND)
        self.always = always.nonzero().squeeze(1)
        self.max_norm = float(norms.masked_fill(always, 0.0).max()) if V else 0.0
        s_max = float(scale.masked_fill(always, 0.0).max()) if scale is not None and V else 0.0
        self.abs_err = (C + 16) * 2.0 ** -148 * (1 + s_max)
        self.wq, self.scale = wq, scale
        return True

    def _to_fp16(self) -> None:
        """The automatic switch (mode "auto"): the int8 copy leaves, fp16's is built at the next call."""
        if self.mode == "auto" and self.precision == "int8":
            self.precision = self.stats["precision"] = "fp16"
            self.stats["switches"] += 1
            self.clear()


def _few_row_head(backend: Optional[str]) -> bool:
    """Whether linear() on fp32 CPU tensors runs the cpp backend's few-row kernel for <= 8 rows
    (what head_topk_logits' exact recompute must match)."""
    return _runs_on_cpp(("linear",), backend, torch.float32) and bool(torch.ops.barkgpt_cpp.gemm_few_rows())


def head_topk_available(backend: Optional[str], device, dtype: torch.dtype) -> bool:
    """Whether :func:`head_topk_logits` can screen inputs of ``dtype`` on ``device`` for a head
    whose linear() resolves with ``backend`` (a name or None: auto): fp32 on CPU with linear on the
    cpp backend's few-row kernel. Loads the cpp backend."""
    if _device_type(device) != "cpu" or dtype != torch.float32:
        return False
    _load("cpp")
    return _few_row_head(backend)


# A row with more candidates than V / this takes the full head for the call (a flat or
# adversarial row: the exact recompute would cost more than it saves).
HEAD_SCREEN_MAX_FRACTION = 8


def head_topk_logits(x: torch.Tensor, weight: torch.Tensor, k: int, screen: HeadScreen,
                     backend: Optional[str] = None) -> torch.Tensor:
    """Head logits (B, V) of ``x`` (B, C) against ``weight`` (V, C), exact where it matters for
    greedy decoding (``k = 1``) or top-k sampling: every entry is either bitwise
    ``linear(x, weight)``'s or -inf, and each row's finite entries include all of its ``k``
    largest logits (ties at the k-th value included). The vocabulary is screened with ``screen``'s
    int8 or fp16 copy of ``weight`` under a rigorous error bound, and only the rows that can reach
    the top k are recomputed in fp32 (one C++ call, ``head_screen_topk``).

    Where that cannot be guaranteed it returns the full ``linear(x, weight)``: ``k`` outside
    1..V-1, the linear op not running the cpp backend's few-row kernel (another backend,
    ``BARKGPT_CPU_GEMM=aten``), not fp32 on CPU, B outside 1..8, autocast, gradients wanted,
    non-finite ``x`` or weights, or more than V/8 candidates in a row."""
    if not isinstance(screen, HeadScreen):
        raise TypeError(f"screen must be a barkgpt.ops.HeadScreen, got {type(screen).__name__}")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"head_topk_logits: x must be (B, C) and weight (V, C), got {tuple(x.shape)} "
                         f"and {tuple(weight.shape)}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {k!r}")
    screen.stats["calls"] += 1
    B, C = x.shape
    V = weight.shape[0]
    if (not 1 <= k < V or not 1 <= B <= 8 or x.dtype != torch.float32 or weight.dtype != torch.float32
            or x.device.type != "cpu" or weight.device.type != "cpu" or x.stride(1) != 1
            or weight.stride(1) != 1 or torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling()
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            or not _few_row_head(backend) or not screen.update(weight)):
        return _full_head(x, weight, backend, screen)
    out, info = torch.ops.barkgpt_cpp.head_screen_topk(x, weight, screen.wq, screen.scale,
                                                      screen.factor, screen.max_norm, screen.abs_err, k,
                                                      V // HEAD_SCREEN_MAX_FRACTION)
    n, _ = info.tolist()
    if n < 0:  # -1: no bound holds (non-finite x, sums that could overflow); -2: a row with too many
        if n == -2:
            screen._to_fp16()
        return _full_head(x, weight, backend, screen)
    screen.stats["screened"] += 1
    screen.stats["candidates"] += n
    if n * HEAD_SCREEN_INT8_MAX_FRACTION > V:
        screen._to_fp16()
    return out


def _screen_bounds(x: torch.Tensor, screen: HeadScreen):
    """(lo, hi), both (B, V) fp32: for every head row, an interval around the screen's approximate
    logit that holds the exact fp32 logit (-inf, +inf for the always-candidate rows). None when no
    bound holds (non-finite x, or sums that could overflow). See the derivations above; the
    kernel rounds E, lo and hi outwards. (head_screen_topk computes the same intervals.)"""
    xn = torch.linalg.vector_norm(x.double(), dim=1)  # (B,)
    if not float(xn.max()) * screen.max_norm < 2.0 ** 100:  # also catches inf / nan in x
        return None
    xr = torch.nextafter(xn.float(), torch.tensor(float("inf")))  # ||x|| per row, as fp32 rounded up
    return torch.ops.barkgpt_cpp.head_screen(x, screen.wq, screen.factor, xr, screen.abs_err, screen.scale)


def _full_head(x, weight, backend, screen) -> torch.Tensor:
    screen.stats["full"] += 1
    return linear(x, weight, None, backend=backend)
