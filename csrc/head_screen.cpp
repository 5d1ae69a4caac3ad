// The screen of the output head for greedy / top-k decoding (barkgpt.ops.head_topk_logits).
//
// Approximate logits from a smaller copy of the head (V, C): int8 with a per-row scale s (a
// quarter of the fp32 head's bytes), or fp16 (half). A decode step is memory-bound and the head is
// its largest weight (GPT-2: 50257 x 768 fp32 = 154 MB of the 494 MB a step streams). The caller
// bounds |exact - approximate| per row (barkgpt/ops.py derives both bounds) and recomputes exactly
// only the rows that can reach the top k. The kernels return the interval [lo, hi] around each
// approximate logit a (fp16: a = fl(x . h); int8: p = fl(x . q), a = fl(s * p)):
// E = xnorm[b] * factor[v] + abs_err rounded upwards, lo = a - E rounded downwards, hi = a + E
// rounded upwards (directed rounding: AVX-512's embedded rounding, else one nextafter step
// outwards), and lo = -inf, hi = +inf where factor is inf.
//
// The products are the few-row kernel's (csrc/few_rows.h, as the fp32 head's): each output is one
// dot product in 16 fixed lanes over C (lane l takes c = l, l + 16, ...), then a tree of 4 adds;
// threads split V. Deterministic, and every term goes through at most ceil(C/16) + 4 roundings
// (the bounds in ops.py assume at most C + 5). fp16 -> fp32 and int8 -> fp32 are exact.
//
// head_screen_topk does a whole screened step in one call: ||x||, the intervals, the selection
// (per row the k-th largest lo, the candidates hi >= it, their union over the rows) and the exact
// recompute of the candidates from the fp32 head with the few-row kernel, bitwise the full head's.
#include "common.h"
#include "few_rows.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cfenv>
#include <cmath>
#include <functional>
#include <optional>
#include <queue>
#include <tuple>
#include <vector>
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <immintrin.h>
#endif

namespace barkgpt {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// Whether this thread computes as the bounds in ops.py assume: round to nearest, and subnormal
// results and inputs kept (no flush-to-zero / denormals-are-zero, which
// torch.set_flush_denormal(True) turns on: a flushed product is off by up to 2^-126, far beyond
// the bounds' absolute term, and the screen then dropped the exact argmax).
bool ieee_default_mode() {
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
  // MXCSR: DAZ bit 6, rounding control bits 13-14, FTZ bit 15
  return (_mm_getcsr() & 0xE040u) == 0 && std::fegetround() == FE_TONEAREST;
#elif defined(__aarch64__)
  uint64_t fpcr;
  asm volatile("mrs %0, fpcr" : "=r"(fpcr));
  return (fpcr & ((uint64_t(1) << 24) | (uint64_t(3) << 22))) == 0;  // FZ bit 24, RMode bits 22-23
#else
  return std::fegetround() == FE_TONEAREST;
#endif
}

// lo/hi (rows m, columns n0..n1) from the approximate products stored in lo (times scale[n] when
// scale is set: the int8 copy): see the top of the file.
void bounds(float* lo, float* hi, int64_t ldo, int64_t M, const float* xnorm, const float* factor,
            const float* scale, float abs_err, int64_t n0, int64_t n1) {
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
      const __m512 f = _mm512_loadu_ps(factor + n);
      __m512 a = _mm512_loadu_ps(l + n);
      if (scale != nullptr) a = _mm512_mul_ps(a, _mm512_loadu_ps(scale + n));  // a = fl(s * p), to nearest
      const __m512 e = _mm512_add_round_ps(_mm512_mul_round_ps(xv, f, kUp), av, kUp);
      const __mmask16 always = _mm512_cmp_ps_mask(f, pinf, _CMP_EQ_OQ);
      _mm512_storeu_ps(l + n, _mm512_mask_blend_ps(always, _mm512_sub_round_ps(a, e, kDown), ninf));
      _mm512_storeu_ps(h + n, _mm512_mask_blend_ps(always, _mm512_add_round_ps(a, e, kUp), pinf));
    }
#endif
    for (; n < n1; ++n) {
      const float f = factor[n], a = scale != nullptr ? l[n] * scale[n] : l[n];
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

// lo, hi (M x N, row stride ldo): the intervals of every head row (threads split N).
template <typename W>
void screen_rows(int64_t M, const float* x, int64_t ldx, const W* w, int64_t ldw, const float* scale,
                 const float* factor, const float* xnorm, float abs_err, float* lo, float* hi, int64_t ldo,
                 int64_t K, int64_t N, std::atomic<bool>& ieee) {
  // about 64 KiB of the copy per task
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, K * int64_t(sizeof(W))));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    if (!ieee_default_mode()) ieee.store(false, std::memory_order_relaxed);
    // blocks of 1024 rows: the approximate logits are still in cache for the bounds pass
    for (int64_t b0 = n0; b0 < n1; b0 += 1024) {
      const int64_t b1 = std::min(n1, b0 + 1024);
      if (K == 0) {
        for (int64_t m = 0; m < M; ++m) std::fill(lo + m * ldo + b0, lo + m * ldo + b1, 0.0f);
      } else {
        few_rows::rows(M, x, ldx, w, ldw, lo, ldo, K, b0, b1, false);
      }
      bounds(lo, hi, ldo, M, xnorm, factor, scale, abs_err, b0, b1);
    }
  });
}

