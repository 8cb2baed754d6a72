// Host-side validation and the plain parameter struct of the fused Layer-Peeled Model
// step, shared by csrc/cpu/lpm_step_cpu.cpp and csrc/cuda/lpm_step_cuda.cu. The kernels
// only see LpmStepParams; every check lives here, with a message naming the argument.
#pragma once

#include <torch/all.h>

#include <string_view>
#include <tuple>

#include "checks.h"

namespace collapse_ext {

enum class LpmLoss { kCrossEntropy, kSquared };

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
