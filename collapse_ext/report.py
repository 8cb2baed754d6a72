"""Plots of collapse_ext results (matplotlib, imported lazily with the Agg backend).

matplotlib is an optional dependency (``pip install collapse_ext[plot]``); importing
this module never needs it, calling a plot function does.
"""

from __future__ import annotations

from typing import Any

__all__ = ["plot_minority_collapse"]


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("plotting needs matplotlib: pip install matplotlib (or collapse_ext[plot])") from err
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_minority_collapse(sweep_result: Any, path=None):
    """Minority Collapse against the imbalance ratio R (log axis), from ``minority_collapse_sweep``.

    Left: mean pairwise cosine among minority and among majority classifier rows (with
    their std as a band) and the balanced value -1/(K-1). Right: mean minority and
    majority classifier norms and their ratio. The estimated threshold R_0, when the
    sweep has one, is a vertical line on both. Returns the matplotlib Figure; with
    ``path`` it is also saved there (format from the extension) and closed.
    """
    from .lpm import SweepResult

    if not isinstance(sweep_result, SweepResult):
        raise TypeError(
            f"Expected `sweep_result` to be a SweepResult from minority_collapse_sweep, got {type(sweep_result)!r}"
        )
    plt = _pyplot()
    r = sweep_result.ratio.numpy()
    order = r.argsort()
    r = r[order]
    col = lambda name: getattr(sweep_result, name).numpy()[order]  # noqa: E731
    fig, (ax_cos, ax_norm) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)

    for name, color in (("minority", "tab:red"), ("majority", "tab:blue")):
        mean, std = col(f"{name}_cos_mean"), col(f"{name}_cos_std")
        ax_cos.plot(r, mean, marker="o", markersize=3, color=color, label=f"{name} classifiers")
        ax_cos.fill_between(r, mean - std, mean + std, color=color, alpha=0.2)
    ax_cos.axhline(-1.0 / (sweep_result.K - 1), color="gray", linestyle=":", label="simplex ETF -1/(K-1)")
    ax_cos.set_ylabel("mean pairwise cosine")
    ax_cos.set_ylim(-1.05, 1.05)

    ax_norm.plot(r, col("minority_norm"), marker="o", markersize=3, color="tab:red", label="minority ||w||")
    ax_norm.plot(r, col("majority_norm"), marker="o", markersize=3, color="tab:blue", label="majority ||w||")
    ax_norm.plot(r, col("norm_ratio"), linestyle="--", color="black", label="minority / majority")
    ax_norm.set_ylabel("mean classifier norm")
    ax_norm.set_ylim(bottom=0)

    for ax in (ax_cos, ax_norm):
        if sweep_result.threshold is not None:
            ax.axvline(
                sweep_result.threshold, color="green", linestyle="--", label=f"R_0 ~ {sweep_result.threshold:.3g}"
            )
        ax.set_xscale("log")
        ax.set_xlabel("imbalance ratio R = n_majority / n_minority")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"Minority Collapse in the Layer-Peeled Model (K = {sweep_result.K}, K_A = {sweep_result.K_A}, "
        f"E_W = {sweep_result.E_W:g}, E_H = {sweep_result.E_H:g})"
    )
    if path is not None:
        fig.savefig(path)
        plt.close(fig)
    return fig
