// linear on CPU: out = x @ weight^T (+ bias), the model's projections, through csrc/gemm.h (oneDNN
// for the products where it is faster than MKL, barkgpt's few-row kernel at decode time).
//
// x (..., K) is multiplied as one (rows, K) matrix; the backward is dx = g @ weight,
// dweight = g^T @ x, dbias = column sums of g. fp32 products go through gemm_out; other dtypes
// too (it passes them to ATen, as F.linear would).
#include "gemm.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>

#include <optional>
#include <tuple>

namespace barkgpt {

at::Tensor linear_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 2 && x.size(-1) == weight.size(1),
              "linear: x must have shape (..., ", weight.size(1), ") for weight of shape ",
              weight.sizes(), ", got ", x.sizes());
  const bool has_bias = bias.has_value() && bias->defined();
  const int64_t N = weight.size(0), K = weight.size(1);
  if (has_bias)
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "linear: bias must have shape (", N, ",), got ",
                bias->sizes());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() &&
                  (!has_bias || bias->scalar_type() == x.scalar_type()),
              "linear: x, weight and bias must have one dtype, got ", x.scalar_type(), " and ",
              weight.scalar_type());
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = N;
  const at::Tensor x2 = x.reshape({-1, K});
  at::Tensor out = at::empty({x2.size(0), N}, x.options());
  if (has_bias) out.copy_(bias->unsqueeze(0).expand({x2.size(0), N}));
  gemm_out(out, x2, weight.t(), has_bias ? 1.0 : 0.0);
  return out.view(out_sizes);
}

// (dx, dweight, dbias): dbias is an empty (0,) tensor when bias is None.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_bwd_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                              const at::Tensor& weight,
                                                              const std::optional<at::Tensor>& bias) {
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(grad.dim() == x.dim() && grad.size(-1) == N && x.size(-1) == K,
              "linear backward: grad must have shape x.shape[:-1] + (", N, ",), got ", grad.sizes());
  const at::Tensor g = grad.reshape({-1, N}).contiguous();
  const at::Tensor x2 = x.reshape({-1, K});
  TORCH_CHECK(g.size(0) == x2.size(0), "linear backward: grad and x have different row counts");
  at::Tensor dx = at::empty({x2.size(0), K}, x.options());
  gemm_out(dx, g, weight);
  at::Tensor dw = at::empty({N, K}, weight.options());
  gemm_out(dw, g.t(), x2);
  const bool has_bias = bias.has_value() && bias->defined();
  at::Tensor db = has_bias ? at::sum(g, {0}).to(bias->scalar_type()) : at::empty({0}, weight.options());
  return {dx.view(x.sizes()), dw, db};
}

}  // namespace barkgpt
