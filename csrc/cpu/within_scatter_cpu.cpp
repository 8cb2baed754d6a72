// Pooled within-class scatter on the CPU: sum_i (h_i - m_{y_i})(h_i - m_{y_i})^T, or its
// projection B^T S B onto a basis B (d, r).
//
// Rows are centred a cache-sized chunk (8 MiB) at a time and the chunk's product goes
// through MKL. Measured at N=20000, d=512 fp32 (benchmarks/bench_class_stats.py): the
// GEMM is the floor and MKL runs it near peak, which a hand-fused centring-inside-the-
// product loop cannot match, while the chunk copy is two passes over data already in
// cache; so chunk + BLAS is the faster one, and no centred (N, d) copy is ever made.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "../common.h"
#include "../within_scatter.h"

namespace collapse_ext {
namespace {

constexpr int64_t kChunkBytes = 8 << 20;
constexpr int64_t kMinRows = 256;

template <typename scalar_t, typename label_t, typename compute_t>
void within_scatter_kernel(const scalar_t* x, int64_t row_stride, const label_t* y, const double* means,
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
      for (int64_t j = 0; j < d; ++j) dst[j] = static_cast<compute_t>(to_double(row[j]) - mean[j]);
    }
  });
}

void centre_chunk_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& mu, int64_t start,
                      int64_t rows, at::Tensor& buffer) {
  COLLAPSE_DISPATCH_FEATURES_LABELS(x.scalar_type(), y.scalar_type(), "within_scatter_cpu", [&] {
    within_scatter_kernel(x.const_data_ptr<scalar_t>() + start * x.stride(0), x.stride(0),
                          y.const_data_ptr<label_t>() + start, mu.const_data_ptr<double>(), mu.size(0), rows,
                          x.size(1), buffer.data_ptr<compute_type<scalar_t>>());
  });
}

at::Tensor within_scatter_cpu(const at::Tensor& features, const at::Tensor& labels, const at::Tensor& means,
                              const std::optional<at::Tensor>& basis) {
  return within_scatter_chunked(features, labels, means, basis, kChunkBytes, kMinRows, centre_chunk_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(collapse_ext, CPU, m) { m.impl("within_scatter", &within_scatter_cpu); }

}  // namespace collapse_ext
