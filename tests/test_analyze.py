import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import run_main

from collapse_ext import ClassStats, collapse_metrics
from collapse_ext.analyze import analyze
from collapse_ext.cli import main

K, D, N = 5, 8, 1200
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    means = 4 * torch.randn(K, D, generator=g)
    y = torch.randint(0, K, (N,), generator=g)
    x = means[y] + torch.randn(N, D, generator=g)
    w, b = means + 0.3 * torch.randn(K, D, generator=g), 0.1 * torch.randn(K, generator=g)
    return x.float(), y, w, b


@pytest.fixture
def files(tmp_path, data):
    x, y, w, b = data
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "y.npy", y.numpy())
    np.savez(tmp_path / "all.npz", features=x.numpy(), labels=y.numpy(), hidden=(2 * x + torch.randn(N, D)).numpy())
    torch.save({"model": {"fc.weight": w, "fc.bias": b}}, tmp_path / "ckpt.pt")
    return tmp_path


def _close(a, b, rel):
    assert a.keys() == b.keys()
    for name in a:
        if a[name] is None or b[name] is None:
            assert a[name] is None and b[name] is None, name
        else:
            assert a[name] == pytest.approx(b[name], rel=rel, abs=1e-12), name


def test_matches_the_in_memory_bundle_over_several_chunks(files, data):
    x, y, w, b = data
    result = analyze(files / "x.npy", labels=files / "y.npy", weight=w, bias=b, chunk_rows=137, device="cpu")
    ref = ClassStats(K, D)
    ref.update(x, y)
    expected = collapse_metrics(ref, w, b, features=x, labels=y)
    _close(result.metrics.to_dict(), expected.to_dict(), 1e-6)
    assert result.passes == 2 and result.num_samples == N and result.num_classes == K
    assert result.stats["features"].num_samples == N
    assert result.metrics.ncc_means.startswith("current class means")


def test_projected_nc1_equals_the_full_one(files):
    full = analyze(files / "x.npy", labels=files / "y.npy", chunk_rows=300, ncc=False)
    proj = analyze(files / "x.npy", labels=files / "y.npy", chunk_rows=300, ncc=False, nc1_mode="projected")
    assert full.passes == 1 and proj.passes == 2
    assert full.stats["features"].scatter is not None and proj.stats["features"].scatter is None
    # The full S_W sums float32 products of float32 rows (ClassStats' pending block); the
    # projected pass works on float64 Q^T h: they agree to float32 rounding.
    for name in ("nc1", "separation_fuzziness"):
        assert getattr(proj.metrics, name) == pytest.approx(getattr(full.metrics, name), rel=1e-5)
    assert "ncc_accuracy" in full.metrics.undefined


