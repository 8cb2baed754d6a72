"""Command line: ``python -m collapse_ext.cli <command>`` or ``collapse-ext <command>``.

Commands:
    demo       train the digits MLP with a CollapseMonitor and print neural collapse as it happens
    lpm-sweep  solve the Layer-Peeled Model over imbalance ratios: Minority Collapse, its threshold, a plot
    analyze    neural-collapse metrics of saved features (npy, npz, pt, safetensors, h5; shards), JSON, report
    lm-demo    train a small GPT-2 on Python's bundled docs with an LMCollapseMonitor: token-level collapse

Each command is a ``_add_<name>(subparsers)`` function that registers its parser and sets
``func``; :func:`main` dispatches.

Bad input never reaches the work: each option's ``type=`` converter checks its own value
(output paths included: existing writable directory, supported extension), each command's
``_check_<name>`` the combinations, and :func:`main` turns the library's ``ValueError`` /
``TypeError`` about a value the user gave into the same one-line error. Every error is one
line on stderr, ``<prog>: error: <option>: <what is expected>``, with exit status 2;
Ctrl-C exits with 130. Output files are written to a temporary file in the target
directory and moved into place only when the command succeeds.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence

__all__ = ["build_parser", "main"]

# Per variant: the project notes' recipe (label smoothing 0.1 deepens balanced collapse).
_VARIANTS = {
    "balanced": dict(imbalanced=False, label_smoothing=0.1),
    "imbalanced": dict(imbalanced=True, label_smoothing=0.0),
}

_PLOT_FORMATS = (".png", ".pdf", ".svg")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``<prog>: error: <option>: <message>``, exit status 2
    (argparse's default prints the usage too, and prefixes the option with "argument ")."""

    def error(self, message: str) -> None:
        message = " ".join(str(message).split())
        if message.startswith("argument "):
            message = message[len("argument ") :]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _shown(text: str) -> str:
    return text if text and text.strip() == text else repr(text)


def _check_writable(directory: str, text: str, expected: str) -> None:
    """Raise ArgumentTypeError unless a file can be created in ``directory`` (a probe file,
    removed at once: permission bits do not tell for root or on read-only mounts)."""
    probe = os.path.join(directory, f".collapse-ext-probe-{os.getpid()}")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as err:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {_shown(text)} ({err.strerror})") from None


def _int_at_least(
    low: int, high: int | None = None, why: str = "", high_text: str | None = None
) -> Callable[[str], int]:
    expected = f"an int >= {low}" if high is None else f"an int in [{low}, {high_text or high}]"
    expected += f" ({why})" if why else ""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {_shown(text)}")
        return value

    return convert


def _finite_float(*, allow_zero: bool = False) -> Callable[[str], float]:
    expected = "a non-negative finite number" if allow_zero else "a positive finite number"

    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {_shown(text)}")
        return value

    return convert


def _output_path(extensions: Sequence[str] = ()) -> Callable[[str], str]:
    """A file path to write: in an existing writable directory, not an existing directory or
    special file, with one of ``extensions`` (any when empty). Checked by creating and
    removing a probe file, since permission bits do not tell root or read-only mounts."""

    def convert(text: str) -> str:
        if not text or text.endswith(("/", os.sep)):
            raise argparse.ArgumentTypeError(f"expected a file path, got {_shown(text)}")
        if extensions and os.path.splitext(text)[1].lower() not in extensions:
            raise argparse.ArgumentTypeError(f"expected a path ending in {', '.join(extensions)}, got {_shown(text)}")
        real = os.path.realpath(text)
        parent = os.path.dirname(real)
        if not os.path.isdir(parent):
            raise argparse.ArgumentTypeError(f"expected a path in an existing directory, got {_shown(text)}")
        if os.path.exists(real) and not os.path.isfile(real):
            raise argparse.ArgumentTypeError(f"expected a regular file path, got {_shown(text)} (not a regular file)")
        _check_writable(parent, text, "a path in a writable directory")
        return text

    return convert


