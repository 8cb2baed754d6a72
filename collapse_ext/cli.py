"""Command line: ``python -m collapse_ext.cli <command>`` or ``collapse-ext <command>``.

Commands:
    demo       train the digits MLP with a CollapseMonitor and print neural collapse as it happens
    lpm-sweep  solve the Layer-Peeled Model over imbalance ratios: Minority Collapse, its threshold, a plot

Each command is a ``_add_<name>(subparsers)`` function that registers its parser and sets
``func``; :func:`main` dispatches.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

__all__ = ["build_parser", "main"]

# Per variant: the project notes' recipe (label smoothing 0.1 deepens balanced collapse).
_VARIANTS = {
    "balanced": dict(imbalanced=False, label_smoothing=0.1),
    "imbalanced": dict(imbalanced=True, label_smoothing=0.0),
}


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="neural collapse of an MLP on scikit-learn's bundled digits data (no download)",
        description=(
            "Train the MLP 64-256-256-256-10 (BatchNorm, ReLU; SGD lr 0.1, momentum 0.9, weight decay 5e-3, "
            "batch 128, lr / 10 at 1/3 and 2/3) on scikit-learn's digits with a CollapseMonitor on block1, "
            "block2 and the penultimate features. Every --print-every epochs: an exact evaluate() pass (eval "
            "mode, NC4 with the final means). At the end: the full metric bundle and the layer-wise law of "
            "data separation. 'imbalanced' subsamples classes 5-9 10x (minority collapse)."
        ),
    )
    p.add_argument("--variant", choices=["balanced", "imbalanced", "both"], default="both")
    p.add_argument("--epochs", type=_positive, default=100, help="training epochs per variant (default 100)")
    p.add_argument("--print-every", type=_positive, default=10, help="epochs between printed lines (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jsonl", metavar="PATH", help="write every monitor result as JSON lines (one file, appended)")
    p.add_argument("--csv", metavar="PATH", help="also write the results as CSV")
    p.add_argument(
        "--threads",
        type=_positive,
        default=1,
        help="torch CPU threads (default 1: the MLP is small, and one thread is fastest on a busy machine)",
    )
    p.set_defaults(func=_demo)


def _majority_cosine(weight, minority: list[int]) -> float:
    import torch

    keep = [k for k in range(weight.shape[0]) if k not in minority]
    w = torch.nn.functional.normalize(weight[keep].double(), dim=1)
    gram = w @ w.T
    n = len(keep)
    return float((gram.sum() - gram.diagonal().sum()) / (n * (n - 1)))


def _demo(args: argparse.Namespace) -> int:
    import torch

    from .data import train_digits
    from .loggers import CSVLogger, JSONLinesLogger

    torch.set_num_threads(args.threads)
    variants = ["balanced", "imbalanced"] if args.variant == "both" else [args.variant]
    loggers = []
    if args.jsonl:
        loggers.append(JSONLinesLogger(args.jsonl, overwrite=True))
    csv_logger = CSVLogger(args.csv) if args.csv else None
    if csv_logger is not None:
        loggers.append(csv_logger)
    start_all = time.perf_counter()
    for variant in variants:
        recipe = _VARIANTS[variant]
        print(f"== digits, {variant}: {args.epochs} epochs, label smoothing {recipe['label_smoothing']}", flush=True)
        start = time.perf_counter()

        def on_epoch(epoch: int, run, every: int = args.print_every, epochs: int = args.epochs) -> None:
            if epoch % every == 0 or epoch == epochs or epoch == 1:
                result = run.monitor.evaluate([run.data]) if epoch != epochs else run.monitor.history[-1]
                print(f"{result.summary()}  train acc {run.train_accuracy[-1]:.4f}", flush=True)

        run = train_digits(
            args.epochs,
            imbalanced=recipe["imbalanced"],
            label_smoothing=recipe["label_smoothing"],
            seed=args.seed,
            monitor_kwargs=dict(loggers=loggers),
            evaluate_every=args.epochs,
            on_epoch=on_epoch,
        )
        final = run.monitor.history[-1]
        first = next(r for r in run.monitor.history if r.phase == "train")
        print(f"\nfinal bundle ({variant}, penultimate features; evaluate(): eval mode, NC4 with the final means)")
        print(final["penultimate"])
        fuzz = ", ".join(f"{k} {v:.4g}" for k, v in final.separation_fuzziness.items() if v is not None)
        print(f"separation fuzziness D_l per layer: {fuzz}")
        if final.separation_law is not None:
            law = final.separation_law
            print(f"law of data separation: D_l+1 / D_l = rho = {law['rho']:.3g} (R^2 {law['r2']:.3f})")
        nc1_first, nc1_end = first["penultimate"].nc1, final["penultimate"].nc1
        if nc1_first is not None and nc1_end:
            print(
                f"NC1: epoch 1 (training statistics) {nc1_first:.4g} -> end {nc1_end:.4g} ({nc1_first / nc1_end:.1f}x)"
            )
        m = final["penultimate"]
        if m.minority_classes:
            w = run.model.fc.weight.detach()
            print(
                f"minority collapse: mean cosine of minority classifier rows {m.minority_weight_cos_mean:+.3f} vs "
                f"majority rows {_majority_cosine(w, m.minority_classes):+.3f} (simplex ETF: {-1 / 9:+.3f})"
            )
        print(f"{variant}: {time.perf_counter() - start:.1f} s\n", flush=True)
    if args.jsonl:
        print(f"history written to {args.jsonl} (read back with collapse_ext.loggers.read_jsonl)")
    if args.csv:
        print(f"history written to {args.csv}")
    print(f"total {time.perf_counter() - start_all:.1f} s")
    return 0


def _ratios(text: str) -> tuple[float, float, int]:
    try:
        lo, hi, points = text.split(":")
        parsed = float(lo), float(hi), int(points)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected LO:HI:POINTS such as 1:1e4:41, got {text!r}") from err
    if not (0 < parsed[0] <= parsed[1]) or parsed[2] < 1:
        raise argparse.ArgumentTypeError(f"expected 0 < LO <= HI and POINTS >= 1, got {text!r}")
    return parsed


def _add_lpm_sweep(subparsers: argparse._SubParsersAction) -> None:
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
    p.add_argument("--K", type=_positive, default=10, help="number of classes (default 10)")
    p.add_argument("--K-A", dest="K_A", type=_positive, default=5, help="number of majority classes (default 5)")
    p.add_argument("--E-W", dest="E_W", type=float, default=1.0, help="classifier energy E_W (default 1)")
    p.add_argument("--E-H", dest="E_H", type=float, default=5.0, help="feature energy E_H (default 5)")
    p.add_argument(
        "--ratios", type=_ratios, default=(1.0, 1e4, 41), help="log-spaced ratios LO:HI:POINTS (default 1:1e4:41)"
    )
    p.add_argument("--loss", choices=["ce", "mse"], default="ce")
    p.add_argument("--oversample", action="store_true", help="oversample the minority by w_r = R (restores the ETF)")
    p.add_argument("--no-threshold", dest="threshold", action="store_false", help="skip the R_0 estimate")
    p.add_argument("--tol", type=float, default=1e-8, help="projected-gradient norm to stop at (default 1e-8)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--plot", metavar="PATH", help="save the plot of cosines and norms against R (png, pdf, svg)")
    p.add_argument("--json", metavar="PATH", help="write the table (and threshold) as JSON")
    p.set_defaults(func=_lpm_sweep)


def _lpm_sweep(args: argparse.Namespace) -> int:
    import json

    import torch

    from .lpm import minority_collapse_sweep

    lo, hi, points = args.ratios
    ratios = torch.logspace(torch.log10(torch.tensor(lo)), torch.log10(torch.tensor(hi)), points, dtype=torch.float64)
    start = time.perf_counter()
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
    print(
        f"Layer-Peeled Model, K={args.K}, K_A={args.K_A}, E_W={args.E_W}, E_H={args.E_H}, loss {args.loss}"
        f"{', minority oversampled by R' if args.oversample else ''}: {int(sweep.converged.sum())}/{points} converged"
        f" in {time.perf_counter() - start:.1f} s"
    )
    print(sweep.to_markdown())
    if args.threshold and sweep.threshold is None:
        print(f"\nNo Minority Collapse up to R = {hi:g} (spread above tolerance)")
    if args.plot:
        from .report import plot_minority_collapse

        plot_minority_collapse(sweep, args.plot)
        print(f"plot written to {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": sweep.rows(), "threshold": sweep.threshold}, f, indent=2)
        print(f"table written to {args.json}")
    return 0


def build_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The top-level parser and its subcommand registry (add a command with
    ``subparsers.add_parser(name, ...)`` and ``set_defaults(func=...)``)."""
    parser = argparse.ArgumentParser(prog="collapse-ext", description="collapse_ext: neural-collapse tools")
    subparsers = parser.add_subparsers(dest="command", metavar="command")
    _add_demo(subparsers)
    _add_lpm_sweep(subparsers)
    return parser, subparsers


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``collapse-ext``; returns the exit status."""
    parser, _ = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
