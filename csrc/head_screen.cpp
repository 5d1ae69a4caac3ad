// The screen of the output head for greedy / top-k decoding (barkgpt.ops.head_topk_logits).
//
// out (B, V) fp32 = x (B, C) fp32 @ w16^T, w16 (V, C) fp16: approximate logits from a half-size
// copy of the head. A decode step is memory-bound and the head is its largest weight (GPT-2:
// 50257 x 768 fp32 = 154 MB of the 494 MB a step streams); in fp16 it streams half the bytes.
// The caller bounds |exact - approximate| per row (barkgpt/ops.py derives the bound) and
// recomputes exactly only the rows that can reach the top k. This kernel returns the interval
// [lo, hi] around each approximate logit a: E = xnorm[b] * factor[v] + abs_err rounded upwards,
// lo = a - E rounded downwards, hi = a + E rounded upwards (directed rounding: AVX-512's embedded
// rounding, else one nextafter step outwards), and lo = -inf, hi = +inf where factor is inf.
//
// The products are the few-row kernel's (csrc/few_rows.h, as the fp32 head's): each output is one
// dot product in 16 fixed lanes over C (lane l takes c = l, l + 16, ...), then a tree of 4 adds;
// threads split V. Deterministic, and every term goes through at most ceil(C/16) + 4 roundings
// (the bound in ops.py assumes at most C + 5). fp16 -> fp32 is exact.
#include "common.h"
#include "few_rows.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <tuple>

namespace barkgpt {
namespace {

// lo/hi (rows m, columns n0..n1) from the approximate logits stored in lo: see the top of the file.
void bounds(float* lo, float* hi, int64_t ldo, int64_t M, const float* xnorm, const float* factor, float abs_err,
            int64_t n0, int64_t n1) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  for (int64_t m = 0; m < M; ++m) {
    float* l = lo + m * ldo;
    float* h = hi + m * ldo;
    int64_t n = n0;
#if defined(__AVX512F__)
    constexpr int kUp = _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC;
    constexpr int kDown = _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC;
    const __m512 xv = _mm512_set1_ps(xnorm[m]), av = _mm512_set1_ps(abs_err);
    const __m512 pinf = _mm512_set1_ps(kInf), ninf = _mm512_set1_ps(-kInf);
    for (; n + 16 <= n1; n += 16) {
      const __m512 f = _mm512_loadu_ps(factor + n), a = _mm512_loadu_ps(l + n);
      const __m512 e = _mm512_add_round_ps(_mm512_mul_round_ps(xv, f, kUp), av, kUp);
      const __mmask16 always = _mm512_cmp_ps_mask(f, pinf, _CMP_EQ_OQ);
      _mm512_storeu_ps(l + n, _mm512_mask_blend_ps(always, _mm512_sub_round_ps(a, e, kDown), ninf));
      _mm512_storeu_ps(h + n, _mm512_mask_blend_ps(always, _mm512_add_round_ps(a, e, kUp), pinf));
    }
#endif
    for (; n < n1; ++n) {
      const float f = factor[n], a = l[n];
      if (f == kInf) {
        l[n] = -kInf;
        h[n] = kInf;
        continue;
      }
      const float e = std::nextafter(std::nextafter(xnorm[m] * f, kInf) + abs_err, kInf);
      l[n] = std::nextafter(a - e, -kInf);
      h[n] = std::nextafter(a + e, kInf);
    }
  }
}

}  // namespace

