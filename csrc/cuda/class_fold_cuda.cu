// class_fold on CUDA (see csrc/class_fold.h for the contract): one block per class (a
// grid-stride loop over the classes), each folded class's means and sums rows read and
// written once, the two squared norms reduced over the block. No host synchronisation.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>

#include "../class_fold.h"
#include "../common.h"
#include "reduce.cuh"

namespace collapse_ext {
namespace {

constexpr int kThreads = 128;

template <typename state_t>
__global__ void fold_kernel(int64_t k, int64_t d, int64_t* __restrict__ counts, state_t* __restrict__ means,
                            int64_t* __restrict__ pending, state_t* __restrict__ sums, double* __restrict__ sqsums,
                            double* __restrict__ sqdev) {
  __shared__ double scratch[kThreads / kWarp];
  for (int64_t c = blockIdx.x; c < k; c += gridDim.x) {
    const int64_t rows = pending[c];
    if (rows <= 0) continue;  // the same for the whole block
    const double n = static_cast<double>(counts[c] + rows);
    state_t* mean = means + c * d;
    state_t* sum = sums + c * d;
    double t_sq = 0.0, r_sq = 0.0;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      const double t = static_cast<double>(sum[j]);
      const double m = static_cast<double>(mean[j]) + t / n;
      const state_t stored = static_cast<state_t>(m);
      const state_t residual = static_cast<state_t>(n * (m - static_cast<double>(stored)));
      t_sq += t * t;
      r_sq += static_cast<double>(residual) * static_cast<double>(residual);
      mean[j] = stored;
      sum[j] = residual;
    }
    t_sq = block_sum(t_sq, scratch);
    r_sq = block_sum(r_sq, scratch);
    if (threadIdx.x == 0) {
      sqdev[c] = fmax(0.0, sqdev[c] + sqsums[c] - t_sq / n);
      sqsums[c] = r_sq / n;
      counts[c] += rows;
      pending[c] = 0;
    }
    __syncthreads();  // pending[c] is read by every thread of the block before it changes
  }
}

void class_fold_cuda(at::Tensor& counts, at::Tensor& means, at::Tensor& pending, at::Tensor& sums,
                     at::Tensor& sqsums, at::Tensor& sqdev) {
  check_class_state(counts, means, pending, sums, sqsums, &sqdev);
  COLLAPSE_DEVICE_GUARD(means);
  const int64_t k = means.size(0), d = means.size(1);
  if (k == 0) return;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(k, 64 * sms));
  const auto stream = at::cuda::getCurrentCUDAStream();
  COLLAPSE_FLOAT_SWITCH(means.scalar_type(), state_t, [&] {
    fold_kernel<state_t><<<blocks, kThreads, 0, stream>>>(
        k, d, counts.data_ptr<int64_t>(), means.data_ptr<state_t>(), pending.data_ptr<int64_t>(),
        sums.data_ptr<state_t>(), sqsums.data_ptr<double>(), sqdev.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(collapse_ext, CUDA, m) { m.impl("class_fold", &class_fold_cuda); }

}  // namespace collapse_ext
