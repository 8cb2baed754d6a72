import os
import subprocess
import sys

import pytest
import torch
from helpers import run_main

from collapse_ext import lpm
from collapse_ext.cli import build_parser, main
from collapse_ext.loggers import read_jsonl


def test_demo_runs_and_writes_history(tmp_path, capsys):
    path = tmp_path / "demo.jsonl"
    csv_path = tmp_path / "demo.csv"
    argv = ["demo", "--variant", "imbalanced", "--epochs", "3", "--jsonl", str(path), "--csv", str(csv_path)]
    assert main([*argv, "--print-every", "2"]) == 0
    out = capsys.readouterr().out
    per_epoch = [line.split()[:4] for line in out.splitlines() if line.startswith("imbalanced epoch")]
    assert per_epoch == [["imbalanced", "epoch", str(e), "eval"] for e in (1, 2, 3)]  # --print-every 2, and the last
    assert "at epoch 1 to" in out  # "imbalanced (N samples, ...): NC1 fell from X at epoch 1 to Y at epoch 3"
    assert "law of data separation" in out and "minority classifier cosine observed" in out
    assert out.splitlines()[-1] == f"history written to {csv_path}"
    history = read_jsonl(path)
    assert [(r.epoch, r.phase) for r in history] == [(e, p) for e in (1, 2, 3) for p in ("train", "eval")]
    assert history[-1]["penultimate"].minority_classes == [5, 6, 7, 8, 9]
    assert csv_path.read_text().count("\n") == 7
    assert sorted(os.listdir(tmp_path)) == ["demo.csv", "demo.jsonl"]  # no temporary files left


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_parser_has_a_subcommand_registry():
    parser, subparsers = build_parser()
    extra = subparsers.add_parser("extra")
    extra.set_defaults(func=lambda args: 7)
    assert parser.parse_args(["extra"]).func(None) == 7


def test_lpm_sweep_prints_table_threshold_plot_and_json(tmp_path, capsys):
    import json

    plot, table = tmp_path / "mc.png", tmp_path / "mc.json"
    assert main(["lpm-sweep", "--ratios", "1:1000:4", "--plot", str(plot), "--json", str(table)]) == 0
    out = capsys.readouterr().out
    assert "K=10, K_A=5, E_W=1.0, E_H=5.0, loss ce: 4/4 converged" in out
    assert "| ratio | minority_cos_mean |" in out
    assert "Estimated Minority Collapse threshold R_0 = " in out
    saved = json.loads(table.read_text())
    rows = saved["rows"]
    assert [round(r["ratio"]) for r in rows] == [1, 10, 100, 1000]
    assert rows[0]["minority_cos_mean"] == pytest.approx(-1 / 9, abs=1e-4)  # balanced: simplex ETF
    assert rows[-1]["minority_cos_mean"] > 0.999  # Minority Collapse
    assert 5 < saved["threshold"] < 30
    assert plot.stat().st_size > 10_000
    assert sorted(os.listdir(tmp_path)) == ["mc.json", "mc.png"]  # no temporary files left


def test_lpm_sweep_oversampling_restores_the_etf(capsys):
    assert main(["lpm-sweep", "--ratios", "100:100:1", "--oversample", "--no-threshold"]) == 0
    out = capsys.readouterr().out
    row = out.splitlines()[3].split("|")
    assert float(row[2]) == pytest.approx(-1 / 9, abs=1e-4)


def _files(root):
    """Every file and directory under root."""
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, dirs, fs in os.walk(root) for f in fs + dirs)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A current directory holding a file, a directory and a FIFO for the path cases."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    (tmp_path / "adir.png").mkdir()
    os.mkfifo(tmp_path / "afifo")
    monkeypatch.chdir(tmp_path)
    return tmp_path


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is available here")
NO_PROC = pytest.mark.skipif(not os.path.isdir("/proc"), reason="no /proc")

