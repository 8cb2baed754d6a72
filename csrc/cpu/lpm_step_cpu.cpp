// Fused projected-gradient iterations of the class-collapsed Layer-Peeled Model on the
// CPU: at::parallel_for over instances, each instance iterated to the end in a few
// thread-local buffers (an instance is O(K p + K^2) numbers, so it stays in L1/L2).
// Arithmetic in at::opmath_type<scalar_t> (float32 for float32, float64 for float64).
// The row loss and the projected step are csrc/lpm_step.h's, shared with CUDA.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string_view>
#include <vector>

#include "../lpm_step.h"

namespace collapse_ext {
namespace {

// Logits Z = H W^T of one instance turned in place into G = dL/dZ scaled by the class
// weights; returns the objective sum_k c_k L(z_k, k). x = [W; H], each (K, p).
template <typename acc_t>
acc_t logit_grad(const acc_t* x, const acc_t* c, int64_t K, int64_t p, LpmLoss loss, acc_t* G) {
  for (int64_t k = 0; k < K; ++k)
    for (int64_t j = 0; j < K; ++j) G[k * K + j] = lpm::logit(x, K, p, k, j);
  acc_t objective = 0;
  for (int64_t k = 0; k < K; ++k) objective += lpm::row_loss(G + k * K, K, k, c[k], loss);
  return objective;
}

// grad = [G^T H; G W] at x = [W; H].
template <typename acc_t>
void param_grad(const acc_t* x, const acc_t* G, int64_t K, int64_t p, acc_t* grad) {
  const acc_t* w = x;
  const acc_t* h = x + K * p;
  std::fill(grad, grad + 2 * K * p, acc_t(0));
  acc_t* gw = grad;
  acc_t* gh = grad + K * p;
  for (int64_t k = 0; k < K; ++k)
    for (int64_t j = 0; j < K; ++j) {
      const acc_t g = G[k * K + j];
      for (int64_t q = 0; q < p; ++q) {
        gw[j * p + q] += g * h[k * p + q];
        gh[k * p + q] += g * w[j * p + q];
      }
    }
}

// The entries of lpm::projected_step on the CPU: one thread owns the whole instance, so Y,
// T and the gradient are plain arrays and an instance-wide sum is the value itself.
template <typename acc_t>
struct InstanceEntries {
  const acc_t* y;
  acc_t* t;
  const acc_t* g;
  int64_t n;
  template <typename F>
  void for_each(F f) const {
    for (int64_t e = 0; e < n; ++e) f(e, y[e], t[e]);
  }
  acc_t grad(int64_t e) const { return g[e]; }
  acc_t sum(acc_t v) const { return v; }
};

template <typename scalar_t>
void lpm_step_kernel(const LpmStepParams<scalar_t>& P, int64_t b) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = P.K, p = P.p, kp = K * p, n = 2 * kp;
  std::vector<acc_t> storage(5 * n + K * K + K);
  acc_t* x = storage.data();
  acc_t* xp = x + n;
  acc_t* y = xp + n;
  acc_t* t = y + n;
  acc_t* grad = t + n;
  acc_t* G = grad + n;
  acc_t* c = G + K * K;
  for (int64_t e = 0; e < kp; ++e) {
    x[e] = P.W[b * kp + e];
    x[kp + e] = P.H[b * kp + e];
    xp[e] = P.W_prev[b * kp + e];
    xp[kp + e] = P.H_prev[b * kp + e];
  }
  for (int64_t k = 0; k < K; ++k) c[k] = P.weights[b * K + k];
  const acc_t eta = P.step[b];
  const acc_t rw = acc_t(K) * acc_t(P.E_W[b]), rh = acc_t(K) * acc_t(P.E_H[b]);
  acc_t theta = P.theta[b];
  // Objective at `point`, then the projected step from it into t; returns {objective, dot}.
  auto step_from = [&](const acc_t* point, bool want_dot) {
    const acc_t objective = logit_grad(point, c, K, p, P.loss, G);
    param_grad(point, G, K, p, grad);
    InstanceEntries<acc_t> entries{point, t, grad, n};
    return std::make_pair(objective, lpm::projected_step(entries, x, kp, eta, rw, rh, want_dot));
  };

  for (int64_t it = 0; it < P.num_iters; ++it) {
    acc_t theta_next = theta;
    const acc_t* point = x;
    if (P.momentum) {
      theta_next = lpm::next_theta(theta);
      const acc_t beta = (theta - 1) / theta_next;
      for (int64_t e = 0; e < n; ++e) y[e] = x[e] + beta * (x[e] - xp[e]);
      point = y;
    }
    const acc_t dot = step_from(point, P.momentum).second;
    if (P.momentum) theta = dot > 0 ? acc_t(1) : theta_next;
    // Rotate: the previous iterate becomes x, the new one t; the old xp is scratch.
    acc_t* old_xp = xp;
    xp = x;
    x = t;
    t = old_xp;
  }

  // One more step from x gives the objective and the projected-gradient residual.
  const auto [objective, dot] = step_from(x, true);
  for (int64_t e = 0; e < kp; ++e) {
    P.W_out[b * kp + e] = x[e];
    P.H_out[b * kp + e] = x[kp + e];
    P.W_prev_out[b * kp + e] = xp[e];
    P.H_prev_out[b * kp + e] = xp[kp + e];
  }
  P.theta_out[b] = theta;
  P.objective[b] = objective;
  P.pg_norm[b] = std::sqrt(acc_t(0) - dot) / eta;  // 0 - dot: +0, never -0, at a fixed point
}

LpmStepResult lpm_step_cpu(const at::Tensor& W, const at::Tensor& H, const at::Tensor& W_prev,
                           const at::Tensor& H_prev, const at::Tensor& theta, const at::Tensor& weights,
                           const at::Tensor& E_W, const at::Tensor& E_H, const at::Tensor& step, int64_t num_iters,
                           c10::string_view loss, bool momentum) {
  check_lpm_step(W, H, W_prev, H_prev, theta, weights, E_W, E_H, step, num_iters);
  const LpmLoss loss_kind = parse_lpm_loss(std::string_view(loss.data(), loss.size()));
  const auto in = lpm_step_inputs({W, H, W_prev, H_prev, theta, weights, E_W, E_H, step});
  const auto out = lpm_step_outputs(W);
  const int64_t B = W.size(0), K = W.size(1), p = W.size(2);
  // Aim at ~1e5 multiply-adds per task so tiny batches do not pay for threads.
  const int64_t work = std::max<int64_t>(1, (num_iters + 1) * 3 * K * K * std::max<int64_t>(p, 1));
  const int64_t grain = std::max<int64_t>(1, 100000 / work);
  AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "lpm_step_cpu", [&] {
    const auto P = make_lpm_step_params<scalar_t>(in, out, num_iters, loss_kind, momentum);
    at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) lpm_step_kernel<scalar_t>(P, b);
    });
  });
  return lpm_step_result(out);
}

}  // namespace

TORCH_LIBRARY_IMPL(collapse_ext, CPU, m) { m.impl("lpm_step", &lpm_step_cpu); }

}  // namespace collapse_ext
