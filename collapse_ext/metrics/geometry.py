"""NC2 (class means and classifier rows approach a simplex ETF), its hyperspherical
generalisation, the orthogonal frame of imbalanced MSE training, and NC3 (self-duality).

Each public function takes rows (K, d) float (centred class means or classifier rows);
the private ``*_of`` forms take the :class:`~collapse_ext.metrics._inputs.Pairs` of rows
already reduced by ``pairwise_stats``, so the bundle reduces each row set once.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from .._validate import choice, positive_float
from ._inputs import Pairs, UndefinedMetricError, check_rows

__all__ = [
    "Uniformity",
    "equiangularity",
    "equinorm",
    "etf_error",
    "gnc2",
    "max_angle",
    "mean_cosine",
    "orthogonal_frame_error",
    "self_duality",
    "uniform_duality",
]


# ----------------------------------------------------------------------------- NC2
def equinorm_of(rows: torch.Tensor) -> float:
    if rows.shape[0] < 2:
        raise UndefinedMetricError(f"equinorm needs at least 2 rows (classes), got {rows.shape[0]}")
    norms = rows.norm(dim=1)
    mean = float(norms.mean())
    if mean == 0.0:
        raise UndefinedMetricError("equinorm is undefined when every row is zero")
    return float(norms.std(correction=0)) / mean


def max_angle_of(pairs: Pairs) -> float:
    pairs.need_cos("max_angle")
    return pairs["etf_abs_sum"] / pairs["cos_pairs"]


def etf_error_of(pairs: Pairs) -> float:
    pairs.need_pairs("etf_error")
    a, m = pairs.rows, pairs.m
    sq = (a * a).sum(1)
    gram_fro = math.sqrt(2.0 * pairs["dot_sq_sum"] + float((sq * sq).sum()))
    if gram_fro == 0.0:
        raise UndefinedMetricError("etf_error is undefined when every row is zero")
    total = a.sum(0)
    inner = float(sq.sum()) - float(total @ total) / m  # <A A^T, I - 11^T/m>
    return math.sqrt(max(2.0 - 2.0 * inner / (gram_fro * math.sqrt(m - 1)), 0.0))


class Uniformity(NamedTuple):
    mean: float
    var: float


def gnc2_of(pairs: Pairs, kernel: str = "log") -> Uniformity:
    pairs.need_cos("gnc2")
    if pairs["kernel_pairs"] < pairs["cos_pairs"]:
        raise UndefinedMetricError("two rows point in the same direction: the kernel energy is infinite")
    n = pairs["kernel_pairs"]
    mean = pairs[f"{kernel}_sum"] / n
    return Uniformity(mean, max(pairs[f"{kernel}_sq_sum"] / n - mean * mean, 0.0))


def equinorm(rows: torch.Tensor) -> float:
    """NC2 equinorm (Papyan et al. 2020): std_k ||a_k|| / mean_k ||a_k|| of the rows of
    ``rows`` (K, d) float (centred class means or classifier rows); population std."""
    return equinorm_of(check_rows(rows, "rows"))


def mean_cosine(rows: torch.Tensor) -> float:
    """Mean over pairs j != k of cos(a_j, a_k); -1/(K-1) for a simplex ETF."""
    return Pairs(check_rows(rows, "rows")).mean_cosine()


def equiangularity(rows: torch.Tensor) -> float:
    """NC2 equiangularity (Papyan et al. 2020): population std over pairs j != k of
    cos(a_j, a_k), rows (K, d) float; pairs with a zero row are left out."""
    return Pairs(check_rows(rows, "rows")).cosine_std("equiangularity")


def max_angle(rows: torch.Tensor) -> float:
    """NC2 maximal-angle gap (Papyan et al. 2020): mean over pairs j != k of
    |cos(a_j, a_k) + 1/(K-1)|, rows (K, d) float."""
    return max_angle_of(Pairs(check_rows(rows, "rows")))


def etf_error(rows: torch.Tensor) -> float:
    """|| A A^T / ||A A^T||_F - (I - 11^T/K) / sqrt(K-1) ||_F (Papyan et al. 2020; Zhu et
    al. 2021), rows A (K, d) float. Expanded into norms, the row sum and the pairwise sum
    of squared dot products, so the K x K Gram is never held."""
    return etf_error_of(Pairs(check_rows(rows, "rows")))


def gnc2(rows: torch.Tensor, *, kernel: str = "log", s: float = 1.0) -> Uniformity:
    """Generalised NC2, hyperspherical uniformity (Liu et al. 2023, "Generalizing and
    decoupling neural collapse via hyperspherical uniformity gap"): mean and population
    variance over pairs of the kernel on unit-normalised rows u_k = a_k/||a_k||:
    ``"log"``: log(1 / ||u_j - u_k||); ``"riesz"``: ||u_j - u_k||^-s. Meaningful for K > d + 1,
    where no simplex ETF exists."""
    kernel = choice(kernel, "kernel", ("log", "riesz"))
    return gnc2_of(Pairs(check_rows(rows, "rows"), riesz_s=positive_float(s, "s")), kernel)


# ---------------------------------------------------------- imbalanced MSE geometry
def orthogonal_frame_error_of(pairs: Pairs) -> float:
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
    of any lengths. Pair it with ``lengths`` vs the class sizes to check their ordering."""
    return orthogonal_frame_error_of(Pairs(check_rows(rows, "rows")))


# ----------------------------------------------------------------------------- NC3
def self_duality_of(weight: torch.Tensor, centred: torch.Tensor) -> float:
    wn, mn = float(weight.norm()), float(centred.norm())
    if wn == 0.0 or mn == 0.0:
        raise UndefinedMetricError("self_duality is undefined when W or the centred means are zero")
    return float((weight / wn - centred / mn).square().sum())


def uniform_duality_of(weight: torch.Tensor, centred: torch.Tensor) -> float:
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
    w, m = check_rows(weight, "weight"), check_rows(centred_means, "centred_means")
    if w.shape != m.shape:
        raise ValueError(
            f"Expected `weight` and `centred_means` of the same shape, got {tuple(w.shape)} and {tuple(m.shape)}"
        )
    return w, m.to(w.device)


def self_duality(weight: torch.Tensor, centred_means: torch.Tensor) -> float:
    """NC3 self-duality (Papyan et al. 2020): || W/||W||_F - M~/||M~||_F ||_F^2, weight W
    (K', d) and centred means M~ (K', d), rows of the same (present) classes."""
    return self_duality_of(*_paired(weight, centred_means))


def uniform_duality(weight: torch.Tensor, centred_means: torch.Tensor) -> float:
    """NC3 uniform duality (Papyan et al. 2020): coefficient of variation (population std /
    mean) over k of cos(w_k, mu_k - mu_G)."""
    return uniform_duality_of(*_paired(weight, centred_means))
