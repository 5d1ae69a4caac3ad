// Scaled dot-product attention on (B, H, T, D) tensors, forward and backward, on CPU.
//
// Flash-attention style: queries in blocks of kBlockQ rows, keys in blocks of kBlockK, an
// online softmax, so no T x T matrix exists (memory is linear in T). Forward saves the
// log-sum-exp per query row; backward recomputes P from it. Math is fp32 (fp64 for fp64).
//
// Every tile product goes through one register-blocked kernel, C (+)= A * B, where A may have
// any strides (its elements are broadcast) and B/C rows are contiguous and padded to a
// multiple of kPad elements, so the kernel has no tail cases. Operands are packed (converted
// to the math type, padded with zeros) once per (batch, head).
#include "common.h"

#include <ATen/ops/empty.h>

#include <tuple>
#include <vector>

namespace barkgpt {
namespace {

constexpr int64_t kPad = 16;
constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 64;
static_assert(kBlockK % kPad == 0, "key blocks must be padded-width multiples");
static_assert(kBlockQ == kBlockK, "the causal block skip assumes aligned square blocks");

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif

// C[r, 0:NC] = (accumulate ? C[r, 0:NC] : 0) + sum_k A[r, k] * B[k, 0:NC] for r < R.
template <typename T, int R, int NC>
inline void micro_kernel(int64_t K, const T* A, int64_t sam, int64_t sak, const T* B,
                         int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  T c[R][NC];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 64
    for (int j = 0; j < NC; ++j) c[r][j] = accumulate ? C[r * ldc + j] : T(0);
  for (int64_t k = 0; k < K; ++k) {
    const T* b = B + k * ldb;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const T a = A[r * sam + k * sak];
#pragma GCC unroll 64
      for (int j = 0; j < NC; ++j) c[r][j] += a * b[j];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 64
    for (int j = 0; j < NC; ++j) C[r * ldc + j] = c[r][j];
}

template <typename T, int R>
inline void gemm_rows(int64_t N, int64_t K, const T* A, int64_t sam, int64_t sak, const T* B,
                      int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  constexpr int kWide = std::max<int>(kPad, 2 * kVecBytes / sizeof(T));
  int64_t n0 = 0;
  for (; n0 + kWide <= N; n0 += kWide)
    micro_kernel<T, R, kWide>(K, A, sam, sak, B + n0, ldb, C + n0, ldc, accumulate);
  for (; n0 < N; n0 += kPad)
    micro_kernel<T, R, kPad>(K, A, sam, sak, B + n0, ldb, C + n0, ldc, accumulate);
}

// C[M, N] (+)= A[M, K] * B[K, N]; N must be a multiple of kPad.
template <typename T>
void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t sam, int64_t sak, const T* B,
          int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  constexpr int R = 4;
  int64_t m0 = 0;
  for (; m0 + R <= M; m0 += R)
    gemm_rows<T, R>(N, K, A + m0 * sam, sam, sak, B, ldb, C + m0 * ldc, ldc, accumulate);
  switch (M - m0) {
    case 3: gemm_rows<T, 3>(N, K, A + m0 * sam, sam, sak, B, ldb, C + m0 * ldc, ldc, accumulate); break;
    case 2: gemm_rows<T, 2>(N, K, A + m0 * sam, sam, sak, B, ldb, C + m0 * ldc, ldc, accumulate); break;
    case 1: gemm_rows<T, 1>(N, K, A + m0 * sam, sam, sak, B, ldb, C + m0 * ldc, ldc, accumulate); break;
    default: break;
  }
}

// A (B, H, T, D) tensor with unit stride along D.
struct View4 {
  int64_t sb, sh, st;
};

inline View4 view_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

inline at::Tensor unit_last_stride(const at::Tensor& t) {
  return t.stride(-1) == 1 ? t : t.contiguous();
}

// dst[r, d] = src[r, d] for r < rows, d < D; zeros up to (rows_pad, ld).
template <typename scalar_t, typename acc_t>
void pack_rows(const scalar_t* src, int64_t st, int64_t rows, int64_t D, acc_t* dst, int64_t ld,
               int64_t rows_pad) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* s = src + r * st;
    acc_t* d = dst + r * ld;
    for (int64_t i = 0; i < D; ++i) d[i] = to_acc<acc_t>(s[i]);
    for (int64_t i = D; i < ld; ++i) d[i] = acc_t(0);
  }
  std::fill(dst + rows * ld, dst + rows_pad * ld, acc_t(0));
}

