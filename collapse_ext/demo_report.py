"""The report of ``collapse-ext demo --report DIR``: what theory predicts beside what the
digits runs showed (a :class:`~collapse_ext.demo.DemoResult`).

:func:`write_demo_report` writes into DIR ``report.html`` (self-contained, like the
analyze report of :mod:`collapse_ext.report`: base64 PNGs, nothing fetched),
``summary.json`` (settings, per-variant first/final numbers, the LPM prediction, the
sweep, the observations), ``metrics.jsonl`` (one line per epoch and variant: the
penultimate metric bundle and the separation fuzziness of every layer) and the PNGs:
NC1 (log scale), NC2 of the class means and of the classifier rows, NC3 and NC4 over
epochs; the minority / majority classifier cosines of the imbalanced run with the
Layer-Peeled Model's prediction; the separation fuzziness per layer with the fitted law;
the LPM Minority Collapse sweep. :func:`observations` gives the sentences at the top,
also printed by the command.
"""

from __future__ import annotations

import html
import json
import math
import os
from typing import Any

from .report import embed_figures, html_page, plot_minority_collapse, pyplot

__all__ = ["observations", "summary", "write_demo_report"]

_COLORS = {"balanced": "tab:blue", "imbalanced": "tab:red"}
_ETF = -1.0 / 9.0  # simplex ETF cosine for the 10 digit classes


