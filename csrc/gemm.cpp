// See gemm.h: fp32 products through oneDNN when it can run them, through ATen otherwise.
#include "gemm.h"

#include "common.h"

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

// Few-row products (decode: one or a few tokens per step): out (M x N) = [out +] x (M x K) @ w^T
// with w an (N x K) row-major matrix, as F.linear multiplies. Each output column is M dot
// products against one contiguous row of w, so w streams through once at memory speed, which a
// GEMM library tuned for big products does not do at M = 1..8. The M sums of a row run in 16
// fixed lanes each (the order depends only on K), threads split the N rows: deterministic.
// R rows of w at a time share each load of x: M * R accumulators of 16 lanes (at most 16 of the
// 32 AVX-512 registers), and several independent FMA chains even at M = 1. From M = 2 on, the
// rows of w are prefetched 8 KiB ahead (the hardware prefetcher alone fell behind once each
// byte of w feeds several FMAs; at M = 1 it kept up and the prefetches only cost). Measured on
// the 49 matrices of GPT-2 small streamed from memory, 1 thread: M = 8 44.8 -> 28.6 ms,
// M = 4 28.1 -> 22.2 ms, M = 1 16.8 ms without (19.3 with); oneDNN took 33.9 / 30.2 / 22.0 ms.
constexpr int64_t kPrefetchFloats = 2048;
template <int M, int R>
void few_rows_tile(const float* x, int64_t ldx, const float* w, int64_t ldw, float* out, int64_t ldo,
                   int64_t K, int64_t n, bool accumulate) {
#if defined(__AVX512F__)
  __m512 acc[R][M];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  auto step = [&](int64_t i, __mmask16 mask) {
    if constexpr (M >= 2) {
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(w + (n + r) * ldw + i + kPrefetchFloats), _MM_HINT_T0);
    }
    __m512 wv[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) wv[r] = _mm512_maskz_loadu_ps(mask, w + (n + r) * ldw + i);
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + m * ldx + i);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(xv, wv[r], acc[r][m]);
    }
  };
  int64_t i = 0;
  for (; i + 16 <= K; i += 16) step(i, __mmask16(0xFFFF));
  if (i < K) step(i, __mmask16((1u << (K - i)) - 1u));
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) {
      const float s = _mm512_reduce_add_ps(acc[r][m]);
      float& o = out[m * ldo + n + r];
      o = accumulate ? o + s : s;
    }
  }
#else
  constexpr int L = 16;
  float acc[R][M][L] = {};
  int64_t i = 0;
  for (; i + L <= K; i += L) {
    for (int m = 0; m < M; ++m) {
      const float* xr = x + m * ldx + i;
      for (int r = 0; r < R; ++r) {
        const float* wr = w + (n + r) * ldw + i;
#pragma omp simd
        for (int l = 0; l < L; ++l) acc[r][m][l] += xr[l] * wr[l];
      }
    }
  }
  for (int l = 0; i + l < K; ++l)
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) acc[r][m][l] += x[m * ldx + i + l] * w[(n + r) * ldw + i + l];
  for (int r = 0; r < R; ++r) {
    for (int m = 0; m < M; ++m) {
      fold_lanes<L / 2>(acc[r][m]);
      float& o = out[m * ldo + n + r];
      o = accumulate ? o + acc[r][m][0] : acc[r][m][0];
    }
  }
#endif
}

template <int M>
void few_rows_kernel(const float* x, int64_t ldx, const float* w, int64_t ldw, float* out, int64_t ldo,
                     int64_t K, int64_t n0, int64_t n1, bool accumulate) {
  constexpr int R = M <= 4 ? 4 : 2;
  int64_t n = n0;
  for (; n + R <= n1; n += R) few_rows_tile<M, R>(x, ldx, w, ldw, out, ldo, K, n, accumulate);
  for (; n < n1; ++n) few_rows_tile<M, 1>(x, ldx, w, ldw, out, ldo, K, n, accumulate);
}

constexpr int64_t kFewRows = 8;

void few_rows(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  const float* x = a.const_data_ptr<float>();
  const float* w = b.const_data_ptr<float>();  // b = w^T: element (k, n) at w[n * ldw + k]
  float* o = out.mutable_data_ptr<float>();
  const int64_t ldx = a.stride(0), ldw = b.stride(1), ldo = out.stride(0);
  // about 64 KiB of w per task
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(1, K));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    switch (M) {
#define BARKGPT_FEW(m) \
  case m: few_rows_kernel<m>(x, ldx, w, ldw, o, ldo, K, n0, n1, accumulate); break;
      BARKGPT_FEW(1) BARKGPT_FEW(2) BARKGPT_FEW(3) BARKGPT_FEW(4)
      BARKGPT_FEW(5) BARKGPT_FEW(6) BARKGPT_FEW(7) BARKGPT_FEW(8)
#undef BARKGPT_FEW
      default: TORCH_CHECK(false, "few_rows: M = ", M);
    }
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
    few_rows(out, a, b, beta != 0.0);
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
