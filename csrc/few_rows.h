// The few-row product kernel: out (M x N) = [out +] x (M x K) @ w^T for M = 1..8 fp32 rows of x
// against an (N x K) row-major weight w, as F.linear multiplies at decode time. Shared by
// gemm.cpp (fp32 weights: the model's projections, csrc/gemm.h) and head_screen.cpp (the screened
// head: its fp16 / int8 copy, and its exact rows, which must be computed as gemm.cpp computes them).
//
// Each output is M dot products against one contiguous row of w, so w streams through once at
// memory speed, which a GEMM library tuned for big products does not do at M = 1..8. Each sum
// runs in 16 fixed lanes (lane l takes k = l, l + 16, ...), then a fixed tree of adds: the order
// depends only on K, not on M, N, R or which rows are computed together, and threads split the
// N rows: deterministic. R rows of w at a time share each load of x (M * R accumulators of 16
// lanes, at most 16 of the 32 AVX-512 registers; several independent FMA chains even at M = 1).
// From M = 2 on, the fp32 / fp16 rows of w are prefetched 2048 elements ahead (the hardware prefetcher alone
// fell behind once each byte of w feeds several FMAs; at M = 1 it kept up and the prefetches only
// cost). Measured on the 49 matrices of GPT-2 small streamed from memory, fp32, 1 thread: M = 8
// 44.8 -> 28.6 ms, M = 4 28.1 -> 22.2 ms, M = 1 16.8 ms without (19.3 with); oneDNN took
// 33.9 / 30.2 / 22.0 ms. fp16 and int8 weights are widened exactly to fp32 and then summed the
// same way.
#pragma once

#include "common.h"

#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace barkgpt {
namespace few_rows {

constexpr int64_t kMaxRows = 8;
constexpr int64_t kPrefetchElems = 2048;
// int8 rows are prefetched 4 KiB ahead at every M. Without it, the head's int8 copy (38.6 MB at
// GPT-2's shape, M = 1, 2 threads, cold caches) streamed at ~26 GB/s where the fp32 head reached
// ~42 (1.46-1.53 ms); 512 B ahead gave 1.20 ms, 2 KiB 1.08-1.13, 4-16 KiB 1.00-1.10 with the fp32
// head at 3.5-3.8 ms alongside (one quiet VM, memory ~40-45 GB/s).
constexpr int64_t kPrefetchInt8Bytes = 4096;

// Which weight types have an AVX-512 path in this build (others take the portable loop).
template <typename W>
constexpr bool kVectorized = false;
#if defined(__AVX512F__)
template <>
constexpr bool kVectorized<float> = true;
inline __m512 load16(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
#if defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__F16C__)
template <>
constexpr bool kVectorized<c10::Half> = true;
inline __m512 load16(const c10::Half* p, __mmask16 mask) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, reinterpret_cast<const void*>(p)));
}
#endif
#if defined(__AVX512BW__) && defined(__AVX512VL__)
// int8 (the screen's int8 copy of the head): widened to int32, then to fp32, both exact.
template <>
constexpr bool kVectorized<int8_t> = true;
inline __m512 load16(const int8_t* p, __mmask16 mask) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, p)));
}
#endif
#endif

// Rows n .. n + R - 1 of the output (all M rows of x).
template <int M, int R, typename W>
void tile(const float* x, int64_t ldx, const W* w, int64_t ldw, float* out, int64_t ldo, int64_t K, int64_t n,
          bool accumulate) {
#if defined(__AVX512F__)
  if constexpr (kVectorized<W>) {
    __m512 acc[R][M];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
    auto step = [&](int64_t i, __mmask16 mask) {
      if constexpr (sizeof(W) == 1) {  // int8: 16 bytes a step, one prefetch per 64-byte line
        if ((i & 63) == 0) {
#pragma GCC unroll 16
          for (int r = 0; r < R; ++r)
            _mm_prefetch(reinterpret_cast<const char*>(w + (n + r) * ldw + i) + kPrefetchInt8Bytes, _MM_HINT_T0);
        }
      } else if constexpr (M >= 2) {
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r)
          _mm_prefetch(reinterpret_cast<const char*>(w + (n + r) * ldw + i + kPrefetchElems), _MM_HINT_T0);
      }
      __m512 wv[R];
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) wv[r] = load16(w + (n + r) * ldw + i, mask);
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
    return;
  }
