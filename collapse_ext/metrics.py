"""Neural-collapse metrics (SPEC: "Metrics"): NC1-NC4, CDNV, hyperspherical uniformity,
duality, minority collapse, the orthogonal frame of imbalanced MSE training and the
layer-wise law of data separation.

Every metric is a plain function on a :class:`~collapse_ext.ClassStats` or on tensors of
rows (class means, classifier rows); :func:`collapse_metrics` bundles everything that is
computable from what it is given. Plain functions raise :class:`UndefinedMetricError`
(a ``ValueError``) when a metric is undefined for the input (NC2 with one class, ...);
the bundle records ``None`` and the reason instead. Absent classes (n_k = 0) are excluded
from every metric and listed in the bundle.

Pairwise quantities (cosines, CDNV, kernels, minority blocks) come from the fused
``pairwise_stats`` op, which reduces the K x K Gram matrix tile by tile and never holds
it; NC4 comes from the fused ``nearest_centre`` op, which never holds the N x K distances.
Everything is computed in float64 (weights and means are promoted), so the metrics are as
exact as the statistics. Metrics never take part in autograd: every tensor that comes in
(features, rows, weight, bias, means) is detached, so ``nn.Parameter`` weights work as is.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

import torch

from ._ops import nearest_centre, pairwise_stats, within_scatter
from .reference import PAIRWISE_FIELDS
from .stats import ClassStats

__all__ = [
    "CollapseMetrics",
    "MinorityCollapse",
    "SeparationLaw",
    "UndefinedMetricError",
    "collapse_metrics",
    "equiangularity",
    "equinorm",
    "etf_error",
    "fit_separation_law",
    "gnc2",
    "max_angle",
    "mean_cosine",
    "minority_collapse",
    "nc1",
    "nc1_cdnv",
    "nc1_quotient",
    "ncc_accuracy",
    "ncc_mismatch",
    "nearest_centre_counts",
    "orthogonal_frame_error",
    "self_duality",
    "separation_fuzziness",
    "uniform_duality",
]

_EPS64 = torch.finfo(torch.float64).eps


class UndefinedMetricError(ValueError):
    """A metric is undefined for this input (the message says why)."""


# ---------------------------------------------------------------------- input checks
def _check_stats(stats: Any) -> ClassStats:
    if not isinstance(stats, ClassStats):
        raise TypeError(f"Expected `stats` to be a ClassStats, got {type(stats).__name__}")
    return stats


def _check_rows(rows: Any, name: str) -> torch.Tensor:
    if not isinstance(rows, torch.Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor, got {type(rows).__name__}")
    if rows.dim() != 2:
        raise ValueError(f"Expected `{name}` to be a 2-D (K, d) tensor, got shape {tuple(rows.shape)}")
    if not rows.is_floating_point():
        raise TypeError(f"Expected `{name}` to be a floating tensor, got {rows.dtype}")
    if not bool(torch.isfinite(rows).all()):
        raise ValueError(f"Expected finite `{name}`, got NaN or Inf")
    return rows.detach().double()


def _check_weight(weight: Any, stats: ClassStats, name: str = "weight") -> torch.Tensor:
    w = _check_rows(weight, name)
    expected = (stats.num_classes, stats.dim)
    if tuple(w.shape) != expected:
        raise ValueError(f"Expected `{name}` of shape (K, d) = {expected}, got {tuple(w.shape)}")
    return w.to(stats.device)


def _check_bias(bias: Any, num_classes: int) -> torch.Tensor:
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"Expected `bias` to be a torch.Tensor, got {type(bias).__name__}")
    if tuple(bias.shape) != (num_classes,):
        raise ValueError(f"Expected `bias` of shape (K,) = ({num_classes},), got {tuple(bias.shape)}")
    if not bias.is_floating_point():
        raise TypeError(f"Expected `bias` to be a floating tensor, got {bias.dtype}")
    if not bool(torch.isfinite(bias).all()):
        raise ValueError("Expected finite `bias`, got NaN or Inf")
    return bias.detach()


def _positive_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"Expected `{name}` to be a positive finite number, got {value!r}")
    return float(value)


def _rank_rtol(value: Any) -> float | None:
    """None (the default tolerance) or a finite real number in [0, 1)."""
    if value is None:
        return None
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not 0 <= value < 1:
        raise ValueError(f"Expected `rtol` to be None or a finite number in [0, 1), got {value!r}")
    return float(value)


def _check_finite_rows(features: torch.Tensor, first_row: int = 0) -> None:
    """Raise on NaN/Inf rows of features (N, d), naming the first one (a host sync)."""
    bad = ~torch.isfinite(features).all(1)
    if bool(bad.any()):
        row = first_row + int(bad.nonzero()[0, 0])
        raise ValueError(f"Expected finite `features`, got NaN or Inf in row {row}")


def _check_features(x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"Expected `features` to be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"Expected `labels` to be a torch.Tensor, got {type(y).__name__}")
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"Expected `features` to be a 2-D (N, d) floating tensor, got {x.dtype} {tuple(x.shape)}")
    if y.dim() != 1 or y.shape[0] != x.shape[0] or y.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"Expected `labels` to be a ({x.shape[0]},) int32/int64 tensor like `features`, "
            f"got {y.dtype} {tuple(y.shape)}"
        )
    return x.detach(), y


def _batches(features: Any, labels: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One (features, labels) pair, or two equally long sequences of batches; every batch
    is checked (shapes, finite rows: the first bad row is named, counted over batches)."""
    if isinstance(features, torch.Tensor) and isinstance(labels, torch.Tensor):
        pairs = [(features, labels)]
    elif isinstance(features, torch.Tensor) or isinstance(labels, torch.Tensor):
        raise TypeError("Expected `features` and `labels` to be both tensors or both sequences of batches")
    else:
        features, labels = list(features), list(labels)
        if len(features) != len(labels):
            raise ValueError(
                f"Expected as many `labels` batches as `features` batches, got {len(labels)} and {len(features)}"
            )
        pairs = list(zip(features, labels))
    checked, row = [], 0
    for x, y in pairs:
        x, y = _check_features(x, y)
        _check_finite_rows(x, row)
        row += x.shape[0]
        checked.append((x, y))
    yield from checked