// dst[d, r] = src[r, d] for r < rows; zero columns rows..ld.
template <typename scalar_t, typename acc_t>
void pack_transposed(const scalar_t* src, int64_t st, int64_t rows, int64_t D, acc_t* dst,
                     int64_t ld) {
  for (int64_t d = 0; d < D; ++d) std::fill(dst + d * ld + rows, dst + (d + 1) * ld, acc_t(0));
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* s = src + r * st;
    for (int64_t d = 0; d < D; ++d) dst[d * ld + r] = to_acc<acc_t>(s[d]);
  }
}

// Number of keys row i of a block starting at key j0 may see, among the jn in the block.
inline int64_t visible_keys(bool causal, int64_t i, int64_t j0, int64_t jn) {
  return causal ? std::min(jn, i - j0 + 1) : jn;
}

template <typename scalar_t>
void attention_fwd_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          at::Tensor& out, at::Tensor& lse, bool causal) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  const int64_t Tp = round_up(T, kPad), Dp = round_up(D, kPad);
  const int64_t nqb = ceil_div(T, kBlockQ);
  const acc_t scale = acc_t(1) / std::sqrt(acc_t(D));
  const View4 vq = view_of(q), vk = view_of(k), vv = view_of(v);
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const scalar_t* kp = k.const_data_ptr<scalar_t>();
  const scalar_t* vp = v.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  acc_t* lp = lse.mutable_data_ptr<acc_t>();

  // Items are (batch*head, query block), batch*head major: a thread's contiguous range of
  // items repacks K and V only when its batch*head changes.
  at::parallel_for(0, B * H * nqb, 1, [&](int64_t it0, int64_t it1) {
    std::vector<acc_t> kt(D * Tp), vpad(Tp * Dp), qb(kBlockQ * D), s(kBlockQ * kBlockK),
        o(kBlockQ * Dp), m(kBlockQ), l(kBlockQ);
    int64_t cur = -1;
    for (int64_t it = it0; it < it1; ++it) {
      const int64_t bh = it / nqb, b = bh / H, h = bh % H;
      const int64_t i0 = (it % nqb) * kBlockQ, bq = std::min(kBlockQ, T - i0);
      if (bh != cur) {
        cur = bh;
        pack_transposed(kp + b * vk.sb + h * vk.sh, vk.st, T, D, kt.data(), Tp);
        pack_rows(vp + b * vv.sb + h * vv.sh, vv.st, T, D, vpad.data(), Dp, Tp);
      }
      pack_rows(qp + b * vq.sb + h * vq.sh + i0 * vq.st, vq.st, bq, D, qb.data(), D, bq);
      std::fill(m.begin(), m.end(), -std::numeric_limits<acc_t>::infinity());
      std::fill(l.begin(), l.end(), acc_t(0));
      std::fill(o.begin(), o.end(), acc_t(0));
      const int64_t kend = causal ? i0 + bq : T;
      for (int64_t j0 = 0; j0 < kend; j0 += kBlockK) {
        const int64_t jn = std::min(kBlockK, kend - j0), np = round_up(jn, kPad);
        gemm<acc_t>(bq, np, D, qb.data(), D, 1, kt.data() + j0, Tp, s.data(), kBlockK, false);
        for (int64_t r = 0; r < bq; ++r) {
          acc_t* sr = s.data() + r * kBlockK;
          const int64_t lim = visible_keys(causal, i0 + r, j0, jn);
          acc_t mx = m[r];
          for (int64_t j = 0; j < lim; ++j) mx = std::max(mx, sr[j]);
          const acc_t alpha = m[r] == -std::numeric_limits<acc_t>::infinity()
                                  ? acc_t(0) : exp_fast((m[r] - mx) * scale);
          acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int64_t j = 0; j < lim; ++j) {
            const acc_t p = exp_fast((sr[j] - mx) * scale);
            sr[j] = p;
            sum += p;
          }
          for (int64_t j = lim; j < np; ++j) sr[j] = acc_t(0);
          m[r] = mx;
          l[r] = l[r] * alpha + sum;
          if (alpha != acc_t(1)) {
            acc_t* orow = o.data() + r * Dp;
#pragma omp simd
            for (int64_t d = 0; d < Dp; ++d) orow[d] *= alpha;
          }
        }
        gemm<acc_t>(bq, Dp, np, s.data(), kBlockK, 1, vpad.data() + j0 * Dp, Dp, o.data(), Dp, true);
      }
      scalar_t* orow0 = op + ((b * H + h) * T + i0) * D;
      acc_t* lrow = lp + (b * H + h) * T + i0;
      for (int64_t r = 0; r < bq; ++r) {
        const acc_t inv = acc_t(1) / l[r];
        const acc_t* orow = o.data() + r * Dp;
        for (int64_t d = 0; d < D; ++d) orow0[r * D + d] = from_acc<scalar_t>(orow[d] * inv);
        lrow[r] = m[r] * scale + std::log(l[r]);
      }
    }
  });
}