// (lo, hi), each (B, V) fp32: the interval around x @ w16^T that holds the exact fp32 head
// logits, given factor (V,) fp32 and xnorm (B,) fp32 (both rounded upwards) and abs_err.
std::tuple<at::Tensor, at::Tensor> head_screen_cpu(const at::Tensor& x, const at::Tensor& w16,
                                                   const at::Tensor& factor, const at::Tensor& xnorm,
                                                   double abs_err) {
  TORCH_CHECK(x.dim() == 2 && w16.dim() == 2 && x.size(1) == w16.size(1),
              "head_screen: x must be (B, C) and w16 (V, C), got ", x.sizes(), " and ", w16.sizes());
  TORCH_CHECK(x.device().is_cpu() && w16.device().is_cpu() && factor.device().is_cpu() && xnorm.device().is_cpu(),
              "head_screen: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w16.scalar_type() == at::kHalf &&
                  factor.scalar_type() == at::kFloat && xnorm.scalar_type() == at::kFloat,
              "head_screen: x, factor and xnorm must be float32 and w16 float16, got ", x.scalar_type(), ", ",
              factor.scalar_type(), ", ", xnorm.scalar_type(), " and ", w16.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), N = w16.size(0);
  TORCH_CHECK(M >= 1 && M <= 8, "head_screen: 1 to 8 rows of x, got ", M);
  TORCH_CHECK(factor.dim() == 1 && factor.size(0) == N && factor.is_contiguous(),
              "head_screen: factor must be a contiguous (", N, ",) tensor, got ", factor.sizes());
  TORCH_CHECK(xnorm.dim() == 1 && xnorm.size(0) == M && xnorm.is_contiguous(),
              "head_screen: xnorm must be a contiguous (", M, ",) tensor, got ", xnorm.sizes());
  TORCH_CHECK(x.stride(1) == 1 && w16.stride(1) == 1, "head_screen: x and w16 need contiguous rows");
  at::Tensor lo = at::empty({M, N}, x.options()), hi = at::empty({M, N}, x.options());
  if (N == 0) return {lo, hi};
  const float* xp = x.const_data_ptr<float>();
  const c10::Half* wp = w16.const_data_ptr<c10::Half>();
  float* lp = lo.mutable_data_ptr<float>();
  float* hp = hi.mutable_data_ptr<float>();
  const float* fp = factor.const_data_ptr<float>();
  const float* xn = xnorm.const_data_ptr<float>();
  const float ae = std::nextafter(static_cast<float>(abs_err), std::numeric_limits<float>::infinity());
  const int64_t ldx = x.stride(0), ldw = w16.stride(0), ldo = N;
  // about 64 KiB of w16 per task
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, K));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    // blocks of 1024 rows: the approximate logits are still in cache for the bounds pass
    for (int64_t b0 = n0; b0 < n1; b0 += 1024) {
      const int64_t b1 = std::min(n1, b0 + 1024);
      if (K == 0) {
        for (int64_t m = 0; m < M; ++m) std::fill(lp + m * ldo + b0, lp + m * ldo + b1, 0.0f);
      } else {
        few_rows::rows(M, xp, ldx, wp, ldw, lp, ldo, K, b0, b1, false);
      }
      bounds(lp, hp, ldo, M, xn, fp, ae, b0, b1);
    }
  });
  return {lo, hi};
}

