"""The rotation-invariant geometry of K classifier rows and K class means
(:class:`Geometry`), measured or predicted, and the distances between two of them
(:func:`compare`, SPEC: "Theory predictions")."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Geometry", "compare"]


def _cosines(G: torch.Tensor) -> torch.Tensor:
    n = torch.sqrt(torch.diagonal(G).clamp_min(0))
    tiny = torch.finfo(G.dtype).tiny
    return G / (n[:, None] * n[None, :]).clamp_min(tiny)


@dataclass
class Geometry:
    """Rotation-invariant geometry of K classifier rows and K class means, float64 CPU.

    gram_W, gram_H: (K, K); logits: (K, K) H W^T (row k: the logits of class k's mean) or
    None when the model does not fix them; counts: (K,) or None; model: its name;
    info: model-specific scalars (objective, KKT residual, ...).
    """

    gram_W: torch.Tensor
    gram_H: torch.Tensor
    logits: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    model: str = "measured"
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.gram_W.shape[0]

    @property
    def norms_W(self) -> torch.Tensor:
        """(K,) ||w_k||."""
        return torch.sqrt(torch.diagonal(self.gram_W).clamp_min(0))

    @property
    def norms_H(self) -> torch.Tensor:
        """(K,) ||h_k||."""
        return torch.sqrt(torch.diagonal(self.gram_H).clamp_min(0))

    @property
    def cos_W(self) -> torch.Tensor:
        """(K, K) cos(w_j, w_k) (0 where a norm is 0)."""
        return _cosines(self.gram_W)

    @property
    def cos_H(self) -> torch.Tensor:
        """(K, K) cos(h_j, h_k)."""
        return _cosines(self.gram_H)

    @classmethod
    def from_weights(cls, W, centred_means, counts=None, model: str = "measured") -> Geometry:
        """Geometry of classifier rows W (K, p) and centred class means (K, p) (any float dtype/device).

        Measured E_W, E_H are then the mean squared norms of the rows (SPEC).
        """
        W = torch.as_tensor(W).detach().to("cpu", torch.float64)
        H = torch.as_tensor(centred_means).detach().to("cpu", torch.float64)
        if W.dim() != 2 or H.dim() != 2 or W.shape != H.shape:
            raise ValueError(
                "Expected `W` and `centred_means` to be (K, p) of the same shape, got "
                f"{tuple(W.shape)} and {tuple(H.shape)}"
            )
        if not (torch.isfinite(W).all() and torch.isfinite(H).all()):
            raise ValueError("Expected `W` and `centred_means` to be finite")
        c = None if counts is None else torch.as_tensor(counts, dtype=torch.float64).cpu()
        return cls(gram_W=W @ W.T, gram_H=H @ H.T, logits=H @ W.T, counts=c, model=model)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python view (lists) for JSON."""
        out = {
            "model": self.model,
            "num_classes": self.num_classes,
            "gram_W": self.gram_W.tolist(),
            "gram_H": self.gram_H.tolist(),
            "norms_W": self.norms_W.tolist(),
            "norms_H": self.norms_H.tolist(),
            "cos_W": self.cos_W.tolist(),
            "cos_H": self.cos_H.tolist(),
            "logits": None if self.logits is None else self.logits.tolist(),
            "counts": None if self.counts is None else self.counts.tolist(),
        }
        out.update({k: v for k, v in self.info.items() if isinstance(v, (int, float, str, bool)) or v is None})
        return out


# ----------------------------------------------------------------------------- compare


def _gram_distance(G: torch.Tensor, P: torch.Tensor) -> float:
    tiny = torch.finfo(torch.float64).tiny
    return float((G / G.norm().clamp_min(tiny) - P / P.norm().clamp_min(tiny)).norm())


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    # Norms equal up to rounding (an ETF) have no correlation to speak of: NaN.
    flat = [float(x.norm()) * 1e-9 for x in (a, b)]
    a, b = a - a.mean(), b - b.mean()
    if float(a.norm()) <= flat[0] or float(b.norm()) <= flat[1]:
        return math.nan
    return float((a * b).sum()) / float(a.norm() * b.norm())


def compare(measured: Geometry, predicted: Geometry, minority=None) -> dict[str, float]:
    """Rotation-invariant distances between a measured and a predicted Geometry (SPEC).

    gram_W_distance, gram_H_distance: ||G/||G||_F - G^/||G^||_F||_F of the classifier rows
    and of the (centred) class means, in [0, 2]; norm_corr_W, norm_corr_H: Pearson
    correlation of per-class norms (NaN when either is constant, as for balanced classes);
    minority_cos_gap: mean over minority pairs j < k of cos(w_j, w_k) measured minus
    predicted (NaN with fewer than two minority classes). minority: (K,) bool; default the
    classes with fewer samples than the median of the (measured, else predicted) counts.
    """
    K = measured.num_classes
    if predicted.num_classes != K:
        raise ValueError(f"Expected geometries with the same K, got {K} and {predicted.num_classes}")
    if minority is None:
        counts = measured.counts if measured.counts is not None else predicted.counts
        minority = torch.zeros(K, dtype=torch.bool) if counts is None else counts < counts.median()
    minority = torch.as_tensor(minority, dtype=torch.bool).cpu()
    if minority.shape != (K,):
        raise ValueError(f"Expected `minority` to be ({K},) bool, got shape {tuple(minority.shape)}")
    idx = torch.nonzero(minority).flatten()
    if idx.numel() >= 2:
        iu = torch.triu_indices(idx.numel(), idx.numel(), offset=1)
        pairs = lambda C: C[idx][:, idx][iu[0], iu[1]]  # noqa: E731
        gap = float((pairs(measured.cos_W) - pairs(predicted.cos_W)).mean())
    else:
        gap = math.nan
    return {
        "gram_W_distance": _gram_distance(measured.gram_W, predicted.gram_W),
        "gram_H_distance": _gram_distance(measured.gram_H, predicted.gram_H),
        "norm_corr_W": _pearson(measured.norms_W, predicted.norms_W),
        "norm_corr_H": _pearson(measured.norms_H, predicted.norms_H),
        "minority_cos_gap": gap,
    }
