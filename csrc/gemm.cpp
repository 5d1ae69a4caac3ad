// See gemm.h: fp32 products through oneDNN when it can run them, through ATen otherwise.
#include "gemm.h"

#include "common.h"
#include "few_rows.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/allclose.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/randn.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <mutex>
#include <string>

#if defined(__linux__) && defined(__x86_64__)
namespace at {
namespace native {
// libtorch's oneDNN matmul (aten/src/ATen/native/mkldnn/Matmul.h): result = beta * result +
// alpha * mat1 @ mat2. Weak: null when this libtorch does not export it with this signature.
TORCH_API void mkldnn_matmul(const Tensor& mat1, const Tensor& mat2, const Tensor& result,
                             float beta, float alpha) __attribute__((weak));
}  // namespace native
}  // namespace at
#define BARKGPT_HAS_ONEDNN_SYMBOL 1
#else
#define BARKGPT_HAS_ONEDNN_SYMBOL 0
#endif

namespace barkgpt {
namespace {

enum class Lib : int { kUndecided = 0, kOneDnn = 1, kAten = 2 };

std::atomic<int> g_lib{static_cast<int>(Lib::kUndecided)};
std::atomic<bool> g_few_rows{true};  // false only when "aten" was asked for
std::mutex g_decide;

bool onednn_present() {
#if BARKGPT_HAS_ONEDNN_SYMBOL
  return &at::native::mkldnn_matmul != nullptr;
#else
  return false;
#endif
}

void onednn_matmul(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta) {
#if BARKGPT_HAS_ONEDNN_SYMBOL
  at::native::mkldnn_matmul(a, b, out, static_cast<float>(beta), 1.0f);
#else
  TORCH_CHECK(false, "barkgpt: oneDNN matmul is not available in this build");
#endif
}

// Whether oneDNN runs here and gives the right product (it refuses CPUs without AVX-512 or
// AVX-NE-CONVERT, and a future libtorch could change what the function does).
bool onednn_works(std::string* why) {
  if (!onednn_present()) {
    if (why) *why = "this libtorch does not export at::native::mkldnn_matmul";
    return false;
  }
  try {
    const at::Tensor a = at::randn({7, 33}), b = at::randn({33, 5});
    at::Tensor out = at::full({7, 5}, 1.0f), ref = at::addmm(out, a, b);
    onednn_matmul(out, a, b, 1.0);
    if (!at::allclose(out, ref, 1e-5, 1e-5)) {
      if (why) *why = "oneDNN's product disagreed with ATen's on a probe";
      return false;
    }
    onednn_matmul(out, a, b, 0.0);
    if (!at::allclose(out, at::mm(a, b), 1e-5, 1e-5)) {
      if (why) *why = "oneDNN's product disagreed with ATen's on a probe";
      return false;
    }
  } catch (const c10::Error& e) {
    if (why) *why = e.what_without_backtrace();
    return false;
  }
  return true;
}

Lib decide(c10::string_view choice) {
  if (choice == "aten") return Lib::kAten;
  std::string why;
  const bool ok = onednn_works(&why);
  if (choice == "onednn") {
    TORCH_CHECK(ok, "barkgpt: the oneDNN matmul cannot run here: ", why);
    return Lib::kOneDnn;
  }
  TORCH_CHECK(choice == "auto", "barkgpt: the CPU GEMM library must be 'auto', 'onednn' or "
              "'aten', got '", std::string(choice), "'");
  return ok ? Lib::kOneDnn : Lib::kAten;
}

Lib current() {
  int v = g_lib.load(std::memory_order_acquire);
  if (v != static_cast<int>(Lib::kUndecided)) return static_cast<Lib>(v);
  std::lock_guard<std::mutex> lock(g_decide);
  v = g_lib.load(std::memory_order_relaxed);
  if (v != static_cast<int>(Lib::kUndecided)) return static_cast<Lib>(v);
  // "auto" until the library is told otherwise (barkgpt/_cpp.py applies BARKGPT_CPU_GEMM).
  const Lib lib = decide("auto");
  g_lib.store(static_cast<int>(lib), std::memory_order_release);
  return lib;
}

// Few-row products (decode): csrc/few_rows.h.
constexpr int64_t kFewRows = few_rows::kMaxRows;

void few_rows_product(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  const float* x = a.const_data_ptr<float>();
  const float* w = b.const_data_ptr<float>();  // b = w^T: element (k, n) at w[n * ldw + k]
  float* o = out.mutable_data_ptr<float>();
  const int64_t ldx = a.stride(0), ldw = b.stride(1), ldo = out.stride(0);
  // about 64 KiB of w per task
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(1, K));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    few_rows::rows(M, x, ldx, w, ldw, o, ldo, K, n0, n1, accumulate);
  });
}

// oneDNN only pays above some work. Alone, a product of the bark presets (2048 x 32 x 96) ran
// faster through oneDNN (benchmarks/gemm_bench.py; below ~2^19 multiply-adds its ~10 us per call
// lose), but the bark preset's whole training step was slower with them there (median step
// 5.9 ms against 4.6 ms with this threshold and 4.9 ms before oneDNN, fresh processes, 5 rounds
// interleaved, benchmarks/preset_steps.py): from 2^24 on (small, bark-article, gpt2, the fused
// loss's chunks) it wins in the step as well.
constexpr int64_t kMinOneDnnWork = int64_t(1) << 24;

}  // namespace

void gemm_out(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && out.dim() == 2 && a.size(1) == b.size(0) &&
                  out.size(0) == a.size(0) && out.size(1) == b.size(1),
              "barkgpt gemm: shapes ", a.sizes(), " @ ", b.sizes(), " -> ", out.sizes());
  TORCH_CHECK(beta == 0.0 || beta == 1.0, "barkgpt gemm: beta must be 0 or 1");
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (beta == 0.0) out.zero_();
    return;
  }
  const bool fp32 = a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat &&
                    out.scalar_type() == at::kFloat;
  if (fp32 && m <= kFewRows && a.stride(1) == 1 && b.stride(0) == 1 && out.stride(1) == 1 &&
      g_few_rows.load(std::memory_order_relaxed)) {
    few_rows_product(out, a, b, beta != 0.0);
    return;
  }
  if (fp32 && out.is_contiguous() && m * n * k >= kMinOneDnnWork && current() == Lib::kOneDnn) {
    onednn_matmul(out, a, b, beta);
    return;
  }
  if (beta == 0.0) {
    at::mm_out(const_cast<at::Tensor&>(out), a, b);
  } else {
    const_cast<at::Tensor&>(out).addmm_(a, b);
  }
}

std::string gemm_library() { return current() == Lib::kOneDnn ? "onednn" : "aten"; }

bool gemm_few_rows() { return g_few_rows.load(std::memory_order_relaxed); }

std::string gemm_set_library(c10::string_view choice) {
  std::lock_guard<std::mutex> lock(g_decide);
  const Lib lib = decide(choice);
  g_lib.store(static_cast<int>(lib), std::memory_order_release);
  g_few_rows.store(choice != "aten", std::memory_order_relaxed);
  return lib == Lib::kOneDnn ? "onednn" : "aten";
}

}  // namespace barkgpt