# ------------------------------------------------------------------ pairwise sums
class _Pairs:
    """The ``pairwise_stats`` vector of one row set, by field name, plus its row norms."""

    def __init__(self, rows: torch.Tensor, variances: torch.Tensor | None = None, subset: Any = None, **kw: float):
        self.rows = rows if subset is None else rows[subset]
        self.m = self.rows.shape[0]
        values = _pairwise(rows, variances, subset, **kw).tolist()
        self.v = dict(zip(PAIRWISE_FIELDS, values))

    def __getitem__(self, name: str) -> float:
        return self.v[name]

    def need_pairs(self, what: str) -> None:
        if self.m < 2:
            raise UndefinedMetricError(f"{what} needs at least 2 rows (classes), got {self.m}")

    def need_cos(self, what: str) -> None:
        self.need_pairs(what)
        if self.v["cos_pairs"] == 0:
            raise UndefinedMetricError(f"{what} needs rows of nonzero norm; every pair has a zero row")


def _pairwise(
    rows: torch.Tensor,
    variances: torch.Tensor | None = None,
    subset: Any = None,
    riesz_s: float = 1.0,
    cdnv_p: float = 1.0,
) -> torch.Tensor:
    if subset is not None and not isinstance(subset, torch.Tensor):
        subset = torch.as_tensor(subset, dtype=torch.int64, device=rows.device)
    return pairwise_stats(rows, variances, subset, riesz_s, cdnv_p)


# ----------------------------------------------------------------------------- NC1
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
    if weighting == "class":
        w = torch.full((kp,), 1.0 / kp, dtype=torch.float64, device=centred.device)
    else:
        w = stats.counts[stats.present].double() / stats.num_samples
    a = centred * w.sqrt().unsqueeze(1)
    _, s, vh = torch.linalg.svd(a, full_matrices=False)
    tol = rtol if rtol is not None else max(a.shape) * _EPS64
    if s.numel() == 0 or float(s[0]) == 0.0:
        raise UndefinedMetricError("all present class means coincide (Sigma_B = 0)")
    keep = s[: kp - 1] > tol * s[0]
    return s[: kp - 1][keep], vh[: kp - 1][keep]


def _within_projection(stats: ClassStats, vh: torch.Tensor, features: Any, labels: Any, mode: str) -> torch.Tensor:
    """q_j = v_j^T Sigma_W v_j for the rows v_j of vh: from S_W ("full") or from a second
    pass over the samples through within_scatter with basis V ("projected")."""
    if mode not in ("auto", "full", "projected"):
        raise ValueError(f"Expected `mode` to be one of ('auto', 'full', 'projected'), got {mode!r}")
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
    for x, y in _batches(features, labels):
        basis = vh.T.to(x.device)
        acc += within_scatter(x, y, stats.means.to(x.device), basis).to(stats.device)
    return acc.diagonal() / max(stats.num_samples, 1)


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
    stats = _check_stats(stats)
    s, vh = _between_basis(stats, "class", _rank_rtol(rtol))
    q = _within_projection(stats, vh, features, labels, mode)
    return float((q / (s * s)).sum()) / int(stats.present.sum())


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
    stats = _check_stats(stats)
    s, vh = _between_basis(stats, "sample", _rank_rtol(rtol))
    q = _within_projection(stats, vh, features, labels, mode)
    return float((q / (s * s)).sum())


