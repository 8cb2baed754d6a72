// Host-side checks and set-up of nearest_centre, shared by the CPU and CUDA backends.
// Everything here is tensor ops on the input's device: no host synchronisation, so the
// op can run inside a training step.
#pragma once

#include <torch/all.h>

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

inline NearestCentreSetup nearest_centre_setup(const at::Tensor& means, const std::optional<at::Tensor>& weight,
                                               const std::optional<at::Tensor>& bias,
                                               const std::optional<at::Tensor>& present, at::ScalarType compute) {
  NearestCentreSetup s;
  const at::Tensor mu = means.to(at::kDouble);
  const at::Tensor mask = present.has_value() ? *present : at::ones({means.size(0)}, means.options().dtype(at::kBool));
  const at::Tensor w = mask.to(at::kDouble).unsqueeze(1);
  s.centre = (mu * w).sum(0) / w.sum().clamp_min(1.0);
  const at::Tensor shifted = (mu - s.centre).to(compute);
  s.mu_sq = shifted.to(at::kDouble).square().sum(1).masked_fill(mask.logical_not(),
                                                                std::numeric_limits<double>::infinity());
  s.stacked = weight.has_value() ? at::cat({shifted, weight->to(compute)}, 0) : shifted.contiguous();
  if (weight.has_value()) {
    s.shift = at::mv(weight->to(at::kDouble), s.centre);
    if (bias.has_value()) s.shift = s.shift + bias->to(at::kDouble);
    s.shift = s.shift.contiguous();
  }
  return s;
}

}  // namespace collapse_ext
