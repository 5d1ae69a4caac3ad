"""Triton token + position embedding add (barkgpt.kernels.embedding) against reference.py,
nn.Embedding and a float64 oracle.

On a machine without CUDA the kernels run on CPU tensors under TRITON_INTERPRET=1 (set by
conftest.py); the same tests run compiled when a GPU is present, and ``gpu``-marked tests add
bf16, GPU-sized shapes and torch.compile with inductor. Every gradient is taken with a random
upstream gradient.
"""

import importlib

import pytest
import torch
import torch.nn as nn

from barkgpt import opdecls, ops, reference

triton_backend = importlib.import_module("barkgpt._triton")  # registers the barkgpt_triton ops

kemb = importlib.import_module("barkgpt.kernels.embedding")

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
NAMES = ("out", "dtok", "dpos")


def _tables(V, P, C, dtype, pos_dtype=None, device=DEVICE):
    tok = torch.randn(V, C).to(device, dtype).requires_grad_()
    pos = torch.randn(P, C).to(device, pos_dtype or dtype).requires_grad_()
    return tok, pos


def _run(fn, idx, tok, pos, g):
    tok2, pos2 = tok.detach().clone().requires_grad_(), pos.detach().clone().requires_grad_()
    out = fn(idx, tok2, pos2)
    return (out,) + torch.autograd.grad(out, (tok2, pos2), g)


def _triton(idx, tok, pos, g):
    return _run(lambda *a: ops.embedding_add(*a, backend="triton"), idx, tok, pos, g)


def _oracle(idx, tok, pos, g):
    """Forward and both gradients in float64 on CPU, by explicit loops over positions."""
    idx, g = idx.cpu().long(), g.detach().cpu().double()
    tok64, pos64 = tok.detach().cpu().double(), pos.detach().cpu().double()
    B, T = idx.shape
    out = tok64[idx] + pos64[:T]
    dtok = torch.zeros_like(tok64).index_add_(0, idx.reshape(-1), g.reshape(B * T, -1))
    dpos = torch.zeros_like(pos64)
    dpos[:T] = g.sum(0)
    return out, dtok, dpos


def _nn_embedding(idx, tok, pos, g):
    """The article's form: nn.Embedding modules and arange positions."""
    tok_emb = nn.Embedding.from_pretrained(tok.detach().clone(), freeze=False)
    pos_emb = nn.Embedding.from_pretrained(pos.detach().clone(), freeze=False)
    out = tok_emb(idx) + pos_emb(torch.arange(idx.shape[1], device=idx.device))
    return (out,) + torch.autograd.grad(out, (tok_emb.weight, pos_emb.weight), g)


def _assert_close(got, want, **tol):
    assert len(got) == len(want)
    for name, a, b in zip(NAMES, got, want):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64),
                                   msg=lambda m, name=name: f"{name}: {m}", **tol)


def _sum_tol(dtype):
    """fp32 accumulation of at most a few thousand O(1) terms, then one rounding to ``dtype``:
    16-bit results land within one ulp of the exact sum (plus a small absolute term where
    the sum cancels); fp32 results carry the fp32 summation error itself."""
    if dtype == torch.float32:
        return dict(atol=5e-5, rtol=1e-5)
    return dict(atol=1e-5, rtol=torch.finfo(dtype).eps)


def _rounded(ts, dtypes):
    """Oracle values rounded once to the dtypes the kernels return."""
    return tuple(t.to(d).to(torch.float64) for t, d in zip(ts, dtypes))