# (argv, what follows "error: " on the one stderr line: the option, then ": ").
BAD_INPUTS = [
    # top level
    (["bogus"], "command: "),
    (["--bogus"], "unrecognized arguments: --bogus"),
    # demo
    (["demo", "--variant", "skewed"], "--variant: "),
    (["demo", "--variant"], "--variant: "),
    *[(["demo", "--epochs", v], "--epochs: ") for v in ["0", "-3", "1.5", "abc", "nan", "inf", "", "1e3"]],
    (["demo", "--epochs"], "--epochs: "),
    *[(["demo", "--print-every", v], "--print-every: ") for v in ["0", "-1", "x", "2.0"]],
    *[(["demo", "--seed", v], "--seed: ") for v in ["-1", str(2**63), "1.5", "x"]],
    *[(["demo", "--threads", v], "--threads: ") for v in ["0", "-2", "100000", "x"]],
    *[(["demo", "--jsonl", v], "--jsonl: ") for v in ["missing/h.jsonl", "adir", "afifo", "", "afile/h.jsonl", "out/"]],
    *[(["demo", "--csv", v], "--csv: ") for v in ["missing/h.csv", "adir", "afifo", ""]],
    (["demo", "--jsonl", "h.out", "--csv", "./h.out"], "--csv: "),
    *[(["demo", "--eval-every", v], "--eval-every: ") for v in ["0", "-1", "x", "1.5"]],
    *[(["demo", "--report", v], "--report: ") for v in ["afile", "missing/report", "afile/report", ""]],
    (["demo", "--report", "adir", "--jsonl", "adir/metrics.jsonl"], "--jsonl: "),
    (["demo", "--report", ".", "--csv", "summary.json"], "--csv: "),
    (["demo", "--quiet=1"], "--quiet: "),
    (["demo", "--bogus"], "unrecognized arguments: --bogus"),
    # lpm-sweep
    *[(["lpm-sweep", "--K", v], "--K: ") for v in ["1", "2", "0", "-1", "x", "2.5", ""]],
    *[(["lpm-sweep", "--K-A", v], "--K-A: ") for v in ["0", "-1", "x", "9", "1.5"]],
    (["lpm-sweep", "--K", "5", "--K-A", "4"], "--K-A: "),
    *[(["lpm-sweep", "--E-W", v], "--E-W: ") for v in ["0", "-1", "nan", "inf", "-inf", "x", "1e999"]],
    *[(["lpm-sweep", "--E-H", v], "--E-H: ") for v in ["0", "-0.5", "nan", "inf", ""]],
    *[
        (["lpm-sweep", "--ratios", v], "--ratios: ")
        for v in [
            "10:1:5",  # LO > HI
            "1-10",
            "1:2",
            "1:2:3:4",
            ":::",
            "0:10:3",
            "-1:10:3",  # argparse reads it as an option: "expected one argument"
            "1:inf:3",
            "nan:10:3",
            "1:1e999:3",
            "1:10:0",
            "1:10:-2",
            "1:10:2.5",
            "1:10:x",
            "1:10:1",  # one point cannot span LO < HI
            "1:1:3",  # several points of one ratio
            "5:5:1",  # a single ratio and the R_0 estimate (which needs LO < HI)
        ]
    ],
    (["lpm-sweep", "--loss", "hinge"], "--loss: "),
    *[(["lpm-sweep", "--tol", v], "--tol: ") for v in ["-1", "nan", "inf", "x"]],
    pytest.param(["lpm-sweep", "--device", "cuda"], "--device: ", marks=NO_CUDA),
    *[(["lpm-sweep", "--device", v], "--device: ") for v in ["cuda:99", "bogus", "meta", "cpu:1", "mps", ""]],
    *[
        (["lpm-sweep", "--plot", v], "--plot: ")
        for v in ["mc.txt", "mc", "missing/mc.png", "adir.png", "afile/mc.png", "", "mc.png/"]
    ],
    *[(["lpm-sweep", "--json", v], "--json: ") for v in ["missing/t.json", "adir", "afifo", "afile/t.json", ""]],
    pytest.param(["lpm-sweep", "--json", "/proc/collapse-ext.json"], "--json: ", marks=NO_PROC),
    (["lpm-sweep", "--plot", "same.png", "--json", "same.png"], "--json: "),
    (["lpm-sweep", "--oversample=1"], "--oversample: "),
    (["lpm-sweep", "--no-threshold=yes"], "--no-threshold: "),
    (["lpm-sweep", "--E", "1"], "ambiguous option: --E could match --E-W, --E-H"),
]


