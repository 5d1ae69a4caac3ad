"""Triton flash attention (barkgpt.kernels.attention): what only this backend has.

Values and gradients against the float64 reference on the awkward shapes, dtypes, layouts and
upstream gradients are the registry's (tests/test_ops.py runs barkgpt/opdecls.py's attention cases
on every backend, the interpreter included, with the bounds these tests held). Here: the saved
log-sum-exp, the output layout, determinism, the GPU tile table run in the interpreter, the tile
invariants, argument errors, opcheck with a strided gradient, torch.compile, the model; and on a
GPU, bf16, long sequences and inductor.

On a machine without CUDA the kernels run on CPU tensors under TRITON_INTERPRET=1 (set by
conftest.py), with small tiles; the same tests run compiled when a GPU is present.
"""

import importlib
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from barkgpt import ops, reference
from barkgpt.opdecls import ATTENTION_CLOSE

import oracle

triton_backend = importlib.import_module("barkgpt._triton")  # registers the barkgpt_triton ops

kattn = importlib.import_module("barkgpt.kernels.attention")
kcfg = importlib.import_module("barkgpt.kernels._attention_config")

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def _qkv(B, H, T, D, dtype, device=DEVICE, scale=1.0):
    return [(torch.randn(B, H, T, D, dtype=torch.float32) * scale).to(device, dtype).requires_grad_()
            for _ in range(3)]


def _triton(q, k, v, causal, do):
    out = ops.attention(q, k, v, causal=causal, backend="triton")
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    return out, dq, dk, dv


def _check(fn, q, k, v, causal):
    """fn(q, k, v, causal) and its gradients against the declaration's reference (float64), with
    the declared tolerance and the attention cases' bounds."""
    oracle.check_op("attention", fn, [q, k, v, causal], q.dtype, bounds=ATTENTION_CLOSE)


NAMES = ("out", "dq", "dk", "dv")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_lse_is_the_row_logsumexp(causal):
    B, H, T, D = 2, 3, 37, 24
    q, k, v = _qkv(B, H, T, D, torch.float32)
    out, lse = torch.ops.barkgpt_triton.attention_fwd(q, k, v, causal)
    # An oracle of its own: the saved log-sum-exp is the kernel's, the reference has none.
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(D)
    if causal:
        s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=s.device).tril(), float("-inf"))
    assert lse.shape == (B, H, T) and lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double(), torch.softmax(s, -1) @ v.double(), atol=2e-5, rtol=2e-5)


def test_output_layout_lets_the_model_merge_heads_for_free():
    q, k, v = _qkv(2, 3, 10, 8, torch.float32)
    out = ops.attention(q, k, v, causal=True, backend="triton")
    merged = out.transpose(1, 2).reshape(2, 10, 24)  # what SelfAttention does
    assert merged.data_ptr() == out.data_ptr() and merged.is_contiguous()


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_backward_is_bitwise_deterministic(causal):
    q, k, v = _qkv(2, 2, 100, 24, torch.float32)
    do = torch.randn(2, 2, 100, 24, device=DEVICE)
    first = _triton(q, k, v, causal, do)
    again = _triton(q, k, v, causal, do)
    for name, a, b in zip(NAMES, first, again):
        assert torch.equal(a, b), f"{name} differs between two identical runs"
    # and the gradients are not trivially zero (a determinism test that cannot fail is useless)
    assert all(g.abs().max() > 0.01 for g in first[1:])


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("T,D", [(200, 64), (150, 80), (70, 256)])
def test_gpu_tile_table(monkeypatch, T, D, causal):
    """The GPU tile shapes (BLOCK_M 128 / BLOCK_N 64, ...) run here too, in the interpreter."""
    real = kcfg.tile_config
    used = []

    def gpu_table(kind, head_dim, seq_len, dtype, interpret, arch=None):
        cfg = real(kind, head_dim, seq_len, dtype, False, arch=90)
        used.append(cfg)
        return cfg

    monkeypatch.setattr(kcfg, "tile_config", gpu_table)
    for dtype in (torch.float16, torch.float32):
        _check(lambda *a: ops.attention(*a, backend="triton"), *_qkv(1, 2, T, D, dtype), causal)
    assert len(used) == 6 and any(c.block_m != c.block_n for c in used)


