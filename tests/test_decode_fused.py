"""The cpp backend's fused decode step (ops.decode_layers, csrc/decode.cpp): every block of a cached
generation step in one C++ call. It must be bitwise the module loop it replaces (torch.equal, not
allclose) for every config, batch shape, step length and dtype; BarkGPT.forward_cached must use it
exactly where the loop would run the cpp kernels in inference, and fall back everywhere else; bad
arguments raise a clear error before the caches are touched."""

import pytest
import torch
import torch.nn as nn

from barkgpt import BarkGPT, GPTConfig, ops
from barkgpt.model import KVCache

pytestmark = pytest.mark.skipif(ops.unavailable_reason("cpp", "cpu") is not None,
                                reason="the cpp backend is not available")


def _model(backend="cpp", n_head=2, n_embd=24, n_layer=2, block_size=24, dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=53, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd, **kw)
    m = BarkGPT(cfg, backend=backend)
    with torch.no_grad():  # larger weights than the init's: sharper outputs, so differences show
        for p in m.parameters():
            p.mul_(3.0).add_(0.01 * torch.randn_like(p))  # nonzero biases and LayerNorm shifts
    return m.to(dtype).eval()


def _count_calls(monkeypatch, owner, name):
    """Replace owner.name with a wrapper that counts its calls in the returned dict's "calls"."""
    n = {"calls": 0}
    real = getattr(owner, name)

    def counting(*args, **kwargs):
        n["calls"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counting)
    return n


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls of ops.decode_step (what BarkGPT.forward_cached calls) while forwarding them."""
    return _count_calls(monkeypatch, ops, "decode_step")


def _steps(m, idx, start, step_lengths):
    """Run idx (B, sum(step_lengths)) through forward_cached in steps; the logits of every step
    and the filled part of the cache."""
    B = idx.shape[0]
    cache = KVCache(m.config, B, m.token_emb.weight.dtype, "cpu")
    cache.reset(start)
    outs, t = [], 0
    with torch.no_grad():
        for n in step_lengths:
            outs.append(m.forward_cached(idx[:, t:t + n], cache))
            t += n
    return outs, cache.k[:, :, :, :t].clone(), cache.v[:, :, :, :t].clone()


def _assert_fused_equals_loop(m, idx, start, step_lengths, calls, fused_steps):
    m.fused_decode = False
    want, wk, wv = _steps(m, idx, start, step_lengths)
    assert calls["calls"] == 0
    m.fused_decode = True
    got, gk, gv = _steps(m, idx, start, step_lengths)
    assert calls["calls"] == fused_steps  # the fused op ran where it should (and only there)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert torch.equal(gk, wk) and torch.equal(gv, wv)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n_head", [1, 3])
def test_fused_step_is_bitwise_the_module_loop(calls, activation, norm_first, bias, n_head):
    m = _model(n_head=n_head, bias=bias, norm_first=norm_first, activation=activation)
    g = torch.Generator().manual_seed(1)
    # B = 1, no padding: the prompt (5) is the loop's plain-attention prefill; then a step of 3
    # tokens at offset 5 and single tokens: all fused.
    idx = torch.randint(0, 53, (1, 12), generator=g)
    _assert_fused_equals_loop(m, idx, None, [5, 3, 1, 1, 1, 1], calls, fused_steps=5)
    # B = 3, left padding: even the prefill attends against the cache (start), so it is fused too.
    calls["calls"] = 0
    idx = torch.randint(0, 53, (3, 11), generator=g)
    start = torch.tensor([0, 3, 1])
    _assert_fused_equals_loop(m, idx, start, [6, 2, 1, 1, 1], calls, fused_steps=5)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_other_dtypes_and_tied_heads(calls, dtype, tie):
    m = _model(dtype=dtype, tie_embeddings=tie, n_head=4, n_embd=32, ffn_hidden=40)
    idx = torch.randint(0, 53, (2, 9), generator=torch.Generator().manual_seed(2))
    _assert_fused_equals_loop(m, idx, torch.tensor([2, 0]), [4, 2, 1, 1, 1], calls, fused_steps=5)


def test_the_longest_step_fills_the_cache(calls):
    m = _model(block_size=8)
    idx = torch.randint(0, 53, (2, 8), generator=torch.Generator().manual_seed(3))
    _assert_fused_equals_loop(m, idx, None, [1, 6, 1], calls, fused_steps=2)


@pytest.mark.parametrize("tie", [True, False])
def test_greedy_generate_equals_the_loop_and_the_uncached_path(calls, tie):
    m = _model(tie_embeddings=tie, block_size=16)
    idx = torch.randint(0, 53, (3, 5), generator=torch.Generator().manual_seed(4))
    n = 20  # past block_size: the window slides (rebuilt by a prefill each step)
    for lengths in (None, [5, 2, 3]):
        m.fused_decode = False
        loop = m.generate(idx, n, greedy=True, prompt_lengths=lengths)
        uncached = m.generate(idx, n, greedy=True, use_cache=False, prompt_lengths=lengths)
        assert calls["calls"] == 0
        m.fused_decode = True
        fused = m.generate(idx, n, greedy=True, prompt_lengths=lengths)
        assert calls["calls"] > 0
        calls["calls"] = 0
        assert torch.equal(fused, loop) and torch.equal(fused, uncached)


def test_seeded_sampling_is_the_same_fused_or_not(calls):
    m = _model()
    idx = torch.randint(0, 53, (2, 4), generator=torch.Generator().manual_seed(5))
    a = m.generate(idx, 12, temperature=1.0, top_k=None, generator=torch.Generator().manual_seed(6))
    assert calls["calls"] == 11
    m.fused_decode = False
    b = m.generate(idx, 12, temperature=1.0, top_k=None, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)


def _one_step(m, B=2):
    """A prefill of 4 tokens, then one token: returns that token's logits."""
    idx = torch.randint(0, 53, (B, 5), generator=torch.Generator().manual_seed(7))
    cache = KVCache(m.config, B, m.token_emb.weight.dtype, "cpu")
    m.forward_cached(idx[:, :4], cache)
    return m.forward_cached(idx[:, 4:], cache)


