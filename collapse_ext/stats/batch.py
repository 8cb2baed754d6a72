"""The checks of one ``ClassStats.update`` batch and the errors of a refused one."""

from __future__ import annotations

from typing import Any

import torch

from .._ops import check_backend
from .._validate import tensor

__all__ = ["check_batch", "refused_error"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LABEL_DTYPES = (torch.int32, torch.int64)


def check_batch(features: Any, labels: Any, dim: int) -> None:
    """Raise unless features is (N, dim) float16/bfloat16/float32/float64 and labels (N,)
    int32/int64 on the same device, one this build has kernels for."""
    tensor(features, "features")
    tensor(labels, "labels")
    if features.dim() > 2:
        raise ValueError(
            f"Expected `features` of shape (N, d), got {tuple(features.shape)}: pool or flatten "
            "conv features first, e.g. features.mean(dim=(2, 3)) or features.flatten(1)"
        )
    if features.dim() != 2 or features.shape[1] != dim:
        raise ValueError(f"Expected `features` of shape (N, {dim}), got {tuple(features.shape)}")
    if features.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"Expected `features` to be float16/bfloat16/float32/float64, got {features.dtype}")
    if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"Expected `labels` of shape ({features.shape[0]},) to match `features`, got {tuple(labels.shape)}"
        )
    if labels.dtype not in _LABEL_DTYPES:
        raise TypeError(f"Expected `labels` to be int32 or int64, got {labels.dtype}")
    # is_cpu first: comparing torch.device objects costs microseconds per update.
    if not (labels.is_cpu and features.is_cpu) and labels.device != features.device:
        raise ValueError(f"Expected `labels` on {features.device} like `features`, got {labels.device}")
    check_backend(features, "features")


def refused_error(labels: torch.Tensor, num_classes: int, peak: float, bad_label: int, bad_row: int) -> ValueError:
    """The error for a batch class_accumulate refused (its status: the largest squared
    deviation, the first row with a bad label and the first non-finite row, -1 if none)."""
    if bad_label >= 0:
        lo, hi = (int(v) for v in torch.aminmax(labels))
        return ValueError(
            f"Expected `labels` in [0, {num_classes}), got values in [{lo}, {hi}] (first bad row {bad_label})"
        )
    if bad_row >= 0:
        return ValueError(f"Expected finite `features`, got NaN or Inf in row {bad_row}")
    return ValueError(
        "Expected `features` whose within-class deviations fit in float64 sums of squares, got a squared "
        f"deviation of {peak:.3g} in one row"
    )