#endif
  constexpr int L = 16;
  float acc[R][M][L] = {};
  int64_t i = 0;
  for (; i + L <= K; i += L) {
    for (int r = 0; r < R; ++r) {
      float wf[L];
      const W* wr = w + (n + r) * ldw + i;
      for (int l = 0; l < L; ++l) wf[l] = static_cast<float>(wr[l]);
      for (int m = 0; m < M; ++m) {
        const float* xr = x + m * ldx + i;
#pragma omp simd
        for (int l = 0; l < L; ++l) acc[r][m][l] += xr[l] * wf[l];
      }
    }
  }
  for (int l = 0; i + l < K; ++l)
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m)
        acc[r][m][l] += x[m * ldx + i + l] * static_cast<float>(w[(n + r) * ldw + i + l]);
  for (int r = 0; r < R; ++r) {
    for (int m = 0; m < M; ++m) {
      fold_lanes<L / 2>(acc[r][m]);
      float& o = out[m * ldo + n + r];
      o = accumulate ? o + acc[r][m][0] : acc[r][m][0];
    }
  }
}

template <int M, typename W>
void rows_of(const float* x, int64_t ldx, const W* w, int64_t ldw, float* out, int64_t ldo, int64_t K, int64_t n0,
             int64_t n1, bool accumulate) {
  constexpr int R = M <= 4 ? 4 : 2;
  int64_t n = n0;
  for (; n + R <= n1; n += R) tile<M, R>(x, ldx, w, ldw, out, ldo, K, n, accumulate);
  for (; n < n1; ++n) tile<M, 1>(x, ldx, w, ldw, out, ldo, K, n, accumulate);
}

// Output columns n0 .. n1 for M (1..8) rows of x, on the calling thread.
template <typename W>
void rows(int64_t M, const float* x, int64_t ldx, const W* w, int64_t ldw, float* out, int64_t ldo, int64_t K,
          int64_t n0, int64_t n1, bool accumulate) {
  switch (M) {
#define BARKGPT_FEW_ROWS(m) \
  case m: rows_of<m>(x, ldx, w, ldw, out, ldo, K, n0, n1, accumulate); break;
    BARKGPT_FEW_ROWS(1) BARKGPT_FEW_ROWS(2) BARKGPT_FEW_ROWS(3) BARKGPT_FEW_ROWS(4)
    BARKGPT_FEW_ROWS(5) BARKGPT_FEW_ROWS(6) BARKGPT_FEW_ROWS(7) BARKGPT_FEW_ROWS(8)
#undef BARKGPT_FEW_ROWS
    default: TORCH_CHECK(false, "few-row product: M = ", M, " (1..", kMaxRows, ")");
  }
}

// One output column (all M rows of x) from the weight row at wrow: out[m * ldo] = x[m] . wrow.
// Bitwise what rows() gives for that column wherever it sits in w (the order of every sum
// depends only on K).
template <typename W>
void row_at(int64_t M, const float* x, int64_t ldx, const W* wrow, float* out, int64_t ldo, int64_t K) {
  switch (M) {
#define BARKGPT_ROW_AT(m) \
  case m: tile<m, 1>(x, ldx, wrow, 0, out, ldo, K, 0, false); break;
    BARKGPT_ROW_AT(1) BARKGPT_ROW_AT(2) BARKGPT_ROW_AT(3) BARKGPT_ROW_AT(4)
    BARKGPT_ROW_AT(5) BARKGPT_ROW_AT(6) BARKGPT_ROW_AT(7) BARKGPT_ROW_AT(8)
#undef BARKGPT_ROW_AT
    default: TORCH_CHECK(false, "few-row product: M = ", M, " (1..", kMaxRows, ")");
  }
}

}  // namespace few_rows
}  // namespace barkgpt
