// Fused linear + cross-entropy on CPU: loss = CE(x @ W^T (+ b), targets), never building the
// (N, V) logits in full.
//
// Rows go through in chunks of R rows. Per chunk: the logits chunk z = x_c W^T (+ b) goes into
// one preallocated (R, V) buffer through gemm_out (csrc/gemm.h: oneDNN where it runs); each row's max, exp-sum and log-sum-exp are
// taken in place and the row is turned into its gradient, (softmax - onehot(target)) * scale,
// where scale is 1 / (number of kept targets) for "mean" and 1 for "sum" (0 for ignored rows);
// then dx_c = z W and dW += z^T x_c (accumulated inside the GEMM; db += column sums of z). So the
// gradients are complete when the forward returns, and the backward only multiplies them by the
// upstream gradient (barkgpt/_cpp.py). R keeps the buffer near kChunkBytes (see
// chunk_rows_for).
//
// Math in fp32 (fp64 when an input is fp64); bf16/fp16 inputs are converted per chunk (the
// weight once). Deterministic: the chunking depends only on the shape, dW/db accumulate chunk by
// chunk in order, the per-row losses are summed in row order in double. Targets other than
// ignore_index outside [0, V) raise IndexError before anything is computed.
#include "common.h"
#include "gemm.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/zeros.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace barkgpt {
namespace {

// About this many bytes of logits per chunk. Every chunk streams W twice and dW once (read and
// written), so few, large chunks pay: at GPT-2's head (V = 50304) 48 MiB is 240 rows, which
// measured faster than 80 (16 MiB, a chunk that stays in the last-level cache) and 512 rows,
// with one thread (`linear_cross_entropy_fwd_ex`'s chunk_rows), while the memory it adds stays
// ~1/40 of the eager logits' at N = 4096.
constexpr int64_t kChunkBytes = int64_t(48) << 20;
constexpr int64_t kMinChunkRows = 64;

int64_t chunk_rows_for(int64_t N, int64_t V, int64_t elem, int64_t requested) {
  if (N <= 0) return 1;
  if (requested > 0) return std::min(requested, N);
  int64_t r = kChunkBytes / std::max<int64_t>(1, V * elem);
  r = std::max(kMinChunkRows, r / 16 * 16);
  return std::min(r, N);
}

// Rows [r0, r1) of the logits chunk z (row-major, V wide): each row's loss into row_loss and,
// when grad, the row replaced by (softmax - onehot) * scale (zeros for an ignored row).
template <typename acc_t>
void softmax_xent_rows(acc_t* z, int64_t V, const int64_t* tgt, int64_t ignore_index, acc_t scale,
                       acc_t* row_loss, bool grad, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    acc_t* zr = z + r * V;
    const int64_t t = tgt[r];
    if (t == ignore_index) {
      row_loss[r] = 0;
      if (grad) std::fill(zr, zr + V, acc_t(0));
      continue;
    }
    acc_t m = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t i = 0; i < V; ++i) m = std::max(m, zr[i]);
    const acc_t zt = zr[t];
    acc_t s;
    if (grad) {
      // exp stored in place (index i only), summed in a fixed lane order.
      s = lane_sum<16, acc_t>(V, [&](int64_t i) {
        const acc_t e = exp_fast(zr[i] - m);
        zr[i] = e;
        return e;
      });
    } else {
      s = lane_sum<16, acc_t>(V, [&](int64_t i) { return exp_fast(zr[i] - m); });
    }
    row_loss[r] = (m + std::log(s)) - zt;
    if (grad) {
      const acc_t k = scale / s;
#pragma omp simd
      for (int64_t i = 0; i < V; ++i) zr[i] *= k;
      zr[t] -= scale;
    }
  }
}

}  // namespace

