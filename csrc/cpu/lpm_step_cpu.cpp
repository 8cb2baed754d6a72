// Fused projected-gradient iterations of the class-collapsed Layer-Peeled Model on the
// CPU: at::parallel_for over instances, each instance iterated to the end in a few
// thread-local buffers (an instance is O(K p + K^2) numbers, so it stays in L1/L2).
// Arithmetic in at::opmath_type<scalar_t> (float32 for float32, float64 for float64).
// The iteration is documented in collapse_ext/_ops.py (lpm_step) and written out plainly
// in collapse_ext/reference.py (lpm_step_reference).
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
  const acc_t* w = x;
  const acc_t* h = x + K * p;
  for (int64_t k = 0; k < K; ++k)
    for (int64_t j = 0; j < K; ++j) {
      acc_t s = 0;
      for (int64_t q = 0; q < p; ++q) s += h[k * p + q] * w[j * p + q];
      G[k * K + j] = s;
    }
  acc_t objective = 0;
  for (int64_t k = 0; k < K; ++k) {
    acc_t* z = G + k * K;
    if (loss == LpmLoss::kCrossEntropy) {
      acc_t m = z[0];
      for (int64_t j = 1; j < K; ++j) m = std::max(m, z[j]);
      const acc_t zk = z[k];
      acc_t sum = 0;
      for (int64_t j = 0; j < K; ++j) sum += (z[j] = std::exp(z[j] - m));
      objective += c[k] * (m + std::log(sum) - zk);
      for (int64_t j = 0; j < K; ++j) z[j] = c[k] * (z[j] / sum - (j == k ? acc_t(1) : acc_t(0)));
    } else {
      acc_t sq = 0;
      for (int64_t j = 0; j < K; ++j) {
        const acc_t r = z[j] - (j == k ? acc_t(1) : acc_t(0));
        sq += r * r;
        z[j] = c[k] * r;
      }
      objective += c[k] * acc_t(0.5) * sq;
    }
  }
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

template <typename acc_t>
acc_t sum_sq(const acc_t* v, int64_t n) {
  acc_t s = 0;
  for (int64_t i = 0; i < n; ++i) s += v[i] * v[i];
  return s;
}

// Radial rescale onto ||block||_F^2 <= radius_sq (identity inside the ball).
template <typename acc_t>
acc_t ball_scale(acc_t norm_sq, acc_t radius_sq) {
  return norm_sq > radius_sq ? std::sqrt(radius_sq / norm_sq) : acc_t(1);
}

template <typename scalar_t>
void lpm_step_kernel(const LpmStepParams<scalar_t>& P, int64_t b) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = P.K, p = P.p, kp = K * p, n = 2 * kp;
  std::vector<acc_t> storage(4 * n + K * K + K);
  acc_t* x = storage.data();
  acc_t* xp = x + n;
  acc_t* y = xp + n;
  acc_t* t = y + n;
  acc_t* G = t + n;
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
  std::vector<acc_t> grad(n);

  for (int64_t it = 0; it < P.num_iters; ++it) {
    acc_t theta_next = theta;
    const acc_t* yy = x;
    if (P.momentum) {
      theta_next = (1 + std::sqrt(1 + 4 * theta * theta)) / 2;
      const acc_t beta = (theta - 1) / theta_next;
      for (int64_t e = 0; e < n; ++e) y[e] = x[e] + beta * (x[e] - xp[e]);
      yy = y;
    }
    logit_grad(yy, c, K, p, P.loss, G);
    param_grad(yy, G, K, p, grad.data());
    for (int64_t e = 0; e < n; ++e) t[e] = yy[e] - eta * grad[e];
    const acc_t sw = ball_scale(sum_sq(t, kp), rw), sh = ball_scale(sum_sq(t + kp, kp), rh);
    acc_t dot = 0;
    for (int64_t e = 0; e < n; ++e) {
      t[e] *= e < kp ? sw : sh;
      dot += (yy[e] - t[e]) * (t[e] - x[e]);
    }
    if (P.momentum) theta = dot > 0 ? acc_t(1) : theta_next;
    // Rotate: the previous iterate becomes x, the new one t; the old xp is scratch.
    acc_t* old_xp = xp;
    xp = x;
    x = t;
    t = old_xp;
  }

  const acc_t objective = logit_grad(x, c, K, p, P.loss, G);
  param_grad(x, G, K, p, grad.data());
  for (int64_t e = 0; e < n; ++e) t[e] = x[e] - eta * grad[e];
  const acc_t sw = ball_scale(sum_sq(t, kp), rw), sh = ball_scale(sum_sq(t + kp, kp), rh);
  acc_t pg = 0;
  for (int64_t e = 0; e < n; ++e) {
    const acc_t d = x[e] - t[e] * (e < kp ? sw : sh);
    pg += d * d;
  }
  for (int64_t e = 0; e < kp; ++e) {
    P.W_out[b * kp + e] = x[e];
    P.H_out[b * kp + e] = x[kp + e];
    P.W_prev_out[b * kp + e] = xp[e];
    P.H_prev_out[b * kp + e] = xp[kp + e];
  }
  P.theta_out[b] = theta;
  P.objective[b] = objective;
  P.pg_norm[b] = std::sqrt(pg) / eta;
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
