"""Typed wrappers over ``torch.ops.collapse_ext.*`` and their fake (meta) kernels.

The fake kernels give every op its output shapes without running it, so the ops trace
under ``torch.compile`` and pass ``torch.library.opcheck``.
"""

from __future__ import annotations

import torch

from . import _C

__all__ = [
    "PAIRWISE_FIELDS",
    "class_accumulate",
    "class_fold",
    "class_stats",
    "cuda_compiled",
    "lpm_step",
    "nearest_centre",
    "pairwise_stats",
    "within_scatter",
]


def cuda_compiled() -> bool:
    """True when the extension was built with its CUDA kernels."""
    return bool(_C.cuda_compiled())


def check_backend(tensor: torch.Tensor, name: str) -> None:
    """Raise a clear error for a device this build has no kernels for."""
    if tensor.is_cpu:  # the common case, without building a torch.device (once per update)
        return
    if tensor.device.type == "cuda" and not cuda_compiled():
        raise RuntimeError(
            f"`{name}` is on {tensor.device}, but collapse_ext was built without CUDA kernels; "
            "rebuild with a CUDA build of torch and nvcc on PATH (or FORCE_CUDA=1)"
        )
    if tensor.device.type not in ("cpu", "cuda", "meta"):
        raise RuntimeError(f"`{name}` is on {tensor.device}; collapse_ext supports cpu and cuda")


