"""Fused linear + cross-entropy (barkgpt.ops.linear_cross_entropy): what the registry's cases do not
cover.

The loss and every gradient against the float64 reference on the awkward shapes (V = 1, 9, 257
and 50304 with few rows, bias and not, "mean" and "sum", all targets ignored, a non-contiguous
x of any rank, int32 targets, an in-range ignore_index) at the kernels' own chunking are registry
cases (tests/test_ops.py runs barkgpt/opdecls.py's linear_cross_entropy cases on every backend,
the interpreter included, with the bounds these tests held, opdecls.LCE_CLOSE). Here: forced chunk
sizes (N not a multiple of the chunk) and the default chunking, float64 gradcheck, bitwise equal
repeated backward, evaluation without gradient work, the unit upstream gradient, the errors for
bad targets and arguments, memory, opcheck, torch.compile(fullgraph=True), the reference against
its textbook form, and the model's fused loss path against the unfused one. The Triton kernels
run in the interpreter on CPU (conftest.py sets TRITON_INTERPRET=1 without a GPU); shapes stay
small there.
"""

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

from barkgpt import BarkGPT, GPTConfig, ops
from barkgpt.opdecls import LCE_CLOSE
from barkgpt.reference import linear_cross_entropy_math, linear_cross_entropy_ref
from barkgpt.registry import Close

import oracle

HAS_CPP = os.environ.get("BARKGPT_NO_CPP", "") in ("", "0")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _cpp():
    if not HAS_CPP:
        pytest.skip("BARKGPT_NO_CPP is set")
    return importlib.import_module("barkgpt._cpp")


def _device_for(backend):
    """The device a backend's test runs on (loading the cpp backend, or skipping without it)."""
    if backend == "cpp":
        _cpp()
        return "cpu"
    return DEVICE


def _tri():
    return importlib.import_module("barkgpt._triton")


def _inputs(N, C, V, dtype=torch.float32, bias=True, device="cpu", ignore=0.0, noncontig=False):
    if noncontig:  # x is a transposed view: row stride 1, column stride N
        x = torch.randn(C, N).to(device, dtype).t()
    else:
        x = torch.randn(N, C).to(device, dtype)
    w = (torch.randn(V, C) / max(C, 1) ** 0.5).to(device, dtype)
    b = (0.5 * torch.randn(V)).to(device, dtype) if bias else None
    t = torch.randint(0, V, (N,), device=device)
    if ignore:
        t[torch.rand(N, device=device) < ignore] = -100
    return x, w, b, t


def _run(fn, x, w, b, t, g, **kw):
    """(loss, dx, dw, db) of fn with upstream gradient g; inputs are cloned leaves."""
    xs = x.detach().clone().requires_grad_()
    ws = w.detach().clone().requires_grad_()
    bs = b.detach().clone().requires_grad_() if b is not None else None
    loss = fn(xs, ws, t, bs, **kw)
    leaves = [xs, ws] + ([bs] if bs is not None else [])
    grads = torch.autograd.grad(loss, leaves, g.to(loss.dtype))
    return (loss,) + tuple(grads) + ((None,) if bs is None else ())


def _check(fn, x, w, b, t, backend, ignore_index=-100, reduction="mean", bounds=LCE_CLOSE, **kw):
    """fn(x, w, t, b, ignore_index=, reduction=) and its gradients against the declaration's
    reference (float64): the declared tolerance and the fused loss cases' bounds for ``backend``."""
    oracle.check_op("linear_cross_entropy", lambda x, w, t, b, ii, red: fn(x, w, t, b, ignore_index=ii, reduction=red),
                    [x, w, t, b, ignore_index, reduction], x.dtype, bounds=bounds, backend=backend, **kw)


def _cpp_call(chunk_rows=0):
    cpp = _cpp()
    return lambda x, w, t, b, **kw: cpp.linear_cross_entropy(x, w, t, b, chunk_rows=chunk_rows, **kw)


def _tri_call(chunk_rows=0):
    tri = _tri()
    return lambda x, w, t, b, **kw: tri.linear_cross_entropy(x, w, t, b, chunk_rows=chunk_rows, **kw)


def _ops_call(backend):
    return lambda x, w, t, b, **kw: ops.linear_cross_entropy(x, w, t, b, backend=backend, **kw)


# (N, C, V, chunk_rows): chunks that split N unevenly (the kernels' own choice, chunk_rows 0, is
# the registry's).
CASES = [(7, 8, 1, 3), (37, 16, 9, 8), (33, 16, 257, 7), (2, 8, 50304, 1)]


