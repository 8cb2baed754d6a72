// class_accumulate on the CPU (see csrc/class_accumulate.h for the contract), in the
// steps of the CUDA backend, with the same names:
//   1. first_rows_kernel: the first row with a bad label, and a slot for each class with
//      no row yet (the row of `fresh` holding its shift);
//   2. fresh_sums_kernel (column blocks): float64 sums of the new classes' rows, whose
//      means, rounded to the state dtype, become their shifts;
//   3. centre_kernel: the rows grouped by class (a counting sort), a class's rows cut
//      into pieces of at most n / (4 threads) rows, the pieces dealt to the threads in
//      row-balanced runs; each row centred in float64 (written rounded to the compute
//      dtype when `centred` is wanted), its squared norm, whether it is finite, and the
//      piece's float64 sum of its rows in a scratch row (not for a class with one row in
//      the batch); nothing is modified until every row has passed the checks;
//   4. accumulate_kernel: if the batch passed, each class's pieces added to its sums row
//      (one rounding to the state dtype per class and batch; a one-row class centred
//      again and added) and the new classes' means rows written; else `centred` zeroed.
// The grouping is csrc/cpu/class_grouping.h; the loops come in two builds (simd.h).
// Grouping by class reads each class's shift once per piece, not once per row, and reads
// the batch once: at K = 50257 with Zipfian labels the earlier row-parallel pass plus a
// column-blocked second pass over the batch read each shift row twice per row.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "../class_accumulate.h"
#include "../common.h"
#include "class_grouping.h"
#include "simd.h"

namespace collapse_ext {
namespace {

using grouping::Grouping;
using grouping::piece_shift;
using grouping::prefetch_row;

constexpr int64_t kMinParallelElements = 1 << 18;  // below this, waking a second thread costs more than it saves
constexpr int64_t kScratchKeepBytes = 64 << 20;     // the caller thread keeps a scratch up to this size

// Column blocks, one per thread: no two threads touch one element of a (fresh, d) sum.
// add_columns(j0, j1) handles columns [j0, j1) of every row.
template <typename F>
void by_columns(int64_t n, int64_t d, F add_columns) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t block =
      std::max<int64_t>(1, n * d >= kMinParallelElements ? std::max<int64_t>(16, (d + threads - 1) / threads) : d);
  at::parallel_for(0, (d + block - 1) / block, 1, [&](int64_t b0, int64_t b1) {
    add_columns(b0 * block, std::min(d, b1 * block));
  });
}

// Step 1. slot[i]: the row of `fresh` of row i's class when that class has no row yet
// (counts_k + pending_k == 0), -1 otherwise; fresh_class[s]: the class of slot s.
// Returns the first row with a label outside [0, K), -1 when there is none.
template <typename label_t>
int64_t first_rows_kernel(const label_t* y, int64_t n, int64_t num_classes, const int64_t* counts,
                          const int64_t* pending, std::vector<int64_t>& slot, std::vector<int64_t>& fresh_class) {
  std::unordered_map<int64_t, int64_t> slot_of;
  int64_t bad_label = -1;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = static_cast<int64_t>(y[i]);
    if (k < 0 || k >= num_classes) {
      if (bad_label < 0) bad_label = i;
      continue;
    }
    if (counts[k] + pending[k] != 0) continue;
    const auto [it, added] = slot_of.emplace(k, static_cast<int64_t>(fresh_class.size()));
    if (added) fresh_class.push_back(k);
    slot[i] = it->second;
  }
  return bad_label;
}

// Step 2. The shift of each new class: the mean of its rows in this batch (float64 sums,
// rounded once to the state dtype). A single row would leave a rank-one spike of d times
// the within-class variance in the float32 products, which costs digits until the next fold.
template <typename scalar_t, typename state_t>
std::vector<state_t> fresh_sums_kernel(const scalar_t* x, int64_t row_stride, int64_t n, int64_t d,
                                       const std::vector<int64_t>& slot, int64_t fresh_rows) {
  std::vector<double> fresh_sum(fresh_rows * d, 0.0), fresh_count(fresh_rows, 0.0);
  for (int64_t i = 0; i < n; ++i)
    if (slot[i] >= 0) fresh_count[slot[i]] += 1.0;
  if (fresh_rows > 0)
    by_columns(n, d, [&](int64_t j0, int64_t j1) {
      for (int64_t i = 0; i < n; ++i) {
        if (slot[i] < 0) continue;
        double* sum = fresh_sum.data() + slot[i] * d;
        const scalar_t* row = x + i * row_stride;
        for (int64_t j = j0; j < j1; ++j) sum[j] += to_double(row[j]);
      }
    });
  std::vector<state_t> fresh(fresh_rows * d);
  for (int64_t r = 0; r < fresh_rows; ++r)
    for (int64_t j = 0; j < d; ++j) fresh[r * d + j] = static_cast<state_t>(fresh_sum[r * d + j] / fresh_count[r]);
  return fresh;
}

