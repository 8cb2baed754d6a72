// Fused projected-gradient iterations of the class-collapsed Layer-Peeled Model on CUDA.
//
// One thread block per instance. The iterate X = [W; H] and the previous iterate live in
// shared memory, with the (K, K) logit/gradient matrix and the class weights; all
// num_iters iterations run inside the kernel, so a sweep of thousands of small instances
// costs one launch per chunk instead of ~20 per iteration. Each thread owns up to
// kMaxPerThread entries of X (4 for small instances): it keeps the extrapolated point Y
// and the trial point of its entries in registers, which lets the new iterate overwrite
// Y in place and keeps shared memory at 2 * 2Kp + K^2 + K numbers (K = p = 64 in
// float64: 160 KiB).
// Arithmetic in at::opmath_type<scalar_t>; block reductions in a fixed order, so results
// are deterministic. The row loss and the projected step are csrc/lpm_step.h's, shared
// with the CPU.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <string_view>

#include "../common.h"
#include "../lpm_step.h"
#include "reduce.cuh"

namespace collapse_ext {
namespace {

constexpr int kMaxThreads = 512;
constexpr int kMaxPerThread = 16;
constexpr int kTargetPerThread = 4;
constexpr int64_t kMaxEntries = int64_t(kMaxThreads) * kMaxPerThread;  // 2 K p

// Logits Z = H W^T of x = [W; H] into G, then G <- diag(c) dL/dZ row by row. Returns
// this thread's share of the objective (rows it transformed). Ends with a barrier.
template <typename acc_t>
__device__ acc_t logit_grad(const acc_t* x, const acc_t* c, int K, int p, LpmLoss loss, acc_t* G) {
  for (int idx = threadIdx.x; idx < K * K; idx += blockDim.x) G[idx] = lpm::logit(x, K, p, idx / K, idx % K);
  __syncthreads();
  acc_t objective = 0;
  for (int k = threadIdx.x; k < K; k += blockDim.x) objective += lpm::row_loss(G + k * K, K, k, c[k], loss);
  __syncthreads();
  return objective;
}

// Entry e of grad = [G^T H; G W] at x = [W; H].
template <typename acc_t>
__device__ __forceinline__ acc_t param_grad(const acc_t* x, const acc_t* G, int K, int p, int e) {
  const int kp = K * p;
  acc_t g = 0;
  if (e < kp) {
    const int j = e / p, q = e % p;
    const acc_t* h = x + kp;
    for (int k = 0; k < K; ++k) g += G[k * K + j] * h[k * p + q];
  } else {
    const int k = (e - kp) / p, q = (e - kp) % p;
    for (int j = 0; j < K; ++j) g += G[k * K + j] * x[j * p + q];
  }
  return g;
}

// The entries of lpm::projected_step on CUDA: thread i of the block owns entries
// e = i + r * blockDim.x (r < kPerThread) and keeps Y and T there in registers; the
// gradient is formed per entry from Y in shared memory (`point`) and G, and an
// instance-wide sum is a block reduction.
template <typename acc_t, int kPerThread>
struct ThreadEntries {
  acc_t y[kPerThread];
  acc_t t[kPerThread];
  const acc_t* point;
  const acc_t* G;
  acc_t* scratch;
  int K, p, n;

  template <typename F>
  __device__ __forceinline__ void for_each(F f) {
#pragma unroll
    for (int r = 0; r < kPerThread; ++r) {
      const int e = threadIdx.x + r * blockDim.x;
      if (e < n) f(e, y[r], t[r]);
    }
  }
  __device__ __forceinline__ acc_t grad(int e) const { return param_grad(point, G, K, p, e); }
  __device__ __forceinline__ acc_t sum(acc_t v) { return block_sum(v, scratch); }
};

// kPerThread: the entries of X a thread owns (registers for Y and the trial point). Small
// instances use 4 so that many blocks fit on an SM; large ones (2Kp > 4 * 512) use 16.
template <typename scalar_t, int kPerThread>
__global__ void __launch_bounds__(kMaxThreads) lpm_step_kernel(const LpmStepParams<scalar_t> P) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char shared_raw[];
  acc_t* shared = reinterpret_cast<acc_t*>(shared_raw);
  const int K = static_cast<int>(P.K), p = static_cast<int>(P.p), kp = K * p, n = 2 * kp;
  const int64_t b = blockIdx.x;
  acc_t* x = shared;
  acc_t* xp = x + n;
  acc_t* G = xp + n;
  acc_t* c = G + K * K;
  acc_t* scratch = c + K;

  for (int e = threadIdx.x; e < kp; e += blockDim.x) {
    x[e] = P.W[b * kp + e];
    x[kp + e] = P.H[b * kp + e];
    xp[e] = P.W_prev[b * kp + e];
    xp[kp + e] = P.H_prev[b * kp + e];
  }
  for (int k = threadIdx.x; k < K; k += blockDim.x) c[k] = P.weights[b * K + k];
  const acc_t eta = P.step[b];
  const acc_t rw = acc_t(K) * acc_t(P.E_W[b]), rh = acc_t(K) * acc_t(P.E_H[b]);
  acc_t theta = P.theta[b];
  __syncthreads();

