// Attention against a K/V cache (generation), on CPU: queries (B, H, Tq, D) at positions
// offset .. offset + Tq - 1, keys/values (B, H, S, D) of which the first offset + Tq are in use.
// Query i of row b sees keys start[b] .. offset + i; one that sees none gives zeros.
// Inference only (no backward). Math is fp32 (fp64 for fp64).
//
// One task per query row: the row's scores over its keys in a buffer, then an exact softmax and
// the weighted sum of the value rows. A decode step (Tq = 1) reads each cached key and value row
// once; there is no T x T work to block for, and B * H rows give the threads their work.
#include "common.h"

#include <optional>
#include <vector>

namespace barkgpt {
namespace {

template <typename scalar_t>
void cached_attention_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const int64_t* start, int64_t offset, at::Tensor& out) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3);
  const int64_t L = offset + Tq;  // keys in use
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const scalar_t* kp = k.const_data_ptr<scalar_t>();
  const scalar_t* vp = v.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const int64_t qsb = q.stride(0), qsh = q.stride(1), qst = q.stride(2);
  const int64_t ksb = k.stride(0), ksh = k.stride(1), kst = k.stride(2);
  const int64_t vsb = v.stride(0), vsh = v.stride(1), vst = v.stride(2);
  const acc_t scale = acc_t(1) / std::sqrt(static_cast<acc_t>(D));
  const int64_t rows = B * H * Tq;
  at::parallel_for(0, rows, grain_rows(2 * L * D), [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> qrow(D), acc(D), s(L);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r % Tq, bh = r / Tq, b = bh / H, h = bh % H;
      const int64_t lo = start ? std::max<int64_t>(start[b], 0) : 0;
      const int64_t hi = offset + t + 1;
      scalar_t* o = op + r * D;  // out is contiguous
      if (lo >= hi) {
        for (int64_t d = 0; d < D; ++d) o[d] = scalar_t(0);
        continue;
      }
      const scalar_t* qr = qp + b * qsb + h * qsh + t * qst;
      for (int64_t d = 0; d < D; ++d) qrow[d] = static_cast<acc_t>(qr[d]) * scale;
      const scalar_t* kb = kp + b * ksb + h * ksh;
      const scalar_t* vb = vp + b * vsb + h * vsh;
      acc_t m = -std::numeric_limits<acc_t>::infinity();
      for (int64_t j = lo; j < hi; ++j) {
        const scalar_t* kr = kb + j * kst;
        const acc_t sj = lane_sum<16, acc_t>(D, [&](int64_t d) { return qrow[d] * static_cast<acc_t>(kr[d]); });
        s[j] = sj;
        m = std::max(m, sj);
      }
      std::fill(acc.begin(), acc.end(), acc_t(0));
      acc_t sum = 0;
      for (int64_t j = lo; j < hi; ++j) {
        const acc_t p = exp_fast(s[j] - m);
        sum += p;
        const scalar_t* vr = vb + j * vst;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) acc[d] += p * static_cast<acc_t>(vr[d]);
      }
      const acc_t inv = acc_t(1) / sum;
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(acc[d] * inv);
    }
  });
}

inline at::Tensor unit_last(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

}  // namespace

at::Tensor cached_attention_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                    const at::Tensor& v_in, const std::optional<at::Tensor>& start_in,
                                    int64_t offset) {
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4,
              "cached_attention: q, k, v must have shape (B, H, T, D)");
  TORCH_CHECK(q_in.scalar_type() == k_in.scalar_type() && q_in.scalar_type() == v_in.scalar_type(),
              "cached_attention: q, k, v must share a dtype");
  const int64_t B = q_in.size(0), H = q_in.size(1), Tq = q_in.size(2), D = q_in.size(3);
  TORCH_CHECK(k_in.sizes() == v_in.sizes() && k_in.size(0) == B && k_in.size(1) == H && k_in.size(3) == D,
              "cached_attention: k and v must have shape (B, H, S, D) matching q");
  TORCH_CHECK(offset >= 0 && offset + Tq <= k_in.size(2),
              "cached_attention: queries at ", offset, "..", offset + Tq - 1, " need ", offset + Tq,
              " cached keys, the cache holds ", k_in.size(2));
  at::Tensor q = unit_last(q_in), k = unit_last(k_in), v = unit_last(v_in);
  at::Tensor start;
  if (start_in.has_value() && start_in->defined()) {
    TORCH_CHECK(start_in->dim() == 1 && start_in->size(0) == B, "cached_attention: start must have shape (B,)");
    start = start_in->to(at::kLong).contiguous();
  }
  at::Tensor out = empty_output(q.sizes(), q.options());
  if (out.numel() == 0) return out;
  const int64_t* sp = start.defined() ? start.const_data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "cached_attention_fwd_cpu", [&] {
    cached_attention_kernel<scalar_t>(q, k, v, sp, offset, out);
  });
  return out;
}

}  // namespace barkgpt
