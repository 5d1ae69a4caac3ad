"""The cached_attention op (generation against a K/V cache) beyond the registry's cases
(tests/test_ops.py runs every declared case on every backend): the Triton flash-decoding kernel
with forced key splits, head dims 1..256, q length 1 and > 1, left padding; argument errors.
Values are checked through tests/oracle.py: the declaration's reference in float64 and its
tolerance."""

import importlib

import pytest
import torch

from barkgpt import ops, reference
from barkgpt.reference import attention_math

import oracle

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def _triton_fwd():
    pytest.importorskip("triton")
    if ops.unavailable_reason("triton", DEVICE) is not None:
        pytest.skip(ops.unavailable_reason("triton", DEVICE))
    importlib.import_module("barkgpt._triton")
    return importlib.import_module("barkgpt.kernels.cached_attention").cached_attention_fwd


def _inputs(B, H, Tq, D, offset, dtype, start=None, extra=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = offset + Tq + extra
    q, k, v = (torch.randn(*shape, generator=g).to(DEVICE, dtype)
               for shape in ((B, H, Tq, D), (B, H, S, D), (B, H, S, D)))
    k[:, :, offset + Tq:] = float("nan")  # past the queries: never read
    v[:, :, offset + Tq:] = float("nan")
    st = None if start is None else torch.tensor(start, dtype=torch.int64, device=DEVICE)
    return q, k, v, st, offset


def _check(fwd, args, splits):
    """The kernel with ``splits`` key splits against the declaration's reference; its result."""
    outs, _ = oracle.check_op("cached_attention", lambda *a: fwd(*a, num_splits=splits), args, args[0].dtype)
    return outs[0]


def test_reference_is_causal_attention_with_an_offset():
    q, k, v = (torch.randn(2, 3, 11, 5, dtype=torch.float64) for _ in range(3))
    full = attention_math(q, k, v, causal=True)
    for off in (0, 1, 6, 10):
        got = reference.cached_attention_ref(q[:, :, off:], k, v, None, off)
        torch.testing.assert_close(got, full[:, :, off:], rtol=0, atol=1e-12)
    # left padding: row 1's first 4 keys masked equals attention over its keys 4.. alone
    st = torch.tensor([0, 4])
    got = reference.cached_attention_ref(q, k, v, st, 0)
    alone = attention_math(q[1:, :, 4:], k[1:, :, 4:], v[1:, :, 4:], causal=True)
    torch.testing.assert_close(got[1:, :, 4:], alone, rtol=0, atol=1e-12)
    assert torch.equal(got[1:, :, :4], torch.zeros_like(got[1:, :, :4]))  # queries that see no key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("D", [1, 3, 16, 40, 64, 97, 128, 256])
def test_triton_decode_head_dims(D, dtype):
    fwd = _triton_fwd()
    args = _inputs(2, 2, 1, D, 37, dtype, start=[0, 5])
    for splits in (1, 3):
        _check(fwd, args, splits)


@pytest.mark.parametrize("Tq, offset, splits", [(1, 0, 1), (1, 15, 2), (1, 16, 2), (1, 50, 4), (1, 50, 64),
                                                (3, 29, 2), (17, 0, 1), (17, 0, 2), (20, 13, 3)])
def test_triton_splits_and_query_lengths(Tq, offset, splits):
    fwd = _triton_fwd()
    args = _inputs(2, 2, Tq, 24, offset, torch.float32, start=[0, 3])
    _check(fwd, args, splits)


def test_triton_left_padded_prefill_and_rows_without_keys():
    fwd = _triton_fwd()
    args = _inputs(3, 2, 6, 8, 0, torch.float32, start=[0, 2, 40])  # row 2 sees nothing: zeros
    out = _check(fwd, args, 2)
    assert torch.equal(out[2], torch.zeros_like(out[2]))


def test_triton_strided_cache_views():
    fwd = _triton_fwd()
    g = torch.Generator().manual_seed(3)
    kv = torch.randn(2, 2, 2, 3, 40, 16, generator=g).to(DEVICE)  # (layers, k/v, B, H, S, D)
    q = torch.randn(2, 5, 3, 16, generator=g).to(DEVICE).transpose(1, 2)  # (B, H, T, D) view
    args = (q, kv[1, 0], kv[1, 1], None, 20)
    _check(fwd, args, 3)


def test_argument_errors():
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    with pytest.raises(ValueError, match="at least 11 keys, k and v hold 10"):
        ops.cached_attention(q, k, v, None, 8)
    with pytest.raises(ValueError, match="offset must be an int >= 0"):
        ops.cached_attention(q, k, v, None, -1)
    with pytest.raises(ValueError, match="start must be"):
        ops.cached_attention(q, k, v, torch.zeros(2, dtype=torch.int64), 0)
    with pytest.raises(ValueError, match="start must be"):
        ops.cached_attention(q, k, v, torch.zeros(1), 0)
    with pytest.raises(ValueError, match=r"k and v must have shape"):
        ops.cached_attention(q, k, torch.randn(1, 2, 9, 8), None, 0)
    with pytest.raises(ValueError, match=r"k and v must have shape"):
        ops.cached_attention(q, k[..., :4], v[..., :4], None, 0)
    with pytest.raises(TypeError, match="share a dtype"):
        ops.cached_attention(q, k.double(), v, None, 0)


def test_declared_inference_only():
    from barkgpt import registry
    decl = registry.OPS["cached_attention"]
    assert decl.backward is None and "Inference only" in decl.doc
    assert not any(a.grad for a in decl.args)


def test_triton_kernels_compile_for_sm90_offline():
    """The decode and combine kernels compile to a cubin for an H100 (sm_90) with Triton's own
    compiler, no GPU needed (the interpreter runs them here, but never compiles them)."""
    pytest.importorskip("triton")
    from helpers import run_python

    r = run_python("""
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from barkgpt.kernels import cached_attention as kc
        target = GPUTarget("cuda", 90, 32)
        ints = ["sqb", "sqh", "sqt", "sqd", "skb", "skh", "skt", "skd", "svb", "svh", "svt", "svd",
                "H", "Tq", "D", "offset", "split_len", "rows"]
        for dt, bd in (("fp32", 64), ("bf16", 256)):
            const = {"HAS_START": True, "BLOCK_M": 16, "BLOCK_N": 64 if bd <= 128 else 32, "BLOCK_D": bd,
                     "PRECISION": "ieee" if dt == "fp32" else "tf32"}
            sig = {"Q": "*" + dt, "K": "*" + dt, "V": "*" + dt, "START": "*i64", "ACC": "*fp32", "M": "*fp32",
                   "L": "*fp32", **{n: "i32" for n in ints}, "qk_scale": "fp32", **{k: "constexpr" for k in const}}
            k = triton.compile(ASTSource(fn=kc._cached_attention_fwd_kernel, signature=sig, constexprs=const),
                               target=target, options={"num_warps": 8})
            assert k.asm["cubin"]
        const = {"BLOCK_S": 64, "BLOCK_D": 256}
        sig = {"ACC": "*fp32", "M": "*fp32", "L": "*fp32", "OUT": "*bf16", "n_splits": "i32", "rows": "i32",
               "D": "i32", **{k: "constexpr" for k in const}}
        k = triton.compile(ASTSource(fn=kc._cached_attention_combine_kernel, signature=sig, constexprs=const),
                           target=target, options={"num_warps": 4})
        assert k.asm["cubin"]
        print("compiled")
    """, env={"TRITON_INTERPRET": "0"}, timeout=600)
    missing_tool = ("cannot find ptxas", "ptxas not found", "no module named 'triton.backends")
    if r.returncode != 0 and any(m in r.stderr.lower() for m in missing_tool):
        pytest.skip(f"Triton cannot compile for CUDA here: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-2000:]
