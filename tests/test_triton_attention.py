"""Triton flash attention (barkgpt.kernels.attention) against float64 oracles and reference.py.

On a machine without CUDA the kernels run on CPU tensors under TRITON_INTERPRET=1 (set by
conftest.py), with small tiles; the same tests run compiled when a GPU is present, and the
``gpu``-marked tests add bf16, long sequences, GPU tile shapes and torch.compile with inductor.
"""

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from barkgpt import ops, reference

triton_backend = importlib.import_module("barkgpt._triton")  # registers the barkgpt_triton ops

kattn = importlib.import_module("barkgpt.kernels.attention")
kcfg = importlib.import_module("barkgpt.kernels._attention_config")

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

# Max-abs tolerances vs the float64 oracle, for unit-variance inputs and upstream gradients.
# fp32 runs "ieee" dots, so errors are a few fp32 ulps of O(1) values (observed <= 2e-6).
# fp16 rounds inputs, P and dS to 11-bit mantissas (observed <= 2e-3, the same as
# reference.attention_ref's own fp16 error).
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=4e-3, rtol=4e-3)}


def _qkv(B, H, T, D, dtype, device=DEVICE, scale=1.0):
    return [(torch.randn(B, H, T, D, dtype=torch.float32) * scale).to(device, dtype).requires_grad_()
            for _ in range(3)]


def _triton(q, k, v, causal, do):
    out = ops.attention(q, k, v, causal=causal, backend="triton")
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    return out, dq, dk, dv


def _oracle(q, k, v, causal, do):
    """F.scaled_dot_product_attention, math backend, float64 on CPU: output and grads."""
    q64, k64, v64 = (t.detach().to("cpu", torch.float64).requires_grad_() for t in (q, k, v))
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q64, k64, v64, is_causal=causal)
    return (out,) + torch.autograd.grad(out, (q64, k64, v64), do.to("cpu", torch.float64))


def _reference(q, k, v, causal, do):
    """barkgpt.reference.attention_ref in the inputs' own dtype and device."""
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = reference.attention_ref(q2, k2, v2, causal)
    return (out,) + torch.autograd.grad(out, (q2, k2, v2), do)


def _assert_close(got, want, names, **tol):
    for name, g, w in zip(names, got, want):
        assert g.shape == w.shape, name
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
        torch.testing.assert_close(g.detach().to("cpu", torch.float64), w.detach().to("cpu", torch.float64),
                                   msg=lambda m, name=name: f"{name}: {m}", **tol)


NAMES = ("out", "dq", "dk", "dv")


def _check(B, H, T, D, causal, dtype):
    q, k, v = _qkv(B, H, T, D, dtype)
    do = torch.randn(B, H, T, D, device=DEVICE).to(dtype)
    got = _triton(q, k, v, causal, do)
    for g, t in zip(got, (q, q, k, v)):
        assert g.dtype == dtype and g.device == t.device
    _assert_close(got, _oracle(q, k, v, causal, do), NAMES, **TOL[dtype])
    _assert_close(got, _reference(q, k, v, causal, do), NAMES, **TOL[dtype])


# Every T at D=16 and every D at T=17 and T=100 (not a full cross product: interpreter time).
SEQ_LENS = (1, 2, 15, 17, 64, 100, 129)
HEAD_DIMS = (1, 3, 8, 16, 24, 64, 80, 128)
SWEEP = sorted({(T, 16) for T in SEQ_LENS} | {(T, D) for T in (17, 100) for D in HEAD_DIMS})


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("T,D", SWEEP)
def test_matches_oracle_fp32(T, D, causal):
    _check(2, 2, T, D, causal, torch.float32)