def test_cli_one_command_table_json_and_report(files, capsys):
    out_json, report = files / "m.json", files / "rep"
    argv = ["analyze", str(files / "all.npz"), "--checkpoint", str(files / "ckpt.pt"), "--classifier", "fc"]
    assert main([*argv, "--json", str(out_json), "--report", str(report), "--chunk-rows", "500"]) == 0
    out = capsys.readouterr().out
    assert "nc1 " in out and "ncc_mismatch" in out and f"metrics written to {out_json}" in out
    saved = json.loads(out_json.read_text())
    assert {"source", "num_samples", "num_classes", "absent_classes", "metrics"} <= saved.keys()
    assert saved["num_samples"] == N and saved["num_classes"] == K and saved["absent_classes"] == []
    assert saved["classifier"].endswith("ckpt.pt:model.fc")
    assert all(v is None or isinstance(v, float) for v in saved["metrics"].values())
    assert saved["metrics"]["ncc_mismatch"] is not None
    assert sorted(os.listdir(report))[:2] == ["classifier_cosines.png", "counts.png"]
    assert "summary.json" in os.listdir(report) and "report.html" in os.listdir(report)
    page = (report / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 4 and "http" not in page.split("<body>")[1].split("collapse-ext")[0]


def test_several_layers_give_per_layer_metrics_and_the_law(files):
    result = analyze(files / "all.npz", features_key="hidden,features", chunk_rows=400, ncc=False)
    saved = result.to_dict()
    assert [layer["name"] for layer in saved["layers"]] == ["hidden", "features"]
    assert saved["metrics"] == saved["layers"][1]["metrics"]
    d_hidden, d_feat = (layer["metrics"]["separation_fuzziness"] for layer in saved["layers"])
    assert d_hidden > d_feat > 0
    assert saved["separation_law"]["rho"] == pytest.approx(d_feat / d_hidden, rel=1e-9)


def test_finite_rows_whose_sum_overflows_are_kept(tmp_path, data):
    # The chunk's one-sum screen overflows to Inf on these finite rows: the row-wise test
    # must then find nothing to drop or refuse.
    x, y, _, _ = data
    big = x + 1e36  # finite, and no row deviates from its class mean by much
    np.save(tmp_path / "x.npy", big.numpy())
    assert not torch.isfinite(big[:256].sum())
    result = analyze(tmp_path / "x.npy", labels=y, chunk_rows=256, skip_nonfinite=True)
    assert result.skipped_nonfinite == 0 and result.num_samples == N


def test_skip_nonfinite_counts_the_rows(tmp_path, data):
    x, y, _, _ = data
    bad = x.clone()
    bad[[3, 700]] = float("nan")
    bad[900, 2] = float("inf")
    np.save(tmp_path / "x.npy", bad.numpy())
    with pytest.raises(ValueError, match="NaN or Inf in row 3 of 'features'"):
        analyze(tmp_path / "x.npy", labels=y, chunk_rows=256)
    result = analyze(tmp_path / "x.npy", labels=y, chunk_rows=256, skip_nonfinite=True)
    keep = torch.ones(N, dtype=torch.bool)
    keep[[3, 700, 900]] = False
    assert result.skipped_nonfinite == 3 and result.num_samples == N - 3
    ref = ClassStats(K, D)
    ref.update(x[keep], y[keep])
    assert result.metrics.nc1 == pytest.approx(collapse_metrics(ref).nc1, rel=1e-6)


@pytest.mark.parametrize("ext", [".pt", ".safetensors", ".h5"])
def test_other_formats_and_two_files_give_the_same_json(tmp_path, data, ext, capsys):
    x, y, w, _ = data
    if ext == ".h5":
        h5py = pytest.importorskip("h5py")
        with h5py.File(tmp_path / "f.h5", "w") as f:
            f["emb/penultimate"] = x.numpy()
    elif ext == ".safetensors":
        from safetensors.torch import save_file

        save_file({"emb/penultimate": x}, tmp_path / "f.safetensors")
    else:
        torch.save({"emb/penultimate": x}, tmp_path / "f.pt")
    torch.save(y.int(), tmp_path / "labels.pt")
    np.save(tmp_path / "w.npy", w.numpy())
    np.save(tmp_path / "x.npy", x.numpy())
    common = ["--labels", str(tmp_path / "labels.pt"), "--weight", str(tmp_path / "w.npy"), "--quiet"]
    assert main(["analyze", str(tmp_path / f"f{ext}"), "--features-key", "emb/penultimate", *common,
                 "--json", str(tmp_path / "a.json")]) == 0  # fmt: skip
    assert main(["analyze", str(tmp_path / "x.npy"), *common, "--json", str(tmp_path / "b.json")]) == 0
    assert capsys.readouterr().out == ""
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    _close(a["metrics"], b["metrics"], 1e-12)


@pytest.fixture
def bad(tmp_path, data, monkeypatch):
    x, y, w, _ = data
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "y.npy", y.numpy())
    np.save(tmp_path / "x3d.npy", x.numpy().reshape(N, 2, 4))
    np.save(tmp_path / "yshort.npy", y[:-1].numpy())
    np.save(tmp_path / "yfloat.npy", y.double().numpy())
    y_big = y.clone()
    y_big[77] = K + 3
    np.save(tmp_path / "ybig.npy", y_big.numpy())
    x_nan = x.clone()
    x_nan[1000, 0] = float("nan")
    np.save(tmp_path / "xnan.npy", x_nan.numpy())
    np.save(tmp_path / "w_bad.npy", w[:, :-1].numpy())
    np.save(tmp_path / "w.npy", w.numpy())
    np.savez(tmp_path / "all.npz", feats=x.numpy(), labels=y.numpy())
    torch.save({"fc.weight": w}, tmp_path / "ck.pt")
    monkeypatch.chdir(tmp_path)
    return tmp_path