@pytest.mark.parametrize("argv, option", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_2(workdir, capsys, argv, option):
    before = _files(workdir)
    assert run_main(argv) == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    command = "collapse-ext" if option.startswith(("command", "unrecognized")) else f"collapse-ext {argv[0]}"
    assert lines[0].startswith(f"{command}: error: {option}"), lines[0]
    assert out == ""
    assert _files(workdir) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_unwritable_output_directory(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert run_main(["lpm-sweep", "--json", str(locked / "t.json")]) == 2
    assert "--json: expected a path in a writable directory" in capsys.readouterr().err
    assert list(locked.iterdir()) == []


def _raising(error):
    def fake(*args, **kwargs):
        raise error

    return fake


def test_library_value_error_names_the_option(workdir, capsys, monkeypatch):
    message = "Expected `E_W` to be positive and finite, got 0.0"
    monkeypatch.setattr(lpm, "minority_collapse_sweep", _raising(ValueError(message)))
    before = _files(workdir)
    assert run_main(["lpm-sweep", "--json", "t.json", "--plot", "t.png"]) == 2
    err = capsys.readouterr().err
    assert err == f"collapse-ext lpm-sweep: error: --E-W: {message}\n"
    assert _files(workdir) == before


def test_internal_errors_still_raise(monkeypatch):
    monkeypatch.setattr(lpm, "minority_collapse_sweep", _raising(ValueError("Expected `weights` to be (B, K)")))
    with pytest.raises(ValueError, match="weights"):
        main(["lpm-sweep"])
    monkeypatch.setattr(lpm, "minority_collapse_sweep", _raising(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(["lpm-sweep"])


def test_out_of_memory_names_the_sizes(capsys, monkeypatch):
    error = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 TB")
    monkeypatch.setattr(lpm, "minority_collapse_sweep", _raising(error))
    assert run_main(["lpm-sweep", "--K", "100000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: --K/--ratios: expected a problem that fits in memory" in err


def test_keyboard_interrupt_exits_130_and_leaves_no_files(workdir, capsys, monkeypatch):
    monkeypatch.setattr(lpm, "minority_collapse_sweep", _raising(KeyboardInterrupt()))
    before = _files(workdir)
    assert run_main(["lpm-sweep", "--json", "t.json", "--plot", "t.png"]) == 130
    assert capsys.readouterr().err == "collapse-ext lpm-sweep: interrupted\n"
    assert _files(workdir) == before


def test_demo_interrupted_leaves_no_half_written_history(workdir, capsys, monkeypatch):
    import collapse_ext.data

    def interrupted(epochs, *, monitor_kwargs, **kwargs):
        # The loggers write temporary files; the outputs appear only when the run ends.
        assert {os.path.basename(logger.path) for logger in monitor_kwargs["loggers"]}.isdisjoint({"h.jsonl", "h.csv"})
        assert not os.path.exists("h.jsonl") and not os.path.exists("h.csv")
        raise KeyboardInterrupt

    monkeypatch.setattr(collapse_ext.data, "train_digits", interrupted)
    before = _files(workdir)
    assert run_main(["demo", "--epochs", "1", "--jsonl", "h.jsonl", "--csv", "h.csv"]) == 130
    assert capsys.readouterr().err == "collapse-ext demo: interrupted\n"
    assert _files(workdir) == before


def test_bad_input_from_the_command_line_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "collapse_ext.cli", "lpm-sweep", "--K", "1", "--json", str(tmp_path / "t.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    expected = "--K: expected an int >= 3 (one majority and two minority classes at least), got 1"
    assert proc.stderr == f"collapse-ext lpm-sweep: error: {expected}\n"
    assert proc.stdout == "" and list(tmp_path.iterdir()) == []
