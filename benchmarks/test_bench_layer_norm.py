"""LayerNorm forward / backward / both: barkgpt backends vs PyTorch eager vs torch.compile.

Byte model (barkgpt.perf.layer_norm_bytes): fwd reads x, w, b and writes y, mean, rstd (fp32);
bwd reads dy, x, w, mean, rstd and writes dx, dw, db.
"""

import pytest
import torch
import torch.nn.functional as F

import _bench as B
from barkgpt import ops, perf
from barkgpt.reference import layer_norm_math

EPS = 1e-5
if B.IS_CUDA:
    WIDTHS = [8, 32, 128, 768, 1024, 4096]
elif B.SIZE == "full":
    WIDTHS = [8, 32, 128, 768, 1024, 4096]
else:
    WIDTHS = [8, 32, 128, 768]  # the presets' widths


def rows_for(n: int) -> int:
    # GPU: 32M elements, enough to fill the device; CPU: a training batch of tokens.
    return max(4096, (1 << 25) // n) if B.IS_CUDA else 4096


PROVIDERS = [f"barkgpt-{b}" for b in B.barkgpt_backends()] + ["eager", "compile"]
MODES = ["fwd", "bwd", "fwd+bwd"]


def eager_layer_norm(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, EPS)


def provider_fn(provider):
    return B.provider_call(provider, eager_layer_norm,
                           lambda x, w, b, backend: ops.layer_norm(x, w, b, EPS, backend=backend))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n", WIDTHS)
def test_layer_norm(benchmark, n, provider, mode):
    rows = rows_for(n)

    def make_args():
        x = torch.randn(rows, n, device=B.DEVICE, dtype=B.DTYPE).requires_grad_()
        w = (1 + 0.1 * torch.randn(n, device=B.DEVICE, dtype=B.DTYPE)).requires_grad_()
        b = (0.1 * torch.randn(n, device=B.DEVICE, dtype=B.DTYPE)).requires_grad_()
        return [x, w, b]

    elem = torch.finfo(B.DTYPE).bits // 8
    B.run_op(benchmark, group="layer_norm", case=f"rows={rows} n={n}", shape={"rows": rows, "n": n},
             provider=provider, mode=mode, make_args=make_args, diff_argnums=(0, 1, 2),
             call=provider_fn(provider), reference=lambda x, w, b: layer_norm_math(x, w, b, EPS),
             nbytes=perf.layer_norm_bytes(rows, n, elem, elem, mode))
