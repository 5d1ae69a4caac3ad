// Every block of a cached generation step in one call (inference only, no autograd).
//
// Why: a batch-1 decode step is ~49 small weight products plus ~20 module calls / torch ops per
// block (LayerNorm, qkv projection, view/permute/unbind, two cache copies, cached attention,
// transpose/reshape, projection, dropouts, adds, feed-forward, activation), each costing
// ~5-10 us of Python and dispatcher. At GPT-2 small's shape that per-op overhead is ~2 ms of a
// ~12 ms step. This op walks the n_layer blocks in C++ and calls the kernel functions the
// module path reaches (layer_norm_fwd_cpu, linear_fwd_cpu, cached_attention_fwd_cpu, at::gelu /
// at::relu, at::add) in the same order on tensors of the same layouts, so its result is bitwise
// that of BarkGPT's Block.forward(x, cache, layer) in eval mode on the cpp backend
// (tests/test_decode_fused.py checks it with torch.equal).
//
// weights: per layer, in this order (the entries marked * only when `bias`):
//   norm1.weight (C), norm1.bias* (C), attn.qkv.weight (3C, C), attn.qkv.bias* (3C),
//   attn.proj.weight (C, C), attn.proj.bias* (C), norm2.weight (C), norm2.bias* (C),
//   ff.fc.weight (F, C), ff.fc.bias* (F), ff.proj.weight (C, F), ff.proj.bias* (C)
// i.e. 12 tensors per layer with biases, 6 without, layer 0 first.
// k_cache / v_cache (n_layer, B, H, S, D): the new keys/values are written at offset ..
// offset + T - 1 of every layer. Returns the last block's output (B, T, C), before ln_f.
//
// decode_step wraps it with what BarkGPT.forward_cached does around the blocks: the embedding
// F.embedding(idx, tok) + F.embedding(pos, pos_emb) (positions offset .., minus each row's
// start, clamped at 0) and ln_f on the last position, returning (B, 1, C). Per step that saves
// ~8 more torch calls from Python (measured ~0.2 ms of a ~9.5 ms GPT-2 step: between steps the
// weights stream through the caches, so every Python object and dispatcher table is cold).
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/embedding.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/relu.h>
#include <c10/util/string_view.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace barkgpt {

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                                  const std::optional<at::Tensor>& bias, double eps);
at::Tensor linear_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);
at::Tensor cached_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const std::optional<at::Tensor>& start, int64_t offset);

namespace {

enum class Activation { kGelu, kGeluTanh, kRelu };

// One block's parameters, in the documented order; biases are nullopt without `bias`.
struct BlockWeights {
  at::Tensor ln1_w, qkv_w, proj_w, ln2_w, fc_w, fc2_w;
  std::optional<at::Tensor> ln1_b, qkv_b, proj_b, ln2_b, fc_b, fc2_b;
};

void check_weight(const at::Tensor& w, at::IntArrayRef shape, const at::Tensor& x, int64_t layer,
                  const char* name) {
  TORCH_CHECK(w.defined(), "decode_layers: layer ", layer, " ", name, " is undefined");
  TORCH_CHECK(w.sizes() == shape, "decode_layers: layer ", layer, " ", name, " must have shape ", shape,
              ", got ", w.sizes());
  TORCH_CHECK(w.device().is_cpu(), "decode_layers: layer ", layer, " ", name, " must be a CPU tensor, got ",
              w.device());
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "decode_layers: layer ", layer, " ", name, " has dtype ",
              w.scalar_type(), " but x has ", x.scalar_type());
}

inline at::Tensor ln(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b, double eps) {
  return std::get<0>(layer_norm_fwd_cpu(x, w, b, eps));
}

