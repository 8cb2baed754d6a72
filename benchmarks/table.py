"""Markdown of a results file written by ``python -m benchmarks``.

    python -m benchmarks.table benchmarks/results/cpu.json [...]
    python -m benchmarks.table benchmarks/results/cpu.json --readme [--plots-dir docs/bench] [--write README.md]

The default output: the machine and its ceilings, one line per case (arguments, wall
time, status), the results table of every case (ours against the plain PyTorch way of the
same run: time ratio, achieved rate, percent of the measured ceiling, peak memories), rows
where ours is slower flagged and listed at the end, then each case's own printed tables.
``--readme`` prints only the machine description, the results table and the flagged rows
(with links to the plots of ``--plots-dir``), for the README's "## Benchmarks" section;
``--write README.md`` puts that between the README's ``<!-- benchmarks:begin -->`` and
``<!-- benchmarks:end -->`` lines instead of printing it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .common import annotate, markdown

BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"
FLAG = "**slower** ⚠"


def _fmt(value: object) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def _seconds(t: float | None) -> str:
    if t is None:
        return "-"
    if t < 1e-3:
        return f"{1e6 * t:.0f} us"
    if t < 1:
        return f"{1e3 * t:.3g} ms"
    return f"{t:.3g} s"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def rows_of(record: dict) -> list[dict]:
    """The result rows a case handed back (``--json``: ``{"results": [...]}``), each with its
    case's name; [] for a case without them."""
    data = record.get("json")
    rows = data.get("results", []) if isinstance(data, dict) else []
    for row in rows:
        row.setdefault("case", record.get("name"))
    return rows


def all_rows(payload: dict) -> list[dict]:
    """Every result row of a results file, re-annotated from its measured fields (so the
    flags follow the ratio even for a file written by an older driver)."""
    rows = []
    for record in payload.get("cases", []):
        for row in rows_of(record):
            rows.append(annotate(row, payload.get("ceilings")))
    return rows


def flagged(rows: list[dict]) -> list[dict]:
    return [row for row in rows if row.get("slower")]


def machine_line(payload: dict) -> str:
    env = payload.get("environment", {})
    where = env.get("gpu") or f"{env.get('cpu')}, {env.get('cpu_count')} CPUs, {env.get('torch_threads')} threads"
    load = env.get("load_average")
    commit = str(env.get("commit"))
    commit = commit[:12] + ("-dirty" if commit.endswith("-dirty") else "")
    return (
        f"Machine: {where}; torch {env.get('torch')}; commit {commit}"
        + (f"; load average {load:.1f} at the start" if load is not None else "")
        + ("; quick run" if payload.get("quick") else "")
    )


def ceilings_table(payload: dict) -> str | None:
    ceil = payload.get("ceilings")
    if not ceil:
        return None
    row = {k: _fmt(v) for k, v in ceil.items()}
    return (
        markdown([row], ["copy_gbs", "read_gbs", "matmul_fp32_gflops", "matmul_fp64_gflops", "tf32"])
        .replace("copy_gbs", "copy GB/s")
        .replace("read_gbs", "read GB/s")
        .replace("matmul_fp32_gflops", "fp32 matmul GFLOP/s")
        .replace("matmul_fp64_gflops", "fp64 matmul GFLOP/s")
    )


def results_table(rows: list[dict]) -> str:
    """One line per row: ours, the plain way, plain / ours (flagged below 1x), the floor,
    achieved rate and its percent of the measured ceiling, peak memories."""
    lines = []
    for row in rows:
        speedup = row.get("speedup")
        ratio = "-" if speedup is None else f"{speedup:.2f}x"
        if row.get("slower"):
            ratio += " " + FLAG
        rate = row.get("rate")
        pct = row.get("pct_of_ceiling")
        floor = row.get("vs_floor")
        lines.append(
            {
                "case": row.get("case", ""),
                "op": row.get("op", ""),
                "shape": row.get("shape", ""),
                "ours": _seconds(row.get("ours_s")),
                "plain PyTorch": "not run" if row.get("plain_s") is None else _seconds(row["plain_s"]),
                "plain / ours": ratio,
                "ours / floor": "-" if floor is None else f"{floor:.2f}x",
                "ours rate": "-" if rate is None else f"{rate:.3g} {row.get('unit')}",
                "% of ceiling": "-" if pct is None else f"{pct:.0f}%",
                "peak MiB ours / plain": f"{_mib(row.get('ours_peak_mib'))} / {_mib(row.get('plain_peak_mib'))}",
            }
        )
    return markdown(lines, list(lines[0]))


