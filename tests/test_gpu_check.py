"""benchmarks/gpu_check.sh: its syntax, and a dry run (the CPU-side logic) in a temporary folder."""

import os
import shutil
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu_check.sh")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def test_script_parses():
    subprocess.run(["bash", "-n", SCRIPT], check=True)


def test_dry_run_skips_gpu_steps_and_summarises(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", SCRIPT, "--dry-run", str(out)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    for step in ("build", "test suite", "compute-sanitizer --tool memcheck", "compute-sanitizer --tool racecheck"):
        assert f"no GPU: skipping {step}" in text, text
    assert "no GPU: skipping benchmark bench_class_stats" in text
    assert "--device cuda --quick --json" in text
    assert "no GPU: skipping target pairwise_stats K=250000" in text and "--ks 250000 --max-k 250000" in text
    summary = text[text.index("==== collapse_ext GPU check summary") :]
    assert "DRY RUN" in summary and "tests: not run (no GPU)" in summary
    assert (out / "summary.txt").read_text().strip() == summary.strip()
    assert (out / "env.txt").exists() and (out / "gpu_check_logs.tar.gz").exists()


def test_usage_errors():
    proc = subprocess.run(["bash", SCRIPT], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr
