// Host side of class_fold shared by the backends: the contract and the argument checks.
//
// class_fold merges ClassStats' pending block (collapse_ext/stats/class_stats.py) into its
// folded state, in place. For every class k with pending_k > 0, with N = counts_k +
// pending_k and the exact mean about the shift, m = means_k + sums_k / N (float64):
//   sqdev_k  <- max(0, sqdev_k + sqsums_k - ||sums_k||^2 / N),
//   counts_k <- N,   pending_k <- 0,   means_k <- m rounded to the state dtype,
//   sums_k   <- N (m - means_k) rounded,   sqsums_k <- ||sums_k||^2 / N.
// The last two keep the rounding of the stored mean in the pending block, as if N rows
// sat at the exact mean: the next fold then starts from the exact mean of the rows folded
// so far, not from its rounding. With a float64 state they are zero (m is a float64
// already); with a float32 state the rounding of the means, 1e-7 of the features' common
// offset, would otherwise add N ||means_k - m||^2 to sqdev_k at every later fold.
// Classes with pending_k == 0 are not visited: O(K + d x classes folded).
#pragma once

#include <torch/all.h>

#include "checks.h"
#include "common.h"

namespace collapse_ext {

inline void class_fold_check(const at::Tensor& counts, const at::Tensor& means, const at::Tensor& pending,
                             const at::Tensor& sums, const at::Tensor& sqsums, const at::Tensor& sqdev) {
  TORCH_CHECK(means.dim() == 2, "means must be 2-D (K, d), got ", means.dim(), "-D");
  TORCH_CHECK(means.scalar_type() == at::kFloat || means.scalar_type() == at::kDouble,
              "means must be float32 or float64 (the state dtype), got ", means.scalar_type());
  TORCH_CHECK(means.is_contiguous(), "means must be contiguous");
  const int64_t k = means.size(0);
  TORCH_CHECK(sums.sizes() == means.sizes() && sums.scalar_type() == means.scalar_type() && sums.is_contiguous(),
              "sums must be a contiguous tensor of the shape and dtype of means ", means.sizes(), " ",
              means.scalar_type(), ", got ", sums.sizes(), " ", sums.scalar_type());
  for (const auto* t : {&counts, &pending}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == k && t->scalar_type() == at::kLong && t->is_contiguous(),
                "counts and pending must be contiguous (K,) int64 with K = ", k, ", got ", t->sizes(), " ",
                t->scalar_type());
    CE_CHECK_SAME_DEVICE(*t, means, "counts/pending", "means");
  }
  for (const auto* t : {&sqsums, &sqdev}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == k && t->scalar_type() == at::kDouble && t->is_contiguous(),
                "sqsums and sqdev must be contiguous (K,) float64 with K = ", k, ", got ", t->sizes(), " ",
                t->scalar_type());
    CE_CHECK_SAME_DEVICE(*t, means, "sqsums/sqdev", "means");
  }
  CE_CHECK_SAME_DEVICE(sums, means, "sums", "means");
}

}  // namespace collapse_ext
