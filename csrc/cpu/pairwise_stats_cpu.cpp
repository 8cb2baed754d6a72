// Pairwise statistics over the rows of a (K, d) matrix on the CPU: cosines, the simplex-
// ETF gap, log/Riesz kernels on the unit sphere, CDNV terms and Gram energy, reduced to
// a float64 vector (collapse_ext.reference.PAIRWISE_FIELDS) without holding K x K.
//
// The upper triangle of the Gram matrix is formed one (T, T) tile at a time through
// BLAS (at::mm: MKL/OpenBLAS beat any hand loop) and reduced in C++ straight after, while
// the tile is still in cache. Memory is O(K d + threads T^2). Tile pairs are the unit of
// parallel work; their results are folded in a fixed order and the tile size depends on
// K alone, so the result does not depend on the number of threads.
//
// The per-pair reduction (pairwise::add_pair) needs a float64 log and a sqrt or division
// per pair; as scalar libm calls they cost more than the tile's GEMM. On x86-64 CPUs with
// AVX2+FMA (checked at run time) it runs on 4 lanes at once instead: vector types, masks
// for add_pair's branches, the log computed inline. Elsewhere the plain add_pair loop runs
// (the same build: no -march flags).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "../checks.h"
#include "../common.h"
#include "simd.h"
#include "../pairwise_stats.h"

