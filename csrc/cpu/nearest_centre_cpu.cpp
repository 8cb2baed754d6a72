// Nearest class centre on the CPU (NC4): for each sample, argmin_k ||h - mu_k||^2 over the
// present centres and argmax_k (W h + b)_k, in one pass over the rows, returning the counts
// [n, ncc_correct, mismatch] and optionally the assignments, never holding N x K.
//
// Distances use ||h - mu_k||^2 = ||h'||^2 - 2 h'.mu'_k + ||mu'_k||^2 with h' = h - c and
// mu' = mu - c for the common centre c = mean of the present centres (the first term does
// not change the argmin). Without the shift, features with a large common offset cancel
// away the differences between centres. Rows are shifted a chunk at a time in float64
// and rounded once, the (chunk, K) products go through BLAS, and the arg-reductions run
// in float64. The logits reuse the shifted rows: W h + b = W h' + (W c + b).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>

#include "../checks.h"
#include "../nearest_centre.h"

namespace collapse_ext {
namespace {

// (chunk, K) scores and logits: 2 MiB each in fp32, enough for BLAS to run at full rate.
constexpr int64_t kChunkBytes = 2 << 20;

template <typename scalar_t, typename compute_t>
void shift_rows(const scalar_t* x, int64_t row_stride, const double* centre, int64_t rows, int64_t d,
                compute_t* out) {
  at::parallel_for(0, rows, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const scalar_t* row = x + i * row_stride;
      compute_t* dst = out + i * d;
      for (int64_t j = 0; j < d; ++j) dst[j] = static_cast<compute_t>(static_cast<double>(row[j]) - centre[j]);
    }
  });
}

// Assignment of each row of the chunk (-1 for rows not counted) and its two flags.
template <typename compute_t, typename label_t>
void assign_rows(const compute_t* scores, const compute_t* logits, const double* mu_sq, const double* shift,
                 const label_t* y, int64_t rows, int64_t k, int64_t* nearest, int8_t* mismatch) {
  at::parallel_for(0, rows, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t label = static_cast<int64_t>(y[i]);
      nearest[i] = -1;
      mismatch[i] = 0;
      if (label < 0 || label >= k) continue;
      const compute_t* s = scores + i * k;
      double best = std::numeric_limits<double>::infinity();
      int64_t arg = -1;
      for (int64_t c = 0; c < k; ++c) {
        const double dist = mu_sq[c] - 2.0 * static_cast<double>(s[c]);  // +inf for absent centres
        if (dist < best) best = dist, arg = c;
      }
      nearest[i] = arg;
      if (logits == nullptr || arg < 0) continue;
      const compute_t* l = logits + i * k;
      double top = -std::numeric_limits<double>::infinity();
      int64_t pred = 0;
      for (int64_t c = 0; c < k; ++c) {
        const double v = static_cast<double>(l[c]) + shift[c];
        if (v > top) top = v, pred = c;
      }
      mismatch[i] = pred != arg;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> nearest_centre_cpu(const at::Tensor& features, const at::Tensor& labels,
                                                      const at::Tensor& means, const std::optional<at::Tensor>& weight,
                                                      const std::optional<at::Tensor>& bias,
                                                      const std::optional<at::Tensor>& present, bool assignments) {
  check_nearest_centre_inputs(features, labels, means, weight, bias, present);
  const int64_t n = features.size(0), d = features.size(1), k = means.size(0);
  const auto compute = features.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto f64 = features.options().dtype(at::kDouble);
  auto counts = at::zeros({3}, features.options().dtype(at::kLong));
  auto assigned = at::full({assignments ? n : 0}, -1, features.options().dtype(at::kLong));
  if (n == 0 || k == 0) return {counts, assigned};

  const NearestCentreSetup setup = nearest_centre_setup(means, weight, bias, present, compute);
  const double* centre = setup.centre.const_data_ptr<double>();
  const double* mu_sq = setup.mu_sq.const_data_ptr<double>();
  const double* shift = setup.shift.defined() ? setup.shift.const_data_ptr<double>() : nullptr;

  const at::Tensor x = features.stride(1) == 1 ? features : features.contiguous();
  const at::Tensor y = labels.contiguous();
  const int64_t elem = compute == at::kDouble ? 8 : 4;
  const int64_t chunk = std::min(n, std::max<int64_t>(16, kChunkBytes / (elem * std::max(k, d))));
  auto shifted = at::empty({chunk, d}, x.options().dtype(compute));
  auto scores = at::empty({chunk, k}, x.options().dtype(compute));
  auto logits = setup.weight.defined() ? at::empty({chunk, k}, x.options().dtype(compute)) : at::Tensor();
  auto nearest = at::empty({chunk}, f64.dtype(at::kLong));
  auto mismatch = at::empty({chunk}, f64.dtype(at::kChar));
  int64_t* total = counts.data_ptr<int64_t>();

  for (int64_t start = 0; start < n; start += chunk) {
    const int64_t rows = std::min(chunk, n - start);
    at::Tensor h = shifted.narrow(0, 0, rows), s = scores.narrow(0, 0, rows);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "nearest_centre_cpu", [&] {
      const scalar_t* px = x.const_data_ptr<scalar_t>() + start * x.stride(0);
      if (compute == at::kDouble)
        shift_rows(px, x.stride(0), centre, rows, d, h.data_ptr<double>());
      else
        shift_rows(px, x.stride(0), centre, rows, d, h.data_ptr<float>());
    });
    at::mm_out(s, h, setup.mu.t());
    at::Tensor l;
    if (logits.defined()) {
      l = logits.narrow(0, 0, rows);
      at::mm_out(l, h, setup.weight.t());
    }
    AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "nearest_centre_cpu", [&] {
      using compute_t = scalar_t;
      AT_DISPATCH_INDEX_TYPES(y.scalar_type(), "nearest_centre_cpu", [&] {
        assign_rows(s.const_data_ptr<compute_t>(), l.defined() ? l.const_data_ptr<compute_t>() : nullptr, mu_sq,
                    shift, y.const_data_ptr<index_t>() + start, rows, k, nearest.data_ptr<int64_t>(),
                    mismatch.data_ptr<int8_t>());
      });
    });
    const int64_t* near = nearest.const_data_ptr<int64_t>();
    const int8_t* miss = mismatch.const_data_ptr<int8_t>();
    AT_DISPATCH_INDEX_TYPES(y.scalar_type(), "nearest_centre_cpu", [&] {
      const index_t* py = y.const_data_ptr<index_t>() + start;
      for (int64_t i = 0; i < rows; ++i) {
        if (near[i] < 0) continue;
        total[0] += 1;
        total[1] += near[i] == static_cast<int64_t>(py[i]);
        total[2] += miss[i];
      }
    });
    if (assignments) std::copy(near, near + rows, assigned.data_ptr<int64_t>() + start);
  }
  return {counts, assigned};
}

}  // namespace

TORCH_LIBRARY_IMPL(collapse_ext, CPU, m) { m.impl("nearest_centre", &nearest_centre_cpu); }

}  // namespace collapse_ext
