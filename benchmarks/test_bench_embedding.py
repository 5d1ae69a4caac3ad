"""Token + position embedding add, forward / backward / both: barkgpt backends vs PyTorch eager
(F.embedding + add) vs torch.compile.

Byte model (barkgpt.perf.embedding_bytes): fwd reads the ids, one token row per position and the
T position rows, writes the output; bwd reads dout and the ids, writes the whole token-table
gradient (V x C) and the position gradient.
"""

import pytest
import torch
import torch.nn.functional as F

import _bench as B
from barkgpt import ops, perf


# Real text is skewed: the most frequent token is a few percent of a batch. Uniform ids give every
# token-gradient segment about the mean length; "skew" puts one id at SKEW_FRACTION of positions.
SKEW_FRACTION = 0.05


def _shapes():
    """(B, T, V, C, ids) cases; ids "uniform" or "skew"."""
    if B.IS_CUDA:
        out = []
        for C, V, T in [(8, 9, 32), (32, 9, 32), (128, 256, 128), (768, 50304, 1024),
                        (1024, 50304, 1024), (4096, 50304, 1024)]:
            out.append((max(1, (1 << 25) // C // T), T, V, C, "uniform"))  # 32M output elements
        out.append((max(1, (1 << 25) // 768 // 1024), 1024, 50304, 768, "skew"))
        return out
    presets = [(64, 32, 9, 8), (64, 32, 9, 32), (32, 128, 256, 128), (2, 1024, 50304, 768)]  # bark-tiny, bark, small, gpt2
    if B.SIZE == "full":
        presets += [(2, 1024, 50304, 1024), (2, 1024, 8192, 4096)]
    return [p + ("uniform",) for p in presets] + [(2, 1024, 50304, 768, "skew")]


def make_ids(Bsz, T, V, ids, device):
    idx = torch.randint(0, V, (Bsz, T), device=device)
    if ids == "skew":  # one frequent id (a fixed pattern, the same in every rotated input set)
        n = Bsz * T
        hot = torch.randperm(n, generator=torch.Generator().manual_seed(0))[: int(SKEW_FRACTION * n)]
        idx.view(-1)[hot.to(device)] = V // 3
    return idx


SHAPES = _shapes()
PROVIDERS = [f"barkgpt-{b}" for b in B.barkgpt_backends()] + ["eager", "compile"]
MODES = ["fwd", "bwd", "fwd+bwd"]


def eager_embedding_add(idx, tok, pos):
    return F.embedding(idx, tok) + pos[: idx.shape[1]]


def reference(idx, tok, pos):  # plain indexing, independent of F.embedding
    return tok[idx] + pos[: idx.shape[1]]


def provider_fn(provider):
    return B.provider_call(provider, eager_embedding_add, ops.embedding_add)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}xT{}xV{}xC{}".format(*s) + ("-skew" if s[4] == "skew" else ""))
def test_embedding_add(benchmark, shape, provider, mode):
    Bsz, T, V, C, ids = shape

    def make_args():
        idx = make_ids(Bsz, T, V, ids, B.DEVICE)
        tok = (0.02 * torch.randn(V, C, device=B.DEVICE)).to(B.DTYPE).requires_grad_()
        pos = (0.02 * torch.randn(T, C, device=B.DEVICE)).to(B.DTYPE).requires_grad_()
        return [idx, tok, pos]

    elem = torch.finfo(B.DTYPE).bits // 8
    B.run_op(benchmark, group="embedding_add",
             case=f"B={Bsz} T={T} V={V} C={C}" + (f" skew {SKEW_FRACTION:.0%}" if ids == "skew" else ""),
             shape={"B": Bsz, "T": T, "V": V, "C": C, "ids": ids}, provider=provider, mode=mode,
             make_args=make_args, diff_argnums=(1, 2), call=provider_fn(provider), reference=reference,
             nbytes=perf.embedding_bytes(Bsz, T, C, V, elem, 8, mode))
