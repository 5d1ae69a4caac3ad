"""BarkGPT.generate with a KV cache: token-for-token equal to the uncached path (greedy, fp32,
every backend), ragged prompts (left padding), EOS per row, the window sliding past block_size,
seeded sampling, one prefill then one token per step, the cache preallocated once."""

import pytest
import torch

from barkgpt import BarkGPT, GPTConfig, ops
from barkgpt.model import KVCache


def _backends():
    return [b for b in ops.BACKENDS if ops.unavailable_reason(b, "cpu") is None]


def _model(backend=None, block_size=16, n_layer=2, n_head=2, n_embd=16, vocab=61, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=vocab, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd, **kw)
    m = BarkGPT(cfg, backend=backend)
    # larger weights than the init's: sharper distributions, so a wrong cache changes tokens
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(4.0)
    return m.eval()


@pytest.mark.parametrize("backend", _backends())
def test_greedy_cached_equals_uncached_on_every_backend(backend):
    m = _model(backend, block_size=12 if backend == "triton" else 16, n_layer=2 if backend != "triton" else 1)
    idx = torch.randint(0, 61, (3, 5), generator=torch.Generator().manual_seed(1))
    n = 2 * m.config.block_size  # past block_size: the window slides
    a = m.generate(idx, n, greedy=True)
    b = m.generate(idx, n, greedy=True, use_cache=False)
    assert a.shape == (3, 5 + n) and torch.equal(a, b)
    lengths = [5, 2, 3]  # ragged prompts, left-padded
    a = m.generate(idx, n, greedy=True, prompt_lengths=lengths)
    b = m.generate(idx, n, greedy=True, use_cache=False, prompt_lengths=lengths)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :5], idx)  # the padding ids are kept
    for r, L in enumerate(lengths):  # each row as if generated alone
        alone = m.generate(idx[r:r + 1, 5 - L:], n, greedy=True)
        assert torch.equal(alone[0], a[r, 5 - L:])


@pytest.mark.parametrize("norm_first", [True, False])
def test_cached_logits_equal_the_uncached_model_on_the_same_window(norm_first):
    m = _model("torch", block_size=10, norm_first=norm_first)
    idx = torch.randint(0, 61, (2, 4), generator=torch.Generator().manual_seed(2))
    lengths = torch.tensor([4, 3])
    step, _ = m._cached_logits(2, lengths)
    nxt = None
    for i in range(25):  # 4 + 25 > 10: the last steps rebuild the cache from the window
        got = step(idx, nxt)
        want = torch.cat([m(idx[b:b + 1, idx.shape[1] - int(L):][:, -10:])[:, -1] for b, L in enumerate(lengths)])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        nxt = got.argmax(-1)
        idx = torch.cat([idx, nxt[:, None]], 1)
        lengths += 1


@pytest.mark.parametrize("backend", [b for b in _backends() if b != "triton"])
def test_generate_under_cpu_autocast(backend):
    # An fp32 model under bf16 autocast: the projections give bf16 q, k, v while the cache keeps
    # fp32 (this raised "q, k, v must share a dtype" in the cached steps). Each step's logits
    # must be the uncached model's on the same tokens, to bf16 accuracy.
    m = _model(backend, block_size=16)
    idx = torch.randint(0, 61, (2, 4), generator=torch.Generator().manual_seed(3))
    lengths = torch.tensor([4, 2])  # row 1 is left-padded: every step attends against the cache
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = m.generate(idx, 8, greedy=True, prompt_lengths=lengths)
        assert out.shape == (2, 12) and torch.equal(out, m.generate(idx, 8, greedy=True, prompt_lengths=lengths))
        step, _ = m._cached_logits(2, lengths.clone())
        nxt = None
        for i in range(8):
            got = step(out[:, :4 + i], nxt).float()
            want = torch.cat([m(out[b:b + 1, 4 - int(L):4 + i])[:, -1] for b, L in enumerate(lengths)]).float()
            assert got.dtype == want.dtype
            torch.testing.assert_close(got, want, rtol=0.05, atol=0.1 * float(want.abs().max()))
            nxt = out[:, 4 + i]


def test_one_prefill_then_one_token_per_step_and_one_cache():
    m = _model("torch", block_size=16)
    widths, caches = [], []
    orig = m.forward_cached

    def spy(idx, cache):
        widths.append(idx.shape[1])
        caches.append(cache)
        return orig(idx, cache)

    m.forward_cached = spy
    m.generate(torch.zeros(2, 6, dtype=torch.long), 14, greedy=True, prompt_lengths=[6, 4])
    assert widths == [6] + [1] * 10 + [16] * 3  # full at 16 positions: then the window slides
    assert all(c is caches[0] for c in caches)
    c = caches[0]
    assert c.k.shape == c.v.shape == (2, 2, 2, 16, 8) and c.k.dtype == torch.float32


def test_cache_follows_the_model_dtype():
    m = _model("torch").double()
    seen = []
    orig = m.forward_cached
    m.forward_cached = lambda idx, cache: seen.append(cache.k.dtype) or orig(idx, cache)
    out = m.generate(torch.zeros(1, 3, dtype=torch.long), 4, greedy=True)
    assert seen and set(seen) == {torch.float64}
    assert torch.equal(out, m.generate(torch.zeros(1, 3, dtype=torch.long), 4, greedy=True, use_cache=False))