// SelfAttention.forward's cached branch (barkgpt/model.py), eval mode.
at::Tensor attention(const at::Tensor& x, const BlockWeights& p, const at::Tensor& kc, const at::Tensor& vc,
                     const std::optional<at::Tensor>& start, int64_t offset, int64_t H) {
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2);
  const at::Tensor qkv = linear_fwd_cpu(x, p.qkv_w, p.qkv_b).view({B, T, 3, H, C / H});
  const at::Tensor qkvp = qkv.permute({2, 0, 3, 1, 4});  // (3, B, nh, T, hs), no copy
  const at::Tensor q = qkvp.select(0, 0), k = qkvp.select(0, 1), v = qkvp.select(0, 2);
  kc.slice(2, offset, offset + T).copy_(k);
  vc.slice(2, offset, offset + T).copy_(v);
  const at::Tensor y = cached_attention_fwd_cpu(q, kc, vc, start, offset);  // (B, nh, T, hs)
  return linear_fwd_cpu(y.transpose(1, 2).reshape({B, T, C}), p.proj_w, p.proj_b);
}

// FeedForward.forward, eval mode.
at::Tensor feed_forward(const at::Tensor& x, const BlockWeights& p, Activation act) {
  at::Tensor h = linear_fwd_cpu(x, p.fc_w, p.fc_b);
  switch (act) {
    case Activation::kRelu: h = at::relu(h); break;
    case Activation::kGeluTanh: h = at::gelu(h, "tanh"); break;
    case Activation::kGelu: h = at::gelu(h); break;
  }
  return linear_fwd_cpu(h, p.fc2_w, p.fc2_b);
}

}  // namespace

