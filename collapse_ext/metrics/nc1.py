"""NC1, within-class variability (SPEC: "Metrics", NC1): the trace ratio in its class- and
sample-weighted forms, the quotient of traces and the class-distance normalised variance."""

from __future__ import annotations

from typing import Any

import torch

from .._ops import within_scatter
from .._validate import choice, positive_float
from ..stats import ClassStats
from ._inputs import Pairs, UndefinedMetricError, batches, check_stats, rank_rtol

__all__ = ["nc1", "nc1_cdnv", "nc1_quotient", "separation_fuzziness"]

_EPS64 = torch.finfo(torch.float64).eps


def _between_basis(stats: ClassStats, weighting: str, rtol: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values s (r,) and right singular vectors V^T (r, d) of A = diag(sqrt(w)) M~,
    so that Sigma_B = A^T A and Sigma_B^+ = V S^-2 V^T; singular values at or below
    rtol * s_max are dropped (rank tolerance; default max(K', d) * eps), and at most K' - 1
    are kept whatever the tolerance says: the rows of M~ sum to zero under the weights of
    mu_G, so rank(A) <= K' - 1, and a K'-th singular value is only the rounding of a common
    offset, whose 1/s^2 term would swamp the metric (r <= min(K' - 1, d))."""
    centred = stats.centred_means()
    kp = centred.shape[0]
    if kp < 2:
        raise UndefinedMetricError(f"needs at least 2 present classes, got {kp}")
    a = centred * stats.between_weights(weighting).sqrt().unsqueeze(1)
    _, s, vh = torch.linalg.svd(a, full_matrices=False)
    tol = rtol if rtol is not None else max(a.shape) * _EPS64
    if s.numel() == 0 or float(s[0]) == 0.0:
        raise UndefinedMetricError("all present class means coincide (Sigma_B = 0)")
    keep = s[: kp - 1] > tol * s[0]
    return s[: kp - 1][keep], vh[: kp - 1][keep]


def _within_projection(stats: ClassStats, vh: torch.Tensor, features: Any, labels: Any, mode: str) -> torch.Tensor:
    """q_j = v_j^T Sigma_W v_j for the rows v_j of vh: from S_W ("full") or from a second
    pass over the samples through within_scatter with basis V ("projected")."""
    mode = choice(mode, "mode", ("auto", "full", "projected"))
    if mode == "auto":
        mode = "full" if stats.scatter is not None else "projected"
    if mode == "full":
        sigma_w = stats.within_cov()
        return ((vh @ sigma_w) * vh).sum(1)
    if features is None or labels is None:
        raise UndefinedMetricError(
            "needs the within-class scatter: ClassStats(..., within_cov=True), or `features` and `labels` "
            "for the projected mode"
        )
    acc = torch.zeros(vh.shape[0], vh.shape[0], dtype=torch.float64, device=stats.device)
    for x, y in batches(features, labels):
        basis = vh.T.to(x.device)
        acc += within_scatter(x, y, stats.means.to(x.device), basis).to(stats.device)
    return acc.diagonal() / max(stats.num_samples, 1)


def _trace_ratio(stats: Any, weighting: str, features: Any, labels: Any, mode: str, rtol: Any) -> float:
    """tr(Sigma_W Sigma_B^+) with Sigma_B weighted by ``weighting`` = sum_j q_j / s_j^2."""
    stats = check_stats(stats)
    if mode != "full" and stats.scatter is None and (features is None or labels is None):
        _within_projection(stats, stats.means[:0], features, labels, mode)  # raises: no S_W, no features
    s, vh = _between_basis(stats, weighting, rank_rtol(rtol))
    q = _within_projection(stats, vh, features, labels, mode)
    return float((q / (s * s)).sum())


def nc1(
    stats: ClassStats,
    *,
    features: Any = None,
    labels: Any = None,
    mode: str = "auto",
    rtol: float | None = None,
) -> float:
    """NC1 = tr(Sigma_W Sigma_B^+) / K' (Papyan, Han & Donoho 2020), Sigma_B class-weighted.

    Sigma_B^+ comes from the thin SVD of the centred means M~ = U S V^T (K' x d), with
    singular values below ``rtol * s_max`` dropped (default rtol = max(K', d) * eps) and at
    most K' - 1 directions used (rank M~ <= K' - 1, so NC1 is translation invariant):
    nc1 = sum_j (v_j^T Sigma_W v_j) / s_j^2, no d x d matrix is ever inverted.
    ``mode="full"`` uses the accumulated S_W; ``"projected"`` makes a second pass over
    ``features`` (N, d) / ``labels`` (N,) (tensors, or sequences of batches: the data the
    statistics came from) and accumulates only V^T S_W V through ``within_scatter``, so NC1
    is available when d x d does not fit (O(N d K)); ``"auto"`` picks full when S_W exists.
    """
    ratio = _trace_ratio(stats, "class", features, labels, mode, rtol)
    return ratio / int(stats.present.sum())


def separation_fuzziness(
    stats: ClassStats,
    *,
    features: Any = None,
    labels: Any = None,
    mode: str = "auto",
    rtol: float | None = None,
) -> float:
    """Separation fuzziness D = tr(SS_W SS_B^+) (He & Su 2023, "A law of data separation"),
    SS_W = Sigma_W and SS_B the sample-weighted between-class covariance
    sum_k (n_k/N)(mu_k - mu_G)(mu_k - mu_G)^T; no 1/K. Pseudo-inverse, rank tolerance and
    ``mode`` as in :func:`nc1`."""
    return _trace_ratio(stats, "sample", features, labels, mode, rtol)


def nc1_quotient(stats: ClassStats, *, between: str = "class") -> float:
    """tr Sigma_W / tr Sigma_B (Tirer, Huang & Niles-Weed 2023). Needs no S_W:
    tr Sigma_W = sum_k ss_k / N. ``between="class"`` (Papyan) or ``"sample"`` (He & Su)."""
    stats = check_stats(stats)
    between = choice(between, "between", ("class", "sample"))
    centred = stats.centred_means()
    if centred.shape[0] < 2:
        raise UndefinedMetricError(f"needs at least 2 present classes, got {centred.shape[0]}")
    tr_b = float((stats.between_weights(between) * (centred * centred).sum(1)).sum())
    if tr_b == 0.0:
        raise UndefinedMetricError("all present class means coincide (tr Sigma_B = 0)")
    return float(stats.sqdev.sum()) / stats.num_samples / tr_b


def cdnv(pairs: Pairs) -> float:
    """Mean of the CDNV sum over the pairs of ``pairs`` (made with the class variances)."""
    pairs.need_pairs("CDNV")
    if pairs["coincident"] > 0:
        raise UndefinedMetricError(f"{int(pairs['coincident'])} pair(s) of class means coincide (infinite CDNV)")
    return pairs["cdnv_sum"] / pairs["pairs"]


def cdnv_pairs(stats: ClassStats, exponent: float) -> Pairs:
    """The pairwise sums of the centred means with the class variances (CDNV exponent p)."""
    return Pairs(stats.centred_means(), stats.class_variances()[stats.present], cdnv_p=exponent)


def nc1_cdnv(stats: ClassStats, *, exponent: float = 1.0) -> float:
    """Class-distance normalised variance (Galanti, Gyorgy & Hutter 2022): mean over pairs
    j < k of present classes of (sigma_j^2 + sigma_k^2) / (2 ||mu_j - mu_k||^(2p)),
    sigma_k^2 = ss_k / n_k, p = ``exponent`` (1 default; 2 is the variant used for
    language models). Reduced by ``pairwise_stats`` without a K x K matrix."""
    stats = check_stats(stats)
    return cdnv(cdnv_pairs(stats, positive_float(exponent, "exponent")))