def test_the_environment_variable_switches_it_off(calls, monkeypatch):
    m = _model()
    with torch.no_grad():
        want = _one_step(m)
        assert calls["calls"] == 1
        monkeypatch.setenv("BARKGPT_FUSED_DECODE", "0")
        assert torch.equal(_one_step(m), want)
        assert calls["calls"] == 1


def test_fallbacks_take_the_module_loop(calls, monkeypatch):
    m = _model(dropout=0.2)
    with torch.no_grad():
        _one_step(m)
    assert calls["calls"] == 1  # eval mode: dropout does nothing, fused
    # training with dropout: the loop (dropout acts)
    m.train()
    with torch.no_grad():
        _one_step(m)
    assert calls["calls"] == 1
    # training with every dropout 0: fused, and equal to the loop
    m0 = _model(dropout=0.0).train()
    with torch.no_grad():
        got = _one_step(m0)
        assert calls["calls"] == 2
        m0.fused_decode = False
        assert torch.equal(got, _one_step(m0))
    m.eval()
    # autocast: the loop (its Linear layers are F.linear under autocast)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _one_step(m)
    assert calls["calls"] == 2
    # grad mode with parameters that require grad: the loop, and the result is differentiable
    out = _one_step(m)
    assert calls["calls"] == 2 and out.requires_grad
    # grad mode but nothing requires grad: fused
    for p in m.parameters():
        p.requires_grad_(False)
    assert not _one_step(m).requires_grad
    assert calls["calls"] == 3
    # the torch backend, by the model and by the environment
    with torch.no_grad():
        _one_step(_model(backend="torch"))
        assert calls["calls"] == 3
        monkeypatch.setenv("BARKGPT_BACKEND", "torch")
        _one_step(_model(backend=None))
        assert calls["calls"] == 3
        monkeypatch.delenv("BARKGPT_BACKEND")
        _one_step(_model(backend=None))  # auto on CPU: cpp
        assert calls["calls"] == 4