def _check(B, T, V, C, P, dtype, pos_dtype=None, idx=None, g=None):
    tok, pos = _tables(V, P, C, dtype, pos_dtype)
    out_dtype = torch.promote_types(tok.dtype, pos.dtype)
    idx = torch.randint(0, V, (B, T), device=DEVICE) if idx is None else idx
    g = torch.randn(B, T, C, device=DEVICE).to(out_dtype) if g is None else g
    got = _triton(idx, tok, pos, g)
    assert got[0].dtype == out_dtype and got[1].dtype == tok.dtype and got[2].dtype == pos.dtype
    assert all(t.device == tok.device for t in got)
    exact = _rounded(_oracle(idx, tok, pos, g), (out_dtype, tok.dtype, pos.dtype))
    _assert_close(got, exact, **_sum_tol(dtype))
    if dtype == torch.float32:
        _assert_close(got, _run(reference.embedding_add_ref, idx, tok, pos, g), atol=1e-5, rtol=1e-5)
        _assert_close(got, _nn_embedding(idx, tok, pos, g), atol=1e-5, rtol=1e-5)
    else:
        # PyTorch accumulates fp16 embedding grads in fp16 on CPU: compare forward exactly and
        # gradients with fp16 accumulation tolerance.
        ref = _run(reference.embedding_add_ref, idx, tok, pos, g)
        assert torch.equal(got[0], ref[0])
        _assert_close(got, ref, atol=2e-2, rtol=1e-2)
    return got


# (B, T, V, C, P): bark sizes (9-token vocab, widths 8 and 32), widths 1 / 3 / 97 / 768, T < P
# (unused position rows get zero grads), T == 1 and B == 1.
SHAPES = [(1, 1, 9, 1, 4), (3, 7, 9, 32, 8), (4, 32, 9, 8, 32), (2, 5, 50, 97, 9), (2, 9, 20, 768, 12),
          (8, 3, 2, 3, 3), (1, 40, 9, 128, 64)]


@pytest.mark.parametrize("B,T,V,C,P", SHAPES)
def test_matches_oracle_reference_and_nn_embedding_fp32(B, T, V, C, P):
    _check(B, T, V, C, P, torch.float32)


@pytest.mark.parametrize("B,T,V,C,P", [(3, 7, 9, 32, 8), (2, 5, 50, 97, 9), (2, 9, 20, 768, 12)])
def test_matches_oracle_and_reference_fp16(B, T, V, C, P):
    _check(B, T, V, C, P, torch.float16)


def test_mixed_table_dtypes_promote():
    # fp16 token table + fp32 position table: fp32 output, each grad in its table's dtype.
    _check(3, 7, 9, 32, 8, torch.float16, pos_dtype=torch.float32)


@pytest.mark.parametrize("V", [3, 50], ids=["split", "single"])
def test_all_tokens_equal(V):
    """Every position holds the same id: one vocabulary row gets all of the gradient. With a tiny
    vocabulary the sum is split into fixed pieces (partials reduced afterwards); with a larger one
    a single program walks the whole group."""
    B, T, C = 16, 32, 32
    idx = torch.full((B, T), V - 1, device=DEVICE)
    got = _check(B, T, V, C, T, torch.float32, idx=idx)
    assert torch.count_nonzero(got[1][:-1]) == 0
    assert torch.count_nonzero(got[1][-1]) == C


