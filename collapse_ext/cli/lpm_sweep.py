"""``collapse-ext lpm-sweep``: the Layer-Peeled Model solved over imbalance ratios
(Minority Collapse, Fang et al. 2021), its threshold R_0, a table and a plot."""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import time

from .common import (
    _PLOT_FORMATS,
    _device,
    _finite_float,
    _int_at_least,
    _is_out_of_memory,
    _OptionError,
    _output_path,
    _Outputs,
    _same_file,
    _shown,
)


def _ratios(text: str) -> tuple[float, float, int]:
    parts = text.split(":")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected LO:HI:POINTS such as 1:1e4:41, got {_shown(text)}")
    try:
        lo, hi = float(parts[0]), float(parts[1])
    except ValueError:
        lo = hi = math.nan
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
        raise argparse.ArgumentTypeError(f"expected LO:HI:POINTS with finite 0 < LO <= HI, got {_shown(text)}")
    try:
        points = int(parts[2])
    except ValueError:
        points = 0
    if points < 1:
        raise argparse.ArgumentTypeError(f"expected LO:HI:POINTS with an int POINTS >= 1, got {_shown(text)}")
    if (points == 1) != (lo == hi):
        raise argparse.ArgumentTypeError(
            f"expected LO:HI:POINTS with POINTS = 1 exactly when LO = HI, got {_shown(text)}"
        )
    return lo, hi, points


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "lpm-sweep",
        help="Minority Collapse in the Layer-Peeled Model over imbalance ratios (Fang et al. 2021)",
        description=(
            "Solve the class-collapsed Layer-Peeled Model (cross-entropy) for K_A majority classes of n_A samples "
            "and K - K_A minority classes of n_B, for every ratio R = n_A / n_B in one batch, and print the "
            "minority / majority classifier cosines and norms; optionally estimate the threshold R_0 past which "
            "the minority classifiers collapse, and plot the sweep."
        ),
    )
    p.add_argument(
        "--K",
        type=_int_at_least(3, why="one majority and two minority classes at least"),
        default=10,
        help="number of classes (default 10)",
    )
    p.add_argument(
        "--K-A", dest="K_A", type=_int_at_least(1), default=5, help="number of majority classes, <= K - 2 (default 5)"
    )
    p.add_argument("--E-W", dest="E_W", type=_finite_float(), default=1.0, help="classifier energy E_W (default 1)")
    p.add_argument("--E-H", dest="E_H", type=_finite_float(), default=5.0, help="feature energy E_H (default 5)")
    p.add_argument(
        "--ratios",
        type=_ratios,
        default=(1.0, 1e4, 41),
        help="log-spaced ratios LO:HI:POINTS, 0 < LO <= HI, POINTS = 1 exactly when LO = HI (default 1:1e4:41)",
    )
    p.add_argument("--loss", choices=["ce", "mse"], default="ce")
    p.add_argument("--oversample", action="store_true", help="oversample the minority by w_r = R (restores the ETF)")
    p.add_argument("--no-threshold", dest="threshold", action="store_false", help="skip the R_0 estimate")
    p.add_argument(
        "--tol",
        type=_finite_float(allow_zero=True),
        default=1e-8,
        help="projected-gradient norm to stop at (default 1e-8)",
    )
    p.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:INDEX (default cpu)")
    p.add_argument(
        "--plot",
        metavar="PATH",
        type=_output_path(_PLOT_FORMATS),
        help="save the plot of cosines and norms against R (png, pdf, svg; needs matplotlib)",
    )
    p.add_argument("--json", metavar="PATH", type=_output_path(), help="write the table (and threshold) as JSON")
    p.set_defaults(
        func=_lpm_sweep,
        check=_check_lpm_sweep,
        library_options={
            "K": "--K",
            "K_A": "--K-A",
            "E_W": "--E-W",
            "E_H": "--E-H",
            "ratios": "--ratios",
            "lo": "--ratios",
            "hi": "--ratios",
            "loss": "--loss",
            "tol": "--tol",
        },
    )


def _check_lpm_sweep(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.K_A > args.K - 2:
        parser.error(
            f"--K-A: expected an int in [1, K - 2] = [1, {args.K - 2}] (at least two minority classes), got {args.K_A}"
        )
    lo, hi, points = args.ratios
    if args.threshold and lo == hi:
        parser.error(f"--ratios: expected LO < HI for the R_0 estimate (or --no-threshold), got {lo:g}:{hi:g}:{points}")
    if _same_file(args.plot, args.json):
        parser.error(f"--json: expected a different path from --plot, got {_shown(args.json)} for both")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot: needs matplotlib: pip install matplotlib (or collapse_ext[plot])")


def _lpm_sweep(args: argparse.Namespace) -> int:
    import torch

    from ..lpm import minority_collapse_sweep

    lo, hi, points = args.ratios
    start = time.perf_counter()
    try:
        ratios = torch.logspace(math.log10(lo), math.log10(hi), points, dtype=torch.float64)
        ratios[0], ratios[-1] = lo, hi  # exact ends, not 10 ** log10(x)
        sweep = minority_collapse_sweep(
            args.K,
            args.K_A,
            ratios,
            args.E_W,
            args.E_H,
            oversample=args.oversample,
            threshold=args.threshold,
            loss=args.loss,
            tol=args.tol,
            device=args.device,
        )
    except (MemoryError, RuntimeError) as err:
        if not _is_out_of_memory(err):
            raise
        raise _OptionError(
            "--K/--ratios", f"expected a problem that fits in memory on {args.device}, got K={args.K}, POINTS={points}"
        ) from None
    print(
        f"Layer-Peeled Model, K={args.K}, K_A={args.K_A}, E_W={args.E_W}, E_H={args.E_H}, loss {args.loss}"
        f"{', minority oversampled by R' if args.oversample else ''}: {int(sweep.converged.sum())}/{points} converged"
        f" in {time.perf_counter() - start:.1f} s"
    )
    print(sweep.to_markdown())
    if args.threshold and sweep.threshold is None:
        print(f"\nNo Minority Collapse up to R = {hi:g} (spread above tolerance)")
    outputs = _Outputs()
    try:
        if args.plot:
            _save_plot(sweep, outputs.tmp(args.plot), os.path.splitext(args.plot)[1][1:].lower())
        if args.json:
            import json

            with open(outputs.tmp(args.json), "w") as f:
                json.dump({"rows": sweep.rows(), "threshold": sweep.threshold}, f, indent=2)
        outputs.commit()
    finally:
        outputs.discard()
    if args.plot:
        print(f"plot written to {args.plot}")
    if args.json:
        print(f"table written to {args.json}")
    return 0


def _save_plot(sweep, path: str, fmt: str) -> None:
    from ..report import plot_minority_collapse

    fig = plot_minority_collapse(sweep)
    import matplotlib.pyplot as plt

    try:
        fig.savefig(path, format=fmt)
    finally:
        plt.close(fig)
