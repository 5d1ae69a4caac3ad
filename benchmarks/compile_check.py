"""Compile every Triton kernel configuration barkgpt's dispatch can choose, for real GPU
architectures, on a machine without a GPU; report registers, spills and shared memory.

    python benchmarks/compile_check.py            # everything: writes benchmarks/results/compile_check.{md,json}
    python benchmarks/compile_check.py --quick    # the configs that matter most (CI: tests/test_compile_check.py)
    python benchmarks/compile_check.py --search   # attention: which tuning candidates fit each architecture

Triton's compiler runs without a GPU: a stand-in driver names the target (``GPUTarget("cuda",
cc, 32)``) and ``JITFunction.warmup`` specializes and compiles exactly as a launch would, with
torch dtypes standing in for tensors. Per kernel and architecture it reads

* ``regs``: registers per thread (``REG`` of ``cuobjdump -res-usage`` on the cubin; on a GPU
  Triton reports the same number as ``kernel.n_regs``);
* ``spills``: ``STACK / 4`` of the same listing, the local memory per thread in 4-byte words,
  which is what Triton's ``kernel.n_spills`` reports on a GPU (our kernels have no local arrays,
  so any local memory is a register spill);
* ``shared``: the launch's dynamic shared memory (``kernel.metadata.shared``) plus the cubin's
  static shared memory, checked against the architecture's per-block limit.

A configuration fails when it does not compile, spills, or needs more shared memory than the
architecture allows a block (sm_80 163 KB, sm_86/sm_89 99 KB, sm_90 227 KB). The exit status
is 1 when any configuration fails. Run it with ``TRITON_INTERPRET`` unset (the script clears it).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, NamedTuple, Optional, Tuple

os.environ["TRITON_INTERPRET"] = "0"  # read when the kernels are decorated: before any import of them
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton >= 3.9 warns when unset; 1 is the default

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

attn = importlib.import_module("barkgpt.kernels.attention")
acfg = importlib.import_module("barkgpt.kernels._attention_config")
ln = importlib.import_module("barkgpt.kernels.layer_norm")
emb = importlib.import_module("barkgpt.kernels.embedding")
kutils = importlib.import_module("barkgpt.kernels._utils")
lce = importlib.import_module("barkgpt.kernels.linear_cross_entropy")
cached = importlib.import_module("barkgpt.kernels.cached_attention")

KB = 1024
# Shared memory one block may use (opt-in maximum), per compute capability.
ARCHS: Dict[int, int] = {80: 163 * KB, 86: 99 * KB, 89: 99 * KB, 90: 227 * KB}
# --quick: sm_86 has the tightest limits of the mma.sync architectures (99 KB, sm_80's register
# file) and shares their tile table; sm_90 is the target. The full run covers sm_80 and sm_89.
QUICK_ARCHS = (86, 90)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class Case(NamedTuple):
    kernel: str  # the @triton.jit function's name
    config: str  # the launch configuration, readable
    dtype: str
    fn: object
    args: tuple
    kwargs: dict  # constexprs + num_warps / num_stages


class Result(NamedTuple):
    kernel: str
    config: str
    dtype: str
    arch: int
    regs: Optional[int]
    spills: Optional[int]
    shared: Optional[int]
    error: Optional[str]
    seconds: float

    @property
    def ok(self) -> bool:
        return self.error is None and self.spills == 0 and self.shared <= ARCHS[self.arch]


# ---- the stand-in driver ----------------------------------------------------------------------

class _CompileOnlyDriver:
    """Enough of a Triton driver for ``warmup``: a target to compile for, nothing to launch on."""

    def __init__(self, cc: int):
        self.cc = cc

    def get_current_device(self):
        return f"compile-check-sm{self.cc}"  # one kernel cache per architecture

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", self.cc, 32)

    def is_active(self):
        return True


def _cuobjdump() -> str:
    tool = getattr(getattr(triton.knobs, "nvidia", None), "cuobjdump", None)
    path = getattr(tool, "path", None)
    if path:
        return path
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _resources(cubin: bytes) -> Tuple[int, int, int]:
    """(registers, stack bytes, static shared bytes) of the one kernel in ``cubin``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)", out)
    if not m:
        raise RuntimeError(f"unexpected cuobjdump output: {out!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def compile_case(case: Case, cc: int) -> Result:
    t0 = time.perf_counter()
    previous = getattr(driver, "_active", None)  # never the default driver: creating it needs a GPU
    driver.set_active(_CompileOnlyDriver(cc))
    try:
        k = case.fn.warmup(*case.args, grid=(1,), **case.kwargs)
        regs, stack, static_shared = _resources(k.asm["cubin"])
        return Result(case.kernel, case.config, case.dtype, cc, regs, stack // 4,
                      int(k.metadata.shared) + static_shared, None, time.perf_counter() - t0)
    except Exception as e:  # a compile error is a result, not a crash of the check
        msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:200]
        return Result(case.kernel, case.config, case.dtype, cc, None, None, None, msg, time.perf_counter() - t0)
    finally:
        if previous is not None:
            driver.set_active(previous)