@pytest.mark.parametrize("N,C,V,rows", CASES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cpp_forced_chunks(N, C, V, rows, bias, reduction):
    x, w, b, t = _inputs(N, C, V, bias=bias, ignore=0.2)
    _check(_cpp_call(rows), x, w, b, t, "cpp", reduction=reduction)


def test_cpp_default_chunking_several_chunks():
    # V = 50304 makes the default chunk 80 rows: 200 rows are chunks of 80, 80 and 40.
    x, w, b, t = _inputs(200, 8, 50304, ignore=0.1)
    _check(_cpp_call(0), x, w, b, t, "cpp")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpp_half_inputs_forced_chunks(dtype):
    x, w, b, t = _inputs(37, 16, 9, dtype=dtype, ignore=0.2)
    _check(_cpp_call(8), x, w, b, t, "cpp")


def test_cpp_float64():
    x, w, b, t = _inputs(19, 8, 13, dtype=torch.float64, ignore=0.2)
    _check(_cpp_call(4), x, w, b, t, "cpp", bounds={torch.float64: Close(relative=1e-12)})
    xs, ws, bs = (v.detach().clone().requires_grad_() for v in (x, w, b))
    assert torch.autograd.gradcheck(lambda a, c, d: _cpp().linear_cross_entropy(a, c, t, d, chunk_rows=4),
                                    (xs, ws, bs))


@pytest.mark.parametrize("N,C,V,rows", [(37, 16, 9, 8), (33, 16, 257, 7)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_triton_forced_chunks(N, C, V, rows, bias, reduction):
    x, w, b, t = _inputs(N, C, V, bias=bias, device=DEVICE, ignore=0.2)
    _check(_tri_call(rows), x, w, b, t, "triton", reduction=reduction)


def test_triton_fp16_forced_chunks():
    x, w, b, t = _inputs(37, 16, 9, dtype=torch.float16, device=DEVICE, ignore=0.2)
    _check(_tri_call(8), x, w, b, t, "triton")


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_repeated_backward_is_bitwise_equal(backend):
    dev = _device_for(backend)
    x, w, b, t = _inputs(45, 16, 257, device=dev, ignore=0.1)
    g = torch.randn((), device=dev)
    call = _cpp_call(8) if backend == "cpp" else _tri_call(8)
    first = _run(call, x, w, b, t, g)
    for _ in range(2):
        again = _run(call, x, w, b, t, g)
        for a, e in zip(again, first):
            assert torch.equal(a, e)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("bad", [9, 1000, -1, -101])
def test_out_of_range_targets_raise(backend, bad):
    dev = _device_for(backend)
    x, w, b, t = _inputs(6, 8, 9, device=dev)
    t[4] = bad
    with pytest.raises(IndexError, match=f"target {bad} is out of range for 9 classes"):
        ops.linear_cross_entropy(x.requires_grad_(), w, t, b, backend=backend)
    with torch.no_grad():
        with pytest.raises(IndexError, match="out of range"):
            ops.linear_cross_entropy(x, w, t, b, backend=backend)


def test_out_of_range_target_raises_under_compile():
    _cpp()
    x, w, b, t = _inputs(6, 8, 9)
    t[2] = 9
    fn = torch.compile(lambda x, w, t, b: ops.linear_cross_entropy(x, w, t, b, backend="cpp"),
                       fullgraph=True, backend="eager")
    with pytest.raises(IndexError, match="out of range"):
        fn(x, w, t, b)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_bad_arguments_get_clear_errors(backend):
    _device_for(backend)
    x, w, b, t = _inputs(6, 8, 9)
    lce = ops.linear_cross_entropy
    with pytest.raises(ValueError, match=r"weight must have shape \(V, 8\)"):
        lce(x, torch.randn(9, 7), t, backend=backend)
    with pytest.raises(ValueError, match=r"targets must have shape \(6,\)"):
        lce(x, w, t[:5], backend=backend)
    with pytest.raises(ValueError, match=r"bias must have shape \(9,\)"):
        lce(x, w, t, torch.randn(8), backend=backend)
    with pytest.raises(TypeError, match="targets must hold integer class ids"):
        lce(x, w, t.float(), backend=backend)
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        lce(x.long(), w, t, backend=backend)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        lce(x, w, t, reduction="none", backend=backend)
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        lce(x, w.to("meta"), t, backend=backend)
    with pytest.raises(ValueError, match="weight has no rows"):
        lce(x, torch.randn(0, 8), t, backend=backend)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        lce(x, w, t, ignore_index=1.5, backend=backend)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        lce(x.tolist(), w, t, backend=backend)


def test_triton_rejects_float64():
    x, w, b, t = _inputs(4, 8, 9, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="use backend='torch'"):
        ops.linear_cross_entropy(x, w, t, b, backend="triton")


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_no_grad_skips_gradient_work_and_gives_the_same_loss(backend, monkeypatch):
    mod = _cpp() if backend == "cpp" else _tri()
    dev = "cpu" if backend == "cpp" else DEVICE
    x, w, b, t = _inputs(20, 8, 257, device=dev, ignore=0.2)
    kernel = mod._lce_kernel
    seen = []

    def spy(*args):
        seen.append(args[6])  # compute_grad
        out = kernel(*args)
        assert (out[1].numel() > 0) == args[6]
        return out

    monkeypatch.setattr(mod, "_lce_kernel", spy)
    with torch.no_grad():
        l0 = ops.linear_cross_entropy(x.requires_grad_(), w, t, b, backend=backend)
    l1 = ops.linear_cross_entropy(x, w, t, b, backend=backend)
    l2 = ops.linear_cross_entropy(x.detach(), w, t, b, backend=backend)  # nothing requires grad
    assert seen == [False, True, False]
    assert torch.equal(l0, l1.detach()) and torch.equal(l0, l2)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_unit_upstream_gradient_and_retain_graph(backend):
    # loss.backward() (upstream 1) hands the saved gradients on without a copy: accumulating
    # twice with retain_graph must still give exactly twice the gradient, and the first
    # backward's result must not change when the second runs.
    dev = _device_for(backend)
    x, w, b, t = _inputs(30, 8, 257, device=dev, ignore=0.1)
    x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    loss = ops.linear_cross_entropy(x, w, t, b, backend=backend)
    gx1, gw1, gb1 = torch.autograd.grad(loss, (x, w, b), retain_graph=True)
    keep = [g.clone() for g in (gx1, gw1, gb1)]
    loss.backward(retain_graph=True)
    loss.backward()
    for leaf, g in zip((x, w, b), keep):
        assert torch.equal(leaf.grad, 2 * g)
    for g, k in zip((gx1, gw1, gb1), keep):
        assert torch.equal(g, k)
    _check(_ops_call(backend), x, w, b, t, backend, upstream=lambda o, gen: torch.ones_like(o))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_fwd_bwd_extra_memory_is_far_below_the_weight_size(backend):
    # Peak RSS growth of one warm fwd+bwd in a fresh process, minus the weight gradient: the
    # chunk buffer and dx only. Autograd's materialized zero gradients for the unused outputs
    # (dx, dweight, dbias) used to add a weight-sized tensor here.
    _device_for(backend)
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    from helpers import run_python

    code = f"""
        import ctypes, gc, json, torch
        from barkgpt import ops
        def kb(field):
            return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(field + ':'))
        V, C, N = 20000, 256, 64
        x = torch.randn(N, C, requires_grad=True)
        w = (torch.randn(V, C) / 16).requires_grad_()
        t = torch.randint(0, V, (N,))
        step = lambda: torch.autograd.grad(ops.linear_cross_entropy(x, w, t, backend={backend!r}), (x, w))
        step()
        gc.collect(); ctypes.CDLL('libc.so.6').malloc_trim(0)
        open('/proc/self/clear_refs', 'w').write('5')
        base = kb('VmRSS')
        g = step()
        print(json.dumps((kb('VmHWM') - base) * 1024 - w.numel() * 4))
    """
    p = run_python(code, env={"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    extra = int(p.stdout.strip().splitlines()[-1])
    weight_bytes = 20000 * 256 * 4
    assert extra < 0.5 * weight_bytes, f"extra {extra / 2**20:.1f} MB, weight {weight_bytes / 2**20:.1f} MB"


def _opcheck_samples(device):
    out = []
    for N, C, V, bias, red in [(5, 8, 9, True, "mean"), (13, 16, 257, False, "sum"), (4, 8, 1, True, "mean")]:
        x, w, b, t = _inputs(N, C, V, bias=bias, device=device, ignore=0.2)
        out.append((x.requires_grad_(), w.requires_grad_(), t,
                    b.requires_grad_() if b is not None else None, -100, red))
    return out


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_opcheck_declared_kernels(backend):
    from barkgpt import registry

    dev = _device_for(backend)
    impl = registry.implementation("linear_cross_entropy", backend)
    for args in _opcheck_samples(dev):
        torch.library.opcheck(impl.forward, args)
        _, dx, dw, db = impl.forward(*args)
        torch.library.opcheck(impl.backward, (torch.randn(()), dx.detach(), dw.detach(), db.detach()))


def test_opcheck_cpp_options_kernel():
    # An internal kernel without autograd of its own (called inside the eager autograd Function
    # or without gradients): opcheck it on inputs that do not require grad.
    cpp = _cpp()
    for args in _opcheck_samples("cpu"):
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        for grad, rows in ((True, 3), (False, 0)):
            torch.library.opcheck(cpp._ops.linear_cross_entropy_fwd_ex.default, args + (grad, rows))


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_torch_compile_fullgraph(backend):
    dev = _device_for(backend)
    x, w, b, t = _inputs(21, 16, 257, device=dev, ignore=0.2)

    def fn(x, w, t, b, ignore_index, reduction):
        return ops.linear_cross_entropy(x, w, t, b, ignore_index, reduction, backend=backend)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    _check(compiled, x, w, b, t, backend)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("reduction, ignore_index, all_ignored", [("mean", -100, False), ("sum", -100, False),
                                                                    ("mean", 7, False), ("mean", -100, True)])
def test_reference_matches_f_cross_entropy_and_textbook_form(dtype, tol, reduction, ignore_index, all_ignored):
    # The oracle's own test: the declaration's reference (the registry's float64 oracle) against
    # the log-sum-exp written out by hand (reference.linear_cross_entropy_math) in float64.
    x, w, b, t = _inputs(30, 8, 9, dtype=dtype, ignore=0.3)
    if ignore_index >= 0:
        t[t == -100] = ignore_index
    if all_ignored:
        t.fill_(ignore_index)
    kw = dict(ignore_index=ignore_index, reduction=reduction)
    if not all_ignored:
        want = F.cross_entropy(x @ w.t() + b, t, **kw)
        assert torch.allclose(linear_cross_entropy_ref(x, w, t, b, **kw), want, atol=1e-6)
    g = torch.randn(())
    got = _run(lambda *a, **k: linear_cross_entropy_ref(*a, **k), x, w, b, t, g, **kw)
    d64 = [v.detach().double() for v in (x, w, b)]
    want = _run(lambda *a, **k: linear_cross_entropy_math(*a, **k), d64[0], d64[1], d64[2], t, g.double(), **kw)
    for name, a, e in zip(("loss", "dx", "dweight", "dbias"), got, want):
        oracle.check_close(a, e, Close(relative=tol), name)


def test_reference_takes_any_rank_strided_x_and_int32_targets():
    # The torch backend (the reference) on the layout the kernels' registry case uses: x a (5, 3,
    # 16) view no stride flattens, int32 targets, an in-range ignore_index.
    x = torch.randn(5, 16, 3, dtype=torch.float64).permute(0, 2, 1)
    w = torch.randn(257, 16, dtype=torch.float64) / 4
    t = torch.randint(0, 257, (5, 3), dtype=torch.int32)
    t[1, 2] = t[4, 0] = 7
    g = torch.randn((), dtype=torch.float64)
    got = _run(lambda *a, **k: linear_cross_entropy_ref(*a, **k), x, w, None, t, g, ignore_index=7)
    want = _run(lambda *a, **k: linear_cross_entropy_math(*a, **k), x, w, None, t.long(), g, ignore_index=7)
    for name, a, e in zip(("loss", "dx", "dweight"), got, want):
        oracle.check_close(a, e, Close(relative=1e-12), name)


# ---- GPU only: bf16, the GPT-2 head, compiled, memory ---------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("N", [1000, 4099])
def test_triton_gpu_gpt2_head(dtype, N):
    x, w, b, t = _inputs(N, 768, 50304, dtype=dtype, bias=False, device="cuda", ignore=0.05)
    tol = 2e-5 * 50 if dtype == torch.float32 else 3e-2  # TF32-free cuBLAS fp32; half logits
    _check(_ops_call("triton"), x, w, None, t, "triton", bounds={dtype: Close(relative=tol)}, declared=False)


@pytest.mark.gpu
def test_triton_gpu_memory_is_a_fraction_of_eager():
    N, C, V = 8192, 768, 50304
    x, w, _, t = _inputs(N, C, V, dtype=torch.bfloat16, bias=False, device="cuda")
    x.requires_grad_(), w.requires_grad_()

    def extra(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        gx, gw = torch.autograd.grad(fn(), (x, w))
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base - gw.numel() * gw.element_size()

    fused = extra(lambda: ops.linear_cross_entropy(x, w, t, backend="triton"))
    eager = extra(lambda: F.cross_entropy((x @ w.t()).float(), t))
    assert fused <= eager / 4, (fused, eager)


@pytest.mark.gpu
def test_triton_gpu_compiled_inductor():
    x, w, b, t = _inputs(300, 64, 1000, device="cuda", ignore=0.1)
    fn = torch.compile(lambda x, w, t, b, **kw: ops.linear_cross_entropy(x, w, t, b, backend="triton", **kw),
                       fullgraph=True)
    _check(fn, x, w, b, t, "triton", bounds={torch.float32: Close(relative=2e-5 * 50)}, declared=False)


# ---- the model ---------------------------------------------------------------------------------

def _model_grads(model, idx, tgt, **kw):
    model.zero_grad(set_to_none=True)
    logits, loss = model(idx, tgt, **kw)
    loss.backward()
    return logits, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("tie", [True, False])
def test_model_fused_loss_equals_unfused(backend, tie):
    # float64 model: the fused and the plain path agree to rounding.
    _device_for(backend)
    cfg = GPTConfig(vocab_size=300, n_embd=32, n_head=2, n_layer=2, block_size=16,
                    tie_embeddings=tie, dropout=0.0)
    model = BarkGPT(cfg, backend=backend).double()
    idx = torch.randint(0, 300, (3, 16))
    tgt = torch.randint(0, 300, (3, 16))
    tgt[0, :5] = -100
    logits, loss, grads = _model_grads(model, idx, tgt)
    assert logits is None  # the fused path builds no logits
    ref_logits, ref_loss, ref_grads = _model_grads(model, idx, tgt, return_logits=True)
    assert ref_logits.shape == (3, 16, 300)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    assert ref_grads.keys() == grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-10, atol=1e-12, msg=n)
    if tie:  # the head's gradient reaches the shared table
        assert model.head.weight is model.token_emb.weight


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_model_fused_loss_equals_unfused_fp32(backend):
    dev = _device_for(backend)
    cfg = GPTConfig(vocab_size=257, n_embd=32, n_head=2, n_layer=1, block_size=8, dropout=0.0)
    model = BarkGPT(cfg, backend=backend).to(dev)
    idx = torch.randint(0, 257, (2, 8), device=dev)
    tgt = torch.randint(0, 257, (2, 8), device=dev)
    tgt[1, 3:] = -100
    logits, loss, grads = _model_grads(model, idx, tgt)
    assert logits is None
    _, ref_loss, ref_grads = _model_grads(model, idx, tgt, return_logits=True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for n in grads:
        scale = ref_grads[n].abs().max().item()
        assert (grads[n] - ref_grads[n]).abs().max().item() <= 2e-5 * scale, n


def test_model_below_fused_loss_min_vocab_takes_the_plain_path_with_the_same_result(monkeypatch):
    cfg = GPTConfig(vocab_size=9, n_embd=16, n_head=2, n_layer=1, block_size=8, dropout=0.0)
    model = BarkGPT(cfg, backend="torch").double()
    idx = torch.randint(0, 9, (2, 8))
    _, fused, fused_grads = _model_grads(model, idx, idx)
    calls = []
    real = ops.linear_cross_entropy
    monkeypatch.setattr(ops, "linear_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    model.fused_loss_min_vocab = 10
    none, plain, grads = _model_grads(model, idx, idx)
    assert none is None and calls == []  # the plain path: the fused op was not called
    torch.testing.assert_close(plain, fused, rtol=1e-12, atol=1e-12)
    for n in grads:
        torch.testing.assert_close(grads[n], fused_grads[n], rtol=1e-10, atol=1e-12)
    model.fused_loss_min_vocab = 9
    _model_grads(model, idx, idx)
    assert calls == [1]


def test_model_inference_returns_logits_and_eval_loss_builds_none():
    cfg = GPTConfig(vocab_size=300, n_embd=32, n_head=2, n_layer=1, block_size=8, dropout=0.0)
    model = BarkGPT(cfg, backend="torch").eval()
    idx = torch.randint(0, 300, (2, 8))
    logits = model(idx)
    assert logits.shape == (2, 8, 300)
    with torch.no_grad():
        none, loss = model(idx, idx)
    assert none is None
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 300), idx.reshape(-1)))
    torch.testing.assert_close(model.loss(idx, idx), loss)
