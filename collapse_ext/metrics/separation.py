"""The layer-wise law of data separation (He & Su 2023, "A law of data separation in deep
learning"): separation fuzziness decays geometrically with depth."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

__all__ = ["SeparationLaw", "fit_separation_law"]


class SeparationLaw(NamedTuple):
    """Fit log D_l = intercept + l log rho (He & Su 2023)."""

    rho: float
    r2: float
    pearson: float
    intercept: float


def fit_separation_law(values: Sequence[float] | torch.Tensor, layers: Sequence[float] | None = None) -> SeparationLaw:
    """Layer-wise law of data separation (He & Su 2023): least-squares fit of
    log D_l = a + l log rho to the separation fuzziness D_l of layers l = 0, 1, ... (or
    ``layers``). Returns rho (the per-layer decay), R^2 of the fit and the Pearson
    correlation of (l, log D_l) (-1 for an exact geometric decay)."""
    d = torch.as_tensor(values, dtype=torch.float64).flatten().cpu()
    if d.numel() < 2:
        raise ValueError(f"Expected `values` to hold at least 2 layers, got {d.numel()}")
    if not bool(torch.isfinite(d).all()) or not bool((d > 0).all()):
        raise ValueError(f"Expected `values` to be positive finite numbers, got {d.tolist()}")
    x = torch.arange(d.numel(), dtype=torch.float64) if layers is None else torch.as_tensor(layers, dtype=torch.float64)
    if x.shape != d.shape:
        raise ValueError(f"Expected `layers` of length {d.numel()} like `values`, got {x.numel()}")
    yv = d.log()
    xc, yc = x - x.mean(), yv - yv.mean()
    sxx, syy, sxy = float(xc @ xc), float(yc @ yc), float(xc @ yc)
    if sxx == 0.0:
        raise ValueError("Expected at least two distinct `layers`")
    slope = sxy / sxx
    intercept = float(yv.mean()) - slope * float(x.mean())
    if syy == 0.0:
        return SeparationLaw(math.exp(slope), 1.0, 0.0, intercept)
    resid = yc - slope * xc
    r2 = 1.0 - float(resid @ resid) / syy
    return SeparationLaw(math.exp(slope), r2, sxy / math.sqrt(sxx * syy), intercept)
