// The (K,) and (K, d) state tensors of ClassStats that class_accumulate and class_fold
// update in place, and their checks (each message names the argument and its form).
#pragma once

#include <torch/all.h>

#include <utility>

#include "checks.h"

namespace collapse_ext {

// counts, pending: (K,) int64; means, sums: (K, d) float32/float64, one dtype (the state
// dtype); sqsums and, when given, sqdev: (K,) float64; all contiguous, on means' device.
inline void check_class_state(const at::Tensor& counts, const at::Tensor& means, const at::Tensor& pending,
                              const at::Tensor& sums, const at::Tensor& sqsums, const at::Tensor* sqdev = nullptr) {
  TORCH_CHECK(means.dim() == 2, "means must be 2-D (K, d), got ", means.dim(), "-D");
  TORCH_CHECK(means.scalar_type() == at::kFloat || means.scalar_type() == at::kDouble,
              "means must be float32 or float64 (the state dtype), got ", means.scalar_type());
  TORCH_CHECK(means.is_contiguous(), "means must be contiguous");
  const int64_t k = means.size(0);
  TORCH_CHECK(sums.sizes() == means.sizes() && sums.scalar_type() == means.scalar_type() && sums.is_contiguous(),
              "sums must be a contiguous tensor of the shape and dtype of means ", means.sizes(), " ",
              means.scalar_type(), ", got ", sums.sizes(), " ", sums.scalar_type());
  CE_CHECK_SAME_DEVICE(sums, means, "sums", "means");
  for (const auto* t : {&counts, &pending}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == k && t->scalar_type() == at::kLong && t->is_contiguous(),
                "counts and pending must be contiguous (K,) int64 with K = ", k, ", got ", t->sizes(), " ",
                t->scalar_type());
    CE_CHECK_SAME_DEVICE(*t, means, "counts/pending", "means");
  }
  for (const auto& [t, name] : {std::pair{&sqsums, "sqsums"}, std::pair{sqdev, "sqdev"}}) {
    if (t == nullptr) continue;
    TORCH_CHECK(t->dim() == 1 && t->size(0) == k && t->scalar_type() == at::kDouble && t->is_contiguous(), name,
                " must be contiguous (K,) float64 with K = ", k, ", got ", t->sizes(), " ", t->scalar_type());
    TORCH_CHECK(t->device() == means.device(), name, " and means must be on the same device, got ", t->device(),
                " and ", means.device());
  }
}

}  // namespace collapse_ext