def _curve(run: Any, name: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of metric ``name`` over the evaluated epochs, undefined ones left out."""
    points = [(r["epoch"], r["metrics"].get(name)) for r in run.evaluated]
    points = [(e, v) for e, v in points if v is not None and math.isfinite(v)]
    return [e for e, _ in points], [v for _, v in points]


def _change(run: Any, name: str) -> tuple[int, float, int, float] | None:
    """(first epoch, its value, last epoch, its value) of ``name`` over the evaluated epochs."""
    epochs, values = _curve(run, name)
    return (epochs[0], values[0], epochs[-1], values[-1]) if epochs else None


def _g(v: float | None, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec)


def observations(result: Any) -> list[str]:
    """Short sentences, in numbers, of what theory predicts and what the runs showed."""
    out = [
        f"Digits MLP 64-256-256-256-10, {result.epochs} epochs per run, seed {result.seed}; numbers from evaluate() "
        "(eval mode, NC4 with the final means) "
        + ("every epoch." if result.eval_every == 1 else f"at epoch 1, every {result.eval_every} epochs and the last.")
    ]
    for name, run in result.runs.items():
        final = run.final["penultimate"]
        size = f"{sum(run.counts)} samples" + (f", minority classes {run.minority}" if run.minority else "")
        nc1 = _change(run, "nc1")
        if nc1 is not None and nc1[3] > 0:
            e0, v0, e1, v1 = nc1
            verb = "fell" if v1 < v0 else "rose" if v1 > v0 else "stayed"
            out.append(
                f"{name} ({size}): NC1 {verb} from {v0:.3g} at epoch {e0} to {v1:.3g} at epoch {e1} "
                f"({v0 / v1:.3g}x; theory: -> 0); train accuracy {run.records[-1]['train_accuracy']:.1%}."
            )
        out.append(
            f"{name}: NC2 (simplex ETF: all 0) class means equinorm {_g(final.equinorm_means)}, equiangularity "
            f"{_g(final.equiangularity_means)}; classifier equinorm {_g(final.equinorm_weights)}, equiangularity "
            f"{_g(final.equiangularity_weights)}."
        )
        nc3, nc4 = _change(run, "self_duality"), _change(run, "ncc_mismatch")
        if nc3 is not None and nc4 is not None:
            out.append(
                f"{name}: NC3 self-duality {nc3[1]:.3g} -> {nc3[3]:.3g}, NC4 nearest-centre mismatch "
                f"{nc4[1]:.2%} -> {nc4[3]:.2%} (theory: both -> 0)."
            )
        if run.prediction is not None and final.minority_cos_mean is not None:
            p = run.prediction
            out.append(
                f"{name}: minority classifier cosine observed {final.minority_cos_mean:+.3f} "
                f"(majority {_g(final.majority_cos_mean, '+.3f')}) vs LPM prediction "
                f"{_g(p['minority_cos_mean'], '+.3f')} (majority {_g(p['majority_cos_mean'], '+.3f')}) for the "
                f"run's counts (R = {p['ratio']:.3g}, E_W = {p['E_W']:.3g}, E_H = {p['E_H']:.3g}); "
                f"simplex ETF {_ETF:+.3f}."
            )
        law = run.final.separation_law
        if law is not None:
            out.append(
                f"{name}: law of data separation over {len(run.final.layers)} layers: rho = {law['rho']:.3g}, "
                f"R^2 = {law['r2']:.3f} (He & Su 2023: geometric decay, R^2 near 1)."
            )
    sweep = result.sweep
    if sweep is not None:
        text = (
            f"LPM sweep (K = {sweep.K}, K_A = {sweep.K_A}, E_W = {sweep.E_W:g}, E_H = {sweep.E_H:g}): minority "
            f"cosine {float(sweep.minority_cos_mean[0]):+.3f} at R = {float(sweep.ratio[0]):g}, "
            f"{float(sweep.minority_cos_mean[-1]):+.3f} at R = {float(sweep.ratio[-1]):g}"
        )
        thr = sweep.threshold
        out.append(text + (f"; Minority Collapse past R_0 ~ {thr:.3g}." if thr is not None else "; no collapse."))
    return out


def _finite(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def summary(result: Any) -> dict[str, Any]:
    """The summary.json object: settings, per variant the counts, timings, first and
    final metrics, separation law and LPM prediction; the sweep; the observations."""
    variants = {}
    for name, run in result.runs.items():
        variants[name] = {
            "label_smoothing": run.label_smoothing,
            "counts": run.counts,
            "minority_classes": run.minority,
            "seconds": run.seconds,
            "train_accuracy": run.records[-1]["train_accuracy"],
            "first": run.evaluated[0],
            "final": run.evaluated[-1],
            "energies": {"E_W": run.energies[0], "E_H": run.energies[1]},
            "lpm_prediction": run.prediction,
        }
    sweep = result.sweep
    return _finite(
        {
            "command": "demo",
            "epochs": result.epochs,
            "eval_every": result.eval_every,
            "seed": result.seed,
            "seconds": result.seconds,
            "variants": variants,
            "lpm_sweep": None
            if sweep is None
            else {
                "K": sweep.K,
                "K_A": sweep.K_A,
                "E_W": sweep.E_W,
                "E_H": sweep.E_H,
                "threshold": sweep.threshold,
                "rows": sweep.rows(),
            },
            "observations": observations(result),
        }
    )


def _lr_drops(ax: Any, epochs: int) -> None:
    for i, e in enumerate(sorted({epochs // 3, 2 * epochs // 3} - {0})):
        ax.axvline(e, color="0.8", linewidth=0.8, zorder=0, label="lr / 10" if i == 0 else None)


def _over_epochs(result: Any, metrics: list[tuple[str, str, str]], title: str, ylabel: str, log: bool) -> Any:
    """One axis, a line per (variant, metric): metrics as (name, label, linestyle)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.4), constrained_layout=True)
    for variant, run in result.runs.items():
        for name, label, style in metrics:
            epochs, values = _curve(run, name)
            if log:
                epochs, values = zip(*[(e, v) for e, v in zip(epochs, values) if v > 0]) if values else ((), ())
            ax.plot(epochs, values, style, color=_COLORS.get(variant), label=f"{variant}{label}", linewidth=1.4)
    _lr_drops(ax, result.epochs)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _nc2(result: Any, what: str, label: str) -> Any:
    """Equinorm and equiangularity over epochs of the centred class means (what="means")
    or of the classifier rows ("weights"), log scale."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.4), constrained_layout=True)
    for variant, run in result.runs.items():
        for metric, style in (("equinorm", "-"), ("equiangularity", "--")):
            epochs, values = _curve(run, f"{metric}_{what}")
            keep = [(e, v) for e, v in zip(epochs, values) if v > 0]
            ax.plot(*zip(*keep) if keep else ((), ()), style, color=_COLORS.get(variant), label=f"{variant} {metric}")
    _lr_drops(ax, result.epochs)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("std/mean of norms; std of cosines")
    ax.set_title(f"NC2 of the {label} (simplex ETF: 0)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return fig


def _minority(run: Any, epochs: int) -> Any:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.4), constrained_layout=True)
    p = run.prediction
    for group, color in (("minority", "tab:red"), ("majority", "tab:blue")):
        xs, mean = _curve(run, f"{group}_cos_mean")
        ax.plot(xs, mean, "-", color=color, label=f"{group} classifier rows (observed)")
        value = p.get(f"{group}_cos_mean")
        if value is not None:
            ax.axhline(value, color=color, linestyle="--", label=f"{group}: LPM prediction {value:+.3f}")
    ax.axhline(_ETF, color="gray", linestyle=":", label=f"simplex ETF {_ETF:+.3f}")
    _lr_drops(ax, epochs)
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean pairwise cosine")
    ax.set_title(
        f"{run.variant} run: classifier cosines vs the CE Layer-Peeled Model\n"
        f"for its counts (R = {p['ratio']:.3g}) and energies (E_W = {p['E_W']:.3g}, E_H = {p['E_H']:.3g})",
        fontsize=10,
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return fig


def _separation(result: Any) -> Any:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.4), constrained_layout=True)
    names: list[str] = []
    for variant, run in result.runs.items():
        fuzz = run.final.separation_fuzziness
        names = list(fuzz)
        xs = [i for i, n in enumerate(names) if fuzz[n] is not None and fuzz[n] > 0]
        color = _COLORS.get(variant)
        ax.plot(xs, [fuzz[names[i]] for i in xs], "o-", color=color, label=f"{variant} D_l")
        law = run.final.separation_law
        if law is not None:
            fit = [math.exp(law["intercept"]) * law["rho"] ** i for i in range(len(names))]
            ax.plot(range(len(names)), fit, "--", color=color, alpha=0.7,
                    label=f"{variant} fit rho = {law['rho']:.3g}, R^2 = {law['r2']:.3f}")  # fmt: skip
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("D = tr(SS_W SS_B^+)")
    ax.set_title(f"law of data separation at epoch {result.epochs} (He & Su 2023)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _sweep(result: Any) -> Any:
    fig = plot_minority_collapse(result.sweep)
    for run in result.runs.values():
        if run.prediction is not None:
            r = run.prediction["ratio"]
            for ax in fig.axes:
                ax.axvline(r, color="tab:purple", linestyle="-.", label=f"{run.variant} digits run R = {r:.3g}")
                ax.legend(fontsize=8)
    return fig


def _figures(result: Any) -> list[tuple[str, Any, str]]:
    figs = [
        ("nc1.png", _over_epochs(result, [("nc1", "", "-")], "NC1 over epochs", "NC1 = tr(Sigma_W Sigma_B^+)/K", True),
         "NC1 (within-class variability relative to the between-class spread; log scale): theory -> 0."),
        ("nc2_means.png", _nc2(result, "means", "centred class means"),
         "NC2 of the centred class means: equinorm (std/mean of the norms) and equiangularity (std of the "
         "pairwise cosines); both 0 at a simplex ETF."),
        ("nc2_classifier.png", _nc2(result, "weights", "classifier rows"),
         "NC2 of the classifier rows: equinorm and equiangularity (simplex ETF: both 0)."),
        ("nc3.png", _over_epochs(result, [("self_duality", "", "-")], "NC3 over epochs",
                                 "||W/||W|| - M/||M|| ||^2", True),
         "NC3 self-duality: the classifier rows align with the centred class means (theory -> 0)."),
        ("nc4.png", _over_epochs(result, [("ncc_mismatch", "", "-")], "NC4 over epochs",
                                 "nearest-centre mismatch", False),
         "NC4: fraction of samples whose nearest class mean disagrees with the classifier (theory -> 0)."),
    ]  # fmt: skip
    for run in result.runs.values():
        if run.prediction is not None:
            figs.append(
                (
                    f"minority_{run.variant}.png",
                    _minority(run, result.epochs),
                    "Mean pairwise cosine among the minority and among the majority classifier rows per epoch; "
                    "dashed: the cross-entropy Layer-Peeled Model's optimum for the run's class counts and energies.",
                )
            )
    figs.append(("separation.png", _separation(result), "Separation fuzziness per layer and the fitted geometric law."))
    if result.sweep is not None:
        figs.append(
            (
                "minority_collapse.png",
                _sweep(result),
                "Minority Collapse in the Layer-Peeled Model over imbalance ratios at lpm-sweep's default "
                "energies (as collapse-ext lpm-sweep --plot, 13 ratios); the prediction beside the run above uses "
                "the run's own measured energies.",
            )
        )
    return figs


def _table(result: Any) -> str:
    esc = html.escape
    names = list(result.runs)
    head = "".join(f"<th>{esc(n)}</th>" for n in names)
    rows = []
    for key in next(iter(result.runs.values())).final["penultimate"].to_dict():
        cells = "".join(
            f"<td class=num>{esc(_g(run.final['penultimate'].to_dict()[key], '.4g'))}</td>"
            for run in result.runs.values()
        )
        rows.append(f"<tr><td>{esc(key)}</td>{cells}</tr>")
    return (
        f"<h2>Final metrics (penultimate features, epoch {result.epochs})</h2>\n"
        f"<table><tr><th>metric</th>{head}</tr>\n{''.join(rows)}</table>\n"
        "<p>Written by <code>collapse-ext demo --report</code>; per-epoch values in <code>metrics.jsonl</code>, "
        "these and the LPM prediction in <code>summary.json</code>.</p>"
    )


def write_demo_report(result: Any, directory: str | os.PathLike) -> str:
    """Write report.html, summary.json, metrics.jsonl and the PNGs of a DemoResult into
    ``directory`` (created if missing); returns the path of report.html."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    data = summary(result)
    with open(os.path.join(directory, "summary.json"), "w") as f:
        json.dump(data, f, indent=2)
    with open(os.path.join(directory, "metrics.jsonl"), "w") as f:
        for run in result.runs.values():
            for record in run.records:
                f.write(json.dumps(_finite(record)) + "\n")
    figures = embed_figures(_figures(result), directory)
    page = html_page(
        "collapse-ext demo: neural collapse on digits",
        "Neural collapse on scikit-learn's digits: theory and observation",
        data["observations"],
        figures,
        _table(result),
        wide=("minority_collapse.png",),
    )
    path = os.path.join(directory, "report.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path
