// class_accumulate on the CPU (see csrc/class_accumulate.h for the contract), in the
// steps of the CUDA backend, with the same names:
//   1. first_rows_kernel: the first row with a bad label, and a slot for each class with
//      no row yet (the row of `fresh` holding its shift);
//   2. fresh_sums_kernel (column blocks): float64 sums of the new classes' rows, whose
//      means, rounded to the state dtype, become their shifts;
//   3. centre_kernel (parallel over rows): each row centred in float64, written rounded
//      to the compute dtype, its squared norm and whether it is finite; nothing is
//      modified until every row has passed the checks;
//   4. accumulate_kernel: if the batch passed, the rows centred again (cheaper than
//      keeping a float64 copy: measured at N = 20000, d = 512) into the (K, d) sums, each
//      thread owning a block of columns so no two threads touch one element, and the new
//      classes' means rows; else `centred` zeroed.
// When the batch holds few classes for its size (always for a small, serial batch) it is
// centred once: step 3 also sums its rows per class into a float64 scratch of (classes in
// the batch, d) per thread, and step 4 adds those sums instead of centring again. That
// took the op's time in the B = 128 loop of benchmarks/bench_class_stats.py down by about
// a third.
// One call replaces a dozen ATen ops (gathers, casts, index_add_) and reads the batch
// at most twice while it is in cache.
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
#include "../common.h"

namespace collapse_ext {
namespace {

constexpr int64_t kRowGrain = 16;
constexpr int64_t kMinParallelElements = 1 << 18;  // below this, waking a second thread costs more than it saves

// Column blocks, one per thread: no two threads touch one element of a (K, d) sum.
// add_columns(j0, j1) handles columns [j0, j1) of every row.
template <typename F>
void by_columns(int64_t n, int64_t d, F add_columns) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t block =
      std::max<int64_t>(1, n * d >= kMinParallelElements ? std::max<int64_t>(16, (d + threads - 1) / threads) : d);
  at::parallel_for(0, (d + block - 1) / block, 1, [&](int64_t b0, int64_t b1) {
    add_columns(b0 * block, std::min(d, b1 * block));
  });
}

// Step 1. slot[i]: the row of `fresh` of row i's class when that class has no row yet
// (counts_k + pending_k == 0), -1 otherwise; fresh_class[s]: the class of slot s.
// Returns the first row with a label outside [0, K), -1 when there is none.
template <typename label_t>
int64_t first_rows_kernel(const label_t* y, int64_t n, int64_t num_classes, const int64_t* counts,
                          const int64_t* pending, std::vector<int64_t>& slot, std::vector<int64_t>& fresh_class) {
  std::unordered_map<int64_t, int64_t> slot_of;
  int64_t bad_label = -1;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = static_cast<int64_t>(y[i]);
    if (k < 0 || k >= num_classes) {
      if (bad_label < 0) bad_label = i;
      continue;
    }
    if (counts[k] + pending[k] != 0) continue;
    const auto [it, added] = slot_of.emplace(k, static_cast<int64_t>(fresh_class.size()));
    if (added) fresh_class.push_back(k);
    slot[i] = it->second;
  }
  return bad_label;
}

// Step 2. The shift of each new class: the mean of its rows in this batch (float64 sums,
// rounded once to the state dtype). A single row would leave a rank-one spike of d times
// the within-class variance in the float32 products, which costs digits until the next fold.
template <typename scalar_t, typename state_t>
std::vector<state_t> fresh_sums_kernel(const scalar_t* x, int64_t row_stride, int64_t n, int64_t d,
                                       const std::vector<int64_t>& slot, int64_t fresh_rows) {
  std::vector<double> fresh_sum(fresh_rows * d, 0.0), fresh_count(fresh_rows, 0.0);
  for (int64_t i = 0; i < n; ++i)
    if (slot[i] >= 0) fresh_count[slot[i]] += 1.0;
  if (fresh_rows > 0)
    by_columns(n, d, [&](int64_t j0, int64_t j1) {
      for (int64_t i = 0; i < n; ++i) {
        if (slot[i] < 0) continue;
        double* sum = fresh_sum.data() + slot[i] * d;
        const scalar_t* row = x + i * row_stride;
        for (int64_t j = j0; j < j1; ++j) sum[j] += to_double(row[j]);
      }
    });
  std::vector<state_t> fresh(fresh_rows * d);
  for (int64_t r = 0; r < fresh_rows; ++r)
    for (int64_t j = 0; j < d; ++j) fresh[r * d + j] = static_cast<state_t>(fresh_sum[r * d + j] / fresh_count[r]);
  return fresh;
}

