"""The benchmark driver runs a case and writes a results file the table renders."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
    table = subprocess.run(
        [sys.executable, "-m", "benchmarks.table", str(out)], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert "### within_scatter" in table.stdout


def test_driver_rejects_an_unknown_filter():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--filter", "no-such-case"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "--filter: no case matches 'no-such-case'" in proc.stderr
