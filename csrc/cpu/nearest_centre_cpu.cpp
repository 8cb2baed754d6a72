// Nearest class centre on the CPU (NC4): for each sample, argmin_k ||h - mu_k||^2 over the
// present centres and argmax_k (W h + b)_k, in one pass over the rows, returning the counts
// [n, ncc_correct, mismatch] and optionally the assignments, never holding N x K.
//
// Distances use ||h - mu_k||^2 = ||h'||^2 - 2 h'.mu'_k + ||mu'_k||^2 with h' = h - c and
// mu' = mu - c for the common centre c = mean of the present centres (the first term does
// not change the argmin). Without the shift, features with a large common offset cancel
// away the differences between centres. Rows are shifted a chunk at a time in float64
// and rounded once, the (chunk, K) products go through BLAS, and the arg-reductions run
// in float64. The logits reuse the shifted rows, W h + b = W h' + (W c + b), and come from
// the same GEMM as the distances (centres and classifier rows stacked).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../common.h"
#include "../nearest_centre.h"

namespace collapse_ext {
namespace {

// (chunk, 2K) products, 8 MiB per thread: large enough for BLAS to run at full rate.
constexpr int64_t kChunkBytes = 8 << 20;

template <typename scalar_t, typename compute_t>
void shift_rows_kernel(const scalar_t* x, int64_t row_stride, const double* centre, int64_t rows, int64_t d,
                compute_t* out) {
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* row = x + i * row_stride;
    compute_t* dst = out + i * d;
    for (int64_t j = 0; j < d; ++j) dst[j] = static_cast<compute_t>(to_double(row[j]) - centre[j]);
  }
}

// argmin_c add[c] + scale * v[c] over c < k, ties to the lowest index, -1 when every key
// is +inf. Four independent compare chains instead of one: the serial dependency on
// `best` otherwise bounds the loop at one compare per latency.
template <typename compute_t>
int64_t argmin_affine(const compute_t* v, const double* add, double scale, int64_t k) {
  constexpr int kChains = 4;
  double best[kChains];
  int64_t arg[kChains];
  for (int u = 0; u < kChains; ++u) best[u] = std::numeric_limits<double>::infinity(), arg[u] = -1;
  int64_t c = 0;
  for (; c + kChains <= k; c += kChains) {
    for (int u = 0; u < kChains; ++u) {
      const double key = add[c + u] + scale * static_cast<double>(v[c + u]);
      if (key < best[u]) best[u] = key, arg[u] = c + u;
    }
  }
  for (; c < k; ++c) {
    const double key = add[c] + scale * static_cast<double>(v[c]);
    if (key < best[0]) best[0] = key, arg[0] = c;
  }
  double b = best[0];
  int64_t a = arg[0];
  for (int u = 1; u < kChains; ++u)
    if (argmin_takes(best[u], arg[u], b, a)) b = best[u], a = arg[u];
  return a;
}

// Assignment of each row of the chunk (-1 for rows not counted) and its mismatch flag.
// scores and logits are (rows, k) blocks of the product with row stride ld; neg_shift is
// -(W c + b), so the classifier's argmax is an argmin of -(logit + shift).
// Adds the chunk's [n, ncc_correct, mismatch] to counts and writes its assignments.
template <typename compute_t, typename label_t>
void assign_kernel(const compute_t* scores, const compute_t* logits, int64_t ld, const double* mu_sq,
                 const double* neg_shift, const label_t* y, int64_t rows, int64_t k, int64_t* assigned,
                 int64_t* counts) {
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t label = static_cast<int64_t>(y[i]);
    int64_t arg = -1;
    if (label >= 0 && label < k) {
      // ||h' - mu'_c||^2 - ||h'||^2 = ||mu'_c||^2 - 2 h'.mu'_c; +inf for absent centres.
      arg = argmin_affine(scores + i * ld, mu_sq, -2.0, k);
      if (arg >= 0) {
        counts[0] += 1;
        counts[1] += arg == label;
        if (logits != nullptr) {
          const int64_t pred = argmin_affine(logits + i * ld, neg_shift, -1.0, k);
          counts[2] += std::max<int64_t>(pred, 0) != arg;  // all logits -inf: argmax is 0, as in torch
        }
      }
    }
    if (assigned != nullptr) assigned[i] = arg;
  }
}

