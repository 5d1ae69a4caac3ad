"""Every declared op x every backend that can run here x dtype x the declaration's test cases.

Driven by the op registry (barkgpt/opdecls.py): a new op or backend is tested here without a new
test file. Each case compares the op's result and every gradient (random upstream gradient)
with the declaration's reference in float64, within the declaration's tolerance for the dtype.
Backend-specific tests (build cache, interpreter quirks, output cache, tile configs) stay in
test_cpp_*.py / test_triton_*.py.
"""

import importlib
import os
import subprocess
import sys
import warnings

import pytest
import torch

from barkgpt import ops, registry
from barkgpt.registry import Arg, Backward, Case, OpDecl

import oracle

INTERPRETED = {"triton"} if not torch.cuda.is_available() else set()
INTERPRETER_DTYPES = (torch.float32, torch.float16)  # Triton's interpreter: no bf16, no fp64


def _device(backend):
    """Where a backend is tested: CPU if it runs there (triton: under the interpreter), else CUDA."""
    if ops.unavailable_reason(backend, "cpu") is None:
        return "cpu"
    if torch.cuda.is_available() and ops.unavailable_reason(backend, "cuda") is None:
        return "cuda"
    return None


def _backends():
    return [b for b in ops.BACKENDS if _device(b) is not None]


def _interpreted(backend):
    return backend in INTERPRETED and _device(backend) == "cpu"


def _interpreter_cases(cases):
    """What an interpreted backend runs (slow): the cases marked for it, and a sample of the light
    unmarked ones (test_triton_*.py keep only what needs the backend's internals)."""
    sample = [c for c in cases if c.interpret is None and not c.heavy][::4]
    return [c for c in cases if c.interpret or any(c is s for s in sample)]


def _params():
    out = []
    # Not "torch": it is the reference run in the inputs' dtype, as accurate as PyTorch's own ops
    # (e.g. bf16 embedding gradients accumulate in bf16), which the tolerances written for the
    # kernels do not describe; in float64 it would be compared with itself. test_ops_reference.py
    # checks the references against their textbook definitions.
    for b in _backends():
        for name, decl in registry.OPS.items():
            impl = registry.implementation(name, b)
            if impl is None or b == "torch":
                continue
            cases = _interpreter_cases(decl.cases) if _interpreted(b) else decl.cases
            for case in cases:
                if any(d not in impl.dtypes for d in case.extra_dtypes):
                    continue
                for dtype in decl.tolerance:
                    if dtype not in impl.dtypes or (case.dtypes is not None and dtype not in case.dtypes):
                        continue
                    if _interpreted(b) and (dtype not in INTERPRETER_DTYPES or (
                            isinstance(case.interpret, tuple) and dtype not in case.interpret)):
                        continue
                    out.append(pytest.param(name, b, dtype, case, id=f"{name}-{b}-{str(dtype)[6:]}-{case.id}"))
    return out