def nc1_quotient(stats: ClassStats, *, between: str = "class") -> float:
    """tr Sigma_W / tr Sigma_B (Tirer, Huang & Niles-Weed 2023). Needs no S_W:
    tr Sigma_W = sum_k ss_k / N. ``between="class"`` (Papyan) or ``"sample"`` (He & Su)."""
    stats = _check_stats(stats)
    if between not in ("class", "sample"):
        raise ValueError(f"Expected `between` to be one of ('class', 'sample'), got {between!r}")
    centred = stats.centred_means()
    if centred.shape[0] < 2:
        raise UndefinedMetricError(f"needs at least 2 present classes, got {centred.shape[0]}")
    if between == "class":
        w = torch.full((centred.shape[0],), 1.0 / centred.shape[0], dtype=torch.float64, device=centred.device)
    else:
        w = stats.counts[stats.present].double() / stats.num_samples
    tr_b = float((w * (centred * centred).sum(1)).sum())
    if tr_b == 0.0:
        raise UndefinedMetricError("all present class means coincide (tr Sigma_B = 0)")
    return float(stats.sqdev.sum()) / stats.num_samples / tr_b


def _cdnv(pairs: _Pairs, exponent: float) -> float:
    pairs.need_pairs("CDNV")
    if pairs["coincident"] > 0:
        raise UndefinedMetricError(f"{int(pairs['coincident'])} pair(s) of class means coincide (infinite CDNV)")
    return pairs["cdnv_sum"] / pairs["pairs"]


def nc1_cdnv(stats: ClassStats, *, exponent: float = 1.0) -> float:
    """Class-distance normalised variance (Galanti, Gyorgy & Hutter 2022): mean over pairs
    j < k of present classes of (sigma_j^2 + sigma_k^2) / (2 ||mu_j - mu_k||^(2p)),
    sigma_k^2 = ss_k / n_k, p = ``exponent`` (1 default; 2 is the variant used for
    language models). Reduced by ``pairwise_stats`` without a K x K matrix."""
    stats = _check_stats(stats)
    p = _positive_float(exponent, "exponent")
    present = stats.present
    pairs = _Pairs(stats.centred_means(), stats.class_variances()[present], cdnv_p=p)
    return _cdnv(pairs, p)


# ----------------------------------------------------------------------------- NC2
def _norms(rows: torch.Tensor) -> torch.Tensor:
    return rows.norm(dim=1)


def _equinorm(rows: torch.Tensor) -> float:
    if rows.shape[0] < 2:
        raise UndefinedMetricError(f"equinorm needs at least 2 rows (classes), got {rows.shape[0]}")
    norms = _norms(rows)
    mean = float(norms.mean())
    if mean == 0.0:
        raise UndefinedMetricError("equinorm is undefined when every row is zero")
    return float(norms.std(correction=0)) / mean


def _mean_cosine(pairs: _Pairs) -> float:
    pairs.need_cos("mean cosine")
    return pairs["cos_sum"] / pairs["cos_pairs"]


def _cos_std(pairs: _Pairs, what: str) -> float:
    pairs.need_cos(what)
    # Second moment about the ETF cosine -1/(m-1): no cancellation near a simplex ETF.
    n = pairs["cos_pairs"]
    shifted = pairs["cos_sum"] / n + 1.0 / (pairs.m - 1)
    return math.sqrt(max(pairs["etf_sq_sum"] / n - shifted * shifted, 0.0))


def _max_angle(pairs: _Pairs) -> float:
    pairs.need_cos("max_angle")
    return pairs["etf_abs_sum"] / pairs["cos_pairs"]


def _etf_error(pairs: _Pairs) -> float:
    pairs.need_pairs("etf_error")
    a, m = pairs.rows, pairs.m
    sq = (a * a).sum(1)
    gram_fro = math.sqrt(2.0 * pairs["dot_sq_sum"] + float((sq * sq).sum()))
    if gram_fro == 0.0:
        raise UndefinedMetricError("etf_error is undefined when every row is zero")
    total = a.sum(0)
    inner = float(sq.sum()) - float(total @ total) / m  # <A A^T, I - 11^T/m>
    return math.sqrt(max(2.0 - 2.0 * inner / (gram_fro * math.sqrt(m - 1)), 0.0))


def _gnc2(pairs: _Pairs, kernel: str) -> tuple[float, float]:
    pairs.need_cos("gnc2")
    if pairs["kernel_pairs"] < pairs["cos_pairs"]:
        raise UndefinedMetricError("two rows point in the same direction: the kernel energy is infinite")
    n = pairs["kernel_pairs"]
    mean = pairs[f"{kernel}_sum"] / n
    return mean, max(pairs[f"{kernel}_sq_sum"] / n - mean * mean, 0.0)


def equinorm(rows: torch.Tensor) -> float:
    """NC2 equinorm (Papyan et al. 2020): std_k ||a_k|| / mean_k ||a_k|| of the rows of
    ``rows`` (K, d) float (centred class means or classifier rows); population std."""
    return _equinorm(_check_rows(rows, "rows"))


def mean_cosine(rows: torch.Tensor) -> float:
    """Mean over pairs j != k of cos(a_j, a_k); -1/(K-1) for a simplex ETF."""
    return _mean_cosine(_Pairs(_check_rows(rows, "rows")))


