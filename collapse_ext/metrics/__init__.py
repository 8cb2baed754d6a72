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

Modules: ``nc1`` (NC1 and its variants), ``geometry`` (NC2, NC3, orthogonal frame),
``ncc`` (NC4), ``minority`` (Minority Collapse), ``separation`` (the law of data
separation), ``bundle`` (:class:`CollapseMetrics`, :func:`collapse_metrics`).
"""

from ._inputs import UndefinedMetricError
from .bundle import CollapseMetrics, collapse_metrics
from .geometry import (
    Uniformity,
    equiangularity,
    equinorm,
    etf_error,
    gnc2,
    max_angle,
    mean_cosine,
    orthogonal_frame_error,
    self_duality,
    uniform_duality,
)
from .minority import MinorityCollapse, minority_collapse
from .nc1 import nc1, nc1_cdnv, nc1_quotient, separation_fuzziness
from .ncc import ncc_accuracy, ncc_mismatch, nearest_centre_counts, nearest_centre_tallies
from .separation import SeparationLaw, fit_separation_law

__all__ = [
    "CollapseMetrics",
    "MinorityCollapse",
    "SeparationLaw",
    "UndefinedMetricError",
    "Uniformity",
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
    "nearest_centre_tallies",
    "orthogonal_frame_error",
    "self_duality",
    "separation_fuzziness",
    "uniform_duality",
]
