"""``collapse-ext demo``: the digits MLP trained with a CollapseMonitor, neural collapse
printed as it happens (balanced, and imbalanced for minority collapse)."""

from __future__ import annotations

import argparse
import importlib.util
import time

from .common import _add_seed_and_jsonl, _int_at_least, _output_path, _Outputs, _same_file, _shown, _with_history

# Per variant: the project notes' recipe (label smoothing 0.1 deepens balanced collapse).
_VARIANTS = {
    "balanced": dict(imbalanced=False, label_smoothing=0.1),
    "imbalanced": dict(imbalanced=True, label_smoothing=0.0),
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
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
    p.add_argument("--epochs", type=_int_at_least(1), default=100, help="training epochs per variant (default 100)")
    p.add_argument("--print-every", type=_int_at_least(1), default=10, help="epochs between printed lines (default 10)")
    _add_seed_and_jsonl(p)
    p.add_argument("--csv", metavar="PATH", type=_output_path(), help="also write the results as CSV")
    p.add_argument(
        "--threads",
        type=_int_at_least(1, 1024),
        default=1,
        help="torch CPU threads (default 1: the MLP is small, and one thread is fastest on a busy machine)",
    )
    p.set_defaults(func=_demo, check=_check_demo, library_options={"epochs": "--epochs", "seed": "--seed"})


def _check_demo(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if _same_file(args.jsonl, args.csv):
        parser.error(f"--csv: expected a different path from --jsonl, got {_shown(args.csv)} for both")
    if importlib.util.find_spec("sklearn") is None:
        parser.error("needs scikit-learn for the digits data: pip install scikit-learn")


def _demo(args: argparse.Namespace) -> int:
    status = _with_history(_demo_run, args)
    if args.csv:
        print(f"history written to {args.csv}")
    return status


def _demo_run(args: argparse.Namespace, outputs: _Outputs) -> int:
    import torch

    from ..data import train_digits
    from ..loggers import CSVLogger, JSONLinesLogger

    torch.set_num_threads(args.threads)
    variants = ["balanced", "imbalanced"] if args.variant == "both" else [args.variant]
    loggers = []
    if args.jsonl:
        loggers.append(JSONLinesLogger(outputs.tmp(args.jsonl), overwrite=True))
    if args.csv:
        loggers.append(CSVLogger(outputs.tmp(args.csv)))
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
            print(
                f"minority collapse: mean cosine of minority classifier rows {m.minority_cos_mean:+.3f} vs "
                f"majority rows {m.majority_cos_mean:+.3f} (simplex ETF: {-1 / 9:+.3f})"
            )
        print(f"{variant}: {time.perf_counter() - start:.1f} s\n", flush=True)
    print(f"total {time.perf_counter() - start_all:.1f} s")
    return 0
