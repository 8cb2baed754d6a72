// The rows of a class_accumulate batch grouped by class, cut into row-balanced pieces for
// the threads (csrc/cpu/class_accumulate_cpu.cpp, steps 3 and 4).
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
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
// p, all of class piece_class[p] (pieces of one class are consecutive). The classes with
// two or more rows come first, cut into pieces; run_start[t] .. run_start[t + 1] are
// thread t's pieces of them. The classes with one row follow, one piece each, from
// lone_start on: thread t's are lone_run(t).
struct Grouping {
  std::vector<int64_t> order, start, piece_class, run_start;
  int64_t lone_start = 0, threads = 1;
  int64_t pieces() const { return static_cast<int64_t>(piece_class.size()); }
  // Piece p is a class's only piece and holds one row.
  bool lone(int64_t p) const { return p >= lone_start; }
  // Thread t's share of the one-row pieces, [first, last).
  std::pair<int64_t, int64_t> lone_run(int64_t t) const {
    const int64_t count = pieces() - lone_start;
    return {lone_start + count * t / threads, lone_start + count * (t + 1) / threads};
  }
};

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
  // The groups in place order: those of two or more rows, then those of one.
  const int64_t groups = static_cast<int64_t>(group_class.size());
  std::vector<int64_t> place(groups);
  int64_t multi = 0;
  for (int64_t r = 0; r < groups; ++r)
    if (group_rows[r] > 1) place[r] = multi++;
  for (int64_t r = 0, lone = multi; r < groups; ++r)
    if (group_rows[r] == 1) place[r] = lone++;
  std::vector<int64_t> rows_at(groups), class_at(groups);
  for (int64_t r = 0; r < groups; ++r) {
    rows_at[place[r]] = group_rows[r];
    class_at[place[r]] = group_class[r];
  }
  std::vector<int64_t> next(groups + 1, 0);
  for (int64_t r = 0; r < groups; ++r) next[r + 1] = next[r] + rows_at[r];
  const int64_t valid = next[groups], grouped = next[multi];
  const int64_t piece = std::max<int64_t>(1, (grouped + kPiecesPerThread * threads - 1) / (kPiecesPerThread * threads));
  for (int64_t r = 0; r < groups; ++r) {
    if (r == multi) g.lone_start = static_cast<int64_t>(g.piece_class.size());
    for (int64_t s = next[r]; s < next[r + 1]; s += piece) {
      g.start.push_back(s);
      g.piece_class.push_back(class_at[r]);
    }
  }
  if (multi == groups) g.lone_start = static_cast<int64_t>(g.piece_class.size());
  g.start.push_back(valid);
  g.order.resize(valid);
  for (int64_t i = 0; i < n; ++i)
    if (group[i] >= 0) g.order[next[place[group[i]]]++] = i;
  // Runs of the grouped pieces holding about grouped / threads rows each.
  g.threads = threads;
  g.run_start.assign(1, 0);
  for (int64_t t = 1, p = 0; t < threads; ++t) {
    while (p < g.lone_start && g.start[p] * threads < t * grouped) ++p;
    g.run_start.push_back(p);
  }
  g.run_start.push_back(g.lone_start);
  return g;
}

}  // namespace grouping
}  // namespace collapse_ext