def _inputs(decl, case, dtype, backend, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return oracle.leaves(decl, case.make(dtype, _device(backend), gen))


_grad_inputs = oracle.grad_inputs
_as_tuple = oracle.as_tuple


def _run(fn, decl, args, upstream):
    return oracle.run(decl, fn, args, upstream)

_upstream = oracle.upstream_for


@pytest.mark.parametrize("op, backend, dtype, case", _params())
def test_op_matches_reference(op, backend, dtype, case):
    decl = registry.OPS[op]
    fn = getattr(ops, op)
    args = _inputs(decl, case, dtype, backend)
    oracle.check_op(op, lambda *a: fn(*a, backend=backend), args, dtype, upstream=case.upstream,
                    tolerance=case.tolerance, bounds=case.close, backend=backend)


def _fails(fn):
    try:
        fn()
    except AssertionError:
        return True
    return False


def test_case_bounds_catch_what_the_declared_tolerance_lets_through():
    """Each registry.Close knob rejects an error the declaration's max-norm tolerance accepts
    (so the per-case bounds are really checked), and accepts the exact answer."""
    from barkgpt.registry import Close

    e = torch.tensor([0.0, 1e-3, -2.0, 1000.0], dtype=torch.float64)
    ok = e.clone()
    off = e.clone()
    off[1] += 1e-3  # 1e-6 relative to the largest value: within the declared 1e-5 * 1000
    oracle.close(off, e, 1e-5, "x")
    bound = Close(elementwise=(1e-4, 1e-4))
    assert not _fails(lambda: oracle.check_close(ok, e, bound, "x"))
    assert _fails(lambda: oracle.check_close(off, e, bound, "x"))
    assert _fails(lambda: oracle.check_close(off, e, Close(relative=1e-7), "x"))
    assert not _fails(lambda: oracle.check_close(ok, e, Close(relative=0.0), "x"))
    # against the reference in the case's dtype, and the slack its own error buys
    own = e.clone()
    own[2] += 0.5
    assert _fails(lambda: oracle.check_close(ok, e, Close(vs_reference=(1e-3, 0.0)), "x", own))
    assert _fails(lambda: oracle.check_close(off, e, Close(elementwise=(1e-4, 0.0)), "x", own))
    assert not _fails(lambda: oracle.check_close(off, e, Close(elementwise=(1e-4, 0.0), ill_conditioned=1.0), "x", own))
    # exact zeros, results equal to one rounding, rounded elementwise bounds
    tiny = e.clone()
    tiny[0] = 1e-30
    assert _fails(lambda: oracle.check_close(tiny, e, Close(exact_zeros=True), "x"))
    third = torch.tensor([1 / 3, 2 / 3], dtype=torch.float64)
    once = third.to(torch.float16)
    twice = once + torch.tensor([0.0, 1e-3], dtype=torch.float16)  # one ulp off
    assert not _fails(lambda: oracle.check_close(once, third, Close(exact_results=True), "y", result=True))
    assert _fails(lambda: oracle.check_close(twice, third, Close(exact_results=True), "y", result=True))
    assert not _fails(lambda: oracle.check_close(twice, third, Close(exact_results=True), "dy", result=False))
    assert not _fails(lambda: oracle.check_close(once, third, Close(elementwise=(0.0, 0.0), rounded=True), "y"))
    assert _fails(lambda: oracle.check_close(once, third, Close(elementwise=(0.0, 0.0)), "y"))
    # a bound that names backends holds for those only; a case tolerance only tightens
    fp16 = (Close(relative=1.0, backends=("cpp",)), Close(relative=2.0))
    assert oracle.bounds_for({torch.float16: fp16}, torch.float16, "triton") == [fp16[1]]
    assert oracle.bounds_for({torch.float16: fp16}, torch.float16, "cpp") == list(fp16)
    x = torch.randn(3, 8)
    w = torch.ones(8)
    noisy = lambda x, w, b, eps: ops.layer_norm(x, w, b, eps, backend="torch") * (1 + 1e-6)  # noqa: E731
    oracle.check_op("layer_norm", noisy, [x, w, None, 1e-5], torch.float32)
    with pytest.raises(AssertionError, match="max error"):
        oracle.check_op("layer_norm", noisy, [x, w, None, 1e-5], torch.float32, tolerance={torch.float32: 1e-7})
    oracle.check_op("layer_norm", noisy, [x, w, None, 1e-5], torch.float32, tolerance={torch.float32: 1.0})


# ---- the kernel ops: opcheck, the schema, the C++ eager fast path --------------------------------

def _kernel_params():
    out = []
    for b in _backends():
        for name, decl in registry.OPS.items():
            impl = registry.implementation(name, b)
            if impl is not None and impl.forward is not None:
                out.append(pytest.param(name, b, id=f"{name}-{b}"))
    return out


def _light_cases(decl):
    return [c for c in decl.cases if not c.heavy][:4]


def _backward_args(decl, impl, args):
    """The backward kernel's arguments for forward inputs ``args``, from the declaration."""
    env = dict(zip(decl.arg_names, args))
    results = _as_tuple(impl.forward(*args))
    env.update(zip(decl.results, results))
    env.update({k: fn(env) for k, (_, fn) in decl.backward.keep.items()})
    grads = [torch.randn_like(r) for r in results[: decl.returns]]
    return grads + [env[n] for n in decl.backward.args]


def _detached(args):
    return [a.detach() if isinstance(a, torch.Tensor) else a for a in args]


@pytest.mark.parametrize("op, backend", _kernel_params())
def test_kernel_ops_pass_opcheck(op, backend):
    decl = registry.OPS[op]
    impl = registry.implementation(op, backend)
    for case in _light_cases(decl)[:2]:
        args = _inputs(decl, case, torch.float32, backend)
        prepared = list(args)
        torch.library.opcheck(impl.forward, tuple(prepared))
        if impl.backward is not None:
            torch.library.opcheck(impl.backward, tuple(_backward_args(decl, impl, _detached(prepared))))
        if impl.eager is not None:
            torch.library.opcheck(impl.eager, tuple(prepared))


def _schema_types(schema):
    return [str(a.type) for a in schema.arguments], [str(r.type) for r in schema.returns]


@pytest.mark.parametrize("op, backend", _kernel_params())
def test_kernel_schemas_match_the_declaration(op, backend):
    decl = registry.OPS[op]
    impl = registry.implementation(op, backend)
    parse = torch._C.parse_schema
    assert _schema_types(impl.forward._schema) == _schema_types(parse("x::f" + decl.forward_schema()))
    assert [a.name for a in impl.forward._schema.arguments] == list(decl.arg_names)
    if impl.backward is not None:
        assert _schema_types(impl.backward._schema) == _schema_types(parse("x::b" + decl.backward_schema()))
    if impl.eager is not None:  # the C++ fast path takes the op's arguments and returns its results
        want_args, want_returns = _schema_types(parse("x::f" + decl.forward_schema()))
        args, returns = _schema_types(impl.eager._schema)
        assert args == want_args and returns == want_returns[: decl.returns]


def _eager_params():
    return [p for p in _kernel_params() if registry.implementation(*p.values).eager is not None]


@pytest.mark.parametrize("op, backend", _eager_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_eager_fast_path_follows_the_declaration_bitwise(op, backend, dtype):
    """The C++ autograd (csrc/autograd.cpp) is a second copy of the declared contract (what is
    saved, which kernel computes which gradient): it must give the same bits as the route wired
    from the declaration (the one torch.compile uses), for every input the op takes."""
    decl = registry.OPS[op]
    impl = registry.implementation(op, backend)
    cases = list(_light_cases(decl))
    for case in cases:
        args = _inputs(decl, case, dtype, backend)
        # every subset of differentiable inputs that require grad, all of them first
        ins = _grad_inputs(decl, args)
        for k in range(len(ins), 0, -1):
            chosen = ins[:k]
            for t in ins:
                t.requires_grad_(any(t is c for c in chosen))
            eager_out = impl.eager(*args)
            declared = _as_tuple(impl.forward(*args))[: decl.returns]
            declared_out = declared[0] if decl.returns == 1 else declared
            assert torch.equal(eager_out, declared_out)
            g = torch.randn_like(eager_out)
            a = torch.autograd.grad(eager_out, chosen, g)
            b = torch.autograd.grad(declared_out, chosen, g)
            for x, y in zip(a, b):
                assert x.dtype == y.dtype and torch.equal(x, y)
        # no input needs a gradient: the fast path must not build a graph
        with torch.no_grad():
            assert torch.equal(impl.eager(*args), _as_tuple(impl.forward(*args))[0])


@pytest.mark.parametrize("op, backend", _kernel_params())
def test_backward_is_bitwise_repeatable(op, backend):
    decl = registry.OPS[op]
    case = _light_cases(decl)[-1]
    results = []
    for _ in range(2):
        args = _inputs(decl, case, torch.float32, backend)
        outs, grads = _run(lambda *a: getattr(ops, op)(*a, backend=backend), decl, args,
                           _upstream(_as_tuple(getattr(ops, op)(*_detached(args), backend=backend))))
        results.append(list(outs) + list(grads))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("op, backend", _kernel_params())
def test_compile_fullgraph_matches_eager(op, backend):
    torch._dynamo.reset()
    decl = registry.OPS[op]
    case = _light_cases(decl)[1]
    fn = getattr(ops, op)
    args = _inputs(decl, case, torch.float32, backend)
    eager_outs = _as_tuple(fn(*args, backend=backend))
    upstream = _upstream(eager_outs)
    _, eager_grads = _run(lambda *a: fn(*a, backend=backend), decl, args, upstream)
    compiled = torch.compile(lambda *a: fn(*a, backend=backend), fullgraph=True, backend="aot_eager")
    outs, grads = _run(compiled, decl, args, upstream)
    for a, b in zip(list(outs) + list(grads), list(eager_outs) + list(eager_grads)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


# ---- dispatch read from the registry ------------------------------------------------------------

def test_every_op_is_public_with_the_declared_signature():
    import inspect

    for name, decl in registry.OPS.items():
        fn = getattr(ops, name)
        params = list(inspect.signature(fn).parameters)
        assert params == list(decl.arg_names) + ["backend"]
        assert registry.implementation(name, "torch") is not None  # the reference is the torch backend
        assert decl.bytes is not None and decl.tolerance and decl.cases


def test_an_op_a_backend_lacks_falls_back_under_auto_and_raises_when_explicit(monkeypatch):
    if ops.unavailable_reason("cpp", "cpu") is not None:
        pytest.skip("the cpp backend is unavailable here")
    removed = registry.remove_impl("layer_norm", "cpp")
    try:
        monkeypatch.setattr(ops, "_warned", set())
        monkeypatch.delenv(ops.ENV_VAR, raising=False)
        x, w = torch.randn(3, 8), torch.randn(8)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                y = ops.layer_norm(x, w)
            ops.attention(*(torch.randn(1, 1, 4, 2) for _ in range(3)))  # cpp still runs attention
        msgs = [str(c.message) for c in caught]
        assert len(msgs) == 1 and "has no layer_norm op" in msgs[0] and "using the torch backend" in msgs[0], msgs
        torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (8,), w))
        with pytest.raises(ops.BackendUnavailable, match="backend 'cpp' was requested for layer_norm but the cpp "
                                                         "backend has no layer_norm op"):
            ops.layer_norm(x, w, backend="cpp")
    finally:
        registry.register_impl(removed)
    assert ops.resolve_backend(None, "cpu", "layer_norm", (torch.float32,)) == "cpp"


def test_an_unsupported_dtype_falls_back_under_auto_and_raises_when_explicit(monkeypatch):
    if ops.unavailable_reason("triton", "cpu") is not None:
        pytest.skip("triton cannot run here")
    # triton takes no float64: explicit -> TypeError; a chain where triton comes first -> torch
    x, w = torch.randn(3, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    with pytest.raises(TypeError, match="supports float16, bfloat16, float32, not float64; use backend='torch'"):
        ops.layer_norm(x, w, backend="triton")
    monkeypatch.setitem(registry.BACKENDS, "triton", registry.BackendSpec("triton", "barkgpt._triton", ("cpu",)))
    monkeypatch.setattr(ops, "_warned", set())
    assert ops.resolve_backend(None, "cpu", "layer_norm", (torch.float32,)) == "triton"
    with pytest.warns(RuntimeWarning, match=r"triton backend is unavailable for cpu tensors \(layer_norm\)"):
        assert ops.resolve_backend(None, "cpu", "layer_norm", (torch.float64,)) in ("cpp", "torch")


def test_cli_backend_choices_and_info_read_the_registry():
    from barkgpt import cli

    parser = cli.build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]  # noqa: SLF001
    choices = next(a.choices for a in train._actions if a.dest == "backend")
    assert list(choices) == ["auto"] + list(registry.BACKENDS)


def test_a_new_backend_is_one_module_and_one_declaration(tmp_path):
    """A backend declared with a module that registers one op: dispatch, available_backends and
    explicit requests see it; ops it lacks fall back (auto) or raise BackendUnavailable."""
    mod = tmp_path / "toy_backend.py"
    mod.write_text(
        "from barkgpt import opdecls, registry\n"
        "def unavailable_reason(device_type):\n"
        "    return None if device_type == 'cpu' else 'cpu only'\n"
        "calls = []\n"
        "def _ln(x, w, b, eps):\n"
        "    calls.append(1)\n"
        "    return opdecls.LAYER_NORM.reference(x, w, b, eps)\n"
        "registry.register_impl(registry.Impl('layer_norm', 'toy', _ln, (__import__('torch').float32,)))\n")
    code = (
        "import sys, warnings, torch\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "from barkgpt import ops, registry\n"
        "registry.declare_backend(registry.BackendSpec('toy', 'toy_backend', ('cpu',)))\n"
        "ops.BACKENDS = tuple(registry.BACKENDS)\n"
        "assert 'toy' in ops.available_backends('cpu'), ops.available_backends('cpu')\n"
        "y = ops.layer_norm(torch.randn(2, 4), torch.ones(4), backend='toy')\n"
        "import toy_backend; assert toy_backend.calls == [1]\n"
        "try:\n"
        "    ops.attention(*(torch.randn(1, 1, 2, 2) for _ in range(3)), backend='toy')\n"
        "except ops.BackendUnavailable as e:\n"
        "    assert 'attention' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
        "print('ok')\n")
    env = dict(os.environ, BARKGPT_BACKEND="")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


# ---- the declaration format handles the ops that come next ----------------------------------------
# A fused head + loss (scalar result, gradients computed in the forward and saved, an integer
# target tensor, an optional bias, int/str/float/bool arguments) and an inference-only op.

def _toy_loss_ref(x, weight, targets, bias=None, ignore_index=-100, reduction="mean", scale=1.0, flag=True):
    logits = x @ weight.t()
    if bias is not None:
        logits = logits + bias
    loss = torch.nn.functional.cross_entropy(logits.double() if x.dtype == torch.float64 else logits.float(),
                                             targets, ignore_index=ignore_index, reduction=reduction)
    return (loss * scale).to(x.dtype)


def _toy_loss_fwd(x, weight, targets, bias, ignore_index, reduction, scale, flag):
    # the loss and its gradients in the forward (saved; the backward only scales them)
    logits = x @ weight.t() + (bias if bias is not None else 0)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    lse = torch.logsumexp(logits, -1)
    per_row = (lse - logits.gather(1, safe[:, None])[:, 0]) * valid
    n = valid.sum().clamp(min=1) if reduction == "mean" else 1
    loss = per_row.sum() / n * scale
    dlogits = torch.softmax(logits, -1)
    dlogits[torch.arange(len(safe)), safe] -= 1
    dlogits = dlogits * valid[:, None] / n * scale
    db = dlogits.sum(0) if bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype)
    return loss, dlogits @ weight, dlogits.t() @ x, db


