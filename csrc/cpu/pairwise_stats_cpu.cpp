// Pairwise statistics over the rows of a (K, d) matrix on the CPU: cosines, the simplex-
// ETF gap, log/Riesz kernels on the unit sphere, CDNV terms and Gram energy, reduced to
// a float64 vector (collapse_ext.reference.PAIRWISE_FIELDS) without holding K x K.
//
// The upper triangle of the Gram matrix is formed one (T, T) tile at a time through
// BLAS (at::mm: MKL/OpenBLAS beat any hand loop) and reduced in C++ straight after, while
// the tile is still in cache. Memory is O(K d + threads T^2). Tile pairs are the unit of
// parallel work; their results are folded in a fixed order, so the result does not
// depend on the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "../checks.h"
#include "../common.h"
#include "../pairwise_stats.h"

namespace collapse_ext {
namespace {

using pairwise::kNumFields;

// At most 512 x 512 fp32 = 1 MiB per tile: it stays in L2 between the GEMM and the
// reduction. Smaller tiles for small K, so every thread gets tile pairs.
constexpr int64_t kMaxTile = 512;

// Reduces one (ti, tj) Gram tile whose rows start at i0 and columns at j0 into `out`
// (only c > r on a diagonal tile), row by row.
template <typename compute_t>
void reduce_tile_kernel(const compute_t* gram, int64_t ti, int64_t tj, int64_t i0, int64_t j0, bool diagonal,
                 const double* sq, const double* inv, const double* var, const pairwise::Params& params, double* out) {
  pairwise::init(out);
  for (int64_t r = 0; r < ti; ++r) {
    // A local accumulator the compiler keeps in registers (a pointer into `out` might
    // alias the inputs and force a store per field per pair).
    double acc[kNumFields];
    pairwise::init(acc);
    const int64_t i = i0 + r;
    const compute_t* g = gram + r * tj;
    const double sq_i = sq[i], inv_i = inv[i], var_i = var ? var[i] : 0.0;
    for (int64_t c = diagonal ? r + 1 : 0; c < tj; ++c) {
      const int64_t j = j0 + c;
      pairwise::add_pair(acc, static_cast<double>(g[c]), sq_i, sq[j], inv_i, inv[j], var_i, var ? var[j] : 0.0,
                         params);
    }
    pairwise::merge(out, acc);
  }
}

// Squared norms and inverse norms in float64, row by row (a float64 copy of the rows
// would double the memory).
template <typename compute_t>
void row_norms_kernel(const compute_t* a, int64_t m, int64_t d, double* sq, double* inv) {
  at::parallel_for(0, m, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      double acc = 0.0;
      for (int64_t c = 0; c < d; ++c) acc += static_cast<double>(a[r * d + c]) * static_cast<double>(a[r * d + c]);
      sq[r] = acc;
      inv[r] = acc > 0.0 ? 1.0 / std::sqrt(acc) : 0.0;
    }
  });
}

at::Tensor pairwise_stats_cpu(const at::Tensor& rows, const std::optional<at::Tensor>& variances,
                              const std::optional<at::Tensor>& subset, double riesz_s, double cdnv_p) {
  check_pairwise_inputs(rows, variances, subset, riesz_s, cdnv_p);
  const auto selected = pairwise_rows(rows, variances, subset);
  const at::Tensor &a = selected.first, &v = selected.second;
  const auto compute = a.scalar_type();
  const int64_t m = a.size(0);
  auto out = at::empty({kNumFields}, rows.options().dtype(at::kDouble));
  double* result = out.data_ptr<double>();
  pairwise::init(result);
  if (m < 2) return out;

  std::vector<double> sq_v(m), inv_v(m);
  COLLAPSE_FLOAT_SWITCH(compute, compute_t, [&] {
    row_norms_kernel<compute_t>(a.const_data_ptr<compute_t>(), m, a.size(1), sq_v.data(), inv_v.data());
  });
  const double* sq = sq_v.data();
  const double* inv = inv_v.data();
  const double* var = v.defined() ? v.const_data_ptr<double>() : nullptr;
  const double eps = compute == at::kDouble ? std::numeric_limits<double>::epsilon()
                                            : static_cast<double>(std::numeric_limits<float>::epsilon());
  const pairwise::Params params{1.0 / static_cast<double>(m - 1), riesz_s, cdnv_p, v.defined(), 4.0 * eps};

  // One parallel region over the tile pairs (i <= j): each thread multiplies its own
  // tiles with a single-threaded GEMM and reduces them. One region instead of one per
  // tile avoids thousands of barriers (and OpenMP spin-waits on a shared machine).
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t tile = std::clamp<int64_t>((m + 4 * threads - 1) / (4 * threads), 64, kMaxTile);
  const int64_t tiles = (m + tile - 1) / tile;
  std::vector<std::pair<int64_t, int64_t>> jobs;
  for (int64_t bi = 0; bi < tiles; ++bi)
    for (int64_t bj = bi; bj < tiles; ++bj) jobs.emplace_back(bi * tile, bj * tile);
  std::vector<double> job_acc(jobs.size() * kNumFields);
  // Threads take the next tile pair from a counter (dynamic scheduling): on a shared
  // machine a static split leaves the op waiting for whichever thread lost its core.
  std::atomic<int64_t> next{0};
  const int64_t num_jobs = static_cast<int64_t>(jobs.size());
  at::parallel_for(0, std::min(threads, num_jobs), 1, [&](int64_t, int64_t) {
    auto gram = at::empty({tile * tile}, a.options());
    for (int64_t b = next++; b < num_jobs; b = next++) {
      const int64_t i0 = jobs[b].first, j0 = jobs[b].second;
      const int64_t ti = std::min(tile, m - i0), tj = std::min(tile, m - j0);
      at::Tensor g = gram.narrow(0, 0, ti * tj).view({ti, tj});
      at::mm_out(g, a.narrow(0, i0, ti), a.narrow(0, j0, tj).t());
      COLLAPSE_FLOAT_SWITCH(compute, compute_t, [&] {
        reduce_tile_kernel<compute_t>(g.const_data_ptr<compute_t>(), ti, tj, i0, j0, i0 == j0, sq, inv, var, params,
                                      job_acc.data() + b * kNumFields);
      });
    }
  });
  // Folded in job order: the result does not depend on the number of threads.
  for (size_t b = 0; b < jobs.size(); ++b) pairwise::merge(result, job_acc.data() + b * kNumFields);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(collapse_ext, CPU, m) { m.impl("pairwise_stats", &pairwise_stats_cpu); }

}  // namespace collapse_ext