namespace collapse_ext {
namespace {

using pairwise::kNumFields;

// At most 512 x 512 fp32 = 1 MiB per tile: it stays in L2 between the GEMM and the
// reduction. Smaller tiles for small K, so that 2-8 threads all get tile pairs.
constexpr int64_t kMaxTile = 512;

using ReduceTileFn = void (*)(const void*, int64_t, int64_t, int64_t, int64_t, bool, const double*, const double*,
                              const double*, const pairwise::Params&, double*);

// Reduces one (ti, tj) Gram tile whose rows start at i0 and columns at j0 into `out`
// (only c > r on a diagonal tile), row by row with pairwise::add_pair.
template <typename compute_t>
void reduce_tile_scalar(const void* tile, int64_t ti, int64_t tj, int64_t i0, int64_t j0, bool diagonal,
                        const double* sq, const double* inv, const double* var, const pairwise::Params& params,
                        double* out) {
  const compute_t* gram = static_cast<const compute_t*>(tile);
  pairwise::init(out);
  for (int64_t r = 0; r < ti; ++r) {
    // A local accumulator the compiler keeps in registers (a pointer into `out` might
    // alias the inputs and force a store per field per pair).
    double acc[kNumFields];
    pairwise::init(acc);
    const int64_t i = i0 + r;
    const compute_t* g = gram + r * tj;
    const double sq_i = sq[i], inv_i = inv[i], var_i = var ? var[i] : 0.0;
    for (int64_t c = diagonal ? r + 1 : 0; c < tj; ++c) {
      const int64_t j = j0 + c;
      pairwise::add_pair(acc, static_cast<double>(g[c]), sq_i, sq[j], inv_i, inv[j], var_i, var ? var[j] : 0.0,
                         params);
    }
    pairwise::merge(out, acc);
  }
}

#if COLLAPSE_AVX2_CLONES
// 32-byte vectors only cross always-inlined calls (taken by reference), so GCC's ABI
// warning for returning them when AVX is off in the caller concerns no real call.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace lanes {

constexpr int kLanes = 4;
using vd = double __attribute__((vector_size(kLanes * sizeof(double))));
using vu = uint64_t __attribute__((vector_size(kLanes * sizeof(double))));
using vm = decltype(vd{} < vd{});  // a lane mask: all bits set or none

COLLAPSE_ALWAYS_INLINE vd splat(double x) { return vd{} + x; }
COLLAPSE_ALWAYS_INLINE vd load(const double* p) {
  vd v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
COLLAPSE_ALWAYS_INLINE vd pick(const vm& m, const vd& a, const vd& b) { return m ? a : b; }
// pick(m, a, 0) as one and; a masked-off NaN or inf gives +0 too.
COLLAPSE_ALWAYS_INLINE vd keep(const vm& m, const vd& a) { return (vd)((vu)a & (vu)m); }
// The lane forms of pairwise::lo/hi: the same compares, so NaN lanes behave the same.
COLLAPSE_ALWAYS_INLINE vd lo(const vd& a, const vd& b) { return b < a ? b : a; }
COLLAPSE_ALWAYS_INLINE vd hi(const vd& a, const vd& b) { return b > a ? b : a; }
COLLAPSE_ALWAYS_INLINE vd abs(const vd& x) { return (vd)((vu)x & 0x7fffffffffffffffULL); }

// log(x) for positive normal x, within 0.75 ulp (glibc: 0.52). fdlibm's/musl's method:
// x = 2^e m with m in [sqrt(1/2), sqrt(2)) straight from the bits (one offset add makes
// the exponent step at sqrt(2)), then log(m) = 2 atanh(s), s = (m - 1) / (m + 1), as an
// odd series to s^21 (|s| < 0.172: the next term is below 1e-18 of the result).
COLLAPSE_ALWAYS_INLINE vd log_pos(const vd& x) {
  constexpr uint64_t kSqrtHalf = 0x3fe6a09e667f3bcdULL;
  const vu bits = (vu)x + (0x3ff0000000000000ULL - kSqrtHalf);
  // The biased exponent as a double without an int64 conversion (none in AVX2):
  // 2^52 + n has the bits of 2^52 with n in the low mantissa bits.
  const vd e = (vd)((bits >> 52) | 0x4330000000000000ULL) - (0x1p52 + 1023.0);
  const vd f = (vd)((bits & 0x000fffffffffffffULL) + kSqrtHalf) - 1.0;  // exact
  const vd s = f / (2.0 + f), z = s * s;
  vd q = splat(2.0 / 21);
  for (double c : {2.0 / 19, 2.0 / 17, 2.0 / 15, 2.0 / 13, 2.0 / 11, 2.0 / 9, 2.0 / 7, 2.0 / 5, 2.0 / 3}) q = q * z + c;
  // log(1 + f) = f - hfsq + s (hfsq + z q): f is exact and carries the bulk; ln 2 is split
  // so that e ln2_hi is exact (fdlibm's constants).
  const vd hfsq = 0.5 * f * f;
  return e * 6.93147180369123816490e-01 + (f - (hfsq - (s * (hfsq + z * q) + e * 1.90821492927058770002e-10)));
}

// Lane-wise libm call, for the unusual exponents only.
template <typename F>
COLLAPSE_ALWAYS_INLINE vd each(const vd& x, F f) {
  vd y;
  for (int l = 0; l < kLanes; ++l) y[l] = f(x[l]);
  return y;
}

enum : int { kRieszAny, kRieszOne, kRieszTwo };  // riesz_s
enum : int { kNoCdnv, kCdnvOne, kCdnvAny };      // variances, cdnv_p

// One (ti, tj) Gram tile whose rows start at i0 and columns at j0, into `out` (only
// c > r on a diagonal tile): pairwise::add_pair for every pair, kLanes columns at a time.
// Masks replace add_pair's branches: a lane outside the pair range or failing a test
// adds 0 (or the min/max identity), and the log gets 1 there, so nothing non-finite is
// formed. Each lane sums its own columns; the lanes are folded in order at the end.
template <typename compute_t, int kRiesz, int kCdnv>
COLLAPSE_ALWAYS_INLINE void reduce_tile(const compute_t* gram, int64_t ti, int64_t tj, int64_t i0, int64_t j0, bool diagonal,
                                const double* sq, const double* inv, const double* var, const pairwise::Params& p,
                                double* out) {
  // The columns' values and one Gram row in float64, padded to whole lane groups.
  alignas(32) double dot_row[kMaxTile + kLanes] = {}, sq_col[kMaxTile + kLanes] = {};
  alignas(32) double inv_col[kMaxTile + kLanes] = {}, var_col[kMaxTile + kLanes] = {};
  for (int64_t c = 0; c < tj; ++c) {
    sq_col[c] = sq[j0 + c];
    inv_col[c] = inv[j0 + c];
    if constexpr (kCdnv != kNoCdnv) var_col[c] = var[j0 + c];
  }
  const vd zero = splat(0.0), one = splat(1.0), inf = splat(INFINITY);
  vd acc[kNumFields];
  for (int f = 0; f < kNumFields; ++f) acc[f] = splat(pairwise::identity(f));
  vd column = {};
  for (int l = 0; l < kLanes; ++l) column[l] = l;
  double pairs = 0.0;
  for (int64_t r = 0; r < ti; ++r) {
    const int64_t begin = diagonal ? r + 1 : 0;
    if (begin >= tj) continue;
    pairs += static_cast<double>(tj - begin);
    const int64_t first = begin / kLanes * kLanes;
    const compute_t* g = gram + r * tj;
    for (int64_t c = first; c < tj; ++c) dot_row[c] = static_cast<double>(g[c]);
    const int64_t i = i0 + r;
    const vd sq_i = splat(sq[i]), inv_i = splat(inv[i]);
    const vd var_i = splat(kCdnv != kNoCdnv ? var[i] : 0.0);
    for (int64_t c = first; c < tj; c += kLanes) {
      const vd col = column + static_cast<double>(c);
      const vm in_range = (col >= static_cast<double>(begin)) & (col < static_cast<double>(tj));
      const vd dot = load(dot_row + c), sq_k = load(sq_col + c), inv_k = load(inv_col + c);
      const vd dist_sq = hi(sq_i + sq_k - 2.0 * dot, zero);
      acc[pairwise::kDistSqMax] = hi(acc[pairwise::kDistSqMax], pick(in_range, dist_sq, -inf));
      acc[pairwise::kDotSqSum] += keep(in_range, dot * dot);
      const vm apart = dist_sq > p.tol * (sq_i + sq_k);
      acc[pairwise::kCoincident] += keep(in_range & ~apart, one);
      if constexpr (kCdnv != kNoCdnv) {
        const vd denom = kCdnv == kCdnvOne ? dist_sq : each(dist_sq, [&](double x) { return std::pow(x, p.cdnv_p); });
        acc[pairwise::kCdnvSum] += keep(in_range & apart, (var_i + load(var_col + c)) / (2.0 * denom));
      }
      const vm has_cos = in_range & (inv_i != zero) & (inv_k != zero);
      const vd cos = lo(hi(dot * inv_i * inv_k, splat(-1.0)), one);
      acc[pairwise::kCosPairs] += keep(has_cos, one);
      acc[pairwise::kCosSum] += keep(has_cos, cos);
      acc[pairwise::kCosMin] = lo(acc[pairwise::kCosMin], pick(has_cos, cos, inf));
      acc[pairwise::kCosMax] = hi(acc[pairwise::kCosMax], pick(has_cos, cos, -inf));
      const vd shifted = cos + p.etf_shift;
      acc[pairwise::kEtfAbsSum] += keep(has_cos, abs(shifted));
      acc[pairwise::kEtfSqSum] += keep(has_cos, shifted * shifted);
      const vd unit_sq = hi(2.0 - 2.0 * cos, zero);
      const vm kernel = has_cos & (unit_sq > 2.0 * p.tol);
      const vd u = pick(kernel, unit_sq, one);
      const vd lg = -0.5 * log_pos(u);
      vd riesz;
      if constexpr (kRiesz == kRieszOne) {
        riesz = 1.0 / each(u, [](double x) { return std::sqrt(x); });  // vsqrtpd with -fno-math-errno
      } else if constexpr (kRiesz == kRieszTwo) {
        riesz = 1.0 / u;
      } else {
        riesz = each(p.riesz_s * lg, [](double x) { return std::exp(x); });
      }
      acc[pairwise::kKernelPairs] += keep(kernel, one);
      acc[pairwise::kLogSum] += keep(kernel, lg);
      acc[pairwise::kLogSqSum] += keep(kernel, lg * lg);
      acc[pairwise::kRieszSum] += keep(kernel, riesz);
      acc[pairwise::kRieszSqSum] += keep(kernel, riesz * riesz);
    }
  }
  for (int f = 0; f < kNumFields; ++f) {
    out[f] = pairwise::identity(f);
    for (int l = 0; l < kLanes; ++l) out[f] = pairwise::fold(f, out[f], acc[f][l]);
  }
  out[pairwise::kPairs] = pairs;
}

// The loop inlined into an AVX2+FMA function (the only place it is compiled).
template <typename compute_t, int kRiesz, int kCdnv>
COLLAPSE_TARGET_AVX2 void reduce_tile_avx2(const void* gram, int64_t ti, int64_t tj, int64_t i0,
                                                          int64_t j0, bool diagonal, const double* sq,
                                                          const double* inv, const double* var,
                                                          const pairwise::Params& p, double* out) {
  reduce_tile<compute_t, kRiesz, kCdnv>(static_cast<const compute_t*>(gram), ti, tj, i0, j0, diagonal, sq, inv, var,
                                        p, out);
}

template <typename compute_t, int kRiesz>
ReduceTileFn pick_cdnv(const pairwise::Params& p) {
  if (!p.has_variances) return &reduce_tile_avx2<compute_t, kRiesz, kNoCdnv>;
  if (p.cdnv_p == 1.0) return &reduce_tile_avx2<compute_t, kRiesz, kCdnvOne>;
  return &reduce_tile_avx2<compute_t, kRiesz, kCdnvAny>;
}

template <typename compute_t>
ReduceTileFn pick_reduce_tile(const pairwise::Params& p) {
  if (p.riesz_s == 1.0) return pick_cdnv<compute_t, kRieszOne>(p);
  return p.riesz_s == 2.0 ? pick_cdnv<compute_t, kRieszTwo>(p) : pick_cdnv<compute_t, kRieszAny>(p);
}

}  // namespace lanes
#endif

// The lane loop where the CPU has AVX2+FMA (cpu_has_avx2: not with
// COLLAPSE_EXT_CPU_BASELINE=1, so the tests run both); add_pair pair by pair elsewhere.
template <typename compute_t>
ReduceTileFn pick_reduce_tile(const pairwise::Params& p) {
#if COLLAPSE_AVX2_CLONES
  if (cpu_has_avx2()) return lanes::pick_reduce_tile<compute_t>(p);
#endif
  return &reduce_tile_scalar<compute_t>;
}

// Squared norms and inverse norms in float64, row by row (a float64 copy of the rows
// would double the memory).
template <typename compute_t>
void row_norms_kernel(const compute_t* a, int64_t m, int64_t d, double* sq, double* inv) {
  at::parallel_for(0, m, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      double acc = 0.0;
      for (int64_t c = 0; c < d; ++c) acc += static_cast<double>(a[r * d + c]) * static_cast<double>(a[r * d + c]);
      sq[r] = acc;
      inv[r] = acc > 0.0 ? 1.0 / std::sqrt(acc) : 0.0;
    }
  });
}