def test_not_under_torch_compile(monkeypatch):
    # torch.compile traces the module loop (its ops have fake kernels and formulas); asked while
    # tracing, the model declines the fused op
    m = _model()
    cache = KVCache(m.config, 1, torch.float32, "cpu")
    cache.length = 2
    x = torch.randn(1, 1, m.config.n_embd)
    with torch.no_grad():
        assert m._fused_decode_weights(x, cache) is not None
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert m._fused_decode_weights(x, cache) is None


def test_forward_hooks_and_replaced_modules_take_the_module_loop(calls):
    m = _model()
    seen = []
    h = m.layers[1].ff.fc.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    with torch.no_grad():
        _one_step(m)
    assert calls["calls"] == 0 and seen  # the hook ran
    h.remove()
    with torch.no_grad():
        _one_step(m)
    assert calls["calls"] == 1
    # settings or biases changed by hand on one module: the loop, which honours them
    for change, undo in [(lambda: setattr(m.layers[1].norm2, "eps", 1e-3), lambda: setattr(m.layers[1].norm2, "eps", 1e-5)),
                         (lambda: setattr(m.layers[0].ff, "activation", "relu"),
                          lambda: setattr(m.layers[0].ff, "activation", "gelu")),
                         (lambda: setattr(m.layers[1].attn.proj, "bias", None), None)]:
        change()
        with torch.no_grad():
            got = _one_step(m)
            assert calls["calls"] == 1
            m.fused_decode = False
            assert torch.equal(got, _one_step(m))
            m.fused_decode = True
        if undo is not None:
            undo()
    # a subclass may compute something else: not fused
    m.layers[0].ff.fc.__class__ = type("MyLinear", (type(m.layers[0].ff.fc),), {})
    with torch.no_grad():
        _one_step(m)
    assert calls["calls"] == 1


def test_changed_weights_are_used_at_the_next_step(calls):
    m = _model()
    other = _model(seed=1)
    idx = torch.randint(0, 53, (1, 6), generator=torch.Generator().manual_seed(8))

    def run(fused, change):
        m.load_state_dict(_model().state_dict())
        m.fused_decode = fused
        cache = KVCache(m.config, 1, torch.float32, "cpu")
        with torch.no_grad():
            m.forward_cached(idx[:, :3], cache)
            m.forward_cached(idx[:, 3:4], cache)
            change()
            return m.forward_cached(idx[:, 4:6], cache)

    def load():  # in place: the same Parameter objects
        m.load_state_dict(other.state_dict())

    def replace():  # new Parameter objects
        m.layers[1].attn.qkv.weight = nn.Parameter(other.layers[1].attn.qkv.weight.detach().clone())
        m.layers[0].ff.proj.bias = nn.Parameter(other.layers[0].ff.proj.bias.detach().clone())

    for change in (load, replace):
        unchanged = run(True, lambda: None)
        got = run(True, change)
        assert not torch.equal(got, unchanged)
        assert torch.equal(got, run(False, change))


