"""The declaration of every op: one :class:`~barkgpt.registry.OpDecl` each.

A declaration holds what does not depend on the backend: arguments, checks, the reference (the
``torch`` backend and the float64 test oracle), the forward kernel's shape rule for fake tensors,
the autograd contract every backend's kernels follow, the byte/FLOP model, the test tolerances per
dtype and the test cases (tests/test_ops.py runs every case on every backend that can run).
Backends register their kernels against these declarations (barkgpt/_cpp.py, barkgpt/_triton.py);
barkgpt.ops turns each declaration into its public function.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from . import perf, reference
from ._checks import check_targets, check_token_ids, float_tensor, same_device, tensor
from .registry import Arg, Backward, Case, Close, OpDecl, declare_op

# Max error against the float64 reference, relative to max(1, max |expected|), for the op's
# results and every gradient (the C++ backend's tolerances before the registry; Triton's were
# looser or of another form, none tighter).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels accumulate and keep statistics in: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _randn(gen, *shape, dtype=torch.float32, device="cpu", scale=1.0, shift=0.0):
    return (torch.randn(*shape, generator=gen) * scale + shift).to(device=device, dtype=dtype)


# Upstream gradients in the layouts autograd hands kernels (Case.upstream), values ~N(0, 1).
def _strided_grad(o, gen):
    """Every other element of a buffer twice as wide along the last dim (stride 2)."""
    big = torch.randn(*o.shape[:-1], 2 * o.shape[-1], generator=gen).to(device=o.device, dtype=o.dtype)
    return big[..., ::2]


def _expanded_grad(o, gen):
    """One row broadcast over the leading dims (stride 0), as ``out.sum()``-style graphs give."""
    row = torch.randn(o.shape[-1], generator=gen).to(device=o.device, dtype=o.dtype)
    return row.expand(o.shape)


def _transposed_grad(o, gen):
    """A transposed view of a contiguous buffer (dims 1 and 2 swapped; 2-D: dims 0 and 1)."""
    a, b = (0, 1) if o.dim() == 2 else (1, 2)
    shape = list(o.shape)
    shape[a], shape[b] = shape[b], shape[a]
    return torch.randn(*shape, generator=gen).to(device=o.device, dtype=o.dtype).transpose(a, b)


def _permuted_grad(o, gen):
    """All dims reversed: no unit stride on the last dim."""
    dims = tuple(range(o.dim() - 1, -1, -1))
    return torch.randn(*reversed(o.shape), generator=gen).to(device=o.device, dtype=o.dtype).permute(dims)


def _bthd_strided_grad(o, gen):
    """(B, H, T, D) viewed from a (B, T, H, 2D) buffer: transposed, stride 2 on D."""
    B, H, T, D = o.shape
    big = torch.randn(B, T, H, 2 * D, generator=gen).to(device=o.device, dtype=o.dtype)
    return big[..., ::2].transpose(1, 2)


# ---- layer_norm ------------------------------------------------------------------------------

def _check_x_weight_bias(op, x, weight, bias) -> None:
    """Tensors, one device, floating x and weight (bias, when given, is checked by the op)."""
    tensor("x", x), tensor("weight", weight)
    if bias is not None:
        tensor("bias", bias)
    same_device(op, x=x, weight=weight, bias=bias)
    float_tensor(op, "x", x), float_tensor(op, "weight", weight)


def check_layer_norm(x, weight, bias=None, eps=1e-5) -> None:
    op = "layer_norm"
    _check_x_weight_bias(op, x, weight, bias)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dimension, got a scalar")
    n = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != n:
        raise ValueError(f"{op}: weight must have shape ({n},) to match x's last dim, got {tuple(weight.shape)}")
    if bias is not None:
        float_tensor(op, "bias", bias)
        if bias.dim() != 1 or bias.shape[0] != n:
            raise ValueError(f"{op}: bias must have shape ({n},) to match x's last dim, got {tuple(bias.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"{op}: eps must be a positive number, got {eps!r}")


def _layer_norm_fake(x, weight, bias, eps):
    stat = x.new_empty(x.shape[:-1], dtype=acc_dtype(x.dtype))
    return x.new_empty(x.shape), stat, torch.empty_like(stat)


def _layer_norm_bwd_fake(grad_y, x, weight, bias, mean, rstd):
    # dbias has bias's dtype (weight's, and is ignored, when there is no bias)
    db_dtype = (bias if bias is not None else weight).dtype
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape, dtype=db_dtype)


def _layer_norm_case(rows, n, bias=True, w_dtype=None, shape=None, eps=1e-5, layout=None):
    """x (rows, n) ~ 2 N(0, 1) + 0.5 (reshaped to ``shape``). ``layout``: "transposed" (x a
    transposed view), "permuted" (a (5, 4, n) view of (4, 5, n) rows that no stride flattens),
    "strided-params" (weight and bias strided views), "constant" (every row one value: only eps
    keeps rstd finite)."""
    def make(dtype, device, gen):
        if layout == "transposed":
            x = _randn(gen, n, rows, dtype=dtype, device=device, scale=2.0, shift=0.5).t()
        elif layout == "permuted":
            x = _randn(gen, rows // 5, 5, n, dtype=dtype, device=device, scale=2.0, shift=0.5).permute(1, 0, 2)
        elif layout == "constant":
            x = torch.full((rows, n), 3.0, dtype=dtype, device=device)
        else:
            x = _randn(gen, rows, n, dtype=dtype, device=device, scale=2.0, shift=0.5)
        if shape is not None:
            x = x.reshape(shape)
        wd = w_dtype or dtype
        if layout == "strided-params":
            w = _randn(gen, 2 * n, dtype=wd, device=device, scale=0.5, shift=1.0)[::2]
            b = _randn(gen, n, 2, dtype=wd, device=device)[:, 1]
        else:
            w = _randn(gen, n, dtype=wd, device=device, scale=0.5, shift=1.0)
            b = _randn(gen, n, dtype=wd, device=device) if bias else None
        return x, w, b, eps
    return make


# Bounds the Triton LayerNorm tests held (elementwise against the float64 reference, or no worse
# than 2x PyTorch's own error in the dtype on ill-conditioned rows; and against the reference run
# in the dtype within that bound plus its error). fp32: fp32 math throughout (dweight/dbias sum
# thousands of rows, hence rtol); fp16: one rounding of y / dx.
_LN_FP32 = Close(elementwise=(5e-5, 1e-5), ill_conditioned=2.0, vs_reference=(5e-5, 1e-5))
_LN_FP16 = Close(elementwise=(5e-3, 5e-3), ill_conditioned=2.0, vs_reference=(5e-3, 5e-3))
LAYER_NORM_CLOSE = {torch.float32: _LN_FP32, torch.float16: _LN_FP16}
# The interpreter (Triton on CPU) runs these (rows, n) in fp32 and, where listed, fp16.
_LN_INTERPRET_FP32 = {(1, 1), (7, 1), (4097, 1), (7, 3), (4097, 3), (1, 8), (4097, 8), (7, 32), (7, 97), (1, 97),
                      (7, 128), (7, 768), (1, 1500), (7, 1500), (7, 1536), (3, 4096)}
_LN_INTERPRET_FP16 = {(7, 1), (7, 3), (4097, 8), (7, 97), (7, 768), (7, 1500), (3, 4096)}
# ... and these (a sample of the others) in fp32 and fp16
_LN_INTERPRET_BOTH = {(1, 1), (7, 3), (4097, 8), (7, 768), (300, 32), (1, 1500), (1, 4096)}


def _ln_interpret(rows, n):
    if (rows, n) in _LN_INTERPRET_BOTH or (rows, n) in _LN_INTERPRET_FP16:
        return (torch.float32, torch.float16)
    return (torch.float32,) if (rows, n) in _LN_INTERPRET_FP32 else False


def _layer_norm_cases():
    sizes = [(rows, n) for n in (1, 3, 8, 97, 768) for rows in (1, 7, 4097)]
    sizes += [(rows, n) for n in (16, 32, 64, 128) for rows in (7, 300)]  # unrolled widths
    sizes += [(rows, n) for n in (1500, 1536) for rows in (1, 7, 300)]
    sizes += [(1, 4096), (7, 4096), (33, 4096), (3, 4096)]
    C = _layer_norm_case
    cases = [Case(f"rows{r}-n{n}", C(r, n), heavy=r * n > 40000 or (r > 7 and n > 97), close=LAYER_NORM_CLOSE,
                  interpret=_ln_interpret(r, n)) for r, n in sizes]
    f32 = (torch.float32,)
    cases += [Case(f"nobias-rows{r}-n{n}", C(r, n, bias=False), close=LAYER_NORM_CLOSE, interpret=f32)
              for r, n in ((7, 3), (7, 97), (513, 8), (7, 1536))]
    # autocast layout: 16-bit activations, fp32 parameters, any rank, no bias; in bf16 also the
    # reference's own result (fp32 math inside, one rounding)
    bf16_ref = {torch.bfloat16: Close(vs_reference=(1e-2, 1e-2))}
    cases += [Case("nobias-rank3-fp32params", C(10, 97, bias=False, w_dtype=torch.float32, shape=(2, 5, 97)),
                   interpret=True, close=bf16_ref)]
    cases += [Case(f"nobias-rank3-fp32params-n{n}", C(10, n, bias=False, w_dtype=torch.float32, shape=(2, 5, n)),
                   interpret=False, extra_dtypes=(torch.float32,), close=bf16_ref) for n in (3, 768)]
    cases += [Case(f"fp32params-rows33-n{n}", C(33, n, w_dtype=torch.float32), dtypes=(torch.float16, torch.bfloat16),
                   extra_dtypes=(torch.float32,), close=LAYER_NORM_CLOSE, interpret=(torch.float16,)) for n in (8, 97, 768)]
    cases += [
        Case("rank3-2x3x97", C(6, 97, shape=(2, 3, 97)), close=LAYER_NORM_CLOSE, interpret=f32),
        Case("rank4-2x2x3x8", C(12, 8, shape=(2, 2, 3, 8)), close=LAYER_NORM_CLOSE, interpret=f32),
        Case("rank3-5x7x97", C(35, 97, shape=(5, 7, 97)), interpret=f32,
             close={torch.float32: Close(elementwise=(5e-5, 1e-5), vs_reference=(5e-5, 1e-5))}),
        # var = 0: y = bias and dx = 0 only through eps
        Case("constant-rows-eps0.1", C(4, 16, layout="constant", eps=0.1), close=LAYER_NORM_CLOSE, interpret=f32),
        Case("eps100", C(4, 16, eps=100.0), interpret=f32,
             close={torch.float32: Close(elementwise=(1e-5, 1e-5), vs_reference=(1e-5, 1e-5))}),
        Case("transposed-x-strided-grad", C(33, 97, layout="transposed"), upstream=_strided_grad, close=LAYER_NORM_CLOSE,
             interpret=(torch.float32, torch.float16)),
        Case("unmergeable-view-expanded-grad", C(20, 97, layout="permuted"), upstream=_expanded_grad,
             close=LAYER_NORM_CLOSE, interpret=f32),
        Case("strided-params", C(7, 97, layout="strided-params"), close=LAYER_NORM_CLOSE, interpret=f32),
        Case("rows2-n16411", C(2, 16411), close=LAYER_NORM_CLOSE, interpret=f32),
    ]
    return tuple(cases)


LAYER_NORM = declare_op(OpDecl(
    name="layer_norm",
    doc="LayerNorm over the last dim of ``x`` (any rank); fp32 math, result in ``x.dtype``.",
    args=(Arg("x", "Tensor", grad=True), Arg("weight", "Tensor", grad=True),
          Arg("bias", "Tensor?", None, grad=True), Arg("eps", "float", 1e-5)),
    results=("y", "mean", "rstd"), returns=1,
    check=check_layer_norm,
    reference=reference.layer_norm_ref,
    fake=_layer_norm_fake,
    backward=Backward(args=("x", "weight", "bias", "mean", "rstd"), grads=("x", "weight", "bias"),
                      fake=_layer_norm_bwd_fake),
    bytes=lambda x, weight, bias, eps, mode="fwd+bwd": perf.layer_norm_bytes(
        x.numel() // max(x.shape[-1], 1), x.shape[-1], x.element_size(), weight.element_size(), mode,
        bias=bias is not None),
    tolerance=TOLERANCE,
    cases=_layer_norm_cases(),
))


# ---- attention -------------------------------------------------------------------------------

def _check_qkv_4d(op, q, k, v) -> None:
    for n, t in (("q", q), ("k", k), ("v", v)):
        tensor(n, t)
        float_tensor(op, n, t)
        if t.dim() != 4:
            raise ValueError(f"{op}: {n} must have shape (B, H, T, D), got {tuple(t.shape)}")


def check_attention(q, k, v, causal=True) -> None:
    op = "attention"
    _check_qkv_4d(op, q, k, v)
    same_device(op, q=q, k=k, v=v)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{op}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"{op}: q, k, v must have the same shape (B, H, T, D), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")


def _attention_fake(q, k, v, causal):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=acc_dtype(q.dtype))


def _attention_bwd_fake(grad_out, q, k, v, out, lse, causal):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _attention_case(B, H, T, D, causal, layout=None, scale=1.0):
    """q, k, v ~ scale * N(0, 1). ``layout``: "qkv" (split from one fused (B, T, 3 * H * D)
    projection, as the model makes them), "bthd" ((B, T, H, D) buffers viewed as (B, H, T, D))."""
    def make(dtype, device, gen):
        if layout == "qkv":
            qkv = _randn(gen, B, T, 3 * H * D, dtype=dtype, device=device, scale=scale)
            q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in qkv.split(H * D, dim=2))
        elif layout == "bthd":
            q, k, v = (_randn(gen, B, T, H, D, dtype=dtype, device=device, scale=scale).transpose(1, 2)
                       for _ in range(3))
        else:
            q, k, v = (_randn(gen, B, H, T, D, dtype=dtype, device=device, scale=scale) for _ in range(3))
        return q, k, v, causal
    return make


# Bounds the Triton attention tests held, elementwise against the float64 reference and against
# the reference run in the dtype: fp32 runs "ieee" dots (errors of a few ulps of O(1) values);
# fp16 rounds inputs, P and dS to 11-bit mantissas.
ATTENTION_CLOSE = {torch.float32: Close(elementwise=(2e-5, 2e-5), vs_reference=(2e-5, 2e-5)),
               torch.float16: Close(elementwise=(4e-3, 4e-3), vs_reference=(4e-3, 4e-3))}
_ATTN_SEQ_LENS = (1, 2, 15, 17, 64, 100, 129)
_ATTN_HEAD_DIMS = (1, 3, 8, 16, 24, 64, 80, 128)
# What the interpreter runs: every T at D=16 and every D at T=17 and T=100 in fp32, every T at
# D=16 and every D at T=100 in fp16, and a few more small shapes.
_ATTN_FP32 = {(T, 16) for T in _ATTN_SEQ_LENS} | {(T, D) for T in (17, 100) for D in _ATTN_HEAD_DIMS}
_ATTN_FP16 = {(T, 16) for T in _ATTN_SEQ_LENS} | {(100, D) for D in _ATTN_HEAD_DIMS}
_ATTN_MORE = {(1, 1), (1, 24), (15, 8), (17, 3)}


def _attention_interpret(T, D, lo):
    fp16 = (T, D) in _ATTN_FP16 or ((T, D) in _ATTN_MORE and lo)
    if fp16:
        return (torch.float32, torch.float16)
    return (torch.float32,) if (T, D) in _ATTN_FP32 | _ATTN_MORE else False


def _attention_cases():
    cases = []
    all_dtypes = (torch.float64, torch.float32, torch.float16)
    for causal in (True, False):
        c = "causal" if causal else "full"
        for T in _ATTN_SEQ_LENS:
            for D in _ATTN_HEAD_DIMS:
                small = (T <= 17 and D <= 24) or (T, D) in ((17, 64), (64, 16), (100, 16))
                lo = (T, D) in ((1, 1), (17, 3), (64, 16), (100, 64), (129, 80))
                dtypes = None if lo else all_dtypes if (T, D) in _ATTN_FP16 else (torch.float64, torch.float32)
                cases.append(Case(f"{c}-T{T}-D{D}", _attention_case(2, 2, T, D, causal), heavy=not small,
                                  dtypes=dtypes, close=ATTENTION_CLOSE, interpret=_attention_interpret(T, D, lo)))
        A = _attention_case
        cases += [
            Case(f"{c}-qkv-view", A(2, 3, 37, 24, causal, layout="qkv"), interpret=False),
            Case(f"{c}-qkv-view-transposed-grad", A(2, 3, 37, 24, causal, layout="qkv"), upstream=_transposed_grad,
                 dtypes=(torch.float64, torch.float32), interpret=False),
            Case(f"{c}-qkv-view-strided-grad", A(2, 3, 33, 24, causal, layout="qkv"), upstream=_bthd_strided_grad,
                 dtypes=all_dtypes, close=ATTENTION_CLOSE, interpret=(torch.float32, torch.float16)),
            Case(f"{c}-bthd-strided-grad", A(2, 3, 33, 24, causal, layout="bthd"), upstream=_bthd_strided_grad,
                 dtypes=all_dtypes, close=ATTENTION_CLOSE, interpret=(torch.float32, torch.float16)),
            Case(f"{c}-expanded-grad", A(2, 2, 21, 8, causal), upstream=_expanded_grad,
                 dtypes=(torch.float64, torch.float32), close=ATTENTION_CLOSE, interpret=True),
            # scores of several hundred: exp overflows without the running max
            Case(f"{c}-peaked-softmax", A(1, 2, 45, 16, causal, scale=6.0), dtypes=(torch.float64, torch.float32),
                 close={torch.float32: Close(elementwise=(1e-4, 1e-4))}, interpret=True),
            # several query and key blocks, T not a multiple of any block
            Case(f"{c}-T300-D32", A(1, 2, 300, 32, causal), heavy=True, dtypes=(torch.float64,),
                 close={torch.float64: Close(elementwise=(1e-10, 1e-10))}, interpret=False),
        ]
    return tuple(cases)


ATTENTION = declare_op(OpDecl(
    name="attention",
    doc="Scaled dot-product self-attention on ``(B, H, T, D)`` tensors, scale ``1/sqrt(D)``.",
    args=(Arg("q", "Tensor", grad=True), Arg("k", "Tensor", grad=True), Arg("v", "Tensor", grad=True),
          Arg("causal", "bool", True)),
    results=("out", "lse"), returns=1,
    check=check_attention,
    reference=reference.attention_ref,
    fake=_attention_fake,
    backward=Backward(args=("q", "k", "v", "out", "lse", "causal"), grads=("q", "k", "v"),
                      keep={"causal": ("bool", lambda a: a["causal"])}, fake=_attention_bwd_fake),
    flops=lambda q, k, v, causal, mode="fwd+bwd": perf.attention_flops(*q.shape, causal, mode),
    bytes=lambda q, k, v, causal, mode="fwd+bwd": perf.attention_bytes(*q.shape, q.element_size(), mode),
    tolerance=TOLERANCE,
    cases=_attention_cases(),
))


# ---- cached_attention (inference) --------------------------------------------------------------

def check_cached_attention(q, k, v, start=None, offset=0) -> None:
    op = "cached_attention"
    _check_qkv_4d(op, q, k, v)
    same_device(op, q=q, k=k, v=v, start=start)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{op}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, H, Tq, D = q.shape
    if k.shape != v.shape or k.shape[:2] != (B, H) or k.shape[3] != D:
        raise ValueError(f"{op}: k and v must have shape (B, H, S, D) = ({B}, {H}, S, {D}) to match q, got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if D < 1:
        raise ValueError(f"{op}: head dim must be at least 1")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"{op}: offset must be an int >= 0 (the position of the first query), got {offset!r}")
    if offset + Tq > k.shape[2]:
        raise ValueError(f"{op}: queries at positions {offset}..{offset + Tq - 1} need a cache of at least "
                         f"{offset + Tq} keys, k and v hold {k.shape[2]}")
    if start is not None:
        tensor("start", start)
        if start.dtype not in (torch.int64, torch.int32) or start.shape != (B,):
            raise ValueError(f"{op}: start must be an int64/int32 tensor of shape ({B},) (the first key of each "
                             f"row), got {start.dtype} {tuple(start.shape)}")


def _cached_attention_fake(q, k, v, start, offset):
    return q.new_empty(q.shape)


def _cached_attention_case(B, H, Tq, D, offset, extra=3, start=None, view=False):
    """Queries at offset.. against a cache of offset + Tq + extra keys whose unused tail is NaN
    (a kernel that reads past offset + Tq fails); ``start``: per-row first key (left padding)."""
    def make(dtype, device, gen):
        S = offset + Tq + extra
        q = _randn(gen, B, H, Tq, D, dtype=dtype, device=device)
        if view:  # k and v as one layer of a stacked (layers, 2, B, H, S, D) cache
            kv = _randn(gen, 2, 2, B, H, S, D, dtype=dtype, device=device)
            k, v = kv[1, 0], kv[1, 1]
        else:
            k, v = (_randn(gen, B, H, S, D, dtype=dtype, device=device) for _ in range(2))
        if extra:
            k[:, :, offset + Tq:] = float("nan")
            v[:, :, offset + Tq:] = float("nan")
        st = None if start is None else torch.tensor(start, dtype=torch.int64, device=device)
        return q, k, v, st, offset
    return make


def _cached_attention_cases():
    C = _cached_attention_case
    cases = []
    for D in (1, 3, 8, 24, 64, 80, 128, 256):  # decode: one query
        for off in (0, 1, 16, 100, 257):
            light = off <= 16 and D <= 64
            cases.append(Case(f"decode-off{off}-D{D}", C(2, 2, 1, D, off), heavy=not light))
    for Tq, off in ((2, 0), (5, 7), (17, 0), (17, 30), (64, 65), (130, 3)):  # prefill / chunks
        for D in (3, 16, 64, 97):
            light = Tq <= 17 and off <= 30 and D <= 64
            cases.append(Case(f"q{Tq}-off{off}-D{D}", C(2, 3, Tq, D, off), heavy=not light))
    cases += [
        Case("decode-start", C(3, 2, 1, 16, 9, start=[0, 4, 9])),
        Case("prefill-left-padded", C(3, 2, 6, 8, 0, start=[0, 2, 5])),  # rows 1, 2: padding queries see no key
        Case("chunk-start", C(2, 2, 4, 24, 5, start=[3, 0])),
        Case("start-past-every-query", C(2, 1, 3, 8, 2, start=[10, -4])),
        Case("stacked-cache-view", C(2, 2, 3, 16, 11, view=True)),
        Case("decode-long", C(1, 2, 1, 64, 1000, start=[20]), heavy=True),
        Case("decode-start-off70-D32", C(2, 3, 1, 32, 70, extra=2, start=[9, 0]), interpret=(torch.float32,)),
    ]
    return tuple(cases)


CACHED_ATTENTION = declare_op(OpDecl(
    name="cached_attention",
    doc="Attention of queries ``q`` (B, H, Tq, D) at positions ``offset + i`` against a K/V cache "
        "(B, H, S, D): causal with that offset, keys before ``start[b]`` masked (left padding), keys "
        "from ``offset + Tq`` on unused. Inference only: no gradients.",
    args=(Arg("q", "Tensor"), Arg("k", "Tensor"), Arg("v", "Tensor"), Arg("start", "Tensor?", None),
          Arg("offset", "int", 0)),
    results=("out",), returns=1,
    check=check_cached_attention,
    reference=reference.cached_attention_ref,
    fake=_cached_attention_fake,
    backward=None,  # an inference op: generation under torch.no_grad()
    flops=lambda q, k, v, start, offset, mode="fwd": 4.0 * q.shape[0] * q.shape[1] * q.shape[2] * (
        offset + (q.shape[2] + 1) / 2) * q.shape[3],
    bytes=lambda q, k, v, start, offset, mode="fwd": float(q.element_size()) * q.shape[0] * q.shape[1] * q.shape[3] * (
        2 * q.shape[2] + 2 * (offset + q.shape[2])),
    tolerance=TOLERANCE,
    cases=_cached_attention_cases(),
    dtype_args=("q",),
))


# ---- embedding_add ---------------------------------------------------------------------------

def check_embedding_add(idx, tok_weight, pos_weight) -> None:
    op = "embedding_add"
    tensor("idx", idx), tensor("tok_weight", tok_weight), tensor("pos_weight", pos_weight)
    same_device(op, idx=idx, tok_weight=tok_weight, pos_weight=pos_weight)
    if idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: idx must hold integer token ids (int64 or int32), got {idx.dtype}")
    if idx.dim() != 2:
        raise ValueError(f"{op}: idx must have shape (B, T), got {tuple(idx.shape)}")
    float_tensor(op, "tok_weight", tok_weight), float_tensor(op, "pos_weight", pos_weight)
    if tok_weight.dim() != 2 or pos_weight.dim() != 2:
        raise ValueError(f"{op}: tok_weight and pos_weight must be 2-D tables, got "
                         f"{tuple(tok_weight.shape)} and {tuple(pos_weight.shape)}")
    if tok_weight.shape[1] != pos_weight.shape[1]:
        raise ValueError(f"{op}: token and position tables must have the same width, got "
                         f"{tok_weight.shape[1]} and {pos_weight.shape[1]}")
    if idx.shape[1] > pos_weight.shape[0]:
        raise ValueError(f"{op}: sequence length {idx.shape[1]} exceeds the position table's "
                         f"{pos_weight.shape[0]} rows (block_size); crop the input")


def promote_tables(idx, tok_weight, pos_weight):
    """Kernels take both tables in one dtype (the promoted one); autograd of the cast gives each
    table its gradient in its own dtype."""
    dtype = torch.promote_types(tok_weight.dtype, pos_weight.dtype)
    return idx, tok_weight.to(dtype), pos_weight.to(dtype)


def _embedding_fake(idx, tok_weight, pos_weight):
    return tok_weight.new_empty((idx.shape[0], idx.shape[1], tok_weight.shape[1]))


def _embedding_bwd_fake(grad_out, idx, vocab_size, num_positions):
    return grad_out.new_empty((vocab_size, grad_out.shape[2])), grad_out.new_empty((num_positions, grad_out.shape[2]))


def _embedding_case(V, B, T, C, P, id_dtype=torch.int64, all_equal: Optional[int] = None, pos_dtype=None,
                    layout=None):
    """Ids uniform in [0, V) (or all ``all_equal``), tables ~N(0, 1); ``pos_dtype``: the position
    table's own dtype. ``layout``: "transposed" (ids, token table transposed views, position table
    a stride-2 view), "strided-ids" (ids a stride-2 view)."""
    def make(dtype, device, gen):
        if all_equal is not None:
            idx = torch.full((B, T), all_equal, dtype=id_dtype)
        elif layout == "transposed":
            idx = torch.randint(0, V, (T, B), generator=gen, dtype=id_dtype).t()
        elif layout == "strided-ids":
            idx = torch.randint(0, V, (B, 2 * T), generator=gen, dtype=id_dtype)[:, ::2]
        else:
            idx = torch.randint(0, V, (B, T), generator=gen, dtype=id_dtype)
        pd = pos_dtype or dtype
        if layout == "transposed":
            tok = _randn(gen, C, V, dtype=dtype, device=device).t()
            pos = _randn(gen, P, 2 * C, dtype=pd, device=device)[:, ::2]
        else:
            tok = _randn(gen, V, C, dtype=dtype, device=device)
            pos = _randn(gen, P, C, dtype=pd, device=device)
        return idx.to(device), tok, pos
    return make


def embedding_sum_close(dtype):
    """fp32 accumulation of at most a few thousand O(1) terms, then one rounding: 16-bit results
    within one ulp of the exact sum rounded once (plus a small absolute term where the sum
    cancels), fp32 results within the fp32 summation error; the results are the reference
    rounded once; untouched rows exactly zero."""
    ew = (5e-5, 1e-5) if dtype == torch.float32 else (1e-5, torch.finfo(dtype).eps)
    return Close(elementwise=ew, rounded=True, exact_zeros=True, exact_results=True)


def _embedding_close(dtype):
    """The Triton embedding tests' bounds: :func:`embedding_sum_close`, and against the reference
    run in the dtype (PyTorch accumulates 16-bit embedding gradients in 16 bits on CPU) fp32
    1e-5, 16-bit 2e-2 / 1e-2."""
    vs = (1e-5, 1e-5) if dtype == torch.float32 else (2e-2, 1e-2)
    return dataclasses.replace(embedding_sum_close(dtype), vs_reference=vs)


EMBEDDING_CLOSE = {d: _embedding_close(d) for d in (torch.float32, torch.float16)}
# Long sums (512 rows on one id): in fp16 PyTorch's own 16-bit accumulation is far from the
# exact sum, so the 16-bit bound is against the float64 reference only.
_EMB_SUMS = {torch.float32: EMBEDDING_CLOSE[torch.float32],
             torch.float16: dataclasses.replace(EMBEDDING_CLOSE[torch.float16], vs_reference=None)}


def _embedding_cases():
    shapes = [(9, 4, 7, 5, 10), (9, 32, 32, 8, 32), (20, 3, 5, 16, 8), (6000, 2, 40, 48, 40),
              (70000, 3, 33, 8, 40), (9, 32, 32, 32, 32), (256, 3, 17, 97, 20), (50, 2, 1, 1, 1),
              (1000, 2, 65, 130, 65)]
    cases = []
    E = _embedding_case
    for V, B, T, C, P in shapes:
        heavy = V * C > 50000 or B * T * C > 20000
        for id_dtype in (torch.int64, torch.int32):
            cases.append(Case(f"V{V}-B{B}-T{T}-C{C}-P{P}-{str(id_dtype)[6:]}", E(V, B, T, C, P, id_dtype),
                              heavy=heavy))
    cases.append(Case("all-equal-ids", E(9, 16, 256, 48, 256, all_equal=3), heavy=True,
                      dtypes=(torch.float64, torch.float32, torch.bfloat16),
                      close={d: Close(exact_zeros=True) for d in (torch.float32, torch.bfloat16)}))
    cases.append(Case("all-equal-ids-small", E(3, 4, 9, 8, 12, all_equal=1)))
    # The Triton tests' shapes (B, T, V, C, P): bark sizes (9-token vocabulary, widths 8 and 32),
    # widths 1 / 3 / 97 / 768, T < P (unused position rows get zero grads), T == 1 and B == 1; the
    # interpreter runs them in fp32, and three in fp16 too.
    fp16 = {(3, 7, 9, 32, 8), (2, 5, 50, 97, 9), (2, 9, 20, 768, 12)}
    for B, T, V, C, P in [(1, 1, 9, 1, 4), (3, 7, 9, 32, 8), (4, 32, 9, 8, 32), (2, 5, 50, 97, 9),
                          (2, 9, 20, 768, 12), (8, 3, 2, 3, 3), (1, 40, 9, 128, 64)]:
        cases.append(Case(f"B{B}-T{T}-V{V}-C{C}-P{P}", E(V, B, T, C, P), close=EMBEDDING_CLOSE,
                          interpret=(torch.float32, torch.float16) if (B, T, V, C, P) in fp16 else (torch.float32,)))
    f32 = (torch.float32,)
    cases += [
        Case("B3-T7-V9-C32-P8-int32", E(9, 3, 7, 32, 8, torch.int32), close=EMBEDDING_CLOSE, interpret=f32),
        # a split sum (tiny vocabulary: fixed pieces reduced afterwards) and a single program
        Case("all-equal-ids-V3", E(3, 16, 32, 32, 32, all_equal=2), close=_EMB_SUMS, interpret=f32),
        Case("all-equal-ids-V50", E(50, 16, 32, 32, 32, all_equal=49), close=_EMB_SUMS, interpret=f32),
        Case("transposed-ids-tables-permuted-grad", E(11, 3, 7, 40, 9, layout="transposed"), upstream=_permuted_grad,
             close={d: dataclasses.replace(c, vs_reference=None) for d, c in EMBEDDING_CLOSE.items()},
             interpret=(torch.float32, torch.float16)),
        Case("expanded-grad", E(9, 4, 6, 16, 6), upstream=_expanded_grad, interpret=f32,
             close={torch.float32: dataclasses.replace(EMBEDDING_CLOSE[torch.float32], vs_reference=None)}),
        # fp16 token table + fp32 position table: fp32 result, each gradient in its table's dtype
        Case("fp16-tokens-fp32-positions", E(9, 3, 7, 32, 8, pos_dtype=torch.float32), dtypes=(torch.float16,),
             extra_dtypes=(torch.float32,), close=EMBEDDING_CLOSE, interpret=True),
        Case("fp32-tokens-fp64-positions-strided", E(11, 3, 20, 16, 20, pos_dtype=torch.float64,
                                                     layout="strided-ids"),
             dtypes=(torch.float32,), extra_dtypes=(torch.float64,), upstream=_transposed_grad, interpret=False),
    ]
    return tuple(cases)


EMBEDDING_ADD = declare_op(OpDecl(
    name="embedding_add",
    doc="``tok_weight[idx] + pos_weight[:T]`` for token ids ``idx`` of shape ``(B, T)``.",
    args=(Arg("idx", "Tensor"), Arg("tok_weight", "Tensor", grad=True), Arg("pos_weight", "Tensor", grad=True)),
    results=("out",), returns=1,
    check=check_embedding_add,
    reference=reference.embedding_add_ref,
    fake=_embedding_fake,
    backward=Backward(args=("idx", "vocab_size", "num_positions"), grads=("tok_weight", "pos_weight"),
                      keep={"vocab_size": ("SymInt", lambda a: a["tok_weight"].shape[0]),
                            "num_positions": ("SymInt", lambda a: a["pos_weight"].shape[0])},
                      fake=_embedding_bwd_fake),
    kernel_check=lambda idx, tok_weight, pos_weight: check_token_ids(idx, tok_weight.shape[0]),
    bytes=lambda idx, tok_weight, pos_weight, mode="fwd+bwd": perf.embedding_bytes(
        idx.shape[0], idx.shape[1], tok_weight.shape[1], tok_weight.shape[0], tok_weight.element_size(),
        idx.element_size(), mode),
    tolerance=TOLERANCE,
    cases=_embedding_cases(),
))


# ---- linear ----------------------------------------------------------------------------------

def check_linear(x, weight, bias=None) -> None:
    op = "linear"
    _check_x_weight_bias(op, x, weight, bias)
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must have shape (out_features, in_features), got {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{op}: x must have shape (..., {weight.shape[1]}) for weight of shape "
                         f"{tuple(weight.shape)}, got {tuple(x.shape)}")
    if bias is not None:
        float_tensor(op, "bias", bias)
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{op}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"{op}: x, weight and bias must have one dtype, got {x.dtype}, {weight.dtype}"
                        + (f" and {bias.dtype}" if bias is not None else ""))


def _linear_fake(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _linear_bwd_fake(grad_out, x, weight, bias):
    return (x.new_empty(x.shape), weight.new_empty(weight.shape),
            (bias if bias is not None else weight).new_empty((weight.shape[0],) if bias is not None else (0,)))


def _linear_case(rows, k, n, bias=True, shape=None, noncontig=False):
    def make(dtype, device, gen):
        x = _randn(gen, rows, 2 * k if noncontig else k, dtype=dtype, device=device)
        if noncontig:
            x = x[:, ::2]
        if shape is not None:
            x = x.reshape(*shape, k)
        w = _randn(gen, n, k, dtype=dtype, device=device, scale=k ** -0.5)
        b = _randn(gen, n, dtype=dtype, device=device) if bias else None
        return x, w, b
    return make


def _linear_cases():
    # rows 1..8 take the C++ few-row kernel (decode), more rows the GEMM; widths not multiples of
    # its 16 lanes, one-element products, and the model's layouts (rank 3, a strided view)
    sizes = [(1, 1, 1), (1, 7, 3), (1, 768, 40), (3, 17, 33), (8, 100, 65), (9, 16, 16),
             (64, 32, 96), (33, 257, 19), (260, 256, 256)]  # the last one: oneDNN (>= 2^24)
    cases = [Case(f"rows{r}-k{k}-n{n}", _linear_case(r, k, n), heavy=r * k * n > 100000) for r, k, n in sizes]
    cases += [Case("nobias-rows5-k40-n24", _linear_case(5, 40, 24, bias=False)),
              Case("nobias-rows70-k40-n24", _linear_case(70, 40, 24, bias=False)),
              Case("rank3-B2-T6", _linear_case(12, 24, 72, shape=(2, 6))),
              Case("noncontig-rows4", _linear_case(4, 20, 12, noncontig=True)),
              Case("noncontig-rows30", _linear_case(30, 20, 12, noncontig=True)),
              Case("rows0", _linear_case(0, 8, 5))]
    return tuple(cases)


LINEAR = declare_op(OpDecl(
    name="linear",
    doc="""``x @ weight.T + bias`` (``F.linear``): ``x`` (..., in), ``weight`` (out, in), ``bias`` (out,)
    or None, one dtype. The cpp backend's products go through oneDNN or its few-row kernel
    (``barkgpt.ops.cpu_gemm_library``).""",
    args=(Arg("x", "Tensor", grad=True), Arg("weight", "Tensor", grad=True), Arg("bias", "Tensor?", None, grad=True)),
    results=("out",), returns=1,
    check=check_linear,
    reference=reference.linear_ref,
    fake=_linear_fake,
    backward=Backward(args=("x", "weight", "bias"), grads=("x", "weight", "bias"), fake=_linear_bwd_fake),
    flops=lambda x, weight, bias=None, mode="fwd+bwd": (
        (2.0 if mode == "fwd" else 4.0 if mode == "bwd" else 6.0) * (x.numel() // max(1, x.shape[-1])) * weight.numel()),
    bytes=lambda x, weight, bias=None, mode="fwd+bwd": (
        (x.numel() + weight.numel() + (x.numel() // max(1, x.shape[-1])) * weight.shape[0]) * x.element_size()
        * (1 if mode == "fwd" else 2 if mode == "bwd" else 3)),
    tolerance=TOLERANCE,
    cases=_linear_cases(),
))


# ---- linear_cross_entropy --------------------------------------------------------------------

LCE_REDUCTIONS = ("mean", "sum")


def check_linear_cross_entropy(x, weight, targets, bias=None, ignore_index=-100, reduction="mean") -> None:
    op = "linear_cross_entropy"
    tensor("x", x), tensor("weight", weight), tensor("targets", targets)
    if bias is not None:
        tensor("bias", bias)
    same_device(op, x=x, weight=weight, targets=targets, bias=bias)
    float_tensor(op, "x", x), float_tensor(op, "weight", weight)
    if bias is not None:
        float_tensor(op, "bias", bias)
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: targets must hold integer class ids (int64 or int32), got {targets.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have shape (..., C), got a scalar")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{op}: weight must have shape (V, {x.shape[-1]}) to match x's last dim, "
                         f"got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{op}: weight has no rows (a vocabulary of 0 classes)")
    if tuple(targets.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"{op}: targets must have shape {tuple(x.shape[:-1])} (x's shape without "
                         f"its last dim), got {tuple(targets.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"{op}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{op}: ignore_index must be an int, got {ignore_index!r}")
    if reduction not in LCE_REDUCTIONS:
        raise ValueError(f"{op}: reduction must be 'mean' or 'sum', got {reduction!r}")


def _lce_loss_dtype(x, weight, bias):
    f64 = torch.float64 in (x.dtype, weight.dtype, bias.dtype if bias is not None else None)
    return torch.float64 if f64 else torch.float32


def _lce_fake(x, weight, targets, bias, ignore_index, reduction):
    loss = x.new_empty((), dtype=_lce_loss_dtype(x, weight, bias))
    db = bias.new_empty(bias.shape) if bias is not None else weight.new_empty((0,))
    return loss, x.new_empty(x.shape), weight.new_empty(weight.shape), db


def _lce_bwd_fake(grad_loss, dx, dweight, dbias):
    return dx.new_empty(dx.shape), dweight.new_empty(dweight.shape), dbias.new_empty(dbias.shape)


def _lce_check_targets(x, weight, targets, bias, ignore_index, reduction):
    check_targets(targets, weight.shape[0], ignore_index)


def _lce_case(N, C, V, bias=True, ignore=0.2, all_ignored=False, shape=None, noncontig=False, red="mean",
              ignore_index=-100, target_dtype=torch.int64, permuted=False):
    """x (N, C) ~N(0, 1) (``noncontig``: a transposed view; ``permuted``: a (B, T, C) view of a
    (B, C, T) buffer, ``shape`` = (B, T)), weight ~N(0, 1/C), bias ~N(0, 1/4); a fraction
    ``ignore`` of the targets set to ``ignore_index`` (for an in-range ``ignore_index``, two
    targets set to it)."""
    def make(dtype, device, gen):
        if noncontig:
            x = _randn(gen, C, N, dtype=dtype, device=device).t()
        elif permuted:
            x = _randn(gen, shape[0], C, shape[1], dtype=dtype, device=device).permute(0, 2, 1)
        else:
            x = _randn(gen, N, C, dtype=dtype, device=device)
        w = _randn(gen, V, C, dtype=dtype, device=device, scale=C ** -0.5)
        b = _randn(gen, V, dtype=dtype, device=device, scale=0.5) if bias else None
        t = torch.randint(0, V, (N,), generator=gen)
        if ignore_index >= 0:
            t[torch.randperm(N, generator=gen)[:2]] = ignore_index
        else:
            t[torch.rand(N, generator=gen) < ignore] = ignore_index
        if all_ignored:
            t.fill_(ignore_index)
        if shape is not None:
            t = t.reshape(shape)
            if not permuted:
                x = x.reshape(*shape, C)
        return x, w, t.to(device=device, dtype=target_dtype), b, ignore_index, red
    return make


# The fused loss tests' bounds: the error relative to the largest magnitude of the expected tensor
# (no floor of 1: the gradients are small). fp32: fp32 math throughout; 16-bit on cpp: inputs
# converted once, fp32 math, gradients rounded once; fp16 on triton: the logits chunk and its
# gradient are stored in fp16 (as with cuBLAS in fp16).
LCE_CLOSE = {
    torch.float32: Close(relative=2e-5),
    torch.float16: (Close(relative=8e-3, backends=("cpp",)), Close(relative=1.5e-2, backends=("triton",))),
    torch.bfloat16: Close(relative=8e-3, backends=("cpp",)),
}


def _lce_cases():
    L = _lce_case
    cases = [Case("N1-C8-V1", L(1, 8, 1, ignore=0.0)),
             Case("N5-C8-V9", L(5, 8, 9)),
             Case("N37-C16-V9-nobias-sum", L(37, 16, 9, bias=False, red="sum")),
             Case("N33-C16-V257", L(33, 16, 257)),
             Case("N11-C8-V9-all-ignored", L(11, 8, 9, all_ignored=True)),
             Case("N15-C16-V257-noncontig", L(15, 16, 257, noncontig=True)),
             Case("B3-T5-C8-V9-rank3", L(15, 8, 9, shape=(3, 5))),
             Case("N300-C32-V257", L(300, 32, 257), heavy=True),
             Case("N3-C32-V50304", L(3, 32, 50304, ignore=0.0), heavy=True)]
    # The fused loss tests' shapes at the kernels' own chunking: V = 1, 9, 257 and 50304 with few
    # rows, bias or not, "mean" and "sum", a fifth of the targets ignored (the interpreter runs
    # the ones the Triton tests ran).
    for N, C, V in ((1, 8, 1), (5, 8, 9), (33, 16, 257), (3, 32, 50304), (2, 16, 50304)):
        for bias in (True, False):
            for red in LCE_REDUCTIONS:
                interp = (False if (N, C, V) == (3, 32, 50304) else
                          (torch.float32, torch.float16) if (N, C, V, bias, red) == (33, 16, 257, True, "mean") else
                          False if (N, C, V) == (33, 16, 257) else (torch.float32,))
                cases.append(Case(f"N{N}-C{C}-V{V}-{'bias' if bias else 'nobias'}-{red}-ignore0.2",
                                  L(N, C, V, bias=bias, red=red), heavy=V > 1000, interpret=interp))
    cases += [
        Case("N11-C8-V9-all-ignored-sum", L(11, 8, 9, all_ignored=True, red="sum"), interpret=(torch.float32,)),
        # x a (5, 3, 16) view no stride flattens into rows, int32 targets, an in-range ignore_index
        Case("B5-T3-C16-V257-permuted-int32-ignore7", L(15, 16, 257, bias=False, shape=(5, 3), permuted=True,
                                                        ignore_index=7, target_dtype=torch.int32),
             interpret=(torch.float32,)),
        Case("N6-C16-V257-noncontig-nobias", L(6, 16, 257, bias=False, noncontig=True, ignore=0.0),
             interpret=(torch.float32,)),
    ]
    return tuple(Case(**{**c.__dict__, "close": LCE_CLOSE}) for c in cases)


LINEAR_CROSS_ENTROPY = declare_op(OpDecl(
    name="linear_cross_entropy",
    doc="""Cross-entropy of ``x @ weight.T (+ bias)`` against ``targets`` without building the logits.

    ``x`` (..., C), ``weight`` (V, C), integer ``targets`` (...) with values in [0, V) or
    ``ignore_index``; ``bias`` (V,) or None. ``reduction``: "mean" over the targets that are not
    ignored (0, with zero gradients, when all are) or "sum". Returns a 0-d fp32 loss (fp64 for
    fp64 inputs); gradients reach ``x``, ``weight`` and ``bias``. A target out of range raises
    IndexError on every backend.""",
    args=(Arg("x", "Tensor", grad=True), Arg("weight", "Tensor", grad=True), Arg("targets", "Tensor"),
          Arg("bias", "Tensor?", None, grad=True), Arg("ignore_index", "int", -100),
          Arg("reduction", "str", "mean")),
    # The forward kernel computes the loss and its gradients (of the reduced loss); the backward
    # kernel scales them by the upstream gradient.
    results=("loss", "dx", "dweight", "dbias"), returns=1,
    check=check_linear_cross_entropy,
    reference=reference.linear_cross_entropy_ref,
    fake=_lce_fake,
    backward=Backward(args=("dx", "dweight", "dbias"), grads=("x", "weight", "bias"), fake=_lce_bwd_fake),
    kernel_check=_lce_check_targets,
    flops=lambda x, weight, targets, bias=None, ignore_index=-100, reduction="mean", mode="fwd+bwd": (
        (6.0 if mode != "fwd" else 2.0) * targets.numel() * weight.shape[0] * weight.shape[1]),
    bytes=lambda x, weight, targets, bias=None, ignore_index=-100, reduction="mean", mode="fwd+bwd": (
        2.0 * (x.numel() * x.element_size() + weight.numel() * weight.element_size())
        + targets.numel() * targets.element_size()),
    tolerance=TOLERANCE,
    cases=_lce_cases(),
))


class _LinearCrossEntropyFn(torch.autograd.Function):
    """Eager autograd of linear_cross_entropy (the declared contract, a second copy as the C++
    fast paths are): the forward kernel's gradients are saved, the backward scales them. An
    upstream gradient of exactly 1 (``loss.backward()``) hands them on as they are: no
    weight-sized copy (the declared backward kernel, under torch.compile, always multiplies)."""

    @staticmethod
    def forward(ctx, kernel, chunk_rows, x, weight, targets, bias, ignore_index, reduction):
        loss, dx, dw, db = kernel(x, weight, targets, bias, ignore_index, reduction, True, chunk_rows)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(dx, dw, db)
        ctx.set_materialize_grads(False)
        return loss

    @staticmethod
    def backward(ctx, gloss):
        if gloss is None:
            return (None,) * 8
        dx, dw, db = ctx.saved_tensors
        if not (gloss.device.type == "cpu" and float(gloss) == 1.0):  # CPU only: no device sync
            dx, dw, db = dx * gloss, dw * gloss, db * gloss
        return None, None, dx, dw, None, db if ctx.has_bias else None, None, None


def linear_cross_entropy_eager(kernel, x, weight, targets, bias=None, ignore_index=-100, reduction="mean",
                               chunk_rows=0):
    """Eager linear_cross_entropy through ``kernel(x, weight, targets, bias, ignore_index,
    reduction, compute_grad, chunk_rows) -> (loss, dx, dweight, dbias)``: gradients computed only
    when autograd will ask for them (evaluation does a third of the work)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _LinearCrossEntropyFn.apply(kernel, int(chunk_rows), x, weight, targets, bias,
                                           int(ignore_index), reduction)
    return kernel(x, weight, targets, bias, int(ignore_index), reduction, False, int(chunk_rows))[0]
