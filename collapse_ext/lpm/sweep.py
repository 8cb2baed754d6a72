"""Minority Collapse in the Layer-Peeled Model (Fang et al. 2021, Sec. 3): the imbalanced
problem solved over a range of imbalance ratios in one batch, and the threshold ratio
past which the minority classifier rows collapse."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .._validate import index, positive_float, positive_int
from ..metrics.minority import CLASSIFIER_FIELDS, classifier_minority_stats
from .solver import LPMResult, solve

__all__ = ["SweepResult", "estimate_threshold", "minority_collapse_sweep", "minority_stats"]


def minority_stats(W: torch.Tensor, minority: torch.Tensor) -> dict[str, torch.Tensor]:
    """Minority Collapse summaries of classifier rows W (B, K, p), minority (K,) bool: the
    ``CLASSIFIER_FIELDS`` of :mod:`collapse_ext.metrics.minority` (the one implementation,
    shared with the metric bundle) as (B,) float64 CPU tensors, NaN where undefined
    (e.g. the majority cosines of a single majority class)."""
    rows = W.detach().double()
    mask = minority.to("cpu", torch.bool)
    groups = torch.nonzero(mask).flatten().tolist(), torch.nonzero(~mask).flatten().tolist()
    table = [classifier_minority_stats(w, *groups)[0] for w in rows]
    return {
        name: torch.tensor([row.get(name, math.nan) for row in table], dtype=torch.float64)
        for name in CLASSIFIER_FIELDS
    }


_SWEEP_COLUMNS = ("ratio", *CLASSIFIER_FIELDS, "objective")


@dataclass
class SweepResult:
    """Minority Collapse over imbalance ratios R = n_A / n_B (one row per R).

    Each field is a (R,) float64 CPU tensor (columns of ``minority_stats`` plus ratio and
    objective); ``converged`` (R,) bool; ``result`` the full ``LPMResult``;
    ``threshold`` the estimated R_0 (``estimate_threshold``) when requested, else None.
    """

    ratio: torch.Tensor
    minority_cos_mean: torch.Tensor
    minority_cos_std: torch.Tensor
    majority_cos_mean: torch.Tensor
    majority_cos_std: torch.Tensor
    minority_norm: torch.Tensor
    majority_norm: torch.Tensor
    norm_ratio: torch.Tensor
    minority_spread: torch.Tensor
    objective: torch.Tensor
    converged: torch.Tensor
    K: int
    K_A: int
    E_W: float
    E_H: float
    result: LPMResult = field(repr=False)
    threshold: float | None = None

    def rows(self) -> list[dict[str, float]]:
        """The table as a list of dicts, one per ratio."""
        return [{c: float(getattr(self, c)[i]) for c in _SWEEP_COLUMNS} for i in range(self.ratio.numel())]

    def to_markdown(self) -> str:
        """The table as markdown (the threshold, if estimated, in a last line)."""
        lines = ["| " + " | ".join(_SWEEP_COLUMNS) + " |", "|" + "---|" * len(_SWEEP_COLUMNS)]
        for row in self.rows():
            lines.append("| " + " | ".join(f"{row[c]:.6g}" for c in _SWEEP_COLUMNS) + " |")
        if self.threshold is not None:
            lines.append(f"\nEstimated Minority Collapse threshold R_0 = {self.threshold:.6g}")
        return "\n".join(lines)


def _imbalanced_counts(K: int, K_A: int, ratios: torch.Tensor) -> torch.Tensor:
    counts = torch.ones(ratios.numel(), K, dtype=torch.float64)
    counts[:, :K_A] = ratios.unsqueeze(1)
    return counts


def _imbalance_classes(K, K_A) -> tuple[int, int]:
    """K >= 3 classes of which K_A in [1, K - 2] are the majority: a ratio n_A / n_B needs
    both groups, and the minority spread needs at least two minority rows (with one it is 0,
    which would read as Minority Collapse at any ratio)."""
    K = positive_int(K, "K")
    if K < 3:
        raise ValueError(f"Expected `K` >= 3 (one majority and two minority classes at least), got {K}")
    k_a = index(K_A)
    if k_a is None or not 1 <= k_a <= K - 2:
        raise ValueError(
            f"Expected `K_A` in [1, K - 2] (at least one majority and two minority classes), got K_A={K_A!r}, K={K}"
        )
    return K, k_a


def _sweep_args(K, K_A, ratios):
    K, K_A = _imbalance_classes(K, K_A)
    r = torch.as_tensor(ratios, dtype=torch.float64).detach().cpu().flatten()
    if r.numel() == 0 or not torch.isfinite(r).all() or (r <= 0).any():
        raise ValueError(f"Expected `ratios` to be positive finite numbers, got {ratios!r}")
    return K, K_A, r


def minority_collapse_sweep(
    K: int,
    K_A: int,
    ratios,
    E_W: float = 1.0,
    E_H: float = 1.0,
    *,
    oversample: bool = False,
    threshold: bool = False,
    spread_tol: float = 1e-3,
    points: int = 8,
    rounds: int = 6,
    **solve_kwargs,
) -> SweepResult:
    """Solve the imbalanced LPM for every ratio R in one batch (Fang et al. 2021, Sec. 3).

    K_A majority classes of size R, K - K_A minority classes of size 1 (only proportions
    matter). oversample=True multiplies the minority loss weights by R (oversampling by
    w_r = R), which restores the balanced problem. threshold=True also estimates R_0, the
    smallest R whose minority spread is below ``spread_tol`` (``estimate_threshold`` with
    ``points`` and ``rounds``, searched between the smallest and largest ratio).
    solve_kwargs go to ``solve`` (dim, loss, method, max_iter, tol, seed, device, dtype, ...).
    """
    K, K_A, r = _sweep_args(K, K_A, ratios)
    if threshold and not float(r.min()) < float(r.max()):
        raise ValueError(f"Expected at least two distinct `ratios` to bracket the threshold, got {r.tolist()}")
    counts = _imbalanced_counts(K, K_A, r)
    lw = None
    if oversample:
        lw = torch.ones_like(counts)
        lw[:, K_A:] = r.unsqueeze(1)
    res = solve(counts, E_W, E_H, loss_weights=lw, **solve_kwargs)
    minority = torch.arange(K) >= K_A
    stats = {k: v.double().cpu() for k, v in minority_stats(res.W, minority).items()}
    R0 = None
    if threshold:
        R0 = estimate_threshold(
            K,
            K_A,
            E_W,
            E_H,
            spread_tol=spread_tol,
            lo=float(r.min()),
            hi=float(r.max()),
            points=points,
            rounds=rounds,
            **solve_kwargs,
        )
    return SweepResult(
        ratio=r,
        objective=res.objective.double().cpu(),
        converged=res.converged.cpu(),
        K=K,
        K_A=K_A,
        E_W=float(E_W),
        E_H=float(E_H),
        result=res,
        threshold=R0,
        **stats,
    )


def estimate_threshold(
    K: int,
    K_A: int,
    E_W: float = 1.0,
    E_H: float = 1.0,
    *,
    spread_tol: float = 1e-3,
    lo: float = 1.0,
    hi: float = 1e4,
    points: int = 8,
    rounds: int = 6,
    **solve_kwargs,
) -> float | None:
    """Smallest imbalance ratio R in [lo, hi] with minority spread <= spread_tol (Minority Collapse).

    Multisection on log R with the batched solver: each round solves ``points`` ratios at
    once and keeps the bracket where the spread crosses ``spread_tol``, shrinking it by
    points + 1. Returns the geometric midpoint of the last bracket, ``hi`` side included;
    None when the spread at ``hi`` is still above the tolerance; ``lo`` when it is below there.
    Assumes the spread decreases with R (Fang et al. 2021, Thm 5). Needs K >= 3 and
    1 <= K_A <= K - 2 (a majority, and at least two minority rows to have a spread).
    """
    K, K_A = _imbalance_classes(K, K_A)
    positive_int(points, "points")
    positive_int(rounds, "rounds")
    positive_float(spread_tol, "spread_tol")
    lo, hi = positive_float(lo, "lo"), positive_float(hi, "hi")
    if not lo < hi:
        raise ValueError(f"Expected 0 < `lo` < `hi`, got lo={lo!r}, hi={hi!r}")
    minority = torch.arange(K) >= K_A

    def spreads(r: torch.Tensor) -> torch.Tensor:
        res = solve(_imbalanced_counts(K, K_A, r), E_W, E_H, **solve_kwargs)
        return minority_stats(res.W, minority)["minority_spread"].double().cpu()

    s = spreads(torch.tensor([lo, hi], dtype=torch.float64))
    if s[1] > spread_tol:
        return None
    if s[0] <= spread_tol:
        return lo
    a, b = math.log(lo), math.log(hi)
    for _ in range(rounds):
        grid = torch.linspace(a, b, points + 2, dtype=torch.float64)[1:-1]
        below = spreads(torch.exp(grid)) <= spread_tol
        first = int(torch.nonzero(below).flatten()[0]) if below.any() else points
        b = float(grid[first]) if first < points else b
        a = float(grid[first - 1]) if first > 0 else a
    return math.exp((a + b) / 2)