def equiangularity(rows: torch.Tensor) -> float:
    """NC2 equiangularity (Papyan et al. 2020): population std over pairs j != k of
    cos(a_j, a_k), rows (K, d) float; pairs with a zero row are left out."""
    return _cos_std(_Pairs(_check_rows(rows, "rows")), "equiangularity")


def max_angle(rows: torch.Tensor) -> float:
    """NC2 maximal-angle gap (Papyan et al. 2020): mean over pairs j != k of
    |cos(a_j, a_k) + 1/(K-1)|, rows (K, d) float."""
    return _max_angle(_Pairs(_check_rows(rows, "rows")))


def etf_error(rows: torch.Tensor) -> float:
    """|| A A^T / ||A A^T||_F - (I - 11^T/K) / sqrt(K-1) ||_F (Papyan et al. 2020; Zhu et
    al. 2021), rows A (K, d) float. Expanded into norms, the row sum and the pairwise sum
    of squared dot products, so the K x K Gram is never held."""
    return _etf_error(_Pairs(_check_rows(rows, "rows")))


class Uniformity(NamedTuple):
    mean: float
    var: float


def gnc2(rows: torch.Tensor, *, kernel: str = "log", s: float = 1.0) -> Uniformity:
    """Generalised NC2, hyperspherical uniformity (Liu et al. 2023, "Generalizing and
    decoupling neural collapse via hyperspherical uniformity gap"): mean and population
    variance over pairs of the kernel on unit-normalised rows u_k = a_k/||a_k||:
    ``"log"``: log(1 / ||u_j - u_k||); ``"riesz"``: ||u_j - u_k||^-s. Meaningful for K > d + 1,
    where no simplex ETF exists."""
    if kernel not in ("log", "riesz"):
        raise ValueError(f"Expected `kernel` to be one of ('log', 'riesz'), got {kernel!r}")
    pairs = _Pairs(_check_rows(rows, "rows"), riesz_s=_positive_float(s, "s"))
    return Uniformity(*_gnc2(pairs, kernel))


# ----------------------------------------------------------------------------- NC3
def _self_duality(weight: torch.Tensor, centred: torch.Tensor) -> float:
    wn, mn = float(weight.norm()), float(centred.norm())
    if wn == 0.0 or mn == 0.0:
        raise UndefinedMetricError("self_duality is undefined when W or the centred means are zero")
    return float((weight / wn - centred / mn).square().sum())


def _uniform_duality(weight: torch.Tensor, centred: torch.Tensor) -> float:
    if weight.shape[0] < 2:
        raise UndefinedMetricError(f"uniform_duality needs at least 2 classes, got {weight.shape[0]}")
    wn, mn = weight.norm(dim=1), centred.norm(dim=1)
    if bool((wn == 0).any()) or bool((mn == 0).any()):
        raise UndefinedMetricError("uniform_duality needs nonzero classifier rows and centred means")
    cos = (weight * centred).sum(1) / (wn * mn)
    mean = float(cos.mean())
    if mean == 0.0:
        raise UndefinedMetricError("uniform_duality is undefined when the mean cosine is 0")
    return float(cos.std(correction=0)) / mean


def _paired(weight: Any, centred_means: Any) -> tuple[torch.Tensor, torch.Tensor]:
    w, m = _check_rows(weight, "weight"), _check_rows(centred_means, "centred_means")
    if w.shape != m.shape:
        raise ValueError(
            f"Expected `weight` and `centred_means` of the same shape, got {tuple(w.shape)} and {tuple(m.shape)}"
        )
    return w, m.to(w.device)


def self_duality(weight: torch.Tensor, centred_means: torch.Tensor) -> float:
    """NC3 self-duality (Papyan et al. 2020): || W/||W||_F - M~/||M~||_F ||_F^2, weight W
    (K', d) and centred means M~ (K', d), rows of the same (present) classes."""
    return _self_duality(*_paired(weight, centred_means))


def uniform_duality(weight: torch.Tensor, centred_means: torch.Tensor) -> float:
    """NC3 uniform duality (Papyan et al. 2020): coefficient of variation (population std /
    mean) over k of cos(w_k, mu_k - mu_G)."""
    return _uniform_duality(*_paired(weight, centred_means))


# ----------------------------------------------------------------------------- NC4
def nearest_centre_counts(
    features: torch.Tensor,
    labels: torch.Tensor,
    means: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    present: torch.Tensor | None = None,
    check_finite: bool = True,
) -> torch.Tensor:
    """NC4 counts (3,) int64 [n, ncc_correct, mismatch] on the features' device; one fused
    ``nearest_centre`` pass. NaN/Inf feature rows raise a ValueError naming the first one
    (one host synchronisation); ``check_finite=False`` skips that check, for a sync-free
    call inside a training step or ``torch.compile`` (the op then leaves such rows out).

    features (N, d) float; labels (N,) int32/int64 (rows outside [0, K) are not counted);
    means (K, d) float, the class centres (e.g. ``stats.means``, or last epoch's);
    weight (K, d) / bias (K,) the classifier (mismatch is 0 without ``weight``); present
    (K,) bool: only these centres compete (pass ``stats.present``: absent classes have zero
    means). means/weight/bias/present are moved to the features' device. ncc_correct
    counts argmin_k ||h - mu_k||^2 == y; mismatch counts argmin_k ||h - mu_k||^2 !=
    argmax_k (W h + b)_k (Papyan et al. 2020). Sum the counts over batches.
    """
    features, labels = _check_features(features, labels)
    if check_finite:
        _check_finite_rows(features)
    dev = features.device
    moved = [t.detach().to(dev) if isinstance(t, torch.Tensor) else t for t in (means, weight, bias, present)]
    return nearest_centre(features.detach(), labels.to(dev), *moved)[0]


