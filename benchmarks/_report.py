"""Results of one benchmark run: JSON (everything), a Markdown report (tables, same-run ratios,
targets with PASS/FAIL) and a PNG chart (speed-ups over the PyTorch baselines)."""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

BYTE_MODELS = {
    "layer_norm": "fwd reads x, w, b, writes y, mean, rstd (fp32); bwd reads dy, x, w, mean, rstd, "
                  "writes dx, dw, db",
    "embedding_add": "fwd reads the ids, one token row per position and the T position rows, writes the "
                     "output; bwd reads dout and the ids, writes the whole token-table grad (V x C) and "
                     "the position grad",
    "attention": "FLOPs 4*B*H*T*T*D forward, halved when causal, backward 2.5x forward",
    "copy": "bytes read + bytes written",
    "linear_cross_entropy": "FLOPs 6*N*C*V for fwd+bwd (the logits and the two gradient matmuls)",
}
OP_GROUPS = ("layer_norm", "embedding_add", "attention", "linear_cross_entropy")
FLOP_GROUPS = ("attention", "linear_cross_entropy")  # reported in TFLOP/s, not GB/s
# Where a run writes unless BARKGPT_BENCH_OUT says otherwise: ignored by git, so benchmarking leaves
# the checkout clean; benchmarks/results/ holds curated results committed on purpose.
DEFAULT_OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
MODES = ("fwd", "bwd", "fwd+bwd")


# ---- helpers ---------------------------------------------------------------------------------

def _ok(records):
    return [r for r in records if r.get("status") == "ok" and r.get("median_s")]


def _index(records) -> Dict[Tuple, Dict[str, Any]]:
    return {(r["group"], r["case"], r["mode"], r["provider"]): r for r in _ok(records)}


def _cases(records, group) -> List[str]:
    return list(OrderedDict.fromkeys(r["case"] for r in records if r["group"] == group))


def _providers(records, group) -> List[str]:
    return list(OrderedDict.fromkeys(r["provider"] for r in records if r["group"] == group))


