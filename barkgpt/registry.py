"""The op registry: what each op is (a declaration) and which backend implements it (registrations).

An op is declared once (``barkgpt/opdecls.py``) with an :class:`OpDecl`: its arguments, its
argument checks, its reference (the ``torch`` backend and the test oracle), the shape rule of its
forward kernel for fake tensors, its autograd contract (:class:`Backward`: what the forward kernel
saves, what the backward kernel takes and returns), its byte/FLOP model, its test tolerances per
dtype and its test cases. A backend is declared with a :class:`BackendSpec` and registers one
:class:`Impl` per op it has, usually through :func:`register_kernels`, the one helper that turns a
(forward kernel, backward kernel) pair into ``torch.library`` ops with fake kernels and autograd
wired from the declaration, for Python (Triton) and C++ kernels alike.

This module imports nothing from barkgpt: backends and ``barkgpt.ops`` build on it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

__all__ = ["Arg", "Backward", "OpDecl", "BackendSpec", "Impl", "BackendUnavailable", "OPS", "BACKENDS",
           "declare_op", "declare_backend", "register_impl", "register_kernels", "implementation",
           "implementations", "Case", "Close"]

REQUIRED = object()  # an Arg default meaning "no default"

# Argument types, as torch.library schema types.
_TYPES = ("Tensor", "Tensor?", "int", "SymInt", "float", "bool", "str", "ScalarType")


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here, or lacks the op; the message says why."""


@dataclasses.dataclass(frozen=True)
class Arg:
    """One argument of an op. ``type`` is a schema type ("Tensor", "Tensor?", "int", "SymInt",
    "float", "bool", "str", "ScalarType"); ``grad``: the op is differentiable in it (a floating
    tensor); ``default``: REQUIRED or the Python default of the public entry."""

    name: str
    type: str
    default: Any = REQUIRED
    grad: bool = False

    def __post_init__(self):
        if self.type not in _TYPES:
            raise ValueError(f"argument {self.name!r}: unknown type {self.type!r}; one of {', '.join(_TYPES)}")
        if self.grad and not self.type.startswith("Tensor"):
            raise ValueError(f"argument {self.name!r}: only tensors can have gradients")

    @property
    def is_tensor(self) -> bool:
        return self.type.startswith("Tensor")


@dataclasses.dataclass(frozen=True)
class Backward:
    """The autograd contract every backend's kernels follow.

    The forward kernel returns the op's results (``OpDecl.results``); the first ``OpDecl.returns``
    of them are what the op returns (differentiable), the rest are saved extras, marked
    non-differentiable. The backward kernel is called as
    ``backward(grad_0, ..., grad_{returns-1}, *args)`` where ``args`` names inputs, forward results
    or ``keep`` values, and returns one gradient per name in ``grads`` (inputs, in order). A grad
    for an optional input that was None is dropped; inputs not in ``grads`` get None.

    * ``save``: tensors kept for backward (input or result names).
    * ``keep``: non-tensor values kept for backward: name -> (schema type, fn(inputs dict)).
    * ``fake``: the backward kernel's shape rule (same arguments, returns fake tensors).
    """

    args: Tuple[str, ...]
    grads: Tuple[str, ...]
    fake: Callable[..., Any]
    keep: Mapping[str, Tuple[str, Callable[[Dict[str, Any]], Any]]] = dataclasses.field(default_factory=dict)

    @property
    def save(self) -> Tuple[str, ...]:
        return tuple(a for a in self.args if a not in self.keep)


