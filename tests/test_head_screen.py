"""The screened head of greedy / top-k generation (ops.head_topk_logits, csrc/head_screen.cpp):
every finite entry is bitwise the full head's, each row's exact top k are among them, the error
bound holds (also on inputs built to attain it), and BarkGPT.generate gives the tokens of the full
head with the screen on, across weight updates, with nothing added to the state_dict."""

import copy
import os
import pickle

import pytest
import torch

from barkgpt import BarkGPT, GPTConfig, ops

pytestmark = pytest.mark.skipif(ops.unavailable_reason("cpp", "cpu") is not None,
                                reason="the head screen runs on the cpp backend")

INF = float("inf")


@pytest.fixture(autouse=True)
def _auto_gemm():
    yield
    if "cpp" in ops._loaded:
        torch.ops.barkgpt_cpp.gemm_set_library("auto")


def _full(x, w):
    return ops.linear(x, w, None, backend="cpp")


def _check(x, w, k, screen=None, expect_screened=True):
    """head_topk_logits(x, w, k) against the full head: finite entries bitwise equal, -inf
    elsewhere, every v with an exact logit >= the row's k-th largest kept, same argmax."""
    screen = screen or ops.HeadScreen()
    before = screen.stats["screened"]
    out = ops.head_topk_logits(x, w, k, screen, backend="cpp")
    full = _full(x, w)
    assert out.shape == full.shape and out.dtype == torch.float32
    kept = out != -INF
    assert torch.equal(out[kept], full[kept])
    kth = torch.topk(full, k, dim=1).values[:, -1:]
    assert bool(kept[full >= kth].all()), "an exact top-k logit was screened out"
    assert bool((kept.sum(1) >= k).all())
    assert torch.equal(out.argmax(1), full.argmax(1))
    if expect_screened is not None:
        assert (screen.stats["screened"] == before + 1) == expect_screened
    return out, full