at::Tensor decode_layers_cpu(const at::Tensor& x_in, at::TensorList weights, const at::Tensor& k_cache,
                             const at::Tensor& v_cache, const std::optional<at::Tensor>& start, int64_t offset,
                             int64_t n_head, bool bias, bool norm_first, c10::string_view activation, double eps) {
  TORCH_CHECK(x_in.dim() == 3, "decode_layers: x must have shape (B, T, C), got ", x_in.sizes());
  TORCH_CHECK(x_in.device().is_cpu(), "decode_layers: x must be a CPU tensor, got ", x_in.device());
  TORCH_CHECK(at::isFloatingType(x_in.scalar_type()), "decode_layers: x must be floating point, got ",
              x_in.scalar_type());
  const int64_t B = x_in.size(0), T = x_in.size(1), C = x_in.size(2);
  TORCH_CHECK(n_head >= 1 && C % n_head == 0, "decode_layers: n_head must be >= 1 and divide C = ", C,
              ", got ", n_head);
  const int64_t H = n_head, D = C / n_head;
  TORCH_CHECK(k_cache.dim() == 5 && k_cache.sizes() == v_cache.sizes(),
              "decode_layers: k_cache and v_cache must have one shape (n_layer, B, H, S, D), got ", k_cache.sizes(),
              " and ", v_cache.sizes());
  const int64_t L = k_cache.size(0), S = k_cache.size(3);
  TORCH_CHECK(k_cache.size(1) == B && k_cache.size(2) == H && k_cache.size(4) == D,
              "decode_layers: the caches must have shape (n_layer, ", B, ", ", H, ", S, ", D, ") for x of shape ",
              x_in.sizes(), " and n_head ", H, ", got ", k_cache.sizes());
  TORCH_CHECK(k_cache.device().is_cpu() && v_cache.device().is_cpu(), "decode_layers: the caches must be CPU tensors");
  TORCH_CHECK(k_cache.scalar_type() == x_in.scalar_type() && v_cache.scalar_type() == x_in.scalar_type(),
              "decode_layers: the caches have dtype ", k_cache.scalar_type(), " and ", v_cache.scalar_type(),
              " but x has ", x_in.scalar_type());
  TORCH_CHECK(offset >= 0 && offset + T <= S, "decode_layers: positions ", offset, "..", offset + T - 1,
              " do not fit a cache of ", S, " positions");
  if (start.has_value() && start->defined()) {
    TORCH_CHECK(start->dim() == 1 && start->size(0) == B && start->device().is_cpu() &&
                    !at::isFloatingType(start->scalar_type()) && start->scalar_type() != at::kBool,
                "decode_layers: start must be a CPU integer tensor of shape (", B, ",), got ", start->sizes(), " ",
                start->scalar_type(), " on ", start->device());
  }
  Activation act;
  if (activation == "gelu") {
    act = Activation::kGelu;
  } else if (activation == "gelu_tanh") {
    act = Activation::kGeluTanh;
  } else if (activation == "relu") {
    act = Activation::kRelu;
  } else {
    TORCH_CHECK(false, "decode_layers: activation must be 'gelu', 'gelu_tanh' or 'relu', got '",
                std::string(activation), "'");
  }
  const int64_t per_layer = bias ? 12 : 6;
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == L * per_layer, "decode_layers: expected ", L * per_layer,
              " weights (", per_layer, " per layer ", bias ? "with" : "without", " biases, for ", L,
              " layers), got ", weights.size());

  // Unpack and check every layer before anything is written to the caches.
  std::vector<BlockWeights> blocks(L);
  const int64_t F = L > 0 ? weights[bias ? 8 : 4].size(0) : 0;
  for (int64_t l = 0; l < L; ++l) {
    size_t i = static_cast<size_t>(l * per_layer);
    auto take = [&](at::IntArrayRef shape, const char* name) {
      const at::Tensor& w = weights[i++];
      check_weight(w, shape, x_in, l, name);
      return w;
    };
    auto take_bias = [&](at::IntArrayRef shape, const char* name) -> std::optional<at::Tensor> {
      if (!bias) return std::nullopt;
      return take(shape, name);
    };
    BlockWeights& p = blocks[l];
    p.ln1_w = take({C}, "norm1.weight");
    p.ln1_b = take_bias({C}, "norm1.bias");
    p.qkv_w = take({3 * C, C}, "attn.qkv.weight");
    p.qkv_b = take_bias({3 * C}, "attn.qkv.bias");
    p.proj_w = take({C, C}, "attn.proj.weight");
    p.proj_b = take_bias({C}, "attn.proj.bias");
    p.ln2_w = take({C}, "norm2.weight");
    p.ln2_b = take_bias({C}, "norm2.bias");
    p.fc_w = take({F, C}, "ff.fc.weight");
    p.fc_b = take_bias({F}, "ff.fc.bias");
    p.fc2_w = take({C, F}, "ff.proj.weight");
    p.fc2_b = take_bias({C}, "ff.proj.bias");
  }

  if (L == 0) return x_in.clone();  // the output never aliases an input
  // Block.forward (barkgpt/model.py), layer by layer; dropout is the identity in eval mode.
  at::Tensor x = x_in;
  for (int64_t l = 0; l < L; ++l) {
    const BlockWeights& p = blocks[l];
    const at::Tensor kc = k_cache.select(0, l), vc = v_cache.select(0, l);  // (B, nh, S, hs)
    if (norm_first) {  // x + f(LN(x))
      x = at::add(x, attention(ln(x, p.ln1_w, p.ln1_b, eps), p, kc, vc, start, offset, H));
      x = at::add(x, feed_forward(ln(x, p.ln2_w, p.ln2_b, eps), p, act));
    } else {  // LN(x + f(x))
      x = ln(at::add(x, attention(x, p, kc, vc, start, offset, H)), p.ln1_w, p.ln1_b, eps);
      x = ln(at::add(x, feed_forward(x, p, act)), p.ln2_w, p.ln2_b, eps);
    }
  }
  return x;
}

