// LayerNorm over the last dim, forward and backward, on CPU.
//
// x is viewed as (rows, N). Forward saves per-row mean and rstd in the math type (fp32, or
// fp64 for fp64 input). Backward computes dx row by row and dW/dB as per-chunk partial sums
// reduced in chunk order: the chunking depends only on the shape, never on the thread count,
// so gradients are bitwise reproducible. Row sums use lane_sum (a fixed tree, not a serial
// chain), and y / dx go out with streaming stores when the op's tensors overflow the last-level
// cache (stream_output).
#include "common.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <tuple>
#include <vector>

namespace barkgpt {
namespace {

// Rows per task: LayerNorm rows are cheap, so even the bark presets' 32K-element activations
// are worth splitting over two threads.
inline int64_t ln_grain_rows(int64_t n) { return std::max<int64_t>(1, 8192 / std::max<int64_t>(1, n)); }

// Partial sums per row reduction: the row width for narrow rows, else two AVX-512 registers.
template <int NF>
constexpr int kLnLanes = NF > 0 && NF < 32 ? NF : 32;

// Calls f(std::integral_constant<int, NF>) with NF = N for the narrow widths of the presets
// (fully unrolled rows held in registers), NF = 0 (width known at run time) otherwise.
template <typename F>
void dispatch_width(int64_t N, const F& f) {
  switch (N) {
    case 8: f(std::integral_constant<int, 8>()); break;
    case 16: f(std::integral_constant<int, 16>()); break;
    case 32: f(std::integral_constant<int, 32>()); break;
    case 64: f(std::integral_constant<int, 64>()); break;
    case 128: f(std::integral_constant<int, 128>()); break;
    default: f(std::integral_constant<int, 0>()); break;
  }
}

// With row_buf (N elements), each row of y is computed there and streamed out (stream_copy);
// the caller fences, as for the backward.
template <int NF, typename scalar_t, typename acc_t>
void ln_fwd_rows(const scalar_t* x, const acc_t* w, const acc_t* b, scalar_t* y, acc_t* mean,
                 acc_t* rstd, int64_t r0, int64_t r1, int64_t N_rt, acc_t eps, scalar_t* row_buf) {
  const int64_t N = NF > 0 ? NF : N_rt;
  const acc_t inv_n = acc_t(1) / acc_t(N);
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* xr = x + r * N;
    scalar_t* yr = row_buf != nullptr ? row_buf : y + r * N;
    const acc_t mu = lane_sum<kLnLanes<NF>, acc_t>(N, [&](int64_t i) { return to_acc<acc_t>(xr[i]); }) * inv_n;
    // Two passes (the row is in cache): no cancellation from E[x^2] - E[x]^2.
    const acc_t ss = lane_sum<kLnLanes<NF>, acc_t>(N, [&](int64_t i) {
      const acc_t d = to_acc<acc_t>(xr[i]) - mu;
      return d * d;
    });
    const acc_t rs = acc_t(1) / std::sqrt(ss * inv_n + eps);
    mean[r] = mu;
    rstd[r] = rs;
    if (b != nullptr) {
#pragma omp simd
      for (int64_t i = 0; i < N; ++i)
        yr[i] = from_acc<scalar_t>((to_acc<acc_t>(xr[i]) - mu) * rs * w[i] + b[i]);
    } else {
#pragma omp simd
      for (int64_t i = 0; i < N; ++i)
        yr[i] = from_acc<scalar_t>((to_acc<acc_t>(xr[i]) - mu) * rs * w[i]);
    }
    if (row_buf != nullptr) stream_copy(y + r * N, row_buf, N * int64_t(sizeof(scalar_t)));
  }
}

// dx for rows [r0, r1); adds this chunk's dW, dB contributions into pw, pb (length N).
// gw and xhat are row scratch: reusing the rounded g*w of the sums keeps dx exactly 0 where it
// should be (N = 1), instead of leaving an FMA rounding residue amplified by rstd.
template <int NF, typename scalar_t, typename acc_t>
void ln_bwd_rows(const scalar_t* dy, const scalar_t* x, const acc_t* w, const acc_t* mean,
                 const acc_t* rstd, scalar_t* dx, acc_t* pw, acc_t* pb, acc_t* gw, acc_t* xhat,
                 int64_t r0, int64_t r1, int64_t N_rt, scalar_t* row_buf) {
  const int64_t N = NF > 0 ? NF : N_rt;
  const acc_t inv_n = acc_t(1) / acc_t(N);
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* xr = x + r * N;
    const scalar_t* gr = dy + r * N;
    scalar_t* dxr = row_buf != nullptr ? row_buf : dx + r * N;
    const acc_t mu = mean[r], rs = rstd[r];
    acc_t sum_gw, sum_gwx;
    lane_sum2<kLnLanes<NF>, acc_t>(N, [&](int64_t i, acc_t& p, acc_t& px) {
      const acc_t g = to_acc<acc_t>(gr[i]);
      const acc_t xh = (to_acc<acc_t>(xr[i]) - mu) * rs;
      p = g * w[i];
      px = p * xh;
      xhat[i] = xh;
      gw[i] = p;
      pw[i] += g * xh;
      pb[i] += g;
    }, sum_gw, sum_gwx);
    const acc_t a = sum_gw * inv_n, c = sum_gwx * inv_n;
#pragma omp simd
    for (int64_t i = 0; i < N; ++i) dxr[i] = from_acc<scalar_t>(rs * ((gw[i] - a) - xhat[i] * c));
    if (row_buf != nullptr) stream_copy(dx + r * N, row_buf, N * int64_t(sizeof(scalar_t)));
  }
}

