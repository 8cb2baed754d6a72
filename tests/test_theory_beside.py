"""A theory prediction beside the measurement: collapse_metrics(predict=...), theory.Predictor
and CollapseMonitor(predict=...) (collapse_ext/theory/beside.py)."""

import json
import math

import pytest
import torch
from helpers import stats_of

from collapse_ext import CollapseMonitor, collapse_metrics, lpm, theory
from collapse_ext.data import make_mlp
from collapse_ext.metrics.bundle import PREDICTION_FIELDS
from collapse_ext.monitor import PENULTIMATE, MonitorResult


def _rotation(d, seed=0):
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return Q


def _measurement(W, H, counts, offset=0.0, seed=0):
    """Statistics whose centred class means are H (K, d) (rows summing to zero under the
    counts), exactly collapsed features (every sample at its class mean) and classifier W."""
    d = H.shape[1]
    n = torch.as_tensor(counts, dtype=torch.int64)
    y = torch.arange(len(n)).repeat_interleave(n)
    x = H[y] + offset * torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return stats_of(x, y, len(n))


def _pad(X, d):
    return torch.nn.functional.pad(X, (0, d - X.shape[1]))


def _centred(H, counts):
    """H minus its count-weighted mean row (what the statistics' centred means are)."""
    n = torch.as_tensor(counts, dtype=torch.float64)
    return H - (n[:, None] * H).sum(0) / n.sum()


@pytest.mark.parametrize("model", ["lpm-ce", "etf", "seli"])
def test_balanced_collapse_matches_the_simplex_etf(model):
    K, d = 5, 9
    Q = _rotation(d)
    etf = _pad(lpm.simplex_etf(K), d) @ Q
    stats = _measurement(3.0 * etf, 2.0 * etf, [40] * K, offset=7.0)
    r = collapse_metrics(stats, 3.0 * etf, predict=model)
    assert r.prediction == model
    assert r.prediction_E_W == pytest.approx(9.0) and r.prediction_E_H == pytest.approx(4.0)
    for which in ("weights", "means"):
        assert getattr(r, f"predicted_mean_cosine_{which}") == pytest.approx(-1 / (K - 1), abs=1e-7)
        assert getattr(r, f"predicted_equinorm_{which}") < 1e-7
        assert getattr(r, f"predicted_etf_error_{which}") < 1e-6
    assert r.gram_W_distance < 1e-6 and r.gram_H_distance < 1e-6
    assert r.predicted_self_duality < 1e-9 and r.self_duality < 1e-9
    # Equal norms: no correlation; no minority classes: no gap, as for the measurement.
    assert r.norm_corr_W is None and "no correlation" in r.undefined["norm_corr_W"]
    assert r.minority_cos_gap is None and r.predicted_minority_cos_mean is None
    assert r.minority_cos_mean is None and "no minority" in r.undefined["predicted_minority_cos_mean"]
    if model == "lpm-ce":
        assert r.prediction_kkt < 1e-8 and r.prediction_gram_error < 1e-6
        expected = lpm.balanced_prediction(K, 9.0, 4.0)["objective"]
        assert r.prediction_objective == pytest.approx(expected, rel=1e-9)
    else:
        assert r.prediction_kkt is None and "LPM" in r.undefined["prediction_kkt"]


def test_to_dict_writes_the_prediction_only_when_asked():
    K, d = 4, 6
    etf = _pad(lpm.simplex_etf(K), d)
    stats = _measurement(etf, etf, [10] * K)
    plain = collapse_metrics(stats, etf).to_dict()
    assert not set(PREDICTION_FIELDS) & set(plain)
    r = collapse_metrics(stats, etf, predict="etf")
    d_ = r.to_dict()
    assert set(PREDICTION_FIELDS) <= set(d_) and list(d_)[: len(plain)] == list(plain)
    json.dumps(d_)
    assert all(v is None or isinstance(v, float) for v in d_.values())
    assert "prediction: etf" in str(r) and "gram_W_distance" in str(r)


def test_imbalanced_prediction_and_the_minority_cosine_gap():
    """Counts past the Minority Collapse threshold: the LPM's minority rows close up; a
    measurement that kept the ETF has a negative minority-cosine gap, and the LPM optimum
    itself, measured, has distances ~0."""
    K, K_A, R = 6, 3, 50
    counts = [R * 2] * K_A + [2] * (K - K_A)
    d = K + 2
    Q = _rotation(d, seed=1)
    etf = _pad(lpm.simplex_etf(K), d) @ Q
    stats = _measurement(etf, _centred(etf, counts), counts)
    r = collapse_metrics(stats, etf, predict="lpm-ce")
    assert r.minority_classes == [3, 4, 5]
    assert r.minority_cos_mean == pytest.approx(-1 / (K - 1))
    assert r.predicted_minority_cos_mean > 0.5 > r.predicted_majority_cos_mean
    assert r.minority_cos_gap == pytest.approx(r.minority_cos_mean - r.predicted_minority_cos_mean, abs=1e-12)
    assert r.minority_cos_gap < -0.5 and r.predicted_norm_ratio < 1.0
    assert r.gram_W_distance > 0.1

    # The LPM optimum itself, with a common offset: measured as predicted, its budgets
    # recovered (E_H from the centred means: the LPM's means do not sum to zero).
    opt = lpm.solve_large(counts, 1.0, 5.0)
    W, H = _pad(opt.W[0], d) @ Q, _pad(opt.H[0], d) @ Q
    assert float((H - H.mean(0)).square().sum(1).mean()) < 4.9
    p = theory.Predictor("lpm-ce")
    m = collapse_metrics(_measurement(W, H, counts, offset=3.0), W, predict=p)
    assert m.prediction_E_W == pytest.approx(1.0) and m.prediction_E_H == pytest.approx(5.0, rel=1e-5)
    assert abs(m.minority_cos_gap) < 1e-6 and m.gram_W_distance < 1e-5 and m.gram_H_distance < 1e-5
    assert m.norm_corr_W == pytest.approx(1.0, abs=1e-6) and m.norm_corr_H == pytest.approx(1.0, abs=1e-6)
    assert m.predicted_norm_ratio == pytest.approx(m.norm_ratio, rel=1e-5) and p.solves <= 5