@dataclasses.dataclass(frozen=True)
class Close:
    """Bounds a test case adds, for one dtype, to the declaration's tolerance (all must hold;
    none replaces it), for the op's results and every gradient. ``e`` is the float64 reference.

    * ``elementwise=(atol, rtol)``: ``|got - e| <= atol + rtol * |e|`` element by element.
    * ``rounded``: ``e`` rounded once to the result's dtype first (sums that are exact up to
      one rounding).
    * ``relative``: ``max |got - e| <= relative * max |e|`` (no floor of 1: small gradients
      are held to their own scale).
    * ``ill_conditioned``: ``atol`` is raised to this many times the reference's own error
      when run in the case's dtype (rows of nearly equal values multiply rounding errors).
    * ``vs_reference=(atol, rtol)``: also elementwise against the reference run in the case's
      dtype (plus that run's own error when ``ill_conditioned`` is set).
    * ``exact_zeros``: where ``e`` is exactly 0 (rows of a gradient nothing reached), ``got``
      is exactly 0.
    * ``exact_results``: the op's results (not the gradients) equal ``e`` rounded once to
      their dtype, bit for bit.
    * ``backends``: the backends the bound holds for (None: all), where kernels differ in what
      they keep in the dtype (a logits chunk stored in fp16 or in fp32).
    """

    elementwise: Optional[Tuple[float, float]] = None
    rounded: bool = False
    relative: Optional[float] = None
    ill_conditioned: float = 0.0
    vs_reference: Optional[Tuple[float, float]] = None
    exact_zeros: bool = False
    exact_results: bool = False
    backends: Optional[Tuple[str, ...]] = None


