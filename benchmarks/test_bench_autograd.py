"""What the cpp backend's C++ autograd fast path (csrc/autograd.cpp) buys on the presets' training step.

Eager calls of the cpp ops go through barkgpt_cpp::layer_norm/attention/embedding_add, whose
autograd nodes are C++; without them the same kernel ops run with the autograd wired from the op
declarations in Python (torch.library.register_autograd), the route torch.compile uses. Both give
the same bits (tests/test_ops.py); this times one training step (forward, backward, AdamW) of each
preset both ways, in the same run, and reports the ratio. CPU only (the fast path is the cpp
backend's).

    python -m pytest benchmarks/test_bench_autograd.py            # pytest-benchmark tables
    python benchmarks/test_bench_autograd.py [--steps N]          # medians and ratios, one line each

Time it on a quiet machine: the ratio is what matters, the absolute times are the machine's.
"""

import contextlib
import dataclasses
import statistics
import sys
import time

import pytest
import torch

from barkgpt import BarkGPT, GPTConfig, ops, registry

# (preset, batch size, sequence length): the training benchmark's CPU shapes
CASES = [("bark-tiny", 64, 32), ("bark", 64, 32), ("bark-article", 64, 256), ("small", 32, 128)]
ROUTES = ("cpp-fast-path", "cpp-declared-autograd")

pytestmark = pytest.mark.skipif(ops.unavailable_reason("cpp", "cpu") is not None,
                                reason="the cpp backend is unavailable here")


@contextlib.contextmanager
def route(name):
    """Run the cpp ops with (``cpp-fast-path``) or without (``cpp-declared-autograd``) the C++
    autograd fast path."""
    if name == "cpp-fast-path":
        yield
        return
    saved = {}
    for op in registry.OPS:
        impl = registry.implementation(op, "cpp")
        if impl is not None and impl.eager is not None:
            saved[op] = impl
            registry.register_impl(dataclasses.replace(impl, call=impl.declared_call(), eager=None))
    try:
        yield
    finally:
        for impl in saved.values():
            registry.register_impl(impl)


def make_step(preset, batch, seq):
    torch.manual_seed(0)
    config = GPTConfig.preset(preset)
    model = BarkGPT(config, backend="cpp")
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3, device_type="cpu")
    seq = min(seq, config.block_size)
    idx = torch.randint(0, config.vocab_size, (batch, seq))
    tgt = torch.randint(0, config.vocab_size, (batch, seq))

    def step():
        _, loss = model(idx, tgt)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


@pytest.mark.parametrize("route_name", ROUTES)
@pytest.mark.parametrize("preset, batch, seq", CASES, ids=[c[0] for c in CASES])
def test_train_step(benchmark, preset, batch, seq, route_name):
    benchmark.group = f"cpp autograd route: {preset} train step (B={batch}, T={seq})"
    with route(route_name):
        step = make_step(preset, batch, seq)
        for _ in range(3):  # warm up (output cache, allocator, first-call setup)
            step()
        benchmark.pedantic(step, rounds=10, iterations=1, warmup_rounds=1)


def main(argv):
    steps = int(argv[argv.index("--steps") + 1]) if "--steps" in argv else 20
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {steps} steps; "
          f"rounds alternate between the routes")
    for preset, batch, seq in CASES:
        steps_by_route = {}
        for name in ROUTES:
            with route(name):
                steps_by_route[name] = make_step(preset, batch, seq)
                for _ in range(3):
                    steps_by_route[name]()
        times = {name: [] for name in ROUTES}
        for _ in range(steps):
            for name in ROUTES:
                with route(name):
                    t0 = time.perf_counter()
                    steps_by_route[name]()
                    times[name].append(time.perf_counter() - t0)
        fast, slow = (statistics.median(times[n]) * 1e3 for n in ROUTES)
        print(f"{preset:13s} B={batch:3d} T={seq:4d}  fast path {fast:8.3f} ms   declared autograd "
              f"{slow:8.3f} ms   ratio {slow / fast:5.3f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
