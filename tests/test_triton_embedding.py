"""Triton token + position embedding add (barkgpt.kernels.embedding): what only this backend has.

Values and gradients against the float64 reference (exact sums rounded once, untouched rows
exactly zero) on the awkward shapes, fp16, mixed table dtypes, int32 ids, all ids equal (split
and single-program sums), non-contiguous ids, tables and upstream gradients are the registry's
(tests/test_ops.py runs barkgpt/opdecls.py's embedding_add cases on every backend, the
interpreter included, with the bounds these tests held). Here: the split heuristic, out-of-range
ids (host check and the kernel's own masking), determinism, the first launch, empty batch,
errors, opcheck, torch.compile; and on a GPU, bf16, GPU-sized shapes and inductor.

On a machine without CUDA the kernels run on CPU tensors under TRITON_INTERPRET=1 (set by
conftest.py); the same tests run compiled when a GPU is present.
"""

import importlib

import pytest
import torch

from barkgpt import opdecls, ops, reference

import oracle

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


def _assert_equal(got, want):
    assert len(got) == len(want)
    for name, a, b in zip(NAMES, got, want):
        assert torch.equal(a, b), name


def _check_sums(idx, tok, pos):
    """The Triton op and its gradients against the declaration's reference (float64): exact sums
    rounded once (opdecls.embedding_sum_close) and the declared tolerance."""
    dtype = tok.dtype
    oracle.check_op("embedding_add", lambda *a: ops.embedding_add(*a, backend="triton"), [idx, tok, pos], dtype,
                    bounds={dtype: opdecls.embedding_sum_close(dtype)})


def test_split_and_unsplit_paths_are_both_exercised():
    dev = torch.device(DEVICE)
    # bark-like: 3 tokens x 1 column block is far fewer programs than the device: split.
    assert kemb._split(3, 512 // 3, dev) > 1
    # a GPT-2-like vocabulary fills the device without splitting.
    assert kemb._split(50304 * 3, 1, dev) == 1
    # never more pieces than items to sum.
    assert kemb._split(1, 2, dev) <= 2


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
    _assert_equal(_run(fn, idx, tok, pos, g), _triton(idx, tok, pos, g))


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
    _check_sums(torch.randint(0, V, (B, T), device=DEVICE), tok, pos)


@pytest.mark.gpu
@pytest.mark.parametrize("V", [9, 50304])
def test_gpu_all_tokens_equal_and_deterministic(V):
    B, T, C = 16, 1024, 768
    tok, pos = _tables(V, T, C, torch.bfloat16)
    idx = torch.full((B, T), V // 2, device=DEVICE)
    g = torch.randn(B, T, C, device=DEVICE).to(torch.bfloat16)
    _assert_equal(_triton(idx, tok, pos, g), _triton(idx, tok, pos, g))
    _check_sums(idx, tok, pos)


@pytest.mark.gpu
def test_gpu_torch_compile_inductor_fullgraph():
    tok, pos = _tables(50304, 1024, 768, torch.float32)
    idx = torch.randint(0, 50304, (8, 1024), device=DEVICE)
    g = torch.randn(8, 1024, 768, device=DEVICE)
    fn = torch.compile(lambda *a: ops.embedding_add(*a, backend="triton"), fullgraph=True)
    _assert_equal(_run(fn, idx, tok, pos, g), _triton(idx, tok, pos, g))


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
