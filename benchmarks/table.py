"""Markdown of a results file written by ``python -m benchmarks``.

python -m benchmarks.table benchmarks/results/cpu.json [...]
"""

from __future__ import annotations

import json
import sys

from .common import markdown


def _fmt(value: object) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def render(payload: dict) -> str:
    env = payload.get("environment", {})
    where = env.get("gpu") or f"{env.get('cpu')}, {env.get('cpu_count')} CPUs, {env.get('torch_threads')} threads"
    load = env.get("load_average")
    parts = [
        f"Machine: {where}; torch {env.get('torch')}; commit {str(env.get('commit'))[:12]}"
        + (f"; load average {load:.1f} at the start" if load is not None else "")
        + ("; quick run" if payload.get("quick") else "")
    ]
    ceil = payload.get("ceilings")
    if ceil:
        row = {k: _fmt(v) for k, v in ceil.items()}
        parts.append(
            markdown([row], ["copy_gbs", "read_gbs", "matmul_fp32_gflops", "matmul_fp64_gflops", "tf32"])
            .replace("copy_gbs", "copy GB/s")
            .replace("read_gbs", "read GB/s")
            .replace("matmul_fp32_gflops", "fp32 matmul GFLOP/s")
            .replace("matmul_fp64_gflops", "fp64 matmul GFLOP/s")
        )
    rows = []
    for case in payload.get("cases", []):
        status = "ok" if case.get("returncode") == 0 else ("timed out" if case.get("timed_out") else "failed")
        rows.append(
            {
                "case": case["name"],
                "arguments": " ".join(case["argv"][1:]),
                "wall s": _fmt(case["wall_s"]),
                "status": status,
            }
        )
    parts.append(markdown(rows, ["case", "arguments", "wall s", "status"]))
    for case in payload.get("cases", []):
        if case.get("stdout", "").strip():
            parts.append(f"### {case['name']}\n\n{case['stdout'].strip()}")
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    for path in paths:
        with open(path) as f:
            print(render(json.load(f)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