def test_split_and_unsplit_paths_are_both_exercised():
    dev = torch.device(DEVICE)
    # bark-like: 3 tokens x 1 column block is far fewer programs than the device: split.
    assert kemb._split(3, 512 // 3, dev) > 1
    # a GPT-2-like vocabulary fills the device without splitting.
    assert kemb._split(50304 * 3, 1, dev) == 1
    # never more pieces than items to sum.
    assert kemb._split(1, 2, dev) <= 2


def test_int32_ids():
    idx = torch.randint(0, 9, (3, 7), device=DEVICE, dtype=torch.int32)
    _check(3, 7, 9, 32, 8, torch.float32, idx=idx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_noncontiguous_ids_tables_and_upstream_grad(dtype):
    B, T, V, C, P = 3, 7, 11, 40, 9
    idx = torch.randint(0, V, (T, B), device=DEVICE).t()  # (B, T), transposed
    tok = torch.randn(C, V).to(DEVICE, dtype).t().requires_grad_()  # (V, C), column stride V
    pos = torch.randn(P, 2 * C).to(DEVICE, dtype)[:, ::2].requires_grad_()  # (P, C), column stride 2
    g = torch.randn(C, T, B).to(DEVICE, dtype).permute(2, 1, 0)  # (B, T, C), no unit stride
    assert not (idx.is_contiguous() or tok.is_contiguous() or pos.is_contiguous() or g.is_contiguous())
    got = _triton(idx, tok, pos, g)
    exact = _rounded(_oracle(idx, tok, pos, g), (dtype, dtype, dtype))
    _assert_close(got, exact, **_sum_tol(dtype))


def test_expanded_upstream_grad():
    B, T, V, C = 4, 6, 9, 16
    idx = torch.randint(0, V, (B, T), device=DEVICE)
    tok, pos = _tables(V, T, C, torch.float32)
    g = torch.randn(1, 1, C, device=DEVICE).expand(B, T, C)  # stride 0
    _assert_close(_triton(idx, tok, pos, g), _oracle(idx, tok, pos, g), **_sum_tol(torch.float32))


@pytest.mark.parametrize("bad", [-1, 9, 1000])
@pytest.mark.parametrize("via", ["ops", "kernels"])
def test_out_of_range_ids_raise(bad, via):
    tok, pos = _tables(9, 8, 16, torch.float32)
    idx = torch.randint(0, 9, (2, 5), device=DEVICE)
    idx[1, 3] = bad
    fn = (lambda *a: ops.embedding_add(*a, backend="triton")) if via == "ops" else torch.ops.barkgpt_triton.embedding_add_fwd
    with pytest.raises(IndexError, match="out of range"):
        fn(idx, tok, pos)


@pytest.mark.parametrize("bad", [-1, 9, 1 << 40])
def test_launcher_never_reads_outside_the_table(bad):
    # The host check is skipped during CUDA-graph capture; the kernel itself must mask such ids.
    tok, pos = _tables(9, 8, 16, torch.float32)
    idx = torch.randint(0, 9, (2, 5), device=DEVICE)
    idx[1, 3] = bad
    with torch.no_grad():
        out = kemb.embedding_add_fwd(idx, tok, pos)
        want = reference.embedding_add_ref(idx.clamp(0, 8), tok, pos)
    torch.testing.assert_close(out[1, 3], pos[3].detach())
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[1, 3] = False
    torch.testing.assert_close(out[keep], want[keep])


def test_backward_is_bitwise_deterministic():
    B, T, V, C = 16, 32, 5, 24  # few ids: long groups, split sums
    idx = torch.randint(0, V, (B, T), device=DEVICE)
    tok, pos = _tables(V, T, C, torch.float32)
    g = torch.randn(B, T, C, device=DEVICE)
    first, second = _triton(idx, tok, pos, g), _triton(idx, tok, pos, g)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


def test_first_call_on_new_shape_equals_second():
    B, T, V, C = 5, 13, 17, 56  # a shape no other test uses
    idx = torch.randint(0, V, (B, T), device=DEVICE)
    tok, pos = _tables(V, 20, C, torch.float32)
    g = torch.randn(B, T, C, device=DEVICE)
    first, second = _triton(idx, tok, pos, g), _triton(idx, tok, pos, g)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


def test_empty_batch():
    tok, pos = _tables(9, 8, 16, torch.float32)
    idx = torch.zeros(0, 5, dtype=torch.long, device=DEVICE)
    out = ops.embedding_add(idx, tok, pos, backend="triton")
    assert out.shape == (0, 5, 16)
    dtok, dpos = torch.autograd.grad(out, (tok, pos), torch.randn_like(out))
    assert torch.count_nonzero(dtok) == 0 and torch.count_nonzero(dpos) == 0


def test_unsupported_dtype_raises():
    tok, pos = _tables(9, 8, 16, torch.float64)
    with pytest.raises(TypeError, match="backend='torch'"):
        ops.embedding_add(torch.zeros(1, 2, dtype=torch.long, device=DEVICE), tok, pos, backend="triton")


def test_registered_op_passes_opcheck():
    tok, pos = _tables(9, 8, 32, torch.float32)
    idx = torch.randint(0, 9, (3, 7), device=DEVICE)
    torch.library.opcheck(torch.ops.barkgpt_triton.embedding_add_fwd.default, (idx, tok, pos))
    g = torch.randn(3, 7, 32, device=DEVICE)
    torch.library.opcheck(torch.ops.barkgpt_triton.embedding_add_bwd.default, (g, idx, 9, 8))


def test_torch_compile_fullgraph_aot_eager():
    tok, pos = _tables(9, 8, 32, torch.float32)
    idx = torch.randint(0, 9, (3, 7), device=DEVICE)
    g = torch.randn(3, 7, 32, device=DEVICE)
    fn = torch.compile(lambda *a: ops.embedding_add(*a, backend="triton"), fullgraph=True, backend="aot_eager")
    _assert_close(_run(fn, idx, tok, pos, g), _triton(idx, tok, pos, g), atol=0, rtol=0)


def test_torch_compile_still_checks_ids():
    tok, pos = _tables(9, 8, 32, torch.float32)
    fn = torch.compile(lambda *a: ops.embedding_add(*a, backend="triton"), fullgraph=True, backend="aot_eager")
    idx = torch.randint(0, 9, (3, 7), device=DEVICE)
    fn(idx, tok, pos)
    idx[0, 0] = 9
    with pytest.raises(IndexError):
        fn(idx, tok, pos)


# ---- GPU only: bf16, GPU-sized shapes, inductor ---------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("B,T,V,C", [(64, 32, 9, 32), (16, 1024, 50304, 768), (8, 256, 256, 128),
                                     (4, 1024, 50257, 1600), (32, 128, 65, 8)])