// (loss, dx, dweight, dbias): loss is 0-d in the math type; the gradients are those of loss
// (already reduced) in x's, weight's and bias's dtypes, or empty (0,) tensors when !compute_grad
// (dbias also when bias is None).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_fwd_ex_cpu(
    const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& targets,
    const std::optional<at::Tensor>& bias, int64_t ignore_index, c10::string_view reduction,
    bool compute_grad, int64_t chunk_rows) {
  TORCH_CHECK(x_in.dim() >= 1, "linear_cross_entropy: x must have shape (..., C)");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x_in.size(-1),
              "linear_cross_entropy: weight must have shape (V, ", x_in.size(-1), "), got ",
              weight.sizes());
  TORCH_CHECK(weight.size(0) > 0, "linear_cross_entropy: weight has no rows (V = 0)");
  TORCH_CHECK(targets.sizes() == x_in.sizes().slice(0, x_in.dim() - 1),
              "linear_cross_entropy: targets must have shape x.shape[:-1], got ", targets.sizes());
  TORCH_CHECK(targets.scalar_type() == at::kLong || targets.scalar_type() == at::kInt,
              "linear_cross_entropy: targets must be int64 or int32, got ", targets.scalar_type());
  const bool has_bias = bias.has_value() && bias->defined();
  const int64_t V = weight.size(0), C = weight.size(1);
  if (has_bias)
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == V, "linear_cross_entropy: bias must have shape (",
                V, ",), got ", bias->sizes());
  TORCH_CHECK(reduction == "mean" || reduction == "sum",
              "linear_cross_entropy: reduction must be 'mean' or 'sum', got '", std::string(reduction), "'");
  for (const at::Tensor* t : {&x_in, &weight}) {
    TORCH_CHECK(at::isFloatingType(t->scalar_type()), "linear_cross_entropy: x and weight must be "
                "floating tensors, got ", t->scalar_type());
  }
  const bool f64 = x_in.scalar_type() == at::kDouble || weight.scalar_type() == at::kDouble ||
                   (has_bias && bias->scalar_type() == at::kDouble);
  const auto acc = f64 ? at::kDouble : at::kFloat;
  const auto fopt = x_in.options().dtype(acc);
  const int64_t N = targets.numel();

  // Targets first: nothing is computed for a bad one (same message as _checks.check_targets).
  at::Tensor tg = targets.reshape({N}).to(at::kLong).contiguous();
  const int64_t* tp = tg.const_data_ptr<int64_t>();
  int64_t kept = 0;
  for (int64_t r = 0; r < N; ++r) {
    const int64_t t = tp[r];
    if (t == ignore_index) continue;
    TORCH_CHECK_INDEX(t >= 0 && t < V, "target ", t, " is out of range for ", V,
                      " classes (valid targets are 0..", V - 1, ", or ignore_index=", ignore_index,
                      "); check the labels and vocab_size");
    ++kept;
  }
  const double scale_d = reduction == "mean" ? 1.0 / double(std::max<int64_t>(kept, 1)) : 1.0;

  at::Tensor x = x_in.reshape({N, C});
  at::Tensor W = weight.to(acc).contiguous();  // no copy for an fp32 weight
  at::Tensor b = has_bias ? bias->to(acc).contiguous() : at::Tensor();
  const bool grad = compute_grad;
  at::Tensor dx = grad ? at::empty({N, C}, x_in.options()) : at::empty({0}, x_in.options());
  at::Tensor dW = grad ? at::zeros({V, C}, fopt) : at::Tensor();
  at::Tensor dB = grad && has_bias ? at::zeros({V}, fopt) : at::Tensor();
  const bool dx_direct = x_in.scalar_type() == acc;

  const int64_t elem = f64 ? 8 : 4;
  const int64_t R = chunk_rows_for(N, V, elem, chunk_rows);
  at::Tensor buf = at::empty({N > 0 ? R : 0, V}, fopt);
  at::Tensor dx_buf = grad && !dx_direct ? at::empty({R, C}, fopt) : at::Tensor();
  at::Tensor row_loss = at::empty({N}, fopt);
  const at::Tensor Wt = W.t();

  for (int64_t r0 = 0; r0 < N; r0 += R) {
    const int64_t r = std::min(R, N - r0);
    at::Tensor xc = x.narrow(0, r0, r).to(acc);
    at::Tensor zc = buf.narrow(0, 0, r);
    if (has_bias) zc.copy_(b.unsqueeze(0).expand({r, V}));
    gemm_out(zc, xc, Wt, has_bias ? 1.0 : 0.0);  // C == 0: zeros, or the bias
    AT_DISPATCH_FLOATING_TYPES(acc, "linear_cross_entropy_rows", [&] {
      scalar_t* zp = zc.mutable_data_ptr<scalar_t>();
      scalar_t* lp = row_loss.mutable_data_ptr<scalar_t>() + r0;
      const scalar_t scale = static_cast<scalar_t>(scale_d);
      at::parallel_for(0, r, grain_rows(V), [&](int64_t a, int64_t e) {
        softmax_xent_rows<scalar_t>(zp, V, tp + r0, ignore_index, scale, lp, grad, a, e);
      });
    });
    if (!grad) continue;
    if (C > 0) {
      if (dx_direct) {
        gemm_out(dx.narrow(0, r0, r), zc, W);
      } else {
        at::Tensor dxc = dx_buf.narrow(0, 0, r);
        gemm_out(dxc, zc, W);
        dx.narrow(0, r0, r).copy_(dxc);
      }
      gemm_out(dW, zc.t(), xc, 1.0);
    }
    if (has_bias) dB.add_(zc.sum(0));
  }

  // The loss: row losses summed in row order, in double.
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES(acc, "linear_cross_entropy_loss", [&] {
    const scalar_t* lp = row_loss.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < N; ++i) total += static_cast<double>(lp[i]);
  });
  at::Tensor loss = at::empty({}, fopt);
  loss.fill_(total * scale_d);
  if (!grad) {
    at::Tensor none = at::empty({0}, weight.options());
    return {loss, dx, none, at::empty({0}, has_bias ? bias->options() : weight.options())};
  }
  at::Tensor dweight = dW.to(weight.scalar_type());
  at::Tensor dbias = has_bias ? dB.to(bias->scalar_type()) : at::empty({0}, weight.options());
  return {loss, dx.view(x_in.sizes()), dweight, dbias};
}

// The declared kernel (barkgpt/opdecls.py): gradients always, chunk size from V.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_fwd_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& targets,
    const std::optional<at::Tensor>& bias, int64_t ignore_index, c10::string_view reduction) {
  return linear_cross_entropy_fwd_ex_cpu(x, weight, targets, bias, ignore_index, reduction, true, 0);
}

// The backward: the forward's gradients (of the reduced loss) times the upstream gradient.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_bwd_cpu(
    const at::Tensor& grad_loss, const at::Tensor& dx, const at::Tensor& dweight,
    const at::Tensor& dbias) {
  TORCH_CHECK(grad_loss.numel() == 1, "linear_cross_entropy backward: the loss gradient must be a scalar");
  return {at::mul(dx, grad_loss), at::mul(dweight, grad_loss), at::mul(dbias, grad_loss)};
}

}  // namespace barkgpt
