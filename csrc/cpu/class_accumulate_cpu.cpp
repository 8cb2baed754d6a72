// class_accumulate on the CPU (see csrc/class_accumulate.h for the contract):
//   1. first_bad_label, and the rows grouped by class (csrc/cpu/class_grouping.h: a
//      counting sort; the classes with two or more rows first, cut into pieces of at
//      most n / (4 threads) rows dealt to the threads in row-balanced runs, then the
//      one-row classes, an equal share per thread);
//   2. shifts_kernel: each piece's shift, its class's means row or, for a class with no
//      row yet, the float64 mean of its rows in the batch rounded to the state dtype (a
//      one-row class: the row itself, rounded);
//   3. centre_kernel: each row centred in float64 (written rounded to the compute dtype
//      when `centred` is wanted), its squared norm, whether it is finite, and each
//      grouped piece's float64 sum in a scratch row; nothing is modified until every row
//      has passed the checks;
//   4. accumulate_kernel: if the batch passed, each class's pieces added to its sums row
//      (one rounding to the state dtype per class and batch; a one-row class centred
//      again and added, backwards from the last one centred, while its row and shift are
//      still in the cache) and the new classes' means rows written; else `centred` zeroed.
// The loops come in two builds (simd.h). At K = 50257 with Zipfian labels a third of the
// rows are their class's only row in an 8192-row batch: reading each class's shift once
// per piece, and the one-row classes' second visit coming from the cache, are what keep
// the op near the bandwidth of a bare index_add_ (benchmarks/bench_lm.py).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "../class_accumulate.h"
#include "../common.h"
#include "class_grouping.h"
#include "simd.h"