def _args(B=2, T=1, C=12, H=3, L=2, S=8, F=20, bias=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(B, T, C, generator=g, dtype=dtype)
    shapes = [(C,), (C,), (3 * C, C), (3 * C,), (C, C), (C,), (C,), (C,), (F, C), (F,), (C, F), (C,)]
    if not bias:
        shapes = shapes[0::2]
    weights = [torch.randn(s, generator=g, dtype=dtype) * 0.3 for _ in range(L) for s in shapes]
    k = torch.randn(L, B, H, S, C // H, generator=g, dtype=dtype)
    v = torch.randn(L, B, H, S, C // H, generator=g, dtype=dtype)
    return dict(x=x, weights=weights, k_cache=k, v_cache=v, start=None, offset=3, n_head=H, bias=bias,
                norm_first=True, activation="gelu", eps=1e-5)


def test_the_op_alone_runs_and_writes_the_caches():
    a = _args()
    k0 = a["k_cache"].clone()
    out = ops.decode_layers(**a)
    assert out.shape == a["x"].shape and torch.isfinite(out).all()
    assert not torch.equal(a["k_cache"][:, :, :, 3], k0[:, :, :, 3])  # position 3 written
    assert torch.equal(a["k_cache"][:, :, :, :3], k0[:, :, :, :3])  # the rest untouched
    assert torch.equal(a["k_cache"][:, :, :, 4:], k0[:, :, :, 4:])
    assert out.data_ptr() != a["x"].data_ptr()


@pytest.mark.parametrize("bias, norm_first, T", [(True, True, 1), (False, False, 3)])
def test_opcheck(bias, norm_first, T):
    # the schema (the caches mutated, nothing aliased), the fake kernel, the dispatcher
    a = _args(bias=bias, T=T)
    a.update(norm_first=norm_first, start=torch.tensor([1, 0]))
    torch.library.opcheck(torch.ops.barkgpt_cpp.decode_layers.default, tuple(a.values()))


@pytest.mark.parametrize("change, message", [
    (lambda a: a["weights"].pop(), "expected 24 weights"),
    (lambda a: a.update(bias=False), "expected 12 weights"),
    (lambda a: a["weights"].__setitem__(14, torch.zeros(36, 11)), r"layer 1 attn.qkv.weight must have shape \[36, 12\]"),
    (lambda a: a["weights"].__setitem__(20, torch.zeros(21, 12)), r"layer 1 ff.fc.weight must have shape \[20, 12\]"),
    (lambda a: a["weights"].__setitem__(3, torch.zeros(36, dtype=torch.float64)), "attn.qkv.bias has dtype Double"),
    (lambda a: a.update(k_cache=a["k_cache"][:, :, :2]), "k_cache and v_cache must have one shape"),
    (lambda a: a.update(k_cache=a["k_cache"][:1], v_cache=a["v_cache"][:1]), "expected 12 weights"),
    (lambda a: a.update(n_head=5), "n_head must be >= 1 and divide C = 12"),
    (lambda a: a.update(n_head=2), "the caches must have shape"),
    (lambda a: a.update(offset=8), "do not fit a cache of 8 positions"),
    (lambda a: a.update(offset=-1), "do not fit"),
    (lambda a: a.update(activation="swish"), "activation must be 'gelu', 'gelu_tanh' or 'relu', got 'swish'"),
    (lambda a: a.update(start=torch.tensor([0, 1, 2])), "start must be a CPU integer tensor of shape"),
    (lambda a: a.update(start=torch.tensor([0.0, 1.0])), "start must be a CPU integer tensor"),
    (lambda a: a.update(x=a["x"][0]), r"x must have shape \(B, T, C\)"),
    (lambda a: a.update(x=a["x"].double()), "has dtype Float but x has Double|caches have dtype"),
])
def test_bad_arguments_raise_before_touching_the_caches(change, message):
    a = _args()
    change(a)
    k0, v0 = a["k_cache"].clone(), a["v_cache"].clone()
    with pytest.raises(RuntimeError, match=message):
        ops.decode_layers(**a)
    assert torch.equal(a["k_cache"], k0) and torch.equal(a["v_cache"], v0)


# ---- decode_step: the embedding, the blocks and ln_f in one call ------------------------------

def _step_args(B=2, T=1, **kw):
    a = _args(B=B, T=T, **kw)
    g = torch.Generator().manual_seed(10)
    C, dtype = a["x"].shape[2], a["x"].dtype
    x = a.pop("x")
    return dict(idx=torch.randint(0, 40, (B, T), generator=g), tok_emb=torch.randn(40, C, generator=g, dtype=dtype),
                pos_emb=torch.randn(8, C, generator=g, dtype=dtype), **a,
                ln_f_weight=torch.randn(C, generator=g, dtype=dtype),
                ln_f_bias=torch.randn(C, generator=g, dtype=dtype) if a["bias"] else None) | {"_x": x}


def test_decode_step_is_the_embedding_the_blocks_and_ln_f():
    a = _step_args(T=2)
    a.pop("_x")
    a["start"] = torch.tensor([0, 4])  # row 1: positions 3, 4 minus 4 -> clamped 0, then 0
    b = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
    got = ops.decode_step(**a)
    pos = (torch.arange(3, 5).expand(2, 2) - b["start"][:, None]).clamp(min=0)
    assert torch.equal(pos, torch.tensor([[3, 4], [0, 0]]))
    x = torch.nn.functional.embedding(b["idx"], b["tok_emb"]) + torch.nn.functional.embedding(pos, b["pos_emb"])
    h = ops.decode_layers(x, b["weights"], b["k_cache"], b["v_cache"], b["start"], 3, b["n_head"], True, True,
                          "gelu", 1e-5)
    want = ops.layer_norm(h[:, -1:], b["ln_f_weight"], b["ln_f_bias"], 1e-5, backend="cpp")
    assert got.shape == (2, 1, 12) and torch.equal(got, want)
    assert torch.equal(a["k_cache"], b["k_cache"]) and torch.equal(a["v_cache"], b["v_cache"])


@pytest.mark.parametrize("bias, norm_first, T", [(True, True, 1), (False, False, 3)])
def test_decode_step_opcheck(bias, norm_first, T):
    a = _step_args(bias=bias, T=T)
    a.pop("_x")
    a.update(norm_first=norm_first, start=torch.tensor([1, 0]))
    torch.library.opcheck(torch.ops.barkgpt_cpp.decode_step.default, tuple(a.values()))


@pytest.mark.parametrize("change, error, message", [
    (lambda a: a["idx"].__setitem__((1, 0), 40), IndexError, r"token id 40 is out of range for a vocabulary of 40"),
    (lambda a: a["idx"].__setitem__((0, 0), -1), IndexError, r"token id -1 is out of range"),
    (lambda a: a.update(idx=a["idx"].short()), RuntimeError, "idx must be a CPU int64 or int32 tensor"),
    (lambda a: a.update(idx=a["idx"].float()), RuntimeError, "idx must be a CPU int64 or int32 tensor"),
    (lambda a: a.update(idx=a["idx"][:, :0]), RuntimeError, r"with T >= 1"),
    (lambda a: a.update(pos_emb=a["pos_emb"][:3]), RuntimeError, r"positions 3..3 need a position table of 4 rows"),
    (lambda a: a.update(pos_emb=a["pos_emb"][:, :5]), RuntimeError, "must share C"),
    (lambda a: a.update(pos_emb=a["pos_emb"].double()), RuntimeError, "of one dtype"),
    (lambda a: a.update(ln_f_weight=a["ln_f_weight"][:5]), RuntimeError, r"ln_f_weight must be a \(12,\)"),
    (lambda a: a.update(ln_f_bias=a["ln_f_bias"].double()), RuntimeError, r"ln_f_bias must be a \(12,\)"),
    (lambda a: a.update(start=torch.tensor([0.0, 1.0])), RuntimeError, "start must be a CPU integer tensor"),
    (lambda a: a["weights"].pop(), RuntimeError, "expected 24 weights"),
    (lambda a: a.update(offset=8), RuntimeError, "need a position table|do not fit"),
])
def test_decode_step_bad_arguments_raise_before_touching_the_caches(change, error, message):
    a = _step_args()
    a.pop("_x")
    change(a)
    k0, v0 = a["k_cache"].clone(), a["v_cache"].clone()
    with pytest.raises(error, match=message):
        ops.decode_step(**a)
    assert torch.equal(a["k_cache"], k0) and torch.equal(a["v_cache"], v0)


def test_an_id_out_of_range_raises_index_error_on_the_fused_path_too(calls):
    m = _model()
    for fused in (True, False):
        m.fused_decode = fused
        cache = KVCache(m.config, 1, torch.float32, "cpu")
        with torch.no_grad():
            m.forward_cached(torch.tensor([[1, 2]]), cache)
            with pytest.raises(IndexError, match="token id 53 is out of range for a vocabulary of 53"):
                m.forward_cached(torch.tensor([[53]]), cache)
        assert cache.length == 2
    assert calls["calls"] == 1  # the fused round's step reached the op, which raised


def test_int32_ids_as_on_the_module_path(calls):
    # F.embedding on the module path takes int32 ids; so must the fused step (it raised)
    m = _model()
    idx = torch.randint(0, 53, (2, 6), generator=torch.Generator().manual_seed(3))
    _assert_fused_equals_loop(m, idx.int(), torch.tensor([0, 2]), [4, 1, 1], calls, 3)
    a = _step_args(T=2)
    a.pop("_x")
    b = dict(a, idx=a["idx"].int(), k_cache=a["k_cache"].clone(), v_cache=a["v_cache"].clone())
    assert torch.equal(ops.decode_step(**b), ops.decode_step(**a))
    b["idx"][0, 0] = 40
    with pytest.raises(IndexError, match="token id 40 is out of range for a vocabulary of 40"):
        ops.decode_step(**b)


def test_trunk_changes_take_the_module_loop(calls):
    m = _model()
    seen = []
    for module in (m.ln_f, m.drop):
        h = module.register_forward_hook(lambda mod, inp, out: seen.append(1))
        with torch.no_grad():
            _one_step(m)
        assert calls["calls"] == 0 and len(seen) == 2  # prefill and step both ran the hook
        seen.clear()
        h.remove()
    # ln_f's eps changed by hand, or an embedding dropout that acts in training: the loop
    m.ln_f.eps = 1e-3
    with torch.no_grad():
        got = _one_step(m)
        assert calls["calls"] == 0
        m.ln_f.eps = 1e-5
        assert not torch.equal(got, _one_step(m))
        assert calls["calls"] == 1
    m0 = _model(dropout=0.0).train()
    m0.drop.p = 0.5
    with torch.no_grad():
        _one_step(m0)
    assert calls["calls"] == 1
    m0.drop.p = 0.0
    with torch.no_grad():
        _one_step(m0)
    assert calls["calls"] == 2
    # the embedding tables and ln_f wanting gradients in grad mode: the loop
    for p in m.parameters():
        p.requires_grad_(False)
    m.pos_emb.weight.requires_grad_(True)
    assert _one_step(m).requires_grad and calls["calls"] == 2
    m.pos_emb.weight.requires_grad_(False)
    m.ln_f.weight.requires_grad_(True)
    assert _one_step(m).requires_grad and calls["calls"] == 2
    m.ln_f.weight.requires_grad_(False)
    assert not _one_step(m).requires_grad and calls["calls"] == 3


def test_generate_checks_once_and_again_after_each_on_token(calls, monkeypatch):
    m = _model()
    checks = _count_calls(monkeypatch, BarkGPT, "_fused_step_weights")
    idx = torch.randint(0, 53, (2, 4), generator=torch.Generator().manual_seed(11))
    m.generate(idx, 10, greedy=True)
    assert calls["calls"] == 9 and checks["calls"] == 1
    calls["calls"] = checks["calls"] = 0
    m.generate(idx, 10, greedy=True, on_token=lambda t: None)
    assert calls["calls"] == 9 and checks["calls"] == 9


def test_a_hook_on_the_model_itself_makes_every_step_check_again(calls, monkeypatch):
    m = _model()
    checks = _count_calls(monkeypatch, BarkGPT, "_fused_step_weights")
    idx = torch.randint(0, 53, (2, 4), generator=torch.Generator().manual_seed(14))
    want = m.generate(idx, 6, greedy=True)
    seen = []

    def hook(mod, args, kwargs):  # user code before every step: here it switches the fused step off
        seen.append(1)
        if len(seen) == 3:
            mod.fused_decode = False

    h = m.register_forward_pre_hook(hook, with_kwargs=True)
    calls["calls"] = checks["calls"] = 0
    assert torch.equal(m.generate(idx, 6, greedy=True), want)
    h.remove()
    assert len(seen) == 6 and checks["calls"] == 5 and calls["calls"] == 1  # each step checks: step 2 fused, then the loop


@pytest.mark.parametrize("change", ["switch_off", "hook", "replace_weight"])
def test_on_token_changes_to_the_model_take_effect_at_the_next_step(calls, change):
    idx = torch.randint(0, 53, (2, 4), generator=torch.Generator().manual_seed(12))
    other = _model(seed=1)

    def run(fused):
        """Greedy generate where on_token changes the model after the third token."""
        m = _model()
        m.fused_decode = fused
        seen, n = [], [0]

        def on_token(t):
            n[0] += 1
            if n[0] != 3:
                return
            if change == "switch_off":
                m.fused_decode = False
            elif change == "hook":
                m.layers[0].ff.fc.register_forward_hook(lambda mod, inp, out: seen.append(1))
            else:
                m.layers[1].attn.qkv.weight = nn.Parameter(other.layers[1].attn.qkv.weight.detach().clone())

        return m.generate(idx, 8, greedy=True, on_token=on_token), seen

    got, seen = run(True)
    fused_calls = calls["calls"]
    want, _ = run(False)
    assert torch.equal(got, want)
    # tokens 2 and 3 come from fused steps; after the change the loop (switched off, a hook) or
    # the fused step with the new weight
    assert fused_calls == (2 if change in ("switch_off", "hook") else 7)
    if change == "hook":
        assert len(seen) == 5  # the hook ran at every step after it was registered
    if change == "replace_weight":  # the change mattered
        assert not torch.equal(got, _model().generate(idx, 8, greedy=True))


def test_on_token_switching_the_head_screen_off_takes_effect_at_the_next_step(monkeypatch):
    torch.manual_seed(0)
    m = BarkGPT(GPTConfig(vocab_size=4096, block_size=24, n_layer=1, n_head=2, n_embd=24), backend="cpp").eval()
    n = _count_calls(monkeypatch, ops, "head_topk_logits")
    idx = torch.randint(0, 4096, (1, 4), generator=torch.Generator().manual_seed(13))
    full = m.generate(idx, 8, greedy=True)
    assert n["calls"] == 8  # the prefill's token and 7 steps
    n["calls"] = 0
    count = [0]

    def on_token(t):
        count[0] += 1
        if count[0] == 3:
            m.head_screen = False

    assert torch.equal(m.generate(idx, 8, greedy=True, on_token=on_token), full)
    assert n["calls"] == 3


@pytest.mark.parametrize("where", ["embedding", "blocks"])
def test_a_dropout_in_train_mode_in_an_eval_model_takes_the_module_loop(calls, where):
    # Monte Carlo dropout: the model in eval mode, some Dropout modules put back in train mode.
    # Each Dropout acts by its own flag, so the step must take the loop (and draw the same masks).
    m = _model(dropout=0.5)
    drops = [m.drop] if where == "embedding" else [d for d in m.layers.modules() if isinstance(d, nn.Dropout)]
    for d in drops:
        d.train()
    assert not m.training

    def step(fused):
        m.fused_decode = fused
        torch.manual_seed(5)
        with torch.no_grad():
            return _one_step(m)

    want = step(False)
    assert torch.equal(step(True), want)
    assert calls["calls"] == 0
    for d in drops:
        d.eval()
    step(True)
    assert calls["calls"] == 1