def _toy_loss_bwd(grad_loss, dx, dw, db):
    return dx * grad_loss, dw * grad_loss, db * grad_loss


TOY_LOSS = OpDecl(
    name="toy_linear_cross_entropy", doc="toy",
    args=(Arg("x", "Tensor", grad=True), Arg("weight", "Tensor", grad=True), Arg("targets", "Tensor"),
          Arg("bias", "Tensor?", None, grad=True), Arg("ignore_index", "int", -100), Arg("reduction", "str", "mean"),
          Arg("scale", "float", 1.0), Arg("flag", "bool", True)),
    results=("loss", "dx", "dweight", "dbias"), returns=1,
    check=lambda *a: None, reference=_toy_loss_ref,
    fake=lambda x, weight, targets, bias, *rest: (x.new_empty(()), x.new_empty(x.shape),
                                                  weight.new_empty(weight.shape), weight.new_empty(weight.shape[0])),
    backward=Backward(args=("dx", "dweight", "dbias"), grads=("x", "weight", "bias"),
                      fake=lambda g, dx, dw, db: (dx.new_empty(dx.shape), dw.new_empty(dw.shape), db.new_empty(db.shape))),
    tolerance={torch.float64: 1e-10},
    cases=(Case("small", lambda dtype, device, gen: (
        torch.randn(5, 4, generator=gen, dtype=dtype), torch.randn(7, 4, generator=gen, dtype=dtype),
        torch.tensor([0, 6, -100, 3, 3]), torch.randn(7, generator=gen, dtype=dtype), -100, "mean", 0.5, True)),),
)