// The checks both kernels share; returns the copy's kind (kHalf or kChar).
at::ScalarType check_screen_args(const char* op, const at::Tensor& x, const at::Tensor& w,
                                 const std::optional<at::Tensor>& scale, const at::Tensor& factor) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), op, ": x must be (B, C) and w (V, C), got ",
              x.sizes(), " and ", w.sizes());
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && factor.device().is_cpu() &&
                  (!scale || scale->device().is_cpu()),
              op, ": CPU tensors only");
  const at::ScalarType wt = w.scalar_type();
  TORCH_CHECK(x.scalar_type() == at::kFloat && factor.scalar_type() == at::kFloat &&
                  (wt == at::kHalf || wt == at::kChar),
              op, ": x and factor must be float32 and w float16 or int8, got ", x.scalar_type(), ", ",
              factor.scalar_type(), " and ", wt);
  TORCH_CHECK((wt == at::kChar) == scale.has_value(), op, ": an int8 w needs its scale (V,) and an fp16 w none");
  const int64_t M = x.size(0), N = w.size(0);
  TORCH_CHECK(M >= 1 && M <= 8, op, ": 1 to 8 rows of x, got ", M);
  TORCH_CHECK(factor.dim() == 1 && factor.size(0) == N && factor.is_contiguous(), op,
              ": factor must be a contiguous (", N, ",) tensor, got ", factor.sizes());
  if (scale) {
    TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->dim() == 1 && scale->size(0) == N &&
                    scale->is_contiguous(),
                op, ": scale must be a contiguous (", N, ",) float32 tensor, got ", scale->sizes(), " ",
                scale->scalar_type());
  }
  TORCH_CHECK(x.stride(1) == 1 && w.stride(1) == 1, op, ": x and w need contiguous rows");
  return wt;
}

// Returns false (lo, hi unspecified) where a thread that computed them was not in the default
// floating-point mode (ieee_default_mode): no bound holds.
bool screen_dispatch(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& scale,
                     const at::Tensor& factor, const float* xnorm, float abs_err, float* lo, float* hi) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const float* sp = scale ? scale->const_data_ptr<float>() : nullptr;
  std::atomic<bool> ieee{ieee_default_mode()};
  if (!ieee.load()) return false;
  if (w.scalar_type() == at::kChar) {
    screen_rows(M, x.const_data_ptr<float>(), x.stride(0), w.const_data_ptr<int8_t>(), w.stride(0), sp,
                factor.const_data_ptr<float>(), xnorm, abs_err, lo, hi, N, K, N, ieee);
  } else {
    screen_rows(M, x.const_data_ptr<float>(), x.stride(0), w.const_data_ptr<c10::Half>(), w.stride(0), sp,
                factor.const_data_ptr<float>(), xnorm, abs_err, lo, hi, N, K, N, ieee);
  }
  return ieee.load();
}

