// Operator schemas (namespace barkgpt_cpp) and their CPU kernels.
//
// Only the schemas and CPU kernels live in C++; the fake (meta) kernels, the autograd
// formulas and the user-facing wrappers are registered from Python in barkgpt/_cpp.py, so
// torch.compile traces each op as one node and opcheck can test the whole registration.
#include <torch/library.h>
#include <torch/version.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace barkgpt {

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd);
std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v, bool causal);
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, bool causal);
at::Tensor cached_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const std::optional<at::Tensor>& start, int64_t offset);
at::Tensor embedding_add_fwd_cpu(const at::Tensor& idx, const at::Tensor& tok_weight,
                                 const at::Tensor& pos_weight);
std::tuple<at::Tensor, at::Tensor> embedding_add_bwd_cpu(const at::Tensor& grad,
                                                         const at::Tensor& idx,
                                                         int64_t vocab_size,
                                                         int64_t num_positions);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_fwd_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& targets,
    const std::optional<at::Tensor>& bias, int64_t ignore_index, c10::string_view reduction);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_fwd_ex_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& targets,
    const std::optional<at::Tensor>& bias, int64_t ignore_index, c10::string_view reduction,
    bool compute_grad, int64_t chunk_rows);
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_bwd_cpu(
    const at::Tensor& grad_loss, const at::Tensor& dx, const at::Tensor& dweight,
    const at::Tensor& dbias);

at::Tensor linear_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias);
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_bwd_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                              const at::Tensor& weight,
                                                              const std::optional<at::Tensor>& bias);

// Every block of a cached generation step in one call (decode.cpp).
at::Tensor decode_layers_cpu(const at::Tensor& x, at::TensorList weights, const at::Tensor& k_cache,
                             const at::Tensor& v_cache, const std::optional<at::Tensor>& start, int64_t offset,
                             int64_t n_head, bool bias, bool norm_first, c10::string_view activation, double eps);
at::Tensor decode_step_cpu(const at::Tensor& idx, const at::Tensor& tok_emb, const at::Tensor& pos_emb,
                           at::TensorList weights, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const std::optional<at::Tensor>& start, int64_t offset, int64_t n_head, bool bias,
                           bool norm_first, c10::string_view activation, double eps, const at::Tensor& ln_f_weight,
                           const std::optional<at::Tensor>& ln_f_bias);

// The screened head: approximate logits from an fp16 or int8 copy of it (head_screen.cpp).
std::tuple<at::Tensor, at::Tensor> head_screen_cpu(const at::Tensor& x, const at::Tensor& w,
                                                   const at::Tensor& factor, const at::Tensor& xnorm,
                                                   double abs_err, const std::optional<at::Tensor>& scale);
std::tuple<at::Tensor, at::Tensor> head_screen_topk_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                        const at::Tensor& w, const std::optional<at::Tensor>& scale,
                                                        const at::Tensor& factor, double max_norm, double abs_err,
                                                        int64_t k, int64_t max_count);
std::tuple<at::Tensor, at::Tensor> head_screen_prepare_cpu(const at::Tensor& w, bool hugepages);
std::tuple<at::Tensor, at::Tensor, at::Tensor> head_screen_prepare_int8_cpu(const at::Tensor& w, bool hugepages);

// The cache of idle output blocks and the streaming-store threshold (outputs.cpp).
std::vector<int64_t> output_cache_info();
void output_cache_release();
std::string output_cache_env_problem();
void output_cache_set_limit(int64_t bytes);
int64_t output_stream_set_min_bytes(int64_t bytes);
at::Tensor output_empty(at::IntArrayRef sizes);
// Huge-page memory for long-lived tensors such as weights (outputs.cpp).
std::string hugepage_mode();
at::Tensor hugepage_empty(at::IntArrayRef sizes, at::ScalarType dtype);
bool is_hugepage_backed(const at::Tensor& t);
int64_t hugepage_bytes();

// Which library fp32 products go to (gemm.cpp).
std::string gemm_library();
std::string gemm_set_library(c10::string_view choice);
bool gemm_few_rows();
void gemm_out(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta);
void gemm_out_op(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta) {
  gemm_out(out, a, b, beta);
}

// The torch version these kernels were compiled against (barkgpt/_cpp.py checks it).
std::string build_info() { return std::string("torch ") + TORCH_VERSION; }

}  // namespace barkgpt

