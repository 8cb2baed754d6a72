import json
import re

import pytest

from collapse_ext.cli import predict
from collapse_ext.cli.common import _Parser  # the one-line error parser of every subcommand


def _main(argv):
    parser = _Parser(prog="collapse-ext")
    predict.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_former_module_name_still_imports():
    from collapse_ext import theory_cli

    assert theory_cli.run is predict.run and theory_cli.add_parser is predict.add_parser


def test_profiles():
    assert predict.parse_profile("step:10:1:K=4:KA=1") == [10.0, 1.0, 1.0, 1.0]
    exp = predict.parse_profile("exp:500:5:K=3")
    assert exp[0] == 500 and exp[-1] == pytest.approx(5) and exp[1] == pytest.approx(50)
    assert predict.parse_profile("pareto:8:1:K=4") == [8.0, 4.0, 8 / 3, 2.0]


@pytest.mark.parametrize("ext", [".txt", ".csv", ".json", ".npy"])
def test_predict_counts_file_json(tmp_path, capsys, ext):
    path = tmp_path / f"counts{ext}"
    if ext == ".npy":
        import numpy as np

        np.save(path, np.array([5, 3, 1]))
    else:
        path.write_text(json.dumps([5, 3, 1]) if ext == ".json" else "5, 3, 1\n")
    assert _main(["predict", "--counts", str(path), "--model", "seli", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "seli" and out["num_classes"] == 3 and len(out["gram_W"]) == 3


def test_predict_ufm_mse_and_lpm(capsys):
    assert _main(["predict", "--profile", "step:10:1:K=4:KA=2", "--model", "ufm-mse", "--lambda-W", "0.01",
                  "--lambda-H", "0.01", "--depth", "2"]) == 0  # fmt: skip
    assert "ufm-mse: K = 4" in capsys.readouterr().out
    assert _main(["predict", "--profile", "exp:10:1:K=5", "--model", "lpm-ce", "--E-H", "4"]) == 0
    assert "converged = True" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--profile", "exp:500:5"], "--profile: expected exp:HI:LO:K=K"),
        (["--profile", "step:5:1:K=4:KA=4"], "--profile: expected an int KA"),
        (["--counts", "missing.txt"], "--counts: cannot read"),
        (["--counts", "c.xls"], "--counts: expected a .txt"),
        (["--profile", "exp:5:1:K=3", "--model", "ufm-mse"], "--lambda-W: required"),
        (["--profile", "exp:5:1:K=3", "--model", "lpm-mse", "--E-W", "2"], "--E-W/--E-H: expected E_W \\* E_H < 1"),
        (["--profile", "exp:5:1:K=3", "--E-W", "-1"], "--E-W: expected a positive"),
        (["--profile", "exp:5:1:K=3", "--plot", "x.gif"], "--plot: expected a path ending"),
    ],
)
def test_errors_are_one_line_naming_the_option(capsys, argv, match):
    with pytest.raises(SystemExit) as exc:
        _main(["predict", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    assert re.search(match, err)
