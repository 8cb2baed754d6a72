"""The digits demo (``collapse-ext demo``): the two training runs, their per-epoch
records, the Layer-Peeled Model's prediction for the imbalanced run and a quick
Minority Collapse sweep.

:func:`run_demo` trains the digits MLP of :mod:`collapse_ext.data` once per variant
("balanced"; "imbalanced": classes 5-9 subsampled 10x) with a CollapseMonitor on
``block1``, ``block2`` and the penultimate features, runs the exact
:meth:`~collapse_ext.CollapseMonitor.evaluate` (eval mode, NC4 with the final means) at
epoch 1, every ``eval_every`` epochs and after the last, and returns a
:class:`DemoResult`: one record per epoch and variant (the penultimate metric bundle, the
separation fuzziness of every layer and the fitted law), the class counts, and, for the
imbalanced run, the minority / majority classifier cosines that the cross-entropy LPM
(Fang, He, Long & Su 2021) predicts for the same class counts and the run's measured
energies E_W, E_H (SPEC: mean squared norms of the classifier rows and of the centred
class means). :mod:`collapse_ext.demo_report` turns it into the report.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["SWEEP_RATIOS", "VARIANTS", "DemoResult", "VariantRun", "lpm_prediction", "run_demo", "run_variant"]

# Per variant: the project notes' recipe (label smoothing 0.1 deepens balanced collapse).
VARIANTS = {
    "balanced": dict(imbalanced=False, label_smoothing=0.1),
    "imbalanced": dict(imbalanced=True, label_smoothing=0.0),
}

# The quick Minority Collapse sweep of the report: lpm-sweep's defaults (K = 10, K_A = 5,
# E_W = 1, E_H = 5, cross-entropy) on 13 ratios instead of 41.
SWEEP_RATIOS = (1.0, 1e4, 13)
SWEEP_PROBLEM = dict(K=10, K_A=5, E_W=1.0, E_H=5.0)


@dataclass
class VariantRun:
    """One training run of the demo.

    records: one dict per epoch, ``{"variant", "epoch", "phase", "train_accuracy",
    "metrics": {name: value} (penultimate bundle), "separation_fuzziness": {layer: D_l},
    "separation_law": {"rho", "r2", "pearson", "intercept"} or None}``; phase "eval" where
    evaluate() ran that epoch, else "train" (the epoch's training statistics).
    first_train: the monitor's result of epoch 1's training statistics; final: the last
    evaluate() result. counts: samples per class; minority: the monitor's minority
    classes; energies: measured (E_W, E_H) after training; prediction: the LPM's
    (imbalanced run only, see :func:`lpm_prediction`).
    """

    variant: str
    label_smoothing: float
    counts: list[int]
    minority: list[int]
    records: list[dict[str, Any]]
    first_train: Any
    final: Any
    seconds: float
    energies: tuple[float, float]
    prediction: dict[str, Any] | None = None

    @property
    def evaluated(self) -> list[dict[str, Any]]:
        """The records of the evaluated epochs (phase "eval")."""
        return [r for r in self.records if r["phase"] == "eval"]


@dataclass
class DemoResult:
    """Everything :func:`run_demo` measured: ``runs`` {variant: VariantRun}, the quick LPM
    ``sweep`` (a SweepResult, or None when not requested) and the settings."""

    runs: dict[str, VariantRun]
    sweep: Any
    epochs: int
    eval_every: int
    seed: int
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)


def _record(variant: str, epoch: int, result: Any, accuracy: float) -> dict[str, Any]:
    return {
        "variant": variant,
        "epoch": epoch,
        "phase": result.phase,
        "train_accuracy": accuracy,
        "metrics": result["penultimate"].to_dict(),
        "separation_fuzziness": result.separation_fuzziness,
        "separation_law": None if result.separation_law is None else dict(result.separation_law),
    }


def _energies(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[float, float]:
    """Measured (E_W, E_H): mean squared norm of the classifier rows and of the centred
    class means of the penultimate features (eval mode, present classes), float64."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            features = model[:-1](x).double()
    finally:
        model.train(was_training)
    counts = torch.bincount(y, minlength=num_classes).double()
    sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float64).index_add_(0, y, features)
    present = counts > 0
    means = sums[present] / counts[present, None]
    centred = means - features.mean(0)
    weight = model[-1].weight.detach().double()[present]
    return float(weight.pow(2).sum(1).mean()), float(centred.pow(2).sum(1).mean())


def lpm_prediction(counts: Sequence[int], minority: Sequence[int], E_W: float, E_H: float) -> dict[str, Any]:
    """The cross-entropy Layer-Peeled Model (class-collapsed, ``lpm.solve``) for class sizes
    ``counts`` (K,) and energies E_W, E_H: its minority / majority classifier statistics
    (``lpm.minority_stats``: minority_cos_mean, majority_cos_mean, norm_ratio, ...) for the
    classes ``minority``, with the problem (counts, E_W, E_H, ratio R = max n / min n
    over present classes), objective, KKT residual and whether it converged."""
    from . import lpm

    n = torch.tensor([float(c) for c in counts], dtype=torch.float64)
    present = n > 0
    mask = torch.zeros(n.numel(), dtype=torch.bool)
    mask[list(minority)] = True
    # Absent classes have no loss term and no data: they are left out of the model.
    res = lpm.solve(n[present], E_W, E_H, loss="ce")
    stats = lpm.minority_stats(res.W, mask[present])
    out: dict[str, Any] = {
        "model": "lpm-ce",
        "counts": [int(c) for c in counts],
        "E_W": float(E_W),
        "E_H": float(E_H),
        "ratio": float(n[present].max() / n[present].min()),
        "objective": float(res.objective[0]),
        "kkt": float(res.kkt[0]),
        "converged": bool(res.converged[0]),
    }
    for name, value in stats.items():
        v = float(value[0])
        out[name] = v if math.isfinite(v) else None
    return out


