"""Log-log scaling plots (PNG) of the size sweeps in a results file of ``python -m benchmarks``.

    python -m benchmarks.plots benchmarks/results/cpu.json --out docs/bench/

A sweep is the rows of one case and op that carry the same ``sweep`` key (the size that
varies: N, d or K) and the same other sizes. Each gets one plot, time against that size
on log-log axes, for ours, the plain PyTorch way of the same run and, where the case
measured one, the floor (e.g. the bare GEMM); the legend gives each line's fitted slope
(1 = linear in the size). File names: ``<case>-<op>-<size>.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections import defaultdict

from .table import all_rows


def sweeps(payload: dict) -> dict[tuple, list[dict]]:
    """(case, op, size, fixed sizes) -> the rows of that sweep, sorted by the size; only
    sweeps of at least two sizes."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in all_rows(payload):
        var = row.get("sweep")
        sizes = row.get("sizes") or {}
        if not var or var not in sizes or not row.get("ours_s"):
            continue
        fixed = tuple((k, v) for k, v in sizes.items() if k != var)
        groups[(row.get("case"), row.get("op"), var, fixed)].append(row)
    out = {}
    for key, rows in groups.items():
        rows = sorted(rows, key=lambda r: r["sizes"][key[2]])
        if len({r["sizes"][key[2]] for r in rows}) >= 2:
            out[key] = rows
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", str(text)).strip("_")


def plot_files(payload: dict, out_dir: str) -> list[tuple[str, str]]:
    """(path, title) of every plot ``plot_all`` writes for ``payload`` into ``out_dir``."""
    files, seen = [], set()
    for case, op, var, fixed in sweeps(payload):
        name = f"{_slug(case)}-{_slug(op)}-{_slug(var)}"
        if name in seen:  # the same sweep at other fixed sizes
            name += "-" + "-".join(f"{_slug(k)}{v}" for k, v in fixed)
        seen.add(name)
        where = ", ".join(f"{k}={v}" for k, v in fixed)
        title = f"{op}: time vs {var}" + (f" ({where})" if where else "")
        files.append((os.path.join(out_dir, name + ".png"), title))
    return files


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log y against log x."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return None if sxx == 0 else sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


def plot_all(payload: dict, out_dir: str) -> list[str]:
    """Draw every sweep of ``payload`` into ``out_dir`` (created); returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    env = payload.get("environment", {})
    machine = env.get("gpu") or f"{env.get('cpu')}, {env.get('torch_threads')} threads"
    paths = []
    for (key, rows), (path, title) in zip(sweeps(payload).items(), plot_files(payload, out_dir)):
        var = key[2]
        fig, ax = plt.subplots(figsize=(5.5, 4))
        xs = [r["sizes"][var] for r in rows]
        lines = [("ours", "ours_s", "o-"), (f"plain PyTorch: {rows[0].get('plain')}", "plain_s", "s--")]
        if any(r.get("floor_s") for r in rows):
            lines.append((f"floor: {rows[0].get('floor')}", "floor_s", "^:"))
        for label, field, style in lines:
            pts = [(x, r[field]) for x, r in zip(xs, rows) if r.get(field)]
            if not pts:
                continue
            k = slope([p[0] for p in pts], [p[1] for p in pts])
            text = label if len(label) <= 48 else label[:45] + "..."
            ax.loglog(*zip(*pts), style, label=text + (f" (slope {k:.2f})" if k is not None else ""))
        for x, r in zip(xs, rows):
            if r.get("slower"):
                ax.annotate("slower", (x, r["ours_s"]), textcoords="offset points", xytext=(0, 6), ha="center",
                            color="red", fontsize=8)  # fmt: skip
        ax.set_xlabel(var)
        ax.set_ylabel("time per call (s)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.text(0.01, 0.01, machine, fontsize=6, color="gray")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.plots", description=__doc__.split("\n\n")[0])
    p.add_argument("path", metavar="FILE", help="results JSON written by python -m benchmarks")
    p.add_argument("--out", default="docs/bench", metavar="DIR", help="directory for the PNGs (default docs/bench)")
    args = p.parse_args(argv)
    try:
        with open(args.path) as f:
            payload = json.load(f)
    except (OSError, ValueError) as err:
        p.error(f"cannot read {args.path!r}: {err}")
    paths = plot_all(payload, args.out)
    for path in paths:
        print(path)
    if not paths:
        print(f"{args.path}: no size sweeps to plot", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
