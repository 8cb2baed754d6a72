// class_accumulate on CUDA (see csrc/class_accumulate.h for the contract).
//
// Four kernels on the current stream, no host synchronisation:
//   1. first_rows_kernel: marks each class with no row yet (atomicMin of its first row
//      into a (K,) scratch) and the first row with a bad label; a cumulative sum then
//      numbers those new classes (slots, at most N of them);
//   2. fresh_sums_kernel: float64 sums of the new classes' rows per slot, whose means
//      (rounded to the state dtype) are the new classes' shifts;
//   3. centre_kernel: a block per row centres it in float64, writes it in the compute
//      dtype, its squared norm, the first non-finite row and the largest squared norm
//      (atomicMax on the bits of a non-negative double);
//   4. accumulate_kernel: if the batch passed (read on the device), adds each row into
//      the (K, d) sums with atomics and writes the new classes' means rows, else zeroes
//      `centred` (without return_centred nothing is written to `centred`, (0, d)).
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <math_constants.h>
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../class_accumulate.h"
#include "../common.h"
#include "reduce.cuh"

namespace collapse_ext {
namespace {

constexpr int kThreads = 128;
using ull = unsigned long long;

template <typename label_t>
__global__ void first_rows_kernel(const label_t* __restrict__ y, int64_t n, int64_t num_classes,
                                  const int64_t* __restrict__ counts, const int64_t* __restrict__ pending,
                                  int64_t* __restrict__ first, int64_t* __restrict__ flags) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t k = static_cast<int64_t>(y[i]);
    if (k < 0 || k >= num_classes)
      atomicMin(reinterpret_cast<ull*>(flags), static_cast<ull>(i));
    else if (counts[k] + pending[k] == 0)
      atomicMin(reinterpret_cast<ull*>(first + k), static_cast<ull>(i));
  }
}

template <typename scalar_t, typename label_t>
__global__ void fresh_sums_kernel(const scalar_t* __restrict__ x, int64_t row_stride, const label_t* __restrict__ y,
                                  int64_t n, int64_t d, int64_t num_classes, const int64_t* __restrict__ first,
                                  const int64_t* __restrict__ slot, double* __restrict__ fresh_sum,
                                  double* __restrict__ fresh_count) {
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const int64_t k = static_cast<int64_t>(y[i]);
    if (k < 0 || k >= num_classes || first[k] >= n) continue;  // uniform over the block
    const int64_t s = slot[k];
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) atomicAdd(fresh_sum + s * d + j, to_double(x[i * row_stride + j]));
    if (threadIdx.x == 0) atomicAdd(fresh_count + s, 1.0);
  }
}

// The shift row of class k: its means row, or the new class's batch mean.
template <typename state_t>
__device__ __forceinline__ const state_t* shift_row(int64_t k, int64_t n, int64_t d, const int64_t* first,
                                                    const int64_t* slot, const state_t* means, const state_t* fresh) {
  return first[k] < n ? fresh + slot[k] * d : means + k * d;
}

template <typename scalar_t, typename label_t, typename state_t, typename compute_t>
__global__ void centre_kernel(const scalar_t* __restrict__ x, int64_t row_stride, const label_t* __restrict__ y,
                              int64_t n, int64_t d, int64_t num_classes, const int64_t* __restrict__ first,
                              const int64_t* __restrict__ slot, const state_t* __restrict__ means,
                              const state_t* __restrict__ fresh, compute_t* __restrict__ centred,
                              double* __restrict__ sq, int64_t* __restrict__ flags) {
  __shared__ double scratch[kThreads / kWarp];
  __shared__ int bad[kThreads / kWarp];
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const int64_t k = static_cast<int64_t>(y[i]);
    if (k < 0 || k >= num_classes) continue;  // uniform over the block
    const scalar_t* row = x + i * row_stride;
    const state_t* c = shift_row(k, n, d, first, slot, means, fresh);
    double s = 0.0;
    int nonfinite = 0;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      const double v = to_double(row[j]);
      nonfinite |= !isfinite(v);
      const double e = v - static_cast<double>(c[j]);
      if (centred != nullptr) centred[i * d + j] = static_cast<compute_t>(e);
      s += e * e;
    }
    s = block_sum(s, scratch);
    nonfinite = block_sum(nonfinite, bad);
    if (threadIdx.x == 0) {
      sq[i] = s;
      if (nonfinite) {
        atomicMin(reinterpret_cast<ull*>(flags + 1), static_cast<ull>(i));
      } else {
        const double peak = isnan(s) ? CUDART_INF : s;
        atomicMax(reinterpret_cast<ull*>(flags + 2), static_cast<ull>(__double_as_longlong(peak)));
      }
    }
  }
}

