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
the diagonal band (masked). GPU entries target H100 (sm_90, 227 KB shared memory per block),
starting from the usual FlashAttention-2 shapes and kept to those that compile without register
spills; they have not been timed on hardware yet: ``python -m barkgpt.kernels._attention_config``
on a GPU times the candidates and prints entries to paste here. Under ``TRITON_INTERPRET=1``
small, unequal tiles keep CPU tests fast while still exercising multi-tile loops and the
diagonal band.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch


class TileConfig(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# (pass, padded head dim, "16bit" | "fp32") -> config. Padded head dim is a power of two >= 16.
# Every entry compiles for sm_90 (16-bit: wgmma) with no register spills and <= 227 KB of shared
# memory, checked offline with ptxas (cuobjdump -res-usage); none is timed yet: run tune() on a GPU.
_GPU_TABLE: Dict[Tuple[str, int, str], TileConfig] = {
    # forward: Q tile and O accumulator live in registers, K/V tiles stream through shared memory.
    ("fwd", 16, "16bit"): TileConfig(128, 64, 4, 3),
    ("fwd", 32, "16bit"): TileConfig(128, 64, 8, 3),  # 4 warps: 255 registers and a spill at D = 24
    ("fwd", 64, "16bit"): TileConfig(128, 64, 8, 3),
    ("fwd", 128, "16bit"): TileConfig(128, 64, 8, 3),
    ("fwd", 256, "16bit"): TileConfig(64, 32, 8, 3),
    # fp32 runs "ieee" dots on FMA units, which hold whole operand tiles in registers: small tiles.
    ("fwd", 16, "fp32"): TileConfig(64, 32, 4, 2),
    ("fwd", 32, "fp32"): TileConfig(64, 32, 8, 2),
    ("fwd", 64, "fp32"): TileConfig(64, 32, 8, 2),
    ("fwd", 128, "fp32"): TileConfig(32, 16, 8, 2),
    ("fwd", 256, "fp32"): TileConfig(32, 16, 8, 2),
    # dK/dV: two (BLOCK_N, D) fp32 accumulators per program; Q/dO tiles stream.
    ("dkdv", 16, "16bit"): TileConfig(64, 128, 8, 3),
    ("dkdv", 32, "16bit"): TileConfig(64, 128, 8, 3),
    ("dkdv", 64, "16bit"): TileConfig(64, 128, 8, 3),
    ("dkdv", 128, "16bit"): TileConfig(32, 128, 8, 3),
    # D=256: 32-row key tiles are below wgmma's 64 rows per warpgroup (mma.sync instead), but
    # every larger dK/dV tile spills.
    ("dkdv", 256, "16bit"): TileConfig(32, 32, 8, 3),
    ("dkdv", 16, "fp32"): TileConfig(32, 64, 8, 2),
    ("dkdv", 32, "fp32"): TileConfig(16, 64, 8, 2),
    ("dkdv", 64, "fp32"): TileConfig(16, 64, 8, 2),
    ("dkdv", 128, "fp32"): TileConfig(16, 32, 8, 2),
    ("dkdv", 256, "fp32"): TileConfig(16, 16, 8, 1),
    # dQ: one (BLOCK_M, D) fp32 accumulator; K/V tiles stream.
    ("dq", 16, "16bit"): TileConfig(128, 64, 8, 3),
    ("dq", 32, "16bit"): TileConfig(128, 64, 8, 3),
    ("dq", 64, "16bit"): TileConfig(128, 64, 8, 3),
    ("dq", 128, "16bit"): TileConfig(128, 32, 8, 3),
    ("dq", 256, "16bit"): TileConfig(32, 32, 4, 3),  # mma.sync; larger dQ tiles spill at D=256
    ("dq", 16, "fp32"): TileConfig(64, 32, 8, 2),
    ("dq", 32, "fp32"): TileConfig(64, 32, 8, 2),
    ("dq", 64, "fp32"): TileConfig(64, 32, 8, 2),
    ("dq", 128, "fp32"): TileConfig(64, 16, 8, 2),  # (32, 32): 210-word spill under triton 3.6
    ("dq", 256, "fp32"): TileConfig(16, 16, 8, 2),
}

# Entries that differ on architectures with less shared memory or a smaller register budget per
# tile (no wgmma: sm_80/86/89 keep mma.sync accumulators and operands in registers); a key not
# listed takes the sm_90 entry. Every entry is checked by benchmarks/compile_check.py.
_ARCH_TABLES: Dict[str, Dict[Tuple[str, int, str], TileConfig]] = {
    "sm90": {},
    # sm_80/86/89: the sm_90 tiles above hit 255 registers and spill here (benchmarks/results/
    # compile_check.md); these are the largest candidates that compile for sm_86 with no spill
    # and <= 99 KB (benchmarks/compile_check.py --search), preferring register headroom.
    "sm80": {
        ("fwd", 32, "fp32"): TileConfig(32, 32, 8, 2),
        ("dq", 16, "fp32"): TileConfig(64, 16, 8, 2),
        # fp32 backward at small head dims: the sm_90 tiles leave a 2-4 word spill on sm_80/86/89
        ("dkdv", 16, "fp32"): TileConfig(16, 32, 8, 2),
        # D=32: 8 warps of (16, 32) are capped at 64 registers and keep 2 words of stack non-causal
        # on sm_80/86/89 (and (32, 32) x8, (16, 16) x8, (16, 32) x4 spill somewhere); 2 warps without
        # pipelining hold it in <= 238 registers on all three (compile_check.py).
        ("dkdv", 32, "fp32"): TileConfig(16, 32, 2, 1),
        ("dkdv", 64, "fp32"): TileConfig(16, 32, 8, 2),
        ("dq", 32, "fp32"): TileConfig(64, 16, 8, 2),
        ("fwd", 128, "16bit"): TileConfig(64, 64, 8, 3),
        # 8 warps of (32, 16) are capped at 64 registers and spill; 8 of (64, 16) spill non-causal
        ("fwd", 128, "fp32"): TileConfig(32, 16, 4, 2),
        ("fwd", 256, "16bit"): TileConfig(64, 32, 8, 2),  # 3 stages need 100 KB
        # fp32 with 8 warps: sm_80's ptxas caps these at 128 registers and spills; 4 warps do not
        ("fwd", 256, "fp32"): TileConfig(32, 16, 4, 2),
        ("dq", 128, "fp32"): TileConfig(64, 16, 4, 2),
        ("dq", 64, "16bit"): TileConfig(128, 32, 8, 3),
        ("dq", 128, "16bit"): TileConfig(64, 64, 8, 3),
        ("dkdv", 64, "16bit"): TileConfig(32, 128, 8, 3),
        ("dkdv", 128, "16bit"): TileConfig(32, 64, 8, 3),  # (64, 64) spills under triton 3.6
    },
}

# Interpreter: numpy cost per tile is mostly fixed overhead, so small but multi-tile shapes.
_INTERPRET_TABLE: Dict[str, TileConfig] = {
    "fwd": TileConfig(32, 16, 4, 1),
    "dkdv": TileConfig(16, 32, 4, 1),
    "dq": TileConfig(32, 16, 4, 1),
}

def _pow2_at_least(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def padded_head_dim(d: int) -> int:
    """Power of two >= max(d, 16): ``tl.dot`` needs every dimension >= 16."""
    return max(16, _pow2_at_least(d))


def arch_table(arch: Optional[int]) -> str:
    """The table an architecture (compute capability as ``10 * major + minor``) gets: "sm90" for
    the data-center parts with wgmma-class tensor cores and 227 KB of shared memory per block
    (sm_90, sm_100, sm_103); "sm80" for everything else: sm_80 (163 KB), sm_86/sm_89/sm_120
    (99 KB) and unknown or older parts. Without wgmma, mma.sync keeps accumulators and operands
    in registers, and the register file, not shared memory, is what the sm_90 tiles overflow
    there: one table that fits 99 KB and 255 registers serves them all (sm_80 could afford
    deeper pipelines; untimed, so not taken)."""
    if arch in (90, 100, 103):
        return "sm90"
    return "sm80"


def tile_config(kind: str, head_dim: int, seq_len: int, dtype: torch.dtype, interpret: bool,
                arch: Optional[int] = 90) -> TileConfig:
    """Tiles for pass ``kind`` ("fwd", "dkdv", "dq") on compute capability ``arch`` (e.g. 86),
    shrunk for short sequences.

    Shrinking both block sizes to the same power of two keeps the larger a multiple of the
    smaller, which the causal band logic in the kernels relies on.
    """
    if interpret:
        cfg = _INTERPRET_TABLE[kind]
    else:
        width = "fp32" if dtype == torch.float32 else "16bit"
        key = (kind, padded_head_dim(head_dim), width)
        cfg = _ARCH_TABLES[arch_table(arch)].get(key) or _GPU_TABLE[key]
    cap = max(16, _pow2_at_least(seq_len))
    return cfg._replace(block_m=min(cfg.block_m, cap), block_n=min(cfg.block_n, cap))


# ---- tuning on a GPU -----------------------------------------------------------------------
# Candidates per pass, as (block_m, block_n, num_warps, num_stages), taken from the configs that
# compiled for sm_90 without register spills at some head dims (ptxas, cuobjdump -res-usage);
# some spill at other head dims, which the timings will show. Failures to launch are skipped.
_CANDIDATES_16BIT = {
    "fwd": [(128, 64, 4, 3), (128, 64, 4, 4), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3),
            (128, 32, 8, 3), (64, 64, 4, 3), (64, 64, 8, 3), (64, 32, 8, 3), (64, 32, 8, 2)],
    "dkdv": [(64, 128, 8, 3), (64, 128, 8, 2), (32, 128, 8, 3), (32, 128, 8, 2), (64, 64, 8, 3),
             (32, 64, 8, 3), (32, 64, 4, 3), (32, 32, 8, 3), (16, 32, 8, 3)],
    "dq": [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3), (64, 64, 8, 3),
           (64, 32, 8, 3), (32, 32, 8, 3), (32, 32, 4, 3)],
}
_CANDIDATES_FP32 = {
    "fwd": [(64, 32, 8, 2), (64, 32, 4, 2), (64, 16, 8, 2), (32, 32, 8, 2), (32, 16, 8, 2), (16, 16, 8, 2)],
    "dkdv": [(32, 64, 8, 2), (16, 64, 8, 2), (32, 32, 8, 2), (16, 32, 8, 2), (16, 32, 4, 1), (16, 16, 8, 2)],
    "dq": [(64, 32, 8, 2), (64, 16, 8, 2), (32, 32, 8, 2), (32, 16, 8, 2), (16, 16, 8, 2)],
}