float abs_err_up(double abs_err) { return std::nextafter(static_cast<float>(abs_err), kInf); }

// one(j, l) for j = 0 .. K - 1 with l = j % L: the portable copy builders' sums of squares in L
// fixed float64 lanes (folded by fold_lanes afterwards), a fixed order.
template <int L, typename F>
void each_in_lanes(int64_t K, F&& one) {
  int64_t i = 0;
  for (; i + L <= K; i += L)
    for (int l = 0; l < L; ++l) one(i + l, l);
  for (int l = 0; i + l < K; ++l) one(i + l, l);
}

}  // namespace

// (lo, hi), each (B, V) fp32: the interval around the screen's approximate logits that holds the
// exact fp32 head logits, given factor (V,) fp32 and xnorm (B,) fp32 (both rounded upwards),
// abs_err, and for an int8 w its per-row scale (V,) fp32.
std::tuple<at::Tensor, at::Tensor> head_screen_cpu(const at::Tensor& x, const at::Tensor& w,
                                                   const at::Tensor& factor, const at::Tensor& xnorm,
                                                   double abs_err, const std::optional<at::Tensor>& scale) {
  check_screen_args("head_screen", x, w, scale, factor);
  const int64_t M = x.size(0), N = w.size(0);
  TORCH_CHECK(xnorm.device().is_cpu() && xnorm.scalar_type() == at::kFloat, "head_screen: xnorm must be float32");
  TORCH_CHECK(xnorm.dim() == 1 && xnorm.size(0) == M && xnorm.is_contiguous(),
              "head_screen: xnorm must be a contiguous (", M, ",) tensor, got ", xnorm.sizes());
  at::Tensor lo = at::empty({M, N}, x.options()), hi = at::empty({M, N}, x.options());
  if (N == 0) return {lo, hi};
  if (!screen_dispatch(x, w, scale, factor, xnorm.const_data_ptr<float>(), abs_err_up(abs_err),
                       lo.mutable_data_ptr<float>(), hi.mutable_data_ptr<float>())) {
    // not the default floating-point mode: only the trivial interval holds
    std::fill(lo.mutable_data_ptr<float>(), lo.mutable_data_ptr<float>() + M * N, -kInf);
    std::fill(hi.mutable_data_ptr<float>(), hi.mutable_data_ptr<float>() + M * N, kInf);
  }
  return {lo, hi};
}

