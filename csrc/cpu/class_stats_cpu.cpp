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
#include "../common.h"

namespace collapse_ext {
namespace {

// Pass 1 gives each thread a contiguous range of rows and a float64 (K, d) partial of the
// sums when those partials are small (kPartialBytes), so every thread streams memory;
// otherwise each thread owns a block of columns of the sums and reads those columns of
// every row (no (K, d) copies). Measured at N=20000, d=512, K=10 on 2 cores: column
// blocks ran slower on 2 threads than on 1; row ranges scale.
constexpr int64_t kPartialBytes = 32 << 20;
constexpr int64_t kMinChunkRows = 1024;

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

// The number of row ranges of the passes over rows: one per thread, none shorter than
// kMinChunkRows.
int64_t row_chunks(int64_t n) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  return std::max<int64_t>(1, std::min(threads, n / kMinChunkRows));
}

// Pass 1: counts, and the sums of each class's rows divided by its count into means.
template <typename scalar_t, typename label_t>
void class_sums_kernel(const scalar_t* x, int64_t row_stride, const label_t* y, int64_t n, int64_t d,
                       int64_t num_classes, int64_t* counts, double* means) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = static_cast<int64_t>(y[i]);
    if (k >= 0 && k < num_classes) ++counts[k];
  }
  const int64_t chunks = row_chunks(n);
  const int64_t chunk_rows = (n + chunks - 1) / chunks;
  auto add_rows = [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1, double* sums) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t k = static_cast<int64_t>(y[i]);
      if (k < 0 || k >= num_classes) continue;
      const scalar_t* row = x + i * row_stride;
      double* sum = sums + k * d;
      for (int64_t j = j0; j < j1; ++j) sum[j] += static_cast<double>(row[j]);
    }
  };
  const int64_t kd = num_classes * d;
  if (chunks > 1 && chunks * kd * static_cast<int64_t>(sizeof(double)) <= kPartialBytes) {
    std::vector<double> partial((chunks - 1) * kd, 0.0);
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c)
        add_rows(c * chunk_rows, std::min(n, (c + 1) * chunk_rows), 0, d,
                 c == 0 ? means : partial.data() + (c - 1) * kd);
    });
    for (int64_t c = 1; c < chunks; ++c) {
      const double* p = partial.data() + (c - 1) * kd;
      for (int64_t e = 0; e < kd; ++e) means[e] += p[e];
    }
  } else {
    const int64_t block = column_block(d);
    at::parallel_for(0, (d + block - 1) / block, 1, [&](int64_t b0, int64_t b1) {
      add_rows(0, n, b0 * block, std::min(d, b1 * block), means);
    });
  }
  at::parallel_for(0, num_classes, 16, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      if (counts[k] == 0) continue;
      const double count = static_cast<double>(counts[k]);
      for (int64_t j = 0; j < d; ++j) means[k * d + j] /= count;
    }
  });
}

// Pass 2: row ranges again, each with its own (K,) sums of squared deviations about the
// means, folded in a fixed order.
template <typename scalar_t, typename label_t>
void class_sqdev_kernel(const scalar_t* x, int64_t row_stride, const label_t* y, int64_t n, int64_t d,
                        int64_t num_classes, const double* means, double* sqdev) {
  const int64_t chunks = row_chunks(n);
  const int64_t chunk_rows = (n + chunks - 1) / chunks;
  std::vector<double> partial(chunks * num_classes, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      std::vector<double> acc(num_classes, 0.0);
      for (int64_t i = c * chunk_rows, i1 = std::min(n, (c + 1) * chunk_rows); i < i1; ++i) {
        const int64_t k = static_cast<int64_t>(y[i]);
        if (k < 0 || k >= num_classes) continue;
        acc[k] += squared_distance(x + i * row_stride, means + k * d, 0, d);
      }
      std::copy(acc.begin(), acc.end(), partial.begin() + c * num_classes);
    }
  });
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t k = 0; k < num_classes; ++k) sqdev[k] += partial[c * num_classes + k];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> class_stats_cpu(const at::Tensor& features,
                                                               const at::Tensor& labels,
                                                               int64_t num_classes) {
  auto a = class_stats_args(features, labels, num_classes);
  COLLAPSE_DISPATCH_FEATURES_LABELS(a.x.scalar_type(), a.y.scalar_type(), "class_stats_cpu", [&] {
    const scalar_t* x = a.x.const_data_ptr<scalar_t>();
    const label_t* y = a.y.const_data_ptr<label_t>();
    class_sums_kernel(x, a.x.stride(0), y, a.n, a.d, num_classes, a.counts.data_ptr<int64_t>(),
                      a.means.data_ptr<double>());
    class_sqdev_kernel(x, a.x.stride(0), y, a.n, a.d, num_classes, a.means.const_data_ptr<double>(),
                       a.sqdev.data_ptr<double>());
  });
  return {a.counts, a.means, a.sqdev};
}

}  // namespace

TORCH_LIBRARY_IMPL(collapse_ext, CPU, m) { m.impl("class_stats", &class_stats_cpu); }

}  // namespace collapse_ext
