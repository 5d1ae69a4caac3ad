"""A whole BarkGPT through the Triton backend (attention, LayerNorm, embedding-add) matches the
torch backend: logits, loss and every parameter gradient, with a random upstream gradient on
the logits. Interpreter on CPU (TRITON_INTERPRET=1); compiled kernels, bf16 autocast and
torch.compile(fullgraph=True) on a GPU.
"""

import pytest
import torch

from barkgpt import BarkGPT, GPTConfig

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def _pair(config):
    ref = BarkGPT(config, backend="torch").to(DEVICE)
    tri = BarkGPT(config, backend="triton").to(DEVICE)
    tri.load_state_dict(ref.state_dict())
    return ref, tri


def _step(model, idx, tgt, g):
    model.zero_grad(set_to_none=True)
    logits, loss = model(idx, tgt, return_logits=True)
    (loss + (logits.float() * g).sum()).backward()
    return logits.detach(), loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _close(a, b, name, atol, rtol, rel_norm):
    if rel_norm is None:
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
    else:  # 16-bit runs: elementwise error is noisy, the relative norm of the difference is not
        err = (a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)
        assert err <= rel_norm, f"{name}: relative error {err:.3g} > {rel_norm}"


def _compare(ref_out, tri_out, atol=1e-5, rtol=1e-5, rel_norm=None):
    (l_ref, loss_ref, g_ref), (l_tri, loss_tri, g_tri) = ref_out, tri_out
    _close(l_tri, l_ref, "logits", atol, rtol, rel_norm)
    _close(loss_tri, loss_ref, "loss", atol, rtol, rel_norm)
    assert g_ref.keys() == g_tri.keys()
    for n in g_ref:
        assert g_tri[n] is not None, f"{n} has no gradient"
        _close(g_tri[n], g_ref[n], n, atol, rtol, rel_norm)
    # The kernels' own gradients are really there (not all zero).
    for n in ("token_emb.weight", "pos_emb.weight", "ln_f.weight", "ln_f.bias", "layers.0.norm1.weight"):
        if n in g_tri:
            assert g_tri[n].abs().max() > 0, n


@pytest.mark.parametrize("preset", ["bark", "bark-tiny", "bark-article"])
def test_bark_presets_triton_matches_torch(preset):
    config = GPTConfig.preset(preset)
    ref, tri = _pair(config)
    B, T = 4, min(config.block_size, 32)
    idx = torch.randint(0, config.vocab_size, (B, T), device=DEVICE)
    tgt = torch.randint(0, config.vocab_size, (B, T), device=DEVICE)
    g = torch.randn(B, T, config.vocab_size, device=DEVICE)
    _compare(_step(ref, idx, tgt, g), _step(tri, idx, tgt, g))


def test_tied_embeddings_and_no_bias():
    # The token table gets gradient from both the embedding-add and the output head.
    config = GPTConfig(vocab_size=13, block_size=16, n_layer=1, n_head=2, n_embd=24, bias=False,
                       tie_embeddings=True)
    ref, tri = _pair(config)
    idx = torch.randint(0, 13, (3, 16), device=DEVICE)
    tgt = torch.randint(0, 13, (3, 16), device=DEVICE)
    g = torch.randn(3, 16, 13, device=DEVICE)
    _compare(_step(ref, idx, tgt, g), _step(tri, idx, tgt, g))


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["bark", "small"])
def test_gpu_compiled_bf16_autocast_matches_torch(preset):
    config = GPTConfig.preset(preset)
    ref, tri = _pair(config)
    tri_c = torch.compile(tri, fullgraph=True)
    B, T = 16, config.block_size
    idx = torch.randint(0, config.vocab_size, (B, T), device=DEVICE)
    tgt = torch.randint(0, config.vocab_size, (B, T), device=DEVICE)
    g = torch.randn(B, T, config.vocab_size, device=DEVICE)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_ref = _step(ref, idx, tgt, g)
        out_tri = _step(tri_c, idx, tgt, g)
    _compare(out_ref, out_tri, rel_norm=2e-2)


@pytest.mark.gpu
def test_gpu_gpt2_shape_fp32_matches_torch():
    config = GPTConfig.preset("gpt2", n_layer=2)
    ref, tri = _pair(config)
    idx = torch.randint(0, config.vocab_size, (2, 256), device=DEVICE)
    tgt = torch.randint(0, config.vocab_size, (2, 256), device=DEVICE)
    g = torch.randn(2, 256, config.vocab_size, device=DEVICE) * 1e-3
    _compare(_step(ref, idx, tgt, g), _step(tri, idx, tgt, g), atol=1e-4, rtol=1e-4)
