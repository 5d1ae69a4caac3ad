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
#if defined(__SSE2__) || defined(__AVX__)
#include <immintrin.h>
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

// Write-once outputs at least this large (the token-table gradient of a GPT-2 vocabulary is
// 154 MB) get the treatment of empty_large_output and stream_store below.
constexpr int64_t kLargeOutputBytes = int64_t(32) << 20;

// at::empty for a large write-once output. glibc serves a block of 32 MiB or more from memory
// freed earlier when it has some (already faulted in), else from a fresh mapping that every
// call faults in again page by page. Only in that second case (the first page is not
// resident), the block's 2 MiB-aligned interior is marked for transparent huge pages: 512x
// fewer faults. Advice only: where the kernel refuses it, nothing changes.
inline at::Tensor empty_large_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t nbytes = t.numel() * static_cast<int64_t>(t.element_size());
  if (nbytes >= kLargeOutputBytes) {
    constexpr uintptr_t kHuge = uintptr_t(2) << 20;
    const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t lo = round_up(p, kHuge), hi = (p + static_cast<uintptr_t>(nbytes)) / kHuge * kHuge;
    unsigned char resident = 1;
    if (hi > lo && mincore(reinterpret_cast<void*>(lo), 1, &resident) == 0 && (resident & 1) == 0)
      madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
  }
#endif
  return t;
}

// Writes n floats with non-temporal (streaming) stores where the CPU has them. A normal store
// to a line that is not cached first reads it (read for ownership); a streaming store does
// not, so a write-once output far larger than the cache costs one DRAM pass instead of two.
// The writing thread must call stream_fence() before others read the data.
inline void stream_store(float* dst, const float* src, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 63) != 0; ++i) dst[i] = src[i];
  for (; i + 16 <= n; i += 16) _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
#elif defined(__AVX__)
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 31) != 0; ++i) dst[i] = src[i];
  for (; i + 8 <= n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
#elif defined(__SSE2__)
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 15) != 0; ++i) dst[i] = src[i];
  for (; i + 4 <= n; i += 4) _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
#endif
  for (; i < n; ++i) dst[i] = src[i];
}

inline void stream_fence() {
#if defined(__SSE2__) || defined(__AVX__)
  _mm_sfence();
#endif
}

}  // namespace barkgpt