def class_stats(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-batch class statistics in one fused two-pass kernel.

    features: (N, d) float16/bfloat16/float32/float64, rows may be strided.
    labels: (N,) int32/int64; rows whose label is outside [0, num_classes) are skipped
    (validate beforehand: ``ClassStats.update`` does).
    Returns counts (K,) int64, means (K, d) float64 (zero rows for absent classes) and
    sqdev (K,) float64 = sum_{i: y_i = k} ||h_i - mu_k||^2, accumulated in float64.
    """
    check_backend(features, "features")
    return torch.ops.collapse_ext.class_stats.default(features, labels, num_classes)


def within_scatter(
    features: torch.Tensor,
    labels: torch.Tensor,
    means: torch.Tensor,
    basis: torch.Tensor | None = None,
) -> torch.Tensor:
    """Centred within-class scatter sum_i (h_i - m_{y_i})(h_i - m_{y_i})^T, float64.

    features: (N, d) float; labels: (N,) int32/int64 (rows out of [0, K) are skipped);
    means: (K, d) float, the centres m_k; basis: optional (d, r) float B, in which case
    the (r, r) projection B^T S B is returned without forming the (d, d) scatter.
    Rows are centred in float64 and rounded once to the compute dtype (float32 for
    fp16/bf16/fp32 input, float64 for fp64); products are summed in float64.
    """
    check_backend(features, "features")
    return torch.ops.collapse_ext.within_scatter.default(features, labels, means, basis)


def class_accumulate(
    features: torch.Tensor,
    labels: torch.Tensor,
    counts: torch.Tensor,
    means: torch.Tensor,
    pending: torch.Tensor,
    sums: torch.Tensor,
    sqsums: torch.Tensor,
    limit: float,
    return_centred: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add a batch to a pending block of class statistics about per-class shifts, in place.

    features: (N, d) float16/bfloat16/float32/float64, rows may be strided; labels: (N,)
    int32/int64; counts: (K,) int64 rows already folded (read only); means: (K, d)
    float32/float64 shifts c_k (mutated: a class with counts_k + pending_k == 0 takes the
    mean of its rows in the batch, rounded to this dtype); pending: (K,) int64, sums: (K, d) of
    means' dtype, sqsums: (K,) float64, all mutated. With e_i = h_i - c_{y_i} in float64:
    pending_k += 1, sums_k += e_i, sqsums_k += ||e_i||^2. All or nothing: a label outside
    [0, K), a NaN/Inf feature or a row with ||e_i||^2 > limit leaves every state tensor
    unchanged. Returns centred (N, d), e_i in float32 (float64 for fp64 features; zeros
    when the batch was refused; (0, d) and never written with ``return_centred=False``,
    which saves writing N x d values when only the sums are wanted), and status (4,) float64 = [accepted 1/0,
    max ||e_i||^2 over finite rows, first bad-label row or -1, first non-finite row or -1].
    No host synchronisation.
    """
    check_backend(features, "features")
    return torch.ops.collapse_ext.class_accumulate.default(
        features, labels, counts, means, pending, sums, sqsums, limit, return_centred
    )


def class_fold(
    counts: torch.Tensor,
    means: torch.Tensor,
    pending: torch.Tensor,
    sums: torch.Tensor,
    sqsums: torch.Tensor,
    sqdev: torch.Tensor,
) -> None:
    """Fold a pending block of class statistics (``class_accumulate``'s) into the folded
    state, in place, for every class with pending_k > 0 (others are not visited).

    counts, pending: (K,) int64; means, sums: (K, d) float32/float64 (the state dtype);
    sqsums, sqdev: (K,) float64; all on one device. With N = counts_k + pending_k and the
    exact mean m = means_k + sums_k / N in float64: sqdev_k += sqsums_k - ||sums_k||^2 / N
    (clamped at 0), counts_k = N, pending_k = 0, means_k = m rounded to the state dtype,
    and the rounding stays in the pending block: sums_k = N (m - means_k), sqsums_k =
    ||sums_k||^2 / N (zero with a float64 state), so that later folds start from the exact
    mean. No host synchronisation.
    """
    check_backend(means, "means")
    torch.ops.collapse_ext.class_fold.default(counts, means, pending, sums, sqsums, sqdev)


@torch.library.register_fake("collapse_ext::class_fold")
def _class_fold_fake(counts, means, pending, sums, sqsums, sqdev):
    torch._check(means.dim() == 2, lambda: "means must be 2-D (K, d)")


@torch.library.register_fake("collapse_ext::class_accumulate")
def _class_accumulate_fake(features, labels, counts, means, pending, sums, sqsums, limit, return_centred=True):
    torch._check(features.dim() == 2, lambda: "features must be 2-D (N, d)")
    compute = torch.float64 if features.dtype == torch.float64 else torch.float32
    rows = features.shape[0] if return_centred else 0
    return features.new_empty((rows, features.shape[1]), dtype=compute), features.new_empty((4,), dtype=torch.float64)


@torch.library.register_fake("collapse_ext::class_stats")
def _class_stats_fake(features, labels, num_classes):
    torch._check(features.dim() == 2, lambda: "features must be 2-D (N, d)")
    torch._check(labels.dim() == 1, lambda: "labels must be 1-D (N,)")
    d = features.shape[1]
    return (
        features.new_empty((num_classes,), dtype=torch.int64),
        features.new_empty((num_classes, d), dtype=torch.float64),
        features.new_empty((num_classes,), dtype=torch.float64),
    )


@torch.library.register_fake("collapse_ext::within_scatter")
def _within_scatter_fake(features, labels, means, basis=None):
    torch._check(features.dim() == 2, lambda: "features must be 2-D (N, d)")
    r = basis.shape[1] if basis is not None else features.shape[1]
    return features.new_empty((r, r), dtype=torch.float64)


def lpm_step(
    W: torch.Tensor,
    H: torch.Tensor,
    W_prev: torch.Tensor,
    H_prev: torch.Tensor,
    theta: torch.Tensor,
    weights: torch.Tensor,
    E_W: torch.Tensor,
    E_H: torch.Tensor,
    step: torch.Tensor,
    num_iters: int,
    loss: str = "ce",
    momentum: bool = True,
) -> tuple[torch.Tensor, ...]:
    """``num_iters`` projected-gradient iterations of the class-collapsed Layer-Peeled Model
    for a batch of B independent instances, fused (one kernel call, all iterations inside).

    W, H, W_prev, H_prev: (B, K, p) float32/float64, the iterate X = (W, H) and the
    previous one (momentum); theta: (B,) FISTA sequence (1 = no momentum yet);
    weights: (B, K) per-class loss weights c_k = n_k / N * loss_weight_k;
    E_W, E_H: (B,) constraint levels; step: (B,) step sizes eta. All of W's dtype and device.
    loss: "ce" (logsumexp(z) - z_k) or "mse" (0.5 ||z - e_k||^2), logits z_k = W h_k.

    Objective f = sum_k c_k L(W h_k, k) s.t. (1/K) ||W||_F^2 <= E_W, (1/K) ||H||_F^2 <= E_H
    (Fang, He, Long, Su 2021, class-collapsed form). With momentum (FISTA, Beck & Teboulle
    2009, with the gradient restart of O'Donoghue & Candes 2015) one iteration is
        theta' = (1 + sqrt(1 + 4 theta^2)) / 2,  Y = X + (theta - 1) / theta' (X - X_prev),
        X+ = P(Y - eta grad f(Y)),  theta <- 1 if <Y - X+, X+ - X> > 0 else theta';
    without it Y = X (plain projected gradient) and theta is returned unchanged. P rescales
    each block radially onto its ball. Accumulates in the input dtype.
    Returns (W, H, W_prev, H_prev, theta, objective, pg_norm), the last two (B,) at the
    returned X; pg_norm = ||X - P(X - eta grad f(X))||_F / eta (gradient mapping).
    """
    check_backend(W, "W")
    return torch.ops.collapse_ext.lpm_step.default(
        W, H, W_prev, H_prev, theta, weights, E_W, E_H, step, num_iters, loss, momentum
    )


@torch.library.register_fake("collapse_ext::lpm_step")
def _lpm_step_fake(W, H, W_prev, H_prev, theta, weights, E_W, E_H, step, num_iters, loss="ce", momentum=True):
    torch._check(W.dim() == 3, lambda: "W must be 3-D (B, K, p)")
    torch._check(H.shape == W.shape, lambda: "H must have the shape of W (B, K, p)")
    batch = W.shape[0]
    return (
        W.new_empty(W.shape),
        W.new_empty(W.shape),
        W.new_empty(W.shape),
        W.new_empty(W.shape),
        W.new_empty((batch,)),
        W.new_empty((batch,)),
        W.new_empty((batch,)),
    )


# Layout of the float64 vector returned by ``pairwise_stats`` (and its reference), in the
# order of ``enum Field`` in csrc/pairwise_stats.h. Sums run over the unordered pairs j < k
# of the row set; "unit" rows are a_k / ||a_k||.
PAIRWISE_FIELDS = (
    "pairs",  # number of pairs j < k in the set
    "cos_pairs",  # pairs whose two rows both have nonzero norm (the cosine is defined)
    "cos_sum",  # sum of cos(a_j, a_k) over cos_pairs
    "cos_min",  # min cos (+inf when cos_pairs = 0)
    "cos_max",  # max cos (-inf when cos_pairs = 0)
    "etf_abs_sum",  # sum |cos + 1/(m - 1)|, m = number of rows in the set
    "etf_sq_sum",  # sum (cos + 1/(m - 1))^2: the second moment about the ETF cosine, no cancellation near it
    "kernel_pairs",  # cos_pairs whose unit rows differ: ||u_j - u_k||^2 > 2 tol (see below)
    "log_sum",  # sum log(1 / ||u_j - u_k||) over kernel_pairs
    "log_sq_sum",  # sum of its squares
    "riesz_sum",  # sum ||u_j - u_k||^(-s) over kernel_pairs
    "riesz_sq_sum",  # sum of its squares
    "cdnv_sum",  # sum (v_j + v_k) / (2 ||a_j - a_k||^(2p)) over pairs with a_j != a_k (0 without variances)
    "coincident",  # pairs with ||a_j - a_k||^2 <= tol (||a_j||^2 + ||a_k||^2) (left out of cdnv_sum)
    "dot_sq_sum",  # sum (a_j . a_k)^2
    "dist_sq_max",  # max ||a_j - a_k||^2 (-inf when pairs = 0)
)
# tol = 4 eps of the Gram product dtype (float64 for float64 rows, float32 otherwise):
# differences below it are rounding of the Gram identity, so such pairs coincide.


def pairwise_stats(
    rows: torch.Tensor,
    variances: torch.Tensor | None = None,
    subset: torch.Tensor | None = None,
    riesz_s: float = 1.0,
    cdnv_p: float = 1.0,
) -> torch.Tensor:
    """Sums over the pairs j < k of rows of a (K, d) matrix, tile by tile, never holding K x K.

    rows: (K, d) float16/bfloat16/float32/float64; variances: optional (K,) float per-row
    variances for the CDNV sum; subset: optional (m,) int32/int64 row indices (e.g. the
    minority classes), the pairs then run over those rows only. Returns a
    (len(PAIRWISE_FIELDS),) float64 vector laid out as ``PAIRWISE_FIELDS``: pair counts, sum/min/max of
    cosines, sums of |cos + 1/(m-1)| and (cos + 1/(m-1))^2, log and Riesz (exponent
    ``riesz_s``) kernel sums on the unit sphere, the CDNV sum
    sum (v_j + v_k) / (2 ||a_j - a_k||^(2 cdnv_p)), coincident pairs, sum (a_j . a_k)^2 and
    max ||a_j - a_k||^2. Gram tiles are products in fp32 (fp16/bf16/fp32 input; on CUDA
    TF32 when torch.backends.cuda.matmul.allow_tf32) or fp64; all sums are float64.
    Distances use the Gram identity, so centre the rows first (the metrics pass mu_k - mu_G).
    """
    check_backend(rows, "rows")
    return torch.ops.collapse_ext.pairwise_stats.default(rows, variances, subset, riesz_s, cdnv_p)


def nearest_centre(
    features: torch.Tensor,
    labels: torch.Tensor,
    means: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    present: torch.Tensor | None = None,
    assignments: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest class centre and classifier prediction in one pass, never holding N x K.

    features: (N, d) float; labels: (N,) int32/int64; means: (K, d) float centres;
    weight (K, d) / bias (K,): optional classifier; present: optional (K,) bool, only those
    centres compete. Returns tallies (3,) int64 [n, ncc_correct, mismatch] (n = rows with a
    label in [0, K) and a competing centre; ncc_correct: argmin_k ||h - mu_k||^2 == label;
    mismatch: it differs from argmax_k (W h + b)_k, 0 without weight) and, when
    ``assignments``, the (N,) int64 nearest centres (-1 for rows not counted; (0,) otherwise).
    Features and means are shifted by the mean present centre before the distances
    ||mu'||^2 - 2 h'.mu' (no cancellation on large offsets); products in fp32 (fp64 for fp64
    features), comparisons in float64, ties to the lowest index. No host synchronisation.
    """
    check_backend(features, "features")
    return torch.ops.collapse_ext.nearest_centre.default(features, labels, means, weight, bias, present, assignments)


@torch.library.register_fake("collapse_ext::pairwise_stats")
def _pairwise_stats_fake(rows, variances=None, subset=None, riesz_s=1.0, cdnv_p=1.0):
    torch._check(rows.dim() == 2, lambda: "rows must be 2-D (K, d)")
    return rows.new_empty((len(PAIRWISE_FIELDS),), dtype=torch.float64)


@torch.library.register_fake("collapse_ext::nearest_centre")
def _nearest_centre_fake(features, labels, means, weight=None, bias=None, present=None, assignments=False):
    torch._check(features.dim() == 2, lambda: "features must be 2-D (N, d)")
    n = features.shape[0] if assignments else 0
    return features.new_empty((3,), dtype=torch.int64), features.new_empty((n,), dtype=torch.int64)
