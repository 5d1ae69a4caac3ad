import pytest
import torch

from barkgpt import BarkGPT, ConfigError, GPTConfig
from helpers import ArticleBarkGPT


def small_config(**kw):
    base = dict(vocab_size=11, block_size=16, n_layer=2, n_head=4, n_embd=32)
    base.update(kw)
    return GPTConfig(**base)


def test_logits_shape_and_loss():
    m = BarkGPT(small_config(), backend="torch")
    idx = torch.randint(0, 11, (3, 9))
    logits = m(idx)
    assert logits.shape == (3, 9, 11)
    tgt = torch.randint(0, 11, (3, 9))
    tgt[0, :4] = -100
    _, loss = m(idx, tgt)
    keep = tgt != -100
    want = torch.nn.functional.cross_entropy(logits[keep], tgt[keep])
    torch.testing.assert_close(loss, want)
    # a pad id as ignore_index
    tgt2 = tgt.clone()
    tgt2[tgt2 == -100] = 0
    torch.testing.assert_close(m.loss(idx, tgt2, ignore_index=0),
                               torch.nn.functional.cross_entropy(logits[tgt2 != 0], tgt2[tgt2 != 0]))


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("causal", [True, False])
def test_parity_with_the_articles_model(norm_first, activation, causal):
    c = small_config(norm_first=norm_first, activation=activation, causal=causal)
    article = ArticleBarkGPT(c).eval()
    for p in article.parameters():  # non-trivial norms and biases
        torch.nn.init.normal_(p, std=0.3)
    m = BarkGPT.from_article_state_dict(article.state_dict(), c, backend="torch").eval()
    idx = torch.randint(0, 11, (3, 13))
    torch.testing.assert_close(m(idx), article(idx, causal), rtol=1e-5, atol=1e-5)
    # training mode (no fast path in nn.TransformerEncoderLayer), gradients too
    article.train(), m.train()
    g = torch.randn(3, 13, 11)
    a_out, m_out = article(idx, causal), m(idx)
    torch.testing.assert_close(m_out, a_out, rtol=1e-5, atol=1e-5)
    a_out.backward(g), m_out.backward(g)
    torch.testing.assert_close(m.layers[0].attn.qkv.weight.grad, article.layers[0].self_attn.in_proj_weight.grad,
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(m.token_emb.weight.grad, article.token_emb.weight.grad, rtol=1e-4, atol=1e-6)


def test_article_state_dict_mismatch_is_clear():
    c = small_config()
    sd = ArticleBarkGPT(GPTConfig(**{**c.to_dict(), "ffn_hidden": 128 + 4})).state_dict()
    with pytest.raises(ConfigError, match="feed-forward width is 132"):
        BarkGPT.from_article_state_dict(sd, c)


def test_sequence_longer_than_block_raises():
    m = BarkGPT(small_config(block_size=8), backend="torch")
    with pytest.raises(ValueError, match="sequence length 9 exceeds block_size 8"):
        m(torch.zeros(1, 9, dtype=torch.long))


def test_out_of_range_token_raises():
    m = BarkGPT(small_config(), backend="torch")
    with pytest.raises(IndexError, match="token id 11 is out of range"):
        m(torch.tensor([[1, 11]]))


def test_num_params_and_tied_embeddings():
    c = small_config()
    m = BarkGPT(c, backend="torch")
    C, V, L, F = 32, 11, 2, 128
    per_layer = (3 * C * C + 3 * C) + (C * C + C) + (C * F + F) + (F * C + C) + 4 * C
    want = V * C + 16 * C + L * per_layer + 2 * C + V * C
    assert m.num_params() == want
    assert m.num_params(non_embedding=True) == want - V * C - 16 * C
    t = BarkGPT(small_config(tie_embeddings=True), backend="torch")
    assert t.head.weight is t.token_emb.weight
    assert t.num_params() == want - V * C
    assert t.to(torch.float64).head.weight is t.token_emb.weight  # .to keeps the tie
    with torch.device("meta"):
        assert 124e6 < BarkGPT(GPTConfig.preset("gpt2"), backend="torch").num_params() < 125e6


def test_flops_per_token_hand_computed():
    c = small_config(n_layer=1, bias=False)
    m = BarkGPT(c, backend="torch")
    C, V, F, T = 32, 11, 128, 16
    n_linear = 3 * C * C + C * C + C * F + F * C + C * V
    assert m.flops_per_token() == 6 * n_linear + 12 * 1 * C * T
    assert m.flops_per_token(seq_len=4) == 6 * n_linear + 12 * C * 4


def test_configure_optimizers_groups():
    m = BarkGPT(small_config(), backend="torch")
    opt = m.configure_optimizers(weight_decay=0.1, learning_rate=1e-3)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in m.named_parameters()}
    assert all(p.dim() == 2 for p in decay["params"])
    nd = {names[id(p)] for p in no_decay["params"]}
    assert {"token_emb.weight", "pos_emb.weight", "ln_f.weight", "layers.0.norm1.bias",
            "layers.1.attn.qkv.bias"} <= nd
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))
    assert opt.defaults["fused"] is True  # one fused update on CPU too (torch >= 2.4)


