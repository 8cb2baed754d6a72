"""Command line: ``python -m collapse_ext.cli <command>`` or ``collapse-ext <command>``.

Commands, one module each:
    demo       train the digits MLP with a CollapseMonitor; the LPM beside it; a report with --report
    lpm-sweep  solve the Layer-Peeled Model over imbalance ratios: Minority Collapse, its threshold, a plot
    analyze    neural-collapse metrics of saved features (npy, npz, pt, safetensors, h5; shards), JSON, report
    predict    the geometry a theory predicts for a class-size profile (ETF, LPM, SELI, UFM-MSE)
    lm-demo    train a small GPT-2 on Python's bundled docs with an LMCollapseMonitor: token-level collapse
    bench      the benchmark suite of a source checkout (python -m benchmarks)

Each command module exposes ``add_parser(subparsers)``, which registers its parser and
sets ``func``; :func:`build_parser` calls them in the order of ``COMMANDS`` and
:func:`main` dispatches. What they share (the parser, option converters, atomic outputs)
is in :mod:`collapse_ext.cli.common`.

Bad input never reaches the work: each option's ``type=`` converter checks its own value
(output paths included: existing writable directory, supported extension), each command's
``check`` the combinations, and :func:`main` turns the library's ``ValueError`` /
``TypeError`` about a value the user gave into the same one-line error. Every error is one
line on stderr, ``<prog>: error: <option>: <what is expected>``, with exit status 2;
Ctrl-C exits with 130. Output files are written to a temporary file in the target
directory and moved into place only when the command succeeds.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import analyze, bench, demo, lm_demo, lpm_sweep, predict
from .common import _option_of, _OptionError, _Parser

__all__ = ["COMMANDS", "build_parser", "main"]

# The command modules, in the order of the help text.
COMMANDS = (demo, lpm_sweep, analyze, predict, lm_demo, bench)


def build_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The top-level parser and its subcommand registry (a command module's ``add_parser``
    calls ``subparsers.add_parser(name, ...)`` and ``set_defaults(func=...)``; optionally
    ``check=f(parser, args)`` for cross-option checks and ``library_options={argument:
    option}`` to report the library's "Expected `argument` ..." errors as that option's)."""
    parser = _Parser(prog="collapse-ext", description="collapse_ext: neural-collapse tools")
    subparsers = parser.add_subparsers(dest="command", metavar="command")
    for command in COMMANDS:
        command.add_parser(subparsers)
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
