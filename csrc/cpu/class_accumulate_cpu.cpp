// class_accumulate on the CPU (see csrc/class_accumulate.h for the contract).
//
// Pass 0 (column blocks) sums the rows of the classes new in this batch, whose batch
// means become their shifts. Pass 1 (parallel over rows) centres each row in float64,
// writes it rounded to the compute dtype and its squared norm; nothing is modified until every row has passed
// the checks. Pass 2 centres the rows again (cheaper than keeping a float64 copy: measured
// at N = 20000, d = 512) and adds them into the (K, d) sums, each thread owning a block
// of columns so no two threads touch one element. One call replaces a dozen ATen ops
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
constexpr int64_t kMinParallelElements = 1 << 18;  // below this, waking a second thread costs more than it saves

template <typename scalar_t, typename label_t, typename state_t, typename compute_t>
void class_accumulate_kernel(const scalar_t* x, int64_t row_stride, const label_t* y, int64_t n, int64_t d,
                             int64_t num_classes, const int64_t* counts, state_t* means, int64_t* pending,
                             state_t* sums, double* sqsums, double limit, compute_t* centred, double* status) {
  // Shift of each row: its class's means row, or, for a class with no row yet, the mean
  // of that class's rows in this batch (float64 sums, rounded once to the state dtype, in
  // `fresh`): a single row would leave a rank-one spike of d times the within-class
  // variance in the float32 products, which costs digits until the next fold.
  std::vector<int64_t> slot(n, -1);  // row of `fresh` of the row's class, -1: means row
  std::unordered_map<int64_t, int64_t> slot_of;  // new class -> row of `fresh`
  int64_t bad_label = -1;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = static_cast<int64_t>(y[i]);
    if (k < 0 || k >= num_classes) {
      if (bad_label < 0) bad_label = i;
      continue;
    }
    if (counts[k] + pending[k] == 0)
      slot[i] = slot_of.emplace(k, static_cast<int64_t>(slot_of.size())).first->second;
  }
  const int64_t fresh_rows = static_cast<int64_t>(slot_of.size());
  std::vector<double> fresh_sum(fresh_rows * d, 0.0), fresh_count(fresh_rows, 0.0);
  for (int64_t i = 0; i < n; ++i)
    if (slot[i] >= 0) fresh_count[slot[i]] += 1.0;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t block =
      std::max<int64_t>(1, n * d >= kMinParallelElements ? std::max<int64_t>(16, (d + threads - 1) / threads) : d);
  // Column blocks, one per thread: no two threads touch one element of the sums.
  auto by_columns = [&](auto add_rows) {
    at::parallel_for(0, (d + block - 1) / block, 1, [&](int64_t b0, int64_t b1) {
      add_rows(b0 * block, std::min(d, b1 * block));
    });
  };
  if (fresh_rows > 0)
    by_columns([&](int64_t j0, int64_t j1) {
      for (int64_t i = 0; i < n; ++i) {
        if (slot[i] < 0) continue;
        double* sum = fresh_sum.data() + slot[i] * d;
        const scalar_t* row = x + i * row_stride;
        for (int64_t j = j0; j < j1; ++j) sum[j] += static_cast<double>(row[j]);
      }
    });
  std::vector<state_t> fresh(fresh_rows * d);
  for (int64_t r = 0; r < fresh_rows; ++r)
    for (int64_t j = 0; j < d; ++j) fresh[r * d + j] = static_cast<state_t>(fresh_sum[r * d + j] / fresh_count[r]);
  std::vector<const state_t*> shift(n, nullptr);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = static_cast<int64_t>(y[i]);
    if (k < 0 || k >= num_classes) continue;
    shift[i] = slot[i] < 0 ? means + k * d : fresh.data() + slot[i] * d;
  }

  std::vector<double> sq(n, 0.0);
  std::vector<char> finite(n, 1);
  const int64_t grain = std::max<int64_t>(kRowGrain, kMinParallelElements / std::max<int64_t>(d, 1));
  at::parallel_for(0, n, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      if (shift[i] == nullptr) continue;
      const scalar_t* row = x + i * row_stride;
      const state_t* c = shift[i];
      compute_t* out = centred + i * d;
      // Independent lanes so the reductions vectorise without reassociation flags;
      // probe is NaN iff some feature is NaN or Inf.
      constexpr int kLanes = 8;
      double s_lane[kLanes] = {}, p_lane[kLanes] = {};
      int64_t j = 0;
      for (; j + kLanes <= d; j += kLanes) {
        for (int l = 0; l < kLanes; ++l) {
          const double v = static_cast<double>(row[j + l]);
          const double e = v - static_cast<double>(c[j + l]);
          out[j + l] = static_cast<compute_t>(e);
          s_lane[l] += e * e;
          p_lane[l] += v * 0.0;
        }
      }
      double s = 0.0, probe = 0.0;
      for (; j < d; ++j) {
        const double v = static_cast<double>(row[j]);
        const double e = v - static_cast<double>(c[j]);
        out[j] = static_cast<compute_t>(e);
        s += e * e;
        probe += v * 0.0;
      }
      for (int l = 0; l < kLanes; ++l) {
        s += s_lane[l];
        probe += p_lane[l];
      }
      sq[i] = s;
      finite[i] = probe == 0.0;
    }
  });
  int64_t bad_row = -1;
  double peak = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    if (!finite[i]) {
      if (bad_row < 0) bad_row = i;
    } else {
      peak = std::max(peak, std::isnan(sq[i]) ? std::numeric_limits<double>::infinity() : sq[i]);
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

  // Pass 2: the centred rows into the sums, by column blocks again.
  by_columns([&](int64_t j0, int64_t j1) {
    for (int64_t i = 0; i < n; ++i) {
      const scalar_t* row = x + i * row_stride;
      const state_t* c = shift[i];
      state_t* sum = sums + static_cast<int64_t>(y[i]) * d;
      for (int64_t j = j0; j < j1; ++j)
        sum[j] += static_cast<state_t>(static_cast<double>(row[j]) - static_cast<double>(c[j]));
    }
  });
  for (const auto& [k, r] : slot_of) std::copy_n(fresh.data() + r * d, d, means + k * d);
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
