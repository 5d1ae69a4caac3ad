"""Triton LayerNorm (barkgpt.kernels.layer_norm): what only this backend has.

Values and gradients against the float64 reference on the awkward widths and row counts, fp16 and
fp16-with-fp32-parameters, no bias, any rank, eps, non-contiguous inputs, parameters and upstream
gradients are the registry's (tests/test_ops.py runs barkgpt/opdecls.py's layer_norm cases on every
backend, the interpreter included, with the bounds these tests held). Here: the chunked path
(forced), determinism, the first launch of a config, the persistent dW/dB partials, the config
heuristic, empty input, errors, opcheck, torch.compile; and on a GPU, bf16, GPU-sized shapes and
inductor.

On a machine without CUDA the kernels run on CPU tensors under TRITON_INTERPRET=1 (set by
conftest.py); the same tests run compiled when a GPU is present. Every gradient is taken with a
random upstream gradient.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

from barkgpt import ops, reference
from barkgpt.opdecls import LAYER_NORM_CLOSE

import oracle

triton_backend = importlib.import_module("barkgpt._triton")  # registers the barkgpt_triton ops

kln = importlib.import_module("barkgpt.kernels.layer_norm")

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
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


def _check(shape, dtype):
    """The Triton op and its gradients against the declaration's reference (float64), with the
    declared tolerance and the layer_norm cases' bounds."""
    x, w, b = _inputs(shape, dtype)
    oracle.check_op("layer_norm", lambda *a: ops.layer_norm(*a, backend="triton"), [x, w, b, 1e-5], dtype,
                    bounds=LAYER_NORM_CLOSE)


def _assert_equal(got, want, names=NAMES):
    assert len(got) == len(want)
    for name, g, w in zip(names, got, want):
        assert torch.equal(g, w), name


@pytest.mark.parametrize("rows,n,max_fused", [(7, 97, 32), (513, 40, 32), (5, 1500, 512)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_chunked_path(monkeypatch, rows, n, max_fused, dtype):
    """Rows wider than _MAX_FUSED_N loop over column chunks (last chunk partial); lowered here
    so the interpreter covers that path at small widths."""
    monkeypatch.setattr(kln, "_MAX_FUSED_N", max_fused)
    assert not kln._fwd_config(rows, n, torch.device(DEVICE)).single
    assert not kln._bwd_config(rows, n, torch.device(DEVICE))[0].single
    _check((rows, n), dtype)


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
    _assert_equal(_grads(fn, x, w, b, dy), _triton(x, w, b, dy))


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
    # PyTorch's own error is the bound here (not a fixed tolerance): the float64 reference is the
    # declaration's, on the GPU
    want = _grads(reference.layer_norm_ref, *(t.double() if t is not None else None for t in (x, w, b)),
                  dy.double())
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
    _assert_equal(_grads(fn, x, w, b, dy), _triton(x, w, b, dy))


@pytest.mark.gpu
def test_gpu_launches_on_the_tensors_device():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    with torch.cuda.device(0):
        x, w, b = _inputs((7, 97), torch.float32, device="cuda:1")
        oracle.check_op("layer_norm", lambda *a: ops.layer_norm(*a, backend="triton"), [x, w, b, 1e-5],
                        torch.float32, bounds=LAYER_NORM_CLOSE)
