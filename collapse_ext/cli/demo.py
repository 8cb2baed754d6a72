"""``collapse-ext demo``: the digits MLP trained with a CollapseMonitor (balanced, and
imbalanced for minority collapse), the LPM's prediction beside it, and its report."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from .common import (
    _add_seed_and_jsonl,
    _int_at_least,
    _output_dir,
    _output_path,
    _Outputs,
    _same_file,
    _shown,
    _with_outputs,
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="neural collapse of an MLP on scikit-learn's bundled digits data (no download), --report DIR",
        description=(
            "Train the MLP 64-256-256-256-10 (BatchNorm, ReLU; SGD lr 0.1, momentum 0.9, weight decay 5e-3, "
            "batch 128, lr / 10 at 1/3 and 2/3) on scikit-learn's digits with a CollapseMonitor on block1, "
            "block2 and the penultimate features; 'imbalanced' subsamples classes 5-9 10x (minority collapse). "
            "At epoch 1, every --eval-every epochs and at the end: an exact evaluate() pass (eval mode, NC4 with "
            "the final means). Then the cross-entropy Layer-Peeled Model for the imbalanced run's class counts and a "
            "quick Minority Collapse sweep. Prints a progress bar per run (on a terminal) and a summary; --report "
            "writes the HTML report with every plot, summary.json and metrics.jsonl (one line per epoch and run)."
        ),
    )
    p.add_argument("--variant", choices=["balanced", "imbalanced", "both"], default="both")
    p.add_argument("--epochs", type=_int_at_least(1), default=100, help="training epochs per variant (default 100)")
    p.add_argument(
        "--eval-every",
        type=_int_at_least(1),
        default=1,
        help="epochs between evaluate() passes; epoch 1 and the last are always evaluated (default 1)",
    )
    p.add_argument(
        "--print-every",
        type=_int_at_least(1),
        help="also print the headline numbers every N epochs (default: only the summary)",
    )
    _add_seed_and_jsonl(p)
    p.add_argument(
        "--report",
        metavar="DIR",
        type=_output_dir,
        help="write DIR/report.html (self-contained), summary.json, metrics.jsonl and PNGs (make demo: demo_report/)",
    )
    p.add_argument("--csv", metavar="PATH", type=_output_path(), help="also write the results as CSV")
    p.add_argument(
        "--threads",
        type=_int_at_least(1, 1024),
        default=1,
        help="torch CPU threads (default 1: the MLP is small, and one thread is fastest on a busy machine)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    p.set_defaults(func=_demo, check=_check_demo, library_options={"epochs": "--epochs", "seed": "--seed"})


def _check_demo(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if _same_file(args.jsonl, args.csv):
        parser.error(f"--csv: expected a different path from --jsonl, got {_shown(args.csv)} for both")
    if importlib.util.find_spec("sklearn") is None:
        parser.error("needs scikit-learn for the digits data: pip install scikit-learn")
    if args.report and importlib.util.find_spec("matplotlib") is None:
        parser.error("--report: needs matplotlib: pip install matplotlib (or collapse_ext[plot])")
    for option, path in (("--jsonl", args.jsonl), ("--csv", args.csv)):
        if (
            path
            and args.report
            and os.path.dirname(os.path.realpath(path)) == os.path.realpath(args.report)
            and os.path.basename(path) in ("report.html", "summary.json", "metrics.jsonl")
        ):
            parser.error(f"{option}: expected a path other than the report's own files, got {_shown(path)}")


def _demo(args: argparse.Namespace) -> int:
    status = _with_outputs(_demo_run, args)
    if not args.quiet:
        if args.jsonl:
            print(f"history written to {args.jsonl} (read back with collapse_ext.loggers.read_jsonl)")
        if args.csv:
            print(f"history written to {args.csv}")
        if args.report:
            print(f"report written to {os.path.join(args.report, 'report.html')}")
    return status


def _demo_run(args: argparse.Namespace, outputs: _Outputs) -> int:
    import torch

    from ..demo import run_demo
    from ..demo_report import observations, write_demo_report
    from ..loggers import CSVLogger, JSONLinesLogger

    torch.set_num_threads(args.threads)
    loggers = []
    if args.jsonl:
        loggers.append(JSONLinesLogger(outputs.tmp(args.jsonl), overwrite=True))
    if args.csv:
        loggers.append(CSVLogger(outputs.tmp(args.csv)))
    result = run_demo(
        ["balanced", "imbalanced"] if args.variant == "both" else [args.variant],
        args.epochs,
        seed=args.seed,
        eval_every=args.eval_every,
        loggers=loggers,
        progress=not args.quiet and sys.stderr.isatty(),
        echo=None if args.quiet else print,
        print_every=args.print_every,
    )
    if args.report:
        write_demo_report(result, outputs.tmp_dir(args.report))
    if not args.quiet:
        print("\n".join(observations(result)))
        times = ", ".join(f"{name} {run.seconds:.1f} s" for name, run in result.runs.items())
        print(f"time: {times}; total {result.seconds:.1f} s")
    return 0