// A whole screened step. Returns (out (B, V) fp32, info (2,) int64). info = (n, c): n rows of the
// head were candidates (the union over the rows of x), c the most of any one row; out holds their
// exact logits, bitwise the few-row kernel's fp32 x @ weight^T, and -inf everywhere else. Where
// the screen cannot answer, out is unspecified and n < 0: -1 when no bound holds (x not finite,
// ||x|| * max_norm >= 2^100: sums that could overflow, or a thread not in the default
// floating-point mode: flush-to-zero, denormals-are-zero, not round-to-nearest), -2 when a row of x has more than
// max_count candidates (c is then that row's count). xnorm is computed here in float64 and
// rounded upwards to fp32.
std::tuple<at::Tensor, at::Tensor> head_screen_topk_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                        const at::Tensor& w, const std::optional<at::Tensor>& scale,
                                                        const at::Tensor& factor, double max_norm, double abs_err,
                                                        int64_t k, int64_t max_count) {
  check_screen_args("head_screen_topk", x, w, scale, factor);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == N && weight.size(1) == K && weight.device().is_cpu() &&
                  weight.scalar_type() == at::kFloat && weight.stride(1) == 1,
              "head_screen_topk: weight must be the (", N, ", ", K, ") float32 CPU head with contiguous rows, got ",
              weight.sizes(), " ", weight.scalar_type());
  TORCH_CHECK(k >= 1 && k <= N, "head_screen_topk: k must be in 1..", N, ", got ", k);
  at::Tensor info = at::empty({2}, x.options().dtype(at::kLong));
  int64_t* ip = info.mutable_data_ptr<int64_t>();
  at::Tensor out = empty_output({M, N}, x.options());
  const float* xp = x.const_data_ptr<float>();
  const int64_t ldx = x.stride(0);
  float xnorm[few_rows::kMaxRows];
  for (int64_t m = 0; m < M; ++m) {
    double ss = 0.0;
    for (int64_t i = 0; i < K; ++i) ss += static_cast<double>(xp[m * ldx + i]) * xp[m * ldx + i];
    const double xn = std::sqrt(ss);
    if (!(xn * max_norm < std::ldexp(1.0, 100))) {  // also inf / nan in x
      ip[0] = -1, ip[1] = 0;
      return {out, info};
    }
    xnorm[m] = std::nextafter(static_cast<float>(xn), kInf);
  }
  if (N == 0) {
    ip[0] = ip[1] = 0;
    return {out, info};
  }
  at::Tensor hi_t = empty_output({M, N}, x.options());
  float* lo = out.mutable_data_ptr<float>();
  float* hi = hi_t.mutable_data_ptr<float>();
  if (!screen_dispatch(x, w, scale, factor, xnorm, abs_err_up(abs_err), lo, hi)) {
    ip[0] = -1, ip[1] = 0;  // flush-to-zero / denormals-are-zero or another rounding: no bound holds
    return {out, info};
  }

  // Per row: L = the k-th largest lo; the candidates are the v with hi_v >= L (ops.py: they hold
  // the exact top k, ties included). Their union over the rows is recomputed exactly.
  std::vector<uint8_t> pick(static_cast<size_t>(N), 0);
  int64_t most = 0;
  for (int64_t m = 0; m < M; ++m) {
    const float* l = lo + m * N;
    const float* h = hi + m * N;
    float kth;
    if (k == 1) {
      kth = -kInf;
      for (int64_t v = 0; v < N; ++v) kth = std::max(kth, l[v]);
    } else {  // a min-heap of the k largest so far: most lo fall below its top at one compare
      std::priority_queue<float, std::vector<float>, std::greater<float>> heap(std::greater<float>(),
                                                                               std::vector<float>(l, l + k));
      for (int64_t v = k; v < N; ++v) {
        if (l[v] > heap.top()) {
          heap.pop();
          heap.push(l[v]);
        }
      }
      kth = heap.top();
    }
    int64_t count = 0;
    for (int64_t v = 0; v < N; ++v) {
      const bool c = h[v] >= kth;
      count += c;
      pick[v] |= static_cast<uint8_t>(c);
    }
    most = std::max(most, count);
    if (count > max_count) {
      ip[0] = -2, ip[1] = count;
      return {out, info};
    }
  }
  std::vector<int64_t> rows;
  for (int64_t v = 0; v < N; ++v)
    if (pick[v]) rows.push_back(v);
  const int64_t R = static_cast<int64_t>(rows.size());
  std::fill(lo, lo + M * N, -kInf);
  const float* wp = weight.const_data_ptr<float>();
  const int64_t ldw = weight.stride(0);
  // about 64 KiB of the head per task: a handful of rows stays on this thread
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(1, K));
  at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) few_rows::row_at(M, xp, ldx, wp + rows[r] * ldw, lo + rows[r], N, K);
  });
  ip[0] = R, ip[1] = most;
  return {out, info};
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
      auto one = [&](int64_t j, int l) {
        const c10::Half h = c10::Half(wr[j]);
        hr[j] = h;
        const double wd = wr[j], hd = static_cast<float>(h), dd = wd - hd;
        sw[l] += wd * wd;
        sh[l] += hd * hd;
        sd[l] += dd * dd;
      };
      each_in_lanes<L>(K, one);
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

