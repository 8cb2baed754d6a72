// CPU hot loops in two builds: the x86-64 baseline the extension is compiled for (SSE2)
// and AVX2 + FMA + F16C, chosen at run time (cpu_has_avx2). A loop body written as an
// always-inline template is compiled into each of two thin entry points, one marked
// COLLAPSE_TARGET_AVX2; on other compilers and architectures only the baseline exists.
// COLLAPSE_EXT_CPU_BASELINE=1 in the environment forces the baseline (the tests run both).
#pragma once

#include <cstdlib>

namespace collapse_ext {

#if defined(__x86_64__) && defined(__GNUC__)
#define COLLAPSE_AVX2_CLONES 1
#define COLLAPSE_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define COLLAPSE_ALWAYS_INLINE inline __attribute__((always_inline))
inline bool cpu_has_avx2() {
  static const bool has =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const char* baseline = std::getenv("COLLAPSE_EXT_CPU_BASELINE");
  return has && !(baseline != nullptr && baseline[0] == '1');
}
#else
#define COLLAPSE_AVX2_CLONES 0
#define COLLAPSE_ALWAYS_INLINE inline
inline bool cpu_has_avx2() { return false; }
#endif

}  // namespace collapse_ext
