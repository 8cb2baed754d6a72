"""Input checks of the metric functions and the pairwise sums they share.

Every tensor that comes in is detached and promoted to float64: the metrics are as exact
as the statistics and never take part in autograd.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from typing import Any

import torch

from .._ops import PAIRWISE_FIELDS, pairwise_stats
from ..stats import ClassStats


class UndefinedMetricError(ValueError):
    """A metric is undefined for this input (the message says why)."""


def check_stats(stats: Any) -> ClassStats:
    if not isinstance(stats, ClassStats):
        raise TypeError(f"Expected `stats` to be a ClassStats, got {type(stats).__name__}")
    return stats


def check_rows(rows: Any, name: str) -> torch.Tensor:
    """(K, d) finite floating tensor -> detached float64."""
    if not isinstance(rows, torch.Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor, got {type(rows).__name__}")
    if rows.dim() != 2:
        raise ValueError(f"Expected `{name}` to be a 2-D (K, d) tensor, got shape {tuple(rows.shape)}")
    if not rows.is_floating_point():
        raise TypeError(f"Expected `{name}` to be a floating tensor, got {rows.dtype}")
    if not bool(torch.isfinite(rows).all()):
        raise ValueError(f"Expected finite `{name}`, got NaN or Inf")
    return rows.detach().double()


def check_weight(weight: Any, stats: ClassStats, name: str = "weight") -> torch.Tensor:
    """The classifier (K, d) of ``stats``' classes, float64 on the statistics' device."""
    w = check_rows(weight, name)
    expected = (stats.num_classes, stats.dim)
    if tuple(w.shape) != expected:
        raise ValueError(f"Expected `{name}` of shape (K, d) = {expected}, got {tuple(w.shape)}")
    return w.to(stats.device)


def check_bias(bias: Any, num_classes: int) -> torch.Tensor:
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"Expected `bias` to be a torch.Tensor, got {type(bias).__name__}")
    if tuple(bias.shape) != (num_classes,):
        raise ValueError(f"Expected `bias` of shape (K,) = ({num_classes},), got {tuple(bias.shape)}")
    if not bias.is_floating_point():
        raise TypeError(f"Expected `bias` to be a floating tensor, got {bias.dtype}")
    if not bool(torch.isfinite(bias).all()):
        raise ValueError("Expected finite `bias`, got NaN or Inf")
    return bias.detach()


def rank_rtol(value: Any) -> float | None:
    """None (the default tolerance) or a finite real number in [0, 1)."""
    if value is None:
        return None
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not 0 <= value < 1:
        raise ValueError(f"Expected `rtol` to be None or a finite number in [0, 1), got {value!r}")
    return float(value)


def check_finite_rows(features: torch.Tensor, first_row: int = 0) -> None:
    """Raise on NaN/Inf rows of features (N, d), naming the first one (a host sync)."""
    bad = ~torch.isfinite(features).all(1)
    if bool(bad.any()):
        row = first_row + int(bad.nonzero()[0, 0])
        raise ValueError(f"Expected finite `features`, got NaN or Inf in row {row}")


def check_features(x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
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


def batches(features: Any, labels: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
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
        x, y = check_features(x, y)
        check_finite_rows(x, row)
        row += x.shape[0]
        checked.append((x, y))
    yield from checked


class Pairs:
    """The ``pairwise_stats`` vector of one row set, by field name, plus its rows.

    rows: (K, d) float; subset: optional row indices (a list or an integer tensor), the
    pairs then run over those rows only; variances / riesz_s / cdnv_p as in ``pairwise_stats``.
    """

    def __init__(
        self,
        rows: torch.Tensor,
        variances: torch.Tensor | None = None,
        subset: Any = None,
        riesz_s: float = 1.0,
        cdnv_p: float = 1.0,
    ):
        if subset is not None and not isinstance(subset, torch.Tensor):
            subset = torch.as_tensor(subset, dtype=torch.int64, device=rows.device)
        self.rows = rows if subset is None else rows[subset]
        self.m = self.rows.shape[0]
        values = pairwise_stats(rows, variances, subset, riesz_s, cdnv_p).tolist()
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

    def mean_cosine(self, what: str = "mean cosine") -> float:
        """Mean over the pairs of cos(a_j, a_k) (pairs with a zero row left out)."""
        self.need_cos(what)
        return self["cos_sum"] / self["cos_pairs"]

    def cosine_std(self, what: str) -> float:
        """Population std over the pairs of cos(a_j, a_k)."""
        self.need_cos(what)
        # Second moment about the ETF cosine -1/(m-1): no cancellation near a simplex ETF.
        n = self["cos_pairs"]
        shifted = self["cos_sum"] / n + 1.0 / (self.m - 1)
        return math.sqrt(max(self["etf_sq_sum"] / n - shifted * shifted, 0.0))
