// Eager fast path: barkgpt_cpp::layer_norm / attention / embedding_add / linear, differentiable in C++.
//
// The kernel ops (*_fwd, *_bwd) get their fake kernels and autograd formulas from Python
// (barkgpt/_cpp.py, torch.library.register_autograd); torch.compile traces those. In eager
// mode that Python autograd layer costs ~15 us per op and backward, as much as the kernels
// themselves at the presets' sizes, so eager calls go through these ops instead: the same
// kernel ops, reached through the dispatcher below autograd, with the same formulas as C++
// autograd nodes.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <atomic>
#include <optional>
#include <tuple>

namespace barkgpt {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensor = at::Tensor;
using Tensor2 = std::tuple<Tensor, Tensor>;
using Tensor3 = std::tuple<Tensor, Tensor, Tensor>;

// The dispatcher handle of a kernel op, looked up on first use. Not a function-local static
// with a dynamic initializer: a child forked while another thread was inside that initializer
// would wait forever on its guard. The slot is constant-initialized (no guard); two threads
// racing on the first call both look the op up and one copy is dropped.
template <typename Sig>
const c10::TypedOperatorHandle<Sig>& op_handle(std::atomic<c10::TypedOperatorHandle<Sig>*>& slot,
                                               const char* name) {
  auto* h = slot.load(std::memory_order_acquire);
  if (h == nullptr) {
    auto* fresh = new c10::TypedOperatorHandle<Sig>(
        c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>());
    if (slot.compare_exchange_strong(h, fresh, std::memory_order_acq_rel)) {
      h = fresh;  // kept for the life of the process, like the op itself
    } else {
      delete fresh;  // another thread got there first: h is its handle
    }
  }
  return *h;
}

Tensor3 ln_fwd(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b, double eps) {
  using Sig = Tensor3(const Tensor&, const Tensor&, const std::optional<Tensor>&, double);
  static std::atomic<c10::TypedOperatorHandle<Sig>*> slot{nullptr};
  return op_handle<Sig>(slot, "barkgpt_cpp::layer_norm_fwd").call(x, w, b, eps);
}

Tensor3 ln_bwd(const Tensor& g, const Tensor& x, const Tensor& w, const std::optional<Tensor>& b,
               const Tensor& mean, const Tensor& rstd) {
  using Sig = Tensor3(const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
                      const Tensor&, const Tensor&);
  static std::atomic<c10::TypedOperatorHandle<Sig>*> slot{nullptr};
  return op_handle<Sig>(slot, "barkgpt_cpp::layer_norm_bwd").call(g, x, w, b, mean, rstd);
}

Tensor2 attn_fwd(const Tensor& q, const Tensor& k, const Tensor& v, bool causal) {
  using Sig = Tensor2(const Tensor&, const Tensor&, const Tensor&, bool);
  static std::atomic<c10::TypedOperatorHandle<Sig>*> slot{nullptr};
  return op_handle<Sig>(slot, "barkgpt_cpp::attention_fwd").call(q, k, v, causal);
}

Tensor3 attn_bwd(const Tensor& g, const Tensor& q, const Tensor& k, const Tensor& v,
                 const Tensor& out, const Tensor& lse, bool causal) {
  using Sig = Tensor3(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                      const Tensor&, bool);
  static std::atomic<c10::TypedOperatorHandle<Sig>*> slot{nullptr};
  return op_handle<Sig>(slot, "barkgpt_cpp::attention_bwd").call(g, q, k, v, out, lse, causal);
}

Tensor emb_fwd(const Tensor& idx, const Tensor& tok, const Tensor& pos) {
  using Sig = Tensor(const Tensor&, const Tensor&, const Tensor&);
  static std::atomic<c10::TypedOperatorHandle<Sig>*> slot{nullptr};
  return op_handle<Sig>(slot, "barkgpt_cpp::embedding_add_fwd").call(idx, tok, pos);
}

Tensor2 emb_bwd(const Tensor& g, const Tensor& idx, c10::SymInt V, c10::SymInt P) {
  using Sig = Tensor2(const Tensor&, const Tensor&, c10::SymInt, c10::SymInt);
  static std::atomic<c10::TypedOperatorHandle<Sig>*> slot{nullptr};
  return op_handle<Sig>(slot, "barkgpt_cpp::embedding_add_bwd").call(g, idx, std::move(V), std::move(P));
}

Tensor lin_fwd(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b) {
  using Sig = Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&);
  static std::atomic<c10::TypedOperatorHandle<Sig>*> slot{nullptr};
  return op_handle<Sig>(slot, "barkgpt_cpp::linear_fwd").call(x, w, b);
}

Tensor3 lin_bwd(const Tensor& g, const Tensor& x, const Tensor& w, const std::optional<Tensor>& b) {
  using Sig = Tensor3(const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&);
  static std::atomic<c10::TypedOperatorHandle<Sig>*> slot{nullptr};
  return op_handle<Sig>(slot, "barkgpt_cpp::linear_bwd").call(g, x, w, b);
}

