// Pooled within-class scatter on CUDA: sum_i (h_i - m_{y_i})(h_i - m_{y_i})^T, or its
// projection B^T S B onto a basis B (d, r).
//
// A chunk of rows is centred by a bandwidth-bound kernel (float64 subtraction, one
// rounding to the compute dtype) and multiplied by cuBLAS, accumulated in float64.
// cuBLAS's GEMM is far beyond a hand-fused centring product, and the chunk (at most
// kChunkBytes) stays in L2-friendly sizes without ever holding a centred (N, d) copy.
// fp32 products honour torch.backends.cuda.matmul.allow_tf32 (off by default): with
// TF32 on, the scatter is only TF32-accurate.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "../checks.h"

namespace collapse_ext {
namespace {

constexpr int64_t kChunkBytes = 256 << 20;

template <typename scalar_t, typename label_t, typename compute_t>
__global__ void centre_rows_kernel(const scalar_t* __restrict__ x, int64_t row_stride,
                                   const label_t* __restrict__ y, const double* __restrict__ means,
                                   int64_t num_classes, int64_t rows, int64_t d,
                                   compute_t* __restrict__ out) {
  for (int64_t i = blockIdx.y; i < rows; i += gridDim.y) {
    const int64_t k = static_cast<int64_t>(y[i]);
    const bool valid = k >= 0 && k < num_classes;
    for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < d;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const double v = static_cast<double>(static_cast<at::opmath_type<scalar_t>>(x[i * row_stride + j]));
      out[i * d + j] = valid ? static_cast<compute_t>(v - means[k * d + j]) : compute_t(0);
    }
  }
}

at::Tensor within_scatter_cuda(const at::Tensor& features, const at::Tensor& labels,
                               const at::Tensor& means, const std::optional<at::Tensor>& basis) {
  check_features_labels(features, labels);
  check_means(means, features);
  const c10::cuda::CUDAGuard guard(features.device());
  const int64_t n = features.size(0), d = features.size(1), num_classes = means.size(0);
  const auto compute = features.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor proj;
  if (basis.has_value()) {
    CE_CHECK_DIM(*basis, 2, "basis", "(d, r)");
    CE_CHECK_FLOAT(*basis, "basis");
    CE_CHECK_SIZE(*basis, 0, d, "basis", "d (the columns of features)");
    CE_CHECK_SAME_DEVICE(*basis, features, "basis", "features");
    proj = basis->to(compute).contiguous();
  }
  const int64_t r = proj.defined() ? proj.size(1) : d;
  auto acc = at::zeros({r, r}, features.options().dtype(at::kDouble));
  if (n == 0 || d == 0 || r == 0) return acc;

  const at::Tensor x = features.stride(1) == 1 ? features : features.contiguous();
  const at::Tensor y = labels.contiguous();
  const at::Tensor mu = means.to(at::kDouble).contiguous();
  const int64_t elem = compute == at::kDouble ? 8 : 4;
  const int64_t chunk = std::min(n, std::max<int64_t>(1024, kChunkBytes / (elem * d)));
  auto buffer = at::empty({chunk, d}, x.options().dtype(compute));
  auto product = at::empty({r, r}, x.options().dtype(compute));
  const auto stream = at::cuda::getCurrentCUDAStream();
  constexpr int kThreads = 256;

  for (int64_t start = 0; start < n; start += chunk) {
    const int64_t rows = std::min(chunk, n - start);
    const dim3 grid(std::min<int64_t>((d + kThreads - 1) / kThreads, 64), std::min<int64_t>(rows, 65535));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "within_scatter_cuda", [&] {
      using scalar = scalar_t;
      AT_DISPATCH_INDEX_TYPES(y.scalar_type(), "within_scatter_cuda", [&] {
        const scalar* px = x.const_data_ptr<scalar>() + start * x.stride(0);
        const index_t* py = y.const_data_ptr<index_t>() + start;
        if (compute == at::kDouble)
          centre_rows_kernel<<<grid, kThreads, 0, stream>>>(px, x.stride(0), py, mu.const_data_ptr<double>(),
                                                            num_classes, rows, d, buffer.data_ptr<double>());
        else
          centre_rows_kernel<<<grid, kThreads, 0, stream>>>(px, x.stride(0), py, mu.const_data_ptr<double>(),
                                                            num_classes, rows, d, buffer.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
    at::Tensor centred = buffer.narrow(0, 0, rows);
    if (proj.defined()) centred = at::mm(centred, proj);
    at::mm_out(product, centred.t(), centred);
    acc.add_(product);
  }
  return acc;
}

}  // namespace

TORCH_LIBRARY_IMPL(collapse_ext, CUDA, m) { m.impl("within_scatter", &within_scatter_cuda); }

}  // namespace collapse_ext
