"""collapse_ext: fused neural-collapse statistics, metrics and the Layer-Peeled Model."""

from . import reference
from ._ops import class_stats, cuda_compiled, within_scatter
from .stats import ClassStats

__version__ = "0.1.0"

__all__ = [
    "ClassStats",
    "class_stats",
    "cuda_compiled",
    "reference",
    "within_scatter",
]