TOY_TOP1 = OpDecl(
    name="toy_top1", doc="toy inference-only op: the index of the largest value per row (int64)",
    args=(Arg("x", "Tensor"), Arg("k", "SymInt", 1)), results=("index",), returns=1,
    check=lambda *a: None, reference=lambda x, k=1: x.argmax(-1),
    fake=lambda x, k: x.new_empty(x.shape[:-1], dtype=torch.int64),
)


def test_declaration_format_handles_a_fused_loss_and_an_inference_only_op():
    for decl in (TOY_LOSS, TOY_TOP1):
        registry.OPS.setdefault(decl.name, decl)
    registry.BACKENDS.setdefault("toy", registry.BackendSpec("toy", None, ()))
    try:
        loss_impl = registry.register_kernels(TOY_LOSS, "toy", "barkgpt_test", _toy_loss_fwd, _toy_loss_bwd,
                                              dtypes=(torch.float64,))
        top1_impl = registry.register_kernels(TOY_TOP1, "toy", "barkgpt_test", lambda x, k: x.argmax(-1),
                                              dtypes=(torch.float32,))
        assert TOY_LOSS.forward_schema() == ("(Tensor x, Tensor weight, Tensor targets, Tensor? bias, "
                                             "int ignore_index, str reduction, float scale, bool flag) "
                                             "-> (Tensor, Tensor, Tensor, Tensor)")
        for bias in (True, False):
            args = list(TOY_LOSS.cases[0].make(torch.float64, "cpu", torch.Generator().manual_seed(0)))
            if not bias:
                args[3] = None
            for i in (0, 1, 3):
                if args[i] is not None:
                    args[i].requires_grad_()
            torch.library.opcheck(loss_impl.forward, tuple(args))
            loss = loss_impl.call(*args)
            assert loss.shape == () and loss.requires_grad
            ins = [t for t in (args[0], args[1], args[3]) if t is not None]
            got = torch.autograd.grad(loss, ins, torch.tensor(3.0, dtype=torch.float64))
            want = torch.autograd.grad(_toy_loss_ref(*args), ins, torch.tensor(3.0, dtype=torch.float64))
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
            if bias:
                assert torch.autograd.gradcheck(
                    lambda x, w, b: loss_impl.call(x, w, args[2], b, -100, "mean", 0.5, True), tuple(ins))
            compiled = torch.compile(lambda *a: loss_impl.call(*a), fullgraph=True, backend="aot_eager")
            torch.testing.assert_close(compiled(*args), loss)
        x = torch.randn(4, 9)
        assert torch.equal(top1_impl.call(x, 1), x.argmax(-1))
        torch.library.opcheck(top1_impl.forward, (x, 1))
        assert top1_impl.backward is None
    finally:
        for decl in (TOY_LOSS, TOY_TOP1):
            registry.OPS.pop(decl.name, None)
            registry._IMPLS.pop((decl.name, "toy"), None)
        registry.BACKENDS.pop("toy", None)


