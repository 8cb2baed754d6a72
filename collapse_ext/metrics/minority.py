"""Minority Collapse (SPEC: "Minority collapse"; Fang, He, Long & Su 2021, "Exploring deep
neural networks via layer-peeled model"): the one implementation, used by the metric
bundle and by the Layer-Peeled Model sweep, and its one vocabulary:

- ``minority_cos_mean`` / ``minority_cos_std``: mean and population std of the pairwise
  cosines among minority classifier rows (``majority_*`` likewise among the majority);
- ``minority_norm`` / ``majority_norm``: mean classifier row norm of each group, and
  ``norm_ratio`` = minority_norm / majority_norm;
- ``minority_spread`` = max_{j,k minority} ||w_j - w_k||^2 / mean_k ||w_k||^2;
- ``minority_mean_cos_mean`` / ``minority_mean_cos_std``: the cosines among the minority
  centred class means (statistics only).

A cosine alone is not enough: minority rows may shrink to zero norm instead of aligning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .._validate import class_indices, positive_float
from ..stats import ClassStats
from ._inputs import Pairs, UndefinedMetricError, check_stats, check_weight

__all__ = ["CLASSIFIER_FIELDS", "MINORITY_FIELDS", "MinorityCollapse", "minority_collapse"]

# Fields measured on the classifier rows (the LPM sweep's columns).
CLASSIFIER_FIELDS = (
    "minority_cos_mean",
    "minority_cos_std",
    "majority_cos_mean",
    "majority_cos_std",
    "minority_norm",
    "majority_norm",
    "norm_ratio",
    "minority_spread",
)
MINORITY_FIELDS = (*CLASSIFIER_FIELDS, "minority_mean_cos_mean", "minority_mean_cos_std")


@dataclass
class MinorityCollapse:
    """Minority collapse of the classes ``minority``; ``None`` fields were undefined (no
    weight, fewer than 2 rows in a group, zero rows); names as in the module docstring."""

    minority: list[int]
    minority_cos_mean: float | None = None
    minority_cos_std: float | None = None
    majority_cos_mean: float | None = None
    majority_cos_std: float | None = None
    minority_norm: float | None = None
    majority_norm: float | None = None
    norm_ratio: float | None = None
    minority_spread: float | None = None
    minority_mean_cos_mean: float | None = None
    minority_mean_cos_std: float | None = None


def _cosines(rows: torch.Tensor, group: list[int], what: str) -> tuple[Pairs | None, tuple[float, float] | str]:
    """(Pairs of the group, (mean, std) of its cosines) or (Pairs or None, why undefined)."""
    if len(group) < 2:
        return None, f"needs at least 2 present {what} classes, got {len(group)}"
    pairs = Pairs(rows, subset=group)
    try:
        return pairs, (pairs.mean_cosine(f"{what} cosine"), pairs.cosine_std(f"{what} cosine"))
    except UndefinedMetricError as err:
        return pairs, str(err)


def classifier_minority_stats(
    weight: torch.Tensor, minority: Sequence[int], majority: Sequence[int]
) -> tuple[dict[str, float], dict[str, str]]:
    """The ``CLASSIFIER_FIELDS`` of classifier rows weight (K, p) float64 whose rows
    ``minority`` / ``majority`` (row positions) form the two groups: ({name: value} of the
    defined ones, {name: why} of the others)."""
    values: dict[str, float] = {}
    reasons: dict[str, str] = {}
    minority, majority = list(minority), list(majority)
    norms = weight.norm(dim=1)
    minority_pairs, cos = _cosines(weight, minority, "minority")
    if isinstance(cos, str):
        reasons["minority_cos_mean"] = reasons["minority_cos_std"] = cos
    else:
        values["minority_cos_mean"], values["minority_cos_std"] = cos
    _, cos = _cosines(weight, majority, "majority")
    if isinstance(cos, str):
        reasons["majority_cos_mean"] = reasons["majority_cos_std"] = cos
    else:
        values["majority_cos_mean"], values["majority_cos_std"] = cos
    for name, group in (("minority_norm", minority), ("majority_norm", majority)):
        if group:
            values[name] = float(norms[group].mean())
        else:
            reasons[name] = f"no {name.split('_')[0]} classes"
    if not minority or not majority:
        reasons["norm_ratio"] = "needs both minority and majority classes"
    elif values["majority_norm"] == 0.0:
        reasons["norm_ratio"] = "every majority classifier row is zero"
    else:
        values["norm_ratio"] = values["minority_norm"] / values["majority_norm"]
    mean_sq = float((norms * norms).mean()) if norms.numel() else 0.0
    if minority_pairs is None:
        reasons["minority_spread"] = f"needs at least 2 present minority classes, got {len(minority)}"
    elif mean_sq == 0.0:
        reasons["minority_spread"] = "every classifier row is zero"
    else:
        values["minority_spread"] = minority_pairs["dist_sq_max"] / mean_sq
    return values, reasons


def minority_set(stats: ClassStats, minority: Any, threshold: float) -> list[int]:
    """The present minority classes: ``minority`` (class indices), or the present classes
    with n_k < threshold * max n_k."""
    present = stats.present
    if minority is None:
        threshold = positive_float(threshold, "minority_threshold")
        n = stats.counts
        cut = threshold * float(n.max())
        return [k for k in range(stats.num_classes) if bool(present[k]) and float(n[k]) < cut]
    indices = class_indices(minority, "minority", stats.num_classes)
    return sorted({k for k in indices if bool(present[k])})


def minority_parts(
    stats: ClassStats, weight: torch.Tensor | None, minority: list[int]
) -> tuple[MinorityCollapse, dict[str, str]]:
    """Every ``MINORITY_FIELDS`` value of ``stats`` (and the classifier ``weight`` (K, d)
    float64, if any) for the present classes ``minority``, and why the others are undefined."""
    result = MinorityCollapse(minority=minority)
    present_ids = stats.present.nonzero().flatten().tolist()
    position = {k: i for i, k in enumerate(present_ids)}
    rows = [position[k] for k in minority]
    chosen = set(minority)
    majority = [i for k, i in position.items() if k not in chosen]
    _, cos = _cosines(stats.centred_means(), rows, "minority")
    reasons: dict[str, str] = {}
    if isinstance(cos, str):
        reasons["minority_mean_cos_mean"] = reasons["minority_mean_cos_std"] = cos
    else:
        result.minority_mean_cos_mean, result.minority_mean_cos_std = cos
    if weight is None:
        reasons.update(dict.fromkeys(CLASSIFIER_FIELDS, "needs the classifier `weight`"))
        return result, reasons
    values, why = classifier_minority_stats(weight[stats.present], rows, majority)
    for name, value in values.items():
        setattr(result, name, value)
    reasons.update(why)
    return result, reasons


def minority_collapse(
    stats: ClassStats,
    weight: torch.Tensor | None = None,
    *,
    minority: Sequence[int] | torch.Tensor | None = None,
    minority_threshold: float = 0.5,
) -> MinorityCollapse:
    """Minority collapse (Fang, He, Long & Su 2021) among the minority classes (explicit
    indices, or the present classes with n_k < ``minority_threshold`` * max n_k), with the
    majority the other present classes: the fields of the module docstring, from ``stats``
    and the classifier ``weight`` (K, d) float."""
    stats = check_stats(stats)
    w = check_weight(weight, stats) if weight is not None else None
    return minority_parts(stats, w, minority_set(stats, minority, minority_threshold))[0]