TORCH_LIBRARY(barkgpt_cpp, m) {
  // (y, mean, rstd); mean/rstd are fp32 (fp64 for fp64 x), shape x.shape[:-1].
  m.def("layer_norm_fwd(Tensor x, Tensor weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  // (dx, dweight, dbias); dbias has bias's dtype (weight's when bias is None).
  m.def("layer_norm_bwd(Tensor grad, Tensor x, Tensor weight, Tensor? bias, Tensor mean, "
        "Tensor rstd) -> (Tensor, Tensor, Tensor)");
  // (out, lse); lse is fp32 (fp64 for fp64 inputs), shape (B, H, T).
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, bool causal) -> (Tensor, Tensor)");
  m.def("attention_bwd(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "bool causal) -> (Tensor, Tensor, Tensor)");
  // Inference only (no backward): queries at offset.. against a K/V cache (csrc/cached_attention.cpp).
  m.def("cached_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? start, int offset) -> Tensor");
  m.def("embedding_add_fwd(Tensor idx, Tensor tok_weight, Tensor pos_weight) -> Tensor");
  // (dtok (vocab_size, C), dpos (num_positions, C)), in grad's dtype.
  m.def("embedding_add_bwd(Tensor grad, Tensor idx, SymInt vocab_size, SymInt num_positions) "
        "-> (Tensor, Tensor)");
  // (loss, dx, dweight, dbias): the 0-d loss (fp32; fp64 for fp64 inputs) and its gradients,
  // computed in the forward (dbias is empty (0,) without a bias).
  m.def("linear_cross_entropy_fwd(Tensor x, Tensor weight, Tensor targets, Tensor? bias, "
        "int ignore_index, str reduction) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("linear_cross_entropy_bwd(Tensor grad_loss, Tensor dx, Tensor dweight, Tensor dbias) "
        "-> (Tensor, Tensor, Tensor)");
  // The same with options: compute_grad false leaves the gradients empty (0,) (evaluation does
  // a third of the work); chunk_rows > 0 sets the rows per chunk (<= 0: chosen from V).
  m.def("linear_cross_entropy_fwd_ex(Tensor x, Tensor weight, Tensor targets, Tensor? bias, "
        "int ignore_index, str reduction, bool compute_grad, int chunk_rows) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("linear_fwd(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  // Inference only: all n_layer blocks of a cached generation step (csrc/decode.cpp documents the
  // order of weights); writes the step's keys/values into the caches, returns the hidden states
  // before ln_f.
  m.def("decode_layers(Tensor x, Tensor[] weights, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? start, "
        "int offset, int n_head, bool bias, bool norm_first, str activation, float eps) -> Tensor");
  // The same, from the step's token ids (B, T) to ln_f of its last position (B, 1, C): the
  // embedding, every block, ln_f (csrc/decode.cpp).
  m.def("decode_step(Tensor idx, Tensor tok_emb, Tensor pos_emb, Tensor[] weights, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, Tensor? start, int offset, int n_head, bool bias, bool norm_first, str activation, "
        "float eps, Tensor ln_f_weight, Tensor? ln_f_bias) -> Tensor");
  // Inference only, the screen of barkgpt.ops.head_topk_logits (csrc/head_screen.cpp): (lo, hi),
  // each (B, V) fp32, around x (B <= 8, C) fp32 @ w^T, w (V, C) the fp16 copy of the head, or its
  // int8 copy times scale (V,) per row.
  m.def("head_screen(Tensor x, Tensor w, Tensor factor, Tensor xnorm, float abs_err, Tensor? scale=None) "
        "-> (Tensor, Tensor)");
  // A whole screened step: (out (B, V): the candidates' exact logits from weight, -inf elsewhere;
  // info (2,) int64: candidate rows (< 0: declined) and the most in one row of x).
  m.def("head_screen_topk(Tensor x, Tensor weight, Tensor w, Tensor? scale, Tensor factor, float max_norm, "
        "float abs_err, int k, int max_count) -> (Tensor, Tensor)");
  // (w16 (V, C) fp16, norms (V, 3) float64: ||w||, ||w16||, ||w - w16|| per row), the screen's
  // copy; hugepages: w16 in memory advised for transparent huge pages.
  m.def("head_screen_prepare(Tensor w, bool hugepages) -> (Tensor, Tensor)");
  // (q (V, C) int8, scale (V,) fp32, norms (V, 4) float64: ||w||, ||s q||, ||w - s q||, ||q||).
  m.def("head_screen_prepare_int8(Tensor w, bool hugepages) -> (Tensor, Tensor, Tensor)");
  m.def("linear_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias) -> (Tensor, Tensor, Tensor)");
  m.def("build_info() -> str", &barkgpt::build_info);
  // "onednn" or "aten": where the kernels' fp32 matrix products go (csrc/gemm.h). The setter
  // takes "auto", "onednn" or "aten" and returns the library now in use.
  m.def("gemm_library() -> str", &barkgpt::gemm_library);
  m.def("gemm_set_library(str choice) -> str", &barkgpt::gemm_set_library);
  // Whether products of <= 8 fp32 rows go to the few-row kernel (false after "aten").
  m.def("gemm_few_rows() -> bool", &barkgpt::gemm_few_rows);
  // out = beta * out + a @ b through that library (for tests and benchmarks/gemm_bench.py).
  m.def("gemm_out(Tensor(a!) out, Tensor a, Tensor b, float beta) -> ()");
  // [idle bytes, idle blocks, reuses, new mappings, limit bytes, bytes in live outputs]
  m.def("output_cache_info() -> int[]", &barkgpt::output_cache_info);
  m.def("output_cache_release() -> ()", &barkgpt::output_cache_release);
  // "" or why BARKGPT_CPU_CACHE_MB was ignored (barkgpt/_cpp.py turns it into a warning).
  m.def("output_cache_env_problem() -> str", &barkgpt::output_cache_env_problem);
  m.def("output_cache_set_limit(int bytes) -> ()", &barkgpt::output_cache_set_limit);
  // Ops whose tensors add up to at least this many bytes write their outputs with streaming
  // stores (< 0: the default, the last-level cache). Returns the previous value.
  m.def("output_stream_set_min_bytes(int bytes) -> int", &barkgpt::output_stream_set_min_bytes);
  // For tests: an uninitialized fp32 tensor from the same source as the kernels' outputs.
  m.def("output_empty(int[] size) -> Tensor", &barkgpt::output_empty);
  // Uninitialized CPU memory in 2 MiB-aligned blocks advised for transparent huge pages, for
  // weights that decode streams (barkgpt.ops.use_cpu_hugepages); freed when the tensor dies.
  m.def("hugepage_empty(int[] size, ScalarType dtype) -> Tensor", &barkgpt::hugepage_empty);
  // Whether t's memory is a block barkgpt advised for huge pages as a whole (hugepage_empty's, or
  // a kernel output of 2 MiB or more from the output cache).
  m.def("is_hugepage_backed(Tensor t) -> bool", &barkgpt::is_hugepage_backed);
  // "always", "madvise", "never", or "" (unknown): the kernel's transparent huge page mode.
  m.def("hugepage_mode() -> str", &barkgpt::hugepage_mode);
  // Bytes mapped by hugepage_empty and not yet freed.
  m.def("hugepage_bytes() -> int", &barkgpt::hugepage_bytes);
}

TORCH_LIBRARY_IMPL(barkgpt_cpp, CPU, m) {
  m.impl("gemm_out", &barkgpt::gemm_out_op);
  m.impl("linear_fwd", &barkgpt::linear_fwd_cpu);
  m.impl("linear_bwd", &barkgpt::linear_bwd_cpu);
  m.impl("layer_norm_fwd", &barkgpt::layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &barkgpt::layer_norm_bwd_cpu);
  m.impl("attention_fwd", &barkgpt::attention_fwd_cpu);
  m.impl("attention_bwd", &barkgpt::attention_bwd_cpu);
  m.impl("cached_attention_fwd", &barkgpt::cached_attention_fwd_cpu);
  m.impl("decode_layers", &barkgpt::decode_layers_cpu);
  m.impl("decode_step", &barkgpt::decode_step_cpu);
  m.impl("head_screen", &barkgpt::head_screen_cpu);
  m.impl("head_screen_topk", &barkgpt::head_screen_topk_cpu);
  m.impl("head_screen_prepare", &barkgpt::head_screen_prepare_cpu);
  m.impl("head_screen_prepare_int8", &barkgpt::head_screen_prepare_int8_cpu);
  m.impl("embedding_add_fwd", &barkgpt::embedding_add_fwd_cpu);
  m.impl("embedding_add_bwd", &barkgpt::embedding_add_bwd_cpu);
  m.impl("linear_cross_entropy_fwd", &barkgpt::linear_cross_entropy_fwd_cpu);
  m.impl("linear_cross_entropy_bwd", &barkgpt::linear_cross_entropy_bwd_cpu);
  m.impl("linear_cross_entropy_fwd_ex", &barkgpt::linear_cross_entropy_fwd_ex_cpu);
}

#ifdef BARKGPT_PYTHON_MODULE
// setup.py builds this file as the Python extension barkgpt._C; barkgpt/_cpp.py loads it with
// torch.ops.load_library, but setuptools expects a module init symbol to export.
#include <Python.h>
static struct PyModuleDef barkgpt_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&barkgpt_c_module); }
#endif