def baselines(rows: list[dict]) -> str:
    """What "plain PyTorch" and the floor are for each op, once per op."""
    seen: dict[tuple, str] = {}
    for row in rows:
        key = (row.get("case"), row.get("op"))
        if key not in seen:
            text = f"- {key[0]} / {key[1]}: plain = {row.get('plain')}"
            if row.get("floor"):
                text += f"; floor = {row['floor']}"
            seen[key] = text
    return "\n".join(seen.values())


def flagged_summary(rows: list[dict]) -> str:
    slow = flagged(rows)
    if not rows:
        return ""
    if not slow:
        return f"No row is slower than the plain PyTorch way ({len(rows)} rows)."
    lines = [f"Slower than the plain PyTorch way: {len(slow)} of {len(rows)} rows (flagged {FLAG} above)."]
    for row in slow:
        lines.append(
            f"- {row.get('case')} / {row.get('op')} {row.get('shape')}: ours {_seconds(row['ours_s'])}, "
            f"plain {_seconds(row['plain_s'])} ({row['speedup']:.2f}x)"
        )
    return "\n".join(lines)


def render(payload: dict) -> str:
    parts = [machine_line(payload)]
    ceil = ceilings_table(payload)
    if ceil:
        parts.append(ceil)
    status_rows = []
    for case in payload.get("cases", []):
        status = "ok" if case.get("returncode") == 0 else ("timed out" if case.get("timed_out") else "failed")
        status_rows.append(
            {
                "case": case["name"],
                "arguments": " ".join(case["argv"][1:]),
                "wall s": _fmt(case["wall_s"]),
                "status": status,
            }
        )
    if status_rows:
        parts.append(markdown(status_rows, ["case", "arguments", "wall s", "status"]))
    rows = all_rows(payload)
    if rows:
        parts += ["### Results", results_table(rows), baselines(rows), flagged_summary(rows)]
    for case in payload.get("cases", []):
        if case.get("stdout", "").strip():
            parts.append(f"### {case['name']}\n\n{case['stdout'].strip()}")
    return "\n\n".join(parts) + "\n"


def render_readme(payload: dict, plots_dir: str | None = None, relative_to: str = ".") -> str:
    """The README's section: machine and ceilings, the results table, what each baseline
    is, the flagged rows, links to the plots, and how to regenerate all of it."""
    from .plots import plot_files

    parts = [machine_line(payload)]
    ceil = ceilings_table(payload)
    if ceil:
        parts.append("Measured ceilings of this machine (the `% of ceiling` column divides by them):\n\n" + ceil)
    rows = all_rows(payload)
    failed = [c["name"] for c in payload.get("cases", []) if c.get("returncode") != 0]
    if rows:
        parts += [results_table(rows), "Plain PyTorch baselines and floors:\n\n" + baselines(rows)]
        parts.append(flagged_summary(rows))
    if failed:
        parts.append(f"Cases that did not finish in this run: {', '.join(failed)}.")
    if plots_dir:
        links = []
        for path, title in plot_files(payload, plots_dir):
            if os.path.exists(path):
                links.append(f"![{title}]({os.path.relpath(path, relative_to)})")
        if links:
            parts.append("\n".join(links))
    return "\n\n".join(parts) + "\n"


def write_section(readme: str, text: str) -> None:
    """Replace the lines between BEGIN and END of ``readme`` by ``text``."""
    with open(readme) as f:
        old = f.read()
    if BEGIN not in old or END not in old or old.index(BEGIN) > old.index(END):
        raise ValueError(f"{readme} has no {BEGIN} ... {END} section")
    head, rest = old.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(readme, "w") as f:
        f.write(f"{head}{BEGIN}\n{text.rstrip()}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.table",
        description="Markdown of a results file written by python -m benchmarks.",
    )
    p.add_argument("paths", nargs="+", metavar="FILE", help="results JSON (benchmarks/results/<device>.json)")
    p.add_argument("--readme", action="store_true", help="only the README section: machine, results, flags, plots")
    p.add_argument("--plots-dir", default=None, metavar="DIR", help="link the plots of DIR (with --readme)")
    p.add_argument("--write", default=None, metavar="README", help="replace the README's marked section (--readme)")
    args = p.parse_args(argv)
    if args.write and (not args.readme or len(args.paths) != 1):
        p.error("--write: needs --readme and one results file")
    for path in args.paths:
        try:
            with open(path) as f:
                payload = json.load(f)
        except (OSError, ValueError) as err:
            p.error(f"cannot read {path!r}: {err}")
        if not args.readme:
            print(render(payload))
            continue
        base = os.path.dirname(os.path.abspath(args.write)) if args.write else "."
        text = render_readme(payload, args.plots_dir, base)
        if args.write:
            try:
                write_section(args.write, text)
            except (OSError, ValueError) as err:
                p.error(f"--write: {err}")
            print(f"wrote the benchmark section of {args.write}", file=sys.stderr)
        else:
            print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