def _check_ncc_counts(counts: Any, name: str = "ncc_counts") -> torch.Tensor:
    """(3,) integer tensor [n, ncc_correct, mismatch] with 0 <= ncc_correct, mismatch <= n."""
    form = "a (3,) integer tensor [n, ncc_correct, mismatch] with 0 <= ncc_correct, mismatch <= n"
    ok = isinstance(counts, torch.Tensor) and tuple(counts.shape) == (3,)
    ok = ok and not counts.is_floating_point() and not counts.is_complex() and counts.dtype != torch.bool
    if ok:
        n, correct, mismatch = (int(v) for v in counts.tolist())
        ok = n >= 0 and 0 <= correct <= n and 0 <= mismatch <= n
    if not ok:
        raise ValueError(f"Expected `{name}` to be {form}, got {counts!r}")
    return counts.detach().cpu().long()


def ncc_accuracy(counts: torch.Tensor) -> float:
    """NC4 nearest-class-centre accuracy ncc_correct / n from :func:`nearest_centre_counts`."""
    n, correct, _ = (int(v) for v in _check_ncc_counts(counts, "counts").tolist())
    if n == 0:
        raise UndefinedMetricError("no samples were classified")
    return correct / n


def ncc_mismatch(counts: torch.Tensor) -> float:
    """NC4 (Papyan et al. 2020): fraction of samples whose nearest class centre differs from
    the classifier's prediction, from :func:`nearest_centre_counts` (computed with ``weight``)."""
    n, _, mismatch = (int(v) for v in _check_ncc_counts(counts, "counts").tolist())
    if n == 0:
        raise UndefinedMetricError("no samples were classified")
    return mismatch / n


# ---------------------------------------------------------------- minority collapse
@dataclass
class MinorityCollapse:
    """Minority collapse (Fang, He, Long & Su 2021, "Exploring deep neural networks via
    layer-peeled model"): ``None`` fields were undefined (need weights / 2 minority rows)."""

    minority: list[int]
    weight_cos_mean: float | None = None
    weight_cos_std: float | None = None
    mean_cos_mean: float | None = None
    mean_cos_std: float | None = None
    norm_ratio: float | None = None
    spread: float | None = None


def _minority_set(stats: ClassStats, minority: Any, threshold: float) -> list[int]:
    present = stats.present
    if minority is None:
        threshold = _positive_float(threshold, "minority_threshold")
        n = stats.counts
        cut = threshold * float(n.max())
        return [k for k in range(stats.num_classes) if bool(present[k]) and float(n[k]) < cut]
    bad = ValueError(f"Expected `minority` to be class indices in [0, {stats.num_classes}), got {minority!r}")
    if isinstance(minority, torch.Tensor) and (minority.is_floating_point() or minority.dtype == torch.bool):
        raise bad
    try:
        items = minority.tolist() if isinstance(minority, torch.Tensor) else list(minority)
    except TypeError:
        raise bad from None
    indices = []
    for k in items:
        try:
            index = None if isinstance(k, bool) or "bool" in str(getattr(k, "dtype", "")) else operator.index(k)
        except TypeError:
            index = None
        if index is None or not 0 <= index < stats.num_classes:
            raise bad
        indices.append(index)
    return sorted({k for k in indices if bool(present[k])})


