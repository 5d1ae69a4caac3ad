"""Generation speed: barkgpt with its KV cache against transformers' GPT2LMHeadModel.generate and
against barkgpt's uncached path, same process, same weights (random, built locally: no network).

    python benchmarks/bench_generate.py [--size small|full] [--device cpu|cuda] [--batch 1 8]
                                        [--out benchmarks/results]

``full`` is the issue's setting: GPT-2 small's shape (12 layers, 12 heads, 768 wide, vocab 50257,
block 1024), prompt 16, 256 new tokens, greedy, batch 1 and 8; targets: cached >= 1.5x
transformers and >= 10x uncached (decode tokens/s). ``small`` (default: a quick check) keeps
GPT-2's widths and vocabulary with 2 layers and 32 new tokens. Each figure is the median of
``--reps`` timed calls after one warm-up call; tokens/s counts every generated token of the
batch (B * new tokens) over the whole generate call (prefill included). Before timing, the first
step's logits of all three are compared (same weights) and the greedy tokens of the cached and
uncached paths and of transformers are compared; the agreement is reported (random weights give
near-flat distributions, where a 1e-6 difference may flip a near tie late in a sequence).
On CPU each row also gives the model's fp32 weight bytes times the new tokens over the call's
time (a plain batch-1 step reads every weight once; with the screened head of greedy / top-k
decoding the head is read at a quarter of its size (int8; half where the screen moved to fp16),
so the bytes really read are up to 23% (15%) fewer at GPT-2's shape) and, next to it, the machine's memory read rate measured in the same process just before
(the sum of a 512 MiB tensor, best of 5). The cached path's speed follows that rate; on a shared
VM it moved between 40 and 75 GB/s within an hour. Writes generate-<device>-<size>.{json,md} into --out. Runs under pytest too
(benchmarks/test_bench_generate.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Dict, List

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {
    "small": dict(n_layer=2, new_tokens=32, reps=3),
    "full": dict(n_layer=12, new_tokens=256, reps=3),
}
PROMPT = 16


def import_transformers():
    """transformers without it importing the checkout's kernels/ as a top-level package (its probe
    for the PyPI ``kernels`` finds the folder when the repository root is on sys.path)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    if "kernels" not in sys.modules:
        spec = importlib.util.find_spec("kernels")
        if spec is not None and spec.origin and os.path.dirname(os.path.dirname(os.path.abspath(spec.origin))) == REPO:
            sys.modules["kernels"] = None
    import transformers
    transformers.logging.set_verbosity_error()
    return transformers


