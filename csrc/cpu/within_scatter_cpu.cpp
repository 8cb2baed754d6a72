// Pooled within-class scatter on the CPU: sum_i (h_i - m_{y_i})(h_i - m_{y_i})^T, or its
// projection B^T S B onto a basis B (d, r).
//
// Rows are centred a cache-sized chunk at a time (in float64, rounded once to the
// compute dtype) and the chunk's product goes through BLAS, accumulated in float64.
// Measured at N=20000, d=512 fp32 (benchmarks/bench_class_stats.py): a hand-fused
// centring-inside-the-product loop cannot get near MKL's GEMM, while the chunk copy
// costs two passes over data already in cache, so chunk + BLAS is the faster one; the
// centred (N, d) copy is never materialised.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "../checks.h"

namespace collapse_ext {
namespace {

constexpr int64_t kChunkBytes = 8 << 20;

template <typename scalar_t, typename label_t, typename compute_t>
void centre_rows(const scalar_t* x, int64_t row_stride, const label_t* y, const double* means,
                 int64_t num_classes, int64_t rows, int64_t d, compute_t* out) {
  at::parallel_for(0, rows, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const scalar_t* row = x + i * row_stride;
      compute_t* dst = out + i * d;
      const int64_t k = static_cast<int64_t>(y[i]);
      if (k < 0 || k >= num_classes) {
        std::fill(dst, dst + d, compute_t(0));
        continue;
      }
      const double* mean = means + k * d;
      for (int64_t j = 0; j < d; ++j)
        dst[j] = static_cast<compute_t>(static_cast<double>(row[j]) - mean[j]);
    }
  });
}

at::Tensor within_scatter_cpu(const at::Tensor& features, const at::Tensor& labels,
                              const at::Tensor& means, const std::optional<at::Tensor>& basis) {
  check_features_labels(features, labels);
  check_means(means, features);
  const int64_t n = features.size(0), d = features.size(1), num_classes = means.size(0);
  // fp16/bf16/fp32 are centred and multiplied in fp32; fp64 stays fp64.
  const auto compute = features.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor proj;
  if (basis.has_value()) {
    CE_CHECK_DIM(*basis, 2, "basis", "(d, r)");
    CE_CHECK_FLOAT(*basis, "basis");
    CE_CHECK_SIZE(*basis, 0, d, "basis", "d (the columns of features)");
    CE_CHECK_SAME_DEVICE(*basis, features, "basis", "features");
    proj = basis->to(compute).contiguous();
  }
  const int64_t r = proj.defined() ? proj.size(1) : d;
  auto acc = at::zeros({r, r}, features.options().dtype(at::kDouble));
  if (n == 0 || d == 0 || r == 0) return acc;

  const at::Tensor x = features.stride(1) == 1 ? features : features.contiguous();
  const at::Tensor y = labels.contiguous();
  const at::Tensor mu = means.to(at::kDouble).contiguous();
  const int64_t elem = compute == at::kDouble ? 8 : 4;
  const int64_t chunk = std::min(n, std::max<int64_t>(256, kChunkBytes / (elem * d)));
  auto buffer = at::empty({chunk, d}, x.options().dtype(compute));
  auto product = at::empty({r, r}, x.options().dtype(compute));

  for (int64_t start = 0; start < n; start += chunk) {
    const int64_t rows = std::min(chunk, n - start);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "within_scatter_cpu", [&] {
      using scalar = scalar_t;
      AT_DISPATCH_INDEX_TYPES(y.scalar_type(), "within_scatter_cpu", [&] {
        const scalar* px = x.const_data_ptr<scalar>() + start * x.stride(0);
        const index_t* py = y.const_data_ptr<index_t>() + start;
        if (compute == at::kDouble)
          centre_rows(px, x.stride(0), py, mu.const_data_ptr<double>(), num_classes, rows, d,
                      buffer.data_ptr<double>());
        else
          centre_rows(px, x.stride(0), py, mu.const_data_ptr<double>(), num_classes, rows, d,
                      buffer.data_ptr<float>());
      });
    });
    at::Tensor centred = buffer.narrow(0, 0, rows);
    if (proj.defined()) centred = at::mm(centred, proj);
    at::mm_out(product, centred.t(), centred);
    acc.add_(product);
  }
  return acc;
}

}  // namespace

TORCH_LIBRARY_IMPL(collapse_ext, CPU, m) { m.impl("within_scatter", &within_scatter_cpu); }

}  // namespace collapse_ext
