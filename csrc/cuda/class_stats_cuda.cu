// Per-batch class statistics on CUDA: counts, class means and per-class sums of squared
// deviations about those means, in two passes over the batch, accumulated in float64
// (see csrc/cpu/class_stats_cpu.cpp for why).
//
// Pass 1, class_sums_kernel: a block owns 32 columns x a range of rows and adds them into
// the (K, d) sums; the blocks of the first column tile also count the rows per class.
// When the block's (K, 32) partial sums fit in shared memory it keeps them there and
// flushes each with one global atomic; otherwise it adds straight into global memory
// (the same atomics index_add_ issues). The sums are then divided by the counts on the
// stream. Pass 2, class_sqdev_kernel: one warp per row, coalesced over d, a warp
// reduction, then one atomic per row into a per-block (K,) shared array when K doubles
// fit, else straight into the global (K,) sums.
// Labels outside [0, K) are skipped, not checked: callers validate them (the class_stats
// wrapper in collapse_ext/_ops.py says so), as on the CPU.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../class_stats.h"
#include "../common.h"
#include "reduce.cuh"

namespace collapse_ext {
namespace {

constexpr int kTileCols = 32;
constexpr int kRowLanes = 8;
constexpr int64_t kSharedBytes = 48 * 1024;

template <typename scalar_t, typename label_t, bool kShared>
__global__ void class_sums_kernel(const scalar_t* __restrict__ x, int64_t row_stride,
                                  const label_t* __restrict__ y, int64_t n, int64_t d,
                                  int64_t num_classes, int64_t rows_per_block,
                                  double* __restrict__ sums, int64_t* __restrict__ counts) {
  extern __shared__ double shared_sums[];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * kTileCols + tx;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kTileCols + tx;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t r1 = min(n, r0 + rows_per_block);
  if (kShared) {
    for (int64_t s = tid; s < num_classes * kTileCols; s += kTileCols * kRowLanes) shared_sums[s] = 0.0;
    __syncthreads();
  }
  for (int64_t i = r0 + ty; i < r1; i += kRowLanes) {
    const int64_t k = static_cast<int64_t>(y[i]);
    if (k < 0 || k >= num_classes) continue;
    if (blockIdx.x == 0 && tx == 0) atomicAdd(reinterpret_cast<unsigned long long*>(counts + k), 1ull);
    if (col >= d) continue;
    const double v = to_double(x[i * row_stride + col]);
    if (kShared)
      atomicAdd(shared_sums + k * kTileCols + tx, v);
    else
      atomicAdd(sums + k * d + col, v);
  }
  if (kShared) {
    __syncthreads();
    for (int64_t s = tid; s < num_classes * kTileCols; s += kTileCols * kRowLanes) {
      const int64_t k = s / kTileCols, c = blockIdx.x * kTileCols + s % kTileCols;
      const double v = shared_sums[s];
      if (c < d && v != 0.0) atomicAdd(sums + k * d + c, v);
    }
  }
}

template <typename scalar_t, typename label_t, bool kShared>
__global__ void class_sqdev_kernel(const scalar_t* __restrict__ x, int64_t row_stride,
                                   const label_t* __restrict__ y, int64_t n, int64_t d,
                                   int64_t num_classes, const double* __restrict__ means,
                                   double* __restrict__ sqdev) {
  extern __shared__ double shared_sqdev[];
  if (kShared) {
    for (int64_t s = threadIdx.x; s < num_classes; s += blockDim.x) shared_sqdev[s] = 0.0;
    __syncthreads();
  }
  const int lane = threadIdx.x % kWarp;
  const int64_t warps_per_block = blockDim.x / kWarp;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * warps_per_block + threadIdx.x / kWarp;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * warps_per_block;
  for (int64_t i = first; i < n; i += stride) {
    const int64_t k = static_cast<int64_t>(y[i]);
    if (k < 0 || k >= num_classes) continue;
    const scalar_t* row = x + i * row_stride;
    const double* mean = means + k * d;
    double s = 0.0;
    for (int64_t j = lane; j < d; j += kWarp) {
      const double diff = to_double(row[j]) - mean[j];
      s += diff * diff;
    }
    s = warp_sum(s);
    if (lane == 0) atomicAdd(kShared ? shared_sqdev + k : sqdev + k, s);
  }
  if (kShared) {
    __syncthreads();
    for (int64_t s = threadIdx.x; s < num_classes; s += blockDim.x)
      if (shared_sqdev[s] != 0.0) atomicAdd(sqdev + s, shared_sqdev[s]);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> class_stats_cuda(const at::Tensor& features,
                                                                const at::Tensor& labels,
                                                                int64_t num_classes) {
  COLLAPSE_DEVICE_GUARD(features);
  auto a = class_stats_args(features, labels, num_classes);
  const int64_t n = a.n, d = a.d;
  if (n == 0) return {a.counts, a.means, a.sqdev};

  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t col_tiles = std::max<int64_t>(1, (d + kTileCols - 1) / kTileCols);
  const int64_t row_blocks = std::max<int64_t>(1, std::min<int64_t>((n + 255) / 256, (4 * sms + col_tiles - 1) / col_tiles));
  const int64_t rows_per_block = (n + row_blocks - 1) / row_blocks;
  const dim3 sum_grid(col_tiles, row_blocks), sum_block(kTileCols, kRowLanes);
  const int64_t sum_shared = num_classes * kTileCols * sizeof(double);
  constexpr int kSqThreads = 256;
  const int64_t sq_blocks = std::max<int64_t>(1, std::min<int64_t>((n + 7) / 8, 8 * sms));
  const int64_t sq_shared = num_classes * sizeof(double);

  COLLAPSE_DISPATCH_FEATURES_LABELS(a.x.scalar_type(), a.y.scalar_type(), "class_stats_cuda", [&] {
    const scalar_t* x = a.x.const_data_ptr<scalar_t>();
    const label_t* y = a.y.const_data_ptr<label_t>();
    COLLAPSE_BOOL_SWITCH(sum_shared <= kSharedBytes, kShared, [&] {
      class_sums_kernel<scalar_t, label_t, kShared><<<sum_grid, sum_block, kShared ? sum_shared : 0, stream>>>(
          x, a.x.stride(0), y, n, d, num_classes, rows_per_block, a.means.data_ptr<double>(),
          a.counts.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    a.means.div_(a.counts.clamp_min(1).unsqueeze(1).to(at::kDouble));
    if (d == 0) return;
    COLLAPSE_BOOL_SWITCH(sq_shared <= kSharedBytes, kShared, [&] {
      class_sqdev_kernel<scalar_t, label_t, kShared><<<sq_blocks, kSqThreads, kShared ? sq_shared : 0, stream>>>(
          x, a.x.stride(0), y, n, d, num_classes, a.means.const_data_ptr<double>(), a.sqdev.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {a.counts, a.means, a.sqdev};
}

}  // namespace

TORCH_LIBRARY_IMPL(collapse_ext, CUDA, m) { m.impl("class_stats", &class_stats_cuda); }

}  // namespace collapse_ext
