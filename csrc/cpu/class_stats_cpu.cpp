// Per-batch class statistics on the CPU: counts, class means and per-class sums of
// squared deviations about those means, in two passes over the batch (sums, then
// centred squares). Everything is accumulated in float64, whatever the input dtype:
// the centred second pass is what keeps collapsed features exact, and float64 sums
// keep fp16 squares from overflowing.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../class_stats.h"

namespace collapse_ext {
namespace {

// Column blocks are the unit of parallel work: each thread owns whole columns of the
// (K, d) sums, so no thread-local (K, d) copies and no atomics are needed.
int64_t column_block(int64_t d) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  return std::max<int64_t>(64, (d + threads - 1) / threads);
}

// sum_j (row[j] - mean[j])^2 over [j0, j1) with independent partial sums, so the
// compiler can vectorise the reduction without -ffast-math reassociation.
template <typename scalar_t>
double squared_distance(const scalar_t* row, const double* mean, int64_t j0, int64_t j1) {
  constexpr int kLanes = 8;
  double lanes[kLanes] = {};
  int64_t j = j0;
  for (; j + kLanes <= j1; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const double diff = static_cast<double>(row[j + l]) - mean[j + l];
      lanes[l] += diff * diff;
    }
  }
  double s = 0.0;
  for (; j < j1; ++j) {
    const double diff = static_cast<double>(row[j]) - mean[j];
    s += diff * diff;
  }
  for (int l = 0; l < kLanes; ++l) s += lanes[l];
  return s;
}

template <typename scalar_t, typename label_t>
void class_stats_kernel(const scalar_t* x, int64_t row_stride, const label_t* y, int64_t n,
                        int64_t d, int64_t num_classes, int64_t* counts, double* means,
                        double* sqdev) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = static_cast<int64_t>(y[i]);
    if (k >= 0 && k < num_classes) ++counts[k];
  }
  const int64_t block = column_block(d);
  const int64_t num_blocks = (d + block - 1) / block;

  at::parallel_for(0, num_blocks, 1, [&](int64_t b0, int64_t b1) {
    const int64_t j0 = b0 * block, j1 = std::min(d, b1 * block);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t k = static_cast<int64_t>(y[i]);
      if (k < 0 || k >= num_classes) continue;
      const scalar_t* row = x + i * row_stride;
      double* sum = means + k * d;
      for (int64_t j = j0; j < j1; ++j) sum[j] += static_cast<double>(row[j]);
    }
    for (int64_t k = 0; k < num_classes; ++k) {
      if (counts[k] == 0) continue;
      const double count = static_cast<double>(counts[k]);
      double* mean = means + k * d;
      for (int64_t j = j0; j < j1; ++j) mean[j] /= count;
    }
  });

  std::vector<double> partial(num_blocks * num_classes, 0.0);
  at::parallel_for(0, num_blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t j0 = b * block, j1 = std::min(d, j0 + block);
      double* acc = partial.data() + b * num_classes;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t k = static_cast<int64_t>(y[i]);
        if (k < 0 || k >= num_classes) continue;
        const scalar_t* row = x + i * row_stride;
        const double* mean = means + k * d;
        acc[k] += squared_distance(row, mean, j0, j1);
      }
    }
  });
  for (int64_t b = 0; b < num_blocks; ++b)
    for (int64_t k = 0; k < num_classes; ++k) sqdev[k] += partial[b * num_classes + k];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> class_stats_cpu(const at::Tensor& features,
                                                               const at::Tensor& labels,
                                                               int64_t num_classes) {
  auto a = class_stats_args(features, labels, num_classes);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "class_stats_cpu", [&] {
    using scalar = scalar_t;
    AT_DISPATCH_INDEX_TYPES(a.y.scalar_type(), "class_stats_cpu", [&] {
      class_stats_kernel<scalar, index_t>(a.x.const_data_ptr<scalar>(), a.x.stride(0), a.y.const_data_ptr<index_t>(),
                                          a.n, a.d, num_classes, a.counts.data_ptr<int64_t>(),
                                          a.means.data_ptr<double>(), a.sqdev.data_ptr<double>());
    });
  });
  return {a.counts, a.means, a.sqdev};
}

}  // namespace

TORCH_LIBRARY_IMPL(collapse_ext, CPU, m) { m.impl("class_stats", &class_stats_cpu); }

}  // namespace collapse_ext