BAD = [
    (["missing.npy", "--labels", "y.npy"], "FEATURES: Expected `source` to be an existing file"),
    (["all.npz"], "--features-key: Expected `features_key` to name an array in all.npz, got 'features' (it holds: "),
    (["all.npz", "--features-key", "feats", "--labels-key", "y"], "--labels-key: Expected `labels_key` to name"),
    (["x.npy"], "--labels: Expected `labels` (a labels file"),
    (["x3d.npy", "--labels", "y.npy"], "FEATURES: Expected `source` features to be 2-D (N, d), got shape (1200, 2, 4)"),
    (["x.npy", "--labels", "yshort.npy"], "--labels: Expected `labels` of length 1200 like the features, got 1199"),
    (
        ["x.npy", "--labels", "ybig.npy", "--num-classes", str(K)],
        "--labels: Expected `labels` in [0, 5), got 8 in row 77",
    ),
    (["x.npy", "--labels", "ybig.npy", "--weight", "w.npy"], "--labels: Expected `labels` in [0, 5), got 8 in row 77"),
    (["x.npy", "--labels", "yfloat.npy"], "--labels: Expected `labels` to be integers, got torch.float64"),
    (["xnan.npy", "--labels", "y.npy"], "FEATURES: Expected finite `source` features, got NaN or Inf in row 1000"),
    (["x.npy", "--labels", "y.npy", "--weight", "w_bad.npy"], "--weight: Expected `weight` of shape (K, 8)"),
    (
        ["x.npy", "--labels", "y.npy", "--weight", "w.npy", "--num-classes", "7"],
        "--weight: Expected `weight` of shape (7, 8)",
    ),
    (["x.npy", "--labels", "y.npy", "--weight", "w.npy:nope"], "--weight: Expected `weight` without :key for w.npy"),
    (
        ["x.npy", "--labels", "y.npy", "--checkpoint", "ck.pt", "--classifier", "head"],
        "--classifier: Expected `classifier` to name a module of ck.pt",
    ),
    (
        ["x.npy", "--labels", "y.npy", "--checkpoint", "ck.pt"],
        "--checkpoint: expected --checkpoint FILE and --classifier",
    ),
    (["x.npy", "--labels", "y.npy", "--chunk-rows", "0"], "--chunk-rows: expected an int >= 1"),
    (["x.npy", "--labels", "y.npy", "--report", "x.npy"], "--report: expected a directory"),
]


@pytest.mark.parametrize("argv, message", BAD)
def test_bad_input_is_one_line_exit_2_no_files(bad, capsys, argv, message):
    before = sorted(os.listdir(bad))
    assert run_main(["analyze", *argv, "--json", "out.json", "--report", "rep"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith(f"collapse-ext analyze: error: {message}"), err
    assert sorted(os.listdir(bad)) == before


def test_bad_input_from_a_real_process_has_no_traceback(bad):
    proc = subprocess.run(
        [sys.executable, "-m", "collapse_ext.cli", "analyze", "all.npz", "--features-key", "nope"],
        capture_output=True, text=True, timeout=120, cwd=bad, env=dict(os.environ, PYTHONPATH=ROOT),
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (
        "collapse-ext analyze: error: --features-key: Expected `features_key` to name an array in all.npz, "
        "got 'nope' (it holds: feats, labels)\n"
    )


def test_two_gloo_processes_give_the_same_json_as_one(files, data):
    # float64 rows: ClassStats sums float32 products of float32 rows, which would make the
    # one- and two-process results differ by float32 rounding (1e-7), not by the merge.
    x, y, _, _ = data
    hidden = 2 * x.double() + torch.randn(N, D, dtype=torch.float64)
    np.savez(files / "all.npz", features=x.double().numpy(), labels=y.numpy(), hidden=hidden.numpy())
    args = [
        "analyze",
        str(files / "all.npz"),
        "--features-key",
        "hidden,features",
        "--checkpoint",
        str(files / "ckpt.pt"),
        "--classifier",
        "fc",
        "--chunk-rows",
        "100",
        "--device",
        "cpu",
        "--quiet",
    ]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "collapse_ext.cli", *args, "--json", str(files / "one.json")],
                         capture_output=True, text=True, timeout=180, env=env)  # fmt: skip
    assert one.returncode == 0, one.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    two = subprocess.run([*torchrun, "-m", "collapse_ext.cli", *args, "--json", str(files / "two.json")],
                         capture_output=True, text=True, timeout=150, env=env)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((files / f"{n}.json").read_text()) for n in ("one", "two"))
    assert a.keys() == b.keys() and a["num_samples"] == b["num_samples"] == N
    for la, lb in zip(a["layers"], b["layers"]):
        _close(la["metrics"], lb["metrics"], 1e-12)
    _close(a["separation_law"], b["separation_law"], 1e-12)
