import pytest

from collapse_ext.cli import build_parser, main
from collapse_ext.loggers import read_jsonl


def test_demo_runs_and_writes_history(tmp_path, capsys):
    path = tmp_path / "demo.jsonl"
    csv_path = tmp_path / "demo.csv"
    assert main(["demo", "--variant", "imbalanced", "--epochs", "3", "--jsonl", str(path), "--csv", str(csv_path)]) == 0
    out = capsys.readouterr().out
    assert "== digits, imbalanced: 3 epochs" in out
    assert "final bundle (imbalanced" in out and "law of data separation" in out
    assert "minority collapse: mean cosine of minority classifier rows" in out
    history = read_jsonl(path)
    assert [(r.epoch, r.phase) for r in history] == [(1, "train"), (1, "eval"), (2, "train"), (3, "train"), (3, "eval")]
    assert history[-1]["penultimate"].minority_classes == [5, 6, 7, 8, 9]
    assert csv_path.read_text().count("\n") == 6


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_bad_arguments_exit():
    with pytest.raises(SystemExit):
        main(["demo", "--epochs", "0"])
    with pytest.raises(SystemExit):
        main(["demo", "--variant", "skewed"])


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


def test_lpm_sweep_oversampling_restores_the_etf(capsys):
    assert main(["lpm-sweep", "--ratios", "100:100:1", "--oversample", "--no-threshold"]) == 0
    out = capsys.readouterr().out
    row = out.splitlines()[3].split("|")
    assert float(row[2]) == pytest.approx(-1 / 9, abs=1e-4)


def test_lpm_sweep_bad_ratios_exit():
    with pytest.raises(SystemExit):
        main(["lpm-sweep", "--ratios", "10:1:5"])
    with pytest.raises(SystemExit):
        main(["lpm-sweep", "--ratios", "1-10"])
