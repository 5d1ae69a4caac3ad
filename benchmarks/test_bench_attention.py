"""Self-attention forward / backward / both on (B, H, T, D): barkgpt backends vs the naive
masked-softmax attention (eager and torch.compile) vs F.scaled_dot_product_attention, with its
default dispatch ("sdpa") and pinned to each backend the device offers ("sdpa-flash", ...).

FLOP model (barkgpt.perf.attention_flops): 4*B*H*T*T*D forward, halved when causal; backward
2.5x forward. An SDPA backend that refuses a shape (e.g. flash at head dim 1) is recorded as
unsupported, not timed.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import _bench as B
from barkgpt import ops, perf
from barkgpt.reference import attention_math

SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "cudnn": "CUDNN_ATTENTION", "math": "MATH"}


def _offered_sdpa():
    """SDPA backends that run at all on this device and dtype (probed on a shape all accept)."""
    out = []
    q = torch.randn(1, 2, 64, 64, device=B.DEVICE, dtype=B.DTYPE)
    for name, attr in SDPA_BACKENDS.items():
        backend = getattr(SDPBackend, attr, None)
        if backend is None:
            continue
        try:
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q, q, q, is_causal=True)
            out.append(name)
        except RuntimeError:
            pass
    return out


def _shapes():
    """(B, H, T, D, causal), the target shapes first."""
    if B.IS_CUDA:
        out = []
        for D in (64, 128, 16):
            for T in (1024, 4096, 8192, 256):
                out.append((max(1, (1 << 17) // T // 16), 16, T, D, True))
        for D in (1, 4):  # head dims PyTorch's fused kernels refuse (bark-tiny has 1)
            for T in (256, 1024, 4096):
                out.append((max(1, (1 << 17) // T // 16), 16, T, D, True))
        out.append((8, 16, 1024, 64, False))
        return out
    presets = [(64, 8, 32, 1, True),     # bark-tiny
               (64, 2, 32, 4, True),     # head dim 4 (n_embd 8, 2 heads), below every fused kernel's minimum
               (64, 2, 32, 16, True),    # bark
               (64, 2, 256, 16, False),  # bark-article (no causal mask)
               (32, 2, 128, 64, True),   # small
               (1, 12, 1024, 64, True)]  # gpt2
    if B.SIZE == "full":
        presets += [(1, 8, T, D, True) for D in (16, 64, 128) for T in (256, 1024)]
    return presets


SHAPES = _shapes()
SDPA_OFFERED = _offered_sdpa()
PROVIDERS = ([f"barkgpt-{b}" for b in B.barkgpt_backends()] + ["eager", "compile", "sdpa"]
             + [f"sdpa-{s}" for s in SDPA_OFFERED])
MODES = ["fwd+bwd", "fwd", "bwd"]


def naive_attention(q, k, v, mask):
    """nanoGPT's slow path: materialize the T x T scores, mask, softmax, weight the values."""
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    return torch.softmax(att, dim=-1) @ v


def provider_fn(provider, causal, T):
    mask = torch.ones(T, T, dtype=torch.bool, device=B.DEVICE).tril() if causal else None  # a buffer, built once
    if provider == "eager":
        return lambda q, k, v: naive_attention(q, k, v, mask)
    if provider == "compile":
        f = B.compiled(naive_attention)
        return lambda q, k, v: f(q, k, v, mask)
    if provider.startswith("sdpa"):
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    backend = B.backend_of(provider)
    return lambda q, k, v: ops.attention(q, k, v, causal=causal, backend=backend)


def sdpa_context(provider):
    if provider.startswith("sdpa-"):
        backend = getattr(SDPBackend, SDPA_BACKENDS[provider.split("-", 1)[1]])
        return lambda: sdpa_kernel([backend])
    return None


def _priority(shape):
    """Run order under a time budget: the shapes the targets are stated for before the rest."""
    _, _, T, D, causal = shape
    return 3 if causal and (D in (1, 4) or (D in (64, 128) and T >= 1024)) else 5


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [pytest.param(s, marks=pytest.mark.bench_priority(_priority(s))) for s in SHAPES],
                         ids=lambda s: "B{}xH{}xT{}xD{}{}".format(*s[:4], "-causal" if s[4] else ""))
def test_attention(benchmark, shape, provider, mode):
    Bsz, H, T, D, causal = shape

    def make_args():
        return [torch.randn(Bsz, H, T, D, device=B.DEVICE, dtype=B.DTYPE).requires_grad_() for _ in range(3)]

    elem = torch.finfo(B.DTYPE).bits // 8
    B.run_op(benchmark, group="attention", case=f"B={Bsz} H={H} T={T} D={D}{' causal' if causal else ''}",
             shape={"B": Bsz, "H": H, "T": T, "D": D, "causal": causal}, provider=provider, mode=mode,
             make_args=make_args, diff_argnums=(0, 1, 2), call=provider_fn(provider, causal, T),
             reference=lambda q, k, v: attention_math(q, k, v, causal),
             nflops=perf.attention_flops(Bsz, H, T, D, causal, mode),
             nbytes=perf.attention_bytes(Bsz, H, T, D, elem, mode),
             context=sdpa_context(provider), may_be_unsupported=provider.startswith("sdpa-"))