struct LayerNormFn : public torch::autograd::Function<LayerNormFn> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& w,
                        const std::optional<Tensor>& b, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;  // straight to the kernel, not the Python autograd
    auto [y, mean, rstd] = ln_fwd(x, w, b, eps);
    const bool has_bias = b.has_value() && b->defined();
    ctx->save_for_backward({x, w, has_bias ? *b : Tensor(), mean, rstd});
    ctx->saved_data["has_bias"] = has_bias;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto s = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    std::optional<Tensor> b = has_bias ? std::optional<Tensor>(s[2]) : std::nullopt;
    auto [dx, dw, db] = ln_bwd(grads[0], s[0], s[1], b, s[3], s[4]);
    return {dx, dw, has_bias ? db : Tensor(), Tensor()};
  }
};

struct AttentionFn : public torch::autograd::Function<AttentionFn> {
  static Tensor forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                        bool causal) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = attn_fwd(q, k, v, causal);
    ctx->save_for_backward({q, k, v, out, lse});
    ctx->saved_data["causal"] = causal;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto s = ctx->get_saved_variables();
    auto [dq, dk, dv] = attn_bwd(grads[0], s[0], s[1], s[2], s[3], s[4],
                                 ctx->saved_data["causal"].toBool());
    return {dq, dk, dv, Tensor()};
  }
};

struct EmbeddingAddFn : public torch::autograd::Function<EmbeddingAddFn> {
  static Tensor forward(AutogradContext* ctx, const Tensor& idx, const Tensor& tok,
                        const Tensor& pos) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({idx});
    ctx->saved_data["vocab_size"] = tok.sym_size(0);
    ctx->saved_data["num_positions"] = pos.sym_size(0);
    return emb_fwd(idx, tok, pos);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto s = ctx->get_saved_variables();
    auto [dtok, dpos] = emb_bwd(grads[0], s[0], ctx->saved_data["vocab_size"].toSymInt(),
                                ctx->saved_data["num_positions"].toSymInt());
    return {Tensor(), dtok, dpos};
  }
};

struct LinearFn : public torch::autograd::Function<LinearFn> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& w,
                        const std::optional<Tensor>& b) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const bool has_bias = b.has_value() && b->defined();
    ctx->save_for_backward({x, w, has_bias ? *b : Tensor()});
    ctx->saved_data["has_bias"] = has_bias;
    return lin_fwd(x, w, b);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto s = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    std::optional<Tensor> b = has_bias ? std::optional<Tensor>(s[2]) : std::nullopt;
    auto [dx, dw, db] = lin_bwd(grads[0], s[0], s[1], b);
    return {dx, dw, has_bias ? db : Tensor()};
  }
};

Tensor linear_autograd(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b) {
  return LinearFn::apply(x, w, b);
}

Tensor layer_norm_autograd(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b,
                           double eps) {
  return LayerNormFn::apply(x, w, b, eps);
}

Tensor attention_autograd(const Tensor& q, const Tensor& k, const Tensor& v, bool causal) {
  return AttentionFn::apply(q, k, v, causal);
}

Tensor embedding_add_autograd(const Tensor& idx, const Tensor& tok, const Tensor& pos) {
  return EmbeddingAddFn::apply(idx, tok, pos);
}

// Below autograd (inference mode): just the forward kernels.
Tensor layer_norm_plain(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b, double eps) {
  return std::get<0>(ln_fwd(x, w, b, eps));
}

Tensor attention_plain(const Tensor& q, const Tensor& k, const Tensor& v, bool causal) {
  return std::get<0>(attn_fwd(q, k, v, causal));
}

}  // namespace
}  // namespace barkgpt

TORCH_LIBRARY_FRAGMENT(barkgpt_cpp, m) {
  m.def("layer_norm(Tensor x, Tensor weight, Tensor? bias, float eps) -> Tensor");
  m.def("attention(Tensor q, Tensor k, Tensor v, bool causal) -> Tensor");
  m.def("embedding_add(Tensor idx, Tensor tok_weight, Tensor pos_weight) -> Tensor");
  m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(barkgpt_cpp, Autograd, m) {
  m.impl("layer_norm", &barkgpt::layer_norm_autograd);
  m.impl("attention", &barkgpt::attention_autograd);
  m.impl("embedding_add", &barkgpt::embedding_add_autograd);
  m.impl("linear", &barkgpt::linear_autograd);
}

TORCH_LIBRARY_IMPL(barkgpt_cpp, CPU, m) {
  m.impl("layer_norm", &barkgpt::layer_norm_plain);
  m.impl("attention", &barkgpt::attention_plain);
  m.impl("embedding_add", &barkgpt::emb_fwd);
  m.impl("linear", &barkgpt::lin_fwd);
}
