"""Triton LayerNorm (barkgpt.kernels.layer_norm) against reference.py, F.layer_norm and a float64 oracle.

On a machine without CUDA the kernels run on CPU tensors under TRITON_INTERPRET=1 (set by
conftest.py); the same tests run compiled when a GPU is present, and ``gpu``-marked tests add
bf16, GPU-sized shapes and torch.compile with inductor. Every gradient is taken with a random
upstream gradient.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

from barkgpt import ops, reference

triton_backend = importlib.import_module("barkgpt._triton")  # registers the barkgpt_triton ops

kln = importlib.import_module("barkgpt.kernels.layer_norm")

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

# Max-abs tolerances against a float64 oracle, inputs and upstream gradients ~N(0, 1).
# fp32: fp32 math throughout (observed <= 1e-5 on O(1) values; dweight/dbias sum thousands
# of rows, hence rtol). fp16: one rounding of the fp16 output / dx (observed <= 1 ulp = 2e-3 on
# values up to ~4); fp32 dweight/dbias stay at fp32 accuracy.
TOL = {torch.float32: dict(atol=5e-5, rtol=1e-5), torch.float16: dict(atol=5e-3, rtol=5e-3)}
NAMES = ("y", "dx", "dweight", "dbias")


def _inputs(shape, dtype, w_dtype=None, bias=True, device=DEVICE):
    n = shape[-1]
    w_dtype = w_dtype or dtype
    x = torch.randn(shape).to(device, dtype).requires_grad_()
    w = (1 + 0.5 * torch.randn(n)).to(device, w_dtype).requires_grad_()
    b = (0.5 * torch.randn(n)).to(device, w_dtype).requires_grad_() if bias else None
    return x, w, b


def _grads(fn, x, w, b, dy, eps=1e-5):
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    b2 = b.detach().clone().requires_grad_() if b is not None else None
    y = fn(x2, w2, b2, eps)
    leaves = (x2, w2) + ((b2,) if b2 is not None else ())
    return (y,) + torch.autograd.grad(y, leaves, dy)


def _triton(x, w, b, dy, eps=1e-5):
    return _grads(lambda *a: ops.layer_norm(*a, backend="triton"), x, w, b, dy, eps)


def _oracle(x, w, b, dy, eps=1e-5):
    """Textbook LayerNorm (reference.layer_norm_math) in float64 on CPU."""
    cast = (lambda t: t.detach().to("cpu", torch.float64))
    return _grads(reference.layer_norm_math, cast(x), cast(w), cast(b) if b is not None else None,
                  cast(dy), eps)


def _assert_close(got, want, names=NAMES, **tol):
    assert len(got) == len(want)
    for name, g, w in zip(names, got, want):
        assert g.shape == w.shape, name
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
        torch.testing.assert_close(g.detach().to("cpu", torch.float64), w.detach().to("cpu", torch.float64),
                                   msg=lambda m, name=name: f"{name}: {m}", **tol)


def _max_err(a, b):
    return (a.detach().to("cpu", torch.float64) - b.detach().to("cpu", torch.float64)).abs().max().item()


def _assert_matches_oracle_and_reference(got, x, w, b, dy, tol):
    """Within ``tol`` of the float64 oracle, or, where the data is ill-conditioned (a row of
    nearly equal values has a large rstd that multiplies every rounding error), no worse than
    2x PyTorch's own error in the same dtype; and within ``tol`` plus that error of reference.py."""
    oracle = _oracle(x, w, b, dy)
    ref = _grads(reference.layer_norm_ref, x, w, b, dy)
    for name, g, o, r in zip(NAMES, got, oracle, ref):
        ref_err = _max_err(r, o) if o.numel() else 0.0
        _assert_close((g,), (o,), names=(name,), atol=max(tol["atol"], 2 * ref_err), rtol=tol["rtol"])
        _assert_close((g,), (r,), names=(name,), atol=tol["atol"] + ref_err, rtol=tol["rtol"])


def _check(shape, dtype, w_dtype=None, bias=True, dy=None):
    x, w, b = _inputs(shape, dtype, w_dtype, bias)
    dy = torch.randn(shape).to(DEVICE, dtype) if dy is None else dy
    got = _triton(x, w, b, dy)
    # Each result in its own tensor's dtype and device (fp16 x with fp32 weight: fp32 dweight).
    for g, t in zip(got, (x, x, w, b)):
        assert g.dtype == t.dtype and g.device == t.device
    _assert_matches_oracle_and_reference(got, x, w, b, dy, TOL[dtype])
    return got