at::Tensor pairwise_stats_cpu(const at::Tensor& rows, const std::optional<at::Tensor>& variances,
                              const std::optional<at::Tensor>& subset, double riesz_s, double cdnv_p) {
  check_pairwise_inputs(rows, variances, subset, riesz_s, cdnv_p);
  const auto selected = pairwise_rows(rows, variances, subset);
  const at::Tensor &a = selected.first, &v = selected.second;
  const auto compute = a.scalar_type();
  const int64_t m = a.size(0);
  auto out = at::empty({kNumFields}, rows.options().dtype(at::kDouble));
  double* result = out.data_ptr<double>();
  pairwise::init(result);
  if (m < 2) return out;

  std::vector<double> sq_v(m), inv_v(m);
  COLLAPSE_FLOAT_SWITCH(compute, compute_t, [&] {
    row_norms_kernel<compute_t>(a.const_data_ptr<compute_t>(), m, a.size(1), sq_v.data(), inv_v.data());
  });
  const double* sq = sq_v.data();
  const double* inv = inv_v.data();
  const double* var = v.defined() ? v.const_data_ptr<double>() : nullptr;
  const double eps = compute == at::kDouble ? std::numeric_limits<double>::epsilon()
                                            : static_cast<double>(std::numeric_limits<float>::epsilon());
  const pairwise::Params params{1.0 / static_cast<double>(m - 1), riesz_s, cdnv_p, v.defined(), 4.0 * eps};
  const ReduceTileFn reduce_tile = COLLAPSE_FLOAT_SWITCH(
      compute, compute_t, [&] { return pick_reduce_tile<compute_t>(params); });

  // One parallel region over the tile pairs (i <= j): each thread multiplies its own
  // tiles with a single-threaded GEMM and reduces them. One region instead of one per
  // tile avoids thousands of barriers (and OpenMP spin-waits on a shared machine).
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t tile = std::clamp<int64_t>((m + 7) / 8, 64, kMaxTile);
  const int64_t tiles = (m + tile - 1) / tile;
  std::vector<std::pair<int64_t, int64_t>> jobs;
  for (int64_t bi = 0; bi < tiles; ++bi)
    for (int64_t bj = bi; bj < tiles; ++bj) jobs.emplace_back(bi * tile, bj * tile);
  std::vector<double> job_acc(jobs.size() * kNumFields);
  // Threads take the next tile pair from a counter (dynamic scheduling): on a shared
  // machine a static split leaves the op waiting for whichever thread lost its core.
  std::atomic<int64_t> next{0};
  const int64_t num_jobs = static_cast<int64_t>(jobs.size());
  at::parallel_for(0, std::min(threads, num_jobs), 1, [&](int64_t, int64_t) {
    auto gram = at::empty({tile * tile}, a.options());
    for (int64_t b = next++; b < num_jobs; b = next++) {
      const int64_t i0 = jobs[b].first, j0 = jobs[b].second;
      const int64_t ti = std::min(tile, m - i0), tj = std::min(tile, m - j0);
      at::Tensor g = gram.narrow(0, 0, ti * tj).view({ti, tj});
      at::mm_out(g, a.narrow(0, i0, ti), a.narrow(0, j0, tj).t());
      reduce_tile(g.const_data_ptr(), ti, tj, i0, j0, i0 == j0, sq, inv, var, params, job_acc.data() + b * kNumFields);
    }
  });
  // Folded in job order: the result does not depend on the number of threads.
  for (size_t b = 0; b < jobs.size(); ++b) pairwise::merge(result, job_acc.data() + b * kNumFields);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(collapse_ext, CPU, m) { m.impl("pairwise_stats", &pairwise_stats_cpu); }

}  // namespace collapse_ext
