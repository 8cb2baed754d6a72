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
// are deterministic. The iteration is documented in collapse_ext/_ops.py (lpm_step) and
// written out plainly in collapse_ext/reference.py (lpm_step_reference).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <string_view>

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
  const acc_t* w = x;
  const acc_t* h = x + K * p;
  for (int idx = threadIdx.x; idx < K * K; idx += blockDim.x) {
    const int k = idx / K, j = idx % K;
    acc_t s = 0;
    for (int q = 0; q < p; ++q) s += h[k * p + q] * w[j * p + q];
    G[idx] = s;
  }
  __syncthreads();
  acc_t objective = 0;
  for (int k = threadIdx.x; k < K; k += blockDim.x) {
    acc_t* z = G + k * K;
    if (loss == LpmLoss::kCrossEntropy) {
      acc_t m = z[0];
      for (int j = 1; j < K; ++j) m = max(m, z[j]);
      const acc_t zk = z[k];
      acc_t sum = 0;
      for (int j = 0; j < K; ++j) sum += (z[j] = exp(z[j] - m));
      objective += c[k] * (m + log(sum) - zk);
      for (int j = 0; j < K; ++j) z[j] = c[k] * (z[j] / sum - (j == k ? acc_t(1) : acc_t(0)));
    } else {
      acc_t sq = 0;
      for (int j = 0; j < K; ++j) {
        const acc_t r = z[j] - (j == k ? acc_t(1) : acc_t(0));
        sq += r * r;
        z[j] = c[k] * r;
      }
      objective += c[k] * acc_t(0.5) * sq;
    }
  }
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

template <typename acc_t>
__device__ __forceinline__ acc_t ball_scale(acc_t norm_sq, acc_t radius_sq) {
  return norm_sq > radius_sq ? sqrt(radius_sq / norm_sq) : acc_t(1);
}

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

  acc_t y[kPerThread], t[kPerThread];
  for (int64_t it = 0; it < P.num_iters; ++it) {
    const acc_t theta_next = P.momentum ? (1 + sqrt(1 + 4 * theta * theta)) / 2 : theta;
    const acc_t beta = P.momentum ? (theta - 1) / theta_next : acc_t(0);
    // Y = X + beta (X - X_prev) replaces X_prev (its last use); without momentum Y = X
    // and X_prev only receives the new iterate below.
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int e = threadIdx.x + i * blockDim.x;
      if (e < n) {
        y[i] = P.momentum ? x[e] + beta * (x[e] - xp[e]) : x[e];
        if (P.momentum) xp[e] = y[i];
      }
    }
    __syncthreads();
    const acc_t* yy = P.momentum ? xp : x;
    logit_grad(yy, c, K, p, P.loss, G);
    acc_t nw = 0, nh = 0;
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int e = threadIdx.x + i * blockDim.x;
      if (e < n) {
        t[i] = y[i] - eta * param_grad(yy, G, K, p, e);
        (e < kp ? nw : nh) += t[i] * t[i];
      }
    }
    nw = block_sum(nw, scratch);
    nh = block_sum(nh, scratch);
    const acc_t sw = ball_scale(nw, rw), sh = ball_scale(nh, rh);
    acc_t dot = 0;
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int e = threadIdx.x + i * blockDim.x;
      if (e < n) {
        t[i] *= e < kp ? sw : sh;
        dot += (y[i] - t[i]) * (t[i] - x[e]);
      }
    }
    // The reduction's barriers also order every read of Y above before the writes below.
    if (P.momentum) dot = block_sum(dot, scratch);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int e = threadIdx.x + i * blockDim.x;
      if (e < n) xp[e] = t[i];
    }
    if (P.momentum) theta = dot > 0 ? acc_t(1) : theta_next;
    // xp now holds the new iterate: swap names so x is the new one, xp the previous.
    acc_t* tmp = x;
    x = xp;
    xp = tmp;
    __syncthreads();
  }

  acc_t objective = block_sum(logit_grad(x, c, K, p, P.loss, G), scratch);
  acc_t nw = 0, nh = 0;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int e = threadIdx.x + i * blockDim.x;
    if (e < n) {
      t[i] = x[e] - eta * param_grad(x, G, K, p, e);
      (e < kp ? nw : nh) += t[i] * t[i];
    }
  }
  nw = block_sum(nw, scratch);
  nh = block_sum(nh, scratch);
  const acc_t sw = ball_scale(nw, rw), sh = ball_scale(nh, rh);
  acc_t pg = 0;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int e = threadIdx.x + i * blockDim.x;
    if (e < n) {
      const acc_t d = x[e] - t[i] * (e < kp ? sw : sh);
      pg += d * d;
    }
  }
  pg = block_sum(pg, scratch);
  for (int e = threadIdx.x; e < kp; e += blockDim.x) {
    P.W_out[b * kp + e] = x[e];
    P.H_out[b * kp + e] = x[kp + e];
    P.W_prev_out[b * kp + e] = xp[e];
    P.H_prev_out[b * kp + e] = xp[kp + e];
  }
  if (threadIdx.x == 0) {
    P.theta_out[b] = theta;
    P.objective[b] = objective;
    P.pg_norm[b] = sqrt(pg) / eta;
  }
}

LpmStepResult lpm_step_cuda(const at::Tensor& W, const at::Tensor& H, const at::Tensor& W_prev,
                            const at::Tensor& H_prev, const at::Tensor& theta, const at::Tensor& weights,
                            const at::Tensor& E_W, const at::Tensor& E_H, const at::Tensor& step,
                            int64_t num_iters, c10::string_view loss, bool momentum) {
  check_lpm_step(W, H, W_prev, H_prev, theta, weights, E_W, E_H, step, num_iters);
  const LpmLoss loss_kind = parse_lpm_loss(std::string_view(loss.data(), loss.size()));
  const int64_t B = W.size(0), K = W.size(1), p = W.size(2);
  TORCH_CHECK(2 * K * p <= kMaxEntries,
              "lpm_step on CUDA keeps an instance in shared memory and registers: it needs K * p <= ",
              kMaxEntries / 2, " (e.g. K = p = 64), got K = ", K, ", p = ", p);
  TORCH_CHECK(B <= INT_MAX, "lpm_step on CUDA runs one block per instance: B must be <= ", INT_MAX, ", got ", B);
  const c10::cuda::CUDAGuard guard(W.device());
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