def tune(head_dims=(16, 32, 64, 128, 256), dtypes=(torch.bfloat16, torch.float32), seq_len=4096,
         batch=4, heads=16, causal=True, device="cuda", bench=None):  # pragma: no cover - needs a GPU
    """Time every candidate tile per pass on this GPU and print ``_GPU_TABLE`` lines to paste.

    Run: ``python -m barkgpt.kernels._attention_config``. A candidate that fails to launch
    (shared memory, registers) or disagrees with the current table's result is skipped.
    """
    import importlib

    if bench is None:
        from triton.testing import do_bench

        def bench(fn):
            return do_bench(fn, warmup=25, rep=100)

    # By package name: under ``python -m`` this file is __main__, a copy the kernels never read.
    attn = importlib.import_module(__package__ + ".attention")
    mod = importlib.import_module(__package__ + "._attention_config")
    table_fn = mod.tile_config
    for dtype in dtypes:
        width = "fp32" if dtype == torch.float32 else "16bit"
        cands = _CANDIDATES_FP32 if dtype == torch.float32 else _CANDIDATES_16BIT
        for d in head_dims:
            q, k, v, do = (torch.randn(batch, heads, seq_len, d, device=device, dtype=dtype) for _ in range(4))
            out, lse = attn.attention_fwd(q, k, v, causal)
            want_fwd = out.float()
            want_bwd = [g.float() for g in attn.attention_bwd(do, q, k, v, out, lse, causal)]
            for kind in ("fwd", "dkdv", "dq"):
                best = None
                for c in cands[kind]:
                    cfg = TileConfig(*c)

                    def pick(kind_, head_dim, t, dt, interpret, arch=None, cfg=cfg, kind=kind):
                        if kind_ == kind:
                            cap = max(16, _pow2_at_least(t))
                            return mod.TileConfig(min(cfg.block_m, cap), min(cfg.block_n, cap), cfg.num_warps,
                                                  cfg.num_stages)
                        return table_fn(kind_, head_dim, t, dt, interpret, arch)

                    mod.tile_config = pick
                    try:
                        if kind == "fwd":
                            fn = lambda: attn.attention_fwd(q, k, v, causal)  # noqa: E731
                            got = [fn()[0].float()]
                            want = [want_fwd]
                        else:
                            fn = lambda: attn.attention_bwd(do, q, k, v, out, lse, causal)  # noqa: E731
                            got = [g.float() for g in fn()]
                            want = want_bwd
                        if not all(torch.allclose(a, b, atol=2e-2, rtol=2e-2) for a, b in zip(got, want)):
                            print(f"  {kind} D={d} {cfg}: wrong result, skipped")
                            continue
                        ms = bench(fn)
                    except Exception as e:  # out of resources etc.
                        print(f"  {kind} D={d} {cfg}: {type(e).__name__}, skipped")
                        continue
                    finally:
                        mod.tile_config = table_fn
                    print(f"  {kind} D={d} {dtype} {cfg}: {ms:.3f} ms")
                    if best is None or ms < best[0]:
                        best = (ms, cfg)
                if best is not None:
                    print(f'    ("{kind}", {padded_head_dim(d)}, "{width}"): TileConfig{tuple(best[1])},'
                          f"  # {best[0]:.3f} ms, T={seq_len}, causal={causal}")


if __name__ == "__main__":  # pragma: no cover
    tune()
