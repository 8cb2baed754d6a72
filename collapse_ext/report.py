"""Plots of collapse_ext results and the HTML report of ``collapse-ext analyze``
(matplotlib, imported lazily with the Agg backend).

matplotlib is an optional dependency (``pip install collapse_ext[plot]``); importing
this module never needs it, calling a plot function does.

:func:`write_report` writes ``report.html`` (self-contained: every image is an embedded
base64 PNG, no script or style is fetched, so it opens from disk with no network),
``summary.json`` (the ``--json`` object plus the observations) and the PNGs.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from typing import Any

__all__ = [
    "embed_figures",
    "html_page",
    "observations",
    "plot_minority_collapse",
    "pyplot",
    "write_report",
]


def pyplot():
    """matplotlib.pyplot with the Agg backend (a clear ImportError without matplotlib)."""
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
    plt = pyplot()
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


# --------------------------------------------------------------------------- analyze
_HEATMAP_MAX_K = 64  # above this, a histogram of pairwise cosines instead of a K x K heatmap
_SAMPLED_K = 2000  # classes sampled for the cosine histogram (pairs grow as K^2)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def observations(result: Any) -> list[str]:
    """Short sentences, in numbers, about what ``result`` (an AnalyzeResult) shows."""
    m = result.metrics
    kp = m.num_present
    out = [
        f"{result.num_samples:,} samples of {result.num_classes} classes ({kp} present"
        + (f", absent: {_short(m.absent_classes)}" if m.absent_classes else "")
        + f"), d = {result.stats[result.classifier_layer].dim}, layer '{result.classifier_layer}'."
    ]
    if result.skipped_nonfinite:
        out.append(f"{result.skipped_nonfinite:,} rows with NaN/Inf features were skipped.")
    if m.nc1 is not None:
        level = "strong" if m.nc1 < 0.1 else "partial" if m.nc1 < 1 else "little"
        out.append(
            f"NC1 = {m.nc1:.3g} (tr(Sigma_W Sigma_B^+)/K; 0 at full collapse): {level} within-class collapse; "
            f"CDNV {_fmt(m.nc1_cdnv)}."
        )
    if m.mean_cosine_means is not None and kp > 1:
        out.append(
            f"Centred class means: mean pairwise cosine {m.mean_cosine_means:+.3f} (simplex ETF {-1 / (kp - 1):+.3f}), "
            f"norm spread (std/mean) {_fmt(m.equinorm_means)}, ETF error {_fmt(m.etf_error_means)}."
        )
    if m.self_duality is not None:
        out.append(
            f"Classifier: self-duality ||W/||W|| - M/||M|| ||^2 = {m.self_duality:.3g} (0 when the classifier rows "
            f"align with the class means), mean cosine of rows {_fmt(m.mean_cosine_weights)}."
        )
    if m.ncc_accuracy is not None:
        text = f"Nearest class centre accuracy {m.ncc_accuracy:.2%}"
        if m.ncc_mismatch is not None:
            text += f"; it disagrees with the classifier on {m.ncc_mismatch:.2%} of the samples (NC4)"
        out.append(text + ".")
    if m.minority_classes:
        out.append(
            f"{len(m.minority_classes)} minority classes ({_short(m.minority_classes)}): minority classifier rows have "
            f"mean cosine {_fmt(m.minority_cos_mean)} and norm ratio {_fmt(m.norm_ratio)} "
            "to the majority."
        )
    if result.separation_law is not None:
        law = result.separation_law
        out.append(
            f"Law of data separation over {len(result.layers)} layers: each layer divides the separation fuzziness "
            f"by {1 / law.rho:.3g} (rho = {law.rho:.3g}, R^2 = {law.r2:.3f})."
        )
    return out


def _short(items: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _cosines(rows: Any) -> Any:
    import torch

    unit = torch.nn.functional.normalize(rows.double(), dim=1)
    return unit @ unit.T


def _save(fig: Any, path: str) -> None:
    plt = pyplot()
    try:
        fig.savefig(path, format="png", dpi=100)
    finally:
        plt.close(fig)


def _plots(result: Any) -> list[tuple[str, str, str]]:
    """(file name, figure callable, caption) of every plot that applies."""
    import torch

    plt = pyplot()
    stats = result.stats[result.classifier_layer]
    present = stats.present.cpu()
    counts = stats.counts.cpu()
    centred = stats.centred_means().cpu()
    classes = present.nonzero().flatten()
    kp = int(present.sum())
    figs = []

    fig, ax = plt.subplots(figsize=(7, 3.2), constrained_layout=True)
    if result.num_classes <= 100:
        colors = ["tab:red" if k in result.metrics.minority_classes else "tab:blue" for k in range(result.num_classes)]
        ax.bar(range(result.num_classes), counts.numpy(), color=colors)
        ax.set_xlabel("class")
    else:
        ax.plot(counts.sort(descending=True).values.numpy())
        ax.set_yscale("symlog")
        ax.set_xlabel("class rank (by count)")
    ax.set_ylabel("samples")
    ax.set_title("samples per class" + (" (minority in red)" if result.metrics.minority_classes else ""))
    figs.append(("counts.png", fig, "Samples per class."))

    if kp >= 2:
        cos = _cosines(centred)
        fig, ax = plt.subplots(figsize=(5.5, 4.5) if kp <= _HEATMAP_MAX_K else (7, 3.2), constrained_layout=True)
        if kp <= _HEATMAP_MAX_K:
            image = ax.imshow(cos.numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
            fig.colorbar(image, ax=ax, label="cosine")
            ticks = range(kp) if kp <= 20 else range(0, kp, max(1, kp // 10))
            ax.set_xticks(list(ticks), [str(int(classes[i])) for i in ticks])
            ax.set_yticks(list(ticks), [str(int(classes[i])) for i in ticks])
            ax.set_title(f"centred class-mean cosines (ETF: {-1 / (kp - 1):+.3f})")
        else:
            pick = torch.randperm(kp, generator=torch.Generator().manual_seed(0))[:_SAMPLED_K]
            sub = cos[pick][:, pick]
            off = sub[~torch.eye(sub.shape[0], dtype=torch.bool)]
            ax.hist(off.numpy(), bins=80, color="tab:blue")
            ax.axvline(-1 / (kp - 1), color="black", linestyle=":", label=f"simplex ETF {-1 / (kp - 1):+.4f}")
            ax.set_xlabel("pairwise cosine of centred class means")
            ax.legend(fontsize=8)
            ax.set_title(
                "pairwise cosines of centred class means"
                + (f" ({_SAMPLED_K} classes sampled)" if kp > _SAMPLED_K else "")
            )
        figs.append(("mean_cosines.png", fig, "Pairwise cosines of the centred class means mu_k - mu_G."))

    norms = centred.norm(dim=1)
    w = result.weight
    fig, ax = plt.subplots(figsize=(7, 3.2), constrained_layout=True)
    ax.plot(classes.numpy(), (norms / norms.mean()).numpy(), "o", markersize=3, label="||mu_k - mu_G|| / mean")
    if w is not None:
        wn = w.double()[classes].norm(dim=1)
        ax.plot(classes.numpy(), (wn / wn.mean()).numpy(), "s", markersize=3, label="||w_k|| / mean")
    ax.axhline(1.0, color="gray", linestyle=":")
    ax.set_xlabel("class")
    ax.set_ylabel("norm / mean norm")
    ax.set_title("norms of centred class means" + (" and classifier rows" if w is not None else ""))
    ax.legend(fontsize=8)
    figs.append(("norms.png", fig, "Norms relative to their mean (equinorm: all at 1)."))

    if w is not None and kp >= 2:
        wc = torch.nn.functional.cosine_similarity(w.double()[classes], centred, dim=1)
        fig, ax = plt.subplots(figsize=(7, 3.2), constrained_layout=True)
        ax.plot(classes.numpy(), wc.numpy(), "o", markersize=3)
        ax.axhline(1.0, color="gray", linestyle=":")
        ax.set_ylim(min(-0.05, float(wc.min()) - 0.05), 1.05)
        ax.set_xlabel("class")
        ax.set_ylabel("cos(w_k, mu_k - mu_G)")
        ax.set_title(f"classifier rows vs centred class means (mean {float(wc.mean()):.3f}; NC3: all at 1)")
        figs.append(("classifier_cosines.png", fig, "Cosine of each classifier row with its centred class mean."))

    if len(result.layers) > 1:
        names = list(result.layers)
        values = [result.layers[n].separation_fuzziness for n in names]
        fig, ax = plt.subplots(figsize=(7, 3.2), constrained_layout=True)
        xs = [i for i, v in enumerate(values) if v is not None and v > 0]
        ax.plot(xs, [values[i] for i in xs], "o-", label="separation fuzziness D_l")
        law = result.separation_law
        if law is not None:
            fit = [math.exp(law.intercept) * law.rho**i for i in range(len(names))]
            ax.plot(range(len(names)), fit, "--", color="black", label=f"fit rho = {law.rho:.3g}, R^2 = {law.r2:.3f}")
        ax.set_yscale("log")
        ax.set_xticks(range(len(names)), names, rotation=20)
        ax.set_ylabel("D = tr(SS_W SS_B^+)")
        ax.set_title("law of data separation (He & Su 2023)")
        ax.legend(fontsize=8)
        figs.append(("separation.png", fig, "Separation fuzziness per layer and the fitted geometric law."))
    return figs


_CHECK_SCRIPT = """
window.__errors = [];
window.addEventListener("error", function (e) {
  window.__errors.push(e.message || ("failed to load " + ((e.target && (e.target.src || e.target.href)) || "?")));
}, true);
window.addEventListener("load", function () {
  var images = Array.prototype.map.call(document.images, function (img) {
    return {alt: img.alt, ok: img.complete && img.naturalWidth > 0, width: img.naturalWidth};
  });
  var out = document.getElementById("page-check");
  out.textContent = JSON.stringify({images: images, errors: window.__errors});
});
"""


def embed_figures(figures: list[tuple[str, Any, str]], directory: str) -> list[tuple[str, str, str]]:
    """Save every (file name, matplotlib Figure, caption) as a PNG in ``directory`` (the
    figure is closed) and return (file name, caption, base64 PNG data) for :func:`html_page`."""
    out = []
    for name, fig, caption in figures:
        path = os.path.join(directory, name)
        _save(fig, path)
        with open(path, "rb") as f:
            out.append((name, caption, base64.b64encode(f.read()).decode("ascii")))
    return out


def html_page(
    title: str,
    heading: str,
    notes: list[str],
    figures: list[tuple[str, str, str]],
    body: str = "",
    wide: tuple[str, ...] = (),
) -> str:
    """A self-contained HTML page: ``heading`` (HTML), the ``notes`` as a list, the
    ``figures`` from :func:`embed_figures` as data-URI images (those named in ``wide``
    across the page, the others two to a row), then ``body`` (HTML). No
    script or style is fetched; the inline check script writes every image's natural
    width and every error into ``<pre id="page-check">`` on load (the browser test reads it)."""
    esc = html.escape
    images = "\n".join(
        f'<figure{" class=wide" if name in wide else ""}><img alt="{esc(name)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
        for name, caption, data in figures
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 1100px; color: #222; }}
h1 {{ font-size: 1.4em; }} code {{ background: #f3f3f3; padding: 0 .2em; }}
ul.obs li {{ margin: .2em 0; }}
.figs {{ display: flex; flex-wrap: wrap; gap: 1em; }}
figure {{ margin: 0; max-width: 542px; }} figure img {{ max-width: 540px; border: 1px solid #ddd; }}
figure.wide {{ max-width: 1092px; }} figure.wide img {{ max-width: 1090px; }}
figcaption {{ font-size: .9em; color: #555; }}
table {{ border-collapse: collapse; font-size: .9em; }}
td, th {{ border-bottom: 1px solid #eee; padding: .15em .6em; text-align: left; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
#page-check {{ display: none; }}
</style>
<script>{_CHECK_SCRIPT}</script>
</head><body>
<h1>{heading}</h1>
<ul class="obs">{"".join(f"<li>{esc(line)}</li>" for line in notes)}</ul>
<div class="figs">{images}</div>
{body}
<pre id="page-check"></pre>
</body></html>
"""


def write_report(result: Any, directory: str | os.PathLike) -> str:
    """Write ``report.html``, ``summary.json`` and the PNGs of an AnalyzeResult into
    ``directory`` (created if missing); returns the path of report.html."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    notes = observations(result)
    summary = dict(result.to_dict(), observations=notes)
    with open(os.path.join(directory, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    figures = embed_figures(_plots(result), directory)
    esc = html.escape
    rows = []
    for layer, bundle in result.layers.items():
        for key, value in bundle.to_dict().items():
            note = bundle.undefined.get(key, "")
            rows.append(
                f"<tr><td>{esc(layer)}</td><td>{esc(key)}</td><td class=num>{esc(_fmt(value))}</td>"
                f"<td>{esc(note)}</td></tr>"
            )
    body = f"""<h2>Metrics</h2>
<table><tr><th>layer</th><th>metric</th><th>value</th><th>note</th></tr>
{"".join(rows)}</table>
<p>Written by <code>collapse-ext analyze</code>; the numbers are also in <code>summary.json</code>.</p>"""
    page = html_page(
        f"collapse-ext analyze: {result.source}",
        f"Neural collapse of <code>{esc(result.source)}</code>",
        notes,
        figures,
        body,
    )
    path = os.path.join(directory, "report.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path