def _rand(*shape, scale=1.0, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("B", [1, 2, 5, 8])
@pytest.mark.parametrize("scale", [1e-3, 0.02, 1.0, 300.0])
def test_exact_at_candidates_and_top_k_kept(B, scale):
    V, C = 3001, 67  # C not a multiple of 16: the masked tail of both kernels
    w, x = _rand(V, C, scale=scale, seed=1), _rand(B, C, seed=2)
    screen = ops.HeadScreen()
    for k in (1, 2, 40):
        _check(x, w, k, screen)
    _check(x, w, V - 1, screen, expect_screened=False)  # more candidates than V / 8: the full head
    assert screen.stats["builds"] == 1  # one copy for every call on the same weight


def test_gpt2_head_shape():
    V, C = 50257, 768
    w = _rand(V, C, scale=0.02, seed=3)
    screen = ops.HeadScreen()
    for B in (1, 8):
        out, _ = _check(_rand(B, C, seed=B), w, 1, screen)
        _check(_rand(B, C, seed=B), w, 40, screen)
    assert screen.w16.dtype == torch.float16 and screen.w16.shape == (V, C) and torch.equal(screen.w16, w.half())
    assert screen.nbytes < w.nbytes // 2 + 4 * V + 1


def test_ties_keep_the_first_index():
    V, C = 2048, 32
    w = _rand(V, C, scale=0.1, seed=4)
    x = _rand(3, C, seed=5)
    best = x[0] / x[0].norm()  # row 7 is row 0's best by far ...
    w[7], w[1500], w[900] = best, best, best  # ... and so are 1500 and 900, bitwise equal rows
    w[40] = w[41] = w[42] = x[1] / x[1].norm()
    out, full = _check(x, w, 1)
    assert out[0].argmax() == 7 and out[1].argmax() == 40
    assert bool(torch.isfinite(out[0, [7, 900, 1500]]).all())
    for k in (2, 3, 4):
        _check(x, w, k)


def test_rows_beyond_fp16_range_are_always_candidates():
    V, C = 4096, 48
    w = _rand(V, C, scale=0.05, seed=6)
    w[10, 3] = 1e5  # fp16 inf
    w[11] = -7e4  # every value beyond fp16
    w[12, 0] = 65519.0  # rounds to fp16's largest finite value
    x = _rand(4, C, seed=7)
    screen = ops.HeadScreen()
    out, full = _check(x, w, 1, screen)
    assert set(screen.always.tolist()) == {10, 11}
    assert bool(torch.isfinite(out[:, [10, 11]]).all())  # their exact logits are always computed
    _check(x, w, 40, screen)
    x[:, 3] = 1.0  # row 10 wins now
    _check(x, w, 1, screen)


# weights below fp16's range (its copy is 0: every row a candidate, the full head), in fp16's
# subnormal range, and products that underflow fp32 (the bound's absolute term)
@pytest.mark.parametrize("wscale,xscale,screened", [(1e-30, 1.0, False), (1e-40, 1.0, False),
                                                    (1e-20, 1e-20, False), (3e-5, 1.0, None),
                                                    (1e-3, 1e-36, True), (1e-3, 1e-41, None)])
def test_tiny_and_subnormal_values(wscale, xscale, screened):
    V, C = 2048, 40
    w, x = _rand(V, C, scale=wscale, seed=8), _rand(3, C, scale=xscale, seed=9)
    for k in (1, 5):
        _check(x, w, k, expect_screened=screened)


def test_huge_x():
    V, C = 2048, 64
    w = _rand(V, C, scale=0.02, seed=10)
    _check(_rand(2, C, scale=1e25, seed=11), w, 1)
    _check(_rand(2, C, scale=1e29, seed=11), w, 3)
    # a bound that could overflow fp32: the full head (exact by definition)
    _check(_rand(2, C, scale=1e36, seed=11), w, 1, expect_screened=False)


def test_non_finite_inputs_take_the_full_head():
    V, C = 2048, 32
    w, x = _rand(V, C, seed=12), _rand(2, C, seed=13)
    screen = ops.HeadScreen()
    for bad in (INF, float("nan")):
        xb = x.clone()
        xb[1, 5] = bad
        out = ops.head_topk_logits(xb, w, 1, screen, backend="cpp")
        torch.testing.assert_close(out, _full(xb, w), rtol=0, atol=0, equal_nan=True)
        wb = w.clone()
        wb[3, 3] = bad
        torch.testing.assert_close(ops.head_topk_logits(x, wb, 1, screen, backend="cpp"), _full(x, wb),
                                   rtol=0, atol=0, equal_nan=True)
    assert screen.stats["screened"] == 0 and screen.stats["full"] == 4


def test_what_the_screen_declines():
    V, C = 2048, 32
    w, x = _rand(V, C, seed=14), _rand(9, C, seed=15)
    screen = ops.HeadScreen()
    full = _full(x, w)
    assert torch.equal(ops.head_topk_logits(x, w, 1, screen, backend="cpp"), full)  # B = 9 > 8
    full2 = _full(x[:2], w)  # (not full[:2]: 9 rows are not a few-row product)
    assert torch.equal(ops.head_topk_logits(x[:2], w, V, screen, backend="cpp"), full2)  # k = V
    torch.ops.barkgpt_cpp.gemm_set_library("aten")  # the full head would not run the few-row kernel
    assert not ops.head_topk_available(None, "cpu", torch.float32)
    assert torch.equal(ops.head_topk_logits(x[:2], w, 1, screen, backend="cpp"), _full(x[:2], w))
    torch.ops.barkgpt_cpp.gemm_set_library("auto")
    assert ops.head_topk_available(None, "cpu", torch.float32)
    assert not ops.head_topk_available(None, "cpu", torch.float64)
    assert torch.equal(ops.head_topk_logits(x[:2], w, 1, screen, backend="torch"),
                       ops.linear(x[:2], w, None, backend="torch"))
    wt = w.t().contiguous().t()  # not row-major
    assert torch.equal(ops.head_topk_logits(x[:2], wt, 1, screen, backend="cpp"), _full(x[:2], wt))
    assert screen.stats["screened"] == 0 and screen.stats["full"] == 5
    with pytest.raises(TypeError, match="HeadScreen"):
        ops.head_topk_logits(x[:2], w, 1, None)
    with pytest.raises(ValueError, match="x must be"):
        ops.head_topk_logits(x[:2], w[:, :5], 1, screen)
    with pytest.raises(TypeError, match="k must be an int"):
        ops.head_topk_logits(x[:2], w, 1.0, screen)


def test_kernels_opcheck_and_kernel_errors():
    x, w = _rand(3, 37, seed=50), _rand(100, 37, seed=51)
    screen = ops.HeadScreen()
    assert screen.update(w)
    xr = torch.linalg.vector_norm(x, dim=1) * 1.01
    torch.library.opcheck(torch.ops.barkgpt_cpp.head_screen.default, (x, screen.w16, screen.factor, xr, 1e-40))
    for huge in (True, False):
        torch.library.opcheck(torch.ops.barkgpt_cpp.head_screen_prepare.default, (w, huge))
        w16, norms = torch.ops.barkgpt_cpp.head_screen_prepare(w, huge)
        assert torch.equal(w16, w.half())  # torch's rounding (to nearest even)
        wd, hd = w.double(), w16.double()
        want = torch.stack([wd.norm(dim=1), hd.norm(dim=1), (wd - hd).norm(dim=1)], 1)
        torch.testing.assert_close(norms, want, rtol=1e-13, atol=0)
    with pytest.raises(RuntimeError, match="1 to 8 rows"):
        torch.ops.barkgpt_cpp.head_screen(_rand(9, 37), screen.w16, screen.factor, torch.ones(9), 0.0)
    with pytest.raises(RuntimeError, match="float16"):
        torch.ops.barkgpt_cpp.head_screen(x, w, screen.factor, xr, 0.0)
    with pytest.raises(RuntimeError, match="factor must be"):
        torch.ops.barkgpt_cpp.head_screen(x, screen.w16, screen.factor[:5], xr, 0.0)


def test_top_k_cut_is_on_the_logits_not_after_the_temperature():
    """A logit just below the k-th that the shift by the maximum rounds onto it is not among the
    top k: it is never drawn (it was, before the cut moved ahead of the temperature; the screen's
    exactness needs this, as it leaves such logits at -inf)."""
    from barkgpt.generate import sample_next

    below = 1.0 - 2.0 ** -24  # the float below 1: 3 - 1 and 3 - below are both -2 in fp32
    logits = torch.tensor([[3.0, 1.0, below]]).expand(3000, 3)
    draws = sample_next(logits, temperature=1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0, 1}
    draws = sample_next(logits, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0, 1, 2}


def test_bound_holds_everywhere():
    """|exact - approximate| <= E for every entry (random weights of several scales)."""
    C = 70
    for seed, scale in enumerate((1e-38, 1e-3, 1.0, 1e3)):
        w, x = _rand(3000, C, scale=scale, seed=20 + seed), _rand(8, C, seed=30 + seed)
        screen = ops.HeadScreen()
        assert screen.update(w)
        lo, hi = ops._screen_bounds(x, screen)
        full = _full(x, w)
        assert bool((lo <= full).all()) and bool((full <= hi).all())


def _adversarial(C=16, V=64, seed=0):
    """x and a head built so that the screen's error nearly attains the bound on two rows at once:
    row 0's fp16 error points along x (its approximate logit is too low by ~E0), row 1's points
    against x (too high by ~E1), and row 1's exact logit sits just below row 0's. Every other row
    is far below. A bound smaller than the true one by a few percent drops row 0 (the argmax)."""
    for s in range(seed, seed + 200):
        g = torch.Generator().manual_seed(s)
        w0 = torch.randn(C, generator=g)
        h0 = w0.half().float()
        d0 = w0 - h0  # exact (Sterbenz)
        x = d0 / d0.norm()
        nd = float(d0.norm())
        # h1: row 0's fp16 copy moved one fp16 step towards d0 on a subset of the components
        towards = torch.where(d0 > 0, torch.tensor(65504.0), torch.tensor(-65504.0)).half()
        step = torch.nextafter(h0.half(), towards).float()
        gain = (step - h0) * x  # >= 0
        h1, total = h0.clone(), 0.0
        for j in torch.randperm(C, generator=g).tolist():
            if d0[j] != 0 and total + float(gain[j]) <= 1.9 * nd:
                h1[j], total = step[j], total + float(gain[j])
        if total < 1.5 * nd:
            continue
        mu = total / nd - 1 + 1e-3  # f1 = f0 + total - (1 + mu) nd = f0 - 1e-3 nd
        w1 = h1 - mu * d0
        if not torch.equal(w1.half().float(), h1):
            continue
        w = torch.empty(V, C)
        w[0], w[1] = w0, w1
        x2 = x[None].float()
        f = _full(x2, w[:2])[0]
        if not f[0] > f[1]:
            continue
        others = torch.rand(V - 2, generator=g) + 1
        w[2:] = (float(f.min()) - others)[:, None] * x[None]
        return w, x2
    raise AssertionError("no adversarial case found")


@pytest.mark.parametrize("seed", [0, 300, 600])
def test_bound_is_tight_on_an_adversarial_head(seed):
    w, x = _adversarial(seed=seed)
    screen = ops.HeadScreen()
    out, full = _check(x, w, 1, screen)
    assert int(full.argmax()) == 0 and bool(torch.isfinite(out[0, 0]))
    screen.update(w)
    lo, hi = ops._screen_bounds(x, screen)
    assert bool((lo <= full).all()) and bool((full <= hi).all())
    lo, hi, full = lo.double(), hi.double(), full.double()
    a, E = (lo + hi) / 2, (hi - lo) / 2  # the approximate logits and the bound, to an ulp
    err = (full - a).abs()
    # the case is sharp: with 0.95 E, row 0's upper bound falls below row 1's lower bound
    shrunk = 0.95 * E
    assert float(a[0, 0] + shrunk[0, 0]) < float(a[0, 1] - shrunk[0, 1])
    assert float(err[0, 0]) > 0.95 * float(E[0, 0]) and float(err[0, 1]) > 0.95 * float(E[0, 1])


def test_screen_copy_is_rebuilt_when_the_weight_changes():
    V, C = 2048, 32
    w, x = _rand(V, C, seed=40), _rand(2, C, seed=41)
    screen = ops.HeadScreen()
    _check(x, w, 1, screen)
    _check(x, w, 3, screen)
    assert screen.stats["builds"] == 1
    with torch.no_grad():
        w[int(_full(x, w)[0].argmin())] = x[0] * 10  # in place: the worst row becomes the best
    _check(x, w, 1, screen)
    assert screen.stats["builds"] == 2
    w2 = w.clone()
    w2[5] = x[1] * 10
    _check(x, w2, 1, screen)  # another tensor
    assert screen.stats["builds"] == 3
    p = torch.nn.Parameter(w.clone())
    opt = torch.optim.SGD([p], lr=1.0)
    _check(x, p.detach(), 1, screen)
    (p * torch.randn_like(p)).sum().backward()
    opt.step()
    _check(x, p.detach(), 1, screen)
    assert screen.stats["builds"] == 5
    screen.clear()
    assert screen.w16 is None and screen.nbytes == 0
    # pickled or copied, it keeps no tensors
    _check(x, w, 1, screen)
    assert pickle.loads(pickle.dumps(screen)).w16 is None and copy.deepcopy(screen).w16 is None


# ---- generation ---------------------------------------------------------------------------

def _model(vocab=50257, n_embd=64, block_size=24, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=vocab, block_size=block_size, n_layer=2, n_head=2, n_embd=n_embd, **kw)
    m = BarkGPT(cfg, backend="cpp")
    with torch.no_grad():  # sharper distributions than the init's
        for p in m.parameters():
            p.mul_(3.0)
    return m.eval()


@pytest.fixture(scope="module")
def gpt2_vocab_model():
    return _model()


class _Calls(list):
    """k of every ops.head_topk_logits call; ``screens``: the HeadScreen objects passed."""

    def __init__(self):
        super().__init__()
        self.screens = []

    def clear(self):
        super().clear()
        self.screens.clear()


def _count(monkeypatch):
    calls = _Calls()
    real = ops.head_topk_logits

    def counting(x, weight, k, screen, backend=None):
        calls.append(k)
        if not any(s is screen for s in calls.screens):
            calls.screens.append(screen)
        return real(x, weight, k, screen, backend=backend)

    monkeypatch.setattr(ops, "head_topk_logits", counting)
    return calls


def _both(m, *args, **kw):
    """generate with the screen, then without; the generator (if any) reseeded for each."""
    seed = kw.pop("seed", None)
    outs = []
    for on in (True, False):
        m.head_screen = on
        if seed is not None:
            kw["generator"] = torch.Generator().manual_seed(seed)
        outs.append(m.generate(*args, **kw))
    del m.head_screen  # back to the class default
    return outs


def test_greedy_generate_equals_the_full_head(gpt2_vocab_model, monkeypatch):
    m = gpt2_vocab_model
    calls = _count(monkeypatch)
    idx = torch.randint(0, 50257, (3, 6), generator=torch.Generator().manual_seed(1))
    n = 30  # 6 + 30 > block_size 24: the window slides
    a, b = _both(m, idx, n, greedy=True)
    assert torch.equal(a, b) and a.shape == (3, 6 + n)
    assert calls and set(calls) == {1} and len(calls) == n
    assert len(calls.screens) == 1  # one copy for the call ...
    st = calls.screens[0].stats
    assert st["builds"] == 1 and st["screened"] == n and st["candidates"] < 3 * n * 4
    assert calls.screens[0].w16 is not None
    calls.clear()
    a, b = _both(m, idx, n, greedy=True, prompt_lengths=[6, 2, 4])  # ragged prompts
    assert torch.equal(a, b) and len(calls) == n
    a, b = _both(m, idx[:1], 8, temperature=0.0)  # temperature 0 is greedy
    assert torch.equal(a, b)
    assert torch.equal(a, m.generate(idx[:1], 8, greedy=True, use_cache=False))


@pytest.mark.parametrize("top_p", [None, 0.9])
def test_seeded_top_k_sampling_equals_the_full_head(gpt2_vocab_model, monkeypatch, top_p):
    m = gpt2_vocab_model
    calls = _count(monkeypatch)
    idx = torch.randint(0, 50257, (2, 5), generator=torch.Generator().manual_seed(2))
    a, b = _both(m, idx, 30, temperature=0.8, top_k=40, top_p=top_p, seed=7)
    assert torch.equal(a, b)
    assert calls and set(calls) == {40}
    a, b = _both(m, idx, 12, temperature=1.7, top_k=3, top_p=top_p, seed=8, prompt_lengths=[5, 3])
    assert torch.equal(a, b)


def test_no_screen_without_top_k_or_when_switched_off(gpt2_vocab_model, monkeypatch):
    m = gpt2_vocab_model
    calls = _count(monkeypatch)
    idx = torch.randint(0, 50257, (1, 4), generator=torch.Generator().manual_seed(3))
    n = m.head_screen_min_tokens
    for top_k in (None, 0, 50257, 10 ** 6):
        m.generate(idx, n, temperature=0.8, top_k=top_k, generator=torch.Generator().manual_seed(0))
    assert calls == []
    m.generate(idx, n, greedy=True, use_cache=False)
    assert calls == []
    m.head_screen = False
    m.generate(idx, n, greedy=True)
    del m.head_screen
    assert calls == []
    monkeypatch.setenv("BARKGPT_HEAD_SCREEN", "0")
    m.generate(idx, n, greedy=True)
    assert calls == []
    m.generate(idx, n - 1, greedy=True)  # too few tokens to pay for the copy
    assert calls == []
    monkeypatch.delenv("BARKGPT_HEAD_SCREEN")
    m.generate(idx, n - 1, greedy=True)
    assert calls == []
    m.generate(idx, n, greedy=True)
    assert len(calls) == n


def test_small_vocab_and_wide_embeddings_keep_the_full_head(monkeypatch):
    calls = _count(monkeypatch)
    _model(vocab=4000, n_embd=32).generate(torch.zeros(1, 2, dtype=torch.long), 8, greedy=True)
    _model(vocab=5000, n_embd=1024, block_size=12).generate(torch.zeros(1, 2, dtype=torch.long), 8, greedy=True)
    assert calls == []
    _model(vocab=5000, n_embd=32).generate(torch.zeros(1, 2, dtype=torch.long), 8, greedy=True)
    assert len(calls) == 8


def test_training_between_generates_rebuilds_the_copy(monkeypatch):
    """Fused AdamW (configure_optimizers) changes the weights in place without bumping their
    version counter: a copy kept across generate calls would go stale."""
    calls = _count(monkeypatch)
    m = _model(vocab=8192, n_embd=32, block_size=16)
    idx = torch.randint(0, 8192, (2, 4), generator=torch.Generator().manual_seed(4))
    a, b = _both(m, idx, 10, greedy=True)
    assert torch.equal(a, b) and len(calls.screens) == 1
    opt = m.configure_optimizers(learning_rate=0.05)
    m.train()
    for _ in range(2):  # steps that change the tied head / token table in place
        _, loss = m(a[:, :-1], a[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    a2, b2 = _both(m, idx, 10, greedy=True)
    assert torch.equal(a2, b2) and not torch.equal(a2, a)
    assert len(calls.screens) == 2 and all(s.stats["builds"] == 1 for s in calls.screens)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        m.token_emb.weight.mul_(-1.0)
    m.generate(idx, 2, greedy=True)
    m.load_state_dict(sd)  # copy_ into the same tensor: its version changes
    a3, b3 = _both(m, idx, 10, greedy=True)
    assert torch.equal(a3, a2) and torch.equal(b3, b2)


def test_no_extra_state(tmp_path, monkeypatch):
    calls = _count(monkeypatch)
    m = _model(vocab=8192, n_embd=32, block_size=16)
    keys = list(m.state_dict())
    attrs = set(vars(m))
    m.generate(torch.zeros(1, 3, dtype=torch.long), 8, greedy=True)
    assert calls.screens[0].w16 is not None  # (the test's reference keeps it alive)
    assert list(m.state_dict()) == keys and set(vars(m)) == attrs
    assert not any(b is calls.screens[0].w16 for b in m.buffers())
    m.save(str(tmp_path / "run"))
    from safetensors.torch import load_file

    files = [f for f in os.listdir(tmp_path / "run") if f.endswith(".safetensors")]
    saved = set()
    for f in files:
        saved |= set(load_file(str(tmp_path / "run" / f)))
    assert saved == set(m.export_state_dict())
