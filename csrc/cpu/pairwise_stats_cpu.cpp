// Pairwise statistics over the rows of a (K, d) matrix on the CPU: cosines, the simplex-
// ETF gap, log/Riesz kernels on the unit sphere, CDNV terms and Gram energy, reduced to
// a float64 vector (collapse_ext.reference.PAIRWISE_FIELDS) without holding K x K.
//
// The upper triangle of the Gram matrix is formed one (T, T) tile at a time through
// BLAS (at::mm: MKL/OpenBLAS beat any hand loop) and reduced in C++ straight after, while
// the tile is still in cache. Memory is O(K d + T^2). Each row of a tile is reduced on
// its own and the row results are folded in row order, so the result does not depend on
// the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <vector>

#include "../checks.h"
#include "../pairwise_stats.h"

namespace collapse_ext {
namespace {

using pairwise::kNumFields;

// 512 x 512 fp32 = 1 MiB: one tile stays in L2 between the GEMM and the reduction.
constexpr int64_t kTile = 512;

template <typename compute_t>
void reduce_tile(const compute_t* gram, int64_t ti, int64_t tj, int64_t i0, int64_t j0, bool diagonal,
                 const double* sq, const double* inv, const double* var, const pairwise::Params& params,
                 double* row_acc) {
  at::parallel_for(0, ti, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      double* acc = row_acc + r * kNumFields;
      pairwise::init(acc);
      const int64_t i = i0 + r;
      const compute_t* g = gram + r * tj;
      const double vi = var ? var[i] : 0.0;
      for (int64_t c = diagonal ? r + 1 : 0; c < tj; ++c) {
        const int64_t j = j0 + c;
        pairwise::add_pair(acc, static_cast<double>(g[c]), sq[i], sq[j], inv[i], inv[j], vi, var ? var[j] : 0.0,
                           params);
      }
    }
  });
}

at::Tensor pairwise_stats_cpu(const at::Tensor& rows, const std::optional<at::Tensor>& variances,
                              const std::optional<at::Tensor>& subset, double riesz_s, double cdnv_p) {
  check_pairwise_inputs(rows, variances, subset, riesz_s, cdnv_p);
  // fp16/bf16/fp32 rows are multiplied in fp32, fp64 in fp64; everything after the
  // Gram entry (norms, cosines, kernels, sums) is float64.
  const auto compute = rows.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor a = rows, v = variances.has_value() ? variances->to(at::kDouble) : at::Tensor();
  if (subset.has_value()) {
    const at::Tensor index = subset->to(at::kLong);
    a = a.index_select(0, index);
    if (v.defined()) v = v.index_select(0, index);
  }
  a = a.to(compute).contiguous();
  if (v.defined()) v = v.contiguous();
  const int64_t m = a.size(0);
  auto out = at::empty({kNumFields}, rows.options().dtype(at::kDouble));
  double* result = out.data_ptr<double>();
  pairwise::init(result);
  if (m < 2) return out;

  const at::Tensor sq_t = a.to(at::kDouble).square().sum(1);
  const at::Tensor inv_t = at::where(sq_t > 0, sq_t.rsqrt(), at::zeros_like(sq_t));
  const double* sq = sq_t.const_data_ptr<double>();
  const double* inv = inv_t.const_data_ptr<double>();
  const double* var = v.defined() ? v.const_data_ptr<double>() : nullptr;
  const double eps = compute == at::kDouble ? std::numeric_limits<double>::epsilon()
                                            : static_cast<double>(std::numeric_limits<float>::epsilon());
  const pairwise::Params params{1.0 / static_cast<double>(m - 1), riesz_s, cdnv_p, v.defined(), 4.0 * eps};

  const int64_t tile = std::min(kTile, m);
  auto gram = at::empty({tile, tile}, a.options());
  std::vector<double> row_acc(tile * kNumFields);
  for (int64_t i0 = 0; i0 < m; i0 += tile) {
    const int64_t ti = std::min(tile, m - i0);
    const at::Tensor ai = a.narrow(0, i0, ti);
    for (int64_t j0 = i0; j0 < m; j0 += tile) {
      const int64_t tj = std::min(tile, m - j0);
      at::Tensor g = ti == tile && tj == tile ? gram : at::empty({ti, tj}, a.options());
      at::mm_out(g, ai, a.narrow(0, j0, tj).t());
      AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "pairwise_stats_cpu", [&] {
        reduce_tile<scalar_t>(g.const_data_ptr<scalar_t>(), ti, tj, i0, j0, i0 == j0, sq, inv, var, params,
                              row_acc.data());
      });
      for (int64_t r = 0; r < ti; ++r) pairwise::merge(result, row_acc.data() + r * kNumFields);
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(collapse_ext, CPU, m) { m.impl("pairwise_stats", &pairwise_stats_cpu); }

}  // namespace collapse_ext
