"""The ``predict`` subcommand under its former module name: it lives in
:mod:`collapse_ext.cli.predict` (one module per subcommand of the command line)."""

from .cli.predict import add_parser, parse_profile, read_counts, run

__all__ = ["add_parser", "parse_profile", "read_counts", "run"]