template <typename scalar_t>
void layer_norm_bwd_kernel(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                           const at::Tensor& mean, const at::Tensor& rstd, at::Tensor& dx,
                           at::Tensor& partial, at::Tensor& dw_acc, at::Tensor& db_acc,
                           int64_t rows, int64_t N, int64_t rows_per_chunk, int64_t nchunks) {
  using acc_t = acc_type_t<scalar_t>;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* gp = dy.const_data_ptr<scalar_t>();
  scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
  const acc_t* wp = w.const_data_ptr<acc_t>();
  const acc_t* mp = mean.const_data_ptr<acc_t>();
  const acc_t* rp = rstd.const_data_ptr<acc_t>();
  acc_t* pw_all = partial.mutable_data_ptr<acc_t>();
  acc_t* pb_all = pw_all + nchunks * N;
  if (rows > 0) {
    // dx is written around the cache when dy, x and dx together overflow it (stream_output).
    const bool stream = stream_output(3 * dx.numel() * int64_t(dx.element_size()), N * int64_t(dx.element_size()));
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      std::vector<acc_t> scratch(2 * N);
      std::vector<scalar_t> row(stream ? N : 0);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t r0 = c * rows_per_chunk, r1 = std::min(rows, r0 + rows_per_chunk);
        dispatch_width(N, [&](auto nf) {
          ln_bwd_rows<decltype(nf)::value, scalar_t, acc_t>(gp, xp, wp, mp, rp, dxp, pw_all + c * N,
                                                            pb_all + c * N, scratch.data(),
                                                            scratch.data() + N, r0, r1, N,
                                                            stream ? row.data() : nullptr);
        });
      }
      if (stream) stream_fence();
    });
  }
  // Reduce the partials in chunk order (threads split the columns).
  acc_t* dwp = dw_acc.mutable_data_ptr<acc_t>();
  acc_t* dbp = db_acc.mutable_data_ptr<acc_t>();
  at::parallel_for(0, N, std::max<int64_t>(16, kGrainElems / nchunks), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) dwp[i] = dbp[i] = 0;
    for (int64_t c = 0; c < nchunks; ++c) {
      const acc_t* pw = pw_all + c * N;
      const acc_t* pb = pb_all + c * N;
#pragma omp simd
      for (int64_t i = i0; i < i1; ++i) {
        dwp[i] += pw[i];
        dbp[i] += pb[i];
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(
    const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    double eps) {
  TORCH_CHECK(x_in.dim() >= 1, "layer_norm: x must have at least one dimension");
  const int64_t N = x_in.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == N, "layer_norm: weight must have shape (",
              N, ",), got ", weight.sizes());
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "layer_norm: bias must have shape (", N,
                ",), got ", bias->sizes());
  at::Tensor x = x_in.contiguous();
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor y = empty_output(x.sizes(), x.options());
  auto stat_sizes = x.sizes().vec();
  stat_sizes.pop_back();
  at::Tensor mean = at::empty(stat_sizes, x.options().dtype(acc_dtype));
  at::Tensor rstd = at::empty(stat_sizes, x.options().dtype(acc_dtype));
  const int64_t rows = N == 0 ? 0 : x.numel() / N;
  if (rows == 0) return {y, mean, rstd};
  at::Tensor w = weight.to(acc_dtype).contiguous();
  at::Tensor b = has_bias ? bias->to(acc_dtype).contiguous() : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "layer_norm_fwd_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const acc_t* wp = w.const_data_ptr<acc_t>();
    const acc_t* bp = has_bias ? b.const_data_ptr<acc_t>() : nullptr;
    acc_t* mp = mean.mutable_data_ptr<acc_t>();
    acc_t* rp = rstd.mutable_data_ptr<acc_t>();
    const bool stream = stream_output(2 * y.numel() * int64_t(y.element_size()), N * int64_t(y.element_size()));
    at::parallel_for(0, rows, ln_grain_rows(N), [&](int64_t r0, int64_t r1) {
      std::vector<scalar_t> row(stream ? N : 0);
      dispatch_width(N, [&](auto nf) {
        ln_fwd_rows<decltype(nf)::value, scalar_t, acc_t>(xp, wp, bp, yp, mp, rp, r0, r1, N,
                                                          static_cast<acc_t>(eps),
                                                          stream ? row.data() : nullptr);
      });
      if (stream) stream_fence();
    });
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(
    const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean_in, const at::Tensor& rstd_in) {
  // A registered op is public API: every tensor the kernel indexes is checked here, so a
  // wrong-sized mean/rstd/weight raises instead of being read past its end.
  TORCH_CHECK(x_in.dim() >= 1, "layer_norm backward: x must have at least one dimension");
  const int64_t N = x_in.size(-1);
  TORCH_CHECK(dy_in.sizes() == x_in.sizes(), "layer_norm backward: grad shape ", dy_in.sizes(),
              " does not match x ", x_in.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == N, "layer_norm backward: weight must have shape (",
              N, ",), got ", weight.sizes());
  if (bias.has_value() && bias->defined())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "layer_norm backward: bias must have shape (",
                N, ",), got ", bias->sizes());
  const auto stat_shape = x_in.sizes().slice(0, x_in.dim() - 1);
  TORCH_CHECK(mean_in.sizes() == stat_shape && rstd_in.sizes() == stat_shape,
              "layer_norm backward: mean and rstd must have shape ", stat_shape, " (x.shape[:-1]), got ",
              mean_in.sizes(), " and ", rstd_in.sizes());
  at::Tensor x = x_in.contiguous();
  at::Tensor dy = dy_in.to(x.scalar_type()).contiguous();
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor mean = mean_in.to(acc_dtype).contiguous();
  at::Tensor rstd = rstd_in.to(acc_dtype).contiguous();
  at::Tensor w = weight.to(acc_dtype).contiguous();
  const auto db_dtype =
      (bias.has_value() && bias->defined()) ? bias->scalar_type() : weight.scalar_type();
  at::Tensor dx = empty_output(x.sizes(), x.options());
  const int64_t rows = N == 0 ? 0 : x.numel() / N;
  // Fixed chunking (shape-dependent only) so the dW/dB summation order never changes.
  // At most 64 chunks, so the partials stay small next to the input for wide rows.
  const int64_t rows_per_chunk = std::max(ln_grain_rows(N), ceil_div<int64_t>(rows, 64));
  const int64_t nchunks = std::max<int64_t>(1, ceil_div(rows, rows_per_chunk));
  at::Tensor partial = at::zeros({2, nchunks, N}, x.options().dtype(acc_dtype));
  at::Tensor dw_acc = at::empty({N}, x.options().dtype(acc_dtype));
  at::Tensor db_acc = at::empty({N}, x.options().dtype(acc_dtype));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "layer_norm_bwd_cpu", [&] {
    layer_norm_bwd_kernel<scalar_t>(dy, x, w, mean, rstd, dx, partial, dw_acc, db_acc, rows, N,
                                    rows_per_chunk, nchunks);
  });
  return {dx, dw_acc.to(weight.scalar_type()), db_acc.to(db_dtype)};
}

}  // namespace barkgpt