def test_eos_stops_each_row():
    m = _model("cpp" if "cpp" in _backends() else "torch")
    idx = torch.randint(0, 61, (3, 4), generator=torch.Generator().manual_seed(4))
    free = m.generate(idx, 12, greedy=True)
    eos = int(free[1, 4 + 2])  # row 1's third new token
    a = m.generate(idx, 12, greedy=True, eos_token_id=eos)
    b = m.generate(idx, 12, greedy=True, eos_token_id=eos, use_cache=False)
    assert torch.equal(a, b)
    row = a[1, 4:].tolist()
    first = row.index(eos)
    assert first <= 2 and all(t == eos for t in row[first:])  # finished rows are padded with eos
    # every row finished: generation stops early
    one = m.generate(idx[1:2], 12, greedy=True, eos_token_id=eos)
    assert one.shape[1] == 4 + first + 1 and one[0, -1] == eos


def test_seeded_sampling_is_reproducible():
    m = _model("torch")
    idx = torch.randint(0, 61, (2, 3), generator=torch.Generator().manual_seed(5))
    runs = [m.generate(idx, 30, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(7),
                       prompt_lengths=[3, 1]) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    other = m.generate(idx, 30, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(8),
                       prompt_lengths=[3, 1])
    assert not torch.equal(runs[0], other)


def test_on_token_streams_and_stops():
    m = _model("torch")
    got = []
    out = m.generate(torch.zeros(1, 2, dtype=torch.long), 10, greedy=True,
                     on_token=lambda t: got.append(int(t[0])) or len(got) == 4)
    assert got == out[0, 2:].tolist() and len(got) == 4


def test_non_causal_models_generate_uncached():
    m = _model("torch", causal=False)
    idx = torch.randint(0, 61, (2, 3), generator=torch.Generator().manual_seed(6))
    assert torch.equal(m.generate(idx, 6, greedy=True), m.generate(idx, 6, greedy=True, use_cache=False))


def test_bad_arguments():
    m = _model("torch")
    idx = torch.zeros(2, 4, dtype=torch.long)
    for bad in ([4], [0, 4], [5, 1], [1.5, 2]):
        with pytest.raises(ValueError, match="prompt_lengths"):
            m.generate(idx, 2, prompt_lengths=bad)
    with pytest.raises(ValueError, match="max_new_tokens"):
        m.generate(idx, -1)
    with pytest.raises(ValueError, match="at least one token"):
        m.generate(torch.zeros(2, 0, dtype=torch.long), 2)
    cache = KVCache(m.config, 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match="no targets"):
        m(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), cache=cache)
    logits = m(torch.zeros(2, 16, dtype=torch.long), cache=cache)
    assert logits.shape == (2, 1, 61) and cache.length == 16
    with pytest.raises(ValueError, match="holds 16 positions"):
        m.forward_cached(torch.zeros(2, 1, dtype=torch.long), cache)


def test_padding_ids_are_ignored_and_bad_ids_raise():
    m = _model("torch")
    idx = torch.tensor([[5, 6, 7], [-1, -1, 9]])
    for use_cache in (True, False):
        out = m.generate(idx, 4, greedy=True, prompt_lengths=[3, 1], use_cache=use_cache)
        assert torch.equal(out[1, 2:], m.generate(idx[1:, 2:], 4, greedy=True)[0])
        assert out[1, :2].tolist() == [-1, -1]
    with pytest.raises(IndexError, match="out of range"):
        m.generate(torch.tensor([[5, 61, 7], [1, 2, 3]]), 2, prompt_lengths=[3, 2])


def test_training_mode_is_restored():
    m = _model("torch").train()
    m.generate(torch.zeros(1, 2, dtype=torch.long), 2)
    assert m.training


@pytest.mark.parametrize("backend", [b for b in _backends() if b != "triton"])
@pytest.mark.parametrize("causal", [True, False])
def test_last_only_is_the_last_position_of_the_full_forward(backend, causal):
    m = _model(backend, causal=causal)
    idx = torch.randint(0, 61, (3, 7), generator=torch.Generator().manual_seed(15))
    with torch.no_grad():
        full = m(idx)
        last = m(idx, last_only=True)
    assert full.shape == (3, 7, 61) and last.shape == (3, 1, 61)
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="last_only is for inference"):
        m(idx, torch.zeros_like(idx), last_only=True)


def test_uncached_generation_runs_the_head_on_the_last_position_only(monkeypatch):
    # every step of use_cache=False (and of non-causal models, which always generate that way)
    # runs the whole window through the blocks but the head on one position per row
    for causal, kw in ((True, dict(use_cache=False)), (False, {}), (True, dict(use_cache=False, prompt_lengths=[4, 2]))):
        m = _model("torch", causal=causal)
        rows = []
        m.head.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].shape[1]))
        idx = torch.randint(0, 61, (2, 4), generator=torch.Generator().manual_seed(16))
        out = m.generate(idx, 6, greedy=True, **kw)
        assert out.shape == (2, 10) and rows and set(rows) == {1}