// Four float64 lanes (GCC/Clang vector extension: two SSE2 registers in the baseline
// build, one AVX2 register in the other). Loops written this way vectorise without
// reassociation flags, which GCC's vectoriser needs for a plain float reduction.
// The helpers are always inlined, so the baseline build's warning about passing such a
// vector by value (an ABI that differs with AVX) does not apply.
#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
typedef double f64x4 __attribute__((vector_size(32)));

template <typename T>
COLLAPSE_ALWAYS_INLINE f64x4 load_f64x4(const T* p) {
  return f64x4{to_double(p[0]), to_double(p[1]), to_double(p[2]), to_double(p[3])};
}

// Step 3 for the rows order[r0 .. r1) of one piece, all about the shift c: each row
// centred (and written when `centred` is wanted), its squared norm and finiteness, and
// with kSum their sum in acc (d float64, zeroed here).
template <bool kSum, typename scalar_t, typename state_t, typename compute_t>
COLLAPSE_ALWAYS_INLINE void centre_rows_body(const scalar_t* x, int64_t row_stride, int64_t d, const int64_t* order,
                                             int64_t r0, int64_t r1, const state_t* __restrict__ c,
                                             compute_t* centred, double* sq, char* finite, double* __restrict__ acc) {
  if constexpr (kSum) std::fill(acc, acc + d, 0.0);
  const int64_t body = d - d % 8;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t i = order[r];
    const scalar_t* __restrict__ row = x + i * row_stride;
    // probe is NaN iff some feature is NaN or Inf.
    f64x4 s0 = {}, s1 = {}, p0 = {}, p1 = {};
    for (int64_t j = 0; j < body; j += 8) {
      const f64x4 va = load_f64x4(row + j), vb = load_f64x4(row + j + 4);
      const f64x4 ea = va - load_f64x4(c + j), eb = vb - load_f64x4(c + j + 4);
      s0 += ea * ea;
      s1 += eb * eb;
      p0 += va * 0.0;
      p1 += vb * 0.0;
      if constexpr (!kSum) continue;
      f64x4 aa, ab;
      std::memcpy(&aa, acc + j, sizeof aa);
      std::memcpy(&ab, acc + j + 4, sizeof ab);
      aa += ea;
      ab += eb;
      std::memcpy(acc + j, &aa, sizeof aa);
      std::memcpy(acc + j + 4, &ab, sizeof ab);
    }
    const f64x4 sv = s0 + s1, pv = p0 + p1;
    double s = (sv[0] + sv[1]) + (sv[2] + sv[3]), probe = (pv[0] + pv[1]) + (pv[2] + pv[3]);
    for (int64_t j = body; j < d; ++j) {
      const double v = to_double(row[j]);
      const double e = v - static_cast<double>(c[j]);
      s += e * e;
      probe += v * 0.0;
      if constexpr (kSum) acc[j] += e;
    }
    sq[i] = s;
    finite[i] = probe == 0.0;
    if (centred != nullptr) {
      compute_t* __restrict__ out = centred + i * d;
      for (int64_t j = 0; j < d; ++j) out[j] = static_cast<compute_t>(to_double(row[j]) - static_cast<double>(c[j]));
    }
  }
}

// acc == nullptr: a piece of one row, whose class has no other piece (the row is added
// to its sums row directly in step 4, which saves writing and reading back d float64).
template <typename scalar_t, typename state_t, typename compute_t>
void centre_rows_base(const scalar_t* x, int64_t row_stride, int64_t d, const int64_t* order, int64_t r0, int64_t r1,
                      const state_t* c, compute_t* centred, double* sq, char* finite, double* acc) {
  if (acc == nullptr)
    centre_rows_body<false>(x, row_stride, d, order, r0, r1, c, centred, sq, finite, acc);
  else
    centre_rows_body<true>(x, row_stride, d, order, r0, r1, c, centred, sq, finite, acc);
}

#if COLLAPSE_AVX2_CLONES
template <typename scalar_t, typename state_t, typename compute_t>
COLLAPSE_TARGET_AVX2 void centre_rows_avx2(const scalar_t* x, int64_t row_stride, int64_t d, const int64_t* order,
                                           int64_t r0, int64_t r1, const state_t* c, compute_t* centred, double* sq,
                                           char* finite, double* acc) {
  if (acc == nullptr)
    centre_rows_body<false>(x, row_stride, d, order, r0, r1, c, centred, sq, finite, acc);
  else
    centre_rows_body<true>(x, row_stride, d, order, r0, r1, c, centred, sq, finite, acc);
}
#endif

