"""Where the cpp kernels' matrix products go (csrc/gemm.h): oneDNN when it runs here, ATen otherwise.

Both libraries must give the float64 product within fp32 rounding for every layout the kernels
pass (plain, transposed, narrowed rows, accumulate into the output), the choice must be
switchable and reported, and a bad BARKGPT_CPU_GEMM must warn and fall back, never break.
"""

import os
import textwrap

import pytest
import torch

from barkgpt import ops
from helpers import run_python

if os.environ.get("BARKGPT_NO_CPP", "") not in ("", "0"):
    pytest.skip("BARKGPT_NO_CPP is set: the cpp backend is disabled on purpose", allow_module_level=True)

ops.layer_norm(torch.randn(2, 4), torch.ones(4), None, backend="cpp")  # loads the backend

OPS = torch.ops.barkgpt_cpp
# Libraries this machine can run: ATen always; oneDNN where "auto" picks it (a CPU with AVX-512
# and a libtorch that exports the function).
AUTO = OPS.gemm_set_library("auto")
LIBS = ["aten"] + (["onednn"] if AUTO == "onednn" else [])


@pytest.fixture(autouse=True)
def _restore_auto():
    yield
    OPS.gemm_set_library("auto")


def _operand(rows, cols, transposed, dtype=torch.float32, gen=None):
    if transposed:
        return torch.randn(cols, rows, generator=gen, dtype=torch.float64).to(dtype).t()
    return torch.randn(rows, cols, generator=gen, dtype=torch.float64).to(dtype)


# (m, k, n): below and above the size where oneDNN takes over (2^24 multiply-adds: the last two),
# one-row (decode) and thin shapes
SHAPES = [(1, 1, 1), (3, 5, 2), (7, 33, 5), (1, 768, 300), (8, 100, 65), (64, 32, 9), (240, 96, 130),
          (33, 257, 64), (256, 257, 256), (9, 2049, 1000)]


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("at,bt", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_gemm_matches_float64(lib, m, k, n, at, bt, beta):
    assert OPS.gemm_set_library(lib) == lib
    g = torch.Generator().manual_seed(m * 1000 + k * 10 + n)
    a, b = _operand(m, k, at, gen=g), _operand(k, n, bt, gen=g)
    if beta:
        out = torch.randn(m, n, generator=g)
        expected = out.double() + a.double() @ b.double()
    else:
        out = torch.full((m, n), float("nan"))  # beta 0 ignores the old contents, NaN included
        expected = a.double() @ b.double()
    OPS.gemm_out(out, a, b, beta)
    err = (out.double() - expected).abs().max().item()
    bound = 2e-6 * k * max(1.0, expected.abs().max().item())
    assert err <= bound, f"{lib}: max error {err:.3g} > {bound:.3g}"
    if not beta:  # the same call again gives the same bits
        again = torch.full((m, n), float("nan"))
        OPS.gemm_out(again, a, b, beta)
        assert torch.equal(again, out)


@pytest.mark.parametrize("lib", LIBS)
def test_gemm_into_row_slice_and_degenerate_shapes(lib):
    OPS.gemm_set_library(lib)
    a, b = torch.randn(300, 64), torch.randn(64, 200)
    big = torch.zeros(1000, 200)
    OPS.gemm_out(big.narrow(0, 500, 300), a, b, 0.0)  # a contiguous row block of a larger tensor
    assert torch.allclose(big[500:800], a @ b, atol=1e-4)
    assert big[:500].abs().max() == 0 and big[800:].abs().max() == 0
    out = torch.full((4, 3), 7.0)
    OPS.gemm_out(out, torch.randn(4, 0), torch.randn(0, 3), 1.0)  # k = 0: out unchanged for beta 1
    assert torch.equal(out, torch.full((4, 3), 7.0))
    OPS.gemm_out(out, torch.randn(4, 0), torch.randn(0, 3), 0.0)  # ... and zeroed for beta 0
    assert torch.equal(out, torch.zeros(4, 3))
    OPS.gemm_out(torch.empty(0, 3), torch.randn(0, 5), torch.randn(5, 3), 0.0)


def test_gemm_float64_and_bad_arguments():
    a, b = torch.randn(50, 40, dtype=torch.float64), torch.randn(40, 30, dtype=torch.float64)
    out = torch.empty(50, 30, dtype=torch.float64)
    OPS.gemm_out(out, a, b, 0.0)  # fp64 always goes to ATen, exactly as at::mm
    assert torch.equal(out, a @ b)
    with pytest.raises(RuntimeError, match="shapes"):
        OPS.gemm_out(torch.empty(50, 31), torch.randn(50, 40), torch.randn(40, 30), 0.0)
    with pytest.raises(RuntimeError, match="beta must be 0 or 1"):
        OPS.gemm_out(torch.empty(50, 30), torch.randn(50, 40), torch.randn(40, 30), 0.5)
    with pytest.raises(RuntimeError, match="'auto', 'onednn' or 'aten'"):
        OPS.gemm_set_library("mkl")


def test_library_reported_and_switchable():
    assert ops.cpu_gemm_library() == AUTO
    assert OPS.gemm_set_library("aten") == "aten" and ops.cpu_gemm_library() == "aten"
    OPS.gemm_set_library("auto")
    assert ops.cpu_gemm_library() == AUTO


@pytest.mark.parametrize("lib", LIBS)
def test_fused_loss_same_on_each_library(lib):
    """The fused linear + cross-entropy through either library: float64 agreement, and bitwise
    repeatable (the chunking and the accumulation order do not depend on the library's threads)."""
    OPS.gemm_set_library(lib)
    g = torch.Generator().manual_seed(5)
    N, C, V = 300, 64, 1000  # every product above oneDNN's threshold (2^24 multiply-adds)
    x = torch.randn(N, C, generator=g, dtype=torch.float64)
    w = torch.randn(V, C, generator=g, dtype=torch.float64) * 0.1
    t = torch.randint(0, V, (N,), generator=g)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    torch.nn.functional.cross_entropy(xr @ wr.t(), t).backward()
    runs = []
    for _ in range(2):
        xf, wf = x.float().requires_grad_(), w.float().requires_grad_()
        loss = ops.linear_cross_entropy(xf, wf, t, backend="cpp")
        loss.backward()
        runs.append((loss.detach(), xf.grad, wf.grad))
    for got, want in zip(runs[0], (None, xr.grad, wr.grad)):
        if want is not None:
            assert (got.double() - want).abs().max() <= 2e-5 * max(1.0, want.abs().max().item())
    assert all(torch.equal(p, q) for p, q in zip(runs[0], runs[1]))


def test_environment_variable_applied_and_bad_value_warns():
    code = textwrap.dedent("""
        import warnings, torch
        warnings.simplefilter("always")
        from barkgpt import ops
        with warnings.catch_warnings(record=True) as w:
            ops.layer_norm(torch.randn(2, 4), torch.ones(4), None, backend="cpp")
        print("LIB", ops.cpu_gemm_library())
        print("WARN", [str(x.message) for x in w if "BARKGPT_CPU_GEMM" in str(x.message)])
    """)
    r = run_python(code, env={"BARKGPT_CPU_GEMM": "aten"})
    assert r.returncode == 0 and "LIB aten" in r.stdout and "WARN []" in r.stdout, r.stdout + r.stderr
    r = run_python(code, env={"BARKGPT_CPU_GEMM": "fastest"})
    assert r.returncode == 0, r.stderr
    assert f"LIB {AUTO}" in r.stdout and "BARKGPT_CPU_GEMM='fastest' ignored" in r.stdout, r.stdout
