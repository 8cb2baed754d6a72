"""Run the benchmark suite: the machine's ceilings first, then every case.

    python -m benchmarks [--device cpu|cuda] [--quick] [--filter REGEX] [--json OUT] [--plots DIR]
    collapse-ext bench ...      (the same, from a source checkout)

Each case runs its ``bench_<op>.py`` in a subprocess (its own allocator and threads, as
when run by hand); its printed tables, wall time and exit status, and its raw numbers
when it takes ``--json``, go into one JSON file, by default
``benchmarks/results/<device>.json`` (``<device>-quick.json`` for ``--quick``), with the
torch version, commit, device description and ceilings. Each case's rows (ours against
the plain PyTorch way, see ``common.result_row``) get the percent of the measured ceiling
and a ``slower`` flag here. ``python -m benchmarks.table FILE`` prints the file as markdown,
``python -m benchmarks.plots FILE --out DIR`` draws the size sweeps.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch

from collapse_ext.cli.bench import add_arguments

from .common import ROOT, annotate, ceilings, environment, write_json
from .suite import CASES
from .table import render, rows_of

HERE = os.path.dirname(os.path.abspath(__file__))


def run_case(case, device: str, quick: bool, timeout: float) -> dict:
    argv = [os.path.join(HERE, case.module + ".py"), "--device", device, *(case.quick if quick else case.full)]
    record: dict = {"name": case.name, "argv": [case.module + ".py", *argv[1:]]}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory() as tmp:
        out_json = os.path.join(tmp, "out.json")
        if case.takes_json:
            argv += ["--json", out_json]
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, *argv], cwd=HERE, env=env, capture_output=True, text=True, timeout=timeout
            )
            record.update(returncode=proc.returncode, stdout=proc.stdout, stderr=proc.stderr[-4000:])
        except subprocess.TimeoutExpired as err:
            record.update(returncode=None, stdout=(err.stdout or b"").decode(errors="replace"), timed_out=timeout)
        record["wall_s"] = time.perf_counter() - start
        if os.path.exists(out_json):
            with open(out_json) as f:
                record["json"] = json.load(f)
    return record


def run(args: argparse.Namespace, error: Callable[[str], object]) -> int:
    """Run the suite for parsed ``args``; bad options go to ``error(message)`` (which exits)."""
    try:
        pattern = re.compile(args.filter) if args.filter is not None else None
    except re.error as err:
        error(f"--filter: expected a regular expression, got {args.filter!r} ({err})")
    cases = [c for c in CASES if pattern is None or pattern.search(c.name)]
    if args.list:
        for c in cases:
            print(c.name, " ".join(c.quick if args.quick else c.full))
        return 0
    if not cases:
        error(f"--filter: no case matches {args.filter!r} (cases: {', '.join(c.name for c in CASES)})")
    if args.device == "cuda" and not torch.cuda.is_available():
        error("--device: cuda requested, but torch sees no GPU")
    if args.plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            error("--plots: needs matplotlib: pip install matplotlib")
    out = args.json or os.path.join(HERE, "results", f"{args.device}{'-quick' if args.quick else ''}.json")
    payload = {"environment": environment(torch.device(args.device)), "quick": args.quick, "cases": []}
    if not args.no_ceilings:
        print("measuring ceilings ...", file=sys.stderr, flush=True)
        payload["ceilings"] = ceilings(torch.device(args.device), quick=args.quick)
    failed = 0
    for case in cases:
        print(f"{case.name} ...", file=sys.stderr, flush=True)
        record = run_case(case, args.device, args.quick, args.timeout)
        for row in rows_of(record):
            annotate(row, payload.get("ceilings"))
        payload["cases"].append(record)
        failed += record["returncode"] != 0
        print(f"{case.name}: {record['wall_s']:.1f} s, exit {record['returncode']}", file=sys.stderr, flush=True)
        write_json(out, payload)  # after every case, so an interrupted run keeps what it measured
    write_json(out, payload)
    print(render(payload))
    print(f"\nwrote {out}", file=sys.stderr)
    if args.plots:
        from .plots import plot_all

        for path in plot_all(payload, args.plots):
            print(f"wrote {path}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = add_arguments(argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0]))
    return run(p.parse_args(argv), p.error)


if __name__ == "__main__":
    sys.exit(main())