# (rows, width): every width of the issue, rows 1 / 7 / 4097 spread over them (the interpreter
# runs one Python iteration per program, so 4097 rows go with narrow widths).
SHAPES = [(1, 1), (7, 1), (4097, 1), (7, 3), (4097, 3), (1, 8), (4097, 8), (7, 32), (7, 97), (1, 97),
          (7, 128), (7, 768), (1, 1500), (7, 1500), (7, 1536), (3, 4096)]


@pytest.mark.parametrize("rows,n", SHAPES)
def test_matches_oracle_and_reference_fp32(rows, n):
    _check((rows, n), torch.float32)


@pytest.mark.parametrize("rows,n", [(7, 1), (7, 3), (4097, 8), (7, 97), (7, 768), (7, 1500), (3, 4096)])
def test_matches_oracle_and_reference_fp16(rows, n):
    _check((rows, n), torch.float16)


@pytest.mark.parametrize("rows,n", [(7, 3), (513, 8), (7, 97), (7, 1536)])
def test_bias_none(rows, n):
    got = _check((rows, n), torch.float32, bias=False)
    assert len(got) == 3


@pytest.mark.parametrize("shape", [(2, 3, 97), (2, 2, 3, 8)])
def test_any_rank(shape):
    _check(shape, torch.float32)


@pytest.mark.parametrize("n", [8, 97, 768])
def test_fp16_input_fp32_params(n):
    """Autocast style: fp16 activations, fp32 parameters; output fp16, dweight/dbias fp32."""
    _check((33, n), torch.float16, w_dtype=torch.float32)


def test_matches_torch_layer_norm():
    x, w, b = _inputs((5, 7, 97), torch.float32)
    dy = torch.randn(5, 7, 97, device=DEVICE)
    got = _triton(x, w, b, dy)
    want = _grads(lambda x, w, b, eps: F.layer_norm(x, (97,), w, b, eps), x, w, b, dy)
    _assert_close(got, want, **TOL[torch.float32])


