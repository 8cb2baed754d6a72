"""A theory prediction beside a measurement (SPEC: "Theory predictions"): what
``collapse_metrics(..., predict=...)`` and ``CollapseMonitor(..., predict=...)`` report.

The measurement is the classifier rows W and the centred class means M~ of the present
classes (rows mu_k - mu_G with the statistics' global mean, as the bundle's ``*_means``
metrics), with their counts n_k. A network's class means are the model's h_k up to a
common offset at best (its bias absorbs one, and the models have none), and
M~ = C (h + offset) = C h with C = I - 1 (n/N)^T: so the predicted means are centred the
same way, and a network measured exactly as the model has distance 0 whatever its offset.
The budgets: E_W = mean_k ||w_k||^2, and E_H the model's mean ||h_k||^2 whose centred means
have the measured mean squared norm mean_k ||M~_k||^2 (fixed-point steps from the
class-centred estimate; the closed forms' shape does not depend on E_H, and the LPM's means
nearly sum to zero over the classes, so a few warm-started solves at most). "ufm-mse" takes
no budgets: its norms come from lambda_W, lambda_H.

Beside the measured metrics it puts (names: ``metrics.bundle.PREDICTION_FIELDS``):
``predicted_<metric>``, the same metric of the predicted geometry, computed by the same
functions on rows factored from the predicted Gram matrices (rotation-invariant, so any
factor gives the same value); ``theory.compare``'s distances, over the bundle's minority
classes; the budgets; and the LPM solver's objective, KKT residual and Gram accuracy.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from .. import lpm
from .._validate import choice, class_sizes, positive_int
from ..metrics._inputs import Pairs, UndefinedMetricError
from ..metrics.bundle import PREDICTION_FIELDS
from ..metrics.geometry import equinorm_of, etf_error_of
from ..metrics.minority import classifier_minority_stats
from ..stats import ClassStats
from .geometry import Geometry, compare
from .models import MODELS, lpm_geometry, predict

__all__ = ["Predictor", "centred_like", "measured_geometry"]

# The budget E_H is matched to the measured centred means to this relative accuracy (a few
# warm-started solves for the LPM; one step for the closed forms, whose shape is fixed).
_MATCH_RTOL = 1e-7
_MATCH_STEPS = 12

_NAN_REASONS = {
    "norm_corr_W": "the norms are equal across classes (measured or predicted): no correlation",
    "norm_corr_H": "the norms are equal across classes (measured or predicted): no correlation",
    "minority_cos_gap": "needs at least 2 present minority classes",
}


# (predicted field, the measured field of metrics.minority it predicts)
_MINORITY_NAMES = (
    ("predicted_minority_cos_mean", "minority_cos_mean"),
    ("predicted_majority_cos_mean", "majority_cos_mean"),
    ("predicted_norm_ratio", "norm_ratio"),
    ("predicted_minority_spread", "minority_spread"),
)


def measured_geometry(stats: ClassStats, weight: torch.Tensor) -> Geometry:
    """The Geometry of the present classes: classifier rows ``weight`` (K, d) float and the
    centred class means of ``stats`` (its default global mean), with their counts."""
    present = stats.present
    W = weight.detach().double()[present.to(weight.device)]
    return Geometry.from_weights(W, stats.centred_means(), counts=stats.counts[present].cpu())


def centred_like(g: Geometry, weights: torch.Tensor) -> Geometry:
    """``g`` with its class means h_k replaced by h_k - sum_j weights_j h_j (weights (K,)
    summing to 1): G_H -> C G_H C^T, logits -> C H W^T, C = I - 1 weights^T."""
    C = torch.eye(g.num_classes, dtype=torch.float64) - weights.double()[None, :]
    logits = None if g.logits is None else C @ g.logits
    return Geometry(g.gram_W, C @ g.gram_H @ C.T, logits, g.counts, g.model, dict(g.info))


def _factor(G: torch.Tensor) -> torch.Tensor:
    """Rows R (K, K) with R R^T = G (PSD part of G)."""
    evals, evecs = torch.linalg.eigh((G + G.T) / 2)
    return evecs * evals.clamp_min(0).sqrt()


class Predictor:
    """Predictions of one theory model for measured class counts and budgets, cached.

    model: one of ``theory.MODELS``; params: the model's own parameters (``"ufm-mse"``:
    lambda_W, lambda_H, depth; ``"lpm-ce"``, ``"lpm-mse"``: keywords of
    ``lpm.solve_large`` such as dim, tol, gram_tol, device) - never E_W, E_H, which come
    from the measurement; cache_size: geometries kept (least recently used dropped).

    The LPM's geometry depends on the budgets only through rho = sqrt(E_W E_H) (W -> a W,
    H -> H / a), so its solutions are cached per (counts, rho) and rescaled to (E_W, E_H);
    a new rho for counts seen before starts from the cached solution nearest in log rho
    (a warm start). ``solves`` counts the LPM solves made.
    """

    def __init__(self, model: str = "lpm-ce", *, cache_size: int = 8, **params: Any) -> None:
        self.model = choice(model, "model", MODELS)
        if {"E_W", "E_H"} & set(params):
            raise ValueError("Expected no `E_W`/`E_H` for a Predictor: they are the measured mean squared norms")
        if model == "ufm-mse" and not {"lambda_W", "lambda_H"} <= set(params):
            raise ValueError("Expected `lambda_W` and `lambda_H` for model 'ufm-mse'")
        if model in ("etf", "seli") and params:
            raise ValueError(f"Unexpected parameters {sorted(params)} for model {model!r}")
        self.params = params
        self.cache_size = positive_int(cache_size, "cache_size")
        self.solves = 0
        self._cache: OrderedDict[tuple, Any] = OrderedDict()

    def __repr__(self) -> str:
        return f"Predictor({self.model!r}, {', '.join(f'{k}={v!r}' for k, v in self.params.items())})"

    def geometry(self, counts, E_W: float = 1.0, E_H: float = 1.0) -> Geometry:
        """The predicted Geometry for class sizes ``counts`` (K,) and budgets E_W, E_H."""
        n = class_sizes(counts)
        if not self.model.startswith("lpm"):
            return predict(
                n, self.model, **self.params, **({} if self.model == "ufm-mse" else {"E_W": E_W, "E_H": E_H})
            )
        rho = math.sqrt(E_W * E_H)
        key = (tuple(n.tolist()), rho)
        if key in self._cache:
            self._cache.move_to_end(key)
            unit = self._cache[key]
        else:
            options = dict(self.params)
            nearest = min(
                (k for k in self._cache if k[0] == key[0]), key=lambda k: abs(math.log(k[1] / rho)), default=None
            )
            if nearest is not None:
                options["init"] = self._cache[nearest][1:]
            res = lpm.solve_large(n, rho, rho, loss=self.model[4:], **options)
            self.solves += 1
            unit = (lpm_geometry(res, n, self.model), res.W[0], res.H[0])
            self._cache[key] = unit
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        g = unit[0]
        return Geometry(
            gram_W=g.gram_W * (E_W / rho),
            gram_H=g.gram_H * (E_H / rho),
            logits=g.logits,
            counts=n,
            model=self.model,
            info=dict(g.info),
        )

    def _matched(self, counts, E_W: float, E_H: float, target: float, weights: torch.Tensor) -> Geometry:
        """The prediction for (E_W, E_H'), its means centred with ``weights`` (K,), where E_H'
        (from E_H on: a fixed-point step, then secant steps on log E_H') gives centred means
        of mean squared norm ``target``; info["E_H"] = E_H'."""
        last = None
        for _ in range(_MATCH_STEPS):
            g = centred_like(self.geometry(counts, E_W, E_H), weights)
            got = float(g.gram_H.diagonal().mean())
            if self.model == "ufm-mse" or got == 0.0 or abs(got / target - 1) <= _MATCH_RTOL:
                break
            x, fx = math.log(E_H), math.log(got / target)
            slope = 1.0 if last is None or last[0] == x else (fx - last[1]) / (x - last[0])
            last = (x, fx)
            E_H = math.exp(x - fx / (slope if slope > 0.1 else 1.0))
        g.info["E_H"] = E_H
        return g

    def beside(
        self, stats: ClassStats, weight: torch.Tensor | None, minority: Sequence[int]
    ) -> tuple[dict[str, float], dict[str, str]]:
        """The ``PREDICTION_FIELDS`` for ``stats`` and the classifier ``weight`` (K, d)
        (None: undefined), minority: the bundle's minority classes (class indices):
        ({name: value} of the defined ones, {name: why} of the others)."""
        if weight is None:
            return {}, dict.fromkeys(PREDICTION_FIELDS, "needs the classifier `weight` (E_W, the classifier Gram)")
        present_ids = stats.present.nonzero().flatten().tolist()
        if len(present_ids) < 2:
            return {}, dict.fromkeys(PREDICTION_FIELDS, f"needs at least 2 present classes, got {len(present_ids)}")
        measured = measured_geometry(stats, weight)
        E_W = float(measured.gram_W.diagonal().mean())
        target = float(measured.gram_H.diagonal().mean())
        if E_W == 0.0 or target == 0.0:
            why = "needs nonzero classifier rows and centred class means (E_W, E_H > 0)"
            return {}, dict.fromkeys(PREDICTION_FIELDS, why)
        n = measured.counts
        weights = n / n.sum() if stats.global_mean_mode == "sample" else torch.full_like(n, 1.0 / n.numel())
        E_H = float(stats.centred_means("class").square().sum(1).mean())
        predicted = self._matched(n, E_W, E_H, target, weights)
        E_H = predicted.info.pop("E_H")
        values: dict[str, float] = {"prediction_E_W": E_W, "prediction_E_H": E_H}
        reasons: dict[str, str] = {}
        _predicted_metrics(predicted, [present_ids.index(k) for k in minority], values, reasons)
        mask = torch.zeros(len(present_ids), dtype=torch.bool)
        mask[[present_ids.index(k) for k in minority]] = True
        for name, value in compare(measured, predicted, minority=mask).items():
            if math.isnan(value):
                reasons[name] = _NAN_REASONS[name]
            else:
                values[name] = value
        for name, key in (("prediction_objective", "objective"), ("prediction_kkt", "kkt")):
            if key in predicted.info:
                values[name] = predicted.info[key]
            else:
                reasons[name] = "only for the LPM models (lpm-ce, lpm-mse)"
        if "gram_error" in predicted.info:
            values["prediction_gram_error"] = predicted.info["gram_error"]
        else:
            reasons["prediction_gram_error"] = "only for the LPM models (lpm-ce, lpm-mse)"
        return values, reasons


def _predicted_metrics(g: Geometry, minority: list[int], values: dict, reasons: dict) -> None:
    """``predicted_<metric>`` of the Geometry ``g`` into values / reasons; minority: row positions."""

    def put(name: str, fn, *args) -> None:
        try:
            values[name] = fn(*args)
        except UndefinedMetricError as err:
            reasons[name] = str(err)

    rows_W, rows_H = _factor(g.gram_W), _factor(g.gram_H)
    pairs_W, pairs_H = Pairs(rows_W), Pairs(rows_H)
    put("predicted_equinorm_means", equinorm_of, rows_H)
    put("predicted_equiangularity_means", pairs_H.cosine_std, "equiangularity")
    put("predicted_mean_cosine_means", pairs_H.mean_cosine)
    put("predicted_etf_error_means", etf_error_of, pairs_H)
    put("predicted_equinorm_weights", equinorm_of, rows_W)
    put("predicted_equiangularity_weights", pairs_W.cosine_std, "equiangularity")
    put("predicted_mean_cosine_weights", pairs_W.mean_cosine)
    put("predicted_etf_error_weights", etf_error_of, pairs_W)
    scale = math.sqrt(float(g.gram_W.trace()) * float(g.gram_H.trace()))
    if g.logits is None:
        reasons["predicted_self_duality"] = f"model {g.model!r} does not fix the logits H W^T"
    elif scale == 0.0:
        reasons["predicted_self_duality"] = "the predicted classifier or class means are zero"
    else:
        values["predicted_self_duality"] = max(2.0 - 2.0 * float(g.logits.trace()) / scale, 0.0)
    majority = [i for i in range(g.num_classes) if i not in set(minority)]
    if not minority or not majority:
        # As the measured minority fields: only with both groups.
        why = "no minority classes" if not minority else "no majority classes (every present class is a minority)"
        reasons.update({name: why for name, _ in _MINORITY_NAMES})
        reasons["predicted_minority_mean_cos_mean"] = why
        return
    found, why = classifier_minority_stats(rows_W, minority, majority)
    for name, measured_name in _MINORITY_NAMES:
        if measured_name in found:
            values[name] = found[measured_name]
        else:
            reasons[name] = why.get(measured_name, "no minority classes")
    if len(minority) < 2:
        reasons["predicted_minority_mean_cos_mean"] = f"needs at least 2 present minority classes, got {len(minority)}"
    else:
        put("predicted_minority_mean_cos_mean", Pairs(rows_H, subset=minority).mean_cosine)
