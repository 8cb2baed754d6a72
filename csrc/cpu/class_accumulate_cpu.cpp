// class_accumulate on the CPU (see csrc/class_accumulate.h for the contract).
//
// Pass 1 (parallel over rows) centres each row in float64, writes it rounded to the
// compute dtype and its squared norm; nothing is modified until every row has passed
// the checks. Pass 2 adds the rows into the (K, d) sums, each thread owning a block of
// columns so no two threads touch one element. One call replaces a dozen ATen ops
// (gathers, casts, index_add_) and reads the batch twice while it is in cache.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "../class_accumulate.h"

namespace collapse_ext {
namespace {

constexpr int64_t kRowGrain = 16;
constexpr int64_t kMinParallelElements = 1 << 16;

template <typename scalar_t, typename label_t, typename state_t, typename compute_t>
void class_accumulate_kernel(const scalar_t* x, int64_t row_stride, const label_t* y, int64_t n, int64_t d,
                             int64_t num_classes, const int64_t* counts, state_t* means, int64_t* pending,
                             state_t* sums, double* sqsums, double limit, compute_t* centred, double* status) {
  // Shift source per row: -1 = the class's means row, r >= 0 = row r of this batch (the
  // class's first row, for a class with no row yet).
  std::vector<int64_t> source(n, -1);
  std::unordered_map<int64_t, int64_t> first;
  int64_t bad_label = -1;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = static_cast<int64_t>(y[i]);
    if (k < 0 || k >= num_classes) {
      if (bad_label < 0) bad_label = i;
      continue;
    }
    if (counts[k] + pending[k] == 0) source[i] = first.emplace(k, i).first->second;
  }
  auto shift_of = [&](int64_t i, int64_t k, int64_t j) -> double {
    return source[i] < 0 ? static_cast<double>(means[k * d + j])
                         : static_cast<double>(static_cast<state_t>(x[source[i] * row_stride + j]));
  };

  std::vector<double> sq(n, 0.0);
  std::vector<char> finite(n, 1);
  const int64_t grain = std::max<int64_t>(kRowGrain, kMinParallelElements / std::max<int64_t>(d, 1));
  at::parallel_for(0, n, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t k = static_cast<int64_t>(y[i]);
      if (k < 0 || k >= num_classes) continue;
      const scalar_t* row = x + i * row_stride;
      compute_t* out = centred + i * d;
      double s = 0.0;
      bool ok = true;
      for (int64_t j = 0; j < d; ++j) {
        const double v = static_cast<double>(row[j]);
        ok &= std::isfinite(v);
        const double e = v - shift_of(i, k, j);
        out[j] = static_cast<compute_t>(e);
        s += e * e;
      }
      sq[i] = s;
      finite[i] = ok;
    }
  });
  int64_t bad_row = -1;
  double peak = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    if (!finite[i]) {
      if (bad_row < 0) bad_row = i;
    } else if (sq[i] > peak || std::isnan(sq[i])) {
      peak = sq[i];
    }
  }
  const bool accepted = bad_label < 0 && bad_row < 0 && peak <= limit;
  status[0] = accepted ? 1.0 : 0.0;
  status[1] = peak;
  status[2] = static_cast<double>(bad_label);
  status[3] = static_cast<double>(bad_row);
  if (!accepted) {
    std::fill(centred, centred + n * d, compute_t(0));
    return;
  }

  // Pass 2. Shifts come from the batch rows, so the new classes' means rows may be
  // written while other columns are still being summed.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t block =
      std::max<int64_t>(1, n * d >= kMinParallelElements ? std::max<int64_t>(16, (d + threads - 1) / threads) : d);
  at::parallel_for(0, (d + block - 1) / block, 1, [&](int64_t b0, int64_t b1) {
    const int64_t j0 = b0 * block, j1 = std::min(d, b1 * block);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t k = static_cast<int64_t>(y[i]);
      const scalar_t* row = x + i * row_stride;
      state_t* sum = sums + k * d;
      if (source[i] < 0) {
        const state_t* mean = means + k * d;
        for (int64_t j = j0; j < j1; ++j)
          sum[j] += static_cast<state_t>(static_cast<double>(row[j]) - static_cast<double>(mean[j]));
      } else {
        const scalar_t* origin = x + source[i] * row_stride;
        for (int64_t j = j0; j < j1; ++j)
          sum[j] += static_cast<state_t>(static_cast<double>(row[j]) -
                                         static_cast<double>(static_cast<state_t>(origin[j])));
      }
    }
  });
  for (const auto& [k, i] : first)
    for (int64_t j = 0; j < d; ++j) means[k * d + j] = static_cast<state_t>(x[i * row_stride + j]);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = static_cast<int64_t>(y[i]);
    pending[k] += 1;
    sqsums[k] += sq[i];
  }
}

std::tuple<at::Tensor, at::Tensor> class_accumulate_cpu(const at::Tensor& features, const at::Tensor& labels,
                                                        const at::Tensor& counts, at::Tensor& means,
                                                        at::Tensor& pending, at::Tensor& sums, at::Tensor& sqsums,
                                                        double limit) {
  auto a = class_accumulate_args(features, labels, counts, means, pending, sums, sqsums);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "class_accumulate_cpu", [&] {
    using scalar = scalar_t;
    AT_DISPATCH_INDEX_TYPES(a.y.scalar_type(), "class_accumulate_cpu", [&] {
      using label = index_t;
      AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "class_accumulate_cpu", [&] {
        using state = scalar_t;
        auto run = [&](auto* centred) {
          class_accumulate_kernel(a.x.const_data_ptr<scalar>(), a.x.stride(0), a.y.const_data_ptr<label>(), a.n, a.d,
                                  a.num_classes, counts.const_data_ptr<int64_t>(), means.data_ptr<state>(),
                                  pending.data_ptr<int64_t>(), sums.data_ptr<state>(), sqsums.data_ptr<double>(),
                                  limit, centred, a.status.data_ptr<double>());
        };
        if (a.centred.scalar_type() == at::kDouble)
          run(a.centred.data_ptr<double>());
        else
          run(a.centred.data_ptr<float>());
      });
    });
  });
  return {a.centred, a.status};
}

}  // namespace

TORCH_LIBRARY_IMPL(collapse_ext, CPU, m) { m.impl("class_accumulate", &class_accumulate_cpu); }

}  // namespace collapse_ext
