// Host side of class_fold shared by the backends: the contract and the argument checks.
//
// class_fold merges ClassStats' pending block (collapse_ext/stats/class_stats.py) into its
// folded state, in place. For every class k with pending_k > 0, with N = counts_k +
// pending_k and the exact mean about the shift, m = means_k + sums_k / N (float64):
//   sqdev_k  <- max(0, sqdev_k + sqsums_k - ||sums_k||^2 / N),
//   counts_k <- N,   pending_k <- 0,   means_k <- m rounded to the state dtype,
//   sums_k   <- N (m - means_k) rounded,   sqsums_k <- ||sums_k||^2 / N.
// The last two keep the rounding of the stored mean in the pending block, as if N rows
// sat at the exact mean: the next fold then starts from the exact mean of the rows folded
// so far, not from its rounding. With a float64 state they are zero (m is a float64
// already); with a float32 state the rounding of the means, 1e-7 of the features' common
// offset, would otherwise add N ||means_k - m||^2 to sqdev_k at every later fold.
// Classes with pending_k == 0 are not visited: O(K + d x classes folded).
#pragma once

#include <torch/all.h>

#include "class_state.h"

namespace collapse_ext {

}  // namespace collapse_ext