def fmt_time(s: Optional[float]) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def fmt_ratio(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _num(x: Optional[float], digits=1) -> str:
    if x is None:
        return "-"
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e4:
        return f"{x / 1e3:.1f}k"
    return f"{x:.{digits}f}"


def speedup(idx, key_base, key_new) -> Optional[float]:
    """time(base) / time(new): > 1 means new is faster."""
    a, b = idx.get(key_base), idx.get(key_new)
    if not a or not b:
        return None
    return a["median_s"] / b["median_s"]


PYTORCH_PROVIDERS = ("eager", "compile", "sdpa", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math",
                     "barkgpt-torch")


# ---- targets ---------------------------------------------------------------------------------

def _target(name, needs, values: List[Tuple[str, Optional[float]]], threshold, strict=False,
            missing_reason="not measured", fmt=fmt_ratio):
    """One target row, named by what it measures: PASS when every measured value meets the threshold."""
    measured = [(k, v) for k, v in values if v is not None]
    if not measured:
        return {"target": name, "needs": needs, "measured": missing_reason, "result": "n/a", "values": {}}
    ok = all((v > threshold) if strict else (v >= threshold) for _, v in measured)
    worst = min(v for _, v in measured)
    detail = ", ".join(f"{k}: {fmt(v)}" for k, v in measured)
    text = f"min {fmt(worst)} ({detail})" if len(measured) > 1 else fmt(worst)
    if len(measured) < len(values):
        text += f"; {len(values) - len(measured)} case(s) not measured"
    return {"target": name, "needs": needs, "measured": text, "result": "PASS" if ok else "FAIL",
            "values": dict(measured)}


def evaluate_targets(records, meta) -> List[Dict[str, Any]]:
    idx = _index(records)
    out = []
    status = meta.get("backends", {})
    if meta["device_type"] == "cpu":
        cpp = "barkgpt-cpp"
        why = ("not measured" if status.get("cpp") == "available"
               else f"cpp backend unavailable ({status.get('cpp', '?')})")
        for group, thr, base, label in [
            ("layer_norm", 1.2, "eager", "LayerNorm fwd+bwd time, cpp kernel vs PyTorch eager"),
            ("embedding_add", 1.5, "eager", "embedding-add fwd+bwd time, cpp kernel vs PyTorch eager"),
            ("attention", 1.0, "sdpa", "attention fwd+bwd time, cpp kernel vs F.scaled_dot_product_attention"),
        ]:
            vals = [(c, speedup(idx, (group, c, "fwd+bwd", base), (group, c, "fwd+bwd", cpp)))
                    for c in _cases(records, group)]
            out.append(_target(label, f">= {thr}x", vals, thr, missing_reason=why))
        auto = meta.get("auto_backend", "?")
        vals = [(c, speedup(idx, ("training", c, "step", "torch"), ("training", c, "step", "auto")))
                for c in _cases(records, "training")]
        out.append(_target(f"training tokens/s, barkgpt's kernels ({auto}) vs barkgpt on its PyTorch backend, "
                           "every preset", "> 1.0x", vals, 1.0, strict=True))
        return out

    # CUDA (the targets are stated for an H100 in bf16)
    copy = [r for r in _ok(records) if r["group"] == "copy"]
    copy_gbps = max((r["gbps"] for r in copy), default=None)
    tri = "barkgpt-triton"
    why = ("not measured" if status.get("triton") == "available"
           else f"triton backend unavailable ({status.get('triton', '?')})")

    def frac_of_copy(group, mode):
        vals = []
        for c in _cases(records, group):
            r = idx.get((group, c, mode, tri))
            vals.append((c, r["gbps"] / copy_gbps if r and copy_gbps and r.get("gbps") else None))
        return vals

    pct = lambda v: f"{100 * v:.0f}%"  # noqa: E731
    out.append(_target("LayerNorm fwd, share of device copy bandwidth", ">= 80%",
                       frac_of_copy("layer_norm", "fwd"), 0.8, missing_reason=why, fmt=pct))
    out.append(_target("LayerNorm bwd, share of device copy bandwidth", ">= 50%",
                       frac_of_copy("layer_norm", "bwd"), 0.5, missing_reason=why, fmt=pct))
    for mode in ("fwd", "bwd"):
        vals = [(c, speedup(idx, ("layer_norm", c, mode, "eager"), ("layer_norm", c, mode, tri)))
                for c in _cases(records, "layer_norm")]
        out.append(_target(f"LayerNorm {mode} time, triton vs PyTorch eager, every width", ">= 1.0x", vals, 1.0,
                           missing_reason=why))
    out.append(_target("embedding-add fwd, share of device copy bandwidth", ">= 80%",
                       frac_of_copy("embedding_add", "fwd"), 0.8, missing_reason=why, fmt=pct))
    vals = [(c, speedup(idx, ("embedding_add", c, "bwd", "eager"), ("embedding_add", c, "bwd", tri)))
            for c in _cases(records, "embedding_add")]
    out.append(_target("embedding-add bwd time, triton vs PyTorch eager", "> 1.0x", vals, 1.0, strict=True,
                       missing_reason=why))

    att = [r for r in records if r["group"] == "attention"]
    shape_of = {r["case"]: r["shape"] for r in att}
    big = [c for c in _cases(records, "attention")
           if shape_of[c]["D"] in (64, 128) and shape_of[c]["T"] >= 1024 and shape_of[c]["causal"]]
    vals = [(c, speedup(idx, ("attention", c, "fwd+bwd", "sdpa-flash"), ("attention", c, "fwd+bwd", tri)))
            for c in big]
    out.append(_target("attention fwd+bwd time, triton vs SDPA flash, D 64/128, T >= 1024, causal", ">= 1.0x",
                       vals, 1.0, missing_reason=why))
    refused = []
    for c in _cases(records, "attention"):
        fused = [r for r in att if r["case"] == c and r["mode"] == "fwd+bwd"
                 and r["provider"] in ("sdpa-flash", "sdpa-efficient", "sdpa-cudnn")]
        if fused and all(str(r.get("status", "")).startswith("unsupported") for r in fused):
            refused.append(c)
    vals = []
    for c in refused:
        pt = [idx[k]["median_s"] for k in idx if k[0] == "attention" and k[1] == c and k[2] == "fwd+bwd"
              and k[3] in PYTORCH_PROVIDERS]
        t = idx.get(("attention", c, "fwd+bwd", tri))
        vals.append((c, min(pt) / t["median_s"] if pt and t else None))
    out.append(_target("attention fwd+bwd time, triton vs fastest PyTorch path where the fused kernels refuse",
                       ">= 2.0x", vals, 2.0,
                       missing_reason=why if refused else "no head dim refused by every fused SDPA kernel"))

    def best(case, providers):
        rs = [idx.get(("training", case, "step", p)) for p in providers]
        rs = [r for r in rs if r]
        return max(rs, key=lambda r: r["tokens_per_s"]) if rs else None

    g = best("gpt2", ("auto", "compile-auto"))
    base = idx.get(("training", "gpt2", "step", "compile-plain"))
    v = g["tokens_per_s"] / base["tokens_per_s"] if g and base else None
    out.append(_target("GPT-2 small training tokens/s, barkgpt (best of auto, compile-auto) vs torch.compile "
                       "of a plain PyTorch GPT", ">= 1.1x",
                       [(f"gpt2 ({g['provider']})" if g else "gpt2", v)], 1.1))
    out.append(_target("GPT-2 small training MFU (best barkgpt provider)", ">= 45%",
                       [("gpt2", g.get("mfu") if g else None)], 0.45, fmt=pct,
                       missing_reason="no peak for this device" if g else "not measured"))
    vals = []
    for c in ("bark-tiny", "bark"):
        b = best(c, ("auto", "compile-auto", "cudagraph-auto"))
        t = idx.get(("training", c, "step", "torch"))
        vals.append((f"{c} ({b['provider']})" if b else c, b["tokens_per_s"] / t["tokens_per_s"] if b and t else None))
    out.append(_target("tiny bark configs training tokens/s, barkgpt best vs barkgpt on its PyTorch backend "
                       "(eager)", ">= 3.0x",
                       vals, 3.0))
    return out


# ---- markdown --------------------------------------------------------------------------------

def _meta_lines(meta) -> List[str]:
    lines = [f"- device: **{meta['device_name']}** ({meta['device_type']}, kind `{meta['kind']}`)",
             f"- CPU: {meta['cpu_model']}, {meta['cpu_count']} cores, torch threads {meta['torch_threads']}"]
    if meta.get("gpu_name"):
        lines.append(f"- GPU: {meta['gpu_name']}")
    lines += [f"- torch {meta['torch']}, triton {meta['triton']}, Python {meta['python']}",
              f"- date (UTC): {meta['date']}; git commit {meta['git_commit']}",
              f"- command: `{meta['command']}`",
              f"- size `{meta['size']}`, dtype {meta['dtype']}, last-level cache {meta['cache_bytes'] >> 20} MiB "
              f"(inputs rotated over 2x that), load average {meta['loadavg_start']} at start, "
              f"{meta['loadavg_end']} at end; other processes used {meta.get('other_processes_cores')} "
              f"cores on average during the run",
              "- barkgpt backends: " + ", ".join(f"{k}: {v}" for k, v in meta["backends"].items()),
              f"- timing: median of rounds after warm-up (compile/autotune excluded), "
              f"{'CUDA-synchronized clock' if meta['device_type'] == 'cuda' else 'perf_counter'}; "
              f"pytest exit status {meta.get('exitstatus')}, failed: {meta.get('failed') or 'none'}"]
    busy = meta.get("busy")
    if busy:
        lines.append(f"- **the machine was busy: {busy}; timings from a loaded machine are unreliable**")
    if meta.get("budget_skipped"):
        lines.append(f"- **{meta['budget_skipped']} benchmark(s) skipped: time budget spent**")
    return lines


def _op_table(records, idx, group, mode, device_type) -> List[str]:
    cases = _cases(records, group)
    provs = _providers(records, group)
    base = "sdpa" if group == "attention" else "eager"
    ours = [p for p in provs if p.startswith("barkgpt-") and p != "barkgpt-torch"]
    unit = "TFLOP/s" if group in FLOP_GROUPS else "GB/s"
    head = ["case"] + provs + [f"{p.split('-', 1)[1]}/{base}" for p in ours]
    if group == "attention":
        head += [f"{p.split('-', 1)[1]}/best PyTorch" for p in ours]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rec_any = {(r["case"], r["mode"], r["provider"]): r for r in records if r["group"] == group}
    for c in cases:
        row = [c]
        for p in provs:
            r = idx.get((group, c, mode, p))
            if r is None:
                st = rec_any.get((c, mode, p), {}).get("status", "-")
                row.append("unsupported" if str(st).startswith("unsupported") else
                           "skipped" if str(st).startswith("skipped") else "-")
                continue
            rate = r.get("tflops") if group in FLOP_GROUPS else r.get("gbps")
            cell = f"{fmt_time(r['median_s'])} ({_num(rate, 2 if group in FLOP_GROUPS else 1)} {unit})"
            if device_type == "cuda" and r.get("peak_mem_mb") is not None:
                cell += f", {r['peak_mem_mb']:.0f} MB"
            if (r.get("faults_per_call") or 0) >= 1:
                cell += f", {r['faults_per_call']:.0f} page faults/call"
            row.append(cell)
        for p in ours:
            row.append(fmt_ratio(speedup(idx, (group, c, mode, base), (group, c, mode, p))))
        if group == "attention":
            for p in ours:
                pt = [idx[k]["median_s"] for k in idx if k[:3] == (group, c, mode) and k[3] in PYTORCH_PROVIDERS]
                t = idx.get((group, c, mode, p))
                row.append(fmt_ratio(min(pt) / t["median_s"] if pt and t else None))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _memory_table(records, group) -> List[str]:
    """Extra memory per provider (records with mode "memory"), and each as a fraction of eager's."""
    mem = [r for r in records if r["group"] == group and r.get("mode") == "memory" and "extra_mb" in r]
    if not mem:
        return []
    provs = list(OrderedDict.fromkeys(r["provider"] for r in mem))
    by = {(r["case"], r["provider"]): r for r in mem}
    lines = ["### extra memory (MB; fraction of eager's)", "", f"Measured as: {mem[0]['how']}.", "",
             "| case | " + " | ".join(provs) + " |", "|" + "---|" * (len(provs) + 1)]
    for c in OrderedDict.fromkeys(r["case"] for r in mem):
        eager = by.get((c, "eager"), {}).get("extra_mb")
        cells = []
        for p in provs:
            r = by.get((c, p))
            if r is None:
                cells.append("-")
                continue
            frac = f" ({r['extra_mb'] / eager:.3f})" if eager and eager > 0 else ""
            cells.append(f"{r['extra_mb']:.1f}{frac}")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return lines + [""]


def _training_table(records, idx, meta) -> List[str]:
    cases = _cases(records, "training")
    provs = _providers(records, "training")
    ratio_cols = [("auto", "compile-plain"), ("compile-auto", "compile-plain"), ("auto", "plain"),
                  ("auto", "torch"), ("compile-torch", "torch"), ("compile-auto", "torch"),
                  ("auto", "compile-torch"), ("compile-auto", "compile-torch"), ("cudagraph-auto", "torch")]
    ratio_cols = [rc for rc in ratio_cols if rc[0] in provs and rc[1] in provs]
    head = ["config (B x T)"] + provs + [f"{a}/{b}" for a, b in ratio_cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    shapes = {r["case"]: r["shape"] for r in records if r["group"] == "training"}
    for c in cases:
        s = shapes[c]
        row = [f"{c} ({s['B']} x {s['T']})"]
        for p in provs:
            r = idx.get(("training", c, "step", p))
            if r is None:
                row.append("-")
                continue
            extra = [f"{fmt_time(r['median_s'])}/step"]
            if r.get("mfu") is not None:
                extra.append(f"MFU {100 * r['mfu']:.1f}%")
            if r.get("peak_mem_mb") is not None:
                extra.append(f"{r['peak_mem_mb']:.0f} MB")
            row.append(f"{_num(r['tokens_per_s'])} tok/s ({', '.join(extra)})")
        for a, b in ratio_cols:
            row.append(fmt_ratio(speedup(idx, ("training", c, "step", b), ("training", c, "step", a))))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def markdown(records, meta, targets) -> str:
    idx = _index(records)
    L = [f"# barkgpt benchmarks: {meta['device_name']} ({meta['size']})", ""]
    L += _meta_lines(meta) + [""]
    L += ["## Targets (same-run ratios)", "",
          "What the project aims for on this kind of device; a target not met is a finding of this run, "
          "not a failed test.", "",
          "| target | needs | measured | result |", "|---|---|---|---|"]
    for t in targets:
        L.append(f"| {t['target']} | {t['needs']} | {t['measured']} | **{t['result']}** |")
    if meta["device_type"] == "cuda" and "H100" not in meta["device_name"]:
        L += ["", f"The GPU targets are stated for an H100; this run is on {meta['device_name']}."]
    L.append("")
    copy = [r for r in _ok(records) if r["group"] == "copy"]
    if copy:
        L += [f"Device copy bandwidth ({BYTE_MODELS['copy']}): " +
              ", ".join(f"{r['gbps']:.1f} GB/s ({r['case']})" for r in copy), ""]
    titles = {"layer_norm": "LayerNorm", "embedding_add": "Embedding-add (token + position)",
              "attention": "Attention", "linear_cross_entropy": "Linear + cross-entropy (LM head + loss)"}
    for group in OP_GROUPS:
        if not any(r["group"] == group for r in records):
            continue
        L += [f"## {titles[group]}", "", f"Model: {BYTE_MODELS[group]}. Cells: median time per call "
              f"({'TFLOP/s' if group in FLOP_GROUPS else 'GB/s'}" +
              (", peak extra memory" if meta["device_type"] == "cuda" else
               ", minor page faults per call where there were any (fwd and fwd+bwd)") +
              "); ratio columns: speed-up (> 1 is faster).", ""]
        for mode in MODES:
            if any(r["group"] == group and r["mode"] == mode for r in records):
                L += [f"### {mode}", ""] + _op_table(records, idx, group, mode, meta["device_type"]) + [""]
        L += _memory_table(records, group)
    if any(r["group"] == "training" for r in records):
        has_mfu = any(r.get("mfu") is not None for r in _ok(records) if r["group"] == "training")
        measured = any(r.get("peak_source") == "measured" for r in _ok(records) if r["group"] == "training")
        L += ["## Training step (forward + backward + AdamW)", "",
              f"Providers: auto = barkgpt's model on the `{meta.get('auto_backend')}` backend (what `barkgpt "
              "train` runs here by default); torch = barkgpt's model on its pure-PyTorch backend; plain = a "
              "plain PyTorch GPT with the same weights (nn.LayerNorm, F.scaled_dot_product_attention, "
              "nn.Embedding; benchmarks/_plain_gpt.py); compile-X = torch.compile of X. compile-plain is "
              "what a user would otherwise run. MFU = flops_per_token x "
              "tokens/s / " + ("the fp32 matmul peak measured on this CPU (barkgpt.perf.measured_cpu_peak)"
                               if measured else "peak from the barkgpt.perf table") +
              ("" if has_mfu else " (n/a here: no peak is known for this device)") +
              (". Cells: tokens/s (time per step, MFU, peak memory)" if meta["device_type"] == "cuda"
               else ". Cells: tokens/s (time per step, MFU)") + "; ratio columns: tokens/s speed-up.", ""]
        L += _training_table(records, idx, meta) + [""]
        L += [f"- {line}" for line in _versus_plain(idx, records)] + [""]
    return "\n".join(L)


def _versus_plain(idx, records) -> List[str]:
    """One sentence per config: barkgpt's default and compiled steps against torch.compile'd plain PyTorch."""
    out = []
    for c in _cases(records, "training"):
        eager = speedup(idx, ("training", c, "step", "compile-plain"), ("training", c, "step", "auto"))
        comp = speedup(idx, ("training", c, "step", "compile-plain"), ("training", c, "step", "compile-auto"))
        if eager is None:
            continue
        line = (f"{c}: barkgpt's default (eager) step runs at {eager:.2f}x the tokens/s of torch.compile'd "
                f"plain PyTorch")
        if comp is not None:
            line += f"; torch.compile'd barkgpt at {comp:.2f}x"
        out.append(line)
    return out


# ---- chart and terminal summary --------------------------------------------------------------

# One colour per kind of provider, the same in every panel: barkgpt's kernels blue, barkgpt's
# PyTorch backend orange, PyTorch eager grey, torch.compile of PyTorch green, compiled barkgpt
# purple, scaled_dot_product_attention variants reds.
COLOURS = {
    "barkgpt-cpp": "#1f77b4", "barkgpt-triton": "#1f77b4", "auto": "#1f77b4",
    "barkgpt-torch": "#ff7f0e", "torch": "#ff7f0e",
    "eager": "#7f7f7f", "plain": "#7f7f7f",
    "compile": "#2ca02c", "compile-plain": "#2ca02c",
    "compile-auto": "#9467bd", "compile-torch": "#e6ab02", "cudagraph-auto": "#17becf",
    "cudagraph-torch": "#bcbd22",
    "sdpa": "#d62728", "sdpa-flash": "#d62728", "sdpa-efficient": "#e377c2", "sdpa-cudnn": "#8c564b",
    "sdpa-math": "#f7b6d2",
}
LABELS = {
    "auto": "barkgpt (default backend)", "torch": "barkgpt, PyTorch backend", "plain": "plain PyTorch",
    "compile-plain": "torch.compile(plain PyTorch)", "compile-auto": "torch.compile(barkgpt)",
    "compile-torch": "torch.compile(barkgpt, PyTorch backend)", "eager": "PyTorch eager",
    "compile": "torch.compile(PyTorch eager)",
}
BASE_NAMES = {"eager": "PyTorch eager", "sdpa": "F.scaled_dot_product_attention",
              "compile-plain": "torch.compile of plain PyTorch", "torch": "barkgpt's PyTorch backend"}


def panels(records) -> List[Tuple[str, str, str, str, List[str], List[str]]]:
    """(title, group, mode, baseline, cases, providers) of each speed-up panel, chart and terminal alike."""
    idx = _index(records)
    out = []
    titles = {"layer_norm": "LayerNorm", "embedding_add": "embedding-add", "attention": "attention"}
    for group, base in (("layer_norm", "eager"), ("embedding_add", "eager"), ("attention", "sdpa")):
        provs = [p for p in _providers(records, group) if p != base]
        cases = [c for c in _cases(records, group) if (group, c, "fwd+bwd", base) in idx]
        if cases and provs:
            out.append((f"{titles[group]} fwd+bwd time: speed-up over {BASE_NAMES[base]}", group, "fwd+bwd", base,
                        cases, provs))
    cases = _cases(records, "training")
    base = next((b for b in ("compile-plain", "torch") if any(("training", c, "step", b) in idx for c in cases)),
                None)
    if base:
        provs = [p for p in _providers(records, "training") if p != base]
        cases = [c for c in cases if ("training", c, "step", base) in idx]
        if cases and provs:
            out.append((f"training tokens/s: speed-up over {BASE_NAMES[base]}", "training", "step", base, cases,
                        provs))
    return out


def _ticks(lo: float, hi: float) -> List[float]:
    """Labelled y ticks for a log axis spanning [lo, hi]: the finest of a few ladders that gives at
    most 8, so a panel whose bars all lie within 1.4x of the baseline still has labels above 1x."""
    ladders = [
        [0.5, 0.6, 0.7, 0.8, 0.9, 1, 1.1, 1.2, 1.3, 1.4, 1.6, 1.8, 2],
        [0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 1, 1.2, 1.5, 2, 3, 5, 7, 10],
        [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500],
        [0.001, 0.01, 0.1, 1, 10, 100, 1000],
    ]
    for ladder in ladders:
        ticks = [t for t in ladder if lo <= t <= hi]
        if ticks and ladder[0] <= lo and hi <= ladder[-1] and len(ticks) <= 8:
            return ticks
    return [t for t in ladders[-1] if lo <= t <= hi] or [1]


def chart(records, meta, path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator
    except Exception:  # matplotlib missing: JSON and Markdown still written
        return False
    idx = _index(records)
    ps = panels(records)
    if not ps:
        return False
    fig, axes = plt.subplots(len(ps), 1, figsize=(14, 3.9 * len(ps)), squeeze=False)
    for ax, (title, group, mode, base, cases, provs) in zip(axes[:, 0], ps):
        width = 0.8 / len(provs)
        values = []
        for j, p in enumerate(provs):
            ys = [speedup(idx, (group, c, mode, base), (group, c, mode, p)) for c in cases]
            xs = [i + (j - (len(provs) - 1) / 2) * width for i in range(len(cases))]
            pts = [(x, y) for x, y in zip(xs, ys) if y]
            values += [y for _, y in pts]
            # bars grow from 1.0 (the baseline) up or down; the value is printed at the bar's end
            bars = ax.bar([x for x, _ in pts], [y - 1.0 for _, y in pts], width, bottom=1.0,
                          label=LABELS.get(p, p), color=COLOURS.get(p))
            for bar, (_, y) in zip(bars, pts):
                ax.annotate(f"{y:.2f}", (bar.get_x() + bar.get_width() / 2, y), xytext=(0, 2 if y >= 1 else -2),
                            textcoords="offset points", ha="center", va="bottom" if y >= 1 else "top",
                            fontsize=6 if len(provs) > 3 else 7)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        lo, hi = min(values + [1.0]) / 1.25, max(values + [1.0]) * 1.25
        ax.set_ylim(lo, hi)
        ax.yaxis.set_major_locator(FixedLocator(_ticks(lo, hi)))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}x"))
        ax.grid(axis="y", linewidth=0.3, alpha=0.6)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([c.replace(" ", "\n", 1) if len(c) > 18 else c for c in cases], fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("speed-up (x, log scale)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0))  # beside the bars, never on them
    fig.suptitle(f"barkgpt benchmarks on {meta['device_name']} ({meta['date'][:10]}, torch {meta['torch']}); "
                 f"> 1x: faster than the baseline", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def summary(records, meta) -> List[str]:
    """The terminal summary: one table of same-run speed-ups per panel, at most ~100 columns wide."""
    idx = _index(records)
    lines = []
    for title, group, mode, base, cases, provs in panels(records):
        names = list(provs)
        wc = max([len(c) for c in cases] + [4])
        widths = [max(len(n), 6) for n in names]
        lines += ["", title + " (> 1 is faster)",
                  "  " + "case".ljust(wc) + "  " + "  ".join(n.rjust(w) for n, w in zip(names, widths))]
        for c in cases:
            cells = [fmt_ratio(speedup(idx, (group, c, mode, base), (group, c, mode, p))) for p in provs]
            lines.append("  " + c.ljust(wc) + "  " + "  ".join(x.rjust(w) for x, w in zip(cells, widths)))
        if group == "training":
            import textwrap

            legend = "; ".join(f"{p} = {LABELS[p]}" for p in [base] + provs if p in LABELS)
            lines += textwrap.wrap(legend, 98, initial_indent="  ", subsequent_indent="  ")
    return lines


def write(records, meta, out_dir, stem) -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    targets = evaluate_targets(records, meta)
    base = os.path.join(out_dir, stem)
    with open(base + ".json", "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "byte_models": BYTE_MODELS, "targets": targets, "records": records}, f,
                  indent=1, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o))
        f.write("\n")
    with open(base + ".md", "w", encoding="utf-8") as f:
        f.write(markdown(records, meta, targets) + "\n")
    paths = [base + ".json", base + ".md"]
    if chart(records, meta, base + ".png"):
        paths.append(base + ".png")
    return paths


if __name__ == "__main__":  # re-render the Markdown and PNG of a results JSON: python _report.py results/x.json
    import sys

    for path in sys.argv[1:]:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        stem = os.path.splitext(os.path.basename(path))[0]
        print(" ".join(write(data["records"], data["meta"], os.path.dirname(path) or ".", stem)))
