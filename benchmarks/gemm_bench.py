"""python benchmarks/gemm_bench.py [--threads N] [--reps R]

Where barkgpt's C++ kernels send their fp32 matrix products (csrc/gemm.h), timed on the products
the model and the fused loss make: "aten" is BARKGPT_CPU_GEMM=aten (every product to ATen: MKL's
sgemm), "barkgpt" the default routing (oneDNN from 2^24 multiply-adds, the few-row kernel for
<= 8 rows against a transposed weight, ATen below; the "path" column says which). Each line: the
product, the median time per call of each and the speed-up. Same process, interleaved per round.
Time it on a quiet machine."""
import argparse
import statistics
import time

import torch

from barkgpt import _cpp  # noqa: F401  (loads the C++ library and its ops)

# (name, m, k, n, a transposed, b transposed, beta): out(m, n) = beta * out + a @ b
SHAPES = [
    ("bark linear (B*T=2048, 32->96)", 2048, 32, 96, False, True, 0.0),
    ("bark head/LCE (2048, 32->9)", 2048, 32, 9, False, True, 0.0),
    ("small linear (4096, 128->512)", 4096, 128, 512, False, True, 0.0),
    ("small dW (512x128 from 4096 rows)", 512, 4096, 128, True, False, 1.0),
    ("gpt2 c_attn (2048, 768->2304)", 2048, 768, 2304, False, True, 0.0),
    ("gpt2 c_fc dx (2048, 3072->768)", 2048, 3072, 768, False, False, 0.0),
    ("gpt2 c_fc dW (3072x768 from 2048 rows)", 3072, 2048, 768, True, False, 1.0),
    ("LCE chunk logits (240, 768->50304)", 240, 768, 50304, False, True, 0.0),
    ("LCE chunk dx (240, 50304->768)", 240, 50304, 768, False, False, 0.0),
    ("LCE chunk dW (50304x768 from 240 rows)", 50304, 240, 768, True, False, 1.0),
    ("decode b1 c_attn (1, 768->2304)", 1, 768, 2304, False, True, 0.0),
    ("decode b1 mlp (1, 3072->768)", 1, 3072, 768, False, True, 0.0),
    ("decode b1 head (1, 768->50257)", 1, 768, 50257, False, True, 0.0),
    ("decode b8 c_fc (8, 768->3072)", 8, 768, 3072, False, True, 0.0),
    ("decode b8 head (8, 768->50257)", 8, 768, 50257, False, True, 0.0),
]


def operands(m, k, n, at, bt):
    a = torch.randn(k, m).t() if at else torch.randn(m, k)
    b = torch.randn(n, k).t() if bt else torch.randn(k, n)
    return a, b


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--reps", type=int, default=5, help="rounds (median)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    ops = torch.ops.barkgpt_cpp
    libs = ["aten", "auto"]
    print(f"torch {torch.__version__}, {a.threads} threads; auto picks {ops.gemm_set_library('auto')}")
    print(f"{'product':42s} {'aten':>10s} {'barkgpt':>10s} {'speed-up':>9s}  path")
    for name, m, k, n, at, bt, beta in SHAPES:
        x, w = operands(m, k, n, at, bt)
        out = torch.zeros(m, n)
        # enough calls per round for ~50 ms of work at 100 GFLOP/s
        calls = max(1, int(5e9 / max(1, 2 * m * n * k)))
        times = {lib: [] for lib in libs}
        for lib in libs:  # warm-up
            ops.gemm_set_library(lib)
            ops.gemm_out(out, x, w, beta)
        for _ in range(a.reps):
            for lib in libs:
                ops.gemm_set_library(lib)
                t0 = time.perf_counter()
                for _ in range(calls):
                    ops.gemm_out(out, x, w, beta)
                times[lib].append((time.perf_counter() - t0) / calls)
        med = {lib: statistics.median(v) for lib, v in times.items()}
        # mirrors gemm_out's routing (csrc/gemm.cpp), for the reader of the table
        path = ("few-row" if m <= 8 and bt else "oneDNN" if m * k * n >= 2 ** 24 else "ATen")
        print(f"{name:42s} {med['aten'] * 1e6:8.0f}us {med['auto'] * 1e6:8.0f}us "
              f"{med['aten'] / med['auto']:8.2f}x  {path}", flush=True)
    ops.gemm_set_library("auto")


if __name__ == "__main__":
    main()
