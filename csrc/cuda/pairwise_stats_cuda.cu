// Pairwise statistics over the rows of a (K, d) matrix on CUDA (see pairwise_stats.h for
// the quantities), reduced to a float64 vector without holding K x K.
//
// The upper triangle of the Gram matrix is formed one (T, T) tile at a time by cuBLAS
// (at::mm on the current stream), then a reduction kernel walks the tile with one warp
// per row and the same per-pair code as the CPU. Each block folds its result into its
// own slot of a (blocks, fields) buffer that lives across tiles; a last one-block kernel
// folds the slots in order. No atomics: the result is deterministic, and nothing is
// copied back to the host. fp32 tiles honour torch.backends.cuda.matmul.allow_tf32.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>

#include "../checks.h"
#include "../common.h"
#include "../pairwise_stats.h"
#include "reduce.cuh"

namespace collapse_ext {
namespace {

using pairwise::kNumFields;

// 4096 x 4096 fp32 = 64 MiB per tile: large enough for cuBLAS to run at full rate.
constexpr int64_t kTile = 4096;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarp;

template <int F>
__device__ __forceinline__ double warp_fold(double v) {
  if (pairwise::is_min(F)) return warp_min(v);
  if (pairwise::is_max(F)) return warp_max(v);
  return warp_sum(v);
}

template <int F>
__device__ __forceinline__ void block_fold(const double* acc, double (*scratch)[kWarps], int lane, int warp) {
  const double v = warp_fold<F>(acc[F]);
  if (lane == 0) scratch[F][warp] = v;
  if constexpr (F + 1 < kNumFields) block_fold<F + 1>(acc, scratch, lane, warp);
}

template <typename compute_t>
__global__ void reduce_tile_kernel(const compute_t* __restrict__ gram, int64_t ti, int64_t tj, int64_t i0,
                                   int64_t j0, bool diagonal, const double* __restrict__ sq,
                                   const double* __restrict__ inv, const double* __restrict__ var,
                                   pairwise::Params params, double* __restrict__ slots) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  double acc[kNumFields];
  pairwise::init(acc);
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + warp; r < ti;
       r += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t i = i0 + r;
    const double sq_i = sq[i], inv_i = inv[i], var_i = var ? var[i] : 0.0;
    const compute_t* g = gram + r * tj;
    for (int64_t c = (diagonal ? r + 1 : 0) + lane; c < tj; c += kWarp) {
      const int64_t j = j0 + c;
      pairwise::add_pair(acc, static_cast<double>(g[c]), sq_i, sq[j], inv_i, inv[j], var_i, var ? var[j] : 0.0,
                         params);
    }
  }
  __shared__ double scratch[kNumFields][kWarps];
  block_fold<0>(acc, scratch, lane, warp);
  __syncthreads();
  if (threadIdx.x < kNumFields) {
    const int f = threadIdx.x;
    double* slot = slots + static_cast<int64_t>(blockIdx.x) * kNumFields;
    double v = slot[f];
    for (int w = 0; w < kWarps; ++w) v = pairwise::fold(f, v, scratch[f][w]);
    slot[f] = v;
  }
}

// Squared norms and inverse norms in float64, one warp per row (a float64 copy of the
// rows would double the memory).
template <typename compute_t>
__global__ void row_norms_kernel(const compute_t* __restrict__ a, int64_t m, int64_t d, double* __restrict__ sq,
                                 double* __restrict__ inv) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + warp; r < m;
       r += static_cast<int64_t>(gridDim.x) * kWarps) {
    double acc = 0.0;
    for (int64_t c = lane; c < d; c += kWarp) {
      const double v = static_cast<double>(a[r * d + c]);
      acc += v * v;
    }
    acc = warp_sum(acc);
    if (lane == 0) {
      sq[r] = acc;
      inv[r] = acc > 0.0 ? 1.0 / sqrt(acc) : 0.0;
    }
  }
}

