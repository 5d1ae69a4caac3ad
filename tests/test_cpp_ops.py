"""The "cpp" backend (barkgpt._cpp, kernels in csrc/): what tests/test_ops.py (every op x backend x
dtype x the declarations' cases, opcheck, the eager fast path against the declaration) does not
cover: huge tables (another C++ path), gradcheck in float64, inference mode, torch.compile
(fullgraph=True), bitwise determinism (also across thread counts), a whole BarkGPT "cpp" vs
"torch", the out-of-range token id error, the build records and the fallback when the extension
is unavailable (in subprocesses). The layouts the model uses (fused-qkv views, autocast-style
LayerNorm, mixed table dtypes, strided ids and gradients), long sequences and all-equal ids are
registry cases (barkgpt/opdecls.py).
"""

import json
import os
import textwrap

import pytest
import torch

from barkgpt import BarkGPT, GPTConfig, ops
from helpers import run_python
from barkgpt.opdecls import TOLERANCE
from barkgpt.reference import attention_ref, embedding_add_ref, layer_norm_ref
from oracle import close

if os.environ.get("BARKGPT_NO_CPP", "") not in ("", "0"):
    pytest.skip("BARKGPT_NO_CPP is set: the cpp backend is disabled on purpose", allow_module_level=True)

import barkgpt._cpp as cpp  # noqa: E402  (builds the extension on first use; a failure is an error)


# ---- embedding-add: a table gradient past the size that changes the C++ path ---------------------

@pytest.mark.parametrize("dtype,V", [(torch.float32, 16384), (torch.bfloat16, 32768)])
def test_embedding_add_large_table_gradient(dtype, V):
    # A token-table gradient of >= 32 MiB takes another path (csrc/common.h: huge-page advice
    # on a fresh block, streaming stores for fp32): values, accumulation into .grad, and a
    # result that outlives the next call's.
    C, P = 520, 64
    assert V * C * torch.tensor([], dtype=dtype).element_size() >= 32 << 20
    idx = torch.randint(0, V, (2, P))
    idx[0, :3] = torch.tensor([0, V - 1, 0])  # first and last rows of the block, a repeat
    tok = torch.randn(V, C).to(dtype).requires_grad_()
    pos = torch.randn(P, C).to(dtype).requires_grad_()
    gs = [torch.randn(2, P, C).to(dtype) for _ in range(2)]

    def expected(*grads):
        ref = torch.zeros(V, C, dtype=torch.float64)
        for g in grads:
            ref.index_add_(0, idx.reshape(-1), g.double().reshape(-1, C))
        return ref

    for g in gs:
        cpp.embedding_add(idx, tok, pos).backward(g)
    tol = TOLERANCE[dtype]
    close(tok.grad, expected(*gs), tol, "accumulated dtok")
    close(pos.grad, sum(g.double().sum(0) for g in gs), tol, "accumulated dpos")
    first, = torch.autograd.grad(cpp.embedding_add(idx, tok, pos), [tok], gs[0])
    second, = torch.autograd.grad(cpp.embedding_add(idx, tok, pos), [tok], gs[1])
    close(first, expected(gs[0]), tol, "dtok, first call")
    close(second, expected(gs[1]), tol, "dtok, second call")


@pytest.mark.parametrize("bad", [9, 1000, -1])
def test_out_of_range_token_id_raises_index_error(bad):
    tok, pos = torch.randn(9, 4, requires_grad=True), torch.randn(8, 4)
    idx = torch.tensor([[0, 1, bad, 2]])
    with pytest.raises(IndexError, match=f"token id {bad} is out of range for a vocabulary of 9"):
        cpp.embedding_add(idx, tok, pos)
    with pytest.raises(IndexError, match="out of range"):
        ops.embedding_add(idx.int(), tok, pos, backend="cpp")
    with pytest.raises(IndexError, match="out of range"), torch.no_grad():
        cpp.embedding_add(idx, tok, pos)


