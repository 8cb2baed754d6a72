// The fused Layer-Peeled Model step shared by csrc/cpu/lpm_step_cpu.cpp and
// csrc/cuda/lpm_step_cuda.cu: host-side validation, the plain parameter struct (the
// kernels only see LpmStepParams; every check lives here, with a message naming the
// argument), and the math of one iteration written once for both backends (namespace
// lpm). The iteration is documented in collapse_ext/_ops.py (lpm_step) and written out
// plainly in collapse_ext/reference.py (lpm_step_reference).
#pragma once

#include <torch/all.h>

#include <string_view>
#include <tuple>

#include "checks.h"
#include "common.h"

namespace collapse_ext {

enum class LpmLoss { kCrossEntropy, kSquared };

namespace lpm {

// Entry (k, j) of the logits Z = H W^T at x = [W; H], each block (K, p) row-major.
template <typename acc_t, typename int_t>
COLLAPSE_HD_INLINE acc_t logit(const acc_t* x, int_t K, int_t p, int_t k, int_t j) {
  const acc_t* h = x + K * p + k * p;
  const acc_t* w = x + j * p;
  acc_t s = 0;
  for (int_t q = 0; q < p; ++q) s += h[q] * w[q];
  return s;
}

// The loss of class k's feature, weighted by c: z (K,) holds its logits and becomes
// c dL/dz; returns c L(z, k). Cross-entropy: L = logsumexp(z) - z_k, computed about
// max(z); squared: L = ||z - e_k||^2 / 2.
template <typename acc_t, typename int_t>
COLLAPSE_HD_INLINE acc_t row_loss(acc_t* z, int_t K, int_t k, acc_t c, LpmLoss loss) {
  if (loss == LpmLoss::kCrossEntropy) {
    acc_t m = z[0];
    for (int_t j = 1; j < K; ++j) m = hd_max(m, z[j]);
    const acc_t zk = z[k];
    acc_t sum = 0;
    for (int_t j = 0; j < K; ++j) sum += (z[j] = hd_exp(z[j] - m));
    for (int_t j = 0; j < K; ++j) z[j] = c * (z[j] / sum - (j == k ? acc_t(1) : acc_t(0)));
    return c * (m + hd_log(sum) - zk);
  }
  acc_t sq = 0;
  for (int_t j = 0; j < K; ++j) {
    const acc_t r = z[j] - (j == k ? acc_t(1) : acc_t(0));
    sq += r * r;
    z[j] = c * r;
  }
  return c * acc_t(0.5) * sq;
}

// FISTA's theta_{t+1} = (1 + sqrt(1 + 4 theta_t^2)) / 2.
template <typename acc_t>
COLLAPSE_HD_INLINE acc_t next_theta(acc_t theta) {
  return (1 + hd_sqrt(1 + 4 * theta * theta)) / 2;
}

// Radial rescale onto ||block||_F^2 <= radius_sq (identity inside the ball).
template <typename acc_t>
COLLAPSE_HD_INLINE acc_t ball_scale(acc_t norm_sq, acc_t radius_sq) {
  return norm_sq > radius_sq ? hd_sqrt(radius_sq / norm_sq) : acc_t(1);
}

// The projected gradient step from Y, with the gradient at Y already in `entries`:
// T = P(Y - eta grad), P rescaling the W block (entries e < kp) onto ||W||_F^2 <= rw and
// the H block onto ||H||_F^2 <= rh. Returns <Y - T, T - X>, the adaptive-restart test
// (summed over the instance when want_dot; a thread's share otherwise); at Y = X that is
// -||X - T||^2 = -(eta * projected-gradient norm)^2, so the final residual is this step too.
// `entries` holds Y and T at the entries a thread owns: for_each(f) calls f(e, y_e, t_e)
// (t_e by reference), grad(e) is the gradient at Y, sum(v) sums v over the instance (the
// identity on the CPU, where a thread owns the whole instance; a block reduction on CUDA).
template <typename acc_t, typename int_t, typename Entries>
COLLAPSE_HD_INLINE acc_t projected_step(Entries& entries, const acc_t* x, int_t kp, acc_t eta, acc_t rw, acc_t rh,
                                        bool want_dot) {
  acc_t nw = 0, nh = 0;
  entries.for_each([&](auto e, const acc_t& y, acc_t& t) {
    t = y - eta * entries.grad(e);
    (e < kp ? nw : nh) += t * t;
  });
  nw = entries.sum(nw);
  nh = entries.sum(nh);
  const acc_t sw = ball_scale(nw, rw), sh = ball_scale(nh, rh);
  acc_t dot = 0;
  entries.for_each([&](auto e, const acc_t& y, acc_t& t) {
    t *= e < kp ? sw : sh;
    dot += (y - t) * (t - x[e]);
  });
  return want_dot ? entries.sum(dot) : dot;
}

}  // namespace lpm

inline LpmLoss parse_lpm_loss(std::string_view loss) {
  if (loss == "ce") return LpmLoss::kCrossEntropy;
  if (loss == "mse") return LpmLoss::kSquared;
  TORCH_CHECK(false, "loss must be \"ce\" or \"mse\", got \"", std::string(loss), "\"");
}

// Everything a kernel needs, as raw pointers into contiguous tensors. Blocks are stored
// W then H, each (K, p) row-major, one instance after another.
template <typename scalar_t>
struct LpmStepParams {
  const scalar_t* W;
  const scalar_t* H;
  const scalar_t* W_prev;
  const scalar_t* H_prev;
  const scalar_t* theta;
  const scalar_t* weights;
  const scalar_t* E_W;
  const scalar_t* E_H;
  const scalar_t* step;
  scalar_t* W_out;
  scalar_t* H_out;
  scalar_t* W_prev_out;
  scalar_t* H_prev_out;
  scalar_t* theta_out;
  scalar_t* objective;
  scalar_t* pg_norm;
  int64_t batch;
  int64_t K;
  int64_t p;
  int64_t num_iters;
  LpmLoss loss;
  bool momentum;
};

inline void check_lpm_like(const at::Tensor& t, const at::Tensor& W, const char* name,
                           at::IntArrayRef shape, const char* form) {
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", form, " = ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == W.scalar_type(), name, " must have the dtype of W (", W.scalar_type(),
              "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == W.device(), name, " must be on the device of W (", W.device(), "), got ",
              t.device());
}

