"""The suite's cases: each one a run of a ``bench_<op>.py`` module with its arguments for a
full and a ``--quick`` run. A module that takes ``--json`` hands its raw numbers back."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    name: str
    module: str
    full: tuple[str, ...] = ()
    quick: tuple[str, ...] = ()
    takes_json: bool = False


CASES = [
    Case("class_stats", "bench_class_stats", quick=("--quick",), takes_json=True),
    Case("within_scatter", "bench_within_scatter", quick=("--n", "4000", "--d", "128", "--repeats", "2")),
    Case("lpm_step", "bench_lpm_step", quick=("--iters", "20", "--repeats", "1")),
    Case("lpm_solve", "bench_lpm_solve", quick=("--instances", "128")),
    Case("lpm_solve_large", "bench_lpm_solve_large", quick=("--K", "100")),
    Case("metrics", "bench_metrics", quick=("--repeats", "1", "--max-k", "1000")),
    Case("monitor", "bench_monitor", quick=("--repeats", "1", "--in-dim", "256", "--widths", "256", "256")),
    Case("analyze", "bench_analyze", quick=("--n", "20000", "--d", "128", "--k", "10")),
    Case("lm", "bench_lm", quick=("--quick",), takes_json=True),
]
