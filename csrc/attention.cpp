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

// Register blocking for the tile products: kRows rows of C times two SIMD vectors of columns
// stay in registers while K streams through (16 accumulators with AVX-512's 32 registers,
// 8 with AVX2/SSE's 16).
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
constexpr int kRows = 8;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
constexpr int kRows = 4;
#else
constexpr int kVecBytes = 16;
constexpr int kRows = 4;
#endif

#if defined(__GNUC__) || defined(__clang__)
// GCC/Clang vector extensions: lowered to whatever SIMD the build targets.
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(kVecBytes)));
  static constexpr int W = kVecBytes / sizeof(T);
  static inline type zero() { return type{}; }
  static inline type load(const T* p) {
    type v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static inline void store(T* p, const type& v) { std::memcpy(p, &v, sizeof(v)); }
};
#else
// Other compilers: a plain array the optimizer may vectorize.
template <typename T>
struct Vec {
  static constexpr int W = kVecBytes / sizeof(T);
  struct type {
    T v[W];
    type& operator+=(const type& o) {
      for (int i = 0; i < W; ++i) v[i] += o.v[i];
      return *this;
    }
    friend type operator*(T s, const type& a) {
      type r;
      for (int i = 0; i < W; ++i) r.v[i] = s * a.v[i];
      return r;
    }
  };
  static inline type zero() { return type{}; }
  static inline type load(const T* p) {
    type v;
    std::memcpy(v.v, p, sizeof(v.v));
    return v;
  }
  static inline void store(T* p, const type& v) { std::memcpy(p, v.v, sizeof(v.v)); }
};
#endif

static_assert(kPad % Vec<float>::W == 0 && kPad % Vec<double>::W == 0,
              "padded widths must be whole vectors");

// C[r, 0:NV*W] = (accumulate ? C : 0) + sum_k A[r*sam + k*sak] * B[k*ldb + 0:NV*W], r < R.
template <typename T, int R, int NV>
inline void micro_kernel(int64_t K, const T* A, int64_t sam, int64_t sak, const T* B,
                         int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  using V = Vec<T>;
  using vt = typename V::type;
  constexpr int W = V::W;
  vt c[R][NV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) c[r][j] = accumulate ? V::load(C + r * ldc + j * W) : V::zero();
  for (int64_t k = 0; k < K; ++k) {
    vt b[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) b[j] = V::load(B + k * ldb + j * W);
    const T* a = A + k * sak;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const T s = a[r * sam];
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) c[r][j] += s * b[j];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) V::store(C + r * ldc + j * W, c[r][j]);
}

template <typename T, int R>
inline void gemm_rows(int64_t N, int64_t K, const T* A, int64_t sam, int64_t sak, const T* B,
                      int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  constexpr int W = Vec<T>::W;
  int64_t n0 = 0;
  for (; n0 + 2 * W <= N; n0 += 2 * W)
    micro_kernel<T, R, 2>(K, A, sam, sak, B + n0, ldb, C + n0, ldc, accumulate);
  for (; n0 < N; n0 += W)
    micro_kernel<T, R, 1>(K, A, sam, sak, B + n0, ldb, C + n0, ldc, accumulate);
}

template <typename T, int R>
inline void gemm_tail(int64_t rows, int64_t N, int64_t K, const T* A, int64_t sam, int64_t sak,
                      const T* B, int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  if constexpr (R > 0) {
    if (rows == R)
      gemm_rows<T, R>(N, K, A, sam, sak, B, ldb, C, ldc, accumulate);
    else
      gemm_tail<T, R - 1>(rows, N, K, A, sam, sak, B, ldb, C, ldc, accumulate);
  }
}

// C[M, N] (+)= A[M, K] * B[K, N]; N must be a multiple of kPad.
template <typename T>
void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t sam, int64_t sak, const T* B,
          int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  int64_t m0 = 0;
  for (; m0 + kRows <= M; m0 += kRows)
    gemm_rows<T, kRows>(N, K, A + m0 * sam, sam, sak, B, ldb, C + m0 * ldc, ldc, accumulate);
  if (m0 < M)
    gemm_tail<T, kRows - 1>(M - m0, N, K, A + m0 * sam, sam, sak, B, ldb, C + m0 * ldc, ldc,
                            accumulate);
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
  // Zero the padding in one sweep (a memset) rather than row by row: for the narrow heads of
  // the presets (D = 1, 4) most of each padded row is padding.
  std::fill(dst + (D < ld ? 0 : rows * ld), dst + rows_pad * ld, acc_t(0));
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* s = src + r * st;
    acc_t* d = dst + r * ld;
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) d[i] = to_acc<acc_t>(s[i]);
  }
}

