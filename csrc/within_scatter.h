// Host side of within_scatter shared by the backends: argument checks, the optional
// projection basis, and the chunk loop. A backend supplies only the centring of a chunk
// (float64 subtraction, one rounding to the compute dtype); the chunk's product goes
// through the backend's BLAS (MKL / cuBLAS) and is accumulated in float64.
#pragma once

#include <torch/all.h>

#include <algorithm>
#include <optional>

#include "checks.h"
#include "common.h"

namespace collapse_ext {

constexpr int64_t kFlushRows = 32768;

// centre(x, y, means_f64, start, rows, buffer) writes rows [start, start + rows) of
// features, centred by their class means, into buffer[:rows]; rows with labels outside
// [0, K) become zero.
template <typename CentreChunk>
at::Tensor within_scatter_chunked(const at::Tensor& features, const at::Tensor& labels,
                                  const at::Tensor& means, const std::optional<at::Tensor>& basis,
                                  int64_t chunk_bytes, int64_t min_rows, CentreChunk centre) {
  check_features_labels(features, labels);
  check_means(means, features);
  const int64_t n = features.size(0), d = features.size(1);
  // fp16/bf16/fp32 are centred and multiplied in fp32; fp64 stays fp64.
  const auto compute = compute_dtype(features.scalar_type());
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

  const at::Tensor x = unit_stride_columns(features);
  const at::Tensor y = labels.contiguous();
  const at::Tensor mu = means.to(at::kDouble).contiguous();
  const int64_t elem = compute == at::kDouble ? 8 : 4;
  const int64_t chunk = std::min(n, std::max(min_rows, chunk_bytes / (elem * d)));
  auto buffer = at::empty({chunk, d}, x.options().dtype(compute));
  auto product = at::empty({r, r}, x.options().dtype(compute));
  // Chunk products accumulate in the compute dtype for up to kFlushRows rows (BLAS sums
  // that many terms about as accurately as one long GEMM), then go to the float64
  // accumulator: flushing every chunk cost 16% at d = 2048 (a d x d pass per chunk).
  int64_t pending = 0;
  for (int64_t start = 0; start < n; start += chunk) {
    const int64_t rows = std::min(chunk, n - start);
    centre(x, y, mu, start, rows, buffer);
    at::Tensor centred = buffer.narrow(0, 0, rows);
    if (proj.defined()) centred = at::mm(centred, proj);
    if (pending == 0)
      at::mm_out(product, centred.t(), centred);
    else
      product.addmm_(centred.t(), centred);
    pending += rows;
    if (pending >= kFlushRows || start + rows == n) {
      acc.add_(product);
      pending = 0;
    }
  }
  return acc;
}

}  // namespace collapse_ext
