"""Tile sizes, warps and pipeline depths for the Triton attention kernels.

A fixed table (not ``triton.autotune``): autotuning would run the kernels several times on the
first call of each shape, and pick configs nondeterministically across machines. Each pass gets
its own entry because the three kernels keep different tiles live:

* ``fwd``:  BLOCK_M query rows per program, BLOCK_N key rows per loop step (BLOCK_M % BLOCK_N == 0).
* ``dkdv``: BLOCK_N key rows per program (dK, dV accumulators), BLOCK_M query rows per step
  (BLOCK_N % BLOCK_M == 0).
* ``dq``:   BLOCK_M query rows per program (dQ accumulator), BLOCK_N key rows per step
  (BLOCK_M % BLOCK_N == 0).

The divisibility keeps every tile either fully below the causal diagonal (unmasked) or part of
the diagonal band (masked). GPU entries are chosen for H100 (sm_90, 228 KB shared memory per SM)
from the usual FlashAttention-2 shapes; they have not been tuned on hardware yet (see
benchmarks/). Under ``TRITON_INTERPRET=1`` small, unequal tiles keep CPU tests fast while still
exercising multi-tile loops and the diagonal band.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Tuple

import torch


class TileConfig(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# (pass, padded head dim, "16bit" | "fp32") -> config. Padded head dim is a power of two >= 16.
_GPU_TABLE: Dict[Tuple[str, int, str], TileConfig] = {
    # forward: Q tile and O accumulator live in registers, K/V tiles stream through shared memory.
    ("fwd", 16, "16bit"): TileConfig(128, 64, 4, 3),
    ("fwd", 32, "16bit"): TileConfig(128, 64, 4, 3),
    ("fwd", 64, "16bit"): TileConfig(128, 64, 4, 3),
    ("fwd", 128, "16bit"): TileConfig(128, 64, 8, 3),
    ("fwd", 256, "16bit"): TileConfig(64, 32, 4, 2),
    ("fwd", 16, "fp32"): TileConfig(64, 32, 4, 3),
    ("fwd", 32, "fp32"): TileConfig(64, 32, 4, 3),
    ("fwd", 64, "fp32"): TileConfig(64, 32, 4, 2),
    ("fwd", 128, "fp32"): TileConfig(64, 32, 4, 2),
    ("fwd", 256, "fp32"): TileConfig(32, 32, 4, 1),
    # dK/dV: two (BLOCK_N, D) fp32 accumulators per program; Q/dO tiles stream.
    ("dkdv", 16, "16bit"): TileConfig(64, 128, 8, 3),
    ("dkdv", 32, "16bit"): TileConfig(64, 128, 8, 3),
    ("dkdv", 64, "16bit"): TileConfig(64, 128, 8, 3),
    ("dkdv", 128, "16bit"): TileConfig(32, 128, 8, 3),
    ("dkdv", 256, "16bit"): TileConfig(32, 64, 8, 2),
    ("dkdv", 16, "fp32"): TileConfig(32, 64, 4, 3),
    ("dkdv", 32, "fp32"): TileConfig(32, 64, 4, 3),
    ("dkdv", 64, "fp32"): TileConfig(32, 64, 4, 2),
    ("dkdv", 128, "fp32"): TileConfig(32, 64, 8, 2),
    ("dkdv", 256, "fp32"): TileConfig(16, 32, 4, 1),
    # dQ: one (BLOCK_M, D) fp32 accumulator; K/V tiles stream.
    ("dq", 16, "16bit"): TileConfig(128, 64, 8, 3),
    ("dq", 32, "16bit"): TileConfig(128, 64, 8, 3),
    ("dq", 64, "16bit"): TileConfig(128, 64, 8, 3),
    ("dq", 128, "16bit"): TileConfig(128, 32, 8, 3),
    ("dq", 256, "16bit"): TileConfig(64, 32, 8, 2),
    ("dq", 16, "fp32"): TileConfig(64, 32, 4, 3),
    ("dq", 32, "fp32"): TileConfig(64, 32, 4, 3),
    ("dq", 64, "fp32"): TileConfig(64, 32, 4, 2),
    ("dq", 128, "fp32"): TileConfig(64, 32, 8, 2),
    ("dq", 256, "fp32"): TileConfig(32, 16, 4, 1),
}

# Interpreter: numpy cost per tile is mostly fixed overhead, so small but multi-tile shapes.
_INTERPRET_TABLE: Dict[str, TileConfig] = {
    "fwd": TileConfig(32, 16, 4, 1),
    "dkdv": TileConfig(16, 32, 4, 1),
    "dq": TileConfig(32, 16, 4, 1),
}

def padded_head_dim(d: int) -> int:
    """Power of two >= max(d, 16): ``tl.dot`` needs every dimension >= 16."""
    return max(16, 1 << (max(d, 1) - 1).bit_length())


def _pow2_at_least(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def tile_config(kind: str, head_dim: int, seq_len: int, dtype: torch.dtype, interpret: bool) -> TileConfig:
    """Tiles for pass ``kind`` ("fwd", "dkdv", "dq"), shrunk for short sequences.

    Shrinking both block sizes to the same power of two keeps the larger a multiple of the
    smaller, which the causal band logic in the kernels relies on.
    """
    if interpret:
        cfg = _INTERPRET_TABLE[kind]
    else:
        width = "fp32" if dtype == torch.float32 else "16bit"
        cfg = _GPU_TABLE[(kind, padded_head_dim(head_dim), width)]
    cap = max(16, _pow2_at_least(seq_len))
    return cfg._replace(block_m=min(cfg.block_m, cap), block_n=min(cfg.block_n, cap))