// dst[d, r] = src[r, d] for r < rows; zero columns rows..ld.
template <typename scalar_t, typename acc_t>
void pack_transposed(const scalar_t* src, int64_t st, int64_t rows, int64_t D, acc_t* dst,
                     int64_t ld) {
  for (int64_t d = 0; d < D; ++d) {
    acc_t* out = dst + d * ld;
    for (int64_t r = 0; r < rows; ++r) out[r] = to_acc<acc_t>(src[r * st + d]);
    std::fill(out + rows, out + ld, acc_t(0));
  }
}

// dst[r, d] = src[r, d] * (scale ? scale[r] : 1) for r < rows, d < D (the inverse of pack_rows).
template <typename scalar_t, typename acc_t>
void unpack_rows(const acc_t* src, int64_t ld, int64_t rows, int64_t D, scalar_t* dst,
                 const acc_t* scale = nullptr) {
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t* s = src + r * ld;
    scalar_t* d = dst + r * D;
    const acc_t a = scale != nullptr ? scale[r] : acc_t(1);
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) d[i] = from_acc<scalar_t>(s[i] * a);
  }
}

// Scores are kept transposed, S^T[key j][query i], so every softmax statistic (running max,
// sum, rescale factor, lse, delta) is a vector over queries: no per-row horizontal reductions,
// which dominate for the presets' short rows (T = 32, head dim 1..16).
//
// Marks the scores no query may use: keys past the block's jn real ones, and (causal) keys
// after the query. S^T tile is np x bqp with row stride ld; the block's queries start at i0.
template <typename T>
void mask_scores(T* st, int64_t ld, int64_t np, int64_t bqp, int64_t jn, int64_t j0, int64_t i0,
                 bool causal) {
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < np; ++j) {
    T* row = st + j * ld;
    if (j >= jn) {
      std::fill(row, row + bqp, ninf);
    } else if (causal) {
      // key j0 + j is visible to queries i0 + i with i >= j0 + j - i0
      const int64_t hidden = std::min(bqp, std::max<int64_t>(0, j0 + j - i0));
      std::fill(row, row + hidden, ninf);
    }
  }
}