// Step 3. sums: row p of the scratch, the float64 sum of piece p's centred rows.
template <typename scalar_t, typename state_t, typename compute_t>
void centre_kernel(const scalar_t* x, int64_t row_stride, int64_t d, const Grouping& g, const state_t* means,
                   const std::vector<int64_t>& slot, const std::vector<state_t>& fresh, compute_t* centred,
                   std::vector<double>& sq, std::vector<char>& finite, double* sums, bool parallel) {
  const int64_t runs = static_cast<int64_t>(g.run_start.size()) - 1;
  auto centre_rows = centre_rows_base<scalar_t, state_t, compute_t>;
#if COLLAPSE_AVX2_CLONES
  if (cpu_has_avx2()) centre_rows = centre_rows_avx2<scalar_t, state_t, compute_t>;
#endif
  auto run = [&](int64_t t0, int64_t t1) {
    for (int64_t p = g.run_start[t0]; p < g.run_start[t1]; ++p) {
      if (p + 1 < g.run_start[t1]) {
        prefetch_row(piece_shift(g, p + 1, d, means, slot, fresh), d);
        prefetch_row(x + g.order[g.start[p + 1]] * row_stride, d);
      }
      centre_rows(x, row_stride, d, g.order.data(), g.start[p], g.start[p + 1], piece_shift(g, p, d, means, slot, fresh),
                  centred, sq.data(), finite.data(), g.lone(p) ? nullptr : sums + p * d);
    }
  };
  if (parallel)
    at::parallel_for(0, runs, 1, run);
  else
    run(0, runs);
}

// Step 4: the pieces p0 .. p1 of one class summed in float64 and added to its sums row;
// a lone row (row != nullptr) is centred again about c and added.
template <typename scalar_t, typename state_t>
COLLAPSE_ALWAYS_INLINE void add_pieces_body(const double* __restrict__ piece_sums, int64_t p0, int64_t p1, int64_t d,
                                            const scalar_t* __restrict__ row, const state_t* __restrict__ c,
                                            state_t* __restrict__ sum) {
  if (row != nullptr) {
    for (int64_t j = 0; j < d; ++j) sum[j] += static_cast<state_t>(to_double(row[j]) - static_cast<double>(c[j]));
    return;
  }
  if (p1 == p0 + 1) {
    const double* a = piece_sums + p0 * d;
    for (int64_t j = 0; j < d; ++j) sum[j] += static_cast<state_t>(a[j]);
    return;
  }
  for (int64_t j = 0; j < d; ++j) {
    double add = 0.0;
    for (int64_t r = p0; r < p1; ++r) add += piece_sums[r * d + j];
    sum[j] += static_cast<state_t>(add);
  }
}

template <typename scalar_t, typename state_t>
void add_pieces_base(const double* piece_sums, int64_t p0, int64_t p1, int64_t d, const scalar_t* row,
                     const state_t* c, state_t* sum) {
  add_pieces_body(piece_sums, p0, p1, d, row, c, sum);
}

#if COLLAPSE_AVX2_CLONES
template <typename scalar_t, typename state_t>
COLLAPSE_TARGET_AVX2 void add_pieces_avx2(const double* piece_sums, int64_t p0, int64_t p1, int64_t d,
                                          const scalar_t* row, const state_t* c, state_t* sum) {
  add_pieces_body(piece_sums, p0, p1, d, row, c, sum);
}
#endif

// Step 4, for an accepted batch: every row has a shift; the pieces of one class are
// summed in float64 and added to its sums row once.
template <typename scalar_t, typename label_t, typename state_t>
void accumulate_kernel(const scalar_t* x, int64_t row_stride, const label_t* y, int64_t n, int64_t d,
                       const Grouping& g, const double* piece_sums, const std::vector<double>& sq,
                       const std::vector<int64_t>& slot, const std::vector<state_t>& fresh,
                       const std::vector<int64_t>& fresh_class, state_t* means, int64_t* pending, state_t* sums,
                       double* sqsums) {
  auto add_pieces = add_pieces_base<scalar_t, state_t>;
#if COLLAPSE_AVX2_CLONES
  if (cpu_has_avx2()) add_pieces = add_pieces_avx2<scalar_t, state_t>;
#endif
  // Classes own disjoint sums rows: runs of whole classes go to the threads.
  const int64_t pieces = static_cast<int64_t>(g.piece_class.size());
  std::vector<int64_t> class_start;
  for (int64_t p = 0; p < pieces; ++p)
    if (p == 0 || g.piece_class[p] != g.piece_class[p - 1]) class_start.push_back(p);
  class_start.push_back(pieces);
  const int64_t classes = static_cast<int64_t>(class_start.size()) - 1;
  const int64_t grain = std::max<int64_t>(1, kMinParallelElements / std::max<int64_t>(d, 1));
  at::parallel_for(0, classes, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t p0 = class_start[c], p1 = class_start[c + 1];
      if (c + 1 < c1) {
        const int64_t next = class_start[c + 1];
        prefetch_row(sums + g.piece_class[next] * d, d);
        if (g.lone(next)) {
          prefetch_row(piece_shift(g, next, d, static_cast<const state_t*>(means), slot, fresh), d);
          prefetch_row(x + g.order[g.start[next]] * row_stride, d);
        }
      }
      const scalar_t* row = g.lone(p0) ? x + g.order[g.start[p0]] * row_stride : nullptr;
      add_pieces(piece_sums, p0, p1, d, row, piece_shift(g, p0, d, static_cast<const state_t*>(means), slot, fresh),
                 sums + g.piece_class[p0] * d);
    }
  });
  for (size_t r = 0; r < fresh_class.size(); ++r) std::copy_n(fresh.data() + r * d, d, means + fresh_class[r] * d);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = static_cast<int64_t>(y[i]);
    pending[k] += 1;
    sqsums[k] += sq[i];
  }
}