# ---- what the dispatch can choose -----------------------------------------------------------

# Head dims whose padded width is each table row: a power of two (EVEN_D) and one that is not.
_HEAD_DIMS = {16: (16, 8), 32: (32, 24), 64: (64, 48), 128: (128, 80), 256: (256, 192)}
_T = 1024  # a training length: divisible by 16, like most (the specialization a launch gets)
_H = 12


def _attention_case(kind: str, cfg, d: int, dtype_name: str, causal: bool, quick_label: str = "") -> Case:
    dt = DTYPES[dtype_name]
    block_d = acfg.padded_head_dim(d)
    qkv = (_T * 3 * _H * d, d, 3 * _H * d, 1)  # q, k, v split out of the fused projection
    out = (_T * _H * d, d, _H * d, 1)  # the forward's (B, T, H, D) layout
    cont = (_H * _T * d, _T * d, d, 1)  # backward outputs, contiguous dO
    common = dict(CAUSAL=causal, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
                  EVEN_D=block_d == d, PRECISION="ieee" if dt == torch.float32 else "tf32",
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    scale = 1.0 / d ** 0.5
    f32 = torch.float32
    if kind == "fwd":
        fn, args = attn._attention_fwd_kernel, (dt, dt, dt, dt, f32, *qkv, *qkv, *qkv, *out, _H, _T, d, scale)
    elif kind == "dq":
        fn, args = attn._attention_bwd_dq_kernel, (dt, dt, dt, dt, dt, dt, f32, f32, *qkv, *qkv, *qkv, *out, *cont,
                                                   *cont, _H, _T, d, scale, scale)
    else:
        fn, args = attn._attention_bwd_dkdv_kernel, (dt, dt, dt, dt, dt, dt, f32, f32, *qkv, *qkv, *qkv, *cont,
                                                     *cont, *cont, _H, _T, d, scale, scale)
    label = (f"D={d}{'' if block_d == d else f'(pad {block_d})'} {'causal' if causal else 'full'} "
             f"{cfg.block_m}x{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}")
    return Case(fn.__name__, label, dtype_name, fn, args, common)


def attention_cases(cc: int, quick: bool) -> List[Case]:
    """Every pass and padded head dim with the tiles ``tile_config`` gives on ``cc`` for long
    sequences, in bf16 and fp32: causal and not, and a head dim that is not a power of two
    (masked head-dim loads). Not compiled: fp16 (bf16's tiles and register footprint), and the
    tiles of sequences under 128 (both blocks shrunk to the same power of two: a subset of the
    long-sequence tile's work per thread). ``--quick``: causal, head dims 64 and 128 in bf16 and
    128 in fp32 (the largest tiles of each table)."""
    cases = []
    for pad in ((64, 128) if quick else tuple(_HEAD_DIMS)):
        pow2, other = _HEAD_DIMS[pad]
        dtypes = (("bf16", "fp32") if pad == 128 else ("bf16",)) if quick else ("bf16", "fp32")
        for dtype_name in dtypes:
            variants = [(pow2, True)] if quick else [(pow2, True), (pow2, False), (other, True)]
            for d, causal in variants:
                for kind in ("fwd", "dq", "dkdv"):
                    cfg = acfg.tile_config(kind, d, _T * 8, DTYPES[dtype_name], False, arch=cc)
                    cases.append(_attention_case(kind, cfg, d, dtype_name, causal))
    return cases


_SMS = 132  # only the number of programs depends on it, and that is not compiled in


def layer_norm_cases(quick: bool) -> List[Case]:
    """Forward and backward for every fused width (powers of two 1..8192, and 768) and the
    chunked path (16384), with the row tile a long input gets; bf16 and fp32 (fp16 compiles to
    bf16's footprint). ``--quick``: four widths in bf16."""
    cases = []
    dtypes = ("bf16",) if quick else ("bf16", "fp32")
    widths = [8, 768, 8192, 16384] if quick else [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024,
                                                  2048, 4096, 8192, 16384]
    f32 = torch.float32
    for n in widths:
        for dtype_name in dtypes:
            dt = DTYPES[dtype_name]
            for has_bias in ((True, False) if n == 768 and not quick else (True,)):
                # The row tile of a long input: shorter inputs get fewer rows per program, each
                # thread then holding fewer elements with the same code.
                fwd_tiles = {ln._fwd_config(1 << 20, n, _SMS)}
                bwd_tiles = {ln._bwd_config(1 << 20, n, _SMS)[0]}
                for c in sorted(fwd_tiles):
                    cases.append(Case("_layer_norm_fwd_kernel", f"N={n} {c.block_m}x{c.block_n} w{c.num_warps}"
                                      f"{'' if c.single else ' chunked'}{'' if has_bias else ' no-bias'}",
                                      dtype_name, ln._layer_norm_fwd_kernel,
                                      (dt, dt, dt, dt, f32, f32, n, 1, 1 << 20, n, 1e-5),
                                      dict(HAS_BIAS=has_bias, BLOCK_M=c.block_m, BLOCK_N=c.block_n, SINGLE=c.single,
                                           num_warps=c.num_warps)))
                for c in sorted(bwd_tiles):
                    k = 2 * n if has_bias else n
                    cases.append(Case("_layer_norm_bwd_kernel", f"N={n} {c.block_m}x{c.block_n} w{c.num_warps}"
                                      f"{'' if c.single else ' chunked'}{'' if has_bias else ' no-bias'}",
                                      dtype_name, ln._layer_norm_bwd_kernel,
                                      (dt, dt, dt, f32, f32, dt, f32, n, 1, n, 1, 1 << 20, n, k),
                                      dict(HAS_BIAS=has_bias, BLOCK_M=c.block_m, BLOCK_N=c.block_n, SINGLE=c.single,
                                           num_warps=c.num_warps)))
    return cases


def sum_partials_cases(quick: bool) -> List[Case]:
    cases = []
    for out_name in (("bf16",) if quick else ("bf16", "fp32")):
        dt = DTYPES[out_name]
        tiles = set()
        for g in ([1024] if quick else [1, 64, 4096]):
            for k in ([1536] if quick else [8, 32, 1536, 65536]):
                tiles.add(kutils.partials_config(g, k, _SMS))
        for c in sorted(tiles):
            cases.append(Case("_sum_partials_kernel", f"{c.block_g}x{c.block_n} w{c.num_warps}", out_name,
                              kutils._sum_partials_kernel, (torch.float32, dt, dt, 1024, 1536, 768),
                              dict(BLOCK_G=c.block_g, BLOCK_N=c.block_n, num_warps=c.num_warps)))
    return cases


def embedding_cases(quick: bool) -> List[Case]:
    """Forward (with the device-side id check), token-gradient and position-gradient kernels per
    width with the tiles a long input gets; int32 ids too at width 768. ``--quick``: 768, bf16."""
    cases = []
    dtypes = ("bf16",) if quick else ("bf16", "fp32")
    widths = [768] if quick else [1, 8, 16, 64, 256, 768, 1024, 4096]
    i64 = torch.int64
    for c in widths:
        for dtype_name in dtypes:
            dt = DTYPES[dtype_name]
            for id_dtype in ((i64, torch.int32) if c == 768 and not quick else (i64,)):
                tiles = {emb._tile(1 << 20, c, emb._FWD_TILE, 2 * _SMS)}
                for t in sorted(tiles):
                    cases.append(Case("_embedding_add_fwd_kernel",
                                      f"C={c} {t.block_rows}x{t.block_c} w{t.num_warps} ids {str(id_dtype)[6:]}",
                                      dtype_name, emb._embedding_add_fwd_kernel,
                                      (id_dtype, dt, dt, dt, 1024, 1, c, 1, c, 1, 1 << 20, 1024, c, 50304, i64),
                                      dict(BLOCK_R=t.block_rows, BLOCK_C=t.block_c, CHECK_IDS=True,
                                           num_warps=t.num_warps)))
            for t in [emb._tok_bwd_tile(c)]:
                cases.append(Case("_embedding_add_bwd_tok_kernel", f"C={c} {t.block_rows}x{t.block_c} w{t.num_warps}",
                                  dtype_name, emb._embedding_add_bwd_tok_kernel,
                                  (dt, i64, i64, dt, 1024 * c, c, 1, 1024, 50304, c, 1),
                                  dict(BLOCK_P=t.block_rows, BLOCK_C=t.block_c, num_warps=t.num_warps)))
            for t in [emb._tile(1024, c, emb._BWD_TILE, 1)]:
                cases.append(Case("_embedding_add_bwd_pos_kernel", f"C={c} {t.block_rows}x{t.block_c} w{t.num_warps}",
                                  dtype_name, emb._embedding_add_bwd_pos_kernel,
                                  (dt, dt, 1024 * c, c, 1, 8, 1024, c, 1),
                                  dict(BLOCK_T=t.block_rows, BLOCK_C=t.block_c, num_warps=t.num_warps)))
    return cases


def linear_cross_entropy_cases(quick: bool) -> List[Case]:
    """The fused linear + cross-entropy row kernel: every column block the launcher can pick
    (``next_power_of_2(V)`` capped at ``_MAX_BLOCK_V``, warps from ``warps_for``), with and without
    the gradient pass, in each dtype the logits chunk can have (fp16, bf16, fp32). V is odd below
    the cap (unaligned rows, masked tail) and GPT-2's padded 50304 at it. ``--quick``: the largest
    block with the gradient pass, bf16 and fp32."""
    cases = []
    blocks = [lce._MAX_BLOCK_V] if quick else [1 << i for i in range(lce._MAX_BLOCK_V.bit_length())]
    dtypes = ("bf16", "fp32") if quick else ("fp16", "bf16", "fp32")
    f32, i64 = torch.float32, torch.int64
    for block_v in blocks:
        vocabs = [50304, 50257] if block_v == lce._MAX_BLOCK_V else [block_v // 2 + 1 if block_v > 1 else 1]
        warps = kutils.warps_for(block_v, 8)  # the launcher's choice
        for dtype_name in dtypes:
            dt = DTYPES[dtype_name]
            for v in (vocabs[:1] if quick else vocabs):
                for grad in ((True,) if quick else (True, False)):
                    cases.append(Case("_linear_cross_entropy_fwd_kernel",
                                      f"V={v} block {block_v} w{warps}{'' if grad else ' loss only'}", dtype_name,
                                      lce._linear_cross_entropy_fwd_kernel, (dt, i64, f32, f32, v, v, -100),
                                      dict(GRAD=grad, BLOCK_V=block_v, num_warps=warps)))
    return cases


def cached_attention_cases(quick: bool) -> List[Case]:
    """Flash-decoding against a K/V cache: the split kernel at every padded head dim with the
    launcher's tiles (BLOCK_M 16; key tile, warps and stages from ``split_tiles``, per dtype),
    for a decode step (Tq = 1) and a prefill (Tq = 100, left-padded batch: HAS_START), a head
    dim that is not a power of two too, in fp16, bf16 and fp32; the combine kernel at every
    split count (1..MAX_SPLITS) and padded head dim. ``--quick``: D=128 and 256, bf16 and fp32,
    decode with HAS_START, and the largest combine."""
    cases = []
    dtypes = ("bf16", "fp32") if quick else ("fp16", "bf16", "fp32")
    pads = (128, 256) if quick else tuple(_HEAD_DIMS)
    f32, i64 = torch.float32, torch.int64
    S, tq_prefill, offset = 2048, 100, 1000
    for pad in pads:
        pow2, other = _HEAD_DIMS[pad]
        block_d = acfg.padded_head_dim(pow2)
        block_m = 16
        variants = [(pow2, 1, True)] if quick else [(pow2, 1, False), (pow2, tq_prefill, True), (other, 1, True)]
        for dtype_name in dtypes:
            dt = DTYPES[dtype_name]
            block_n, warps, stages = cached.split_tiles(block_d, dt)
            for d, tq, has_start in variants:
                # q: a (B, T, H, D) projection viewed as (B, H, T, D); the cache contiguous (B, H, S, D).
                q_strides = (tq * _H * d, d, _H * d, 1)
                kv_strides = (_H * S * d, S * d, d, 1)
                split_len = 4 * block_n
                rows = 4 * _H * tq
                args = (dt, dt, dt, i64 if has_start else dt, f32, f32, f32, *q_strides, *kv_strides, *kv_strides,
                        _H, tq, d, offset, split_len, rows, 1.4426950408889634 / d ** 0.5)
                label = (f"D={d}{'' if block_d == d else f'(pad {block_d})'} Tq={tq}{' start' if has_start else ''} "
                         f"{block_m}x{block_n} w{warps} s{stages}")
                cases.append(Case("_cached_attention_fwd_kernel", label, dtype_name,
                                  cached._cached_attention_fwd_kernel, args,
                                  dict(HAS_START=has_start, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                                       PRECISION="ieee" if dt == torch.float32 else "tf32", num_warps=warps,
                                       num_stages=stages)))
            splits = [cached.MAX_SPLITS] if quick else [1 << i for i in range(cached.MAX_SPLITS.bit_length())]
            for block_s in splits:
                n_splits = max(1, block_s - 1) if block_s > 2 else block_s
                warps_c = cached.combine_warps(block_d)
                cases.append(Case("_cached_attention_combine_kernel",
                                  f"D={pow2} splits {n_splits} (block {block_s}) w{warps_c}", dtype_name,
                                  cached._cached_attention_combine_kernel,
                                  (f32, f32, f32, dt, n_splits, 4 * _H, pow2),
                                  dict(BLOCK_S=block_s, BLOCK_D=block_d, num_warps=warps_c)))
    return cases


def all_cases(quick: bool) -> Dict[int, List[Case]]:
    """Cases per architecture. ``--quick`` compiles the LayerNorm / embedding / partial-sum /
    linear cross-entropy kernels for sm_90 only: they hold a few dozen registers and little
    shared memory anywhere."""
    shared = (layer_norm_cases(quick) + sum_partials_cases(quick) + embedding_cases(quick)
              + linear_cross_entropy_cases(quick))
    archs = QUICK_ARCHS if quick else tuple(ARCHS)
    # Cached attention's tiles are fixed (no per-architecture table) but hold D-wide fp32
    # accumulators like the training kernels: every architecture, --quick too.
    return {cc: attention_cases(cc, quick) + cached_attention_cases(quick) + (shared if not quick or cc == 90 else [])
            for cc in archs}


# ---- report ---------------------------------------------------------------------------------

def _cell(r: Result) -> str:
    if r.error:
        return f"**error** {r.error}"
    text = f"{r.regs} / {r.spills} / {r.shared / KB:.1f}"
    return text if r.ok else f"**{text}**"


def write_report(results: List[Result], dest: str, argv: List[str], seconds: float) -> None:
    archs = sorted({r.arch for r in results})
    rows: Dict[Tuple[str, str, str], Dict[int, Result]] = {}
    for r in results:
        rows.setdefault((r.kernel, r.config, r.dtype), {})[r.arch] = r
    failures = [r for r in results if not r.ok]
    meta = {"triton": triton.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "command": "python " + " ".join(argv), "seconds": round(seconds, 1), "failures": len(failures),
            "limits_kb": {f"sm_{cc}": ARCHS[cc] // KB for cc in archs},
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        meta["commit"] = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                        text=True).stdout.strip()
    except OSError:
        pass
    with open(dest + ".json", "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "results": [dict(r._asdict(), ok=r.ok) for r in results]}, f, indent=1)
    lines = ["# Triton kernels compiled for each GPU architecture (no GPU needed)", "",
             f"Command: `{meta['command']}` ({meta['seconds']} s) at commit {meta.get('commit', '?')}, "
             f"{meta['date']}; triton {meta['triton']}, torch {meta['torch']}, Python {meta['python']}.", "",
             "Each cell: registers per thread / spills (4-byte words of local memory per thread, Triton's "
             "`n_spills`) / shared memory per block in KB. Per-block shared memory limits: "
             + ", ".join(f"sm_{cc} {ARCHS[cc] // KB} KB" for cc in archs)
             + ". Attention tiles are the ones `tile_config` picks for each architecture (one table for sm_80/86/89, one for sm_90); "
               "bold marks a failure (a spill, too much shared memory, or an error).", "",
             f"**{len(results)} compiles, {len(failures)} failures.**", "",
             "| kernel | config | dtype | " + " | ".join(f"sm_{cc}" for cc in archs) + " |",
             "|---|---|---|" + "---|" * len(archs)]
    for (kernel, config, dtype), per in rows.items():
        cells = [(_cell(per[cc]) if cc in per else "-") for cc in archs]
        lines.append(f"| {kernel} | {config} | {dtype} | " + " | ".join(cells) + " |")
    with open(dest + ".md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def run(quick: bool, archs=None, progress=True) -> List[Result]:
    results = []
    per_arch = all_cases(quick)
    for cc, cases in per_arch.items():
        if archs and cc not in archs:
            continue
        for case in cases:
            r = compile_case(case, cc)
            results.append(r)
            if progress and not r.ok:
                print(f"FAIL sm_{cc} {r.kernel} {r.config} {r.dtype}: {_cell(r)}", flush=True)
    return results


# ---- attention candidates per architecture ----------------------------------------------------

def search(archs, only=None) -> None:
    """For each architecture, pass, head dim and width: every tuning candidate (causal, which
    compiles both the masked and the unmasked loops), with which of them fit; prints a table
    line for the largest tile that fits. ``only``: "kind:pad:width" filters, e.g. "dq:128:16bit"."""
    for cc in archs:
        print(f"== sm_{cc} (shared memory limit {ARCHS[cc] // KB} KB)")
        for width, cands, dtype_name in (("16bit", acfg._CANDIDATES_16BIT, "bf16"), ("fp32", acfg._CANDIDATES_FP32, "fp32")):
            for kind in ("fwd", "dq", "dkdv"):
                for pad in _HEAD_DIMS:
                    if only and f"{kind}:{pad}:{width}" not in only:
                        continue
                    fits = []
                    for c in cands[kind]:
                        cfg = acfg.TileConfig(*c)
                        r = [compile_case(_attention_case(kind, cfg, d, dtype_name, True), cc) for d in _HEAD_DIMS[pad]]
                        ok = all(x.ok for x in r)
                        print(f"  {kind} D={pad} {width} {tuple(cfg)}: " + ", ".join(_cell(x) for x in r), flush=True)
                        if ok:
                            fits.append((cfg, max(x.regs for x in r)))
                    if fits:
                        # The largest tile, the deepest pipeline, then the most register headroom
                        # (another Triton version may allocate a few more).
                        best = max(fits, key=lambda f: (f[0].block_m * f[0].block_n, f[0].num_stages, -f[1]))[0]
                        print(f'    ("{kind}", {pad}, "{width}"): TileConfig{tuple(best)},')
                    else:
                        print(f"    ({kind}, {pad}, {width}): no candidate fits sm_{cc}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the largest tiles the dispatch picks, sm_86 and sm_90 (CI)")
    p.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90 (repeatable)")
    p.add_argument("--out", help="report path without extension (default benchmarks/results/compile_check[-quick])")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="combine reports of separate runs (e.g. one per --arch) into one at --out")
    p.add_argument("--search", action="store_true", help="try the attention tuning candidates instead")
    p.add_argument("--only", action="append", help="with --search: kind:padded_head_dim:width, e.g. dq:128:16bit")
    args = p.parse_args(argv)
    if args.search:
        search(args.arch or tuple(ARCHS), args.only)
        return 0
    t0 = time.perf_counter()
    command = ["benchmarks/compile_check.py"] + (sys.argv[1:] if argv is None else list(argv))
    if args.merge:
        results, seconds, commands = [], 0.0, []
        for path in args.merge:
            with open(path, encoding="utf-8") as f:
                part = json.load(f)
            fields = set(Result._fields)
            results += [Result(**{k: v for k, v in r.items() if k in fields}) for r in part["results"]]
            seconds += part["meta"]["seconds"]
            commands.append(part["meta"]["command"].replace("python ", "", 1))
        command = [" + ".join(commands)]
    else:
        results = run(args.quick, args.arch)
        seconds = time.perf_counter() - t0
    dest = args.out or os.path.join(ROOT, "benchmarks", "results", "compile_check" + ("-quick" if args.quick else ""))
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    write_report(results, dest, command, seconds)
    bad = [r for r in results if not r.ok]
    print(f"{len(results)} compiles in {seconds:.0f}s, {len(bad)} failures; report: {dest}.md")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
