"""NC4, nearest class centre (SPEC: "Metrics", NC4; Papyan et al. 2020): tallies of one
fused ``nearest_centre`` pass, and the two fractions made from them."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .._ops import nearest_centre
from ._inputs import UndefinedMetricError, check_features, check_finite_rows

__all__ = ["ncc_accuracy", "ncc_mismatch", "nearest_centre_counts", "nearest_centre_tallies"]


def nearest_centre_tallies(
    features: torch.Tensor,
    labels: torch.Tensor,
    means: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    present: torch.Tensor | None = None,
    check_finite: bool = True,
) -> torch.Tensor:
    """NC4 tallies (3,) int64 [n, ncc_correct, mismatch] on the features' device; one fused
    ``nearest_centre`` pass. NaN/Inf feature rows raise a ValueError naming the first one
    (one host synchronisation); ``check_finite=False`` skips that check, for a sync-free
    call inside a training step or ``torch.compile`` (the op then leaves such rows out).

    features (N, d) float; labels (N,) int32/int64 (rows outside [0, K) are not counted);
    means (K, d) float, the class centres (e.g. ``stats.means``, or last epoch's);
    weight (K, d) / bias (K,) the classifier (mismatch is 0 without ``weight``); present
    (K,) bool: only these centres compete (pass ``stats.present``: absent classes have zero
    means). means/weight/bias/present are moved to the features' device. ncc_correct
    tallies argmin_k ||h - mu_k||^2 == y; mismatch tallies argmin_k ||h - mu_k||^2 !=
    argmax_k (W h + b)_k (Papyan et al. 2020). Sum the tallies over batches.
    """
    features, labels = check_features(features, labels)
    if check_finite:
        check_finite_rows(features)
    dev = features.device
    moved = [t.detach().to(dev) if isinstance(t, torch.Tensor) else t for t in (means, weight, bias, present)]
    return nearest_centre(features.detach(), labels.to(dev), *moved)[0]


def nearest_centre_counts(*args: Any, **kwargs: Any) -> torch.Tensor:
    """Deprecated name of :func:`nearest_centre_tallies` ("counts" are class sizes n_k)."""
    warnings.warn("nearest_centre_counts is deprecated: use nearest_centre_tallies", DeprecationWarning, stacklevel=2)
    return nearest_centre_tallies(*args, **kwargs)


def check_ncc_tallies(tallies: Any, name: str = "ncc_tallies") -> torch.Tensor:
    """(3,) integer tensor [n, ncc_correct, mismatch] with 0 <= ncc_correct, mismatch <= n."""
    form = "a (3,) integer tensor [n, ncc_correct, mismatch] with 0 <= ncc_correct, mismatch <= n"
    ok = isinstance(tallies, torch.Tensor) and tuple(tallies.shape) == (3,)
    ok = ok and not tallies.is_floating_point() and not tallies.is_complex() and tallies.dtype != torch.bool
    if ok:
        n, correct, mismatch = (int(v) for v in tallies.tolist())
        ok = n >= 0 and 0 <= correct <= n and 0 <= mismatch <= n
    if not ok:
        raise ValueError(f"Expected `{name}` to be {form}, got {tallies!r}")
    return tallies.detach().cpu().long()


def _fraction(tallies: Any, column: int) -> float:
    values = check_ncc_tallies(tallies, "tallies").tolist()
    if values[0] == 0:
        raise UndefinedMetricError("no samples were classified")
    return values[column] / values[0]


def ncc_accuracy(tallies: torch.Tensor) -> float:
    """NC4 nearest-class-centre accuracy ncc_correct / n from :func:`nearest_centre_tallies`."""
    return _fraction(tallies, 1)


def ncc_mismatch(tallies: torch.Tensor) -> float:
    """NC4 (Papyan et al. 2020): fraction of samples whose nearest class centre differs from
    the classifier's prediction, from :func:`nearest_centre_tallies` (computed with ``weight``)."""
    return _fraction(tallies, 2)