template <typename scalar_t, typename label_t, typename state_t, typename compute_t>
__global__ void accumulate_kernel(const scalar_t* __restrict__ x, int64_t row_stride, const label_t* __restrict__ y,
                                  int64_t n, int64_t d, const int64_t* __restrict__ first,
                                  const int64_t* __restrict__ slot, const state_t* __restrict__ fresh,
                                  const double* __restrict__ sq, const int64_t* __restrict__ flags, double limit,
                                  state_t* __restrict__ means, int64_t* __restrict__ pending,
                                  state_t* __restrict__ sums, double* __restrict__ sqsums,
                                  compute_t* __restrict__ centred) {
  const bool accepted =
      flags[0] == n && flags[1] == n && __longlong_as_double(static_cast<long long>(flags[2])) <= limit;
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    if (!accepted) {
      if (centred != nullptr)
        for (int64_t j = threadIdx.x; j < d; j += blockDim.x) centred[i * d + j] = compute_t(0);
      continue;
    }
    const int64_t k = static_cast<int64_t>(y[i]);
    const scalar_t* row = x + i * row_stride;
    // New classes read their shift from `fresh`, never from `means`, so the class's first
    // row may write its means row while other rows are being added.
    const state_t* c = shift_row(k, n, d, first, slot, static_cast<const state_t*>(means), fresh);
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x)
      atomicAdd(sums + k * d + j, static_cast<state_t>(to_double(row[j]) - static_cast<double>(c[j])));
    if (first[k] == i)
      for (int64_t j = threadIdx.x; j < d; j += blockDim.x) means[k * d + j] = c[j];
    if (threadIdx.x == 0) {
      atomicAdd(sqsums + k, sq[i]);
      atomicAdd(reinterpret_cast<ull*>(pending + k), 1ull);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> class_accumulate_cuda(const at::Tensor& features, const at::Tensor& labels,
                                                         const at::Tensor& counts, at::Tensor& means,
                                                         at::Tensor& pending, at::Tensor& sums, at::Tensor& sqsums,
                                                         double limit, bool return_centred) {
  COLLAPSE_DEVICE_GUARD(features);
  auto a = class_accumulate_args(features, labels, counts, means, pending, sums, sqsums, return_centred);
  const int64_t n = a.n, d = a.d, k = a.num_classes;
  auto opts = a.x.options().dtype(at::kLong);
  auto flags = at::full({3}, n, opts);
  flags.narrow(0, 2, 1).zero_();
  if (n > 0) {
    auto first = at::full({k}, n, opts);
    auto sq = at::empty({n}, a.x.options().dtype(at::kDouble));
    const auto stream = at::cuda::getCurrentCUDAStream();
    const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const int64_t row_blocks = std::max<int64_t>(1, std::min<int64_t>(n, 32 * sms));
    const int64_t label_blocks = std::max<int64_t>(1, std::min<int64_t>((n + 255) / 256, 8 * sms));
    const int64_t fresh_rows = std::min(n, k);  // at most one per row or class
    auto fresh_sum = at::zeros({fresh_rows, d}, a.x.options().dtype(at::kDouble));
    auto fresh_count = at::zeros({fresh_rows}, a.x.options().dtype(at::kDouble));
    COLLAPSE_DISPATCH_FEATURES_LABELS(a.x.scalar_type(), a.y.scalar_type(), "class_accumulate_cuda", [&] {
      const scalar_t* x = a.x.const_data_ptr<scalar_t>();
      const label_t* y = a.y.const_data_ptr<label_t>();
      first_rows_kernel<label_t><<<label_blocks, 256, 0, stream>>>(y, n, k, counts.const_data_ptr<int64_t>(),
                                                                   pending.const_data_ptr<int64_t>(),
                                                                   first.data_ptr<int64_t>(), flags.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const auto slot = (first < n).to(at::kLong).cumsum(0).sub_(1).contiguous();
      fresh_sums_kernel<scalar_t, label_t><<<row_blocks, kThreads, 0, stream>>>(
          x, a.x.stride(0), y, n, d, k, first.const_data_ptr<int64_t>(), slot.const_data_ptr<int64_t>(),
          fresh_sum.data_ptr<double>(), fresh_count.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const auto fresh = fresh_sum.div(fresh_count.clamp_min(1.0).unsqueeze(1)).to(means.scalar_type()).contiguous();
      COLLAPSE_FLOAT_SWITCH(means.scalar_type(), state_t, [&] {
        compute_type<scalar_t>* centred =
            return_centred ? a.centred.data_ptr<compute_type<scalar_t>>() : nullptr;
        centre_kernel<<<row_blocks, kThreads, 0, stream>>>(
            x, a.x.stride(0), y, n, d, k, first.const_data_ptr<int64_t>(), slot.const_data_ptr<int64_t>(),
            means.const_data_ptr<state_t>(), fresh.const_data_ptr<state_t>(), centred, sq.data_ptr<double>(),
            flags.data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        accumulate_kernel<<<row_blocks, kThreads, 0, stream>>>(
            x, a.x.stride(0), y, n, d, first.const_data_ptr<int64_t>(), slot.const_data_ptr<int64_t>(),
            fresh.const_data_ptr<state_t>(), sq.const_data_ptr<double>(), flags.const_data_ptr<int64_t>(), limit,
            means.data_ptr<state_t>(), pending.data_ptr<int64_t>(), sums.data_ptr<state_t>(),
            sqsums.data_ptr<double>(), centred);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  // status = [accepted, peak, first bad label row or -1, first non-finite row or -1], on the device.
  const auto peak = flags.narrow(0, 2, 1).view(at::kDouble);
  const auto bad = flags.narrow(0, 0, 2);
  const auto accepted = (bad == n).all().unsqueeze(0).logical_and(peak <= limit).to(at::kDouble);
  const auto rows = at::where(bad == n, at::full_like(bad, -1), bad).to(at::kDouble);
  a.status.copy_(at::cat({accepted, peak, rows}));
  return {a.centred, a.status};
}

}  // namespace

TORCH_LIBRARY_IMPL(collapse_ext, CUDA, m) { m.impl("class_accumulate", &class_accumulate_cuda); }

}  // namespace collapse_ext
