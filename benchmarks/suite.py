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
    Case(
        "within_scatter",
        "bench_within_scatter",
        quick=("--n", "4000", "--d", "128", "--repeats", "2"),
        takes_json=True,
    ),
    Case("lpm_step", "bench_lpm_step", quick=("--iters", "20", "--repeats", "1"), takes_json=True),
    Case("lpm_solve", "bench_lpm_solve", quick=("--instances", "128"), takes_json=True),
    Case("lpm_solve_large", "bench_lpm_solve_large", quick=("--K", "100"), takes_json=True),
    Case(
        "metrics",
        "bench_metrics",
        quick=("--repeats", "1", "--ks", "500", "1000", "2000", "4000", "--nearest-n", "30000"),
        takes_json=True,
    ),
    Case(
        "monitor",
        "bench_monitor",
        quick=("--repeats", "1", "--in-dim", "256", "--widths", "256", "256"),
        takes_json=True,
    ),
    # Full: issue 11's 2 GB file (N = 1M, d = 512, K = 100) in three formats, and a sweep over N.
    Case(
        "analyze",
        "bench_analyze",
        full=("--rows", "125000", "250000", "500000", "1000000", "--formats", "npy", "safetensors", "h5")
        + ("--breakdown",),
        quick=(
            "--rows",
            "25000",
            "50000",
            "100000",
            "--dim",
            "128",
            "--classes",
            "10",
            "--formats",
            "npy",
            "safetensors",
            "h5",
        ),
        takes_json=True,
    ),
    Case("lm", "bench_lm", quick=("--quick",), takes_json=True),
]
