// The rows of a class_accumulate batch grouped by class, cut into row-balanced pieces for
// the threads (csrc/cpu/class_accumulate_cpu.cpp, steps 3 and 4).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace collapse_ext {
namespace grouping {

constexpr int64_t kPiecesPerThread = 4;  // a run of pieces is within n / (4 threads) rows of its share

// Rows are visited in class order, each a fresh random row of the batch or the state:
// asking for the next one while the current one is summed hides most of the miss latency
// (the hardware prefetcher only follows a row once it has started).
template <typename T>
inline void prefetch_row(const T* row, int64_t d) {
#if defined(__GNUC__)
  const char* p = reinterpret_cast<const char*>(row);
  const int64_t bytes = d * static_cast<int64_t>(sizeof(T));
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b);
#endif
}

// The batch's rows grouped by class: order[start[p] .. start[p + 1]) are the rows of piece
// p, all of class piece_class[p] (pieces of one class are consecutive); run_start[t] ..
// run_start[t + 1] the pieces of thread t.
struct Grouping {
  std::vector<int64_t> order, start, piece_class, run_start;
  // Piece p is a class's only piece and holds one row.
  bool lone(int64_t p) const {
    const int64_t pieces = static_cast<int64_t>(piece_class.size());
    return start[p + 1] == start[p] + 1 && (p == 0 || piece_class[p - 1] != piece_class[p]) &&
           (p + 1 == pieces || piece_class[p + 1] != piece_class[p]);
  }
};

// The shift of piece p's rows: its class's means row, or the new class's batch mean.
template <typename state_t>
const state_t* piece_shift(const Grouping& g, int64_t p, int64_t d, const state_t* means,
                           const std::vector<int64_t>& slot, const std::vector<state_t>& fresh) {
  const int64_t first = g.order[g.start[p]];
  return slot[first] < 0 ? means + g.piece_class[p] * d : fresh.data() + slot[first] * d;
}

template <typename label_t>
Grouping group_rows(const label_t* y, int64_t n, int64_t num_classes, int64_t threads) {
  Grouping g;
  // group_of[k]: the group of class k in this batch, -1 for none: a (K,) table the calling
  // thread keeps (a hash map cost a few percent of the op at K = 50257); the entries set
  // here are reset before returning.
  thread_local std::vector<int64_t> group_of;
  if (static_cast<int64_t>(group_of.size()) < num_classes) group_of.resize(num_classes, -1);
  std::vector<int64_t> group(n, -1), group_class, group_rows;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = static_cast<int64_t>(y[i]);
    if (k < 0 || k >= num_classes) continue;
    if (group_of[k] < 0) {
      group_of[k] = static_cast<int64_t>(group_class.size());
      group_class.push_back(k);
      group_rows.push_back(0);
    }
    group[i] = group_of[k];
    group_rows[group[i]] += 1;
  }
  for (const int64_t k : group_class) group_of[k] = -1;
  const int64_t groups = static_cast<int64_t>(group_class.size());
  std::vector<int64_t> next(groups + 1, 0);
  for (int64_t r = 0; r < groups; ++r) next[r + 1] = next[r] + group_rows[r];
  const int64_t valid = next[groups];
  const int64_t piece = std::max<int64_t>(1, (valid + kPiecesPerThread * threads - 1) / (kPiecesPerThread * threads));
  for (int64_t r = 0; r < groups; ++r)
    for (int64_t s = next[r]; s < next[r + 1]; s += piece) {
      g.start.push_back(s);
      g.piece_class.push_back(group_class[r]);
    }
  g.start.push_back(valid);
  g.order.resize(valid);
  for (int64_t i = 0; i < n; ++i)
    if (group[i] >= 0) g.order[next[group[i]]++] = i;
  // Runs of pieces holding about valid / threads rows each.
  const int64_t pieces = static_cast<int64_t>(g.piece_class.size());
  g.run_start.assign(1, 0);
  for (int64_t t = 1, p = 0; t < threads; ++t) {
    while (p < pieces && g.start[p] * threads < t * valid) ++p;
    g.run_start.push_back(p);
  }
  g.run_start.push_back(pieces);
  return g;
}

}  // namespace grouping
}  // namespace collapse_ext