def test_out_of_range_token_id_raises_when_compiled():
    torch._dynamo.reset()
    tok, pos = torch.randn(9, 4, requires_grad=True), torch.randn(8, 4)
    f = torch.compile(lambda i, t, p: cpp.embedding_add(i, t, p) * 2, fullgraph=True, backend="aot_eager")
    assert f(torch.tensor([[0, 8]]), tok, pos).shape == (1, 2, 4)
    with pytest.raises(IndexError, match="token id 9 is out of range"):
        f(torch.tensor([[0, 9]]), tok, pos)


# ---- gradcheck (float64), opcheck, torch.compile ------------------------------------------------

def test_gradcheck_float64():
    d = dict(dtype=torch.float64)
    x, w, b = torch.randn(4, 7, **d), torch.randn(7, **d), torch.randn(7, **d)
    for args in ((x, w, b), (x, w, None)):
        args = tuple(None if t is None else t.clone().requires_grad_() for t in args)
        assert torch.autograd.gradcheck(lambda *a: cpp.layer_norm(*a, 1e-5), args)
    for H, T, D, causal in ((2, 5, 3, True), (2, 5, 3, False), (1, 1, 1, True), (1, 66, 1, True)):
        qkv = tuple(torch.randn(1, H, T, D, **d, requires_grad=True) for _ in range(3))
        assert torch.autograd.gradcheck(lambda q, k, v: cpp.attention(q, k, v, causal), qkv)
    idx = torch.tensor([[1, 1, 0], [2, 1, 1]])  # repeated ids
    tok = torch.randn(4, 3, **d, requires_grad=True)
    pos = torch.randn(5, 3, **d, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, p: cpp.embedding_add(idx, t, p), (tok, pos))


def test_inference_mode_runs_the_kernels():
    with torch.inference_mode():
        x, w = torch.randn(3, 8), torch.randn(8)
        torch.testing.assert_close(cpp.layer_norm(x, w, None, 1e-5), layer_norm_ref(x, w, None, 1e-5))
        q = torch.randn(1, 2, 5, 4)
        torch.testing.assert_close(cpp.attention(q, q, q, True), attention_ref(q, q, q, True))
        idx, tok, pos = torch.tensor([[1, 2]]), torch.randn(3, 4), torch.randn(2, 4)
        torch.testing.assert_close(cpp.embedding_add(idx, tok, pos), embedding_add_ref(idx, tok, pos))


