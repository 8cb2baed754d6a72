// Helpers shared by every backend: the host/device qualifier of math written once for
// the CPU and CUDA kernels, the dtype and bool switches the host functions launch
// through, and the float64 conversion of a stored value.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/DeviceGuard.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/ScalarType.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

// Math shared by the CPU and CUDA kernels: `COLLAPSE_HD` is empty for the host compiler
// and __host__ __device__ under nvcc; `COLLAPSE_HD_INLINE` adds the inline keyword of each
// side (forced inline on the device, where an out-of-line call would spill the caller's
// register arrays to local memory).
#ifdef __CUDACC__
#define COLLAPSE_HD __host__ __device__
#define COLLAPSE_HD_INLINE __host__ __device__ __forceinline__
#else
#define COLLAPSE_HD
#define COLLAPSE_HD_INLINE inline
#endif

// The device guard every CUDA host function opens first (guard, checks, params, launch).
// Device-generic rather than CUDAGuard: the dispatcher picks the CUDA kernel when any
// argument is on CUDA, so the tensor named here may be on the CPU, and then the named
// same-device check that follows must be what the user sees.
#define COLLAPSE_DEVICE_GUARD(tensor) const c10::OptionalDeviceGuard device_guard(at::device_of(tensor))

// One launch written once for a runtime bool, as flash-attention's BOOL_SWITCH:
//   COLLAPSE_BOOL_SWITCH(fits, kShared, [&] { kernel<kShared><<<...>>>(...); });
#define COLLAPSE_BOOL_SWITCH(COND, CONST_NAME, ...) \
  [&] {                                             \
    if (COND) {                                     \
      constexpr bool CONST_NAME = true;             \
      return __VA_ARGS__();                         \
    } else {                                        \
      constexpr bool CONST_NAME = false;            \
      return __VA_ARGS__();                         \
    }                                               \
  }()

// The dtype of a float32 or float64 tensor as a type (pairwise_stats' rows, the
// ClassStats state): COLLAPSE_FLOAT_SWITCH(rows.scalar_type(), compute_t, [&] {...}).
#define COLLAPSE_FLOAT_SWITCH(DTYPE, TYPE, ...) \
  [&] {                                           \
    if ((DTYPE) == at::kDouble) {                 \
      using TYPE = double;                        \
      return __VA_ARGS__();                       \
    } else {                                      \
      using TYPE = float;                         \
      return __VA_ARGS__();                       \
    }                                             \
  }()

// Labels are int32 or int64 (CE_CHECK_LABELS): COLLAPSE_LABEL_SWITCH(y.scalar_type(), label_t, [&] {...}).
#define COLLAPSE_LABEL_SWITCH(DTYPE, TYPE, ...) \
  [&] {                                         \
    if ((DTYPE) == at::kLong) {                 \
      using TYPE = int64_t;                     \
      return __VA_ARGS__();                     \
    } else {                                    \
      using TYPE = int32_t;                     \
      return __VA_ARGS__();                     \
    }                                           \
  }()

// The (features, labels) pair of the per-sample ops: scalar_t is the features' dtype
// (float16, bfloat16, float32, float64), label_t the labels' (int32, int64).
#define COLLAPSE_DISPATCH_FEATURES_LABELS(FEATURES_DTYPE, LABELS_DTYPE, NAME, ...)              \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, FEATURES_DTYPE, NAME,             \
                                  [&] { COLLAPSE_LABEL_SWITCH(LABELS_DTYPE, label_t, __VA_ARGS__); })

namespace collapse_ext {

// The dtype the ops round centred or shifted rows to and multiply in: float64 for
// float64 features, float32 for float16, bfloat16 and float32.
inline at::ScalarType compute_dtype(at::ScalarType features) {
  return features == at::kDouble ? at::kDouble : at::kFloat;
}
template <typename scalar_t>
using compute_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// A stored feature in float64, through its op-math type (float for fp16/bf16).
template <typename scalar_t>
COLLAPSE_HD_INLINE double to_double(scalar_t v) {
  return static_cast<double>(static_cast<at::opmath_type<scalar_t>>(v));
}

// exp, log, sqrt of the accumulation type on either side: the C functions for each
// precision (std:: overloads are host-only, and ::exp would widen a float to double).
COLLAPSE_HD_INLINE float hd_exp(float v) { return expf(v); }
COLLAPSE_HD_INLINE double hd_exp(double v) { return exp(v); }
COLLAPSE_HD_INLINE float hd_log(float v) { return logf(v); }
COLLAPSE_HD_INLINE double hd_log(double v) { return log(v); }
COLLAPSE_HD_INLINE float hd_sqrt(float v) { return sqrtf(v); }
COLLAPSE_HD_INLINE double hd_sqrt(double v) { return sqrt(v); }

template <typename T>
COLLAPSE_HD_INLINE T hd_max(T a, T b) {
  return b > a ? b : a;
}

}  // namespace collapse_ext