def _progress(enabled: bool, total: int, desc: str) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=f"{desc:<10}", unit="epoch", file=sys.stderr, leave=True, dynamic_ncols=True)


def run_variant(
    variant: str,
    epochs: int,
    *,
    seed: int = 0,
    eval_every: int = 1,
    loggers: Sequence[Any] = (),
    progress: bool = False,
    echo: Callable[[str], None] | None = None,
    print_every: int | None = None,
) -> VariantRun:
    """Train one variant (a key of VARIANTS) for ``epochs`` epochs, evaluating at epoch 1,
    every ``eval_every`` epochs and after the last. loggers: passed to the monitor;
    progress: a tqdm bar on stderr; echo(line): called with the one-line summary of the
    latest result at epoch 1, every ``print_every`` epochs and at the end (when given)."""
    from .data import train_digits

    if variant not in VARIANTS:
        raise ValueError(f"Expected `variant` to be one of {sorted(VARIANTS)}, got {variant!r}")
    recipe = VARIANTS[variant]
    records: list[dict[str, Any]] = []
    bar = _progress(progress, epochs, variant)
    start = time.perf_counter()

    def on_epoch(epoch: int, run: Any) -> None:
        history = run.monitor.history
        if epoch == 1 or epoch % eval_every == 0 or epoch == epochs:
            result = run.monitor.evaluate([run.data])
        else:
            result = history[-1]
        accuracy = run.train_accuracy[-1]
        records.append(_record(variant, epoch, result, accuracy))
        nc1 = result["penultimate"].nc1
        if bar is not None:
            bar.set_postfix_str(f"NC1 {'-' if nc1 is None else f'{nc1:.3g}'}  acc {accuracy:.3f}", refresh=False)
            bar.update(1)
        if echo is not None and print_every and (epoch == 1 or epoch % print_every == 0 or epoch == epochs):
            line = f"{variant:<10} {result.summary()}  train acc {accuracy:.4f}"
            if bar is not None:
                bar.write(line, file=sys.stdout)
            else:
                echo(line)

    try:
        run = train_digits(
            epochs,
            imbalanced=recipe["imbalanced"],
            label_smoothing=recipe["label_smoothing"],
            seed=seed,
            monitor_kwargs=dict(loggers=list(loggers)),
            on_epoch=on_epoch,
        )
    finally:
        if bar is not None:
            bar.close()
    x, y = run.data
    history = run.monitor.history
    first = next(r for r in history if r.phase == "train")
    final = next(r for r in reversed(history) if r.phase == "eval")
    counts = torch.bincount(y, minlength=10).tolist()
    return VariantRun(
        variant=variant,
        label_smoothing=recipe["label_smoothing"],
        counts=counts,
        minority=list(final["penultimate"].minority_classes),
        records=records,
        first_train=first,
        final=final,
        seconds=time.perf_counter() - start,
        energies=_energies(run.model, x, y, 10),
    )


def run_demo(
    variants: Sequence[str] = ("balanced", "imbalanced"),
    epochs: int = 100,
    *,
    seed: int = 0,
    eval_every: int = 1,
    sweep: bool = True,
    loggers: Sequence[Any] = (),
    progress: bool = False,
    echo: Callable[[str], None] | None = None,
    print_every: int | None = None,
) -> DemoResult:
    """Run every variant (:func:`run_variant`), solve the LPM for the class counts of each
    run with a minority (its prediction goes to ``VariantRun.prediction``) and, with
    ``sweep``, the quick Minority Collapse sweep (SWEEP_PROBLEM over SWEEP_RATIOS, with
    the threshold R_0)."""
    start = time.perf_counter()
    runs = {}
    for variant in variants:
        run = run_variant(
            variant,
            epochs,
            seed=seed,
            eval_every=eval_every,
            loggers=loggers,
            progress=progress,
            echo=echo,
            print_every=print_every,
        )
        if run.minority:
            run.prediction = lpm_prediction(run.counts, run.minority, *run.energies)
        runs[variant] = run
    result = None
    if sweep:
        from .lpm import minority_collapse_sweep

        lo, hi, points = SWEEP_RATIOS
        ratios = torch.logspace(math.log10(lo), math.log10(hi), points, dtype=torch.float64)
        ratios[0], ratios[-1] = lo, hi
        result = minority_collapse_sweep(ratios=ratios, threshold=True, **SWEEP_PROBLEM)
    return DemoResult(
        runs=runs,
        sweep=result,
        epochs=epochs,
        eval_every=eval_every,
        seed=seed,
        seconds=time.perf_counter() - start,
    )