def _minority_parts(
    stats: ClassStats, weight: torch.Tensor | None, minority: list[int]
) -> tuple[MinorityCollapse, dict[str, str]]:
    result, reasons = MinorityCollapse(minority=minority), {}
    present_ids = stats.present.nonzero().flatten().tolist()
    position = {k: i for i, k in enumerate(present_ids)}
    rows = [position[k] for k in minority]
    majority = [i for k, i in position.items() if k not in set(minority)]
    if len(rows) < 2:
        why = f"needs at least 2 present minority classes, got {len(rows)}"
        reasons.update({n: why for n in ("mean_cos_mean", "mean_cos_std", "weight_cos_mean", "weight_cos_std")})
    else:
        pm = _Pairs(stats.centred_means(), subset=rows)
        try:
            result.mean_cos_mean, result.mean_cos_std = _mean_cosine(pm), _cos_std(pm, "minority cosine")
        except UndefinedMetricError as err:
            reasons.update({"mean_cos_mean": str(err), "mean_cos_std": str(err)})
    if weight is None:
        why = "needs the classifier `weight`"
        for name in ("weight_cos_mean", "weight_cos_std", "norm_ratio", "spread"):
            reasons.setdefault(name, why)
        return result, reasons
    w = weight[stats.present]
    norms = w.norm(dim=1)
    if len(rows) >= 2:
        pw = _Pairs(w, subset=rows)
        try:
            result.weight_cos_mean, result.weight_cos_std = _mean_cosine(pw), _cos_std(pw, "minority cosine")
        except UndefinedMetricError as err:
            reasons.update({"weight_cos_mean": str(err), "weight_cos_std": str(err)})
        mean_sq = float((norms * norms).mean())
        if mean_sq > 0:
            result.spread = pw["dist_sq_max"] / mean_sq
        else:
            reasons["spread"] = "every classifier row is zero"
    else:
        reasons["spread"] = f"needs at least 2 present minority classes, got {len(rows)}"
    if not rows or not majority:
        reasons["norm_ratio"] = "needs both minority and majority classes"
    elif float(norms[majority].mean()) == 0.0:
        reasons["norm_ratio"] = "every majority classifier row is zero"
    else:
        result.norm_ratio = float(norms[rows].mean()) / float(norms[majority].mean())
    return result, reasons


def minority_collapse(
    stats: ClassStats,
    weight: torch.Tensor | None = None,
    *,
    minority: Sequence[int] | torch.Tensor | None = None,
    minority_threshold: float = 0.5,
) -> MinorityCollapse:
    """Minority collapse (Fang, He, Long & Su 2021): among the minority classes (explicit
    indices, or the present classes with n_k < ``minority_threshold`` * max n_k), mean and
    population std of pairwise cosines of classifier rows and of centred means; the ratio of
    mean minority to mean majority classifier norm; and the spread
    max_{j,k minority} ||w_j - w_k||^2 / mean_k ||w_k||^2 (present classes). A cosine alone
    is not enough: minority rows may shrink to zero norm instead of aligning."""
    stats = _check_stats(stats)
    w = _check_weight(weight, stats) if weight is not None else None
    return _minority_parts(stats, w, _minority_set(stats, minority, minority_threshold))[0]


# ---------------------------------------------------------- imbalanced MSE geometry
def _orthogonal_frame_error(pairs: _Pairs) -> float:
    pairs.need_pairs("orthogonal_frame_error")
    sq = (pairs.rows * pairs.rows).sum(1)
    diag = float((sq * sq).sum())
    total = diag + 2.0 * pairs["dot_sq_sum"]
    if total == 0.0:
        raise UndefinedMetricError("orthogonal_frame_error is undefined when every row is zero")
    return math.sqrt(max(total - diag, 0.0) / total)


def orthogonal_frame_error(rows: torch.Tensor) -> float:
    """Distance to an orthogonal frame: ||G - diag(G)||_F / ||G||_F with G = A A^T, rows A
    (K, d) float. Imbalanced bias-free MSE training collapses to an orthogonal frame whose
    lengths grow with n_k (Dang et al. 2023, "Neural collapse in deep linear networks: from
    balanced to imbalanced data"; Thrampoulidis et al. 2022); 0 for mutually orthogonal rows
    of any lengths. Pair it with ``lengths`` vs ``counts`` to check their ordering."""
    return _orthogonal_frame_error(_Pairs(_check_rows(rows, "rows")))


# ------------------------------------------------------------------ separation law
class SeparationLaw(NamedTuple):
    """Fit log D_l = intercept + l log rho (He & Su 2023)."""

    rho: float
    r2: float
    pearson: float
    intercept: float


def fit_separation_law(values: Sequence[float] | torch.Tensor, layers: Sequence[float] | None = None) -> SeparationLaw:
    """Layer-wise law of data separation (He & Su 2023): least-squares fit of
    log D_l = a + l log rho to the separation fuzziness D_l of layers l = 0, 1, ... (or
    ``layers``). Returns rho (the per-layer decay), R^2 of the fit and the Pearson
    correlation of (l, log D_l) (-1 for an exact geometric decay)."""
    d = torch.as_tensor(values, dtype=torch.float64).flatten().cpu()
    if d.numel() < 2:
        raise ValueError(f"Expected `values` to hold at least 2 layers, got {d.numel()}")
    if not bool(torch.isfinite(d).all()) or not bool((d > 0).all()):
        raise ValueError(f"Expected `values` to be positive finite numbers, got {d.tolist()}")
    x = torch.arange(d.numel(), dtype=torch.float64) if layers is None else torch.as_tensor(layers, dtype=torch.float64)
    if x.shape != d.shape:
        raise ValueError(f"Expected `layers` of length {d.numel()} like `values`, got {x.numel()}")
    yv = d.log()
    xc, yc = x - x.mean(), yv - yv.mean()
    sxx, syy, sxy = float(xc @ xc), float(yc @ yc), float(xc @ yc)
    if sxx == 0.0:
        raise ValueError("Expected at least two distinct `layers`")
    slope = sxy / sxx
    intercept = float(yv.mean()) - slope * float(x.mean())
    if syy == 0.0:
        return SeparationLaw(math.exp(slope), 1.0, 0.0, intercept)
    resid = yc - slope * xc
    r2 = 1.0 - float(resid @ resid) / syy
    return SeparationLaw(math.exp(slope), r2, sxy / math.sqrt(sxx * syy), intercept)


