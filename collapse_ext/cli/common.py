"""What every subcommand of the command line shares: the one-line-error parser, the
option converters (each checks its own value, output paths included: existing writable
directory, supported extension), atomic outputs and the error types :func:`main` reports.

Every error is one line on stderr, ``<prog>: error: <option>: <what is expected>``, with
exit status 2. Output files are written to a temporary file in the target directory and
moved into place only when the command succeeds.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable, Sequence

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
        self.dirs: dict[str, str] = {}

    def tmp(self, path: str) -> str:
        real = os.path.realpath(path)
        tmp = os.path.join(os.path.dirname(real), f".{os.path.basename(real)}.{os.getpid()}.tmp")
        self.pending[real] = tmp
        return tmp

    def tmp_dir(self, path: str) -> str:
        """A staging directory beside the directory ``path``: ``commit()`` moves its files
        into ``path`` (created if missing), ``discard()`` removes it."""
        real = os.path.realpath(path)
        self.dirs[real] = _staging_dir(real)
        return self.dirs[real]

    def commit(self) -> None:
        for real, tmp in self.pending.items():
            if os.path.exists(tmp):
                os.replace(tmp, real)
        self.pending.clear()
        for real, tmp in self.dirs.items():
            os.makedirs(real, exist_ok=True)
            for name in sorted(os.listdir(tmp)):
                os.replace(os.path.join(tmp, name), os.path.join(real, name))

    def discard(self) -> None:
        import shutil

        for tmp in self.pending.values():
            for leftover in (tmp, tmp + ".tmp"):  # CSVLogger writes <path>.tmp first
                if os.path.exists(leftover):
                    os.unlink(leftover)
        self.pending.clear()
        for tmp in self.dirs.values():
            shutil.rmtree(tmp, ignore_errors=True)
        self.dirs.clear()


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


def _add_seed_and_jsonl(p: argparse.ArgumentParser) -> None:
    """``--seed`` and ``--jsonl PATH`` of the training demos (the history of the monitor)."""
    p.add_argument("--seed", type=_int_at_least(0, 2**63 - 1, high_text="2**63 - 1"), default=0)
    p.add_argument(
        "--jsonl",
        metavar="PATH",
        type=_output_path(),
        help="write every monitor result as JSON lines (replaced when the run ends)",
    )


def _with_history(run: Callable[[argparse.Namespace, _Outputs], int], args: argparse.Namespace) -> int:
    """:func:`_with_outputs` for a training demo, then say where its ``--jsonl`` went."""
    status = _with_outputs(run, args)
    if args.jsonl:
        print(f"history written to {args.jsonl} (read back with collapse_ext.loggers.read_jsonl)")
    return status


def _device(text: str) -> str:
    import torch

    from .._ops import cuda_compiled

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


def _staging_dir(target: str) -> str:
    """A temporary directory beside ``target`` (same file system: the files move in with
    os.replace once everything is written)."""
    import tempfile

    real = os.path.realpath(target)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(real)}.", suffix=".tmp", dir=os.path.dirname(real))
