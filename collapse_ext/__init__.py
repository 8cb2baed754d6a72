"""collapse_ext: fused neural-collapse statistics, metrics and the Layer-Peeled Model."""

from . import lpm, reference
from ._ops import class_stats, cuda_compiled, lpm_step, within_scatter
from .lpm import minority_collapse_sweep, simplex_etf
from .stats import ClassStats

__version__ = "0.1.0"

__all__ = [
    "ClassStats",
    "class_stats",
    "cuda_compiled",
    "lpm",
    "lpm_step",
    "minority_collapse_sweep",
    "reference",
    "simplex_etf",
    "within_scatter",
]
