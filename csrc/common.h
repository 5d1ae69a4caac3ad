// Shared helpers for the barkgpt C++ CPU kernels (csrc/*.cpp).
//
// Inner loops are plain C++ written so that the compiler vectorizes them (fixed-size lane
// arrays, `omp simd` reductions): the JIT build on the running machine adds -march=native,
// a portable wheel build does not, and the same source serves both.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace barkgpt {

// Math type: fp32 for fp32/bf16/fp16 storage, fp64 for fp64 (so gradcheck runs in fp64).
template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename T>
inline T ceil_div(T a, T b) { return (a + b - 1) / b; }

template <typename T>
inline T round_up(T a, T b) { return ceil_div(a, b) * b; }

// Work per parallel task: below this many elements a task is not worth a thread hand-off.
constexpr int64_t kGrainElems = 32768;

inline int64_t grain_rows(int64_t row_elems) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, row_elems));
}

// exp for the softmax. fp32: range reduction to r in [-ln2/2, ln2/2] and a degree-6
// polynomial (relative error ~2e-7), branch-free so loops over it vectorize without
// -ffast-math; inputs below about -87.3 (and -inf, the mask) give exactly 0.
// fp64 keeps std::exp: its only use is gradcheck, where accuracy is the point.
inline float exp_fast(float x_in) {
  // Clamping at -104 puts 2^n below the smallest normal for x < -87.3; the exponent field
  // then saturates at 0, so the result is exactly 0 (also for -inf) with no branch.
  float x = std::max(x_in, -104.0f);
  x = std::min(x, 88.0f);
  const float kMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float t = x * 1.44269504088896341f + kMagic;
  float n = t - kMagic;
  float r = x - n * 0.693145751953125f;
  r = r - n * 1.42860682030941723212e-6f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t biased = static_cast<int32_t>(n) + 127;
  biased = biased > 0 ? biased : 0;
  int32_t e = biased << 23;
  float scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return p * scale;
}

inline double exp_fast(double x) { return std::exp(x); }

#if defined(_MSC_VER)
#define BARKGPT_NOINLINE __declspec(noinline)
#else
#define BARKGPT_NOINLINE __attribute__((noinline))
#endif

// Storage <-> math conversions that the compiler can inline and vectorize.
template <typename acc_t, typename scalar_t>
inline acc_t to_acc(scalar_t v) { return static_cast<acc_t>(v); }

template <typename scalar_t, typename acc_t>
inline scalar_t from_acc(acc_t v) { return static_cast<scalar_t>(v); }

// Outputs at least this large come from empty_huge_pages. glibc maps every allocation of 32 MiB
// or more afresh (its largest mmap threshold) and frees it back to the OS, so each one is
// faulted in again page by page: 4 KiB pages cost a fault per page, 2 MiB pages 512x fewer.
constexpr int64_t kHugePageBytes = int64_t(32) << 20;

// An uninitialized tensor on 2 MiB-aligned memory marked for transparent huge pages
// (madvise), for large write-once outputs; elsewhere, or if mmap fails, at::empty.
inline at::Tensor empty_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const int64_t nbytes = numel * static_cast<int64_t>(c10::elementSize(options.dtype().toScalarType()));
  if (nbytes >= kHugePageBytes) {
    constexpr size_t kHuge = size_t(2) << 20;
    const size_t len = round_up<size_t>(static_cast<size_t>(nbytes), kHuge) + kHuge;
    void* base = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base != MAP_FAILED) {
      char* data = reinterpret_cast<char*>(round_up<uintptr_t>(reinterpret_cast<uintptr_t>(base), kHuge));
      madvise(data, len - kHuge, MADV_HUGEPAGE);  // advice only: a refusal leaves 4 KiB pages
      return at::from_blob(data, sizes, [base, len](void*) { munmap(base, len); }, options);
    }
  }
#endif
  return at::empty(sizes, options);
}

}  // namespace barkgpt