namespace collapse_ext {
namespace {

using grouping::Grouping;
using grouping::prefetch_row;

constexpr int64_t kMinParallelElements = 1 << 18;  // below this, waking a second thread costs more than it saves
constexpr int64_t kScratchKeepBytes = 64 << 20;     // the caller thread keeps a scratch up to this size

// Step 1. The first row with a label outside [0, K), -1 when there is none.
template <typename label_t>
int64_t first_bad_label(const label_t* y, int64_t n, int64_t num_classes) {
  for (int64_t i = 0; i < n; ++i)
    if (static_cast<int64_t>(y[i]) < 0 || static_cast<int64_t>(y[i]) >= num_classes) return i;
  return -1;
}

// The shift of each piece's rows: its class's means row; for a class with no row yet
// (counts_k + pending_k == 0) and two or more rows in the batch, the mean of those rows
// (float64 sums, rounded once to the state dtype) in a row of `fresh`; for such a class
// with one row, nullptr: the row is its own shift (rounded to the state dtype).
// A single row elsewhere would leave a rank-one spike of d times the within-class
// variance in the float32 products, which costs digits until the next fold.
template <typename state_t>
struct Shifts {
  std::vector<const state_t*> of_piece;
  std::vector<state_t> fresh;  // the fresh rows, one per new class of two or more rows
  const state_t* means;
  // Whether piece p's class is new with two or more rows (its means row is fresh's).
  bool fresh_row(const Grouping& g, int64_t p, int64_t d) const {
    return of_piece[p] != nullptr && of_piece[p] != means + g.piece_class[p] * d;
  }
};

// Step 2. Every piece's shift, and the float64 sums of the new classes' rows (a class's
// pieces are consecutive; classes go to the threads).
template <typename scalar_t, typename state_t>
Shifts<state_t> shifts_kernel(const scalar_t* x, int64_t row_stride, int64_t d, const Grouping& g,
                              const int64_t* counts, const int64_t* pending, const state_t* means, bool parallel) {
  Shifts<state_t> s;
  s.means = means;
  const int64_t pieces = g.pieces();
  s.of_piece.resize(pieces);
  std::vector<int64_t> first_piece, fresh_of_piece(pieces, -1);
  for (int64_t p = 0; p < pieces; ++p) {
    const int64_t k = g.piece_class[p];
    s.of_piece[p] = means + k * d;
    if (counts[k] + pending[k] != 0) continue;
    if (g.lone(p)) {
      s.of_piece[p] = nullptr;
      continue;
    }
    if (p == 0 || g.piece_class[p - 1] != k) first_piece.push_back(p);
    fresh_of_piece[p] = static_cast<int64_t>(first_piece.size()) - 1;
  }
  const int64_t fresh = static_cast<int64_t>(first_piece.size());
  if (fresh == 0) return s;
  s.fresh.resize(fresh * d);
  auto sum_classes = [&](int64_t f0, int64_t f1) {
    std::vector<double> sum(d);
    for (int64_t f = f0; f < f1; ++f) {
      std::fill(sum.begin(), sum.end(), 0.0);
      int64_t p = first_piece[f];
      const int64_t k = g.piece_class[p];
      for (; p < g.lone_start && g.piece_class[p] == k; ++p)
        for (int64_t r = g.start[p]; r < g.start[p + 1]; ++r) {
          const scalar_t* row = x + g.order[r] * row_stride;
          for (int64_t j = 0; j < d; ++j) sum[j] += to_double(row[j]);
        }
      const double rows = static_cast<double>(g.start[p] - g.start[first_piece[f]]);
      state_t* out = s.fresh.data() + f * d;
      for (int64_t j = 0; j < d; ++j) out[j] = static_cast<state_t>(sum[j] / rows);
    }
  };
  if (parallel)
    at::parallel_for(0, fresh, 1, sum_classes);
  else
    sum_classes(0, fresh);
  for (int64_t p = 0; p < pieces; ++p)
    if (fresh_of_piece[p] >= 0) s.of_piece[p] = s.fresh.data() + fresh_of_piece[p] * d;
  return s;
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
// A new class's only row is its own shift, rounded to the state dtype: c = round(h).
template <typename state_t, typename T>
COLLAPSE_ALWAYS_INLINE f64x4 own_shift_f64x4(const T* p) {
  return f64x4{static_cast<double>(static_cast<state_t>(to_double(p[0]))),
               static_cast<double>(static_cast<state_t>(to_double(p[1]))),
               static_cast<double>(static_cast<state_t>(to_double(p[2]))),
               static_cast<double>(static_cast<state_t>(to_double(p[3])))};
}

// With kOwn (c == nullptr) each row is its own shift (own_shift_f64x4).
template <bool kSum, bool kOwn, typename scalar_t, typename state_t, typename compute_t>
COLLAPSE_ALWAYS_INLINE void centre_rows_body(const scalar_t* x, int64_t row_stride, int64_t d, const int64_t* order,
                                             int64_t r0, int64_t r1, const state_t* __restrict__ c,
                                             compute_t* centred, double* sq, char* finite, double* __restrict__ acc) {
  if constexpr (kSum) std::fill(acc, acc + d, 0.0);
  const int64_t body = d - d % 8;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t i = order[r];
    const scalar_t* __restrict__ row = x + i * row_stride;
    auto shift = [&](int64_t j) {
      if constexpr (kOwn)
        return static_cast<double>(static_cast<state_t>(to_double(row[j])));
      else
        return static_cast<double>(c[j]);
    };
    if (r + 1 < r1) grouping::prefetch_row(x + order[r + 1] * row_stride, d);
    // probe is NaN iff some feature is NaN or Inf.
    f64x4 s0 = {}, s1 = {}, p0 = {}, p1 = {};
    for (int64_t j = 0; j < body; j += 8) {
      const f64x4 va = load_f64x4(row + j), vb = load_f64x4(row + j + 4);
      f64x4 ea, eb;
      if constexpr (kOwn) {
        ea = va - own_shift_f64x4<state_t>(row + j);
        eb = vb - own_shift_f64x4<state_t>(row + j + 4);
      } else {
        ea = va - load_f64x4(c + j);
        eb = vb - load_f64x4(c + j + 4);
      }
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
      const double e = v - shift(j);
      s += e * e;
      probe += v * 0.0;
      if constexpr (kSum) acc[j] += e;
    }
    sq[i] = s;
    finite[i] = probe == 0.0;
    if (centred != nullptr) {
      compute_t* __restrict__ out = centred + i * d;
      for (int64_t j = 0; j < d; ++j) out[j] = static_cast<compute_t>(to_double(row[j]) - shift(j));
    }
  }
}

// acc == nullptr: a piece of one row, whose class has no other piece (the row is added
// to its sums row directly in step 4, which saves writing and reading back d float64);
// c == nullptr too: that class is new (the row is its own shift).
template <typename scalar_t, typename state_t, typename compute_t>
void centre_rows_base(const scalar_t* x, int64_t row_stride, int64_t d, const int64_t* order, int64_t r0, int64_t r1,
                      const state_t* c, compute_t* centred, double* sq, char* finite, double* acc) {
  if (c == nullptr)
    centre_rows_body<false, true>(x, row_stride, d, order, r0, r1, c, centred, sq, finite, acc);
  else if (acc == nullptr)
    centre_rows_body<false, false>(x, row_stride, d, order, r0, r1, c, centred, sq, finite, acc);
  else
    centre_rows_body<true, false>(x, row_stride, d, order, r0, r1, c, centred, sq, finite, acc);
}

#if COLLAPSE_AVX2_CLONES
template <typename scalar_t, typename state_t, typename compute_t>
COLLAPSE_TARGET_AVX2 void centre_rows_avx2(const scalar_t* x, int64_t row_stride, int64_t d, const int64_t* order,
                                           int64_t r0, int64_t r1, const state_t* c, compute_t* centred, double* sq,
                                           char* finite, double* acc) {
  if (c == nullptr)
    centre_rows_body<false, true>(x, row_stride, d, order, r0, r1, c, centred, sq, finite, acc);
  else if (acc == nullptr)
    centre_rows_body<false, false>(x, row_stride, d, order, r0, r1, c, centred, sq, finite, acc);
  else
    centre_rows_body<true, false>(x, row_stride, d, order, r0, r1, c, centred, sq, finite, acc);
}
#endif

// Step 3. sums: row p of the scratch, the float64 sum of piece p's centred rows (for the
// pieces before g.lone_start). The one-row classes come last, each thread's in order, so
// that step 4, visiting them first and backwards, finds the latest of their rows and
// shifts still in the cache.
template <typename scalar_t, typename state_t, typename compute_t>
void centre_kernel(const scalar_t* x, int64_t row_stride, int64_t d, const Grouping& g, const Shifts<state_t>& shifts,
                   compute_t* centred,
                   std::vector<double>& sq, std::vector<char>& finite, double* sums, bool parallel) {
  auto centre_rows = centre_rows_base<scalar_t, state_t, compute_t>;
#if COLLAPSE_AVX2_CLONES
  if (cpu_has_avx2()) centre_rows = centre_rows_avx2<scalar_t, state_t, compute_t>;
#endif
  auto pieces = [&](int64_t first, int64_t last) {
    for (int64_t p = first; p < last; ++p) {
      if (p + 1 < last) {
        if (shifts.of_piece[p + 1] != nullptr) prefetch_row(shifts.of_piece[p + 1], d);
        prefetch_row(x + g.order[g.start[p + 1]] * row_stride, d);
      }
      centre_rows(x, row_stride, d, g.order.data(), g.start[p], g.start[p + 1], shifts.of_piece[p], centred, sq.data(), finite.data(), g.lone(p) ? nullptr : sums + p * d);
    }
  };
  auto run = [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) pieces(g.run_start[t], g.run_start[t + 1]);
    for (int64_t t = t0; t < t1; ++t) {
      const auto [first, last] = g.lone_run(t);
      pieces(first, last);
    }
  };
  if (parallel)
    at::parallel_for(0, g.threads, 1, run);
  else
    run(0, g.threads);
}

// Step 4: the pieces p0 .. p1 of one class summed in float64 and added to its sums row;
// a lone row (row != nullptr) is centred again about c and added, or, for a new class
// (c == nullptr), about itself rounded, which becomes its means row `mean`.
template <typename scalar_t, typename state_t>
COLLAPSE_ALWAYS_INLINE void add_pieces_body(const double* __restrict__ piece_sums, int64_t p0, int64_t p1, int64_t d,
                                            const scalar_t* __restrict__ row, const state_t* __restrict__ c,
                                            state_t* __restrict__ sum, state_t* __restrict__ mean) {
  if (row != nullptr && c == nullptr) {
    for (int64_t j = 0; j < d; ++j) {
      const double v = to_double(row[j]);
      mean[j] = static_cast<state_t>(v);
      sum[j] += static_cast<state_t>(v - static_cast<double>(mean[j]));
    }
    return;
  }
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
                     const state_t* c, state_t* sum, state_t* mean) {
  add_pieces_body(piece_sums, p0, p1, d, row, c, sum, mean);
}

#if COLLAPSE_AVX2_CLONES
template <typename scalar_t, typename state_t>
COLLAPSE_TARGET_AVX2 void add_pieces_avx2(const double* piece_sums, int64_t p0, int64_t p1, int64_t d,
                                          const scalar_t* row, const state_t* c, state_t* sum, state_t* mean) {
  add_pieces_body(piece_sums, p0, p1, d, row, c, sum, mean);
}
#endif

// Step 4, for an accepted batch: the pieces of one class are summed in float64 and added
// to its sums row once; a new class's shift becomes its means row.
template <typename scalar_t, typename label_t, typename state_t>
void accumulate_kernel(const scalar_t* x, int64_t row_stride, const label_t* y, int64_t n, int64_t d,
                       const Grouping& g, const double* piece_sums, const std::vector<double>& sq,
                       const Shifts<state_t>& shifts, state_t* means, int64_t* pending, state_t* sums,
                       double* sqsums) {
  auto add_pieces = add_pieces_base<scalar_t, state_t>;
#if COLLAPSE_AVX2_CLONES
  if (cpu_has_avx2()) add_pieces = add_pieces_avx2<scalar_t, state_t>;
#endif
  auto add_class = [&](int64_t p0, int64_t p1) {
    const int64_t k = g.piece_class[p0];
    const scalar_t* row = g.lone(p0) ? x + g.order[g.start[p0]] * row_stride : nullptr;
    add_pieces(piece_sums, p0, p1, d, row, shifts.of_piece[p0], sums + k * d, means + k * d);
    if (shifts.fresh_row(g, p0, d)) std::copy_n(shifts.of_piece[p0], d, means + k * d);
  };
  auto prefetch_lone = [&](int64_t p) {
    prefetch_row(sums + g.piece_class[p] * d, d);
    prefetch_row(shifts.of_piece[p] != nullptr ? shifts.of_piece[p] : means + g.piece_class[p] * d, d);
    prefetch_row(x + g.order[g.start[p]] * row_stride, d);
  };
  // The one-row classes: each thread its own, backwards from the last it centred.
  at::parallel_for(0, g.threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const auto [first, last] = g.lone_run(t);
      for (int64_t p = last - 1; p >= first; --p) {
        if (p > first) prefetch_lone(p - 1);
        add_class(p, p + 1);
      }
    }
  });
  // The grouped classes own disjoint sums rows: runs of whole classes go to the threads.
  std::vector<int64_t> class_start;
  for (int64_t p = 0; p < g.lone_start; ++p)
    if (p == 0 || g.piece_class[p] != g.piece_class[p - 1]) class_start.push_back(p);
  class_start.push_back(g.lone_start);
  const int64_t classes = static_cast<int64_t>(class_start.size()) - 1;
  const int64_t grain = std::max<int64_t>(1, kMinParallelElements / std::max<int64_t>(d, 1));
  at::parallel_for(0, classes, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      if (c + 1 < c1) prefetch_row(sums + g.piece_class[class_start[c + 1]] * d, d);
      add_class(class_start[c], class_start[c + 1]);
    }
  });
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
      const int64_t bad_label = first_bad_label(y, n, k);
      const bool parallel = n * d >= kMinParallelElements && !at::in_parallel_region();
      const Grouping g = grouping::group_rows(y, n, k, parallel ? std::max<int64_t>(1, at::get_num_threads()) : 1);
      const Shifts<state_t> shifts =
          shifts_kernel(x, a.x.stride(0), d, g, counts.const_data_ptr<int64_t>(), pending.const_data_ptr<int64_t>(),
                        means.const_data_ptr<state_t>(), parallel);
      std::vector<double> sq(n, 0.0), own;
      std::vector<char> finite(n, 1);
      double* piece_sums = piece_scratch(g.lone_start * d, own);
      centre_kernel(x, a.x.stride(0), d, g, shifts, centred, sq, finite, piece_sums, parallel);

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
        accumulate_kernel(x, a.x.stride(0), y, n, d, g, piece_sums, sq, shifts, means.data_ptr<state_t>(), pending.data_ptr<int64_t>(), sums.data_ptr<state_t>(), sqsums.data_ptr<double>());
      else if (centred != nullptr)
        std::fill(centred, centred + n * d, compute_type<scalar_t>(0));
    });
  });
  return {a.centred, a.status};
}

}  // namespace

TORCH_LIBRARY_IMPL(collapse_ext, CPU, m) { m.impl("class_accumulate", &class_accumulate_cpu); }

}  // namespace collapse_ext