// Step 3. Rows whose shift is null (bad labels) are skipped. finite[i]: no NaN/Inf feature.
// With kLocal, e_i is also added to row local_slot[i] of this thread's block of `local`
// (blocks of local_rows x d; one block when `copies` is 1).
template <bool kLocal, typename scalar_t, typename state_t, typename compute_t>
void centre_kernel(const scalar_t* x, int64_t row_stride, int64_t n, int64_t d, const std::vector<const state_t*>& shift,
                   compute_t* centred, std::vector<double>& sq, std::vector<char>& finite, double* local,
                   const std::vector<int64_t>& local_slot, int64_t local_rows, int64_t copies) {
  const int64_t grain = std::max<int64_t>(kRowGrain, kMinParallelElements / std::max<int64_t>(d, 1));
  at::parallel_for(0, n, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      if (shift[i] == nullptr) continue;
      const scalar_t* row = x + i * row_stride;
      const state_t* c = shift[i];
      compute_t* out = centred + i * d;
      double* acc = nullptr;
      if constexpr (kLocal) {
        const int64_t copy = copies > 1 ? static_cast<int64_t>(at::get_thread_num()) : 0;
        acc = local + (copy * local_rows + local_slot[i]) * d;
      }
      // Independent lanes so the reductions vectorise without reassociation flags;
      // probe is NaN iff some feature is NaN or Inf.
      constexpr int kLanes = 8;
      double s_lane[kLanes] = {}, p_lane[kLanes] = {};
      int64_t j = 0;
      for (; j + kLanes <= d; j += kLanes) {
        for (int l = 0; l < kLanes; ++l) {
          const double v = to_double(row[j + l]);
          const double e = v - static_cast<double>(c[j + l]);
          out[j + l] = static_cast<compute_t>(e);
          s_lane[l] += e * e;
          p_lane[l] += v * 0.0;
          if constexpr (kLocal) acc[j + l] += e;
        }
      }
      double s = 0.0, probe = 0.0;
      for (; j < d; ++j) {
        const double v = to_double(row[j]);
        const double e = v - static_cast<double>(c[j]);
        out[j] = static_cast<compute_t>(e);
        s += e * e;
        probe += v * 0.0;
        if constexpr (kLocal) acc[j] += e;
      }
      for (int l = 0; l < kLanes; ++l) {
        s += s_lane[l];
        probe += p_lane[l];
      }
      sq[i] = s;
      finite[i] = probe == 0.0;
    }
  });
}

