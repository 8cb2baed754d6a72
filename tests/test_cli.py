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