std::tuple<at::Tensor, at::Tensor> nearest_centre_cpu(const at::Tensor& features, const at::Tensor& labels,
                                                      const at::Tensor& means, const std::optional<at::Tensor>& weight,
                                                      const std::optional<at::Tensor>& bias,
                                                      const std::optional<at::Tensor>& present, bool assignments) {
  check_nearest_centre_inputs(features, labels, means, weight, bias, present);
  const int64_t n = features.size(0), d = features.size(1), k = means.size(0);
  const auto compute = compute_dtype(features.scalar_type());
  auto counts = at::zeros({3}, features.options().dtype(at::kLong));
  auto assigned = at::full({assignments ? n : 0}, -1, features.options().dtype(at::kLong));
  if (n == 0 || k == 0) return {counts, assigned};

  const NearestCentreSetup setup = nearest_centre_setup(means, weight, bias, present, compute);
  const double* centre = setup.centre.const_data_ptr<double>();
  const double* mu_sq = setup.mu_sq.const_data_ptr<double>();
  const at::Tensor neg_shift_t = setup.shift.defined() ? setup.shift.neg() : at::Tensor();
  const double* neg_shift = neg_shift_t.defined() ? neg_shift_t.const_data_ptr<double>() : nullptr;

  const at::Tensor x = unit_stride_columns(features);
  const at::Tensor y = labels.contiguous();
  const int64_t elem = compute == at::kDouble ? 8 : 4;
  const int64_t cols = setup.stacked.size(0);  // K, or 2K with the classifier
  const bool has_weight = setup.shift.defined();
  // Chunks of rows are the unit of parallel work, in one parallel region: each thread
  // shifts, multiplies (single-threaded GEMM) and assigns its own chunks in its own
  // buffers. Per-chunk counts are summed at the end.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t by_memory = kChunkBytes / (elem * std::max(cols, d));
  const int64_t chunk = std::min(n, std::max<int64_t>(16, std::min(by_memory, (n + 4 * threads - 1) / (4 * threads))));
  const int64_t chunks = (n + chunk - 1) / chunk;
  std::vector<int64_t> chunk_counts(3 * chunks, 0);
  int64_t* out_assigned = assignments ? assigned.data_ptr<int64_t>() : nullptr;

  // Threads take the next chunk from a counter (dynamic scheduling): on a shared machine
  // a static split leaves the op waiting for whichever thread lost its core.
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, chunks), 1, [&](int64_t, int64_t) {
    auto shifted = at::empty({chunk, d}, x.options().dtype(compute));
    auto products = at::empty({chunk, cols}, x.options().dtype(compute));
    for (int64_t c = next++; c < chunks; c = next++) {
      const int64_t start = c * chunk, rows = std::min(chunk, n - start);
      at::Tensor h = shifted.narrow(0, 0, rows), s = products.narrow(0, 0, rows);
      COLLAPSE_DISPATCH_FEATURES_LABELS(x.scalar_type(), y.scalar_type(), "nearest_centre_cpu", [&] {
        using compute_t = compute_type<scalar_t>;
        shift_rows_kernel(x.const_data_ptr<scalar_t>() + start * x.stride(0), x.stride(0), centre, rows, d,
                          h.data_ptr<compute_t>());
        at::mm_out(s, h, setup.stacked.t());
        const compute_t* ps = s.const_data_ptr<compute_t>();
        assign_kernel(ps, has_weight ? ps + k : nullptr, cols, mu_sq, neg_shift, y.const_data_ptr<label_t>() + start,
                      rows, k, out_assigned ? out_assigned + start : nullptr, chunk_counts.data() + 3 * c);
      });
    }
  });
  int64_t* total = counts.data_ptr<int64_t>();
  for (int64_t c = 0; c < chunks; ++c)
    for (int t = 0; t < 3; ++t) total[t] += chunk_counts[3 * c + t];
  return {counts, assigned};
}

}  // namespace

TORCH_LIBRARY_IMPL(collapse_ext, CPU, m) { m.impl("nearest_centre", &nearest_centre_cpu); }

}  // namespace collapse_ext
