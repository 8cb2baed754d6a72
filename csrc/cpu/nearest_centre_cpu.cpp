// Nearest class centre on the CPU (NC4): for each sample, argmin_k ||h - mu_k||^2 over the
// present centres and argmax_k (W h + b)_k, in one pass over the rows, returning the counts
// [n, ncc_correct, mismatch] and optionally the assignments, never holding N x K.
//
// Distances use ||h - mu_k||^2 = ||h'||^2 - 2 h'.mu'_k + ||mu'_k||^2 with h' = h - c and
// mu' = mu - c for the common centre c = mean of the present centres (the first term does
// not change the argmin). Without the shift, features with a large common offset cancel
// away the differences between centres. Rows are shifted a chunk at a time in float64
// and rounded once, the (chunk, tile) products go through BLAS, and the arg-reductions run
// in float64. The logits reuse the shifted rows, W h + b = W h' + (W c + b).
//
// The centres are visited in tiles of kTile rows with a running argmin per row, so the
// products of a chunk stay in the L2 cache between the GEMM and the reduction whatever K
// is: at K = 50257 a (chunk, K) block would be written to and read back from memory, and
// a chunk small enough to keep it in cache (about 40 rows) would stream all K centres
// from memory for every 40 rows.
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

// A job: up to kChunk rows against a run of centre tiles of kTile rows each. The (kChunk,
// kTile) products (512 KiB fp32, twice with logits) stay in L2; one GEMM is 0.2 GFLOP at
// d = 768, large enough for BLAS to run at full rate.
constexpr int64_t kChunk = 256;
constexpr int64_t kTile = 512;

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
// is +inf; *value is its key. Four independent compare chains instead of one: the serial
// dependency on `best` otherwise bounds the loop at one compare per latency.
template <typename compute_t>
int64_t argmin_affine(const compute_t* v, const double* add, double scale, int64_t k, double* value) {
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
  *value = b;
  return a;
}

// The running arg-reductions of one row over the tiles seen so far (index -1: none yet,
// or every key +inf).
struct Running {
  double score = 0.0, logit = 0.0;
  int64_t centre = -1, pred = -1;
};

// Folds a tile starting at centre c0 into the rows' running reductions. scores and logits
// are (rows, kt) blocks with row stride ld; neg_shift is -(W c + b), so the classifier's
// argmax is an argmin of -(logit + shift). Tiles come in increasing c0, so a later tile
// wins only on a strictly smaller key: ties go to the lowest index, as in torch.
template <typename compute_t>
void fold_tile_kernel(const compute_t* scores, const compute_t* logits, int64_t ld, const double* mu_sq,
                      const double* neg_shift, int64_t c0, int64_t rows, int64_t kt, Running* run) {
  for (int64_t i = 0; i < rows; ++i) {
    double v;
    // ||h' - mu'_c||^2 - ||h'||^2 = ||mu'_c||^2 - 2 h'.mu'_c; +inf for absent centres.
    int64_t a = argmin_affine(scores + i * ld, mu_sq + c0, -2.0, kt, &v);
    if (a >= 0 && argmin_takes(v, c0 + a, run[i].score, run[i].centre)) run[i].score = v, run[i].centre = c0 + a;
    if (logits == nullptr) continue;
    a = argmin_affine(logits + i * ld, neg_shift + c0, -1.0, kt, &v);
    if (a >= 0 && argmin_takes(v, c0 + a, run[i].logit, run[i].pred)) run[i].logit = v, run[i].pred = c0 + a;
  }
}