def test_compile_fullgraph_small_function():
    torch._dynamo.reset()

    def f(idx, tok, pos, w, b):
        x = cpp.embedding_add(idx, tok, pos)  # (B, T, C)
        h = cpp.layer_norm(x, w, b, 1e-5)
        B, T, C = h.shape
        q = h.view(B, T, 2, C // 2).transpose(1, 2)
        y = cpp.attention(q, q * 0.5, q.sin(), True).transpose(1, 2).reshape(B, T, C)
        return (y * y).sum(-1)

    args = (torch.randint(0, 9, (3, 11)), torch.randn(9, 8, requires_grad=True),
            torch.randn(16, 8, requires_grad=True), torch.randn(8, requires_grad=True),
            torch.randn(8, requires_grad=True))
    g = torch.randn(3, 11)
    params = args[1:]
    eager = f(*args)
    ge = torch.autograd.grad(eager, params, g)
    # aot_eager: graph capture + AOTAutograd through the fake and autograd registrations
    # (the BarkGPT test below goes through inductor)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(*args)
    gc = torch.autograd.grad(out, params, g)
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    for a, e in zip(gc, ge):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


def test_compile_fullgraph_barkgpt_cpp():
    torch._dynamo.reset()
    config = GPTConfig.preset("bark")
    model = BarkGPT(config, backend="cpp")
    idx = torch.randint(0, config.vocab_size, (4, 32))
    tgt = torch.randint(0, config.vocab_size, (4, 32))
    _, loss_e = model(idx, tgt)
    grads_e = torch.autograd.grad(loss_e, list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True)
    _, loss_c = compiled(idx, tgt)
    grads_c = torch.autograd.grad(loss_c, list(model.parameters()))
    torch.testing.assert_close(loss_c, loss_e, atol=1e-5, rtol=1e-5)
    for a, e in zip(grads_c, grads_e):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


# ---- determinism ---------------------------------------------------------------------------------

def _all_ops_fwd_bwd(seed):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    x, w, b = r(1030, 200).requires_grad_(), r(200).requires_grad_(), r(200).requires_grad_()
    q, k, v = (r(2, 3, 150, 40).requires_grad_() for _ in range(3))
    idx = torch.randint(0, 5, (16, 64), generator=gen)  # heavy repeats
    tok, pos = r(5, 96).requires_grad_(), r(64, 96).requires_grad_()
    outs = [cpp.layer_norm(x, w, b, 1e-5), cpp.attention(q, k, v, True), cpp.embedding_add(idx, tok, pos)]
    ins = [(x, w, b), (q, k, v), (tok, pos)]
    res = []
    for o, i in zip(outs, ins):
        res.append(o.detach())
        res.extend(torch.autograd.grad(o, i, r(*o.shape)))
    return res


def test_bitwise_deterministic_across_runs_and_thread_counts():
    first = _all_ops_fwd_bwd(1)
    again = _all_ops_fwd_bwd(1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _all_ops_fwd_bwd(1)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, again, single):
        assert torch.equal(a, b)
        assert torch.equal(a, c)


# ---- the whole model, and dispatch ----------------------------------------------------------------

def _model_step(model, idx, tgt, g):
    logits, loss = model(idx, tgt, return_logits=True)
    params = [p for _, p in model.named_parameters()]
    return logits, loss, torch.autograd.grad(loss + (logits * g.to(logits.dtype)).sum(), params)


@pytest.mark.parametrize("preset", ["bark", "bark-tiny", "bark-article", "small"])
def test_barkgpt_cpp_matches_torch(preset):
    config = GPTConfig.preset(preset)
    ref = BarkGPT(config, backend="torch")
    mod = BarkGPT(config, backend="cpp")
    mod.load_state_dict(ref.state_dict())
    oracle = BarkGPT(config, backend="torch").double()
    oracle.load_state_dict(ref.state_dict())
    B, T = 3, min(config.block_size, 40)
    idx = torch.randint(0, config.vocab_size, (B, T))
    tgt = torch.randint(0, config.vocab_size, (B, T))
    g = torch.randn(B, T, config.vocab_size)
    l_r, loss_r, g_r = _model_step(ref, idx, tgt, g)
    l_c, loss_c, g_c = _model_step(mod, idx, tgt, g)
    _, _, g_64 = _model_step(oracle, idx, tgt, g)
    torch.testing.assert_close(l_c, l_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_c, loss_r, atol=1e-5, rtol=1e-5)
    for (name, _), a, e, o in zip(ref.named_parameters(), g_c, g_r, g_64):
        # Different fp32 summation orders: judge both against float64. cpp must be as accurate
        # as torch (a wrong gradient would be off by ~100%, not by 1e-7).
        err_c = ((a.double() - o).norm() / o.norm()).item()
        err_t = ((e.double() - o).norm() / o.norm()).item()
        assert err_c <= max(3 * err_t, 1e-6), f"{name}: cpp error {err_c:.3g} vs torch {err_t:.3g}"
        if name in ("token_emb.weight", "pos_emb.weight", "ln_f.weight"):
            assert a.abs().max() > 0, name


def test_auto_backend_picks_cpp_on_cpu():
    assert ops.unavailable_reason("cpp", "cpu") is None
    assert ops.resolve_backend(None, "cpu") == "cpp"
    assert cpp.unavailable_reason("cuda") is not None


# ---- build records, cache keys and the fallback ------------------------------------------------

def test_prebuilt_library_used_only_for_the_running_torch(tmp_path, monkeypatch):
    import importlib.machinery
    lib = tmp_path / "_C.so"
    lib.write_bytes(b"")
    spec = importlib.machinery.ModuleSpec("barkgpt._C", None, origin=str(lib))
    monkeypatch.setattr(cpp.importlib.util, "find_spec", lambda name: spec)
    src = cpp.source_dir()
    record = tmp_path / cpp.BUILD_RECORD
    assert cpp._prebuilt(src) is None  # no record: never trusted
    record.write_text(json.dumps({"torch": "1.0.0", "sources": cpp.sources_hash(src)}))
    assert cpp._prebuilt(src) is None  # built for another torch
    record.write_text(json.dumps({"torch": torch.__version__, "sources": "stale"}))
    assert cpp._prebuilt(src) is None  # csrc/ changed since
    record.write_text(json.dumps({"torch": torch.__version__, "sources": cpp.sources_hash(src)}))
    assert cpp._prebuilt(src) == str(lib)  # a portable build
    good = {"torch": torch.__version__, "sources": cpp.sources_hash(src)}
    record.write_text(json.dumps(dict(good, cpu="0" * 64)))
    assert cpp._prebuilt(src) is None  # -march=native for another CPU
    record.write_text(json.dumps(dict(good, cpu=cpp._build.cpu_hash())))
    assert cpp._prebuilt(src) == str(lib)  # -march=native for this one


def test_jit_build_loads_only_a_library_whose_build_finished(tmp_path, monkeypatch):
    # Another process may be mid-link: a library file without the marker written after a
    # finished build must not be loaded (the build runs again, under the lock).
    from torch.utils import cpp_extension
    monkeypatch.setenv("BARKGPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpp, "_compiler_problem", lambda: None)
    builds = []

    def fake_load(name, sources, build_directory, **kwargs):
        builds.append(name)
        with open(os.path.join(build_directory, name + cpp_extension.LIB_EXT), "wb") as f:
            f.write(b"whole library")

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    src = cpp.source_dir()
    lib = cpp._jit_build(src)
    assert len(builds) == 1 and os.path.isfile(lib + ".done")
    assert cpp._jit_build(src) == lib and len(builds) == 1  # finished: reused
    os.remove(lib + ".done")
    with open(lib, "wb") as f:
        f.write(b"half a lib")  # as a concurrent link would leave it
    assert cpp._jit_build(src) == lib and len(builds) == 2
    with open(lib, "rb") as f:
        assert f.read() == b"whole library"


def test_loaded_library_matches_running_torch():
    assert torch.ops.barkgpt_cpp.build_info() == "torch " + torch.__version__.split("+")[0]
    if cpp.BUILD == "jit":
        assert f"torch-{torch.__version__}-" in cpp.LIBRARY


def _run(code, **env):
    r = run_python(code, env)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


FALLBACK = """
    import warnings, torch
    from barkgpt import ops, BackendUnavailable
    x, w = torch.randn(4, 8), torch.randn(8)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        y1 = ops.layer_norm(x, w, None)
        y2 = ops.attention(*(torch.randn(1, 2, 5, 4) for _ in range(3)))
        y3 = ops.layer_norm(x, w, None)
    msgs = [str(r.message) for r in rec if issubclass(r.category, RuntimeWarning)]
    assert len(msgs) == 1, msgs
    assert ops.resolve_backend(None, "cpu") == "torch"
    torch.testing.assert_close(y1, torch.nn.functional.layer_norm(x, (8,), w))
    try:
        ops.layer_norm(x, w, None, backend="cpp")
    except BackendUnavailable as e:
        print("RAISED:", e)
    else:
        raise AssertionError("backend='cpp' did not raise")
    print("WARNED:", msgs[0])
"""


def test_fallback_when_disabled_warns_once_and_explicit_cpp_raises():
    out = _run(FALLBACK, BARKGPT_NO_CPP="1")
    assert "BARKGPT_NO_CPP" in out.split("RAISED:")[1].split("\n")[0]
    assert "WARNED:" in out and "cpp" in out.split("WARNED:")[1] and "BARKGPT_NO_CPP" in out.split("WARNED:")[1]


def test_fallback_when_no_compiler(tmp_path):
    # an empty build cache, no compiler (and no prebuilt barkgpt._C): the reason names the compiler
    hide_prebuilt = "import sys, types; sys.modules['barkgpt._C'] = types.ModuleType('barkgpt._C')\n"
    out = _run(hide_prebuilt + textwrap.dedent(FALLBACK), BARKGPT_CACHE_DIR=str(tmp_path),
               CXX="no-such-compiler-barkgpt")
    assert "no C++ compiler found" in out.split("RAISED:")[1]
    assert "no C++ compiler found" in out.split("WARNED:")[1]
