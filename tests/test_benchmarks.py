"""The benchmark suite's machinery: the driver, ``collapse-ext bench``, the flags on rows
where ours is slower than plain PyTorch, the markdown table (and its README section) and
the scaling plots, on tiny cases and synthetic results."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from collapse_ext.cli import bench as bench_cli
from collapse_ext.cli import main

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import plots, table  # noqa: E402
from benchmarks.common import annotate, result_row  # noqa: E402


def _run(argv):
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def test_driver_writes_results_and_table(tmp_path):
    out = tmp_path / "cpu.json"
    cmd = [sys.executable, "-m", "benchmarks", "--quick", "--filter", "^within_scatter$", "--no-ceilings"]
    proc = subprocess.run([*cmd, "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(out.read_text())
    assert payload["environment"]["torch"]
    assert payload["environment"]["collapse_ext"]["version"]
    (case,) = payload["cases"]
    assert case["name"] == "within_scatter" and case["returncode"] == 0
    assert "| within_scatter | --device cpu" in proc.stdout
    rows = case["json"]["results"]
    assert [r["op"] for r in rows] == ["within_scatter", "within_scatter projected"]
    for row in rows:
        assert row["ours_s"] > 0 and row["plain_s"] > 0 and row["unit"] == "GFLOP/s fp32"
        assert row["slower"] == (row["plain_s"] < row["ours_s"])
        assert row["ours_peak_mib"] is not None and row["plain_peak_mib"] is not None
    table_out = subprocess.run(
        [sys.executable, "-m", "benchmarks.table", str(out)], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert "### within_scatter" in table_out.stdout and "### Results" in table_out.stdout


def test_driver_rejects_an_unknown_filter():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--filter", "no-such-case"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "--filter: no case matches 'no-such-case'" in proc.stderr


# ------------------------------------------------------------------ collapse-ext bench
def test_bench_subcommand_runs_one_case_end_to_end(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "collapse_ext.cli", "bench", "--quick", "--filter", "^within_scatter$"]
        + ["--no-ceilings", "--json", str(out), "--plots", str(tmp_path / "plots")],
        cwd=tmp_path,  # any directory: the suite is found beside the imported package
        env=dict(os.environ, PYTHONPATH=str(ROOT)),  # this checkout's package, as an editable install has it
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    (case,) = json.loads(out.read_text())["cases"]
    assert case["name"] == "within_scatter" and case["returncode"] == 0 and case["json"]["results"]
    assert "| within_scatter | --device cpu" in proc.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--filter", "no-such-case"], "--filter: no case matches 'no-such-case' (cases: class_stats, "),
        (["--filter", "("], "--filter: expected a regular expression, got '('"),
        (["--device", "tpu"], "--device: invalid choice: 'tpu'"),
        (["--timeout", "-1"], "--timeout: expected a positive number of seconds, got '-1'"),
    ],
)
def test_bench_subcommand_bad_options_are_one_line(capsys, argv, message):
    assert _run(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"collapse-ext bench: error: {message}") and err.count("\n") == 1


def test_bench_subcommand_without_a_checkout(capsys, monkeypatch):
    monkeypatch.setattr(bench_cli, "checkout_root", lambda: None)
    assert _run(["bench", "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("collapse-ext bench: error: bench: needs the benchmarks/ directory of a source checkout")


def test_bench_subcommand_from_an_installed_copy(tmp_path):
    """The package alone (as a wheel installs it), run from the checkout's root where a
    ``benchmarks`` directory is importable: it must not pick that one up."""
    site = tmp_path / "site"
    shutil.copytree(ROOT / "collapse_ext", site / "collapse_ext", ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(site))
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from collapse_ext.cli import main; sys.exit(main())", "bench", "--quick"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "needs the benchmarks/ directory of a source checkout" in proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------- flags and table
def _row(op, n, ours, plain, **kw):
    return result_row(op, {"N": n, "d": 64}, ours, plain, plain="plain way", work=2e9, unit="GFLOP/s fp32", **kw)


def test_rows_slower_than_plain_are_flagged_from_the_ratio():
    fast, slow = _row("op", 10, 1.0, 2.0), _row("op", 10, 2.0, 1.0)
    assert fast["speedup"] == 2.0 and fast["slower"] is False
    assert slow["speedup"] == 0.5 and slow["slower"] is True
    assert _row("op", 10, 1.0, None)["slower"] is False  # no plain way run: nothing to compare
    annotate(slow, {"matmul_fp32_gflops": 4.0})
    assert slow["rate"] == 1.0 and slow["pct_of_ceiling"] == 25.0
    with_floor = _row("op", 10, 3.0, 6.0, floor_s=2.0, floor="GEMM")
    assert with_floor["vs_floor"] == 1.5
    # a file whose flag disagrees with its numbers is re-flagged from the ratio
    stale = dict(slow, slower=False)
    payload = {"cases": [{"name": "c", "json": {"results": [stale]}}]}
    assert table.all_rows(payload)[0]["slower"] is True


def _payload():
    rows = [
        _row("op", n, ours, plain, sweep="N")
        for n, ours, plain in ((10, 0.1, 0.3), (100, 1.0, 0.8), (1000, 10.0, 30.0))
    ]
    return {
        "environment": {"cpu": "Test CPU", "cpu_count": 2, "torch_threads": 2, "torch": "9.9", "commit": "abc123"},
        "ceilings": {"copy_gbs": 10.0, "read_gbs": 12.0, "matmul_fp32_gflops": 100.0, "matmul_fp64_gflops": 50.0},
        "cases": [{"name": "toy", "argv": ["bench_toy.py"], "wall_s": 1.0, "returncode": 0, "json": {"results": rows}}],
    }


def test_table_marks_slower_rows_and_lists_them_at_the_end():
    text = table.render(_payload())
    lines = [line for line in text.splitlines() if line.startswith("| toy | op |")]
    assert len(lines) == 3
    assert table.FLAG in lines[1] and "0.80x" in lines[1]
    assert all(table.FLAG not in line for line in (lines[0], lines[2]))
    assert "Slower than the plain PyTorch way: 1 of 3 rows" in text
    assert "- toy / op N=100 d=64: ours 1 s, plain 800 ms (0.80x)" in text
    assert "20%" in lines[0]  # 2 GFLOP in 0.1 s against the 100 GFLOP/s ceiling


def test_table_readme_section(tmp_path):
    payload = _payload()
    plots.plot_all(payload, str(tmp_path / "docs" / "bench"))
    text = table.render_readme(payload, str(tmp_path / "docs" / "bench"), str(tmp_path))
    assert text.startswith("Machine: Test CPU, 2 CPUs, 2 threads; torch 9.9; commit abc123")
    assert "fp32 matmul GFLOP/s" in text and "Slower than the plain PyTorch way: 1 of 3 rows" in text
    assert "](docs/bench/toy-op-N.png)" in text
    results = tmp_path / "r.json"
    results.write_text(json.dumps(payload))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Benchmarks\n\n{table.BEGIN}\nold numbers\n{table.END}\n\nafter\n")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.table", str(results), "--readme", "--write", str(readme)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    new = readme.read_text()
    assert "old numbers" not in new and "Machine: Test CPU" in new and new.endswith(f"{table.END}\n\nafter\n")
    readme.write_text("no markers\n")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.table", str(results), "--readme", "--write", str(readme)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "has no <!-- benchmarks:begin -->" in proc.stderr


def test_plots_from_a_results_file(tmp_path):
    payload = _payload()
    # a second op with one size only: no plot; the same sweep at another d: its own plot
    payload["cases"][0]["json"]["results"] += [
        _row("single", 10, 1.0, 1.0, sweep="N"),
        result_row("op", {"N": 10, "d": 128}, 1.0, 2.0, plain="p", sweep="N"),
        result_row("op", {"N": 20, "d": 128}, 2.0, 4.0, plain="p", sweep="N"),
    ]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(payload))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.plots", str(path), "--out", str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    made = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert made == ["toy-op-N-d128.png", "toy-op-N.png"]
    for name in made:
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plots.slope([10, 100, 1000], [0.1, 1.0, 10.0]) == pytest.approx(1.0)


def _values(argv, option):
    rest = argv[argv.index(option) + 1 :]
    return [v for v in rest[: next((i for i, v in enumerate(rest) if v.startswith("--")), len(rest))]]


def test_quick_suite_sweeps_sizes():
    from benchmarks.suite import CASES

    quick = {c.name: c.quick for c in CASES}
    assert all(c.takes_json for c in CASES)
    assert len(_values(quick["analyze"], "--rows")) >= 3
    assert len(_values(quick["metrics"], "--ks")) >= 3
    assert _values(quick["analyze"], "--formats") == ["npy", "safetensors", "h5"]
