// Host side of class_stats shared by the backends: argument checks and the outputs.
#pragma once

#include <torch/all.h>

#include "checks.h"

namespace collapse_ext {

struct ClassStatsArgs {
  at::Tensor x;       // (N, d) features with unit-stride columns
  at::Tensor y;       // (N,) contiguous labels
  at::Tensor counts;  // (K,) int64, zero
  at::Tensor means;   // (K, d) float64, zero
  at::Tensor sqdev;   // (K,) float64, zero
  int64_t n, d, num_classes;
};

inline ClassStatsArgs class_stats_args(const at::Tensor& features, const at::Tensor& labels, int64_t num_classes) {
  check_features_labels(features, labels);
  TORCH_CHECK(num_classes > 0, "num_classes must be a positive int, got ", num_classes);
  ClassStatsArgs a;
  a.x = unit_stride_columns(features);
  a.y = labels.contiguous();
  a.n = a.x.size(0);
  a.d = a.x.size(1);
  a.num_classes = num_classes;
  a.counts = at::zeros({num_classes}, labels.options().dtype(at::kLong));
  a.means = at::zeros({num_classes, a.d}, a.x.options().dtype(at::kDouble));
  a.sqdev = at::zeros({num_classes}, a.x.options().dtype(at::kDouble));
  return a;
}

}  // namespace collapse_ext
