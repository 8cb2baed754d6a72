// Nearest class centre on CUDA (NC4): argmin_k ||h - mu_k||^2 over the present centres
// and argmax_k (W h + b)_k for every sample, in one pass over the rows, returning the
// counts [n, ncc_correct, mismatch] (and optionally the assignments) without holding
// N x K and without any host synchronisation.
//
// As on the CPU: a chunk of rows is shifted by the mean present centre (float64
// subtraction, one rounding), cuBLAS multiplies it by the shifted centres stacked on W
// (one (chunk, 2K) product), and an arg-reduction kernel (one warp per row, float64
// compares, ties to the lowest index) assigns each row and counts with one atomic per block.
// fp32 products honour torch.backends.cuda.matmul.allow_tf32.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "../checks.h"
#include "../common.h"
#include "../nearest_centre.h"
#include "reduce.cuh"

namespace collapse_ext {
namespace {

// (chunk, 2K) products: at most 128 MiB.
constexpr int64_t kChunkBytes = 128 << 20;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarp;

template <typename scalar_t, typename compute_t>
__global__ void shift_rows_kernel(const scalar_t* __restrict__ x, int64_t row_stride,
                                  const double* __restrict__ centre, int64_t rows, int64_t d,
                                  compute_t* __restrict__ out) {
  for (int64_t i = blockIdx.y; i < rows; i += gridDim.y) {
    for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < d;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      out[i * d + j] = static_cast<compute_t>(to_double(x[i * row_stride + j]) - centre[j]);
    }
  }
}

// (value, index) arg-reduction across a warp in the order of argmin_takes, which is
// total, so the butterfly gives every lane the same winner, as on the CPU.
__device__ __forceinline__ void warp_argmin(double& value, int64_t& index) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const double v = __shfl_xor_sync(0xffffffffu, value, offset);
    const int64_t i = __shfl_xor_sync(0xffffffffu, index, offset);
    if (argmin_takes(v, i, value, index)) value = v, index = i;
  }
}

// scores and logits are (rows, k) blocks of one product with row stride ld.
template <typename compute_t, typename label_t>
__global__ void assign_kernel(const compute_t* __restrict__ scores, const compute_t* __restrict__ logits, int64_t ld,
                              const double* __restrict__ mu_sq, const double* __restrict__ shift,
                              const label_t* __restrict__ y, int64_t rows, int64_t k, int64_t* __restrict__ assigned,
                              unsigned long long* __restrict__ counts) {
  __shared__ unsigned long long block_counts[3];
  if (threadIdx.x < 3) block_counts[threadIdx.x] = 0;
  __syncthreads();
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + warp; r < rows;
       r += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t label = static_cast<int64_t>(y[r]);
    int64_t arg = -1;
    if (label >= 0 && label < k) {
      double best = INFINITY;
      const compute_t* s = scores + r * ld;
      for (int64_t c = lane; c < k; c += kWarp) {
        const double dist = mu_sq[c] - 2.0 * static_cast<double>(s[c]);  // +inf for absent centres
        if (dist < best) best = dist, arg = c;
      }
      warp_argmin(best, arg);
      if (logits != nullptr && arg >= 0) {
        // argmax of v = argmin of -v, with the same tie rule.
        double top = INFINITY;
        int64_t pred = -1;
        const compute_t* l = logits + r * ld;
        for (int64_t c = lane; c < k; c += kWarp) {
          const double v = -(static_cast<double>(l[c]) + shift[c]);
          if (pred < 0 || v < top) top = v, pred = c;
        }
        warp_argmin(top, pred);
        if (lane == 0 && pred != arg) atomicAdd(&block_counts[2], 1ull);
      }
      if (lane == 0 && arg >= 0) {
        atomicAdd(&block_counts[0], 1ull);
        if (arg == label) atomicAdd(&block_counts[1], 1ull);
      }
    }
    if (lane == 0 && assigned != nullptr) assigned[r] = arg;
  }
  __syncthreads();
  if (threadIdx.x < 3 && block_counts[threadIdx.x] > 0) atomicAdd(counts + threadIdx.x, block_counts[threadIdx.x]);
}

std::tuple<at::Tensor, at::Tensor> nearest_centre_cuda(const at::Tensor& features, const at::Tensor& labels,
                                                       const at::Tensor& means,
                                                       const std::optional<at::Tensor>& weight,
                                                       const std::optional<at::Tensor>& bias,
                                                       const std::optional<at::Tensor>& present, bool assignments) {
  COLLAPSE_DEVICE_GUARD(features);
  check_nearest_centre_inputs(features, labels, means, weight, bias, present);
  const int64_t n = features.size(0), d = features.size(1), k = means.size(0);
  const auto compute = compute_dtype(features.scalar_type());
  auto counts = at::zeros({3}, features.options().dtype(at::kLong));
  auto assigned = at::full({assignments ? n : 0}, -1, features.options().dtype(at::kLong));
  if (n == 0 || k == 0) return {counts, assigned};

  const NearestCentreSetup setup = nearest_centre_setup(means, weight, bias, present, compute);
  const at::Tensor x = unit_stride_columns(features);
  const at::Tensor y = labels.contiguous();
  const int64_t elem = compute == at::kDouble ? 8 : 4;
  const int64_t cols = setup.stacked.size(0);  // K, or 2K with the classifier
  const bool has_weight = setup.shift.defined();
  const int64_t chunk = std::min(n, std::max<int64_t>(1024, kChunkBytes / (elem * std::max(cols, d))));
  auto shifted = at::empty({chunk, d}, x.options().dtype(compute));
  auto products = at::empty({chunk, cols}, x.options().dtype(compute));
  const auto stream = at::cuda::getCurrentCUDAStream();
  auto* total = reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>());

  for (int64_t start = 0; start < n; start += chunk) {
    const int64_t rows = std::min(chunk, n - start);
    at::Tensor h = shifted.narrow(0, 0, rows), s = products.narrow(0, 0, rows);
    const int blocks = static_cast<int>(std::min<int64_t>((rows + kWarps - 1) / kWarps, 8192));
    COLLAPSE_DISPATCH_FEATURES_LABELS(x.scalar_type(), y.scalar_type(), "nearest_centre_cuda", [&] {
      using compute_t = compute_type<scalar_t>;
      if (d > 0) {
        const dim3 grid(std::min<int64_t>((d + kThreads - 1) / kThreads, 64), std::min<int64_t>(rows, 65535));
        shift_rows_kernel<<<grid, kThreads, 0, stream>>>(x.const_data_ptr<scalar_t>() + start * x.stride(0),
                                                         x.stride(0), setup.centre.const_data_ptr<double>(), rows,
                                                         d, h.data_ptr<compute_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      at::mm_out(s, h, setup.stacked.t());
      const compute_t* ps = s.const_data_ptr<compute_t>();
      assign_kernel<compute_t, label_t><<<blocks, kThreads, 0, stream>>>(
          ps, has_weight ? ps + k : nullptr, cols, setup.mu_sq.const_data_ptr<double>(),
          has_weight ? setup.shift.const_data_ptr<double>() : nullptr, y.const_data_ptr<label_t>() + start, rows, k,
          assignments ? assigned.data_ptr<int64_t>() + start : nullptr, total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {counts, assigned};
}

}  // namespace

TORCH_LIBRARY_IMPL(collapse_ext, CUDA, m) { m.impl("nearest_centre", &nearest_centre_cuda); }

}  // namespace collapse_ext
