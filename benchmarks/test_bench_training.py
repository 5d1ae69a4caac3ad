"""Training throughput per config: one step = forward + backward + AdamW step on a fresh batch.

Providers: "auto" (the backend barkgpt picks for the device: cpp on CPU, triton on CUDA),
"torch" (barkgpt's model on its pure-PyTorch backend), "compile-torch" (torch.compile of the
"torch" model), "compile-auto" (torch.compile of the auto model, when auto is not torch),
"plain" and "compile-plain" (a plain PyTorch GPT with the same weights, benchmarks/_plain_gpt.py,
eager and under torch.compile: what a user would otherwise run) and, on
CUDA for the tiny configs, "cudagraph-auto"/"cudagraph-torch" (the whole step captured once in a
CUDA graph and replayed). Reports tokens/s, MFU (model.flops_per_token over the device's peak from
barkgpt.perf; n/a where the peak is unknown, e.g. CPUs) and peak memory on CUDA.
"""

import contextlib
import gc

import pytest
import torch

import _bench as B
from _plain_gpt import plain_copy
from barkgpt import BarkGPT, GPTConfig, ops, perf


def _cases():
    """name -> (config, batch size, sequence length)."""
    cases = {}
    if B.IS_CUDA:  # the targets' configs first: a time budget cuts the last ones
        cases["gpt2"] = (GPTConfig.preset("gpt2"), 16, 1024)
    cases.update({
        "bark-tiny": (GPTConfig.preset("bark-tiny"), 64, 32),
        "bark": (GPTConfig.preset("bark"), 64, 32),
        "bark-article": (GPTConfig.preset("bark-article"), 64, 256),
        "small": (GPTConfig.preset("small"), 64 if B.IS_CUDA else 32, 128),
    })
    if B.IS_CUDA:
        # GPT-2 medium sized, the "larger one" for a GPU.
        cases["gpt2-medium"] = (GPTConfig.preset("gpt2", n_layer=24, n_head=16, n_embd=1024), 8, 1024)
    elif B.SIZE == "full":
        cases["gpt2"] = (GPTConfig.preset("gpt2"), 1, 256)  # a short sequence: a 2-core CPU is slow
    return cases


CASES = _cases()
TINY = ("bark-tiny", "bark")
AUTO = ops.resolve_backend(None, B.DEVICE)
TRAIN_MEASURE_S = 4 * B.MEASURE_S


def _providers(name):
    out = ["auto", "torch", "compile-torch", "plain", "compile-plain"]
    # compile-auto where a target needs it (GPU: GPT-2 and the tiny configs; compiles are minutes there)
    if AUTO != "torch" and (not B.IS_CUDA or name in ("gpt2",) + TINY):
        out.append("compile-auto")
    if B.IS_CUDA and name in TINY:
        out += ["cudagraph-auto", "cudagraph-torch"]
    return out


PARAMS = [(name, p) for name in CASES for p in _providers(name)]
_ref_loss = {}


def _amp(cache_enabled=True):
    if B.IS_CUDA and B.DTYPE != torch.float32:
        return torch.autocast("cuda", dtype=B.DTYPE, cache_enabled=cache_enabled)
    return contextlib.nullcontext()


def _batches(cfg, bsz, T, n=8):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.randint(0, cfg.vocab_size, (bsz, T + 1), generator=g)
        out.append((x[:, :-1].contiguous().to(B.DEVICE), x[:, 1:].contiguous().to(B.DEVICE)))
    return out


def _model(cfg, backend):
    torch.manual_seed(1234)  # every provider starts from the same weights
    return BarkGPT(cfg, backend=backend).to(B.DEVICE)


def _initial_loss(model, batch):
    with torch.no_grad(), _amp():
        return float(model(*batch)[1])


def _reference_loss(name, cfg, batch):
    if name not in _ref_loss:
        _ref_loss[name] = _initial_loss(_model(cfg, "torch"), batch)
    return _ref_loss[name]


@pytest.fixture
def free_memory():
    yield
    gc.collect()  # models, optimizer states and graphs of GPT-2 sized cases are gigabytes
    if B.IS_CUDA:
        torch.cuda.empty_cache()


# CUDA-graph captures run last: a capture that fails can leave the device in a state that would
# spoil the cases after it.
@pytest.mark.parametrize("name, provider", [pytest.param(n, p, marks=pytest.mark.bench_priority(6))
                                            if p.startswith("cudagraph") else (n, p) for n, p in PARAMS],
                         ids=[f"{n}-{p}" for n, p in PARAMS])