def test_kernels_package_imports_nothing_from_barkgpt():
    import ast

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    for f in sorted(os.listdir(root)):
        if not f.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(root, f), encoding="utf-8").read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.level > 0 or not (node.module or "").startswith("barkgpt"), f"{f}: {node.module}"
                if node.level == 1 and node.module is None and f != "__init__.py":
                    # `from . import x` only for submodules, never names of the package's __init__
                    assert all(os.path.exists(os.path.join(root, a.name + ".py")) for a in node.names), \
                        f"{f} imports from the package's __init__ (a back-edge)"
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("barkgpt") for a in node.names), f


def test_a_bad_declaration_is_refused_at_import():
    base = dict(name="t", doc="", results=("y",), returns=1, check=None, reference=None, fake=None)
    x = Arg("x", "Tensor", grad=True)
    with pytest.raises(ValueError, match="only tensors can have gradients"):
        Arg("k", "int", 1, grad=True)
    with pytest.raises(ValueError, match="unknown type"):
        Arg("k", "long")
    with pytest.raises(ValueError, match="returns must be in 1..1"):
        OpDecl(args=(x,), **{**base, "returns": 2})
    with pytest.raises(ValueError, match="backward argument 'z' is not an input, result or kept value"):
        OpDecl(args=(x,), backward=Backward(args=("z",), grads=("x",), fake=None), **base)
    with pytest.raises(ValueError, match="'k' is not a tensor; declare it in `keep`"):
        OpDecl(args=(x, Arg("k", "int", 1)), backward=Backward(args=("x", "k"), grads=("x",), fake=None), **base)
    with pytest.raises(ValueError, match="gradient for unknown input 'w'"):
        OpDecl(args=(x,), backward=Backward(args=("x",), grads=("w",), fake=None), **base)
    with pytest.raises(ValueError, match="already declared"):
        registry.declare_op(registry.OPS["layer_norm"])
