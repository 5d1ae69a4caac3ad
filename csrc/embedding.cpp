// Token + position embedding add, forward and backward, on CPU.
//
// Forward: out[b, t] = tok[idx[b, t]] + pos[t] in one pass, after every id has been checked
// (an id outside [0, V) raises IndexError before any table row is read).
// Backward, deterministic without atomics: rows of the upstream gradient are bucketed by
// token id with a stable counting sort, then each token's rows are summed in position order
// in fp32; the position gradient sums over the batch in batch order. Each output element is
// summed by one task in that fixed order, so the result does not depend on the thread count.
#include "common.h"

#include <ATen/ops/empty.h>

#include <tuple>
#include <vector>

namespace barkgpt {
namespace {

template <typename index_t>
void check_ids(const index_t* ids, int64_t n, int64_t V) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t id = static_cast<int64_t>(ids[i]);
    // Same message as barkgpt._checks.check_token_ids; TORCH_CHECK_INDEX raises IndexError.
    TORCH_CHECK_INDEX(id >= 0 && id < V, "token id ", id, " is out of range for a vocabulary of ",
                      V, " (valid ids are 0..", V - 1, "); check the tokenizer and vocab_size");
  }
}

// A token table at least this big is mostly outside the cache: its rows are fetched ahead.
constexpr int64_t kGatherPrefetchTableBytes = int64_t(512) << 10;
// How many rows ahead: enough to cover a DRAM access (a gpt2-table row is 1.5-3 KiB), few
// enough that the lines are still in L1/L2 when their row comes.
constexpr int64_t kGatherPrefetchRows = 4;

// CF > 0: the width is CF, known at compile time (short rows vectorize as one or two vectors,
// where a run-time trip count under the vector width falls to the scalar remainder loop).
// With `prefetch`, the token row kGatherPrefetchRows ahead is requested before this row is
// done: the rows are random reads the hardware prefetcher cannot predict, and waiting for each
// one in turn left the bf16 gpt2-table forward latency-bound (493 -> 229 us at B=4, T=1024).
template <int CF, typename scalar_t, typename index_t>
void embedding_fwd_rows(const index_t* ids, const scalar_t* tp, const scalar_t* pp, scalar_t* op,
                        int64_t n0, int64_t n1, int64_t T, int64_t C_rt, bool prefetch) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t C = CF > 0 ? CF : C_rt;
  const int64_t row_bytes = C * int64_t(sizeof(scalar_t));
  for (int64_t n = n0; n < n1; ++n) {
    if (prefetch && n + kGatherPrefetchRows < n1) {
      const char* ahead = reinterpret_cast<const char*>(tp + static_cast<int64_t>(ids[n + kGatherPrefetchRows]) * C);
      for (int64_t o = 0; o < row_bytes; o += 64) prefetch_read(ahead + o);
    }
    const scalar_t* trow = tp + static_cast<int64_t>(ids[n]) * C;
    const scalar_t* prow = pp + (n % T) * C;
    scalar_t* orow = op + n * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c)
      orow[c] = from_acc<scalar_t>(to_acc<acc_t>(trow[c]) + to_acc<acc_t>(prow[c]));
  }
}

template <typename scalar_t, typename index_t>
void embedding_fwd_kernel(const index_t* ids, const scalar_t* tp, const scalar_t* pp,
                          scalar_t* op, int64_t rows, int64_t T, int64_t C, int64_t V) {
  const bool prefetch = V * C * int64_t(sizeof(scalar_t)) >= kGatherPrefetchTableBytes;
  at::parallel_for(0, rows, grain_rows(C), [&](int64_t n0, int64_t n1) {
    switch (C) {
      case 8: embedding_fwd_rows<8>(ids, tp, pp, op, n0, n1, T, C, prefetch); break;
      case 16: embedding_fwd_rows<16>(ids, tp, pp, op, n0, n1, T, C, prefetch); break;
      default: embedding_fwd_rows<0>(ids, tp, pp, op, n0, n1, T, C, prefetch); break;
    }
  });
}

// out[0:w] = sum over k in [k0, k1) of rows gp[row(k)] (channels c0 .. c0+w), in k order.
// With `stream` (fp32 only), out is written with streaming stores.
template <typename scalar_t, typename acc_t, typename RowOf>
inline void sum_rows(const scalar_t* gp, int64_t C, int64_t c0, int64_t w, int64_t k0,
                     int64_t k1, RowOf row_of, acc_t* acc, scalar_t* out, bool stream) {
  std::fill(acc, acc + w, acc_t(0));
  for (int64_t k = k0; k < k1; ++k) {
    const scalar_t* g = gp + row_of(k) * C + c0;
#pragma omp simd
    for (int64_t c = 0; c < w; ++c) acc[c] += to_acc<acc_t>(g[c]);
  }
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (stream) {
      stream_copy(out, acc, w * int64_t(sizeof(float)));
      return;
    }
  }
#pragma omp simd
  for (int64_t c = 0; c < w; ++c) out[c] = from_acc<scalar_t>(acc[c]);
}

