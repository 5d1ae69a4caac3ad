// Matrix products for the CPU kernels: out = beta * out + a @ b.
//
// ATen's fp32 matmul on CPU goes to MKL's sgemm. MKL picks its code path by CPU vendor and takes
// its AVX2 path on AMD processors, while oneDNN (also inside libtorch) uses AVX-512 wherever the
// CPU has it: on the Zen 5 machine this project is developed on, oneDNN's fp32 GEMM ran at about
// twice MKL's speed for every shape the model uses (benchmarks/results/, gemm_bench.py). So fp32
// products go through oneDNN when it can run them, and through ATen otherwise.
//
// oneDNN is reached through libtorch's `at::native::mkldnn_matmul`, the function ATen itself uses
// for its reduced-precision matmuls. It is exported but not in the shipped headers, so it is
// declared here as a weak symbol: a libtorch without it (or with another signature) leaves the
// pointer null and everything goes to ATen. Its precision is torch's own setting
// (torch.backends.mkldnn / set_float32_matmul_precision): full fp32 by default, like at::mm.
//
// Products of at most 8 rows against a transposed row-major matrix (F.linear's x @ w^T at decode
// time) go to barkgpt's own few-row kernel instead, which streams w once at memory speed.
//
// Choice: gemm_set_library("auto" | "onednn" | "aten"); barkgpt/_cpp.py applies the environment
// variable BARKGPT_CPU_GEMM with it when it loads the library. "auto" (the default) uses oneDNN
// when it is present and a probe product on first use runs and is right. "aten" sends every
// product to ATen, the few-row ones too.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace barkgpt {

// out = beta * out + a @ b for 2-D CPU tensors of one floating dtype; out must not overlap a or
// b. beta is 0 or 1 (with beta 0, out's old contents are ignored, NaN included).
void gemm_out(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta = 0.0);

// "onednn" or "aten": the library fp32 products go to now.
std::string gemm_library();

// Whether fp32 products of at most 8 rows against a transposed row-major matrix go to the
// few-row kernel (false only after gemm_set_library("aten")). barkgpt.ops.head_topk_logits
// recomputes head rows exactly only where the full head would take that kernel.
bool gemm_few_rows();

// Sets the choice ("auto", "onednn" or "aten") and returns the library now in use. "onednn"
// raises if oneDNN cannot run here.
std::string gemm_set_library(c10::string_view choice);

}  // namespace barkgpt