def test_training_step(benchmark, free_memory, name, provider):
    cfg, bsz, T = CASES[name]
    backend = "torch" if provider.endswith("torch") else None
    resolved = "plain PyTorch" if provider.endswith("plain") else ops.resolve_backend(backend, B.DEVICE)
    rec = {"group": "training", "case": name, "provider": provider, "mode": "step", "backend": resolved,
           "shape": {"B": bsz, "T": T, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd,
                     "vocab_size": cfg.vocab_size},
           "dtype": str(B.DTYPE).replace("torch.", "") if B.IS_CUDA else "float32"}
    B.check_budget(rec)
    benchmark.group = f"training {name} B={bsz} T={T}"
    batches = _batches(cfg, bsz, T)
    model = _model(cfg, backend)
    fpt = model.flops_per_token(seq_len=T)
    if provider.endswith("plain"):
        model = plain_copy(model)
    model.train()

    # Correctness: the same weights give the reference loss on the first batch.
    ref = _reference_loss(name, cfg, batches[0])
    got = _initial_loss(model, batches[0])
    tol = 1e-4 if B.DTYPE == torch.float32 or not B.IS_CUDA else 2e-2
    assert abs(got - ref) <= tol * abs(ref), f"{provider}: initial loss {got} != torch backend's {ref}"

    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-4, device_type=B.DEVICE.type)
    pos = [0]

    def next_batch():
        i = pos[0]
        pos[0] = (i + 1) % len(batches)
        return batches[i]

    last = [None]  # the latest step's loss
    if provider.startswith("cudagraph"):
        step = _cudagraph_step(model, opt, batches, last)
    else:
        run = torch.compile(model) if provider.startswith("compile") else model

        def step():
            idx, tgt = next_batch()
            with _amp():
                _, loss = run(idx, tgt)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            last[0] = loss.detach()

    t0 = B.now()
    step()  # compiles / autotunes / allocates the optimizer state
    first_call_s = B.now() - t0
    mem = None
    if B.IS_CUDA:
        torch.cuda.reset_peak_memory_stats(B.DEVICE)
        step()
        torch.cuda.synchronize(B.DEVICE)
        mem = torch.cuda.max_memory_allocated(B.DEVICE) / 2**20
    timing = B.measure(benchmark, step, warm_calls=2, measure_s=TRAIN_MEASURE_S)
    assert last[0] is not None and bool(torch.isfinite(last[0])), f"{provider}: non-finite loss {last[0]}"
    med = timing.get("median_s")
    tokens = bsz * T
    peak = perf.peak_flops(device=B.DEVICE, dtype=B.DTYPE if B.IS_CUDA else torch.float32)
    rec.update(timing, status="ok", first_call_s=first_call_s, peak_mem_mb=mem, tokens=tokens,
               flops_per_token=fpt, peak_flops=peak, peak_source=perf.peak_source(B.DEVICE), initial_loss=got)
    if med:
        rec["tokens_per_s"] = tokens / med
        rec["mfu"] = perf.mfu(fpt, rec["tokens_per_s"], peak)
        benchmark.extra_info.update(tokens_per_s=rec["tokens_per_s"], mfu=rec["mfu"], peak_mem_mb=mem)
    B.add_record(rec)


def _cudagraph_step(model, opt, batches, last):
    """Capture forward + backward + optimizer step once; each call copies a batch in and replays."""
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in opt.param_groups]
    d = opt.defaults
    opt = torch.optim.AdamW(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"], fused=True, capturable=True)
    static_idx = batches[0][0].clone()
    static_tgt = batches[0][1].clone()

    def body():
        with _amp(cache_enabled=False):  # autocast's weight cache must be off under capture
            _, loss = model(static_idx, static_tgt)
        loss.backward()
        opt.step()
        return loss

    side = torch.cuda.Stream(B.DEVICE)
    side.wait_stream(torch.cuda.current_stream(B.DEVICE))
    with torch.cuda.stream(side):  # warm up outside the graph (allocator, optimizer state)
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            body()
    torch.cuda.current_stream(B.DEVICE).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = body()
    pos = [0]

    def step():
        idx, tgt = batches[pos[0]]
        pos[0] = (pos[0] + 1) % len(batches)
        static_idx.copy_(idx)
        static_tgt.copy_(tgt)
        graph.replay()
        last[0] = static_loss

    return step