// x[j][i] = exp(x[j][i] * a - shift[i]) for j < rows, i < cols. Out of line on purpose:
// inlined into the big loop nest, GCC turned exp_fast's clamps into branches and stopped
// vectorizing it.
template <typename T>
BARKGPT_NOINLINE void exp_rows(T* x, int64_t rows, int64_t cols, int64_t ld, const T* shift, T a) {
  for (int64_t j = 0; j < rows; ++j) {
    T* row = x + j * ld;
#pragma omp simd
    for (int64_t i = 0; i < cols; ++i) row[i] = exp_fast(row[i] * a - shift[i]);
  }
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
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();

  // Items are (batch*head, query block), batch*head major: a thread's contiguous range of
  // items repacks K and V only when its batch*head changes.
  at::parallel_for(0, B * H * nqb, 1, [&](int64_t it0, int64_t it1) {
    std::vector<acc_t> kpad(Tp * Dp), vpad(Tp * Dp), qt(D * kBlockQ), st(kBlockK * kBlockQ),
        o(kBlockQ * Dp), m(kBlockQ), ms(kBlockQ), mnew(kBlockQ), alpha(kBlockQ), l(kBlockQ);
    int64_t cur = -1;
    for (int64_t it = it0; it < it1; ++it) {
      const int64_t bh = it / nqb, b = bh / H, h = bh % H;
      const int64_t i0 = (it % nqb) * kBlockQ, bq = std::min(kBlockQ, T - i0);
      const int64_t bqp = round_up(bq, kPad);
      if (bh != cur) {
        cur = bh;
        pack_rows(kp + b * vk.sb + h * vk.sh, vk.st, T, D, kpad.data(), Dp, Tp);
        pack_rows(vp + b * vv.sb + h * vv.sh, vv.st, T, D, vpad.data(), Dp, Tp);
      }
      pack_transposed(qp + b * vq.sb + h * vq.sh + i0 * vq.st, vq.st, bq, D, qt.data(), bqp);
      std::fill(m.begin(), m.end(), ninf);
      std::fill(l.begin(), l.end(), acc_t(0));
      std::fill(o.begin(), o.begin() + bq * Dp, acc_t(0));
      const int64_t kend = causal ? i0 + bq : T;
      for (int64_t j0 = 0; j0 < kend; j0 += kBlockK) {
        const int64_t jn = std::min(kBlockK, kend - j0), np = round_up(jn, kPad);
        // S^T = K_blk Q^T: (np x bqp); K is the broadcast operand, read from its rows
        gemm<acc_t>(np, bqp, D, kpad.data() + j0 * Dp, Dp, 1, qt.data(), bqp, st.data(), kBlockQ, false);
        mask_scores(st.data(), kBlockQ, np, bqp, jn, j0, i0, causal);
        std::copy(m.begin(), m.begin() + bqp, mnew.begin());
        for (int64_t j = 0; j < np; ++j) {
          const acc_t* row = st.data() + j * kBlockQ;
#pragma omp simd
          for (int64_t i = 0; i < bqp; ++i) mnew[i] = row[i] > mnew[i] ? row[i] : mnew[i];
        }
#pragma omp simd
        for (int64_t i = 0; i < bqp; ++i) ms[i] = mnew[i] * scale;
        exp_rows(m.data(), 1, bqp, kBlockQ, ms.data(), scale);  // alpha = exp((m - mnew) scale)
        std::copy(m.begin(), m.begin() + bqp, alpha.begin());
        exp_rows(st.data(), np, bqp, kBlockQ, ms.data(), scale);  // P^T
        for (int64_t i = 0; i < bqp; ++i) l[i] *= alpha[i];
        for (int64_t j = 0; j < np; ++j) {
          const acc_t* row = st.data() + j * kBlockQ;
#pragma omp simd
          for (int64_t i = 0; i < bqp; ++i) l[i] += row[i];
        }
        std::copy(mnew.begin(), mnew.begin() + bqp, m.begin());
        if (j0 > 0) {
          for (int64_t i = 0; i < bq; ++i) {
            acc_t* orow = o.data() + i * Dp;
            const acc_t a = alpha[i];
#pragma omp simd
            for (int64_t d = 0; d < Dp; ++d) orow[d] *= a;
          }
        }
        // O += P V_blk, P read transposed from S^T
        gemm<acc_t>(bq, Dp, np, st.data(), 1, kBlockQ, vpad.data() + j0 * Dp, Dp, o.data(), Dp, true);
      }
      scalar_t* orow0 = op + ((b * H + h) * T + i0) * D;
      acc_t* lrow = lp + (b * H + h) * T + i0;
      for (int64_t i = 0; i < bq; ++i) {
        lrow[i] = m[i] * scale + std::log(l[i]);
        l[i] = acc_t(1) / l[i];
      }
      unpack_rows(o.data(), Dp, bq, D, orow0, l.data());
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

  // Row stride of the transposed Q and dO: not a multiple of 4 KiB (as Tp = 1024 fp32 is),
  // which would put the D elements a tile product reads per step in one L1 set.
  int64_t ldt = Tp + kPad;
  if ((ldt * int64_t(sizeof(acc_t))) % 4096 == 0) ldt += kPad;
  // One (batch, head) per task: dK and dV accumulate over all query blocks, in a fixed order.
  at::parallel_for(0, B * H, 1, [&](int64_t bh0, int64_t bh1) {
    std::vector<acc_t> qt(D * ldt), qpad(Tp * Dp), kpad(Tp * Dp), vpad(Tp * Dp), dot(D * ldt),
        dopad(Tp * Dp), dqa(Tp * Dp), dka(Tp * Dp), dva(Tp * Dp), lsepad(Tp), delta(Tp),
        st(kBlockK * kBlockQ), dst(kBlockK * kBlockQ);
    for (int64_t bh = bh0; bh < bh1; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const scalar_t* qbh = qp + b * vq.sb + h * vq.sh;
      const scalar_t* kbh = kp + b * vk.sb + h * vk.sh;
      const scalar_t* vbh = vp + b * vv.sb + h * vv.sh;
      const scalar_t* obh = outp + b * vo.sb + h * vo.sh;
      const scalar_t* dobh = dop + b * vdo.sb + h * vdo.sh;
      pack_transposed(qbh, vq.st, T, D, qt.data(), ldt);
      pack_rows(qbh, vq.st, T, D, qpad.data(), Dp, Tp);
      pack_rows(kbh, vk.st, T, D, kpad.data(), Dp, Tp);
      pack_rows(vbh, vv.st, T, D, vpad.data(), Dp, Tp);
      pack_transposed(dobh, vdo.st, T, D, dot.data(), ldt);
      pack_rows(dobh, vdo.st, T, D, dopad.data(), Dp, Tp);
      // Padded queries get lse = +inf, so their P (and every gradient they touch) is 0.
      std::copy(lsep + bh * T, lsep + (bh + 1) * T, lsepad.begin());
      std::fill(lsepad.begin() + T, lsepad.end(), std::numeric_limits<acc_t>::infinity());
      // delta[i] = sum_d dO[i, d] O[i, d], vectorized over i (dO^T is packed already)
      std::fill(delta.begin(), delta.end(), acc_t(0));
      for (int64_t d = 0; d < D; ++d) {
        const acc_t* dcol = dot.data() + d * ldt;
#pragma omp simd
        for (int64_t i = 0; i < T; ++i) delta[i] += dcol[i] * to_acc<acc_t>(obh[i * vo.st + d]);
      }
      std::fill(dqa.begin(), dqa.end(), acc_t(0));
      std::fill(dka.begin(), dka.end(), acc_t(0));
      std::fill(dva.begin(), dva.end(), acc_t(0));
      for (int64_t i0 = 0; i0 < T; i0 += kBlockQ) {
        const int64_t bq = std::min(kBlockQ, T - i0), bqp = round_up(bq, kPad);
        const int64_t kend = causal ? i0 + bq : T;
        const acc_t* li = lsepad.data() + i0;
        const acc_t* di = delta.data() + i0;
        for (int64_t j0 = 0; j0 < kend; j0 += kBlockK) {
          const int64_t jn = std::min(kBlockK, kend - j0), np = round_up(jn, kPad);
          // P^T = exp(S^T scale - lse), zero where masked or padded
          gemm<acc_t>(np, bqp, D, kpad.data() + j0 * Dp, Dp, 1, qt.data() + i0, ldt, st.data(), kBlockQ, false);
          mask_scores(st.data(), kBlockQ, np, bqp, jn, j0, i0, causal);
          exp_rows(st.data(), np, bqp, kBlockQ, li, scale);
          // dV_blk += P^T dO_blk
          gemm<acc_t>(np, Dp, bq, st.data(), kBlockQ, 1, dopad.data() + i0 * Dp, Dp,
                      dva.data() + j0 * Dp, Dp, true);
          // dP^T = V_blk dO^T, then dS^T = P^T (dP^T - delta) scale
          gemm<acc_t>(np, bqp, D, vpad.data() + j0 * Dp, Dp, 1, dot.data() + i0, ldt, dst.data(), kBlockQ, false);
          for (int64_t j = 0; j < np; ++j) {
            const acc_t* pr = st.data() + j * kBlockQ;
            acc_t* dr = dst.data() + j * kBlockQ;
#pragma omp simd
            for (int64_t i = 0; i < bqp; ++i) dr[i] = pr[i] * (dr[i] - di[i]) * scale;
          }
          // dQ_blk += dS K_blk ; dK_blk += dS^T Q_blk
          gemm<acc_t>(bq, Dp, np, dst.data(), 1, kBlockQ, kpad.data() + j0 * Dp, Dp,
                      dqa.data() + i0 * Dp, Dp, true);
          gemm<acc_t>(np, Dp, bq, dst.data(), kBlockQ, 1, qpad.data() + i0 * Dp, Dp,
                      dka.data() + j0 * Dp, Dp, true);
        }
      }
      const int64_t base = bh * T * D;
      unpack_rows(dqa.data(), Dp, T, D, dqp + base);
      unpack_rows(dka.data(), Dp, T, D, dkp + base);
      unpack_rows(dva.data(), Dp, T, D, dvp + base);
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
  at::Tensor out = empty_output(q.sizes(), q.options());
  at::Tensor lse = empty_output({q.size(0), q.size(1), q.size(2)}, q.options().dtype(acc_dtype));
  if (q.numel() == 0) {
    // Head dim 0 (or no rows): every score is 0, so lse is the log of the number of keys seen.
    const int64_t T = q.size(2), S = k.size(2);
    AT_DISPATCH_FLOATING_TYPES(lse.scalar_type(), "attention_fwd_cpu_lse", [&] {
      scalar_t* lp = lse.mutable_data_ptr<scalar_t>();
      for (int64_t r = 0; r < lse.numel(); ++r)
        lp[r] = std::log(static_cast<scalar_t>(causal ? std::min(r % T + 1, S) : S));
    });
    return {out, lse};
  }
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
              "attention backward: grad and out must have q's shape ", q_in.sizes(), ", got ",
              dout_in.sizes(), " and ", out_in.sizes());
  // lse is read once per query row: a shorter one would be read past its end.
  TORCH_CHECK(lse_in.dim() == 3 && lse_in.size(0) == q_in.size(0) && lse_in.size(1) == q_in.size(1) &&
                  lse_in.size(2) == q_in.size(2),
              "attention backward: lse must have shape (B, H, T) = (", q_in.size(0), ", ", q_in.size(1),
              ", ", q_in.size(2), "), got ", lse_in.sizes());
  at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  at::Tensor out = unit_last_stride(out_in.to(q.scalar_type()));
  at::Tensor dout = unit_last_stride(dout_in.to(q.scalar_type()));
  const auto acc_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor lse = lse_in.to(acc_dtype).contiguous();
  at::Tensor dq = empty_output(q.sizes(), q.options());
  at::Tensor dk = empty_output(q.sizes(), q.options());
  at::Tensor dv = empty_output(q.sizes(), q.options());
  if (q.numel() == 0) return {dq, dk, dv};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_bwd_cpu", [&] {
    attention_bwd_kernel<scalar_t>(dout, q, k, v, out, lse, dq, dk, dv, causal);
  });
  return {dq, dk, dv};
}

}  // namespace barkgpt
