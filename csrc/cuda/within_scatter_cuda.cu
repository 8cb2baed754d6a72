// Pooled within-class scatter on CUDA: sum_i (h_i - m_{y_i})(h_i - m_{y_i})^T, or its
// projection B^T S B onto a basis B (d, r).
//
// A chunk of rows (at most 256 MiB) is centred by a bandwidth-bound kernel and
// multiplied by cuBLAS, accumulated in float64: cuBLAS's GEMM is far beyond a
// hand-fused centring product, and no centred (N, d) copy of a large batch is made.
// fp32 products honour torch.backends.cuda.matmul.allow_tf32 (off by default): with
// TF32 on, the scatter is only TF32-accurate.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "../common.h"
#include "../within_scatter.h"

namespace collapse_ext {
namespace {

constexpr int64_t kChunkBytes = 256 << 20;
constexpr int64_t kMinRows = 1024;
constexpr int kThreads = 256;

template <typename scalar_t, typename label_t, typename compute_t>
__global__ void within_scatter_kernel(const scalar_t* __restrict__ x, int64_t row_stride,
                                      const label_t* __restrict__ y, const double* __restrict__ means,
                                      int64_t num_classes, int64_t rows, int64_t d, compute_t* __restrict__ out) {
  for (int64_t i = blockIdx.y; i < rows; i += gridDim.y) {
    const int64_t k = static_cast<int64_t>(y[i]);
    const bool valid = k >= 0 && k < num_classes;
    for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < d;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      out[i * d + j] = valid ? static_cast<compute_t>(to_double(x[i * row_stride + j]) - means[k * d + j]) : compute_t(0);
    }
  }
}

void centre_chunk_cuda(const at::Tensor& x, const at::Tensor& y, const at::Tensor& mu, int64_t start,
                       int64_t rows, at::Tensor& buffer) {
  const int64_t d = x.size(1);
  const dim3 grid(std::min<int64_t>((d + kThreads - 1) / kThreads, 64), std::min<int64_t>(rows, 65535));
  const auto stream = at::cuda::getCurrentCUDAStream();
  COLLAPSE_DISPATCH_FEATURES_LABELS(x.scalar_type(), y.scalar_type(), "within_scatter_cuda", [&] {
    within_scatter_kernel<<<grid, kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>() + start * x.stride(0), x.stride(0), y.const_data_ptr<label_t>() + start,
        mu.const_data_ptr<double>(), mu.size(0), rows, d, buffer.data_ptr<compute_type<scalar_t>>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor within_scatter_cuda(const at::Tensor& features, const at::Tensor& labels, const at::Tensor& means,
                               const std::optional<at::Tensor>& basis) {
  COLLAPSE_DEVICE_GUARD(features);
  return within_scatter_chunked(features, labels, means, basis, kChunkBytes, kMinRows, centre_chunk_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(collapse_ext, CUDA, m) { m.impl("within_scatter", &within_scatter_cuda); }

}  // namespace collapse_ext