def test_eps_is_used():
    # Constant rows: var = 0, so y = bias and dx = 0 only through eps (no division by zero).
    x = torch.full((4, 16), 3.0, device=DEVICE, requires_grad=True)
    w = torch.randn(16, device=DEVICE, requires_grad=True)
    b = torch.randn(16, device=DEVICE, requires_grad=True)
    dy = torch.randn(4, 16, device=DEVICE)
    got = _triton(x, w, b, dy, eps=0.1)
    _assert_close(got, _oracle(x, w, b, dy, eps=0.1), **TOL[torch.float32])
    x2 = x.detach() + torch.randn(4, 16, device=DEVICE)
    big = ops.layer_norm(x2, w, b, eps=100.0, backend="triton")
    torch.testing.assert_close(big, F.layer_norm(x2, (16,), w, b, 100.0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_noncontiguous_input_and_upstream_grad(dtype):
    # x: a transposed view (column stride != 1); dy: a strided slice of a wider buffer.
    _, w, b = _inputs((33, 97), dtype)
    xt = torch.randn(97, 33).to(DEVICE, dtype).t().requires_grad_()  # (33, 97), strides (1, 33)
    dy = torch.randn(33, 2 * 97, device=DEVICE).to(dtype)[:, ::2]
    assert not xt.is_contiguous() and not dy.is_contiguous()
    got = _grads(lambda *a: ops.layer_norm(*a, backend="triton"), xt, w, b, dy)
    _assert_matches_oracle_and_reference(got, xt, w, b, dy, TOL[dtype])


def test_unmergeable_view_and_expanded_grad():
    # A permuted 3-D view whose rows cannot be flattened to one stride, and a stride-0 grad.
    base, w, b = _inputs((4, 5, 97), torch.float32)
    x = base.detach().permute(1, 0, 2)  # (5, 4, 97)
    dy = torch.randn(1, 1, 97, device=DEVICE).expand(5, 4, 97)
    got = _grads(lambda *a: ops.layer_norm(*a, backend="triton"), x, w, b, dy)
    _assert_close(got, _oracle(x, w, b, dy), **TOL[torch.float32])


def test_params_not_contiguous():
    x, _, _ = _inputs((7, 97), torch.float32)
    w = (1 + torch.randn(2 * 97, device=DEVICE))[::2].requires_grad_()
    b = torch.randn(97, 2, device=DEVICE)[:, 1].requires_grad_()
    assert not w.is_contiguous() and not b.is_contiguous()
    dy = torch.randn(7, 97, device=DEVICE)
    _assert_close(_triton(x, w, b, dy), _oracle(x, w, b, dy), **TOL[torch.float32])


@pytest.mark.parametrize("rows,n,max_fused", [(7, 97, 32), (513, 40, 32), (5, 1500, 512)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_chunked_path(monkeypatch, rows, n, max_fused, dtype):
    """Rows wider than _MAX_FUSED_N loop over column chunks (last chunk partial); lowered here
    so the interpreter covers that path at small widths."""
    monkeypatch.setattr(kln, "_MAX_FUSED_N", max_fused)
    assert not kln._fwd_config(rows, n, torch.device(DEVICE)).single
    assert not kln._bwd_config(rows, n, torch.device(DEVICE))[0].single
    _check((rows, n), dtype)


def test_width_above_16k():
    _check((2, 16411), torch.float32)


def test_backward_is_bitwise_deterministic():
    x, w, b = _inputs((4097, 24), torch.float32)
    dy = torch.randn(4097, 24, device=DEVICE)
    first = _triton(x, w, b, dy)
    second = _triton(x, w, b, dy)
    for name, a, c in zip(NAMES, first, second):
        assert torch.equal(a, c), name


def test_first_call_on_new_shape_equals_second():
    # A shape no other test uses, so the first call here is the first launch of this config.
    x, w, b = _inputs((67, 211), torch.float32)
    dy = torch.randn(67, 211, device=DEVICE)
    first = _triton(x, w, b, dy)
    second = _triton(x, w, b, dy)
    for name, a, c in zip(NAMES, first, second):
        assert torch.equal(a, c), name


def test_partials_cover_every_row():
    # dweight / dbias must see all rows whatever the grid: rows = programs * tile + 1.
    cfg, grid = kln._bwd_config(4097, 8, torch.device(DEVICE))
    assert grid * cfg.block_m < 4097  # several tiles per program: the persistent loop is exercised
    x, w, b = _inputs((4097, 8), torch.float32)
    dy = torch.zeros(4097, 8, device=DEVICE)
    dy[-1] = 1.0  # only the last row contributes
    _, _, dw, db = _triton(x, w, b, dy)
    torch.testing.assert_close(db, torch.ones(8, device=DEVICE))
    xhat = F.layer_norm(x.detach()[-1], (8,))
    torch.testing.assert_close(dw, xhat, atol=1e-5, rtol=1e-5)


def test_config_heuristic():
    dev = torch.device("cuda") if HAS_CUDA else torch.device("cpu")
    for n in (1, 3, 8, 32, 97, 128, 768, 1024, 1536, 4096, 8192, 16384, 65536):
        for m in (1, 7, 4097, 1 << 20):
            f = kln._fwd_config(m, n, dev)
            (b, g) = kln._bwd_config(m, n, dev)
            for c in (f, b):
                assert c.block_m >= 1 and c.block_m & (c.block_m - 1) == 0
                assert c.block_n & (c.block_n - 1) == 0 and c.num_warps in (1, 2, 4, 8, 16, 32)
                assert (c.block_n >= n) == c.single
            assert 1 <= g <= -(-m // b.block_m)
    # Narrow widths batch rows per program when there are enough rows.
    assert kln._fwd_config(1 << 20, 8, dev).block_m >= 64
    assert kln._bwd_config(1 << 20, 32, dev)[0].block_m >= 16


def test_empty_input():
    x = torch.randn(0, 5, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(16, device=DEVICE, requires_grad=True)
    b = torch.randn(16, device=DEVICE, requires_grad=True)
    y = ops.layer_norm(x, w, b, backend="triton")
    assert y.shape == x.shape
    dx, dw, db = torch.autograd.grad(y, (x, w, b), torch.randn_like(y))
    assert dx.shape == x.shape and torch.equal(dw, torch.zeros_like(w)) and torch.equal(db, torch.zeros_like(b))


def test_unsupported_dtype_raises():
    x = torch.randn(3, 8, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="backend='torch'"):
        ops.layer_norm(x, torch.ones(8, dtype=torch.float64, device=DEVICE), None, backend="triton")


def test_registered_op_passes_opcheck():
    x, w, b = _inputs((7, 97), torch.float32)
    torch.library.opcheck(torch.ops.barkgpt_triton.layer_norm_fwd.default, (x, w, b, 1e-5))
    torch.library.opcheck(torch.ops.barkgpt_triton.layer_norm_fwd.default, (x, w, None, 1e-5))
    dy = torch.randn(7, 97, device=DEVICE)
    _, mean, rstd = torch.ops.barkgpt_triton.layer_norm_fwd.default(x.detach(), w.detach(), b.detach(), 1e-5)
    torch.library.opcheck(torch.ops.barkgpt_triton.layer_norm_bwd.default, (dy, x.detach(), w.detach(), b.detach(), mean, rstd))


def test_torch_compile_fullgraph_aot_eager():
    """fullgraph=True: the op traces through its fake kernel with no graph break (aot_eager keeps
    CPU runs fast; the gpu test below uses inductor)."""
    x, w, b = _inputs((5, 97), torch.float32)
    dy = torch.randn(5, 97, device=DEVICE)
    fn = torch.compile(lambda x, w, b, eps: ops.layer_norm(x, w, b, eps, backend="triton"),
                       fullgraph=True, backend="aot_eager")
    _assert_close(_grads(fn, x, w, b, dy), _triton(x, w, b, dy), atol=0, rtol=0)


# ---- GPU only: bf16, GPU-sized shapes, inductor ---------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("n", [1, 3, 8, 32, 97, 128, 768, 1024, 1500, 1536, 4096, 8192, 16384, 20000])
def test_gpu_against_pytorch_error(n, dtype):
    """The error vs a float64 oracle is no worse than PyTorch's own F.layer_norm in that dtype."""
    rows = 4097
    x, w, b = _inputs((rows, n), dtype, w_dtype=torch.float32 if dtype == torch.bfloat16 else None)
    dy = torch.randn(rows, n, device=DEVICE).to(dtype)
    got = _triton(x, w, b, dy)
    ref = _grads(lambda x, w, b, eps: F.layer_norm(x, (n,), w, b, eps), x, w, b, dy)
    want = _oracle(x, w, b, dy)
    for name, g, r, o in zip(NAMES, got, ref, want):
        o = o.to(DEVICE)
        err, ref_err = (g.double() - o).abs().max().item(), (r.double() - o).abs().max().item()
        ulps = 4 * torch.finfo(g.dtype).eps * o.abs().max().item()  # a few ulps at the largest value
        assert err <= 2 * ref_err + ulps, f"{name}: triton {err:.3g} vs torch {ref_err:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gpu_backward_is_bitwise_deterministic(dtype):
    x, w, b = _inputs((16384, 768), dtype)
    dy = torch.randn(16384, 768, device=DEVICE).to(dtype)
    first, second = _triton(x, w, b, dy), _triton(x, w, b, dy)
    for name, a, c in zip(NAMES, first, second):
        assert torch.equal(a, c), name


@pytest.mark.gpu
def test_gpu_torch_compile_inductor_fullgraph():
    x, w, b = _inputs((4, 256, 768), torch.bfloat16, w_dtype=torch.float32)
    dy = torch.randn(4, 256, 768, device=DEVICE).to(torch.bfloat16)
    fn = torch.compile(lambda x, w, b, eps: ops.layer_norm(x, w, b, eps, backend="triton"), fullgraph=True)
    _assert_close(_grads(fn, x, w, b, dy), _triton(x, w, b, dy), atol=0, rtol=0)


@pytest.mark.gpu
def test_gpu_launches_on_the_tensors_device():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    with torch.cuda.device(0):
        x, w, b = _inputs((7, 97), torch.float32, device="cuda:1")
        dy = torch.randn(7, 97, device="cuda:1")
        got = _triton(x, w, b, dy)
    _assert_close(got, _oracle(x, w, b, dy), **TOL[torch.float32])
