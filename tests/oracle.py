"""The one oracle comparison of the tests: an op's results and every gradient (random upstream
gradient) against its declaration's reference (barkgpt/opdecls.py) run in float64, within the
declaration's tolerance for the dtype and a case's own tighter bounds (registry.Close).

tests/test_ops.py runs it over every declared case on every backend; the backend-specific tests
(tile tables, forced split counts, chunk sizes) call it for inputs only they can make.
"""

import torch

from barkgpt import registry


def as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def leaves(decl, args):
    """``args`` with each differentiable tensor argument detached into a leaf that requires grad
    (views keep their strides)."""
    args = list(args)
    for i, a in enumerate(decl.args):
        if a.grad and args[i] is not None:
            args[i] = args[i].detach().requires_grad_()
    return args


def grad_inputs(decl, args):
    return [args[i] for i, a in enumerate(decl.args) if a.grad and args[i] is not None]


def grad_names(decl, args):
    return [a.name for i, a in enumerate(decl.args) if a.grad and args[i] is not None]


def upstream_for(outs, make=None, seed=1):
    """One upstream gradient per result: ``make(result, generator)`` or contiguous randn."""
    gen = torch.Generator().manual_seed(seed)
    if make is None:
        return [torch.randn(o.shape, generator=gen).to(device=o.device, dtype=o.dtype) for o in outs]
    ups = [make(o, gen) for o in outs]
    for u, o in zip(ups, outs):
        assert u.shape == o.shape and u.dtype == o.dtype and u.device == o.device
    return ups


def run(decl, fn, args, upstream):
    """(results, gradients of the differentiable inputs) of ``fn(*args)``."""
    outs = as_tuple(fn(*args))
    ins = grad_inputs(decl, args)
    grads = torch.autograd.grad(outs, ins, upstream) if decl.backward is not None and ins else ()
    return outs, tuple(grads)


def _f64(decl, args):
    out = []
    for a, t in zip(decl.args, args):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            t = t.detach().double()
            if a.grad:
                t.requires_grad_()
        out.append(t)
    return out


def _own_dtype(decl, args):
    return [t.detach().clone().requires_grad_() if a.grad and t is not None else t for a, t in zip(decl.args, args)]


def close(actual, expected, tol, name):
    """max |actual - expected| <= tol * max(1, max |expected|): the declarations' criterion."""
    a, e = actual.double(), expected.double()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    if not e.numel():
        return
    scale = max(1.0, e.abs().max().item())
    err = (a - e).abs().max().item()
    assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol} * {scale:.3g}"


def _elementwise(a, e, atol, rtol, name, what):
    excess = (a - e).abs() - (atol + rtol * e.abs())
    if excess.numel() and excess.max().item() > 0:
        i = int(excess.flatten().argmax())
        raise AssertionError(f"{name}: |got - {what}| = {abs(a.flatten()[i] - e.flatten()[i]).item():.3g} > "
                             f"{atol:.3g} + {rtol:.3g} * {abs(e.flatten()[i].item()):.3g} at flat index {i}")


def check_close(actual, expected, bound, name, own=None, result=False):
    """The :class:`registry.Close` bounds of one tensor; ``expected`` is the float64 reference,
    ``own`` the reference run in the case's dtype (needed by ill_conditioned / vs_reference)."""
    a, e = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(a).all() or not torch.isfinite(e).all(), f"{name} has non-finite values"
    if not e.numel():
        return
    if bound.rounded:
        e = e.to(actual.dtype).double()
    own_err = 0.0
    if bound.ill_conditioned or bound.vs_reference:
        assert own is not None, f"{name}: the bound needs the reference run in the case's dtype"
        r = own.detach().double()
        own_err = (r - expected.detach().double()).abs().max().item() if bound.ill_conditioned else 0.0
    if bound.elementwise is not None:
        atol, rtol = bound.elementwise
        _elementwise(a, e, max(atol, bound.ill_conditioned * own_err), rtol, name, "reference")
    if bound.relative is not None:
        err, scale = (a - e).abs().max().item(), e.abs().max().item()
        assert err <= bound.relative * scale, f"{name}: max error {err:.3g} > {bound.relative} * {scale:.3g}"
    if bound.vs_reference is not None:
        atol, rtol = bound.vs_reference
        _elementwise(a, r, atol + own_err, rtol, name, "reference in the case's dtype")
    if bound.exact_results and result:
        want = expected.detach().to(actual.dtype)
        assert torch.equal(actual.detach(), want), f"{name}: not the reference rounded once to {actual.dtype}"
    if bound.exact_zeros:
        zero = e == 0
        assert torch.equal(a[zero], torch.zeros_like(a[zero])), f"{name}: nonzero where the reference is exactly 0"


