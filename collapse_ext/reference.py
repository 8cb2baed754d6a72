"""Plain float64 PyTorch references for every fused op.

They are the ground truth of the tests and the "what a user would write" baseline of the
benchmarks: straightforward, materialising whatever they need, computed in float64.
"""

from __future__ import annotations

import torch

__all__ = ["class_stats_reference", "within_scatter_reference"]


def class_stats_reference(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Counts (K,) int64, means (K, d) float64, sqdev (K,) float64 by index_add in float64."""
    x = features.double()
    y = labels.long()
    keep = (y >= 0) & (y < num_classes)
    x, y = x[keep], y[keep]
    counts = torch.bincount(y, minlength=num_classes)
    sums = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, device=x.device)
    sums.index_add_(0, y, x)
    means = sums / counts.clamp_min(1).unsqueeze(1)
    centred = x - means[y]
    sqdev = torch.zeros(num_classes, dtype=torch.float64, device=x.device)
    sqdev.index_add_(0, y, (centred * centred).sum(1))
    return counts, means, sqdev


def within_scatter_reference(
    features: torch.Tensor,
    labels: torch.Tensor,
    means: torch.Tensor,
    basis: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum_i (h_i - m_{y_i})(h_i - m_{y_i})^T in float64 (or B^T S B with a basis)."""
    y = labels.long()
    keep = (y >= 0) & (y < means.shape[0])
    centred = features.double()[keep] - means.double()[y[keep]]
    if basis is not None:
        centred = centred @ basis.double()
    return centred.T @ centred