  // Read once into locals, which the lambdas below capture instead of the kernel parameter.
  const bool momentum = P.momentum;
  const LpmLoss loss = P.loss;
  ThreadEntries<acc_t, kPerThread> entries;
  entries.G = G;
  entries.scratch = scratch;
  entries.K = K;
  entries.p = p;
  entries.n = n;
  for (int64_t it = 0, iters = P.num_iters; it < iters; ++it) {
    const acc_t theta_next = momentum ? lpm::next_theta(theta) : theta;
    const acc_t beta = momentum ? (theta - 1) / theta_next : acc_t(0);
    // Y = X + beta (X - X_prev) replaces X_prev (its last use); without momentum Y = X
    // and X_prev only receives the new iterate below.
    entries.for_each([&](int e, acc_t& y, acc_t&) {
      y = momentum ? x[e] + beta * (x[e] - xp[e]) : x[e];
      if (momentum) xp[e] = y;
    });
    __syncthreads();
    entries.point = momentum ? xp : x;
    logit_grad(entries.point, c, K, p, loss, G);
    const acc_t dot = lpm::projected_step(entries, x, kp, eta, rw, rh, momentum);
    // Every read of Y (shared, for the gradient) before the writes below.
    __syncthreads();
    entries.for_each([&](int e, acc_t&, acc_t& t) { xp[e] = t; });
    if (momentum) theta = dot > 0 ? acc_t(1) : theta_next;
    // xp now holds the new iterate: swap names so x is the new one, xp the previous.
    acc_t* tmp = x;
    x = xp;
    xp = tmp;
    __syncthreads();
  }

  // One more step from X gives the objective and the projected-gradient residual.
  entries.point = x;
  const acc_t objective = block_sum(logit_grad(x, c, K, p, loss, G), scratch);
  entries.for_each([&](int e, acc_t& y, acc_t&) { y = x[e]; });
  const acc_t dot = lpm::projected_step(entries, x, kp, eta, rw, rh, true);
  for (int e = threadIdx.x; e < kp; e += blockDim.x) {
    P.W_out[b * kp + e] = x[e];
    P.H_out[b * kp + e] = x[kp + e];
    P.W_prev_out[b * kp + e] = xp[e];
    P.H_prev_out[b * kp + e] = xp[kp + e];
  }
  if (threadIdx.x == 0) {
    P.theta_out[b] = theta;
    P.objective[b] = objective;
    P.pg_norm[b] = sqrt(acc_t(0) - dot) / eta;  // 0 - dot: +0, never -0, at a fixed point
  }
}

LpmStepResult lpm_step_cuda(const at::Tensor& W, const at::Tensor& H, const at::Tensor& W_prev,
                            const at::Tensor& H_prev, const at::Tensor& theta, const at::Tensor& weights,
                            const at::Tensor& E_W, const at::Tensor& E_H, const at::Tensor& step,
                            int64_t num_iters, c10::string_view loss, bool momentum) {
  COLLAPSE_DEVICE_GUARD(W);
  check_lpm_step(W, H, W_prev, H_prev, theta, weights, E_W, E_H, step, num_iters);
  const LpmLoss loss_kind = parse_lpm_loss(std::string_view(loss.data(), loss.size()));
  const int64_t B = W.size(0), K = W.size(1), p = W.size(2);
  TORCH_CHECK(2 * K * p <= kMaxEntries,
              "lpm_step on CUDA keeps an instance in shared memory and registers: it needs K * p <= ",
              kMaxEntries / 2, " (e.g. K = p = 64), got K = ", K, ", p = ", p);
  TORCH_CHECK(B <= INT_MAX, "lpm_step on CUDA runs one block per instance: B must be <= ", INT_MAX, ", got ", B);
  const auto in = lpm_step_inputs({W, H, W_prev, H_prev, theta, weights, E_W, E_H, step});
  const auto out = lpm_step_outputs(W);
  if (B == 0) return lpm_step_result(out);

  const int64_t entries = 2 * K * p;
  const int64_t wanted = (entries + kTargetPerThread - 1) / kTargetPerThread;
  const int threads = static_cast<int>(std::clamp<int64_t>((wanted + kWarp - 1) / kWarp * kWarp, kWarp, kMaxThreads));
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t shared_limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "lpm_step_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t shared_bytes = (2 * entries + K * K + K + kMaxThreads / kWarp) * int64_t(sizeof(acc_t));
    TORCH_CHECK(shared_bytes <= shared_limit, "lpm_step on CUDA needs ", shared_bytes,
                " bytes of shared memory per instance for K = ", K, ", p = ", p, " in ", W.scalar_type(),
                "; this GPU allows ", shared_limit, " (use float32, a smaller p, or the CPU)");
    const auto kernel = entries <= int64_t(threads) * kTargetPerThread ? lpm_step_kernel<scalar_t, kTargetPerThread>
                                                                       : lpm_step_kernel<scalar_t, kMaxPerThread>;
    if (shared_bytes > 48 * 1024) {
      C10_CUDA_CHECK(
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared_bytes)));
    }
    const auto P = make_lpm_step_params<scalar_t>(in, out, num_iters, loss_kind, momentum);
    kernel<<<static_cast<unsigned>(B), threads, shared_bytes, stream>>>(P);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return lpm_step_result(out);
}

}  // namespace

TORCH_LIBRARY_IMPL(collapse_ext, CUDA, m) { m.impl("lpm_step", &lpm_step_cuda); }

}  // namespace collapse_ext