inline void check_lpm_step(const at::Tensor& W, const at::Tensor& H, const at::Tensor& W_prev,
                           const at::Tensor& H_prev, const at::Tensor& theta, const at::Tensor& weights,
                           const at::Tensor& E_W, const at::Tensor& E_H, const at::Tensor& step,
                           int64_t num_iters) {
  CE_CHECK_DIM(W, 3, "W", "(B, K, p)");
  TORCH_CHECK(W.scalar_type() == at::kFloat || W.scalar_type() == at::kDouble,
              "W must be float32 or float64, got ", W.scalar_type());
  TORCH_CHECK(W.size(1) > 0, "W must have at least one class (K > 0), got shape ", W.sizes());
  const int64_t B = W.size(0), K = W.size(1);
  check_lpm_like(H, W, "H", W.sizes(), "(B, K, p)");
  check_lpm_like(W_prev, W, "W_prev", W.sizes(), "(B, K, p)");
  check_lpm_like(H_prev, W, "H_prev", W.sizes(), "(B, K, p)");
  check_lpm_like(theta, W, "theta", {B}, "(B,)");
  check_lpm_like(weights, W, "weights", {B, K}, "(B, K)");
  check_lpm_like(E_W, W, "E_W", {B}, "(B,)");
  check_lpm_like(E_H, W, "E_H", {B}, "(B,)");
  check_lpm_like(step, W, "step", {B}, "(B,)");
  TORCH_CHECK(num_iters >= 0, "num_iters must be >= 0, got ", num_iters);
}

// Contiguous inputs, fresh outputs and the params pointing into both. The returned
// tensors keep the contiguous copies alive while the kernel runs.
template <typename scalar_t>
LpmStepParams<scalar_t> make_lpm_step_params(const std::vector<at::Tensor>& in,
                                             const std::vector<at::Tensor>& out, int64_t num_iters,
                                             LpmLoss loss, bool momentum) {
  LpmStepParams<scalar_t> P;
  P.W = in[0].const_data_ptr<scalar_t>();
  P.H = in[1].const_data_ptr<scalar_t>();
  P.W_prev = in[2].const_data_ptr<scalar_t>();
  P.H_prev = in[3].const_data_ptr<scalar_t>();
  P.theta = in[4].const_data_ptr<scalar_t>();
  P.weights = in[5].const_data_ptr<scalar_t>();
  P.E_W = in[6].const_data_ptr<scalar_t>();
  P.E_H = in[7].const_data_ptr<scalar_t>();
  P.step = in[8].const_data_ptr<scalar_t>();
  P.W_out = out[0].data_ptr<scalar_t>();
  P.H_out = out[1].data_ptr<scalar_t>();
  P.W_prev_out = out[2].data_ptr<scalar_t>();
  P.H_prev_out = out[3].data_ptr<scalar_t>();
  P.theta_out = out[4].data_ptr<scalar_t>();
  P.objective = out[5].data_ptr<scalar_t>();
  P.pg_norm = out[6].data_ptr<scalar_t>();
  P.batch = in[0].size(0);
  P.K = in[0].size(1);
  P.p = in[0].size(2);
  P.num_iters = num_iters;
  P.loss = loss;
  P.momentum = momentum;
  return P;
}

inline std::vector<at::Tensor> lpm_step_inputs(std::initializer_list<at::Tensor> tensors) {
  std::vector<at::Tensor> in;
  for (const auto& t : tensors) in.push_back(t.contiguous());
  return in;
}

inline std::vector<at::Tensor> lpm_step_outputs(const at::Tensor& W) {
  const int64_t B = W.size(0);
  return {at::empty(W.sizes(), W.options()), at::empty(W.sizes(), W.options()),
          at::empty(W.sizes(), W.options()), at::empty(W.sizes(), W.options()),
          at::empty({B}, W.options()),       at::empty({B}, W.options()),
          at::empty({B}, W.options())};
}

using LpmStepResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline LpmStepResult lpm_step_result(const std::vector<at::Tensor>& out) {
  return {out[0], out[1], out[2], out[3], out[4], out[5], out[6]};
}

}  // namespace collapse_ext
