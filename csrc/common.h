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

#if defined(__SSE2__) || defined(__AVX__) || (defined(_MSC_VER) && (defined(_M_X64) || defined(_M_IX86)))
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

// lanes[0] += lanes[W], ..., then W/2, ... 1: a pairwise tree, unrolled at compile time.
template <int W, typename acc_t>
inline void fold_lanes(acc_t* lanes) {
  if constexpr (W > 0) {
#pragma omp simd
    for (int l = 0; l < W; ++l) lanes[l] += lanes[l + W];
    fold_lanes<W / 2>(lanes);
  }
}

// Sum of f(i) for i in [0, n) in a fixed order that vectorizes without -ffast-math: L partial
// sums (lane l takes i = l, l + L, ...), then a pairwise tree over the lanes. An `omp simd`
// reduction ends in a serial chain of scalar adds (GCC keeps the lane order), ~60 cycles of
// latency at 16 lanes, which dominated narrow rows; the tree takes log2(L) steps. The tail goes
// through its own array so that `lanes` stays in registers. L is a power of two; 32 fp32 lanes
// are two independent AVX-512 accumulators.
template <int L, typename acc_t, typename F>
inline acc_t lane_sum(int64_t n, const F& f) {
  static_assert(L > 0 && (L & (L - 1)) == 0, "L must be a power of two");
  acc_t lanes[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
#pragma omp simd
    for (int l = 0; l < L; ++l) lanes[l] += f(i + l);
  }
  if (i < n) {
    acc_t tail[L] = {};
    for (int l = 0; i + l < n; ++l) tail[l] = f(i + l);
#pragma omp simd
    for (int l = 0; l < L; ++l) lanes[l] += tail[l];
  }
  fold_lanes<L / 2>(lanes);
  return lanes[0];
}

// Two sums at once, as lane_sum: f(i, u, v) sets the i-th terms u and v (and may have side
// effects on index i only). Returns them in s0, s1.
template <int L, typename acc_t, typename F>
inline void lane_sum2(int64_t n, const F& f, acc_t& s0, acc_t& s1) {
  static_assert(L > 0 && (L & (L - 1)) == 0, "L must be a power of two");
  acc_t a[L] = {}, b[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
#pragma omp simd
    for (int l = 0; l < L; ++l) {
      acc_t u, v;
      f(i + l, u, v);
      a[l] += u;
      b[l] += v;
    }
  }
  if (i < n) {
    acc_t ta[L] = {}, tb[L] = {};
    for (int l = 0; i + l < n; ++l) f(i + l, ta[l], tb[l]);
#pragma omp simd
    for (int l = 0; l < L; ++l) {
      a[l] += ta[l];
      b[l] += tb[l];
    }
  }
  fold_lanes<L / 2>(a);
  fold_lanes<L / 2>(b);
  s0 = a[0];
  s1 = b[0];
}

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

// at::empty for a kernel output. Blocks of 128 KiB or more come from a cache of idle blocks
// that were our outputs before, so they are not faulted in again (csrc/outputs.cpp).
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// Whether an op that reads and writes op_bytes in all writes its output, in rows of row_bytes,
// with stream_copy (csrc/outputs.cpp): when op_bytes is at least the last-level cache the output
// cannot stay cached for its reader anyway, and normal stores would first read it and evict the
// inputs. Never for rows under kStreamMinRowBytes, or where there are no streaming stores.
constexpr int64_t kStreamMinRowBytes = 256;
bool stream_output(int64_t op_bytes, int64_t row_bytes);

// Copies n bytes to dst with non-temporal (streaming) stores where the CPU has them. A normal
// store to a line that is not cached first reads it (read for ownership) and then evicts
// something else; a streaming store does neither, so a write-once output larger than the cache
// costs one DRAM pass instead of two and leaves the inputs cached. The writing thread must call
// stream_fence() before others read the data.
inline void stream_copy(void* dst_v, const void* src_v, int64_t n) {
  char* dst = static_cast<char*>(dst_v);
  const char* src = static_cast<const char*>(src_v);
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 63) != 0; ++i) dst[i] = src[i];
  for (; i + 64 <= n; i += 64)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i), _mm512_loadu_si512(src + i));
#elif defined(__AVX__)
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 31) != 0; ++i) dst[i] = src[i];
  for (; i + 32 <= n; i += 32)
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
#elif defined(__SSE2__)
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 15) != 0; ++i) dst[i] = src[i];
  for (; i + 16 <= n; i += 16)
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
#endif
  for (; i < n; ++i) dst[i] = src[i];
}

// Asks for the cache line holding p ahead of a read (a hint: no effect on results).
inline void prefetch_read(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p, 0, 3);
#elif defined(_MSC_VER) && (defined(_M_X64) || defined(_M_IX86))
  _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0);
#else
  (void)p;
#endif
}

inline void stream_fence() {
#if defined(__SSE2__) || defined(__AVX__)
  _mm_sfence();
#endif
}

}  // namespace barkgpt