def test_gpu_matches_exact_sums(B, T, V, C, dtype):
    tok, pos = _tables(V, T, C, dtype)
    idx = torch.randint(0, V, (B, T), device=DEVICE)
    g = torch.randn(B, T, C, device=DEVICE).to(dtype)
    got = _triton(idx, tok, pos, g)
    exact = _rounded(_oracle(idx, tok, pos, g), (dtype, dtype, dtype))
    _assert_close(got, exact, **_sum_tol(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("V", [9, 50304])
def test_gpu_all_tokens_equal_and_deterministic(V):
    B, T, C = 16, 1024, 768
    tok, pos = _tables(V, T, C, torch.bfloat16)
    idx = torch.full((B, T), V // 2, device=DEVICE)
    g = torch.randn(B, T, C, device=DEVICE).to(torch.bfloat16)
    first, second = _triton(idx, tok, pos, g), _triton(idx, tok, pos, g)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name
    exact = _rounded(_oracle(idx, tok, pos, g), (torch.bfloat16,) * 3)
    _assert_close(first, exact, **_sum_tol(torch.bfloat16))


@pytest.mark.gpu
def test_gpu_torch_compile_inductor_fullgraph():
    tok, pos = _tables(50304, 1024, 768, torch.float32)
    idx = torch.randint(0, 50304, (8, 1024), device=DEVICE)
    g = torch.randn(8, 1024, 768, device=DEVICE)
    fn = torch.compile(lambda *a: ops.embedding_add(*a, backend="triton"), fullgraph=True)
    _assert_close(_run(fn, idx, tok, pos, g), _triton(idx, tok, pos, g), atol=0, rtol=0)


@pytest.mark.gpu
def test_gpu_out_of_range_raises():
    """On CUDA the kernel flags the id; the error comes from a later call (no host sync)."""
    tok, pos = _tables(9, 8, 16, torch.float32)
    idx = torch.randint(0, 9, (2, 5), device=DEVICE)
    idx[0, 1] = 9
    ops.embedding_add(idx, tok, pos, backend="triton")
    torch.cuda.synchronize()
    with pytest.raises(IndexError, match="token id 9 is out of range"):
        ops.embedding_add(idx[:, :1].clone().zero_(), tok, pos, backend="triton")
    ops.embedding_add(idx, tok, pos, backend="triton")
    with pytest.raises(IndexError, match="token id 9 is out of range"):
        kemb.raise_pending_id_errors()  # waits for the GPU


@pytest.mark.gpu
def test_gpu_forward_does_not_sync(monkeypatch):
    """No host read per call: the host id check is not used on CUDA tensors."""
    def no_host_check(*a, **k):
        raise AssertionError("host id check (a GPU sync) ran")

    monkeypatch.setattr(opdecls, "check_token_ids", no_host_check)
    tok, pos = _tables(50304, 1024, 768, torch.bfloat16)
    idx = torch.randint(0, 50304, (8, 1024), device=DEVICE)
    for _ in range(3):
        ops.embedding_add(idx, tok, pos, backend="triton")
    kemb.raise_pending_id_errors()
