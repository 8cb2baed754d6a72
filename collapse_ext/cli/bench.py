"""The ``bench`` subcommand: the benchmark suite of a source checkout (``python -m benchmarks``).

    collapse-ext bench [--device cpu|cuda] [--quick] [--filter REGEX] [--json OUT] [--plots DIR]

The suite lives in ``benchmarks/`` at the repository root, beside ``collapse_ext/``; it is
not part of a wheel. From a checkout (``pip install -e .``, ``make build``) the command
runs it; from an installed wheel it says so in one line, exit status 2. The options are
declared here once and the suite's own driver (``benchmarks/__main__.py``) uses
:func:`add_arguments` too.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from types import ModuleType

__all__ = ["add_arguments", "add_parser", "checkout_root", "run"]

_NOT_A_CHECKOUT = (
    "bench: needs the benchmarks/ directory of a source checkout (it is not installed with the wheel): "
    "git clone the repository, pip install -e . (or make build), then run collapse-ext bench there"
)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The suite's options, shared by ``collapse-ext bench`` and ``python -m benchmarks``."""
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="small shapes: minutes instead of an hour")
    p.add_argument("--filter", default=None, metavar="REGEX", help="run only the cases whose name matches")
    p.add_argument("--json", default=None, metavar="OUT", help="results file (default: results/<device>.json)")
    p.add_argument("--plots", default=None, metavar="DIR", help="write the log-log scaling plots (PNG) here")
    p.add_argument("--no-ceilings", action="store_true", help="skip measuring the machine's ceilings")
    p.add_argument("--timeout", type=_positive_seconds, default=3600.0, help="seconds allowed per case (default 3600)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    return p


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``bench`` on an argparse subparsers object; sets ``func=run``."""
    p = subparsers.add_parser(
        "bench",
        help="run the benchmark suite of a source checkout (python -m benchmarks)",
        description="Run the benchmark suite (benchmarks/ of a source checkout): the machine's ceilings, then "
        "every case, each against the plain PyTorch way in the same run; results JSON and a markdown table.",
    )
    add_arguments(p)
    p.set_defaults(func=run, _bench_parser=p)
    return p


def checkout_root() -> str | None:
    """The source checkout this package was imported from (the directory holding both
    ``collapse_ext/`` and ``benchmarks/``), None for an installed wheel."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    suite = os.path.join(root, "benchmarks", "suite.py")
    return root if os.path.isfile(suite) else None


def _driver(root: str) -> ModuleType:
    """``benchmarks.__main__`` of ``root`` (not some other ``benchmarks`` on sys.path)."""
    if root not in sys.path:
        sys.path.insert(0, root)
    loaded = sys.modules.get("benchmarks")
    if loaded is not None and os.path.dirname(os.path.abspath(getattr(loaded, "__file__", "") or "")) != os.path.join(
        root, "benchmarks"
    ):
        for name in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
            del sys.modules[name]
    return importlib.import_module("benchmarks.__main__")


def run(args: argparse.Namespace, error: Callable[[str], object] | None = None) -> int:
    """Run the suite for parsed options; exit status 2 with one line when there is no checkout."""
    error = error or args._bench_parser.error
    root = checkout_root()
    if root is None:
        error(_NOT_A_CHECKOUT)
        return 2
    try:
        driver = _driver(root)
    except ImportError as err:
        error(f"bench: cannot import the benchmarks of {root}: {err}")
        return 2
    return driver.run(args, error)