# --------------------------------------------------------------------------- bundle
@dataclass
class CollapseMetrics:
    """Every metric :func:`collapse_metrics` could compute; ``None`` with a reason in
    ``undefined`` otherwise. ``*_means`` are on the centred class means M~, ``*_weights``
    on the classifier rows of the present classes."""

    num_samples: int = 0
    num_present: int = 0
    nc1: float | None = None
    nc1_cdnv: float | None = None
    nc1_quotient: float | None = None
    separation_fuzziness: float | None = None
    equinorm_means: float | None = None
    equiangularity_means: float | None = None
    mean_cosine_means: float | None = None
    max_angle_means: float | None = None
    etf_error_means: float | None = None
    gnc2_means: float | None = None
    gnc2_var_means: float | None = None
    equinorm_weights: float | None = None
    equiangularity_weights: float | None = None
    mean_cosine_weights: float | None = None
    max_angle_weights: float | None = None
    etf_error_weights: float | None = None
    gnc2_weights: float | None = None
    gnc2_var_weights: float | None = None
    self_duality: float | None = None
    uniform_duality: float | None = None
    ncc_accuracy: float | None = None
    ncc_mismatch: float | None = None
    minority_weight_cos_mean: float | None = None
    minority_weight_cos_std: float | None = None
    minority_mean_cos_mean: float | None = None
    minority_mean_cos_std: float | None = None
    minority_norm_ratio: float | None = None
    minority_spread: float | None = None
    orthogonal_frame_error_means: float | None = None
    orthogonal_frame_error_weights: float | None = None
    minority_classes: list[int] = field(default_factory=list)
    absent_classes: list[int] = field(default_factory=list)
    ncc_means: str | None = None
    undefined: dict[str, str] = field(default_factory=dict)

    _NOT_METRICS = ("minority_classes", "absent_classes", "ncc_means", "undefined")

    def to_dict(self) -> dict[str, float | None]:
        """Flat {name: float or None} of the numbers (counts as floats), for loggers."""
        out: dict[str, float | None] = {}
        for f in fields(self):
            if f.name in self._NOT_METRICS:
                continue
            value = getattr(self, f.name)
            out[f.name] = None if value is None else float(value)
        return out

    def __str__(self) -> str:
        rows = [
            (name, "-" if v is None else f"{v:.6g}", self.undefined.get(name, "")) for name, v in self.to_dict().items()
        ]
        width = max(len(r[0]) for r in rows)
        lines = [f"{'metric':<{width}}  {'value':>12}  note", "-" * (width + 20)]
        lines += [f"{n:<{width}}  {v:>12}  {note}".rstrip() for n, v, note in rows]
        lines.append(f"absent classes: {self.absent_classes or 'none'}")
        lines.append(f"minority classes: {self.minority_classes or 'none'}")
        if self.ncc_means:
            lines.append(f"NC4 centres: {self.ncc_means}")
        return "\n".join(lines)


