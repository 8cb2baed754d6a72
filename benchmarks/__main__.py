"""Run the benchmark suite: the machine's ceilings first, then every case.

    python -m benchmarks [--device cpu|cuda] [--quick] [--filter REGEX] [--json OUT]

Each case runs its ``bench_<op>.py`` in a subprocess (its own allocator and threads, as
when run by hand); its printed tables, wall time and exit status, and its raw numbers
when it takes ``--json``, go into one JSON file, by default
``benchmarks/results/<device>.json`` (``<device>-quick.json`` for ``--quick``), with the
torch version, commit, device description and ceilings. ``python -m benchmarks.table
FILE`` prints it as markdown.
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

import torch

from .common import ROOT, ceilings, environment, write_json
from .suite import CASES
from .table import render

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="small shapes: minutes instead of an hour")
    p.add_argument("--filter", default=None, metavar="REGEX", help="run only the cases whose name matches")
    p.add_argument("--json", default=None, metavar="OUT", help="results file (default: results/<device>.json)")
    p.add_argument("--no-ceilings", action="store_true", help="skip measuring the machine's ceilings")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed per case (default 3600)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    args = p.parse_args(argv)
    cases = [c for c in CASES if args.filter is None or re.search(args.filter, c.name)]
    if args.list:
        for c in cases:
            print(c.name, " ".join(c.quick if args.quick else c.full))
        return 0
    if not cases:
        p.error(f"--filter: no case matches {args.filter!r} (cases: {', '.join(c.name for c in CASES)})")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device: cuda requested, but torch sees no GPU")
    out = args.json or os.path.join(HERE, "results", f"{args.device}{'-quick' if args.quick else ''}.json")
    payload = {"environment": environment(torch.device(args.device)), "quick": args.quick, "cases": []}
    if not args.no_ceilings:
        print("measuring ceilings ...", file=sys.stderr, flush=True)
        payload["ceilings"] = ceilings(torch.device(args.device), quick=args.quick)
    failed = 0
    for case in cases:
        print(f"{case.name} ...", file=sys.stderr, flush=True)
        record = run_case(case, args.device, args.quick, args.timeout)
        payload["cases"].append(record)
        failed += record["returncode"] != 0
        print(f"{case.name}: {record['wall_s']:.1f} s, exit {record['returncode']}", file=sys.stderr, flush=True)
        write_json(out, payload)  # after every case, so an interrupted run keeps what it measured
    write_json(out, payload)
    print(render(payload))
    print(f"\nwrote {out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
