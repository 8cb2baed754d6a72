// class_fold on the CPU (see csrc/class_fold.h for the contract): runs of classes go to
// the threads; each folded class's means and sums rows are read and written once.
#include <ATen/Parallel.h>
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>

#include "../class_fold.h"
#include "../common.h"

namespace collapse_ext {
namespace {

constexpr int64_t kMinParallelElements = 1 << 18;

// One element: the exact mean m about the shift, its rounding stored, the residual kept;
// adds t^2 and the stored residual's square to t_sq and r_sq.
template <typename state_t>
inline void fold_element(double n, state_t& mean, state_t& sum, double& t_sq, double& r_sq) {
  const double t = static_cast<double>(sum);
  const double m = static_cast<double>(mean) + t / n;
  const state_t stored = static_cast<state_t>(m);
  const state_t residual = static_cast<state_t>(n * (m - static_cast<double>(stored)));
  t_sq += t * t;
  r_sq += static_cast<double>(residual) * static_cast<double>(residual);
  mean = stored;
  sum = residual;
}

template <typename state_t>
void fold_class(int64_t d, int64_t& count, state_t* __restrict__ mean, int64_t& pending, state_t* __restrict__ sum,
                double& sqsum, double& sqdev) {
  const double n = static_cast<double>(count + pending);
  // Four partial sums each, so the loop is not one chain of dependent additions.
  double t_sq[4] = {}, r_sq[4] = {};
  const int64_t body = d - d % 4;
  for (int64_t j = 0; j < body; j += 4)
    for (int l = 0; l < 4; ++l) fold_element(n, mean[j + l], sum[j + l], t_sq[l], r_sq[l]);
  for (int64_t j = body; j < d; ++j) fold_element(n, mean[j], sum[j], t_sq[0], r_sq[0]);
  sqdev = std::max(0.0, sqdev + sqsum - ((t_sq[0] + t_sq[1]) + (t_sq[2] + t_sq[3])) / n);
  sqsum = ((r_sq[0] + r_sq[1]) + (r_sq[2] + r_sq[3])) / n;
  count += pending;
  pending = 0;
}

void class_fold_cpu(at::Tensor& counts, at::Tensor& means, at::Tensor& pending, at::Tensor& sums, at::Tensor& sqsums,
                    at::Tensor& sqdev) {
  check_class_state(counts, means, pending, sums, sqsums, &sqdev);
  const int64_t k = means.size(0), d = means.size(1);
  int64_t* n = counts.data_ptr<int64_t>();
  int64_t* m = pending.data_ptr<int64_t>();
  double* q = sqsums.data_ptr<double>();
  double* ss = sqdev.data_ptr<double>();
  COLLAPSE_FLOAT_SWITCH(means.scalar_type(), state_t, [&] {
    state_t* mu = means.data_ptr<state_t>();
    state_t* t = sums.data_ptr<state_t>();
    const int64_t grain = std::max<int64_t>(1, kMinParallelElements / std::max<int64_t>(d, 1));
    at::parallel_for(0, k, grain, [&](int64_t k0, int64_t k1) {
      for (int64_t c = k0; c < k1; ++c)
        if (m[c] > 0) fold_class(d, n[c], mu + c * d, m[c], t + c * d, q[c], ss[c]);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(collapse_ext, CPU, m) { m.impl("class_fold", &class_fold_cpu); }

}  // namespace collapse_ext
