"""collapse_ext.demo and collapse_ext.demo_report: `collapse-ext demo --report DIR` on a few
epochs (report.html, summary.json, metrics.jsonl, the PNGs, the printed summary), the LPM
prediction, and that a failure leaves no file behind."""

import contextlib
import html
import io
import json
import os
import re

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

import collapse_ext.demo_report  # noqa: E402
from collapse_ext import lpm  # noqa: E402
from collapse_ext.cli import main  # noqa: E402
from collapse_ext.demo import SWEEP_RATIOS, lpm_prediction  # noqa: E402

EPOCHS = 4
PNGS = [
    "minority_collapse.png",
    "minority_imbalanced.png",
    "nc1.png",
    "nc2_classifier.png",
    "nc2_means.png",
    "nc3.png",
    "nc4.png",
    "separation.png",
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One demo run into a fresh directory: (the report directory, what it printed)."""
    root = tmp_path_factory.mktemp("demo")
    report = root / "report"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["demo", "--epochs", str(EPOCHS), "--eval-every", "2", "--report", str(report)]) == 0
    return report, out.getvalue()


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_report_directory_holds_every_file_and_nothing_else(demo):
    report, _ = demo
    assert sorted(os.listdir(report)) == sorted(["metrics.jsonl", "report.html", "summary.json", *PNGS])
    assert os.listdir(report.parent) == ["report"]  # no staging directory left
    for name in PNGS:
        with (report / name).open("rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_metrics_jsonl_has_one_line_per_epoch_and_variant(demo):
    report, _ = demo
    lines = _jsonl(report / "metrics.jsonl")
    assert [(r["variant"], r["epoch"]) for r in lines] == [
        (v, e) for v in ("balanced", "imbalanced") for e in range(1, EPOCHS + 1)
    ]
    # --eval-every 2: evaluate() at epoch 1, 2, 4 (the last); epoch 3 holds its training statistics.
    assert [r["phase"] for r in lines[:EPOCHS]] == ["eval", "eval", "train", "eval"]
    for r in lines:
        assert set(r["separation_fuzziness"]) == {"block1", "block2", "penultimate"}
        assert all(v > 0 for v in r["separation_fuzziness"].values())
        assert r["separation_law"]["rho"] > 0 and 0 <= r["separation_law"]["r2"] <= 1
        assert r["metrics"]["nc1"] > 0 and 0 <= r["train_accuracy"] <= 1
        assert {"equinorm_means", "equiangularity_weights", "self_duality", "ncc_mismatch"} <= set(r["metrics"])
    imbalanced = [r for r in lines if r["variant"] == "imbalanced"]
    assert all(r["metrics"]["minority_cos_mean"] is not None for r in imbalanced)
    assert all(r["metrics"]["minority_cos_mean"] is None for r in lines if r["variant"] == "balanced")
    assert all(r["metrics"]["ncc_mismatch"] is not None for r in lines if r["phase"] == "eval")


def test_summary_json_has_the_lpm_prediction_and_the_numbers_of_the_text(demo):
    report, printed = demo
    summary = json.loads((report / "summary.json").read_text())
    assert summary["epochs"] == EPOCHS and summary["eval_every"] == 2 and summary["seed"] == 0
    imb, bal = summary["variants"]["imbalanced"], summary["variants"]["balanced"]
    assert bal["lpm_prediction"] is None and bal["minority_classes"] == []
    assert imb["minority_classes"] == [5, 6, 7, 8, 9]
    assert sum(imb["counts"]) < sum(bal["counts"]) == 1797
    p = imb["lpm_prediction"]
    assert p["model"] == "lpm-ce" and p["converged"] and p["counts"] == imb["counts"]
    assert p["E_W"] == pytest.approx(imb["energies"]["E_W"]) and p["E_H"] == pytest.approx(imb["energies"]["E_H"])
    assert p["ratio"] == pytest.approx(max(imb["counts"]) / min(imb["counts"]))
    assert -1 <= p["minority_cos_mean"] <= 1 and -1 <= p["majority_cos_mean"] <= 1
    sweep = summary["lpm_sweep"]
    assert (sweep["K"], sweep["K_A"], sweep["E_W"], sweep["E_H"]) == (10, 5, 1.0, 5.0)
    assert len(sweep["rows"]) == SWEEP_RATIOS[2] and 5 < sweep["threshold"] < 30

    lines = _jsonl(report / "metrics.jsonl")
    notes = summary["observations"]
    for variant in ("balanced", "imbalanced"):
        evaluated = [r for r in lines if r["variant"] == variant and r["phase"] == "eval"]
        first, last = evaluated[0]["metrics"]["nc1"], evaluated[-1]["metrics"]["nc1"]
        assert summary["variants"][variant]["final"]["metrics"]["nc1"] == last
        verb = "fell" if last < first else "rose" if last > first else "stayed"
        expected = f"NC1 {verb} from {first:.3g} at epoch 1 to {last:.3g} at epoch {EPOCHS} ({first / last:.3g}x"
        assert any(expected in n for n in notes), notes
        law = evaluated[-1]["separation_law"]
        assert any(f"{variant}: law of data separation" in n and f"rho = {law['rho']:.3g}" in n for n in notes)
    observed = imb["final"]["metrics"]["minority_cos_mean"]
    minority = [n for n in notes if "minority classifier cosine observed" in n]
    assert len(minority) == 1
    assert f"observed {observed:+.3f}" in minority[0] and f"LPM prediction {p['minority_cos_mean']:+.3f}" in minority[0]
    assert any(f"R_0 ~ {sweep['threshold']:.3g}" in n for n in notes)

    # The printed summary: the same sentences on one screen, the report's path last.
    out = printed.splitlines()
    assert len(out) <= 25, printed
    assert out[:len(notes)] == notes  # fmt: skip
    assert out[-1] == f"report written to {report / 'report.html'}"


def test_report_html_is_self_contained(demo):
    report, _ = demo
    page = (report / "report.html").read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == len(PNGS) and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r"(href|src)=\"(https?:)?//", page) and "<link" not in page
    summary = json.loads((report / "summary.json").read_text())
    for note in summary["observations"]:
        assert html.escape(note) in page
    assert "LPM prediction" in page and "Final metrics" in page


def test_lpm_prediction_matches_the_sweep_at_the_same_ratio():
    counts = [100] * 5 + [10] * 5
    p = lpm_prediction(counts, [5, 6, 7, 8, 9], 1.0, 5.0)
    sweep = lpm.minority_collapse_sweep(10, 5, [10.0], 1.0, 5.0)
    assert p["converged"] and p["ratio"] == 10
    assert p["minority_cos_mean"] == pytest.approx(float(sweep.minority_cos_mean[0]), abs=1e-6)
    assert p["majority_cos_mean"] == pytest.approx(float(sweep.majority_cos_mean[0]), abs=1e-6)
    assert p["norm_ratio"] == pytest.approx(float(sweep.norm_ratio[0]), abs=1e-6)
    # An absent class has no loss term: it is left out of the model.
    absent = lpm_prediction([100] * 4 + [0] + [10] * 5, [5, 6, 7, 8, 9], 1.0, 5.0)
    assert absent["converged"] and absent["ratio"] == 10


def test_a_failure_while_writing_the_report_leaves_no_file(tmp_path, monkeypatch, capsys):
    def broken(result, directory):
        with open(os.path.join(directory, "report.html"), "w") as f:
            f.write("<html>half")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(collapse_ext.demo_report, "write_demo_report", broken)
    argv = ["demo", "--variant", "balanced", "--epochs", "1", "--report", str(tmp_path / "r")]
    with pytest.raises(RuntimeError, match="disk on fire"):
        main([*argv, "--jsonl", str(tmp_path / "h.jsonl")])
    assert list(tmp_path.iterdir()) == []


def test_quiet_prints_nothing(tmp_path, capsys):
    argv = ["demo", "--variant", "balanced", "--epochs", "2", "--quiet"]
    assert main([*argv, "--jsonl", str(tmp_path / "h.jsonl")]) == 0
    assert capsys.readouterr() == ("", "")
    assert (tmp_path / "h.jsonl").read_text().count("\n") == 4  # (train, eval) x 2 epochs
