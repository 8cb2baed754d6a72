"""The metric bundle: :class:`CollapseMetrics`, every metric computable from what is given,
with ``None`` and a reason for the others (:func:`collapse_metrics`)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from .._validate import positive_float
from ..stats import ClassStats
from ._inputs import Pairs, UndefinedMetricError, batches, check_bias, check_stats, check_weight, rank_rtol
from .geometry import (
    equinorm_of,
    etf_error_of,
    gnc2_of,
    max_angle_of,
    orthogonal_frame_error_of,
    self_duality_of,
    uniform_duality_of,
)
from .minority import MINORITY_FIELDS, minority_parts, minority_set
from .nc1 import cdnv, cdnv_pairs, nc1, nc1_quotient, separation_fuzziness
from .ncc import check_ncc_tallies, ncc_accuracy, ncc_mismatch, nearest_centre_tallies

__all__ = ["PREDICTION_FIELDS", "CollapseMetrics", "collapse_metrics"]

# The fields of a theory prediction beside the measurement (collapse_ext.theory.Predictor):
# the budgets it was made for (the measured mean squared norms of the present classifier
# rows and centred class means), the predicted values of measured metrics (same names after
# "predicted_"), theory.compare's distances, and the LPM solver's objective, KKT residual
# and Gram accuracy.
PREDICTION_FIELDS = (
    "prediction_E_W",
    "prediction_E_H",
    "predicted_equinorm_means",
    "predicted_equiangularity_means",
    "predicted_mean_cosine_means",
    "predicted_etf_error_means",
    "predicted_equinorm_weights",
    "predicted_equiangularity_weights",
    "predicted_mean_cosine_weights",
    "predicted_etf_error_weights",
    "predicted_self_duality",
    "predicted_minority_cos_mean",
    "predicted_majority_cos_mean",
    "predicted_norm_ratio",
    "predicted_minority_spread",
    "predicted_minority_mean_cos_mean",
    "gram_W_distance",
    "gram_H_distance",
    "norm_corr_W",
    "norm_corr_H",
    "minority_cos_gap",
    "prediction_objective",
    "prediction_kkt",
    "prediction_gram_error",
)


@dataclass
class CollapseMetrics:
    """Every metric :func:`collapse_metrics` could compute; ``None`` with a reason in
    ``undefined`` otherwise. ``*_means`` are on the centred class means M~, ``*_weights``
    on the classifier rows of the present classes; the minority fields are those of
    :mod:`collapse_ext.metrics.minority`."""

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
    orthogonal_frame_error_means: float | None = None
    orthogonal_frame_error_weights: float | None = None
    # A theory prediction beside the measurement (collapse_metrics(predict=...)): see
    # PREDICTION_FIELDS; written out by to_dict only when ``prediction`` names a model.
    prediction_E_W: float | None = None
    prediction_E_H: float | None = None
    predicted_equinorm_means: float | None = None
    predicted_equiangularity_means: float | None = None
    predicted_mean_cosine_means: float | None = None
    predicted_etf_error_means: float | None = None
    predicted_equinorm_weights: float | None = None
    predicted_equiangularity_weights: float | None = None
    predicted_mean_cosine_weights: float | None = None
    predicted_etf_error_weights: float | None = None
    predicted_self_duality: float | None = None
    predicted_minority_cos_mean: float | None = None
    predicted_majority_cos_mean: float | None = None
    predicted_norm_ratio: float | None = None
    predicted_minority_spread: float | None = None
    predicted_minority_mean_cos_mean: float | None = None
    gram_W_distance: float | None = None
    gram_H_distance: float | None = None
    norm_corr_W: float | None = None
    norm_corr_H: float | None = None
    minority_cos_gap: float | None = None
    prediction_objective: float | None = None
    prediction_kkt: float | None = None
    prediction_gram_error: float | None = None
    minority_classes: list[int] = field(default_factory=list)
    absent_classes: list[int] = field(default_factory=list)
    ncc_means: str | None = None
    prediction: str | None = None
    undefined: dict[str, str] = field(default_factory=dict)

    _NOT_METRICS = ("minority_classes", "absent_classes", "ncc_means", "prediction", "undefined")

    def to_dict(self) -> dict[str, float | None]:
        """Flat {name: float or None} of the numbers (integers as floats), for loggers; the
        prediction's fields only when there is one (``prediction`` is the model's name)."""
        out: dict[str, float | None] = {}
        for f in fields(self):
            if f.name in self._NOT_METRICS or (self.prediction is None and f.name in PREDICTION_FIELDS):
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
        if self.prediction:
            lines.append(f"prediction: {self.prediction} (predicted_*, distances to it)")
        return "\n".join(lines)


_WEIGHT_METRICS = (
    "equinorm_weights",
    "equiangularity_weights",
    "mean_cosine_weights",
    "max_angle_weights",
    "etf_error_weights",
    "gnc2_weights",
    "gnc2_var_weights",
    "orthogonal_frame_error_weights",
    "self_duality",
    "uniform_duality",
    "ncc_mismatch",
)


def collapse_metrics(
    stats: ClassStats,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    minority: Sequence[int] | torch.Tensor | None = None,
    minority_threshold: float = 0.5,
    features: Any = None,
    labels: Any = None,
    ncc_tallies: torch.Tensor | None = None,
    cdnv_exponent: float = 1.0,
    rtol: float | None = None,
    ncc_counts: torch.Tensor | None = None,
    predict: Any = None,
) -> CollapseMetrics:
    """All the metrics computable from ``stats`` (a ClassStats) and what else is given.

    weight (K, d) / bias (K,): the last layer; enables the ``*_weights`` NC2 metrics, NC3,
    the NC4 mismatch and the classifier parts of minority collapse. features (N, d) /
    labels (N,) (tensors or sequences of batches, the data the statistics came from): NC4
    pass with the current means, and the projected NC1 mode when ``stats`` has no S_W.
    ncc_tallies: (3,) int64 [n, ncc_correct, mismatch] accumulated elsewhere (e.g. by a
    monitor with the previous epoch's means, :func:`nearest_centre_tallies`); used when
    ``features`` is not given (``ncc_counts``, its former name, still works with a
    DeprecationWarning). minority: explicit class indices, or None for the present
    classes with n_k < ``minority_threshold`` * max n_k (minority metrics only when both
    minority and majority classes exist). Undefined metrics are ``None`` and explained in
    ``undefined``; absent classes are excluded everywhere and listed.

    predict: a theory model name (``"lpm-ce"``, ``"lpm-mse"``, ``"seli"``, ``"etf"``) or a
    ``collapse_ext.theory.Predictor`` (for model parameters, and to cache solutions across
    calls): the prediction for the present classes' counts with E_W, E_H the measured mean
    squared norms of the classifier rows and centred means, reported beside the
    measurement in the ``PREDICTION_FIELDS`` (needs ``weight``).
    """
    stats = check_stats(stats)
    w = check_weight(weight, stats) if weight is not None else None
    if bias is not None:
        bias = check_bias(bias, stats.num_classes)
        if w is None:
            raise ValueError("Expected `weight` together with `bias`, got only `bias`")
    if (features is None) != (labels is None):
        raise ValueError("Expected `features` and `labels` together, got only one of them")
    if features is not None:
        # Checked once up front, and iterated twice (projected NC1, NC4): materialise.
        checked = list(batches(features, labels))
        features, labels = [x for x, _ in checked], [y for _, y in checked]
    if ncc_counts is not None:
        warnings.warn(
            "collapse_metrics(ncc_counts=...) is deprecated: use ncc_tallies", DeprecationWarning, stacklevel=2
        )
        if ncc_tallies is not None:
            raise ValueError("Expected `ncc_tallies` or its former name `ncc_counts`, got both")
        ncc_tallies = check_ncc_tallies(ncc_counts, "ncc_counts")
    elif ncc_tallies is not None:
        ncc_tallies = check_ncc_tallies(ncc_tallies)
    p = positive_float(cdnv_exponent, "cdnv_exponent")
    rtol = rank_rtol(rtol)
    predictor = None if predict is None else _predictor(predict)
    stats.check_rejected()
    present = stats.present
    out = CollapseMetrics(
        num_samples=stats.num_samples,
        num_present=int(present.sum()),
        absent_classes=(~present).nonzero().flatten().tolist(),
    )

    def put(names: tuple[str, ...], fn: Callable[..., Any], *args: Any) -> None:
        """Set the fields ``names`` to fn(*args) (a value, or a tuple for several names)."""
        try:
            value = fn(*args)
        except UndefinedMetricError as err:
            out.undefined.update(dict.fromkeys(names, str(err)))
            return
        for name, v in zip(names, value if len(names) > 1 else (value,)):
            setattr(out, name, v)

    put(("nc1",), lambda: nc1(stats, features=features, labels=labels, rtol=rtol))
    put(
        ("separation_fuzziness",),
        lambda: separation_fuzziness(stats, features=features, labels=labels, rtol=rtol),
    )
    put(("nc1_quotient",), nc1_quotient, stats)
    centred = stats.centred_means()
    pm = cdnv_pairs(stats, p)
    put(("nc1_cdnv",), cdnv, pm)
    # The orthogonal frame is of the uncentred means (imbalanced bias-free MSE).
    _nc2(put, "means", centred, pm, lambda: Pairs(stats.means[present]))

    if w is not None:
        wp = w[present]
        pw = Pairs(wp)
        _nc2(put, "weights", wp, pw, lambda: pw)
        put(("self_duality",), self_duality_of, wp, centred)
        put(("uniform_duality",), uniform_duality_of, wp, centred)
    else:
        out.undefined.update(dict.fromkeys(_WEIGHT_METRICS, "needs the classifier `weight`"))

    _ncc(out, stats, w, bias, features, labels, ncc_tallies, put)
    _minority(out, stats, w, minority, minority_threshold)
    if predictor is not None:
        _prediction(out, stats, w, predictor)
    return out


def _predictor(predict: Any) -> Any:
    """A theory Predictor from a model name (checked), or the one given."""
    if isinstance(predict, str):
        # The one import against the layer order (tests/test_layout.py, ALLOWED_UPWARD):
        # a prediction is the theory layer's work, reached only when asked for.
        from ..theory.beside import Predictor

        return Predictor(predict)
    if not callable(getattr(predict, "beside", None)):
        raise TypeError(
            f"Expected `predict` to be a theory model name or a collapse_ext.theory.Predictor, got {predict!r}"
        )
    return predict


def _prediction(out: CollapseMetrics, stats: ClassStats, w, predict: Any) -> None:
    """The ``PREDICTION_FIELDS`` of ``out`` from a theory Predictor."""
    values, reasons = predict.beside(stats, w, out.minority_classes)
    out.prediction = predict.model
    for name in PREDICTION_FIELDS:
        if name in values:
            setattr(out, name, values[name])
        else:
            out.undefined[name] = reasons.get(name, "not given by this model")


def _nc2(put, which: str, rows: torch.Tensor, pairs: Pairs, frame: Callable[[], Pairs]) -> None:
    """The NC2 metrics ``*_<which>`` of one row set (``which``: "means" or "weights"): rows
    (K', d) and their pairwise sums; ``frame()`` the pairs of the orthogonal-frame error."""
    put((f"equinorm_{which}",), equinorm_of, rows)
    put((f"equiangularity_{which}",), pairs.cosine_std, "equiangularity")
    put((f"mean_cosine_{which}",), pairs.mean_cosine)
    put((f"max_angle_{which}",), max_angle_of, pairs)
    put((f"etf_error_{which}",), etf_error_of, pairs)
    put((f"gnc2_{which}", f"gnc2_var_{which}"), gnc2_of, pairs)
    put((f"orthogonal_frame_error_{which}",), lambda: orthogonal_frame_error_of(frame()))


def _ncc(out, stats, w, bias, features, labels, ncc_tallies, put) -> None:
    if features is not None:
        tallies = torch.zeros(3, dtype=torch.int64)
        for x, y in batches(features, labels):
            wx = w.to(x.device) if w is not None else None
            bx = bias.to(x.device) if bias is not None else None
            tallies += nearest_centre_tallies(x, y, stats.means.to(x.device), wx, bx, present=stats.present).cpu()
        out.ncc_means = "current class means (second pass over `features`)"
    elif ncc_tallies is not None:
        tallies = ncc_tallies.cpu()
        out.ncc_means = "precomputed `ncc_tallies` (e.g. previous-epoch means)"
    else:
        why = "needs `features`/`labels` or precomputed `ncc_tallies`"
        out.undefined["ncc_accuracy"] = why
        out.undefined.setdefault("ncc_mismatch", why)
        return
    put(("ncc_accuracy",), ncc_accuracy, tallies)
    if w is not None:
        put(("ncc_mismatch",), ncc_mismatch, tallies)


def _minority(out: CollapseMetrics, stats: ClassStats, w, minority, threshold) -> None:
    chosen = minority_set(stats, minority, threshold)
    majority = int(stats.present.sum()) - len(chosen)
    out.minority_classes = chosen
    if not chosen or majority == 0:
        why = ("no minority classes" if not chosen else "no majority classes (every present class is a minority)") + (
            f" (threshold {threshold} * max n_k)" if minority is None else ""
        )
        out.undefined.update(dict.fromkeys(MINORITY_FIELDS, why))
        return
    result, reasons = minority_parts(stats, w, chosen)
    for name in MINORITY_FIELDS:
        setattr(out, name, getattr(result, name))
    out.undefined.update(reasons)