def collapse_metrics(
    stats: ClassStats,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    minority: Sequence[int] | torch.Tensor | None = None,
    minority_threshold: float = 0.5,
    features: Any = None,
    labels: Any = None,
    ncc_counts: torch.Tensor | None = None,
    cdnv_exponent: float = 1.0,
    rtol: float | None = None,
) -> CollapseMetrics:
    """All the metrics computable from ``stats`` (a ClassStats) and what else is given.

    weight (K, d) / bias (K,): the last layer; enables the ``*_weights`` NC2 metrics, NC3,
    the NC4 mismatch and the classifier parts of minority collapse. features (N, d) /
    labels (N,) (tensors or sequences of batches, the data the statistics came from): NC4
    pass with the current means, and the projected NC1 mode when ``stats`` has no S_W.
    ncc_counts: (3,) int64 [n, ncc_correct, mismatch] accumulated elsewhere (e.g. by a
    monitor with the previous epoch's means, :func:`nearest_centre_counts`); used when
    ``features`` is not given. minority: explicit class indices, or None for the present
    classes with n_k < ``minority_threshold`` * max n_k (minority metrics only when both
    minority and majority classes exist). Undefined metrics are ``None`` and explained in
    ``undefined``; absent classes are excluded everywhere and listed.
    """
    stats = _check_stats(stats)
    w = _check_weight(weight, stats) if weight is not None else None
    if bias is not None:
        bias = _check_bias(bias, stats.num_classes)
        if w is None:
            raise ValueError("Expected `weight` together with `bias`, got only `bias`")
    if (features is None) != (labels is None):
        raise ValueError("Expected `features` and `labels` together, got only one of them")
    if features is not None:
        # Checked once up front, and iterated twice (projected NC1, NC4): materialise.
        batches = list(_batches(features, labels))
        features, labels = [x for x, _ in batches], [y for _, y in batches]
    if ncc_counts is not None:
        ncc_counts = _check_ncc_counts(ncc_counts)
    p = _positive_float(cdnv_exponent, "cdnv_exponent")
    rtol = _rank_rtol(rtol)
    stats.check_rejected()
    present = stats.present
    out = CollapseMetrics(
        num_samples=stats.num_samples,
        num_present=int(present.sum()),
        absent_classes=(~present).nonzero().flatten().tolist(),
    )
    reasons = out.undefined

    def put(name: str, fn, *args) -> None:
        try:
            setattr(out, name, fn(*args))
        except UndefinedMetricError as err:
            reasons[name] = str(err)

    put("nc1", lambda: nc1(stats, features=features, labels=labels, rtol=rtol))
    put("separation_fuzziness", lambda: separation_fuzziness(stats, features=features, labels=labels, rtol=rtol))
    put("nc1_quotient", lambda: nc1_quotient(stats))
    centred = stats.centred_means()
    pm = _Pairs(centred, stats.class_variances()[present], cdnv_p=p)
    put("nc1_cdnv", _cdnv, pm, p)
    _nc2(out, "means", centred, pm, put)
    put("orthogonal_frame_error_means", lambda: _orthogonal_frame_error(_Pairs(stats.means[present])))

    if w is not None:
        wp = w[present]
        pw = _Pairs(wp)
        _nc2(out, "weights", wp, pw, put)
        put("orthogonal_frame_error_weights", _orthogonal_frame_error, pw)
        put("self_duality", _self_duality, wp, centred)
        put("uniform_duality", _uniform_duality, wp, centred)
    else:
        why = "needs the classifier `weight`"
        for name in ("self_duality", "uniform_duality", "orthogonal_frame_error_weights", "ncc_mismatch"):
            reasons[name] = why
        for name in ("equinorm", "equiangularity", "mean_cosine", "max_angle", "etf_error", "gnc2", "gnc2_var"):
            reasons[f"{name}_weights"] = why

    _ncc(out, stats, w, bias, features, labels, ncc_counts, put)
    _minority(out, stats, w, minority, minority_threshold)
    return out


def _nc2(out: CollapseMetrics, suffix: str, rows: torch.Tensor, pairs: _Pairs, put) -> None:
    put(f"equinorm_{suffix}", _equinorm, rows)
    put(f"equiangularity_{suffix}", _cos_std, pairs, "equiangularity")
    put(f"mean_cosine_{suffix}", _mean_cosine, pairs)
    put(f"max_angle_{suffix}", _max_angle, pairs)
    put(f"etf_error_{suffix}", _etf_error, pairs)
    try:
        mean, var = _gnc2(pairs, "log")
        setattr(out, f"gnc2_{suffix}", mean)
        setattr(out, f"gnc2_var_{suffix}", var)
    except UndefinedMetricError as err:
        out.undefined[f"gnc2_{suffix}"] = out.undefined[f"gnc2_var_{suffix}"] = str(err)


def _ncc(out, stats, w, bias, features, labels, ncc_counts, put) -> None:
    if features is not None:
        counts = torch.zeros(3, dtype=torch.int64)
        for x, y in _batches(features, labels):
            wx = w.to(x.device) if w is not None else None
            bx = bias.to(x.device) if bias is not None else None
            counts += nearest_centre_counts(x, y, stats.means.to(x.device), wx, bx, present=stats.present).cpu()
        out.ncc_means = "current class means (second pass over `features`)"
    elif ncc_counts is not None:
        counts = ncc_counts.cpu()
        out.ncc_means = "precomputed `ncc_counts` (e.g. previous-epoch means)"
    else:
        why = "needs `features`/`labels` or precomputed `ncc_counts`"
        out.undefined["ncc_accuracy"] = why
        out.undefined.setdefault("ncc_mismatch", why)
        return
    put("ncc_accuracy", ncc_accuracy, counts)
    if w is not None:
        put("ncc_mismatch", ncc_mismatch, counts)


def _minority(out, stats, w, minority, threshold) -> None:
    names = ("weight_cos_mean", "weight_cos_std", "mean_cos_mean", "mean_cos_std", "norm_ratio", "spread")
    chosen = _minority_set(stats, minority, threshold)
    majority = int(stats.present.sum()) - len(chosen)
    out.minority_classes = chosen
    if not chosen or majority == 0:
        why = ("no minority classes" if not chosen else "no majority classes (every present class is a minority)") + (
            f" (threshold {threshold} * max n_k)" if minority is None else ""
        )
        for name in names:
            out.undefined[f"minority_{name}"] = why
        return
    result, reasons = _minority_parts(stats, w, chosen)
    for name in names:
        setattr(out, f"minority_{name}", getattr(result, name))
        if name in reasons:
            out.undefined[f"minority_{name}"] = reasons[name]
