"""Streaming sufficient statistics of neural collapse (SPEC: "Sufficient statistics").

``ClassStats`` accumulates, per class, the count n_k, the mean mu_k and the sum of
squared deviations ss_k, and optionally the pooled within-class scatter S_W.

How an update stays exact and costs one GEMM
---------------------------------------------
Rows are centred about a per-class *shift* c_k: the class mean at the last fold (for a
class first seen in the current batch, its mean in that batch). Between folds ("the pending
block", at most ``fold_rows`` rows) an update only adds, with no host synchronisation
in ``check="deferred"`` mode and O(rows x d) work whatever K:

    m_k += 1,  t_k += e_i,  q_k += ||e_i||^2,  P += e_i e_i^T,   e_i = h_i - c_{y_i},

with e_i formed in float64 (each class's rows of a batch summed in float64 and added to
t_k once) and P accumulated in float32 (float64 for fp64 features, or when float32 could
overflow). A fold (every ``fold_rows`` rows when the block has P; when a block holds as
many rows as all folds before it, if it has P or a float32 state; and before any read)
merges the block exactly (the ``class_fold`` op, visiting the classes with m_k > 0 only):
with N_k = n_k + m_k and c_k + t_k / N_k the exact mean of the N_k rows (Chan, Golub &
LeVeque 1979),

    mu_k <- c_k + t_k / N_k,   ss_k <- ss_k + q_k - ||t_k||^2 / N_k,
    S_W  <- S_W + P - sum_k t_k t_k^T / N_k.

A float32 state stores mu_k rounded; the fold keeps the rounding in the pending block,
t_k <- N_k (exact - stored mean), q_k <- ||t_k||^2 / N_k, and S_W gains t_k t_k^T / N_k,
as if N_k rows sat at the exact mean: so c_k + t_k / n_k above is always the exact mean of
the folded rows, and ss_k and S_W are about exact means (reads of S_W subtract the
outstanding residuals' terms when they are not negligible). A float64 state's residual is
zero.

The first blocks fold early (after 1, 2, 4, ... batches) to renew the shifts; those
folds update the (K, d) state only and queue their corrections, and P joins S_W (with
the queued corrections) every ``fold_rows`` rows and on reads, so a small-batch loop does
O(d^2) float64 work once per ``fold_rows`` rows, not once per fold.

Without P the doubling alone bounds the error of a float32 t_k: a block holds no more
rows than were folded before it, so t_k's m additions (one per batch) add up to about
m eps ||t_k|| with ||t_k|| ~ (rows of k in the block) x sigma_k / sqrt(rows of k folded),
a few eps of the class's spread; a float64 state needs no early folds at all. Either way a
block without P folds O(log N) times, each an O(touched x d) pass, instead of once per
``fold_rows`` rows, which at vocabulary size (K = 50k) cost more than the updates.

Because c_k is within a few standard deviations of the class mean, e_i carries no common
offset and the correction term is small: nothing cancels, even on fully collapsed
features. The one-pass identity sum h h^T - n mu mu^T is never used.
"""

from .class_stats import ClassStats

__all__ = ["ClassStats"]