def build_models(n_layer: int, device: str, backend=None):
    """A random GPT-2-shaped BarkGPT and the same weights in a transformers GPT2LMHeadModel."""
    from barkgpt import BarkGPT, GPTConfig
    from barkgpt.hf import config_to_hf, state_dict_to_hf

    try:
        transformers = import_transformers()
    except ImportError:  # a machine without transformers still compares cached with uncached
        transformers = None
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50257, block_size=1024, n_layer=n_layer, n_head=12, n_embd=768,
                    activation="gelu_tanh", tie_embeddings=True)
    bark = BarkGPT(cfg, backend=backend).eval()
    if transformers is None:
        return bark.to(device), None
    hf_cfg = {k: v for k, v in config_to_hf(cfg).items() if k not in ("architectures", "model_type", "dtype")}
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_cfg))
    missing, unexpected = hf.load_state_dict(state_dict_to_hf(bark), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" and not k.endswith(".attn.bias")
               and not k.endswith(".attn.masked_bias")]
    if missing or unexpected:
        raise RuntimeError(f"weights did not map: missing {missing[:4]}, unexpected {unexpected[:4]}")
    hf.tie_weights()
    return bark.to(device), hf.to(device).eval()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_time(fn, reps: int, device: str) -> float:
    fn()  # warm-up (allocations, Triton compilation, C++ kernel load)
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def memory_read_gbs(mib: int = 512, reps: int = 5) -> float:
    """GB/s of summing a ``mib`` MiB fp32 CPU tensor with torch's threads: best of ``reps``."""
    x = torch.ones(mib << 18)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def run(size: str = "small", device: str = "cpu", batches=(1, 8), reps=None, uncached_batches=None) -> Dict[str, Any]:
    p = SIZES[size]
    reps = reps or p["reps"]
    n = p["new_tokens"]
    bark, hf = build_models(p["n_layer"], device)
    out: Dict[str, Any] = {
        "size": size, "device_type": torch.device(device).type, "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or platform.machine(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "n_layer": p["n_layer"],
        "prompt": PROMPT, "new_tokens": n, "backend": bark.resolved_backend(), "reps": reps, "rows": [],
    }
    try:
        out["transformers"] = import_transformers().__version__
    except Exception:  # pragma: no cover
        pass
    gen = torch.Generator().manual_seed(1)
    for B in batches:
        idx = torch.randint(0, 50257, (B, PROMPT), generator=gen).to(device)
        with torch.no_grad():  # same weights: the prompt's last logits agree
            lb = bark(idx)[:, -1].float()
            lh = hf(idx).logits[:, -1].float() if hf is not None else lb
        logit_err = (lb - lh).abs().max().item()
        if logit_err > 1e-3:
            raise RuntimeError(f"barkgpt and transformers disagree on the prompt's logits by {logit_err:.3g}")
        mask = torch.ones_like(idx)

        def cached():
            return bark.generate(idx, n, greedy=True)

        def uncached():
            return bark.generate(idx, n, greedy=True, use_cache=False)

        def transformers_generate():
            with torch.no_grad():
                return hf.generate(idx, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                   pad_token_id=0, eos_token_id=None)

        toks_c = cached()
        row: Dict[str, Any] = {"batch": B}
        if not device.startswith("cuda"):
            row["memory_read_gbs"] = memory_read_gbs()
        t_c = _median_time(cached, reps, device)
        row.update(cached_tok_s=B * n / t_c)
        if not device.startswith("cuda"):
            weight_bytes = sum(p.numel() * p.element_size() for p in bark.parameters())
            row["cached_weight_gbs"] = weight_bytes * n / t_c / 1e9
        if hf is not None:
            toks_h = transformers_generate()
            t_h = _median_time(transformers_generate, reps, device)
            row.update(prompt_logits_max_diff=logit_err,
                       tokens_equal_transformers=float((toks_c == toks_h).float().mean()),
                       transformers_tok_s=B * n / t_h, vs_transformers=t_h / t_c)
        if uncached_batches is None or B in uncached_batches:
            toks_u = uncached()
            row["tokens_equal_uncached"] = float((toks_c == toks_u).float().mean())
            t_u = _median_time(uncached, 1, device)  # the slow path: one timed call
            row.update(uncached_tok_s=B * n / t_u, vs_uncached=t_u / t_c)
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    return out


def write(result: Dict[str, Any], folder: str) -> str:
    os.makedirs(folder, exist_ok=True)
    base = os.path.join(folder, f"generate-{result['device_type']}-{result['size']}")
    with open(base + ".json", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    lines = [f"# Generation, {result['size']} ({result['n_layer']} layers, prompt {result['prompt']}, "
             f"{result['new_tokens']} new tokens, greedy, fp32)", "",
             f"{result['device']}, torch {result['torch']}, transformers {result.get('transformers', '?')}, "
             f"{result['threads']} threads, barkgpt backend {result['backend']}", "",
             "| batch | cached tok/s | transformers tok/s | x transformers (>= 1.5) | uncached tok/s | x uncached (>= 10) "
             "| tokens = transformers | tokens = uncached | fp32 weights x tokens / s, GB/s (memory read GB/s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    def f(r, key, fmt):
        return "-" if key not in r else fmt % r[key]

    for r in result["rows"]:
        lines.append(f"| {r['batch']} | {r['cached_tok_s']:.1f} | {f(r, 'transformers_tok_s', '%.1f')} | "
                     f"{f(r, 'vs_transformers', '%.2f')} | {f(r, 'uncached_tok_s', '%.2f')} | "
                     f"{f(r, 'vs_uncached', '%.1f')} | {f(r, 'tokens_equal_transformers', '%.3f')} | "
                     f"{f(r, 'tokens_equal_uncached', '%.3f')} | {f(r, 'cached_weight_gbs', '%.1f')} "
                     f"({f(r, 'memory_read_gbs', '%.1f')}) |")
    with open(base + ".md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return base


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--uncached-batch", type=int, nargs="*", default=None,
                    help="batches to time the uncached path for (default: all)")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    a = ap.parse_args(argv)
    res = run(a.size, a.device, a.batch, a.reps, a.uncached_batch)
    print("wrote", write(res, a.out) + ".{json,md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