__global__ void init_slots_kernel(double* slots, int64_t count) {
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < count;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x)
    pairwise::init(slots + b * kNumFields);
}

// One thread per field folds the block slots in block order.
__global__ void fold_slots_kernel(const double* __restrict__ slots, int64_t count, double* __restrict__ out) {
  const int f = threadIdx.x;
  if (f >= kNumFields) return;
  double v = pairwise::identity(f);
  for (int64_t b = 0; b < count; ++b) v = pairwise::fold(f, v, slots[b * kNumFields + f]);
  out[f] = v;
}

at::Tensor pairwise_stats_cuda(const at::Tensor& rows, const std::optional<at::Tensor>& variances,
                               const std::optional<at::Tensor>& subset, double riesz_s, double cdnv_p) {
  COLLAPSE_DEVICE_GUARD(rows);
  check_pairwise_inputs(rows, variances, subset, riesz_s, cdnv_p);
  const auto selected = pairwise_rows(rows, variances, subset);
  const at::Tensor &a = selected.first, &v = selected.second;
  const auto compute = a.scalar_type();
  const int64_t m = a.size(0);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int blocks = 4 * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  auto slots = at::empty({blocks, kNumFields}, rows.options().dtype(at::kDouble));
  init_slots_kernel<<<(blocks + kThreads - 1) / kThreads, kThreads, 0, stream>>>(slots.data_ptr<double>(), blocks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto out = at::empty({kNumFields}, rows.options().dtype(at::kDouble));

  if (m >= 2) {
    auto sq_t = at::empty({m}, rows.options().dtype(at::kDouble));
    auto inv_t = at::empty({m}, rows.options().dtype(at::kDouble));
    const int norm_blocks = static_cast<int>(std::min<int64_t>((m + kWarps - 1) / kWarps, 4096));
    COLLAPSE_FLOAT_SWITCH(compute, compute_t, [&] {
      row_norms_kernel<compute_t><<<norm_blocks, kThreads, 0, stream>>>(
          a.const_data_ptr<compute_t>(), m, a.size(1), sq_t.data_ptr<double>(), inv_t.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const double eps = compute == at::kDouble ? std::numeric_limits<double>::epsilon()
                                              : static_cast<double>(std::numeric_limits<float>::epsilon());
    const pairwise::Params params{1.0 / static_cast<double>(m - 1), riesz_s, cdnv_p, v.defined(), 4.0 * eps};
    const int64_t tile = std::min(kTile, m);
    auto gram = at::empty({tile, tile}, a.options());
    for (int64_t i0 = 0; i0 < m; i0 += tile) {
      const int64_t ti = std::min(tile, m - i0);
      const at::Tensor ai = a.narrow(0, i0, ti);
      for (int64_t j0 = i0; j0 < m; j0 += tile) {
        const int64_t tj = std::min(tile, m - j0);
        // A partial tile is a contiguous (ti, tj) prefix of the same buffer.
        at::Tensor g = gram.view({-1}).narrow(0, 0, ti * tj).view({ti, tj});
        at::mm_out(g, ai, a.narrow(0, j0, tj).t());
        COLLAPSE_FLOAT_SWITCH(compute, compute_t, [&] {
          reduce_tile_kernel<compute_t><<<blocks, kThreads, 0, stream>>>(
              g.const_data_ptr<compute_t>(), ti, tj, i0, j0, i0 == j0, sq_t.const_data_ptr<double>(),
              inv_t.const_data_ptr<double>(), v.defined() ? v.const_data_ptr<double>() : nullptr, params,
              slots.data_ptr<double>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      }
    }
  }
  fold_slots_kernel<<<1, kWarp, 0, stream>>>(slots.const_data_ptr<double>(), blocks, out.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(collapse_ext, CUDA, m) { m.impl("pairwise_stats", &pairwise_stats_cuda); }

}  // namespace collapse_ext