// Merges the running reductions of a chunk's centre groups (in group order) and adds the
// chunk's [n, ncc_correct, mismatch] to counts; writes its assignments (-1 for rows not
// counted).
template <typename label_t>
void assign_kernel(const Running* run, int64_t groups, int64_t stride, bool has_weight, const label_t* y,
                   int64_t rows, int64_t k, int64_t* assigned, int64_t* counts) {
  for (int64_t i = 0; i < rows; ++i) {
    Running r;
    for (int64_t g = 0; g < groups; ++g) {
      const Running& p = run[g * stride + i];
      if (argmin_takes(p.score, p.centre, r.score, r.centre)) r.score = p.score, r.centre = p.centre;
      if (argmin_takes(p.logit, p.pred, r.logit, r.pred)) r.logit = p.logit, r.pred = p.pred;
    }
    const int64_t label = static_cast<int64_t>(y[i]);
    int64_t arg = -1;
    if (label >= 0 && label < k && r.centre >= 0) {
      arg = r.centre;
      counts[0] += 1;
      counts[1] += arg == label;
      if (has_weight) counts[2] += std::max<int64_t>(r.pred, 0) != arg;  // all logits -inf: argmax is 0, as in torch
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
  const bool has_weight = setup.shift.defined();
  // Jobs: row chunks x groups of centre tiles, in one parallel region; each thread shifts,
  // multiplies (single-threaded GEMMs) and reduces its own jobs in its own buffers. The
  // centres are split into groups only when there are fewer chunks than threads (few rows
  // against many centres); each group keeps its own running reductions, merged in order.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunk = std::min(n, std::max<int64_t>(16, std::min(kChunk, (n + threads - 1) / threads)));
  const int64_t chunks = (n + chunk - 1) / chunk;
  const int64_t tiles = (k + kTile - 1) / kTile;
  const int64_t groups = std::min(tiles, chunks >= threads ? 1 : (threads + chunks - 1) / chunks);
  const int64_t tiles_per_group = (tiles + groups - 1) / groups;
  const int64_t jobs = chunks * groups;
  // Running reductions: per thread for its current chunk when one group spans all centres
  // (the chunk is assigned right after its last tile), else per group and row (few rows).
  std::vector<Running> grouped(groups > 1 ? groups * n : 0);
  std::vector<int64_t> chunk_counts(3 * chunks, 0);
  int64_t* out_assigned = assignments ? assigned.data_ptr<int64_t>() : nullptr;

  COLLAPSE_DISPATCH_FEATURES_LABELS(x.scalar_type(), y.scalar_type(), "nearest_centre_cpu", [&] {
    using compute_t = compute_type<scalar_t>;
    const label_t* labels_p = y.const_data_ptr<label_t>();
    auto assign = [&](const Running* run, int64_t stride, int64_t c) {
      const int64_t start = c * chunk, rows = std::min(chunk, n - start);
      assign_kernel(run, groups, stride, has_weight, labels_p + start, rows, k,
                    out_assigned ? out_assigned + start : nullptr, chunk_counts.data() + 3 * c);
    };
    // Threads take the next job from a counter (dynamic scheduling): on a shared machine a
    // static split leaves the op waiting for whichever thread lost its core.
    std::atomic<int64_t> next{0};
    at::parallel_for(0, std::min(threads, jobs), 1, [&](int64_t, int64_t) {
      auto shifted = at::empty({chunk, d}, x.options().dtype(compute));
      auto scores = at::empty({chunk * kTile}, x.options().dtype(compute));
      auto logits = has_weight ? at::empty({chunk * kTile}, x.options().dtype(compute)) : at::Tensor();
      std::vector<Running> own(groups > 1 ? 0 : chunk);
      for (int64_t job = next++; job < jobs; job = next++) {
        const int64_t c = job / groups, group = job % groups;
        const int64_t start = c * chunk, rows = std::min(chunk, n - start);
        at::Tensor h = shifted.narrow(0, 0, rows);
        shift_rows_kernel(x.const_data_ptr<scalar_t>() + start * x.stride(0), x.stride(0), centre, rows, d,
                          h.data_ptr<compute_t>());
        Running* run = groups > 1 ? grouped.data() + group * n + start : own.data();
        if (groups == 1) std::fill(own.begin(), own.end(), Running{});
        const int64_t t_end = std::min(tiles, (group + 1) * tiles_per_group);
        for (int64_t t = group * tiles_per_group; t < t_end; ++t) {
          const int64_t c0 = t * kTile, kt = std::min(kTile, k - c0);
          at::Tensor s = scores.narrow(0, 0, rows * kt).view({rows, kt});
          at::mm_out(s, h, setup.stacked.narrow(0, c0, kt).t());
          at::Tensor l;
          if (has_weight) {
            l = logits.narrow(0, 0, rows * kt).view({rows, kt});
            at::mm_out(l, h, setup.stacked.narrow(0, k + c0, kt).t());
          }
          fold_tile_kernel(s.const_data_ptr<compute_t>(), has_weight ? l.const_data_ptr<compute_t>() : nullptr, kt,
                           mu_sq, neg_shift, c0, rows, kt, run);
        }
        if (groups == 1) assign(own.data(), chunk, c);
      }
    });
    if (groups > 1)
      for (int64_t c = 0; c < chunks; ++c) assign(grouped.data() + c * chunk, n, c);
  });
  int64_t* total = counts.data_ptr<int64_t>();
  for (int64_t c = 0; c < chunks; ++c)
    for (int t = 0; t < 3; ++t) total[t] += chunk_counts[3 * c + t];
  return {counts, assigned};
}

}  // namespace

TORCH_LIBRARY_IMPL(collapse_ext, CPU, m) { m.impl("nearest_centre", &nearest_centre_cpu); }

}  // namespace collapse_ext