template <typename scalar_t>
void attention_bwd_kernel(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                          const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                          at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, bool causal) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  const int64_t Tp = round_up(T, kPad), Dp = round_up(D, kPad);
  const acc_t scale = acc_t(1) / std::sqrt(acc_t(D));
  const View4 vq = view_of(q), vk = view_of(k), vv = view_of(v), vo = view_of(out),
              vdo = view_of(dout);
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const scalar_t* kp = k.const_data_ptr<scalar_t>();
  const scalar_t* vp = v.const_data_ptr<scalar_t>();
  const scalar_t* outp = out.const_data_ptr<scalar_t>();
  const scalar_t* dop = dout.const_data_ptr<scalar_t>();
  const acc_t* lsep = lse.const_data_ptr<acc_t>();
  scalar_t* dqp = dq.mutable_data_ptr<scalar_t>();
  scalar_t* dkp = dk.mutable_data_ptr<scalar_t>();
  scalar_t* dvp = dv.mutable_data_ptr<scalar_t>();

  // One (batch, head) per task: dK and dV accumulate over all query blocks, in a fixed order.
  at::parallel_for(0, B * H, 1, [&](int64_t bh0, int64_t bh1) {
    std::vector<acc_t> qpad(Tp * Dp), kpad(Tp * Dp), kt(D * Tp), vt(D * Tp), dopad(Tp * Dp),
        dqa(Tp * Dp), dka(Tp * Dp), dva(Tp * Dp), delta(T), s(kBlockQ * kBlockK),
        dpb(kBlockQ * kBlockK);
    for (int64_t bh = bh0; bh < bh1; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const scalar_t* qbh = qp + b * vq.sb + h * vq.sh;
      const scalar_t* kbh = kp + b * vk.sb + h * vk.sh;
      const scalar_t* vbh = vp + b * vv.sb + h * vv.sh;
      const scalar_t* obh = outp + b * vo.sb + h * vo.sh;
      const scalar_t* dobh = dop + b * vdo.sb + h * vdo.sh;
      const acc_t* lrow = lsep + bh * T;
      pack_rows(qbh, vq.st, T, D, qpad.data(), Dp, Tp);
      pack_rows(kbh, vk.st, T, D, kpad.data(), Dp, Tp);
      pack_transposed(kbh, vk.st, T, D, kt.data(), Tp);
      pack_transposed(vbh, vv.st, T, D, vt.data(), Tp);
      pack_rows(dobh, vdo.st, T, D, dopad.data(), Dp, Tp);
      for (int64_t i = 0; i < T; ++i) {
        const scalar_t* orow = obh + i * vo.st;
        const acc_t* drow = dopad.data() + i * Dp;
        acc_t acc = 0;
        for (int64_t d = 0; d < D; ++d) acc += drow[d] * to_acc<acc_t>(orow[d]);
        delta[i] = acc;
      }
      std::fill(dqa.begin(), dqa.end(), acc_t(0));
      std::fill(dka.begin(), dka.end(), acc_t(0));
      std::fill(dva.begin(), dva.end(), acc_t(0));
      for (int64_t i0 = 0; i0 < T; i0 += kBlockQ) {
        const int64_t bq = std::min(kBlockQ, T - i0);
        const int64_t kend = causal ? i0 + bq : T;
        for (int64_t j0 = 0; j0 < kend; j0 += kBlockK) {
          const int64_t jn = std::min(kBlockK, kend - j0), np = round_up(jn, kPad);
          // S = Q K^T, then P = exp(S * scale - lse), zero where masked or padded.
          gemm<acc_t>(bq, np, D, qpad.data() + i0 * Dp, Dp, 1, kt.data() + j0, Tp, s.data(),
                      kBlockK, false);
          for (int64_t r = 0; r < bq; ++r) {
            acc_t* sr = s.data() + r * kBlockK;
            const int64_t lim = visible_keys(causal, i0 + r, j0, jn);
            const acc_t lr = lrow[i0 + r];
#pragma omp simd
            for (int64_t j = 0; j < lim; ++j) sr[j] = exp_fast(sr[j] * scale - lr);
            for (int64_t j = lim; j < np; ++j) sr[j] = acc_t(0);
          }
          // dV += P^T dO
          gemm<acc_t>(np, Dp, bq, s.data(), 1, kBlockK, dopad.data() + i0 * Dp, Dp,
                      dva.data() + j0 * Dp, Dp, true);
          // dP = dO V^T, then dS = P * (dP - delta) * scale
          gemm<acc_t>(bq, np, D, dopad.data() + i0 * Dp, Dp, 1, vt.data() + j0, Tp, dpb.data(),
                      kBlockK, false);
          for (int64_t r = 0; r < bq; ++r) {
            const acc_t* pr = s.data() + r * kBlockK;
            acc_t* dr = dpb.data() + r * kBlockK;
            const acc_t dl = delta[i0 + r];
#pragma omp simd
            for (int64_t j = 0; j < np; ++j) dr[j] = pr[j] * (dr[j] - dl) * scale;
          }
          // dQ += dS K ; dK += dS^T Q
          gemm<acc_t>(bq, Dp, np, dpb.data(), kBlockK, 1, kpad.data() + j0 * Dp, Dp,
                      dqa.data() + i0 * Dp, Dp, true);
          gemm<acc_t>(np, Dp, bq, dpb.data(), 1, kBlockK, qpad.data() + i0 * Dp, Dp,
                      dka.data() + j0 * Dp, Dp, true);
        }
      }
      const int64_t base = bh * T * D;
      for (int64_t i = 0; i < T; ++i) {
        for (int64_t d = 0; d < D; ++d) {
          dqp[base + i * D + d] = from_acc<scalar_t>(dqa[i * Dp + d]);
          dkp[base + i * D + d] = from_acc<scalar_t>(dka[i * Dp + d]);
          dvp[base + i * D + d] = from_acc<scalar_t>(dva[i * Dp + d]);
        }
      }
    }
  });
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4, "attention: q must have shape (B, H, T, D), got ", q.sizes());
  TORCH_CHECK(q.sizes() == k.sizes() && q.sizes() == v.sizes(),
              "attention: q, k, v must have the same shape, got ", q.sizes(), ", ", k.sizes(),
              ", ", v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "attention: q, k, v must share a dtype");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q_in,
                                                     const at::Tensor& k_in,
                                                     const at::Tensor& v_in, bool causal) {
  check_qkv(q_in, k_in, v_in);
  at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const auto acc_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(acc_dtype));
  if (q.numel() == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_fwd_cpu", [&] {
    attention_fwd_kernel<scalar_t>(q, k, v, out, lse, causal);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in, bool causal) {
  check_qkv(q_in, k_in, v_in);
  TORCH_CHECK(dout_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(),
              "attention backward: grad/out shape mismatch");
  at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  at::Tensor out = unit_last_stride(out_in.to(q.scalar_type()));
  at::Tensor dout = unit_last_stride(dout_in.to(q.scalar_type()));
  const auto acc_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor lse = lse_in.to(acc_dtype).contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(q.sizes(), q.options());
  at::Tensor dv = at::empty(q.sizes(), q.options());
  if (q.numel() == 0) return {dq, dk, dv};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_bwd_cpu", [&] {
    attention_bwd_kernel<scalar_t>(dout, q, k, v, out, lse, dq, dk, dv, causal);
  });
  return {dq, dk, dv};
}

}  // namespace barkgpt