// Step 4, for an accepted batch: every row has a shift. With `local` (the per-class sums
// of step 3, classes local_class), those are added instead of centring the rows again.
template <typename scalar_t, typename label_t, typename state_t>
void accumulate_kernel(const scalar_t* x, int64_t row_stride, const label_t* y, int64_t n, int64_t d,
                       const std::vector<const state_t*>& shift, const std::vector<double>& sq,
                       const std::vector<state_t>& fresh, const std::vector<int64_t>& fresh_class, state_t* means,
                       int64_t* pending, state_t* sums, double* sqsums, const double* local,
                       const std::vector<int64_t>& local_class, int64_t copies) {
  if (local != nullptr) {
    const int64_t rows = static_cast<int64_t>(local_class.size());
    for (int64_t r = 0; r < rows; ++r) {
      state_t* sum = sums + local_class[r] * d;
      for (int64_t j = 0; j < d; ++j) {
        double add = 0.0;
        for (int64_t c = 0; c < copies; ++c) add += local[(c * rows + r) * d + j];
        sum[j] += static_cast<state_t>(add);
      }
    }
  } else {
    by_columns(n, d, [&](int64_t j0, int64_t j1) {
      for (int64_t i = 0; i < n; ++i) {
        const scalar_t* row = x + i * row_stride;
        const state_t* c = shift[i];
        state_t* sum = sums + static_cast<int64_t>(y[i]) * d;
        for (int64_t j = j0; j < j1; ++j)
          sum[j] += static_cast<state_t>(to_double(row[j]) - static_cast<double>(c[j]));
      }
    });
  }
  for (size_t r = 0; r < fresh_class.size(); ++r) std::copy_n(fresh.data() + r * d, d, means + fresh_class[r] * d);
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
  const int64_t n = a.n, d = a.d, k = a.num_classes;
  COLLAPSE_DISPATCH_FEATURES_LABELS(a.x.scalar_type(), a.y.scalar_type(), "class_accumulate_cpu", [&] {
    const scalar_t* x = a.x.const_data_ptr<scalar_t>();
    const label_t* y = a.y.const_data_ptr<label_t>();
    compute_type<scalar_t>* centred = a.centred.data_ptr<compute_type<scalar_t>>();
    COLLAPSE_FLOAT_SWITCH(means.scalar_type(), state_t, [&] {
      std::vector<int64_t> slot(n, -1), fresh_class;
      const int64_t bad_label = first_rows_kernel(y, n, k, counts.const_data_ptr<int64_t>(),
                                                  pending.const_data_ptr<int64_t>(), slot, fresh_class);
      const auto fresh =
          fresh_sums_kernel<scalar_t, state_t>(x, a.x.stride(0), n, d, slot, static_cast<int64_t>(fresh_class.size()));
      // The shift of each row: its class's means row, or the new class's batch mean.
      std::vector<const state_t*> shift(n, nullptr);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t label = static_cast<int64_t>(y[i]);
        if (label < 0 || label >= k) continue;
        shift[i] = slot[i] < 0 ? means.const_data_ptr<state_t>() + label * d : fresh.data() + slot[i] * d;
      }
      std::vector<double> sq(n, 0.0);
      std::vector<char> finite(n, 1);
      // The classes of the batch, each with a row of the per-thread scratch sums.
      std::vector<int64_t> local_slot(n, 0), local_class;
      {
        std::unordered_map<int64_t, int64_t> slot_of;
        for (int64_t i = 0; i < n; ++i) {
          if (shift[i] == nullptr) continue;
          const auto [it, added] = slot_of.emplace(static_cast<int64_t>(y[i]), static_cast<int64_t>(local_class.size()));
          if (added) local_class.push_back(it->first);
          local_slot[i] = it->second;
        }
      }
      // A serial batch (centre_kernel then runs on one thread) always sums while it
      // centres; a parallel one when the per-thread scratch is at most half the batch.
      const bool serial = n * d < kMinParallelElements || at::in_parallel_region();
      const int64_t copies = serial ? 1 : std::max<int64_t>(1, at::get_num_threads());
      const int64_t local_rows = static_cast<int64_t>(local_class.size());
      std::vector<double> local;
      if (serial || 2 * copies * local_rows <= n) {
        local.assign(copies * local_rows * d, 0.0);
        centre_kernel<true>(x, a.x.stride(0), n, d, shift, centred, sq, finite, local.data(), local_slot, local_rows,
                            copies);
      } else {
        centre_kernel<false>(x, a.x.stride(0), n, d, shift, centred, sq, finite, nullptr, local_slot, local_rows,
                             copies);
      }

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
      double* status = a.status.data_ptr<double>();
      status[0] = accepted ? 1.0 : 0.0;
      status[1] = peak;
      status[2] = static_cast<double>(bad_label);
      status[3] = static_cast<double>(bad_row);
      if (accepted)
        accumulate_kernel(x, a.x.stride(0), y, n, d, shift, sq, fresh, fresh_class, means.data_ptr<state_t>(),
                          pending.data_ptr<int64_t>(), sums.data_ptr<state_t>(), sqsums.data_ptr<double>(),
                          local.empty() ? nullptr : local.data(), local_class, copies);
      else
        std::fill(centred, centred + n * d, compute_type<scalar_t>(0));
    });
  });
  return {a.centred, a.status};
}

}  // namespace

TORCH_LIBRARY_IMPL(collapse_ext, CPU, m) { m.impl("class_accumulate", &class_accumulate_cpu); }

}  // namespace collapse_ext
