"""The lm-demo report's figure (matplotlib, imported lazily through :func:`report.pyplot`)."""

from __future__ import annotations

import math
from typing import Any

from .report import pyplot

__all__ = ["plot_lm_history"]


def plot_lm_history(history: Any, path=None, *, title: str | None = None, format: str | None = None):
    """The lm-demo report's figure from an LMCollapseMonitor's ``history`` (LMResults or
    their ``to_dict()``), against the training step: CDNV and NC1 quotient of the final
    hidden states over all tokens and per frequency bucket (head, body, tail), and the mean
    pairwise cosine of the rare (tail) tokens' classifier rows against the others'. Returns
    the Figure; with ``path`` it is also saved there and closed."""
    plt = pyplot()
    rows = [r if isinstance(r, dict) else r.to_dict() for r in history]
    if not rows:
        raise ValueError("Expected a non-empty `history` of LMCollapseMonitor results, got none")
    steps = [r["step"] for r in rows]

    def series(part: str, name: str, key: str) -> list[float]:
        out = []
        for r in rows:
            value = r.get(part, {}).get(name, {}).get("metrics", {}).get(key)
            out.append(math.nan if value is None else value)
        return out

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), constrained_layout=True)
    curves = [("layers", "penultimate", "all tokens", "black")]
    curves += [("views", v, v, c) for v, c in (("head", "tab:blue"), ("body", "tab:green"), ("tail", "tab:red"))]
    for ax, key, label in ((axes[0], "nc1_cdnv", "CDNV"), (axes[1], "nc1_quotient", "NC1 quotient tr S_W / tr S_B")):
        for part, name, text, color in curves:
            ax.plot(steps, series(part, name, key), marker="o", markersize=3, color=color, label=text)
        ax.set_yscale("log")
        ax.set_ylabel(label)
    axes[0].set_title("class-distance normalised variance")
    axes[1].set_title("within / between variability")
    ax = axes[2]
    for key, text, color in (
        ("minority_cos_mean", "rare (tail) tokens", "tab:red"),
        ("majority_cos_mean", "others", "tab:blue"),
    ):
        ax.plot(steps, series("layers", "penultimate", key), marker="o", markersize=3, color=color, label=text)
    ax.axhline(0.0, color="gray", linestyle=":")
    ax.set_ylabel("mean pairwise cosine of classifier rows")
    ax.set_title("classifier-row cosines (Minority Collapse)")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    if path is not None:
        try:
            fig.savefig(path, format=format, dpi=100)
        finally:
            plt.close(fig)
    return fig