def bounds_for(bounds, dtype, backend=None):
    """The registry.Close bounds of ``dtype`` (a Close or a tuple of them) that hold for ``backend``."""
    b = (bounds or {}).get(dtype)
    if b is None:
        return []
    return [c for c in (b if isinstance(b, tuple) else (b,)) if c.backends is None or backend in c.backends]


def check_op(op, fn, args, dtype, *, upstream=None, tolerance=None, bounds=None, backend=None, seed=1,
             declared=True):
    """``fn(*args)`` (the op's returned results) and the gradients of its differentiable inputs
    against the declaration's reference in float64. ``dtype`` picks the declared tolerance;
    ``tolerance`` (tighter, per dtype), ``bounds`` (registry.Close or a tuple of them per dtype;
    ``backend`` picks those that name it) and ``upstream`` (a layout maker) are a case's.
    ``declared=False`` leaves out the declared tolerance, for a bound of another kind at sizes
    the declaration's cases do not reach (the GPU tests' GPT-2 head). Returns (results, gradients)."""
    decl = registry.OPS[op]
    args = leaves(decl, args)
    outs = as_tuple(fn(*args))
    ups = upstream_for(outs, upstream, seed)
    ins = grad_inputs(decl, args)
    grads = tuple(torch.autograd.grad(outs, ins, ups)) if decl.backward is not None and ins else ()
    ref_outs, ref_grads = run(decl, decl.reference, _f64(decl, args), [u.double() for u in ups])
    checks = bounds_for(bounds, dtype, backend)
    own_outs, own_grads = ((), ())
    if any(c.ill_conditioned or c.vs_reference for c in checks):
        own_outs, own_grads = run(decl, decl.reference, _own_dtype(decl, args), ups)
    base = decl.tolerance[dtype]
    if tolerance and dtype in tolerance:
        base = min(base, tolerance[dtype])

    # a tensor kept in a lower precision than the case's dtype (fp32 weights of fp64 activations)
    # is held to that precision's tolerance
    def tol(t):
        return base if t.dtype == dtype else max(base, decl.tolerance.get(t.dtype, 0.0))

    with torch.no_grad():
        want_dtypes = [o.dtype for o in as_tuple(decl.reference(*[a.detach() if isinstance(a, torch.Tensor) else a
                                                                  for a in args]))]
    names = [f"result {i}" for i in range(len(outs))] + [f"d{n}" for n in grad_names(decl, args)]
    got = list(outs) + list(grads)
    want = list(ref_outs) + list(ref_grads)
    own = list(own_outs) + list(own_grads) if own_outs else [None] * len(got)
    assert len(got) == len(want), f"{len(got)} results and gradients, the reference has {len(want)}"
    for i, (o, d) in enumerate(zip(outs, want_dtypes)):
        assert o.dtype == d, f"result {i}: dtype {o.dtype}, the reference gives {d}"
    for g, x, n in zip(grads, ins, names[len(outs):]):
        assert g.dtype == x.dtype, f"{n}: dtype {g.dtype} != {x.dtype}"
        assert g.device == x.device, f"{n}: device {g.device} != {x.device}"
    for i, (name, g, w, r) in enumerate(zip(names, got, want, own)):
        if declared:
            close(g, w, tol(g), name)
        for c in checks:
            check_close(g, w, c, name, r, result=i < len(outs))
    return outs, grads