at::Tensor decode_step_cpu(const at::Tensor& idx, const at::Tensor& tok_emb, const at::Tensor& pos_emb,
                           at::TensorList weights, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const std::optional<at::Tensor>& start, int64_t offset, int64_t n_head, bool bias,
                           bool norm_first, c10::string_view activation, double eps, const at::Tensor& ln_f_weight,
                           const std::optional<at::Tensor>& ln_f_bias) {
  // int64 or int32 ids, as F.embedding on the module path takes
  TORCH_CHECK(idx.dim() == 2 && idx.size(1) >= 1 && idx.device().is_cpu() &&
                  (idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt),
              "decode_step: idx must be a CPU int64 or int32 tensor of shape (B, T) with T >= 1, got ", idx.sizes(),
              " ", idx.scalar_type(), " on ", idx.device());
  TORCH_CHECK(tok_emb.dim() == 2 && pos_emb.dim() == 2 && tok_emb.size(1) == pos_emb.size(1),
              "decode_step: tok_emb (V, C) and pos_emb (P, C) must share C, got ", tok_emb.sizes(), " and ",
              pos_emb.sizes());
  TORCH_CHECK(tok_emb.device().is_cpu() && pos_emb.device().is_cpu() && tok_emb.scalar_type() == pos_emb.scalar_type(),
              "decode_step: tok_emb and pos_emb must be CPU tensors of one dtype, got ", tok_emb.scalar_type(), " and ",
              pos_emb.scalar_type());
  const int64_t T = idx.size(1), C = tok_emb.size(1), V = tok_emb.size(0);
  TORCH_CHECK(offset >= 0 && offset + T <= pos_emb.size(0), "decode_step: positions ", offset, "..", offset + T - 1,
              " need a position table of ", offset + T, " rows, got ", pos_emb.size(0));
  TORCH_CHECK(ln_f_weight.dim() == 1 && ln_f_weight.size(0) == C && ln_f_weight.device().is_cpu() &&
                  ln_f_weight.scalar_type() == tok_emb.scalar_type(),
              "decode_step: ln_f_weight must be a (", C, ",) CPU tensor of dtype ", tok_emb.scalar_type(), ", got ",
              ln_f_weight.sizes(), " ", ln_f_weight.scalar_type());
  if (ln_f_bias.has_value() && ln_f_bias->defined()) {
    TORCH_CHECK(ln_f_bias->sizes() == ln_f_weight.sizes() && ln_f_bias->device().is_cpu() &&
                    ln_f_bias->scalar_type() == tok_emb.scalar_type(),
                "decode_step: ln_f_bias must be a (", C, ",) CPU tensor of dtype ", tok_emb.scalar_type(), ", got ",
                ln_f_bias->sizes(), " ", ln_f_bias->scalar_type());
  }
  // Same message as barkgpt._checks.check_token_ids; TORCH_CHECK_INDEX raises IndexError.
  const at::Tensor ids = idx.scalar_type() == at::kLong ? idx.contiguous() : idx.to(at::kLong).contiguous();
  const int64_t* ip = ids.const_data_ptr<int64_t>();
  for (int64_t i = 0, n = ids.numel(); i < n; ++i) {
    TORCH_CHECK_INDEX(ip[i] >= 0 && ip[i] < V, "token id ", ip[i], " is out of range for a vocabulary of ", V,
                      " (valid ids are 0..", V - 1, "); check the tokenizer and vocab_size");
  }
  // The positions as forward_cached builds them: offset .. offset + T - 1, minus the row's start,
  // at least 0 (padding positions get id 0; nothing attends to them).
  at::Tensor pos = at::arange(offset, offset + T, ids.options()).expand({idx.size(0), T});
  if (start.has_value() && start->defined()) {
    TORCH_CHECK(start->dim() == 1 && start->size(0) == idx.size(0) && start->device().is_cpu() &&
                    !at::isFloatingType(start->scalar_type()) && start->scalar_type() != at::kBool,
                "decode_step: start must be a CPU integer tensor of shape (", idx.size(0), ",), got ",
                start->sizes(), " ", start->scalar_type(), " on ", start->device());
    pos = at::sub(pos, start->unsqueeze(1)).clamp_min(0);
  }
  const at::Tensor x = at::add(at::embedding(tok_emb, ids), at::embedding(pos_emb, pos));
  // decode_layers checks the blocks' weights and the caches before it writes to the caches
  const at::Tensor h = decode_layers_cpu(x, weights, k_cache, v_cache, start, offset, n_head, bias, norm_first,
                                         activation, eps);
  return ln(h.slice(1, T - 1, T), ln_f_weight, ln_f_bias, eps);
}

}  // namespace barkgpt
