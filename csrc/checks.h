// Input checks shared by every backend. Each message names the argument and the
// expected form, so a user can fix the call without reading the source.
#pragma once

#include <torch/all.h>

#define CE_CHECK_DIM(t, n, name, form)                                               \
  TORCH_CHECK((t).dim() == (n), name " must be " #n "-D " form ", got ", (t).dim(), \
              "-D tensor of shape ", (t).sizes())

#define CE_CHECK_FLOAT(t, name)                                                    \
  TORCH_CHECK(at::isFloatingType((t).scalar_type()), name                          \
              " must be a floating tensor (float16, bfloat16, float32 or float64), " \
              "got ", (t).scalar_type())

#define CE_CHECK_LABELS(t, name)                                                    \
  TORCH_CHECK((t).scalar_type() == at::kLong || (t).scalar_type() == at::kInt, name \
              " must be int32 or int64, got ", (t).scalar_type())

#define CE_CHECK_SAME_DEVICE(a, b, name_a, name_b)                                     \
  TORCH_CHECK((a).device() == (b).device(), name_a " and " name_b                      \
              " must be on the same device, got ", (a).device(), " and ", (b).device())

#define CE_CHECK_SIZE(t, dim, expected, name, what)                                   \
  TORCH_CHECK((t).size(dim) == (expected), name " must have ", what, " = ", expected, \
              " in dimension ", dim, ", got ", (t).size(dim))

namespace collapse_ext {

// features (N, d) float, labels (N,) int: the pair every per-sample op takes.
inline void check_features_labels(const at::Tensor& features, const at::Tensor& labels) {
  CE_CHECK_DIM(features, 2, "features", "(N, d)");
  CE_CHECK_FLOAT(features, "features");
  CE_CHECK_DIM(labels, 1, "labels", "(N,)");
  CE_CHECK_LABELS(labels, "labels");
  CE_CHECK_SIZE(labels, 0, features.size(0), "labels", "N (the rows of features)");
  CE_CHECK_SAME_DEVICE(features, labels, "features", "labels");
}

// means (K, d) float on the features' device, d matching.
inline void check_means(const at::Tensor& means, const at::Tensor& features) {
  CE_CHECK_DIM(means, 2, "means", "(K, d)");
  CE_CHECK_FLOAT(means, "means");
  CE_CHECK_SIZE(means, 1, features.size(1), "means", "d (the columns of features)");
  CE_CHECK_SAME_DEVICE(means, features, "means", "features");
}

// Rows may be strided (a slice of a wider tensor); columns must be unit-stride, so a
// column-strided (e.g. transposed) input is copied once.
inline at::Tensor unit_stride_columns(const at::Tensor& features) {
  return features.stride(1) == 1 ? features : features.contiguous();
}

}  // namespace collapse_ext