def test_tile_config_invariants():
    for interpret in (True, False):
        for D in range(1, 257):
            for T in (1, 5, 16, 17, 100, 1000, 8192):
                for dtype in (torch.float16, torch.bfloat16, torch.float32):
                    for kind in ("fwd", "dkdv", "dq"):
                        c = kcfg.tile_config(kind, D, T, dtype, interpret)
                        big, small = (c.block_n, c.block_m) if kind == "dkdv" else (c.block_m, c.block_n)
                        assert big % small == 0 and small >= 16
                        assert c.block_m & (c.block_m - 1) == 0 and c.block_n & (c.block_n - 1) == 0
    assert [kcfg.padded_head_dim(d) for d in (1, 3, 16, 17, 80, 128, 129, 256)] == [16, 16, 16, 32, 128, 128, 256, 256]


def test_empty_batch():
    q, k, v = _qkv(0, 2, 5, 8, torch.float32)
    out = ops.attention(q, k, v, causal=True, backend="triton")
    assert out.shape == (0, 2, 5, 8)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert dq.shape == q.shape and dv.shape == v.shape


def test_unsupported_inputs_raise_clearly():
    q = torch.randn(1, 1, 4, 257, device=DEVICE)
    with pytest.raises(ValueError, match="head dims up to 256"):
        ops.attention(q, q, q, backend="triton")
    q = torch.randn(1, 1, 4, 8, device=DEVICE, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        ops.attention(q, q, q, backend="triton")


def test_registered_ops_pass_opcheck():
    q, k, v = _qkv(1, 2, 17, 8, torch.float32)
    # schema, autograd registration, fake tensors (strides included) and AOT dispatch.
    torch.library.opcheck(torch.ops.barkgpt_triton.attention_fwd.default, (q, k, v, True))
    out, lse = torch.ops.barkgpt_triton.attention_fwd(q, k, v, False)
    do = torch.randn(1, 2, 17, 8, device=DEVICE).transpose(1, 2).contiguous().transpose(1, 2)
    torch.library.opcheck(torch.ops.barkgpt_triton.attention_bwd.default,
                          (do, q.detach(), k.detach(), v.detach(), out.detach(), lse, False))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_torch_compile_fullgraph_aot_eager(causal):
    """One op to the compiler: fake kernels and autograd registration trace with no graph break
    (aot_eager runs the real kernels; the inductor variant is in the gpu tests)."""
    torch._dynamo.reset()

    def f(q, k, v, causal):
        return ops.attention(q, k, v, causal=causal, backend="triton") * 2.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    _check(lambda *a: compiled(*a) / 2.0, *_qkv(2, 2, 23, 16, torch.float32), causal)


# ---- the whole model ------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_model_forward_backward_triton_matches_torch(causal):
    """The whole Triton backend (this attention, LayerNorm, embedding-add) inside BarkGPT, at a
    T that is not a multiple of any tile (tests/test_triton_model.py covers the presets)."""
    from barkgpt import BarkGPT, GPTConfig

    config = GPTConfig(vocab_size=23, block_size=40, n_layer=2, n_head=2, n_embd=32, causal=causal)
    ref = BarkGPT(config, backend="torch").to(DEVICE)
    tri = BarkGPT(config, backend="triton").to(DEVICE)
    tri.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 23, (3, 37), device=DEVICE)
    tgt = torch.randint(0, 23, (3, 37), device=DEVICE)
    g = torch.randn(3, 37, 23, device=DEVICE)
    results = []
    for m in (ref, tri):
        logits, loss = m(idx, tgt, return_logits=True)
        (loss + (logits * g).sum()).backward()
        results.append((logits.detach(), loss.detach(), {n: p.grad for n, p in m.named_parameters()}))
    (l_ref, loss_ref, g_ref), (l_tri, loss_tri, g_tri) = results
    torch.testing.assert_close(l_tri, l_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_tri, loss_ref, atol=1e-5, rtol=1e-5)
    assert g_ref.keys() == g_tri.keys()
    for n in g_ref:
        # Bias grads sum ~100 rows to values near 100: fp32 summation-order noise is ~1e-5 there
        # (both backends are that far from a float64 model), so scale atol by the tensor's size.
        atol = 1e-6 * max(1.0, g_ref[n].abs().max().item())
        torch.testing.assert_close(g_tri[n], g_ref[n], atol=atol, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    assert g_tri["layers.0.attn.qkv.weight"].abs().max() > 0


# ---- GPU only: bf16, long sequences, compiled -----------------------------------------------

def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _reference(q, k, v, causal, do):
    """barkgpt.reference.attention_ref in the inputs' own dtype and device: PyTorch's own error."""
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = reference.attention_ref(q2, k2, v2, causal)
    return (out,) + torch.autograd.grad(out, (q2, k2, v2), do)


def _assert_within_pytorch_error(got, q, k, v, causal, do):
    """Error vs the float64 reference at most twice PyTorch's own SDPA error in the same dtype
    (plus a small floor): the FlashAttention repo's criterion, fair across dtypes at GPU sizes.
    Not a fixed tolerance, so not a registry case (those run here in the interpreter)."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    with sdpa_kernel(SDPBackend.MATH):
        o64 = reference.attention_ref(q64, k64, v64, causal)
    want = (o64,) + torch.autograd.grad(o64, (q64, k64, v64), do.double())
    del q64, k64, v64, o64
    pt = _reference(q, k, v, causal, do)
    floor = 1e-5 if q.dtype == torch.float32 else 1e-3
    for name, g, w, p in zip(NAMES, got, want, pt):
        assert torch.isfinite(g).all(), name
        assert _err(g, w) <= 2 * _err(p, w) + floor, f"{name}: {_err(g, w):.3g} vs PyTorch {_err(p, w):.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("T,D", [(1, 64), (17, 1), (255, 16), (1000, 64), (1023, 80), (2048, 128), (513, 256)])
def test_gpu_against_pytorch_error(T, D, dtype, causal):
    B, H = 2, 3
    q, k, v = _qkv(B, H, T, D, dtype)
    do = torch.randn(B, H, T, D, device="cuda").to(dtype)
    _assert_within_pytorch_error(_triton(q, k, v, causal, do), q, k, v, causal, do)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_gpu_long_sequence_memory_is_linear(causal):
    B, H, T, D = 1, 2, 8192 + 37, 64
    q, k, v = _qkv(B, H, T, D, torch.bfloat16)
    do = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    got = _triton(q, k, v, causal, do)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # out, dq, dk, dv, lse and delta: a few (B, H, T, D) buffers, nothing T x T (270 MB here).
    assert extra < 16 * B * H * T * D * 2 + 8 * B * H * T * 4
    _assert_within_pytorch_error(got, q, k, v, causal, do)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gpu_backward_is_bitwise_deterministic(dtype):
    q, k, v = _qkv(4, 8, 1000, 64, dtype)
    do = torch.randn(4, 8, 1000, 64, device="cuda").to(dtype)
    first = _triton(q, k, v, True, do)
    for _ in range(3):
        again = _triton(q, k, v, True, do)
        for name, a, b in zip(NAMES, first, again):
            assert torch.equal(a, b), name


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_gpu_torch_compile_inductor_fullgraph(causal):
    torch._dynamo.reset()
    B, T, H, D = 2, 300, 4, 64
    qkv = torch.randn(B, T, 3, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn(B, T, H * D, device="cuda", dtype=torch.bfloat16)

    def f(qkv):
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        y = ops.attention(q, k, v, causal=causal, backend="triton")
        return y.transpose(1, 2).reshape(B, T, H * D)

    eager = f(qkv)
    (g_eager,) = torch.autograd.grad(eager, qkv, do)
    compiled = torch.compile(f, fullgraph=True)(qkv)
    (g_comp,) = torch.autograd.grad(compiled, qkv, do)
    assert torch.equal(compiled, eager)
    assert torch.equal(g_comp, g_eager)