template <typename scalar_t>
void embedding_bwd_kernel(const scalar_t* gp, const std::vector<int64_t>& start,
                          const std::vector<int64_t>& order, scalar_t* dtp, scalar_t* dpp,
                          int64_t B, int64_t T, int64_t C, int64_t V, int64_t P) {
  using acc_t = acc_type_t<scalar_t>;
  // Tasks are (output row, channel slice): rows 0..V-1 are token rows, V..V+P-1 position rows.
  // Whole 1 KiB slices keep writes sequential (the token table can be 100+ MB); slicing the
  // channels also spreads one very frequent token over several threads.
  const int64_t cw = std::min<int64_t>(C, 256), ns = ceil_div(C, cw);
  const int64_t rows = V + P;
  const int64_t sums_per_row = 1 + 2 * B * T / std::max<int64_t>(1, rows);
  const int64_t grain = std::max<int64_t>(1, kGrainElems / (cw * sums_per_row));
  const int64_t* ord = order.data();
  // The dense token gradient is written once and read much later (by the optimizer): around
  // the cache when it and the upstream gradient overflow it.
  const bool stream = stream_output((V + P + B * T) * C * int64_t(sizeof(scalar_t)), cw * int64_t(sizeof(scalar_t)));
  at::parallel_for(0, rows * ns, grain, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> acc(cw);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t r = task / ns, c0 = (task % ns) * cw, w = std::min(cw, C - c0);
      if (r < V) {
        sum_rows(gp, C, c0, w, start[r], start[r + 1], [ord](int64_t k) { return ord[k]; },
                 acc.data(), dtp + r * C + c0, stream);
      } else {
        const int64_t t = r - V;
        sum_rows(gp, C, c0, w, int64_t(0), t < T ? B : int64_t(0),
                 [T, t](int64_t b) { return b * T + t; }, acc.data(), dpp + t * C + c0, false);
      }
    }
    if (stream) stream_fence();
  });
}

}  // namespace

at::Tensor embedding_add_fwd_cpu(const at::Tensor& idx_in, const at::Tensor& tok_in,
                                 const at::Tensor& pos_in) {
  TORCH_CHECK(idx_in.dim() == 2, "embedding_add: idx must have shape (B, T), got ", idx_in.sizes());
  TORCH_CHECK(idx_in.scalar_type() == at::kLong || idx_in.scalar_type() == at::kInt,
              "embedding_add: idx must be int64 or int32, got ", idx_in.scalar_type());
  TORCH_CHECK(tok_in.dim() == 2 && pos_in.dim() == 2 && tok_in.size(1) == pos_in.size(1),
              "embedding_add: tables must be 2-D with the same width, got ", tok_in.sizes(),
              " and ", pos_in.sizes());
  TORCH_CHECK(tok_in.scalar_type() == pos_in.scalar_type(),
              "embedding_add: token and position tables must share a dtype, got ",
              tok_in.scalar_type(), " and ", pos_in.scalar_type());
  const int64_t B = idx_in.size(0), T = idx_in.size(1), V = tok_in.size(0), C = tok_in.size(1);
  TORCH_CHECK(T <= pos_in.size(0), "embedding_add: sequence length ", T,
              " exceeds the position table's ", pos_in.size(0), " rows (block_size)");
  at::Tensor idx = idx_in.contiguous();
  at::Tensor tok = tok_in.contiguous();
  at::Tensor pos = pos_in.contiguous();
  at::Tensor out = empty_output({B, T, C}, tok.options());
  const int64_t rows = B * T;
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "embedding_add_fwd_cpu", [&] {
    const index_t* ids = idx.const_data_ptr<index_t>();
    check_ids(ids, rows, V);
    if (rows == 0 || C == 0) return;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, tok.scalar_type(), "embedding_add_fwd_cpu", [&] {
      embedding_fwd_kernel<scalar_t, index_t>(ids, tok.const_data_ptr<scalar_t>(),
                                              pos.const_data_ptr<scalar_t>(),
                                              out.mutable_data_ptr<scalar_t>(), rows, T, C, V);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> embedding_add_bwd_cpu(const at::Tensor& grad_in,
                                                         const at::Tensor& idx_in,
                                                         int64_t vocab_size, int64_t num_positions) {
  TORCH_CHECK(grad_in.dim() == 3, "embedding_add backward: grad must be (B, T, C), got ",
              grad_in.sizes());
  const int64_t B = grad_in.size(0), T = grad_in.size(1), C = grad_in.size(2);
  const int64_t V = vocab_size, P = num_positions;
  TORCH_CHECK(V >= 0 && P >= 0, "embedding_add backward: vocab_size and num_positions must be >= 0, got ",
              V, " and ", P);
  TORCH_CHECK(idx_in.dim() == 2 && idx_in.size(0) == B && idx_in.size(1) == T,
              "embedding_add backward: idx shape ", idx_in.sizes(), " does not match grad ",
              grad_in.sizes());
  TORCH_CHECK(T <= P, "embedding_add backward: T=", T, " exceeds num_positions=", P);
  at::Tensor grad = grad_in.contiguous();
  at::Tensor idx = idx_in.contiguous();
  // Dense and mostly zero: a GPT-2 table's gradient is 154 MB, written once per step.
  at::Tensor dtok = empty_output({V, C}, grad.options());
  at::Tensor dpos = empty_output({P, C}, grad.options());
  const int64_t rows = B * T;
  if (C == 0) return {dtok, dpos};

  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "embedding_add_bwd_cpu", [&] {
    const index_t* ids = idx.const_data_ptr<index_t>();
    check_ids(ids, rows, V);
    // Stable counting sort of row numbers by token id: order[start[v] .. start[v+1]) are the
    // rows holding token v, in increasing row order.
    std::vector<int64_t> start(V + 1, 0), order(rows);
    for (int64_t n = 0; n < rows; ++n) ++start[static_cast<int64_t>(ids[n]) + 1];
    for (int64_t v = 0; v < V; ++v) start[v + 1] += start[v];
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t n = 0; n < rows; ++n) order[fill[static_cast<int64_t>(ids[n])]++] = n;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "embedding_add_bwd_cpu", [&] {
      embedding_bwd_kernel<scalar_t>(grad.const_data_ptr<scalar_t>(), start, order,
                                     dtok.mutable_data_ptr<scalar_t>(),
                                     dpos.mutable_data_ptr<scalar_t>(), B, T, C, V, P);
    });
  });
  return {dtok, dpos};
}

}  // namespace barkgpt