def _same_file(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and os.path.realpath(a) == os.path.realpath(b)


class _Outputs:
    """Files written atomically: the work writes ``tmp(path)``; ``commit()`` moves every
    temporary file onto its path (``os.replace``), ``discard()`` removes what is left."""

    def __init__(self) -> None:
        self.pending: dict[str, str] = {}

    def tmp(self, path: str) -> str:
        real = os.path.realpath(path)
        tmp = os.path.join(os.path.dirname(real), f".{os.path.basename(real)}.{os.getpid()}.tmp")
        self.pending[real] = tmp
        return tmp

    def commit(self) -> None:
        for real, tmp in self.pending.items():
            if os.path.exists(tmp):
                os.replace(tmp, real)
        self.pending.clear()

    def discard(self) -> None:
        for tmp in self.pending.values():
            for leftover in (tmp, tmp + ".tmp"):  # CSVLogger writes <path>.tmp first
                if os.path.exists(leftover):
                    os.unlink(leftover)
        self.pending.clear()


class _OptionError(Exception):
    """A value the user gave, found bad during the work: reported as ``<option>: <message>``."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")


def _option_of(err: Exception, options: dict[str, str]) -> str | None:
    """The option behind a library error "Expected `name` ...", when ``name`` is one of the
    library arguments the command fills from an option; None otherwise (an internal bug)."""
    match = re.search(r"`(\w+)`", str(err))
    return options.get(match.group(1)) if match else None


def _is_out_of_memory(err: BaseException) -> bool:
    import torch

    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(err)


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
    p.add_argument("--epochs", type=_int_at_least(1), default=100, help="training epochs per variant (default 100)")
    p.add_argument("--print-every", type=_int_at_least(1), default=10, help="epochs between printed lines (default 10)")
    p.add_argument("--seed", type=_int_at_least(0, 2**63 - 1, high_text="2**63 - 1"), default=0)
    p.add_argument(
        "--jsonl",
        metavar="PATH",
        type=_output_path(),
        help="write every monitor result as JSON lines (replaced when the run ends)",
    )
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


def _with_outputs(run: Callable[[argparse.Namespace, _Outputs], int], args: argparse.Namespace) -> int:
    """Run a command whose files go through an _Outputs: moved into place on success,
    removed on any error or interrupt."""
    outputs = _Outputs()
    try:
        status = run(args, outputs)
        outputs.commit()
    finally:
        outputs.discard()
    return status


def _demo(args: argparse.Namespace) -> int:
    status = _with_outputs(_demo_run, args)
    if args.jsonl:
        print(f"history written to {args.jsonl} (read back with collapse_ext.loggers.read_jsonl)")
    if args.csv:
        print(f"history written to {args.csv}")
    return status


def _demo_run(args: argparse.Namespace, outputs: _Outputs) -> int:
    import torch

    from .data import train_digits
    from .loggers import CSVLogger, JSONLinesLogger

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


def _device(text: str) -> str:
    import torch

    from ._ops import cuda_compiled

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:INDEX, got {_shown(text)}")
    if device.type == "cuda":
        if not cuda_compiled():
            raise argparse.ArgumentTypeError(f"expected cpu (collapse_ext was built without CUDA), got {_shown(text)}")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"expected cpu (no CUDA device is available), got {_shown(text)}")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(
                f"expected cpu or cuda:INDEX with INDEX < {count} (the CUDA devices here), got {_shown(text)}"
            )
    return str(device)


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

    from .lpm import minority_collapse_sweep

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
    from .report import plot_minority_collapse

    fig = plot_minority_collapse(sweep)
    import matplotlib.pyplot as plt

    try:
        fig.savefig(path, format=fmt)
    finally:
        plt.close(fig)


def _output_dir(text: str) -> str:
    """A directory to write a report into: an existing writable directory, or a new one in
    an existing writable directory."""
    if not text:
        raise argparse.ArgumentTypeError(f"expected a directory path, got {_shown(text)}")
    real = os.path.realpath(text)
    if os.path.exists(real) and not os.path.isdir(real):
        raise argparse.ArgumentTypeError(f"expected a directory, got {_shown(text)} (an existing file)")
    parent = real if os.path.isdir(real) else os.path.dirname(real)
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"expected a path in an existing directory, got {_shown(text)}")
    _check_writable(parent, text, "a writable directory")
    return text


def _nonempty(text: str) -> str:
    if not text or not text.strip():
        raise argparse.ArgumentTypeError(f"expected a non-empty value, got {_shown(text)}")
    return text


def _add_analyze(subparsers: argparse._SubParsersAction) -> None:
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

    from .analyze import analyze

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
            from .report import write_report

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


def _staging_dir(target: str) -> str:
    """A temporary directory beside ``target`` (same file system: the files move in with
    os.replace once everything is written)."""
    import tempfile

    real = os.path.realpath(target)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(real)}.", suffix=".tmp", dir=os.path.dirname(real))


def _add_lm_demo(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "lm-demo",
        help="token-level neural collapse of a small GPT-2 trained on Python's own docs (no download)",
        description=(
            "Train a GPT-2-architecture model (transformers, random init; 2 blocks, d 64, 2 heads, context 32; "
            "AdamW lr 3e-3, batch 16) on the text of pydoc_data.topics (the standard library's documentation "
            "topics) with a word-level tokenizer built on the fly (the --vocab - 1 most frequent words, the rest "
            "<unk>), monitored by LMCollapseMonitor on every block and the final hidden states. Every --every "
            "steps: CDNV and NC1 quotient over all tokens and per frequency bucket (head 1%%, body, tail 50%% of "
            "the tokens seen >= 5 times), and the cosines of the rare tokens' classifier rows against the "
            "frequent ones'."
        ),
    )
    p.add_argument("--steps", type=_int_at_least(1), default=600, help="training steps (default 600)")
    p.add_argument("--vocab", type=_int_at_least(16, 50000), default=2000, help="vocabulary size (default 2000)")
    p.add_argument("--every", type=_int_at_least(1), default=100, help="steps between measurements (default 100)")
    p.add_argument("--seed", type=_int_at_least(0, 2**63 - 1, high_text="2**63 - 1"), default=0)
    p.add_argument(
        "--jsonl",
        metavar="PATH",
        type=_output_path(),
        help="write every monitor result as JSON lines (replaced when the run ends)",
    )
    p.add_argument("--threads", type=_int_at_least(1, 1024), default=2, help="torch CPU threads (default 2)")
    p.set_defaults(func=_lm_demo, check=_check_lm_demo, library_options={"seed": "--seed"})


def _check_lm_demo(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if importlib.util.find_spec("transformers") is None:
        parser.error("needs transformers for the GPT-2 model: pip install transformers")


def _lm_text(vocab: int) -> tuple[list[int], list[str]]:
    """Word-level tokens of pydoc_data.topics: ids by descending frequency, 0 = <unk>."""
    from collections import Counter
    from pydoc_data.topics import topics

    words = re.findall(r"[a-z]+|[0-9]+|[^\sa-z0-9]", " ".join(topics[k] for k in sorted(topics)).lower())
    itos = ["<unk>"] + [w for w, _ in Counter(words).most_common(vocab - 1)]
    stoi = {w: i for i, w in enumerate(itos)}
    return [stoi.get(w, 0) for w in words], itos


def _lm_demo(args: argparse.Namespace) -> int:
    status = _with_outputs(_lm_demo_run, args)
    if args.jsonl:
        print(f"history written to {args.jsonl} (read back with collapse_ext.loggers.read_jsonl)")
    return status


def _lm_demo_run(args: argparse.Namespace, outputs: _Outputs) -> int:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from .integrations.transformers import LMCollapseMonitor
    from .loggers import JSONLinesLogger

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    ids, itos = _lm_text(args.vocab)
    data = torch.tensor(ids, dtype=torch.int64)
    context, batch = 32, 16
    config = GPT2Config(
        vocab_size=len(itos), n_positions=context, n_embd=64, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    loggers = [JSONLinesLogger(outputs.tmp(args.jsonl), overwrite=True)] if args.jsonl else []
    monitor = LMCollapseMonitor(model, layers="all", min_count=5, loggers=loggers)
    print(
        f"== lm-demo: {len(ids)} words of pydoc_data.topics, vocabulary {len(itos)} "
        f"(<unk> {100 * float((data == 0).float().mean()):.1f}%), GPT-2 2x64, {args.steps} steps",
        flush=True,
    )
    g = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    losses: list[float] = []

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3g}"

    for step in range(1, args.steps + 1):
        offsets = torch.randint(0, len(ids) - context, (batch,), generator=g)
        x = torch.stack([data[o : o + context] for o in offsets.tolist()])
        out = model(input_ids=x, labels=x)
        monitor.update(x)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
        if step % args.every == 0 or step == args.steps:
            r = monitor.compute()
            m = r["penultimate"]
            views = " ".join(
                f"{v} {fmt(r.views[v].nc1_cdnv)}/{fmt(r.views[v].nc1_quotient)}" if v in r.views else f"{v} -"
                for v in ("head", "body", "tail")
            )
            print(
                f"step {step:>5}  loss {sum(losses) / len(losses):.3f}  tokens {m.num_present}  "
                f"CDNV {fmt(m.nc1_cdnv)}  NC1q {fmt(m.nc1_quotient)}  CDNV/NC1q by bucket: {views}  "
                f"cos(W) rare {fmt(m.minority_cos_mean)} frequent {fmt(m.majority_cos_mean)}  "
                f"{time.perf_counter() - start:.0f} s",
                flush=True,
            )
            losses = []
    return 0


def _add_predict(subparsers: argparse._SubParsersAction) -> None:
    from . import theory_cli

    theory_cli.add_parser(subparsers)


def build_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The top-level parser and its subcommand registry (add a command with
    ``subparsers.add_parser(name, ...)`` and ``set_defaults(func=...)``; optionally
    ``check=f(parser, args)`` for cross-option checks and ``library_options={argument:
    option}`` to report the library's "Expected `argument` ..." errors as that option's)."""
    parser = _Parser(prog="collapse-ext", description="collapse_ext: neural-collapse tools")
    subparsers = parser.add_subparsers(dest="command", metavar="command")
    _add_demo(subparsers)
    _add_lpm_sweep(subparsers)
    _add_analyze(subparsers)
    _add_predict(subparsers)
    _add_lm_demo(subparsers)
    importlib.import_module("collapse_ext.bench_cli").add_parser(subparsers)
    return parser, subparsers


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``collapse-ext``; returns the exit status (bad input: one line on
    stderr and SystemExit(2); Ctrl-C: one line and 130)."""
    parser, subparsers = build_parser()
    command = parser
    try:
        args = parser.parse_args(argv)
        if getattr(args, "func", None) is None:
            parser.print_help()
            return 2
        command = subparsers.choices.get(args.command, parser)
        check = getattr(args, "check", None)
        if check is not None:
            check(command, args)
        try:
            return int(args.func(args) or 0)
        except (ValueError, TypeError) as err:
            option = _option_of(err, getattr(args, "library_options", {}))
            if option is None:
                raise
            command.error(f"{option}: {err}")
        except _OptionError as err:
            command.error(str(err))
    except KeyboardInterrupt:
        print(f"{command.prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