@dataclasses.dataclass(frozen=True)
class Case:
    """A test case of an op: ``make(dtype, device, generator)`` returns the op's positional
    arguments. ``heavy`` cases are skipped on slow (interpreted) backends.

    ``tolerance``: per dtype, a bound tighter than the declaration's for this case (the smaller
    one is used; a case never loosens the declaration). ``close``: per dtype, a :class:`Close` (or a
    tuple of them) checked as well. ``upstream(result, generator)``: the upstream gradient for a result
    (a layout other than contiguous: strided, transposed, expanded), default ``randn_like``.
    ``interpret``: on interpreted backends (Triton on CPU) True runs the case, a tuple of dtypes
    runs it in those dtypes only, False skips it, None leaves it to the suite's sample of the
    light cases. ``extra_dtypes``: dtypes of the
    case's tensors other than the case's dtype, which a backend must support to run it."""

    id: str
    make: Callable[[torch.dtype, Any, torch.Generator], Tuple[Any, ...]]
    heavy: bool = False
    dtypes: Optional[Tuple[torch.dtype, ...]] = None  # None: every dtype of the declaration
    tolerance: Optional[Mapping[torch.dtype, float]] = None
    close: Optional[Mapping[torch.dtype, Any]] = None  # a Close or a tuple of them per dtype
    upstream: Optional[Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = None
    interpret: Any = None  # None, True, False or a tuple of dtypes
    extra_dtypes: Tuple[torch.dtype, ...] = ()


@dataclasses.dataclass(frozen=True)
class OpDecl:
    """Everything about an op that does not depend on the backend."""

    name: str
    doc: str
    args: Tuple[Arg, ...]
    results: Tuple[str, ...]  # names of the forward kernel's results
    returns: int  # how many leading results the op returns
    check: Callable[..., None]  # raises TypeError/ValueError/IndexError with a clear message
    reference: Callable[..., Any]  # pure PyTorch, differentiable by autograd: torch backend and oracle
    fake: Callable[..., Any]  # forward kernel shape rule: same args, returns fake results
    backward: Optional[Backward] = None  # None: inference only (no gradients)
    # Checks a Python kernel must run in its op body, where torch.compile cannot skip them (e.g.
    # token ids in range). C++ kernels run their own.
    kernel_check: Optional[Callable[..., None]] = None
    flops: Optional[Callable[..., float]] = None  # (*args, mode) -> FLOPs, mode "fwd"/"bwd"/"fwd+bwd"
    bytes: Optional[Callable[..., float]] = None  # (*args, mode) -> fewest bytes moved
    # Test tolerance per dtype: max |got - want| <= tol * max(1, max |want|) against the float64
    # reference, for the results and every gradient.
    tolerance: Mapping[torch.dtype, float] = dataclasses.field(default_factory=dict)
    cases: Tuple[Case, ...] = ()
    dtype_args: Tuple[str, ...] = ()  # tensors whose dtype a backend must support (default: grad args)

    def __post_init__(self):
        names = [a.name for a in self.args]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: duplicate argument names")
        if not 1 <= self.returns <= len(self.results):
            raise ValueError(f"{self.name}: returns must be in 1..{len(self.results)}")
        if self.backward is not None:
            known = set(names) | set(self.results) | set(self.backward.keep)
            for n in self.backward.args:
                if n not in known:
                    raise ValueError(f"{self.name}: backward argument {n!r} is not an input, result or kept value")
            for n in self.backward.grads:
                if n not in names:
                    raise ValueError(f"{self.name}: gradient for unknown input {n!r}")
            tensors = {a.name for a in self.args if a.is_tensor} | set(self.results)
            for n in self.backward.save:
                if n not in tensors:
                    raise ValueError(f"{self.name}: backward argument {n!r} is not a tensor; declare it in "
                                     f"`keep` with its type")

    # ---- derived ------------------------------------------------------------------------
    @property
    def arg_names(self) -> Tuple[str, ...]:
        return tuple(a.name for a in self.args)

    @property
    def checked_dtype_args(self) -> Tuple[str, ...]:
        return self.dtype_args or tuple(a.name for a in self.args if a.grad)

    def forward_schema(self) -> str:
        params = ", ".join(f"{a.type} {a.name}" for a in self.args)
        return f"({params}) -> {_tensors(len(self.results))}"

    def backward_schema(self) -> str:
        assert self.backward is not None
        types = {a.name: a.type for a in self.args}
        types.update({r: "Tensor" for r in self.results})
        types.update({k: t for k, (t, _) in self.backward.keep.items()})
        grads = [f"Tensor grad_{r}" for r in self.results[: self.returns]]
        params = ", ".join(grads + [f"{types[n]} {n}" for n in self.backward.args])
        return f"({params}) -> {_tensors(len(self.backward.grads))}"


def _tensors(n: int) -> str:
    return "Tensor" if n == 1 else "(" + ", ".join(["Tensor"] * n) + ")"


@dataclasses.dataclass(frozen=True)
class BackendSpec:
    """A backend: ``module`` is imported on first use (it registers its Impls; an exception there
    means "unavailable", with the reason); ``auto_devices``: device types where auto picks it, in
    the order BACKENDS lists them; ``unavailable_reason(device_type)`` is looked up on the module
    (``None`` for a backend without a module)."""

    name: str
    module: Optional[str]
    auto_devices: Tuple[str, ...]
    doc: str = ""


@dataclasses.dataclass(frozen=True)
class Impl:
    """A backend's implementation of an op. ``call(*args)`` returns what the op returns (the
    arguments have passed the declaration's checks). ``dtypes``: dtypes of the declaration's
    dtype arguments it supports; ``precheck(*args)`` raises for inputs it cannot take (beyond
    dtype), before any kernel runs. ``forward``/``backward``: the registered kernel ops (for
    tests: opcheck, the C++ eager path)."""

    op: str
    backend: str
    call: Callable[..., Any]
    dtypes: Tuple[torch.dtype, ...]
    precheck: Optional[Callable[..., None]] = None
    forward: Any = None
    backward: Any = None
    eager: Any = None  # an eager fast path with its own (C++) autograd, checked against `backward`
    prepare: Optional[Callable[..., Any]] = None  # argument adaptation done before the kernels
    # failure(exception) -> reason or None: a reason when the exception says the kernel cannot be
    # compiled or launched on this device (too little shared memory, no code for the
    # architecture): auto dispatch then uses the next backend for the op, with one warning.
    failure: Optional[Callable[[BaseException], Optional[str]]] = None

    def declared_call(self) -> Callable[..., Any]:
        """``call`` without the eager fast path: the forward op with the autograd wired from the
        declaration, in eager mode too (what the fast path is measured and tested against)."""
        return _make_call(OPS[self.op], self.forward, None, self.prepare)


OPS: Dict[str, OpDecl] = {}
BACKENDS: Dict[str, BackendSpec] = {}
_IMPLS: Dict[Tuple[str, str], Impl] = {}
_version = [0]  # bumped by every change below: dispatch caches what it resolved per version


def version() -> int:
    return _version[0]


def declare_op(decl: OpDecl) -> OpDecl:
    if decl.name in OPS:
        raise ValueError(f"op {decl.name!r} is already declared")
    OPS[decl.name] = decl
    _version[0] += 1
    return decl


def declare_backend(spec: BackendSpec) -> BackendSpec:
    if spec.name in BACKENDS or spec.name in ("auto", ""):
        raise ValueError(f"backend name {spec.name!r} is taken")
    BACKENDS[spec.name] = spec
    _version[0] += 1
    return spec


def register_impl(impl: Impl) -> Impl:
    if impl.op not in OPS:
        raise ValueError(f"{impl.backend}: op {impl.op!r} is not declared (barkgpt/opdecls.py)")
    if impl.backend not in BACKENDS:
        raise ValueError(f"backend {impl.backend!r} is not declared")
    _IMPLS[(impl.op, impl.backend)] = impl  # a module re-import replaces its own entries
    _version[0] += 1
    return impl


def remove_impl(op: str, backend: str) -> Optional[Impl]:
    """Take ``backend``'s implementation of ``op`` out of the registry (returns it, or None)."""
    _version[0] += 1
    return _IMPLS.pop((op, backend), None)


def implementation(op: str, backend: str) -> Optional[Impl]:
    return _IMPLS.get((op, backend))


def implementations(op: Optional[str] = None) -> List[Impl]:
    return [i for (o, _), i in _IMPLS.items() if op is None or o == op]


# ---- the one autograd wiring ----------------------------------------------------------------

def _op_handle(qualname: str):
    ns, name = qualname.split("::")
    return getattr(getattr(torch.ops, ns), name).default


# Wired forward op name -> (forward, backward) op handles. torch.library registrations live as
# long as the process: a backend module imported again must not repeat them.
_WIRED: Dict[str, Any] = {}


def _define(qualname: str, fn: Callable, schema: str, check: Optional[Callable]):
    if check is not None:
        kernel = fn

        def fn(*args):  # noqa: F811 - the kernel, after the checks torch.compile must not skip
            check(*args)
            return kernel(*args)

    return torch.library.custom_op(qualname, fn, mutates_args=(), schema=schema)


def _autograd_glue(decl: OpDecl, backward_op):
    """setup_context and backward for ``decl``'s contract, with index lookups precomputed (the
    eager Triton path runs this per call)."""
    bw = decl.backward
    names = decl.arg_names
    pos = {n: ("in", i) for i, n in enumerate(names)}
    pos.update({r: ("out", i) for i, r in enumerate(decl.results)})
    save = [pos[n] for n in bw.save]
    keep = list(bw.keep.items())
    saved_index = {n: i for i, n in enumerate(bw.save)}
    bwd_args = [("saved", saved_index[n]) if n in saved_index else ("keep", n) for n in bw.args]
    grad_slots = [names.index(g) for g in bw.grads]
    n_inputs, returns = len(names), decl.returns
    multi = len(decl.results) > 1
    extras = range(returns, len(decl.results))

    def setup_context(ctx, inputs, output):
        outs = output if multi else (output,)
        ctx.save_for_backward(*[inputs[i] if kind == "in" else outs[i] for kind, i in save])
        if keep:
            env = dict(zip(names, inputs))
            ctx.barkgpt_keep = {k: fn(env) for k, (_, fn) in keep}
        ctx.barkgpt_present = tuple(inputs[i] is not None for i in grad_slots)
        if multi and len(extras):
            ctx.mark_non_differentiable(*[outs[i] for i in extras])

    def backward(ctx, *grads):
        result = [None] * n_inputs
        if all(g is None for g in grads[:returns]):
            return tuple(result)
        saved = ctx.saved_tensors
        kept = getattr(ctx, "barkgpt_keep", None)
        args = [saved[i] if kind == "saved" else kept[i] for kind, i in bwd_args]
        gs = backward_op(*grads[:returns], *args)
        if len(grad_slots) == 1:
            gs = (gs,)
        for slot, present, g in zip(grad_slots, ctx.barkgpt_present, gs):
            result[slot] = g if present else None
        return tuple(result)

    return setup_context, backward


def register_kernels(decl: OpDecl, backend: str, namespace: str, forward, backward=None, *,
                     dtypes: Sequence[torch.dtype], fake: Optional[Callable] = None,
                     eager: Optional[Callable] = None, precheck: Optional[Callable] = None,
                     prepare: Optional[Callable] = None, kernel_check: Any = REQUIRED,
                     failure: Optional[Callable[[BaseException], Optional[str]]] = None) -> Impl:
    """Wire a backend's (forward kernel, backward kernel) into ``torch.library`` ops with a fake
    kernel and autograd from ``decl``'s contract, and register the result as ``backend``'s Impl.

    ``forward``/``backward``: Python functions (defined here as ``namespace::<op>_fwd`` /
    ``_bwd`` custom ops with the declaration's schemas; ``decl.kernel_check`` runs in the forward
    body) or qualified names of ops defined elsewhere (C++ ``TORCH_LIBRARY``) with those schemas.
    ``fake``: the forward shape rule when this backend's layout differs from the declaration's.
    ``eager``: an op with its own autograd that eager (not compiled) calls use instead.
    ``prepare(*args) -> args``: an argument adaptation done before the op (e.g. dtype promotion).
    ``kernel_check``: this backend's op-body check instead of ``decl.kernel_check`` (e.g. one
    that leaves to the kernel what it checks on the device).
    ``failure``: see :attr:`Impl.failure`.
    """
    check = decl.kernel_check if kernel_check is REQUIRED else kernel_check
    if decl.backward is None and backward is not None:
        raise ValueError(f"{decl.name} is declared inference-only; no backward kernel to wire")
    if decl.backward is not None and backward is None:
        raise ValueError(f"{decl.name} needs a backward kernel (its declaration has one)")
    fwd_name = forward if isinstance(forward, str) else f"{namespace}::{decl.name}_fwd"
    bwd_name = backward if isinstance(backward, str) or backward is None else f"{namespace}::{decl.name}_bwd"
    if fwd_name not in _WIRED:
        if isinstance(forward, str):
            torch.library.register_fake(forward, fake or decl.fake)
            fwd_op = _op_handle(forward)
        else:
            _define(fwd_name, forward, decl.forward_schema(), check).register_fake(fake or decl.fake)
            fwd_op = _op_handle(fwd_name)
        bwd_op = None
        if backward is not None:
            if isinstance(backward, str):
                torch.library.register_fake(backward, decl.backward.fake)
                bwd_op = _op_handle(backward)
            else:
                _define(bwd_name, backward, decl.backward_schema(), None).register_fake(decl.backward.fake)
                bwd_op = _op_handle(bwd_name)
            setup_context, bwd = _autograd_glue(decl, bwd_op)
            torch.library.register_autograd(fwd_name, bwd, setup_context=setup_context)
        _WIRED[fwd_name] = (fwd_op, bwd_op)
    fwd_op, bwd_op = _WIRED[fwd_name]
    call = _make_call(decl, fwd_op, eager, prepare)
    return register_impl(Impl(decl.name, backend, call, tuple(dtypes), precheck, fwd_op, bwd_op, eager, prepare,
                              failure))


def _make_call(decl: OpDecl, fwd_op, eager, prepare):
    single = len(decl.results) == 1
    returns = decl.returns
    is_compiling = torch.compiler.is_compiling

    def call(*args):
        if prepare is not None:
            args = prepare(*args)
        if eager is not None and not is_compiling():
            return eager(*args)
        out = fwd_op(*args)
        if single:
            return out
        return out[0] if returns == 1 else tuple(out[:returns])

    return call