namespace barkgpt {

// The screen's int8 copy of a head weight, in one pass over it: per row v, the scale
// s = max_i |w_vi| / 127 rounded to fp32 and then raised (nextafter) until 127 s >= max |w_v|
// (so |w / s| <= 127: no clamping for finite rows, also where s is subnormal), 0 for a row of
// zeros, and q_vi = round(w_vi * r) to nearest even with r = fl(1 / s), clamped to [-127, 127]
// (where 1 / s overflows fp32, round(w_vi / s) in float64). The decoded row d = s q is exact in
// float64 (24 + 8 bits), so the float64 norms per row, norms (V, 4) = ||w||, ||d||, ||w - d||,
// ||q||, are those of the copy the kernels read, whatever rounding picked q. A row with inf or
// nan gets garbage in q and s and a non-finite ||w||: the caller declines such a head.
// Sums of squares as head_screen_prepare (fixed lanes, then a fixed tree): deterministic.
// hugepages: q from the kernels' output cache, as head_screen_prepare's copy.
std::tuple<at::Tensor, at::Tensor, at::Tensor> head_screen_prepare_int8_cpu(const at::Tensor& w, bool hugepages) {
  TORCH_CHECK(w.dim() == 2 && w.device().is_cpu() && w.scalar_type() == at::kFloat,
              "head_screen_prepare_int8: w must be a (V, C) float32 CPU tensor, got ", w.sizes(), " ",
              w.scalar_type());
  const at::Tensor wc = w.contiguous();
  const int64_t V = wc.size(0), K = wc.size(1);
  const auto i8 = wc.options().dtype(at::kChar);
  at::Tensor q = hugepages ? empty_output({V, K}, i8) : at::empty({V, K}, i8);
  at::Tensor scale = at::empty({V}, wc.options());
  at::Tensor norms = at::empty({V, 4}, wc.options().dtype(at::kDouble));
  const float* wp = wc.const_data_ptr<float>();
  int8_t* qp = q.mutable_data_ptr<int8_t>();
  float* sp = scale.mutable_data_ptr<float>();
  double* np = norms.mutable_data_ptr<double>();
  at::parallel_for(0, V, grain_rows(K), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* wr = wp + r * K;
      int8_t* qr = qp + r * K;
      float mx = 0.0f;
#if defined(__AVX512F__)
      {
        __m512 m16 = _mm512_setzero_ps();
        int64_t i = 0;
        for (; i + 16 <= K; i += 16) m16 = _mm512_max_ps(m16, _mm512_abs_ps(_mm512_loadu_ps(wr + i)));
        if (i < K) {
          const __mmask16 tail = __mmask16((1u << (K - i)) - 1u);
          m16 = _mm512_max_ps(m16, _mm512_abs_ps(_mm512_maskz_loadu_ps(tail, wr + i)));
        }
        mx = _mm512_reduce_max_ps(m16);
      }
#else
      for (int64_t i = 0; i < K; ++i) mx = std::max(mx, std::fabs(wr[i]));
#endif
      float s = mx / 127.0f;
      if (mx > 0.0f) {
        if (s == 0.0f) s = std::numeric_limits<float>::denorm_min();
        while (static_cast<double>(s) * 127.0 < static_cast<double>(mx)) s = std::nextafter(s, kInf);
      }
      sp[r] = s;
      const float rcp = s > 0.0f ? 1.0f / s : 0.0f;
      const double sd = s;
      if (!std::isfinite(rcp)) {  // s below ~2^-128: divide in float64 (rare: tiny rows)
        double sw = 0, sdd = 0, se = 0, sq = 0;
        for (int64_t i = 0; i < K; ++i) {
          const double qd = std::min(127.0, std::max(-127.0, std::nearbyint(wr[i] / sd)));
          qr[i] = static_cast<int8_t>(qd);
          const double wd = wr[i], dd = sd * qd, ed = wd - dd;
          sw += wd * wd, sdd += dd * dd, se += ed * ed, sq += qd * qd;
        }
        np[4 * r] = std::sqrt(sw), np[4 * r + 1] = std::sqrt(sdd), np[4 * r + 2] = std::sqrt(se);
        np[4 * r + 3] = std::sqrt(sq);
        continue;
      }
#if defined(__AVX512F__) && defined(__AVX512DQ__)
      {
        // 16 values a step, q as the portable path computes it (w * r rounded to nearest even,
        // clamped), squares summed in 2 x 8 float64 lanes per norm, then a fixed reduction.
        const __m512 rv = _mm512_set1_ps(rcp), lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
        const __m512d sv = _mm512_set1_pd(sd);
        __m512d acc[4][2];
        for (auto& a : acc) a[0] = a[1] = _mm512_setzero_pd();
        auto step = [&](int64_t j, __mmask16 mask) {
          const __m512 wv = _mm512_maskz_loadu_ps(mask, wr + j);
          __m512 qf = _mm512_roundscale_ps(_mm512_mul_ps(wv, rv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          qf = _mm512_min_ps(_mm512_max_ps(qf, lo), hi);  // (nan -> -127, as std::max in the portable path)
          _mm512_mask_cvtepi32_storeu_epi8(qr + j, mask, _mm512_cvtps_epi32(qf));
          const __m256 wh[2] = {_mm512_castps512_ps256(wv), _mm512_extractf32x8_ps(wv, 1)};
          const __m256 qh[2] = {_mm512_castps512_ps256(qf), _mm512_extractf32x8_ps(qf, 1)};
          for (int h = 0; h < 2; ++h) {
            const __m512d wd = _mm512_cvtps_pd(wh[h]), qd = _mm512_cvtps_pd(qh[h]);
            const __m512d dd = _mm512_mul_pd(sv, qd), ed = _mm512_sub_pd(wd, dd);  // dd exact
            acc[0][h] = _mm512_fmadd_pd(wd, wd, acc[0][h]);
            acc[1][h] = _mm512_fmadd_pd(dd, dd, acc[1][h]);
            acc[2][h] = _mm512_fmadd_pd(ed, ed, acc[2][h]);
            acc[3][h] = _mm512_fmadd_pd(qd, qd, acc[3][h]);
          }
        };
        int64_t j = 0;
        for (; j + 16 <= K; j += 16) step(j, __mmask16(0xFFFF));
        if (j < K) step(j, __mmask16((1u << (K - j)) - 1u));
        for (int t = 0; t < 4; ++t)
          np[4 * r + t] = std::sqrt(_mm512_reduce_add_pd(_mm512_add_pd(acc[t][0], acc[t][1])));
        continue;
      }
#endif
      constexpr int L = 8;
      double sw[L] = {}, sdd[L] = {}, se[L] = {}, sq[L] = {};
      auto one = [&](int64_t j, int l) {
        const float qf = std::min(127.0f, std::max(-127.0f, std::nearbyint(wr[j] * rcp)));
        qr[j] = static_cast<int8_t>(qf);
        const double wd = wr[j], qd = qf, dd = sd * qd, ed = wd - dd;
        sw[l] += wd * wd;
        sdd[l] += dd * dd;
        se[l] += ed * ed;
        sq[l] += qd * qd;
      };
      each_in_lanes<L>(K, one);
      fold_lanes<L / 2>(sw);
      fold_lanes<L / 2>(sdd);
      fold_lanes<L / 2>(se);
      fold_lanes<L / 2>(sq);
      np[4 * r] = std::sqrt(sw[0]);
      np[4 * r + 1] = std::sqrt(sdd[0]);
      np[4 * r + 2] = std::sqrt(se[0]);
      np[4 * r + 3] = std::sqrt(sq[0]);
    }
  });
  return {q, scale, norms};
}

}  // namespace barkgpt
