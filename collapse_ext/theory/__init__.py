"""Theory predictions beside measurements (SPEC: "Theory predictions").

Every prediction is a :class:`Geometry`: rotation-invariant quantities only (classifier
Gram G_W = W W^T, class-mean Gram G_H = H H^T, their norms and cosines, and the logits
H W^T when the model fixes them), for a class-count profile n_k (k < K, N = sum n_k).

- ``predict(counts, model=...)`` (``models``): "etf", "seli" (Thrampoulidis et al. 2022),
  "ufm-mse" (Dang et al. 2023), "lpm-ce" / "lpm-mse" (the numerical optimum of the
  Layer-Peeled Model of Fang et al. 2021, ``lpm.solve_large``).
- ``compare(measured, predicted)`` (``geometry``): rotation-invariant distances.
- ``Predictor(model, ...)`` (``beside``): the prediction for a measurement's class counts
  and budgets (E_W, E_H = the measured mean squared norms), cached, with the predicted
  metrics and the distances in the names of ``CollapseMetrics``; what
  ``collapse_metrics(..., predict=...)`` and ``CollapseMonitor(..., predict=...)`` report.
"""

from .beside import Predictor, measured_geometry
from .geometry import Geometry, compare
from .models import MODELS, lpm_geometry, predict, seli, ufm_mse_norms

__all__ = [
    "MODELS",
    "Geometry",
    "Predictor",
    "compare",
    "lpm_geometry",
    "measured_geometry",
    "predict",
    "seli",
    "ufm_mse_norms",
]
