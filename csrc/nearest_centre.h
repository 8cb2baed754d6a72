// Host-side checks and set-up of nearest_centre, shared by the CPU and CUDA backends.
// Everything here is tensor ops on the input's device: no host synchronisation, so the
// op can run inside a training step.
#pragma once

#include <torch/all.h>

#include <algorithm>
#include <limits>
#include <optional>

#include "checks.h"
#include "common.h"

namespace collapse_ext {

// The order of the (value, index) arg-reductions on both backends: an index < 0 means
// "nothing yet" and loses; otherwise the smaller value wins, then the smaller index. The
// order is total, so any reduction tree picks the lowest index among exact ties.
COLLAPSE_HD_INLINE bool argmin_takes(double v, int64_t i, double value, int64_t index) {
  return i >= 0 && (index < 0 || v < value || (v == value && i < index));
}

// features (N, d), labels (N,), means (K, d); weight (K, d), bias (K,) (needs weight),
// present (K,) bool, all on the features' device.
inline void check_nearest_centre_inputs(const at::Tensor& features, const at::Tensor& labels, const at::Tensor& means,
                                        const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                        const std::optional<at::Tensor>& present) {
  check_features_labels(features, labels);
  check_means(means, features);
  const int64_t k = means.size(0);
  if (weight.has_value()) {
    CE_CHECK_DIM(*weight, 2, "weight", "(K, d)");
    CE_CHECK_FLOAT(*weight, "weight");
    CE_CHECK_SIZE(*weight, 0, k, "weight", "K (the rows of means)");
    CE_CHECK_SIZE(*weight, 1, features.size(1), "weight", "d (the columns of features)");
    CE_CHECK_SAME_DEVICE(*weight, features, "weight", "features");
  }
  if (bias.has_value()) {
    TORCH_CHECK(weight.has_value(), "bias needs weight: got bias without a classifier weight");
    CE_CHECK_DIM(*bias, 1, "bias", "(K,)");
    CE_CHECK_FLOAT(*bias, "bias");
    CE_CHECK_SIZE(*bias, 0, k, "bias", "K (the rows of means)");
    CE_CHECK_SAME_DEVICE(*bias, features, "bias", "features");
  }
  if (present.has_value()) {
    CE_CHECK_DIM(*present, 1, "present", "(K,)");
    TORCH_CHECK(present->scalar_type() == at::kBool, "present must be a bool tensor, got ", present->scalar_type());
    CE_CHECK_SIZE(*present, 0, k, "present", "K (the rows of means)");
    CE_CHECK_SAME_DEVICE(*present, features, "present", "features");
  }
}

struct NearestCentreSetup {
  at::Tensor centre;  // (d,) float64: mean of the present centres (0 when none)
  // (K, d) or (2K, d) compute dtype: the shifted centres mu - c (rounded once), then the
  // classifier rows W when given, so one GEMM gives both scores and logits.
  at::Tensor stacked;
  at::Tensor mu_sq;  // (K,) float64: ||mu'_k||^2 of the rounded rows, +inf for absent centres
  at::Tensor shift;  // (K,) float64: W c + b, or undefined
};

// Rows of the (K, d) inputs per step of the set-up: its float64 temporaries stay near
// 32 MiB whatever K (whole (K, d) float64 copies were 8 GiB each at K = 250 000, d = 4096).
inline int64_t setup_rows(int64_t d) { return std::max<int64_t>(1, (int64_t{1} << 22) / std::max<int64_t>(d, 1)); }

inline NearestCentreSetup nearest_centre_setup(const at::Tensor& means, const std::optional<at::Tensor>& weight,
                                               const std::optional<at::Tensor>& bias,
                                               const std::optional<at::Tensor>& present, at::ScalarType compute) {
  NearestCentreSetup s;
  const int64_t k = means.size(0), d = means.size(1), step = setup_rows(d);
  const auto f64 = means.options().dtype(at::kDouble);
  const at::Tensor mask = present.has_value() ? *present : at::ones({k}, means.options().dtype(at::kBool));
  const at::Tensor w = mask.to(at::kDouble).unsqueeze(1);
  at::Tensor total = at::zeros({d}, f64);
  for (int64_t r = 0; r < k; r += step) {
    const int64_t rows = std::min(step, k - r);
    total += (means.narrow(0, r, rows).to(at::kDouble) * w.narrow(0, r, rows)).sum(0);
  }
  s.centre = total / w.sum().clamp_min(1.0);
  const int64_t stacked_rows = weight.has_value() ? 2 * k : k;
  s.stacked = at::empty({stacked_rows, d}, means.options().dtype(compute));
  s.mu_sq = at::empty({k}, f64);
  if (weight.has_value()) s.shift = at::empty({k}, f64);
  for (int64_t r = 0; r < k; r += step) {
    const int64_t rows = std::min(step, k - r);
    at::Tensor shifted = s.stacked.narrow(0, r, rows);
    shifted.copy_(means.narrow(0, r, rows).to(at::kDouble) - s.centre);
    s.mu_sq.narrow(0, r, rows).copy_(shifted.to(at::kDouble).square().sum(1));
    if (weight.has_value()) {
      const at::Tensor wr = weight->narrow(0, r, rows);
      s.stacked.narrow(0, k + r, rows).copy_(wr);
      s.shift.narrow(0, r, rows).copy_(at::mv(wr.to(at::kDouble), s.centre));
    }
  }
  s.mu_sq.masked_fill_(mask.logical_not(), std::numeric_limits<double>::infinity());
  if (bias.has_value()) s.shift += bias->to(at::kDouble);
  return s;
}

}  // namespace collapse_ext