FP16_SWEEP = sorted({(T, 16) for T in SEQ_LENS} | {(100, D) for D in HEAD_DIMS})


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("T,D", FP16_SWEEP)
def test_matches_oracle_fp16(T, D, causal):
    _check(2, 2, T, D, causal, torch.float16)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_lse_is_the_row_logsumexp(causal):
    B, H, T, D = 2, 3, 37, 24
    q, k, v = _qkv(B, H, T, D, torch.float32)
    out, lse = torch.ops.barkgpt_triton.attention_fwd(q, k, v, causal)
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(D)
    if causal:
        s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=s.device).tril(), float("-inf"))
    assert lse.shape == (B, H, T) and lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double(), torch.softmax(s, -1) @ v.double(), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_peaked_softmax_is_stable(causal):
    # Scores of several hundred: exp would overflow without the running max.
    q, k, v = _qkv(1, 2, 45, 16, torch.float32, scale=6.0)
    do = torch.randn(1, 2, 45, 16, device=DEVICE)
    _assert_close(_triton(q, k, v, causal, do), _oracle(q, k, v, causal, do), NAMES, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_fused_qkv_views_and_strided_grad(causal, dtype):
    """q, k, v sliced from one (B, T, 3, H, D) projection, as the model does, and a dO that is
    a transposed view with a non-unit stride on D: everything strided, nothing copied first."""
    B, T, H, D = 2, 33, 3, 24
    qkv = torch.randn(B, T, 3, H, D, device=DEVICE).to(dtype).requires_grad_()
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, D) views
    assert not q.is_contiguous() and q.stride(-2) == 3 * H * D
    big = torch.randn(B, T, H, 2 * D, device=DEVICE).to(dtype)
    do = big[..., ::2].transpose(1, 2)  # (B, H, T, D), stride 2 on D
    assert do.stride(-1) == 2
    out = ops.attention(q, k, v, causal=causal, backend="triton")
    (dqkv,) = torch.autograd.grad(out, qkv, do)
    dq, dk, dv = dqkv.permute(2, 0, 3, 1, 4).unbind(0)
    # Transposed-contiguous q/k/v (a (B, T, H, D) buffer viewed as (B, H, T, D)).
    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (q, k, v))
    got_t = _triton(qt, kt, vt, causal, do)
    want = _oracle(q, k, v, causal, do)
    _assert_close((out, dq, dk, dv), want, NAMES, **TOL[dtype])
    _assert_close(got_t, want, NAMES, **TOL[dtype])


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_broadcast_upstream_gradient(causal):
    """dO with zero strides, as ``out.sum().backward()``-style graphs produce."""
    q, k, v = _qkv(2, 2, 21, 8, torch.float32)
    do = torch.randn(1, 1, 1, 8, device=DEVICE).expand(2, 2, 21, 8)
    assert do.stride() == (0, 0, 0, 1)
    _assert_close(_triton(q, k, v, causal, do), _oracle(q, k, v, causal, do), NAMES, **TOL[torch.float32])


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
        q, k, v = _qkv(1, 2, T, D, dtype)
        do = torch.randn(1, 2, T, D, device=DEVICE).to(dtype)
        _assert_close(_triton(q, k, v, causal, do), _oracle(q, k, v, causal, do), NAMES, **TOL[dtype])
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
    q, k, v = _qkv(2, 2, 23, 16, torch.float32)
    do = torch.randn(2, 2, 23, 16, device=DEVICE)

    def f(q, k, v):
        return ops.attention(q, k, v, causal=causal, backend="triton") * 2.0

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    grads = torch.autograd.grad(got, (q, k, v), do)
    want = _oracle(q, k, v, causal, 2.0 * do)
    _assert_close((got / 2.0,) + grads, want, NAMES, **TOL[torch.float32])


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


def _assert_within_pytorch_error(got, q, k, v, causal, do):
    """Error vs a float64 oracle at most twice PyTorch's own SDPA error in the same dtype
    (plus a small floor): the FlashAttention repo's criterion, fair across dtypes."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    with sdpa_kernel(SDPBackend.MATH):
        o64 = F.scaled_dot_product_attention(q64, k64, v64, is_causal=causal)
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