// The scratch of the piece sums: the calling thread's buffer, kept between calls up to
// kScratchKeepBytes (a fresh allocation of this size would page-fault on every batch).
double* piece_scratch(size_t elements, std::vector<double>& own) {
  thread_local std::vector<double> kept;
  if (elements * sizeof(double) > static_cast<size_t>(kScratchKeepBytes)) {
    own.resize(elements);
    return own.data();
  }
  if (kept.size() < elements) kept.resize(elements);
  return kept.data();
}

std::tuple<at::Tensor, at::Tensor> class_accumulate_cpu(const at::Tensor& features, const at::Tensor& labels,
                                                        const at::Tensor& counts, at::Tensor& means,
                                                        at::Tensor& pending, at::Tensor& sums, at::Tensor& sqsums,
                                                        double limit, bool return_centred) {
  auto a = class_accumulate_args(features, labels, counts, means, pending, sums, sqsums, return_centred);
  const int64_t n = a.n, d = a.d, k = a.num_classes;
  COLLAPSE_DISPATCH_FEATURES_LABELS(a.x.scalar_type(), a.y.scalar_type(), "class_accumulate_cpu", [&] {
    const scalar_t* x = a.x.const_data_ptr<scalar_t>();
    const label_t* y = a.y.const_data_ptr<label_t>();
    compute_type<scalar_t>* centred = return_centred ? a.centred.data_ptr<compute_type<scalar_t>>() : nullptr;
    COLLAPSE_FLOAT_SWITCH(means.scalar_type(), state_t, [&] {
      std::vector<int64_t> slot(n, -1), fresh_class;
      const int64_t bad_label = first_rows_kernel(y, n, k, counts.const_data_ptr<int64_t>(),
                                                  pending.const_data_ptr<int64_t>(), slot, fresh_class);
      const auto fresh =
          fresh_sums_kernel<scalar_t, state_t>(x, a.x.stride(0), n, d, slot, static_cast<int64_t>(fresh_class.size()));
      const bool parallel = n * d >= kMinParallelElements && !at::in_parallel_region();
      const Grouping g = grouping::group_rows(y, n, k, parallel ? std::max<int64_t>(1, at::get_num_threads()) : 1);
      std::vector<double> sq(n, 0.0), own;
      std::vector<char> finite(n, 1);
      double* piece_sums = piece_scratch(g.piece_class.size() * d, own);
      centre_kernel(x, a.x.stride(0), d, g, means.const_data_ptr<state_t>(), slot, fresh, centred, sq, finite,
                    piece_sums, parallel);

      int64_t bad_row = -1;
      double peak = 0.0;
      for (int64_t i = 0; i < n; ++i) {
        if (!finite[i]) {
          if (bad_row < 0) bad_row = i;
        } else {
          peak = std::max(peak, std::isnan(sq[i]) ? std::numeric_limits<double>::infinity() : sq[i]);
        }
      }
      const bool accepted = bad_label < 0 && bad_row < 0 && peak <= limit;
      double* status = a.status.data_ptr<double>();
      status[0] = accepted ? 1.0 : 0.0;
      status[1] = peak;
      status[2] = static_cast<double>(bad_label);
      status[3] = static_cast<double>(bad_row);
      if (accepted)
        accumulate_kernel(x, a.x.stride(0), y, n, d, g, piece_sums, sq, slot, fresh, fresh_class, means.data_ptr<state_t>(),
                          pending.data_ptr<int64_t>(), sums.data_ptr<state_t>(), sqsums.data_ptr<double>());
      else if (centred != nullptr)
        std::fill(centred, centred + n * d, compute_type<scalar_t>(0));
    });
  });
  return {a.centred, a.status};
}

}  // namespace

TORCH_LIBRARY_IMPL(collapse_ext, CPU, m) { m.impl("class_accumulate", &class_accumulate_cpu); }

}  // namespace collapse_ext