def test_generate_stops_at_eos_and_respects_block():
    torch.manual_seed(0)
    m = BarkGPT(small_config(block_size=8), backend="torch")
    with torch.no_grad():  # make token 3 overwhelmingly likely: it plays EOS
        m.head.weight.zero_()
        m.head.weight[3] = 5.0 * m.ln_f.weight.sign()
        m.ln_f.bias.fill_(1.0)
    out = m.generate(torch.tensor([[1, 2]]), max_new_tokens=20, eos_token_id=3)
    assert out.tolist() == [[1, 2, 3]]
    out = m.generate(torch.tensor([[1, 2]]), max_new_tokens=12, greedy=True)  # no EOS: full length,
    assert out.shape == (1, 14)  # context cropped to block_size as it grows


def test_generate_batch_pads_finished_rows():
    m = BarkGPT(small_config(), backend="torch")
    g = torch.Generator().manual_seed(0)
    out = m.generate(torch.tensor([[1], [2]]), max_new_tokens=30, temperature=1.0, top_k=None,
                     eos_token_id=4, generator=g)
    for row in out.tolist():
        if 4 in row[1:]:
            first = row.index(4, 1)
            assert all(t == 4 for t in row[first:])


def test_sampling_options():
    from barkgpt.generate import sample_next

    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0]])
    assert sample_next(logits, greedy=True).item() == 2
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, temperature=1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {2, 3}
    draws = {sample_next(logits, temperature=1.0, top_k=None, top_p=0.5, generator=g).item() for _ in range(50)}
    assert draws == {2}


def test_torch_compile_fullgraph_auto_backend_matches_eager():
    m = BarkGPT(GPTConfig.preset("bark-tiny", dropout=0.0), backend=None)
    idx = torch.randint(0, 9, (3, 32))
    tgt = torch.randint(0, 9, (3, 32))
    cm = torch.compile(m, fullgraph=True)  # fails on any graph break (dispatch included)
    _, loss_c = cm(idx, tgt)
    grads_c = torch.autograd.grad(loss_c, list(m.parameters()))
    _, loss_e = m(idx, tgt)
    grads_e = torch.autograd.grad(loss_e, list(m.parameters()))
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("temperature", [1e-3, 1e-40, 1e-320, 5e-324])
def test_tiny_temperature_is_the_greedy_limit(temperature):
    from barkgpt.generate import sample_next

    g = torch.Generator().manual_seed(0)
    # a top logit 1 to 2 above the rest: divided by 1e-40 the logits overflow float32, and
    # 1e-320 is 0 in float32
    logits = torch.randn(64, 50, generator=g) * 10
    top = torch.randint(0, 50, (64,), generator=g)
    logits[torch.arange(64), top] = logits.amax(-1) + 1 + torch.rand(64, generator=g)
    want = top
    for top_k, top_p in ((None, None), (5, None), (None, 0.9), (40, 0.5)):
        got = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=g)
        assert torch.equal(got, want)
    # tokens tied for the top share the draw, as softmax(l / t) does as t -> 0
    tied = torch.tensor([[1.0, 3.0, 3.0, -2.0]]).expand(400, 4)
    draws = sample_next(tied, temperature=temperature, top_k=None, generator=g)
    assert set(draws.tolist()) == {1, 2} and 150 < int((draws == 1).sum()) < 250


def test_sampling_matches_softmax_of_logits_over_temperature():
    from barkgpt.generate import sample_next

    g = torch.Generator().manual_seed(1)
    n = 20000
    for logits, t in (([0.0, 1.0, 2.0, -1.0], 1.0), ([1000.0, 999.99, 999.98, 990.0], 0.01), ([0.0, 3.0, 1.0, 2.0], 7.0)):
        row = torch.tensor([logits])
        want = torch.softmax(row.double() / t, -1)[0]
        got = torch.bincount(sample_next(row.expand(n, 4), temperature=t, top_k=None, generator=g),
                             minlength=4).double() / n
        torch.testing.assert_close(got, want, rtol=0, atol=0.015)


@pytest.mark.parametrize("temperature", [-1.0, -1e-40, float("nan"), float("inf")])
def test_bad_temperature_is_a_value_error(temperature):
    from barkgpt.generate import sample_next

    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        sample_next(torch.zeros(2, 5), temperature=temperature)


def test_generate_with_tiny_temperature_equals_greedy():
    torch.manual_seed(0)
    m = BarkGPT(small_config(), backend="torch")
    with torch.no_grad():  # sharpen the logits so that 1e-40 overflows without the fix
        m.head.weight.mul_(50)
    idx = torch.randint(0, 11, (3, 4))
    greedy = m.generate(idx, max_new_tokens=10, greedy=True)
    for t in (1e-40, 1e-320):
        g = torch.Generator().manual_seed(0)
        assert torch.equal(m.generate(idx, max_new_tokens=10, temperature=t, top_k=None, generator=g), greedy)
        assert torch.equal(m.generate(idx, max_new_tokens=10, temperature=t, top_k=3, top_p=0.9, generator=g), greedy)