// The screen's copy of a head weight, in one pass over it: w16 = w in fp16 (round to nearest
// even, as torch's .half(); values beyond fp16's range become +-inf) and, per row, float64
// norms ||w||, ||h||, ||w - h|| (h = the fp16 row widened; w - h is exact in float64), as
// norms (V, 3). Sums of squares run in 8 fixed float64 lanes per row then a tree: deterministic.
//
// hugepages: w16 comes from the kernels' output cache (outputs.cpp): 2 MiB blocks advised for
// transparent huge pages, kept when freed and handed out again, so the copy of the next generate
// call finds its block without page faults. GPT-2's head, 2 threads: a fresh 77 MB block cost
// 90-95 ms (faulting in huge pages), plain at::empty 24 ms (4 KiB faults), a reused block 6 ms.
std::tuple<at::Tensor, at::Tensor> head_screen_prepare_cpu(const at::Tensor& w, bool hugepages) {
  TORCH_CHECK(w.dim() == 2 && w.device().is_cpu() && w.scalar_type() == at::kFloat,
              "head_screen_prepare: w must be a (V, C) float32 CPU tensor, got ", w.sizes(), " ",
              w.scalar_type());
  const at::Tensor wc = w.contiguous();
  const int64_t V = wc.size(0), K = wc.size(1);
  const auto half = wc.options().dtype(at::kHalf);
  at::Tensor w16 = hugepages ? empty_output({V, K}, half) : at::empty({V, K}, half);
  at::Tensor norms = at::empty({V, 3}, wc.options().dtype(at::kDouble));
  const float* wp = wc.const_data_ptr<float>();
  c10::Half* hp = w16.mutable_data_ptr<c10::Half>();
  double* np = norms.mutable_data_ptr<double>();
  at::parallel_for(0, V, grain_rows(K), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* wr = wp + r * K;
      c10::Half* hr = hp + r * K;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
      // 16 values a step: fp16 by the hardware (round to nearest even, as the portable path),
      // squares summed in 2 x 8 float64 lanes, then _mm512_reduce_add_pd: a fixed order.
      __m512d sw2[2] = {_mm512_setzero_pd(), _mm512_setzero_pd()}, sh2[2] = {sw2[0], sw2[1]},
              sd2[2] = {sw2[0], sw2[1]};
      auto step = [&](int64_t i, __mmask16 mask) {
        const __m512 wv = _mm512_maskz_loadu_ps(mask, wr + i);
        const __m256i hh = _mm512_cvtps_ph(wv, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm256_mask_storeu_epi16(reinterpret_cast<void*>(hr + i), mask, hh);
        const __m512 hv = _mm512_cvtph_ps(hh);
        const __m512 dv = _mm512_sub_ps(wv, hv);  // exact: h is w rounded to fp16 (or 0, or inf)
        const __m256 parts[3][2] = {{_mm512_castps512_ps256(wv), _mm512_extractf32x8_ps(wv, 1)},
                                    {_mm512_castps512_ps256(hv), _mm512_extractf32x8_ps(hv, 1)},
                                    {_mm512_castps512_ps256(dv), _mm512_extractf32x8_ps(dv, 1)}};
        for (int j = 0; j < 2; ++j) {
          const __m512d a = _mm512_cvtps_pd(parts[0][j]), b = _mm512_cvtps_pd(parts[1][j]),
                        c = _mm512_cvtps_pd(parts[2][j]);
          sw2[j] = _mm512_fmadd_pd(a, a, sw2[j]);
          sh2[j] = _mm512_fmadd_pd(b, b, sh2[j]);
          sd2[j] = _mm512_fmadd_pd(c, c, sd2[j]);
        }
      };
      int64_t i = 0;
      for (; i + 16 <= K; i += 16) step(i, __mmask16(0xFFFF));
      if (i < K) step(i, __mmask16((1u << (K - i)) - 1u));
      np[3 * r] = std::sqrt(_mm512_reduce_add_pd(_mm512_add_pd(sw2[0], sw2[1])));
      np[3 * r + 1] = std::sqrt(_mm512_reduce_add_pd(_mm512_add_pd(sh2[0], sh2[1])));
      np[3 * r + 2] = std::sqrt(_mm512_reduce_add_pd(_mm512_add_pd(sd2[0], sd2[1])));
#else
      constexpr int L = 8;
      double sw[L] = {}, sh[L] = {}, sd[L] = {};
      int64_t i = 0;
      auto one = [&](int64_t j, int l) {
        const c10::Half h = c10::Half(wr[j]);
        hr[j] = h;
        const double wd = wr[j], hd = static_cast<float>(h), dd = wd - hd;
        sw[l] += wd * wd;
        sh[l] += hd * hd;
        sd[l] += dd * dd;
      };
      for (; i + L <= K; i += L)
        for (int l = 0; l < L; ++l) one(i + l, l);
      for (int l = 0; i + l < K; ++l) one(i + l, l);
      fold_lanes<L / 2>(sw);
      fold_lanes<L / 2>(sh);
      fold_lanes<L / 2>(sd);
      np[3 * r] = std::sqrt(sw[0]);
      np[3 * r + 1] = std::sqrt(sh[0]);
      np[3 * r + 2] = std::sqrt(sd[0]);
#endif
    }
  });
  return {w16, norms};
}

}  // namespace barkgpt