def test_seli_measured_as_predicted_with_any_offset_and_scale():
    counts = [40, 20, 10, 5, 2, 1]
    d = 8
    Q = _rotation(d, seed=2)
    W, H = theory.seli(counts)
    W, H = 2.0 * _pad(W, d) @ Q, 0.3 * _pad(H, d) @ Q
    r = collapse_metrics(_measurement(W, H, counts, offset=10.0), W, predict="seli")
    assert r.gram_W_distance < 1e-10 and r.gram_H_distance < 1e-10 and abs(r.minority_cos_gap) < 1e-10
    assert r.norm_corr_W == pytest.approx(1.0) and r.norm_corr_H == pytest.approx(1.0)
    for name in ("mean_cosine_means", "mean_cosine_weights", "etf_error_means", "self_duality", "minority_cos_mean"):
        assert getattr(r, "predicted_" + name) == pytest.approx(getattr(r, name), abs=1e-9), name


def test_predictor_caches_and_warm_starts():
    counts = [50, 20, 10, 5, 2]
    p = theory.Predictor("lpm-ce")
    a = p.geometry(counts, 1.0, 4.0)
    b = p.geometry(counts, 4.0, 1.0)  # same rho = 2: rescaled, not re-solved
    assert p.solves == 1
    torch.testing.assert_close(b.gram_W, 4.0 * a.gram_W)
    torch.testing.assert_close(b.gram_H, a.gram_H / 4.0)
    c = p.geometry(counts, 1.0, 4.4)  # new rho: a warm-started solve
    assert p.solves == 2 and c.info["converged"]
    cold = theory.predict(counts, "lpm-ce", E_W=1.0, E_H=4.4)
    scale = float(cold.gram_W.diagonal().max())
    assert float((c.gram_W - cold.gram_W).abs().max()) / scale < 1e-6
    small = theory.Predictor("lpm-ce", cache_size=1)
    for e in (1.0, 2.0, 1.0):
        small.geometry(counts, 1.0, e)
    assert small.solves == 3


def test_predict_bad_input_and_missing_weight():
    K, d = 4, 6
    etf = _pad(lpm.simplex_etf(K), d)
    stats = _measurement(etf, etf, [10] * K)
    with pytest.raises(ValueError, match="`model`"):
        collapse_metrics(stats, etf, predict="svm")
    with pytest.raises(TypeError, match="`predict`"):
        collapse_metrics(stats, etf, predict=3)
    with pytest.raises(ValueError, match="lambda_W"):
        theory.Predictor("ufm-mse")
    with pytest.raises(ValueError, match="measured mean squared norms"):
        theory.Predictor("lpm-ce", E_W=2.0)
    r = collapse_metrics(stats, predict="lpm-ce")
    assert r.prediction == "lpm-ce" and r.gram_W_distance is None
    assert all("needs the classifier `weight`" in r.undefined[name] for name in PREDICTION_FIELDS)
    ufm = collapse_metrics(stats, etf, predict=theory.Predictor("ufm-mse", lambda_W=1e-3, lambda_H=1e-3))
    assert ufm.prediction == "ufm-mse" and ufm.predicted_mean_cosine_weights == pytest.approx(0.0, abs=1e-12)


def test_monitor_reports_the_prediction_for_the_penultimate_layer():
    K, d, n = 4, 12, 160
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % K
    x = 3 * torch.randn(K, d, generator=g)[y] + 0.3 * torch.randn(n, d, generator=g)
    torch.manual_seed(0)
    model = make_mlp(d, (16, 8), K).eval()
    mon = CollapseMonitor(model, classifier="fc", num_classes=K, layers=["block1"], predict="lpm-ce")
    batches = [(x[i : i + 40], y[i : i + 40]) for i in range(0, n, 40)]
    results = []
    for _ in range(2):
        with torch.no_grad():
            for xb, yb in batches:
                model(xb)
                mon.update(yb)
        results.append(mon.compute())
    results.append(mon.evaluate(batches))
    for r in results:
        pen = r[PENULTIMATE]
        assert pen.prediction == "lpm-ce" and pen.gram_W_distance is not None and pen.prediction_kkt < 1e-8
        assert r["block1"].prediction is None and "gram_W_distance" not in r["block1"].to_dict()
    # The model does not change: every measurement has the same counts and budgets.
    assert mon.predictor.solves == 1
    assert "vs lpm-ce: dG(W)" in results[0].summary()
    back = MonitorResult.from_dict(json.loads(json.dumps(results[-1].to_dict())))
    assert back.to_dict() == results[-1].to_dict() and back[PENULTIMATE].prediction == "lpm-ce"
    assert math.isclose(back[PENULTIMATE].gram_H_distance, results[-1][PENULTIMATE].gram_H_distance)
    with pytest.raises(TypeError, match="`predict`"):
        CollapseMonitor(model, classifier="fc", num_classes=K, predict=1.0)
