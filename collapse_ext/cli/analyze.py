"""``collapse-ext analyze``: neural-collapse metrics of saved features (a table, ``--json``,
``--report`` HTML), through :func:`collapse_ext.analyze.analyze`."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from .common import (
    _device,
    _int_at_least,
    _is_out_of_memory,
    _nonempty,
    _OptionError,
    _output_dir,
    _output_path,
    _Outputs,
    _shown,
    _staging_dir,
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "analyze",
        help="neural-collapse metrics of saved features: table, --json, --report (HTML)",
        description=(
            "Read saved features (.npy memory-mapped, .npz, .pt, .safetensors, .h5/.hdf5; or a directory or glob "
            "of shards, in name order) in chunks, accumulate the class statistics in one pass (a second pass for "
            "NC4 with the final means), and print every neural-collapse metric. Several --features-key values "
            "give per-layer metrics and the law of data separation. Under torchrun every rank reads its own rows."
        ),
    )
    p.add_argument("features", metavar="FEATURES", type=_nonempty, help="features file, directory or glob of shards")
    p.add_argument("--labels", metavar="FILE", type=_nonempty, help="labels file/directory/glob (default: FEATURES)")
    p.add_argument(
        "--features-key",
        metavar="K",
        type=_nonempty,
        help="key of the features in a keyed file (default 'features'); comma-separated for several layers, "
        "the last one being the classifier's input",
    )
    p.add_argument("--labels-key", metavar="K", type=_nonempty, help="key of the labels (default 'labels')")
    p.add_argument("--weight", metavar="FILE[:key]", type=_nonempty, help="classifier weight (K, d)")
    p.add_argument("--bias", metavar="FILE[:key]", type=_nonempty, help="classifier bias (K,)")
    p.add_argument("--checkpoint", metavar="FILE", type=_nonempty, help="a state_dict holding the classifier")
    p.add_argument("--classifier", metavar="NAME", type=_nonempty, help="module name in --checkpoint, e.g. fc")
    p.add_argument(
        "--num-classes", type=_int_at_least(1), help="K (default: the classifier's rows, else max label + 1)"
    )
    p.add_argument("--device", type=_device, default=None, help="cpu, cuda or cuda:INDEX (default cuda if available)")
    p.add_argument(
        "--chunk-rows", type=_int_at_least(1), default=65536, help="rows read and reduced at a time (default 65536)"
    )
    p.add_argument(
        "--nc1",
        choices=["auto", "full", "projected"],
        default="auto",
        help="NC1 from the d x d scatter (full), or from a second pass in the means' span (projected); "
        "auto: full when d <= 4096",
    )
    p.add_argument("--no-ncc", dest="ncc", action="store_false", help="skip NC4 (and its second pass)")
    p.add_argument("--skip-nonfinite", action="store_true", help="drop rows with NaN/Inf features and count them")
    p.add_argument("--json", metavar="OUT", type=_output_path(), help="write the metrics as JSON")
    p.add_argument("--report", metavar="DIR", type=_output_dir, help="write DIR/report.html, summary.json and PNGs")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no table")
    p.set_defaults(
        func=_analyze,
        check=_check_analyze,
        library_options={
            "source": "FEATURES",
            "features_key": "--features-key",
            "labels": "--labels",
            "labels_key": "--labels-key",
            "weight": "--weight",
            "bias": "--bias",
            "checkpoint": "--checkpoint",
            "classifier": "--classifier",
            "num_classes": "--num-classes",
            "chunk_rows": "--chunk-rows",
        },
    )


def _check_analyze(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if (args.checkpoint is None) != (args.classifier is None):
        given = "--checkpoint" if args.checkpoint else "--classifier"
        parser.error(f"{given}: expected --checkpoint FILE and --classifier NAME together, got only {given}")
    if args.checkpoint and (args.weight or args.bias):
        parser.error("--checkpoint: expected either --weight/--bias or --checkpoint/--classifier, got both")
    if args.bias and not args.weight:
        parser.error("--bias: expected --weight together with --bias, got only --bias")
    if args.report and importlib.util.find_spec("matplotlib") is None:
        parser.error("--report: needs matplotlib: pip install matplotlib (or collapse_ext[plot])")
    if (
        args.json
        and args.report
        and os.path.realpath(os.path.dirname(os.path.realpath(args.json))) == os.path.realpath(args.report)
        and os.path.basename(args.json) in ("report.html", "summary.json")
    ):
        parser.error(f"--json: expected a path other than the report's own files, got {_shown(args.json)}")


def _analyze(args: argparse.Namespace) -> int:
    import json

    from ..analyze import analyze

    progress = not args.quiet and sys.stderr.isatty()
    try:
        result = analyze(
            args.features,
            labels=args.labels,
            features_key=args.features_key,
            labels_key=args.labels_key,
            weight=args.weight,
            bias=args.bias,
            checkpoint=args.checkpoint,
            classifier=args.classifier,
            num_classes=args.num_classes,
            device=args.device,
            chunk_rows=args.chunk_rows,
            ncc=args.ncc,
            nc1_mode=args.nc1,
            skip_nonfinite=args.skip_nonfinite,
            progress=progress,
        )
    except (MemoryError, RuntimeError) as err:
        if not _is_out_of_memory(err):
            raise
        raise _OptionError(
            "--chunk-rows",
            f"expected a chunk that fits in memory on {args.device or 'the device'}, got {args.chunk_rows}",
        ) from None
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return 0
    if not args.quiet:
        print(result.summary())
    outputs = _Outputs()
    report_dir = None
    try:
        if args.json:
            with open(outputs.tmp(args.json), "w") as f:
                json.dump(result.to_dict(), f, indent=2)
        if args.report:
            from ..report import write_report

            report_dir = _staging_dir(args.report)
            write_report(result, report_dir)
        outputs.commit()
        if report_dir is not None:
            os.makedirs(args.report, exist_ok=True)
            for name in sorted(os.listdir(report_dir)):
                os.replace(os.path.join(report_dir, name), os.path.join(args.report, name))
    finally:
        outputs.discard()
        if report_dir is not None:
            import shutil

            shutil.rmtree(report_dir, ignore_errors=True)
    if not args.quiet:
        if args.json:
            print(f"metrics written to {args.json}")
        if args.report:
            print(f"report written to {os.path.join(args.report, 'report.html')}")
    return 0
