// The per-pair reduction of pairwise_stats, shared by the CPU and CUDA kernels so both
// compute exactly the same quantities from one Gram entry. The output layout is
// collapse_ext.reference.PAIRWISE_FIELDS; keep the two in the same order. The CPU's AVX2
// loop (lanes::reduce_tile in cpu/pairwise_stats_cpu.cpp) restates add_pair on 4 lanes:
// a change here goes there too.
#pragma once

#include <torch/all.h>

#include <cmath>
#include <optional>
#include <utility>

#include "checks.h"
#include "common.h"

namespace collapse_ext {
namespace pairwise {

enum Field : int {
  kPairs,
  kCosPairs,
  kCosSum,
  kCosMin,
  kCosMax,
  kEtfAbsSum,
  kEtfSqSum,
  kKernelPairs,
  kLogSum,
  kLogSqSum,
  kRieszSum,
  kRieszSqSum,
  kCdnvSum,
  kCoincident,
  kDotSqSum,
  kDistSqMax,
  kNumFields
};

// Host-validated constants of one call; the kernels only read them.
struct Params {
  double etf_shift;  // 1 / (m - 1): the simplex-ETF cosine is -etf_shift
  double riesz_s;
  double cdnv_p;
  bool has_variances;
  // 4 eps of the Gram product dtype: distances within this fraction of ||a_j||^2 + ||a_k||^2
  // are rounding of the Gram identity, so such pairs count as coinciding.
  double tol;
};

// Plain compares, not fmin/fmax: without -ffinite-math-only those are library calls on
// the CPU, several per pair. Inputs are finite (NaN rows give NaN sums either way).
COLLAPSE_HD_INLINE double lo(double a, double b) { return b < a ? b : a; }
COLLAPSE_HD_INLINE double hi(double a, double b) { return b > a ? b : a; }

COLLAPSE_HD_INLINE bool is_min(int f) { return f == kCosMin; }
COLLAPSE_HD_INLINE bool is_max(int f) { return f == kCosMax || f == kDistSqMax; }

// The empty value of field f, and two partial values of f folded into one.
COLLAPSE_HD_INLINE double identity(int f) { return is_min(f) ? INFINITY : (is_max(f) ? -INFINITY : 0.0); }
COLLAPSE_HD_INLINE double fold(int f, double a, double b) {
  return is_min(f) ? lo(a, b) : (is_max(f) ? hi(a, b) : a + b);
}

COLLAPSE_HD_INLINE void init(double* acc) {
  for (int f = 0; f < kNumFields; ++f) acc[f] = identity(f);
}

COLLAPSE_HD_INLINE void merge(double* acc, const double* other) {
  for (int f = 0; f < kNumFields; ++f) acc[f] = fold(f, acc[f], other[f]);
}

// One pair j < k: dot = a_j . a_k, sq_* = ||a_*||^2, inv_* = 1/||a_*|| (0 for a zero row),
// var_* the per-row variances (ignored without them).
COLLAPSE_HD_INLINE void add_pair(double* acc, double dot, double sq_j, double sq_k, double inv_j, double inv_k,
                             double var_j, double var_k, const Params& p) {
  acc[kPairs] += 1.0;
  // The Gram identity for distances: callers centre the rows first (metrics pass
  // mu_k - mu_G), which keeps the cancellation at the scale of the spread.
  const double dist_sq = hi(sq_j + sq_k - 2.0 * dot, 0.0);
  acc[kDistSqMax] = hi(acc[kDistSqMax], dist_sq);
  acc[kDotSqSum] += dot * dot;
  if (dist_sq > p.tol * (sq_j + sq_k)) {
    if (p.has_variances) {
      const double denom = p.cdnv_p == 1.0 ? dist_sq : pow(dist_sq, p.cdnv_p);
      acc[kCdnvSum] += (var_j + var_k) / (2.0 * denom);
    }
  } else {
    acc[kCoincident] += 1.0;
  }
  if (inv_j == 0.0 || inv_k == 0.0) return;
  const double cos = lo(hi(dot * inv_j * inv_k, -1.0), 1.0);
  acc[kCosPairs] += 1.0;
  acc[kCosSum] += cos;
  acc[kCosMin] = lo(acc[kCosMin], cos);
  acc[kCosMax] = hi(acc[kCosMax], cos);
  const double shifted = cos + p.etf_shift;
  acc[kEtfAbsSum] += fabs(shifted);
  acc[kEtfSqSum] += shifted * shifted;
  const double unit_sq = hi(2.0 - 2.0 * cos, 0.0);  // ||u_j - u_k||^2 on the unit sphere
  if (unit_sq > 2.0 * p.tol) {
    const double lg = -0.5 * log(unit_sq);  // log(1 / ||u_j - u_k||)
    // ||u_j - u_k||^-s; exp/pow only for an unusual exponent.
    const double riesz = p.riesz_s == 1.0 ? 1.0 / sqrt(unit_sq)
                         : p.riesz_s == 2.0 ? 1.0 / unit_sq
                                            : exp(p.riesz_s * lg);
    acc[kKernelPairs] += 1.0;
    acc[kLogSum] += lg;
    acc[kLogSqSum] += lg * lg;
    acc[kRieszSum] += riesz;
    acc[kRieszSqSum] += riesz * riesz;
  }
}

}  // namespace pairwise

// rows (K, d) float; variances (K,) float; subset (m,) int indices into rows, checked to
// lie in [0, K) (one host synchronisation on CUDA: this op is not for the training step).
inline void check_pairwise_inputs(const at::Tensor& rows, const std::optional<at::Tensor>& variances,
                                  const std::optional<at::Tensor>& subset, double riesz_s, double cdnv_p) {
  CE_CHECK_DIM(rows, 2, "rows", "(K, d)");
  CE_CHECK_FLOAT(rows, "rows");
  if (variances.has_value()) {
    CE_CHECK_DIM(*variances, 1, "variances", "(K,)");
    CE_CHECK_FLOAT(*variances, "variances");
    CE_CHECK_SIZE(*variances, 0, rows.size(0), "variances", "K (the rows of rows)");
    CE_CHECK_SAME_DEVICE(*variances, rows, "variances", "rows");
  }
  if (subset.has_value()) {
    CE_CHECK_DIM(*subset, 1, "subset", "(m,)");
    CE_CHECK_LABELS(*subset, "subset");
    CE_CHECK_SAME_DEVICE(*subset, rows, "subset", "rows");
    if (subset->numel() > 0) {
      const auto [lo, hi] = at::aminmax(*subset);
      const int64_t lo_v = lo.item<int64_t>(), hi_v = hi.item<int64_t>();
      TORCH_CHECK(lo_v >= 0 && hi_v < rows.size(0), "subset must hold row indices in [0, ", rows.size(0),
                  "), got values in [", lo_v, ", ", hi_v, "]");
    }
  }
  TORCH_CHECK(std::isfinite(riesz_s) && riesz_s > 0, "riesz_s must be a positive finite number, got ", riesz_s);
  TORCH_CHECK(std::isfinite(cdnv_p) && cdnv_p > 0, "cdnv_p must be a positive finite number, got ", cdnv_p);
}

// The rows the kernel reduces over (the subset, if any) in the product dtype, and their
// variances in float64: fp16/bf16/fp32 rows are multiplied in fp32, fp64 in fp64;
// everything after the Gram entry (norms, cosines, kernels, sums) is float64.
inline std::pair<at::Tensor, at::Tensor> pairwise_rows(const at::Tensor& rows, const std::optional<at::Tensor>& variances,
                                                       const std::optional<at::Tensor>& subset) {
  const auto compute = rows.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor a = rows, v = variances.has_value() ? variances->to(at::kDouble) : at::Tensor();
  if (subset.has_value()) {
    const at::Tensor index = subset->to(at::kLong);
    a = a.index_select(0, index);
    if (v.defined()) v = v.index_select(0, index);
  }
  return {a.to(compute).contiguous(), v.defined() ? v.contiguous() : v};
}

}  // namespace collapse_ext
