"""collapse_ext: fused neural-collapse statistics, metrics and the Layer-Peeled Model."""

from . import lpm
from ._build import build_info
from ._ops import (
    class_accumulate,
    class_fold,
    class_stats,
    cuda_compiled,
    lpm_step,
    nearest_centre,
    pairwise_stats,
    within_scatter,
)
from ._version import __version__
from .loggers import CSVLogger, JSONLinesLogger, TensorBoardLogger
from .lpm import minority_collapse_sweep, simplex_etf
from .metrics import (
    CollapseMetrics,
    SeparationLaw,
    collapse_metrics,
    fit_separation_law,
    nearest_centre_counts,
    nearest_centre_tallies,
    separation_fuzziness,
)
from .monitor import CollapseMonitor, MonitorResult
from .stats import ClassStats


def __getattr__(name: str):
    # The float64 references are the tests' oracle: importable as a submodule, never
    # imported by the package itself.
    if name == "reference":
        import importlib

        return importlib.import_module(".reference", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ClassStats",
    "CollapseMonitor",
    "MonitorResult",
    "CSVLogger",
    "JSONLinesLogger",
    "TensorBoardLogger",
    "__version__",
    "build_info",
    "CollapseMetrics",
    "SeparationLaw",
    "class_accumulate",
    "class_fold",
    "class_stats",
    "collapse_metrics",
    "cuda_compiled",
    "lpm",
    "lpm_step",
    "minority_collapse_sweep",
    "simplex_etf",
    "fit_separation_law",
    "nearest_centre",
    "nearest_centre_counts",
    "nearest_centre_tallies",
    "pairwise_stats",
    "separation_fuzziness",
    "within_scatter",
]
