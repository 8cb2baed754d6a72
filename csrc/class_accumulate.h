// Host side of class_accumulate shared by the backends: argument checks and the outputs.
//
// class_accumulate adds a batch to ClassStats' pending block (collapse_ext/stats.py):
// each row is centred about its class's shift c_k, the class mean at the last fold (the
// `means` row), or, for a class with no row yet (counts_k + pending_k == 0), the mean of
// that class's rows in the batch rounded to the state dtype, which then becomes that
// class's `means` row. With e_i = h_i - c_{y_i} formed in float64:
//   pending_k += 1, sums_k += e_i, sqsums_k += ||e_i||^2, centred_i = e_i (compute dtype;
//   with return_centred false `centred` is (0, d) and nothing is written to it).
// The batch is all or nothing: any label outside [0, K), any NaN/Inf feature, or any
// ||e_i||^2 > limit leaves every state tensor as it was and zeroes `centred`.
// status (4,) float64 = [accepted (1/0), max_i ||e_i||^2 over finite rows,
//                        first row with a bad label (-1: none), first non-finite row (-1)].
#pragma once

#include <torch/all.h>

#include "checks.h"
#include "class_state.h"
#include "common.h"

namespace collapse_ext {

struct ClassAccumulateArgs {
  at::Tensor x;        // (N, d) features, unit-stride columns
  at::Tensor y;        // (N,) contiguous labels
  at::Tensor centred;  // (N, d) compute dtype (float32, or float64 for fp64 features)
  at::Tensor status;   // (4,) float64
  int64_t n, d, num_classes;
};

inline ClassAccumulateArgs class_accumulate_args(const at::Tensor& features, const at::Tensor& labels,
                                                 const at::Tensor& counts, const at::Tensor& means,
                                                 const at::Tensor& pending, const at::Tensor& sums,
                                                 const at::Tensor& sqsums, bool return_centred) {
  check_features_labels(features, labels);
  check_means(means, features);
  check_class_state(counts, means, pending, sums, sqsums);
  const int64_t k = means.size(0);
  ClassAccumulateArgs a;
  a.x = unit_stride_columns(features);
  a.y = labels.contiguous();
  a.n = a.x.size(0);
  a.d = a.x.size(1);
  a.num_classes = k;
  a.centred = at::empty({return_centred ? a.n : 0, a.d}, a.x.options().dtype(compute_dtype(features.scalar_type())));
  a.status = at::empty({4}, a.x.options().dtype(at::kDouble));
  return a;
}

}  // namespace collapse_ext
