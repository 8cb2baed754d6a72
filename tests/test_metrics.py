import math

import pytest
import torch
from helpers import collapsed_features, stats_of
from hypothesis import given, settings
from hypothesis import strategies as st

from collapse_ext import ClassStats, collapse_metrics, fit_separation_law, nearest_centre_tallies
from collapse_ext import metrics as M
from collapse_ext.reference import class_stats_reference, nearest_centre_reference, within_scatter_reference


def orthonormal_rows(k, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    return q.T  # (k, d), orthonormal rows


def simplex_etf(k, d, scale=3.0, seed=0):
    """K rows of a simplex ETF (centred, equal norms, cosines -1/(K-1)) rotated into R^d."""
    centring = torch.eye(k, dtype=torch.float64) - 1.0 / k
    basis, _ = torch.linalg.qr(centring[:, : k - 1])  # (K, K-1), orthonormal columns orthogonal to 1
    return scale * math.sqrt(k / (k - 1)) * basis @ orthonormal_rows(k - 1, d, seed)


def random_problem(n=900, d=24, k=7, seed=0, dtype=torch.float32, drop=()):
    g = torch.Generator().manual_seed(seed)
    mu = 4 * torch.randn(k, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (n,), generator=g)
    for c in drop:
        y[y == c] = (c + 1) % k
    x = mu[y] + torch.randn(n, d, generator=g, dtype=torch.float64) * (1 + torch.rand(k, 1, generator=g))[y]
    return x.to(dtype), y


def dense_reference(x, y, k, weight=None):
    """Every metric the naive way, in float64, with d x d and K x K matrices."""
    x = x.double()
    counts, means, sqdev = class_stats_reference(x, y, k)
    present = counts > 0
    kp, n = int(present.sum()), len(y)
    sigma_w = within_scatter_reference(x, y, means) / n
    mu_g = (counts.double().unsqueeze(1) * means).sum(0) / n
    centred = means[present] - mu_g
    sigma_b = centred.T @ centred / kp
    pw = counts[present].double() / n
    sigma_b_sample = (centred * pw.unsqueeze(1)).T @ centred
    out = {
        "nc1": torch.trace(sigma_w @ torch.linalg.pinv(sigma_b, hermitian=True)).item() / kp,
        "separation_fuzziness": torch.trace(sigma_w @ torch.linalg.pinv(sigma_b_sample, hermitian=True)).item(),
        "nc1_quotient": (torch.trace(sigma_w) / torch.trace(sigma_b)).item(),
    }
    var = (sqdev / counts.clamp_min(1))[present]
    j, l = torch.triu_indices(kp, kp, 1)
    dist = (centred[j] - centred[l]).square().sum(1)
    out["nc1_cdnv"] = ((var[j] + var[l]) / (2 * dist)).mean().item()

    def nc2(a, suffix):
        norms = a.norm(dim=1)
        out[f"equinorm_{suffix}"] = (norms.std(correction=0) / norms.mean()).item()
        cos = (a @ a.T / torch.outer(norms, norms))[j, l]
        out[f"equiangularity_{suffix}"] = cos.std(correction=0).item()
        out[f"mean_cosine_{suffix}"] = cos.mean().item()
        out[f"max_angle_{suffix}"] = (cos + 1 / (kp - 1)).abs().mean().item()
        gram = a @ a.T
        target = (torch.eye(kp, dtype=torch.float64) - 1 / kp) / math.sqrt(kp - 1)
        out[f"etf_error_{suffix}"] = (gram / gram.norm() - target).norm().item()
        u = a / norms.unsqueeze(1)
        logk = -torch.log((u[j] - u[l]).norm(dim=1))
        out[f"gnc2_{suffix}"] = logk.mean().item()
        out[f"gnc2_var_{suffix}"] = logk.var(correction=0).item()

    nc2(centred, "means")
    gram = means[present] @ means[present].T
    out["orthogonal_frame_error_means"] = ((gram - torch.diag(gram.diagonal())).norm() / gram.norm()).item()
    if weight is not None:
        w = weight.double()[present]
        nc2(w, "weights")
        out["self_duality"] = (w / w.norm() - centred / centred.norm()).square().sum().item()
        cos = (w * centred).sum(1) / (w.norm(dim=1) * centred.norm(dim=1))
        out["uniform_duality"] = (cos.std(correction=0) / cos.mean()).item()
        gram = w @ w.T
        out["orthogonal_frame_error_weights"] = ((gram - torch.diag(gram.diagonal())).norm() / gram.norm()).item()
    return out


# ------------------------------------------------------------------ known geometries
@pytest.mark.parametrize("k,d", [(2, 2), (4, 3), (10, 16), (30, 64)])
def test_simplex_etf_is_exact(k, d):
    etf = simplex_etf(k, d)
    assert M.equinorm(etf) <= 1e-6
    assert M.equiangularity(etf) <= 1e-6
    assert M.max_angle(etf) <= 1e-6
    assert M.etf_error(etf) <= 1e-6
    assert M.mean_cosine(etf) == pytest.approx(-1 / (k - 1), abs=1e-6)


def test_collapsed_features_on_an_etf():
    k, d = 8, 20
    mu = simplex_etf(k, d) + 5.0  # a common offset: the centred means are the ETF
    y = torch.arange(160) % k
    x = mu[y]
    stats = stats_of(x, y, k)
    weight = stats.centred_means().clone()
    bias = -weight @ stats.global_mean()  # logits W (h - mu_G): the classifier of the centred means
    r = collapse_metrics(stats, weight, bias, features=x, labels=y)
    for name in ("nc1", "nc1_cdnv", "nc1_quotient", "separation_fuzziness", "self_duality", "ncc_mismatch"):
        assert abs(getattr(r, name)) <= 1e-6, name
    for name in ("equinorm", "equiangularity", "max_angle", "etf_error"):
        assert getattr(r, f"{name}_means") <= 1e-6 and getattr(r, f"{name}_weights") <= 1e-6, name
    assert r.mean_cosine_means == pytest.approx(-1 / (k - 1), abs=1e-9)
    assert r.uniform_duality == pytest.approx(0, abs=1e-6)
    assert r.ncc_accuracy == 1.0 and r.absent_classes == [] and r.undefined.get("nc1") is None


def test_orthogonal_frame_with_unequal_lengths():
    lengths = torch.tensor([5.0, 4.0, 2.5, 1.0, 0.5], dtype=torch.float64)
    frame = lengths.unsqueeze(1) * orthonormal_rows(5, 9, seed=3)
    assert M.orthogonal_frame_error(frame) <= 1e-6
    y = torch.cat([torch.full((n,), c) for c, n in enumerate([50, 40, 25, 10, 5])])
    stats = stats_of(frame[y], y, 5)
    r = collapse_metrics(stats, 2 * frame)
    assert r.orthogonal_frame_error_means <= 1e-6 and r.orthogonal_frame_error_weights <= 1e-6
    assert M.orthogonal_frame_error(simplex_etf(5, 9)) > 0.3


def test_separation_law_exact():
    fit = fit_separation_law([3 * 0.5**l for l in range(8)])
    assert fit.rho == pytest.approx(0.5, abs=1e-12)
    assert fit.pearson == pytest.approx(-1.0, abs=1e-12) and fit.r2 == pytest.approx(1.0, abs=1e-12)
    assert math.exp(fit.intercept) == pytest.approx(3.0)
    noisy = fit_separation_law(torch.tensor([1.0, 0.7, 0.3, 0.25, 0.08]))
    assert 0 < noisy.rho < 1 and 0.8 < noisy.r2 < 1 and -1 < noisy.pearson < -0.9


def test_separation_law_messages():
    with pytest.raises(ValueError, match="Expected `values` to be positive finite numbers"):
        fit_separation_law([1.0, 0.0, 0.5])
    with pytest.raises(ValueError, match="Expected `values` to hold at least 2 layers"):
        fit_separation_law([1.0])
    with pytest.raises(ValueError, match="Expected `layers` of length 3"):
        fit_separation_law([1.0, 0.5, 0.2], layers=[0, 1])


# ------------------------------------------------------------- against the reference
@pytest.mark.parametrize("drop", [(), (2, 5)])
def test_bundle_matches_dense_reference(drop):
    x, y = random_problem(drop=drop)
    weight = torch.randn(7, 24, generator=torch.Generator().manual_seed(9)) + 0.5
    stats = stats_of(x, y, 7, batches=3)
    r = collapse_metrics(stats, weight)
    expected = dense_reference(x, y, 7, weight)
    for name, value in expected.items():
        got = getattr(r, name)
        assert got == pytest.approx(value, rel=1e-5, abs=1e-9), name
    assert r.absent_classes == list(drop)


def test_nc1_rank_tolerance_k_greater_than_d():
    # K' = 12 classes in d = 5: Sigma_B has full rank d; the SVD route still agrees.
    x, y = random_problem(n=1200, d=5, k=12, seed=4)
    stats = stats_of(x, y, 12)
    expected = dense_reference(x, y, 12)
    assert M.nc1(stats) == pytest.approx(expected["nc1"], rel=1e-5)
    assert M.separation_fuzziness(stats) == pytest.approx(expected["separation_fuzziness"], rel=1e-5)


def test_projected_nc1_equals_full():
    x, y = random_problem(n=1500, d=40, k=9, seed=5)
    stats = stats_of(x, y, 9)
    full = M.nc1(stats, mode="full")
    assert M.nc1(stats, features=x, labels=y, mode="projected") == pytest.approx(full, rel=1e-6)
    batches = (list(x.split(400)), list(y.split(400)))
    assert M.nc1(stats, features=batches[0], labels=batches[1], mode="projected") == pytest.approx(full, rel=1e-6)
    sep = M.separation_fuzziness(stats, features=x, labels=y, mode="projected")
    assert sep == pytest.approx(M.separation_fuzziness(stats), rel=1e-6)


def test_projected_nc1_without_a_d_by_d_matrix():
    # d = 16384: S_W would be 2 GiB in float64; the projected mode needs only V^T S_W V.
    k, d = 4, 16384
    g = torch.Generator().manual_seed(6)
    mu = torch.randn(k, d, generator=g)
    y = torch.arange(200) % k
    x = mu[y] + 0.3 * torch.randn(200, d, generator=g)
    stats = stats_of(x, y, k, within_cov=False)
    got = M.nc1(stats, features=x, labels=y)
    centred_x = x.double() - stats.means[y]
    cm = stats.centred_means()
    _, s, vh = torch.linalg.svd(cm, full_matrices=False)
    keep = s > s[0] * 1e-10
    q = (centred_x @ vh[keep].T).square().sum(0) / len(y)
    assert got == pytest.approx((q / s[keep].square()).sum().item(), rel=1e-6)
    r = collapse_metrics(stats)
    assert r.nc1 is None and "within_cov=True" in r.undefined["nc1"]


def test_cdnv_exponent():
    x, y = random_problem(seed=7)
    stats = stats_of(x, y, 7)
    _, means, sqdev = class_stats_reference(x.double(), y, 7)
    counts = torch.bincount(y, minlength=7)
    var = sqdev / counts
    j, l = torch.triu_indices(7, 7, 1)
    dist = (means[j] - means[l]).square().sum(1)
    expected = ((var[j] + var[l]) / (2 * dist**2)).mean().item()
    assert M.nc1_cdnv(stats, exponent=2) == pytest.approx(expected, rel=1e-6)


def test_gnc2_riesz_and_k_greater_than_d():
    g = torch.Generator().manual_seed(8)
    a = torch.randn(50, 3, generator=g, dtype=torch.float64)  # K > d + 1: no simplex ETF
    u = a / a.norm(dim=1, keepdim=True)
    j, l = torch.triu_indices(50, 50, 1)
    dist = (u[j] - u[l]).norm(dim=1)
    got = M.gnc2(a, kernel="riesz", s=2.0)
    assert got.mean == pytest.approx(dist.pow(-2).mean().item(), rel=1e-9)
    assert got.var == pytest.approx(dist.pow(-2).var(correction=0).item(), rel=1e-9)
    assert M.gnc2(a).mean == pytest.approx((-dist.log()).mean().item(), rel=1e-9)


# ------------------------------------------------------------------------------- NC4
def test_nearest_centre_tallies_match_reference():
    x, y = random_problem(n=3000, d=16, k=6, seed=10, drop=(4,))
    stats = stats_of(x, y, 6)
    g = torch.Generator().manual_seed(11)
    weight, bias = torch.randn(6, 16, generator=g), torch.randn(6, generator=g)
    got = nearest_centre_tallies(x, y, stats.means, weight, bias, present=stats.present)
    expected, _ = nearest_centre_reference(x, y, stats.means, weight, bias, stats.present)
    assert got.dtype == torch.int64 and torch.equal(got, expected)
    # Sums over batches, and without weight the mismatch count is 0.
    parts = sum(
        nearest_centre_tallies(xb, yb, stats.means, present=stats.present) for xb, yb in zip(x.split(700), y.split(700))
    )
    assert parts.tolist() == [expected[0].item(), expected[1].item(), 0]


def test_nearest_centre_tallies_on_large_offsets():
    # Centres 1e-3 apart relative to a 1e4 offset: the Gram identity without a common
    # shift would lose them in float64 already for fp32 storage.
    x, y = collapsed_features(2000, 32, 10, noise=1e-3, offset=1e4)
    stats = stats_of(x, y, 10)
    got = nearest_centre_tallies(x, y, stats.means)
    expected, _ = nearest_centre_reference(x, y, stats.means)
    assert torch.equal(got, expected) and got[1].item() == 2000


def test_nearest_centre_tallies_compile_without_graph_breaks():
    x, y = random_problem(n=200, d=8, k=4, seed=12)
    means = class_stats_reference(x, y, 4)[1]
    weight = torch.randn(4, 8)
    f = torch.compile(nearest_centre_tallies, fullgraph=True, backend="eager")
    # check_finite=False: the NaN check is a host synchronisation (a data-dependent branch).
    assert torch.equal(f(x, y, means, weight, check_finite=False), nearest_centre_reference(x, y, means, weight)[0])


def test_bundle_uses_given_ncc_tallies():
    x, y = random_problem(seed=13)
    stats = stats_of(x, y, 7)
    r = collapse_metrics(stats, torch.randn(7, 24), ncc_tallies=torch.tensor([100, 90, 7]))
    assert r.ncc_accuracy == pytest.approx(0.9) and r.ncc_mismatch == pytest.approx(0.07)
    assert "precomputed" in r.ncc_means
    r = collapse_metrics(stats)
    assert r.ncc_accuracy is None and "ncc_tallies" in r.undefined["ncc_accuracy"]


def test_former_ncc_counts_names_still_work_with_a_deprecation_warning():
    x, y = random_problem(n=300, d=24, k=7, seed=13)
    stats = stats_of(x, y, 7)
    with pytest.warns(DeprecationWarning, match="nearest_centre_tallies"):
        old = M.nearest_centre_counts(x, y, stats.means, present=stats.present)
    assert torch.equal(old, nearest_centre_tallies(x, y, stats.means, present=stats.present))
    with pytest.warns(DeprecationWarning, match="ncc_tallies"):
        r = collapse_metrics(stats, torch.randn(7, 24), ncc_counts=torch.tensor([100, 90, 7]))
    assert r.ncc_accuracy == pytest.approx(0.9) and r.ncc_mismatch == pytest.approx(0.07)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="got both"):
        collapse_metrics(stats, ncc_counts=torch.tensor([1, 1, 0]), ncc_tallies=torch.tensor([1, 1, 0]))


# -------------------------------------------------------------------- minority collapse
def test_minority_collapse_aligned_and_vanishing_rows():
    counts = [100, 100, 100, 10, 10, 10]
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    g = torch.Generator().manual_seed(14)
    mu = torch.randn(6, 12, generator=g, dtype=torch.float64)
    stats = stats_of(mu[y] + 0.1 * torch.randn(len(y), 12, generator=g, dtype=torch.float64), y, 6)
    weight = torch.randn(6, 12, generator=g, dtype=torch.float64)
    weight[3:] = weight[3]  # minority rows identical: cosines 1, spread 0
    r = collapse_metrics(stats, weight)
    assert r.minority_classes == [3, 4, 5]
    assert r.minority_cos_mean == pytest.approx(1.0) and r.minority_cos_std <= 1e-6
    assert r.minority_spread == pytest.approx(0.0, abs=1e-12)
    norms = weight.norm(dim=1)
    assert r.norm_ratio == pytest.approx((norms[3:].mean() / norms[:3].mean()).item())
    weight[3:] = 0  # rows that shrink to zero: no cosine, but the norm ratio says it
    r = collapse_metrics(stats, weight, minority=[3, 4, 5])
    assert r.minority_cos_mean is None and "zero" in r.undefined["minority_cos_mean"]
    assert r.norm_ratio == 0.0
    mc = M.minority_collapse(stats, weight, minority=torch.tensor([4, 5]))
    assert mc.minority == [4, 5] and mc.minority_spread == 0.0


def test_minority_needs_a_minority_and_a_majority():
    x, y = random_problem(seed=15)
    r = collapse_metrics(stats_of(x, y, 7), minority_threshold=0.01)
    assert r.minority_classes == [] and "no minority classes" in r.undefined["norm_ratio"]
    r = collapse_metrics(stats_of(x, y, 7), minority=list(range(7)))
    assert r.norm_ratio is None and "no majority" in r.undefined["norm_ratio"]
    with pytest.raises(ValueError, match=r"Expected `minority` to be class indices in \[0, 7\)"):
        collapse_metrics(stats_of(x, y, 7), minority=[9])


# ----------------------------------------------------------------- undefined / report
def test_one_class_is_undefined_not_nan():
    x = torch.randn(30, 5)
    y = torch.full((30,), 2)
    r = collapse_metrics(stats_of(x, y, 4), torch.randn(4, 5))
    assert r.absent_classes == [0, 1, 3] and r.num_present == 1
    for name in ("nc1", "nc1_cdnv", "nc1_quotient", "equiangularity_means", "etf_error_weights", "uniform_duality"):
        assert getattr(r, name) is None and r.undefined[name], name
    assert "at least 2" in r.undefined["nc1"]
    values = r.to_dict()
    assert all(v is None or math.isfinite(v) for v in values.values())
    with pytest.raises(M.UndefinedMetricError, match="at least 2 present classes"):
        M.nc1(stats_of(x, y, 4))


def test_coinciding_means_are_explained():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1, 2])
    r = collapse_metrics(stats_of(x, y, 3))
    assert r.nc1_cdnv is None and "coincide" in r.undefined["nc1_cdnv"]
    assert r.gnc2_means is None and "same direction" in r.undefined["gnc2_means"]


def test_to_dict_and_str():
    x, y = random_problem(seed=16, drop=(1,))
    r = collapse_metrics(stats_of(x, y, 7), torch.randn(7, 24), features=x, labels=y)
    d = r.to_dict()
    assert set(d) >= {"nc1", "nc1_cdnv", "etf_error_weights", "ncc_mismatch", "minority_spread"}
    assert all(v is None or isinstance(v, float) for v in d.values())
    text = str(r)
    assert "nc1_cdnv" in text and "absent classes: [1]" in text and "current class means" in text


def test_bad_inputs():
    x, y = random_problem(seed=17)
    stats = stats_of(x, y, 7)
    with pytest.raises(TypeError, match="Expected `stats` to be a ClassStats, got Tensor"):
        collapse_metrics(x)
    with pytest.raises(ValueError, match=r"Expected `weight` of shape \(K, d\) = \(7, 24\), got \(7, 23\)"):
        collapse_metrics(stats, torch.zeros(7, 23))
    with pytest.raises(ValueError, match=r"Expected `bias` of shape \(K,\) = \(7,\), got \(6,\)"):
        collapse_metrics(stats, torch.zeros(7, 24), torch.zeros(6))
    with pytest.raises(ValueError, match="Expected `features` and `labels` together"):
        collapse_metrics(stats, features=x)
    with pytest.raises(ValueError, match="Expected `exponent` to be a positive finite number"):
        M.nc1_cdnv(stats, exponent=0)
    with pytest.raises(ValueError, match="Expected `kernel` to be one of"):
        M.gnc2(torch.randn(3, 2), kernel="gauss")
    with pytest.raises(ValueError, match=r"Expected `rows` to be a 2-D \(K, d\) tensor"):
        M.equinorm(torch.randn(3))
    with pytest.raises(ValueError, match="Expected `mode` to be one of"):
        M.nc1(stats, mode="fast")


# ------------------------------------------------------------------------- invariances
def _nc1_of(x, y, k):
    return M.nc1(stats_of(x, y, k))


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    scale=st.floats(1e-3, 1e3),
    k=st.integers(2, 6),
)
def test_nc1_invariant_to_scale_rotation_relabelling(seed, scale, k):
    x, y = random_problem(n=240, d=8, k=k, seed=seed, dtype=torch.float64)
    base = _nc1_of(x, y, k)
    assert _nc1_of(scale * x, y, k) == pytest.approx(base, rel=1e-8)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    assert _nc1_of(x @ q, y, k) == pytest.approx(base, rel=1e-8)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed + 1))
    assert _nc1_of(x, perm[y], k) == pytest.approx(base, rel=1e-8)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), batches=st.integers(2, 9))
def test_metrics_independent_of_batching(seed, batches):
    x, y = random_problem(n=300, d=10, k=5, seed=seed, dtype=torch.float64)
    weight = torch.randn(5, 10, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    one = collapse_metrics(stats_of(x, y, 5), weight).to_dict()
    many = collapse_metrics(stats_of(x, y, 5, batches=batches), weight).to_dict()
    for name, value in one.items():
        if value is None:
            assert many[name] is None, name
        else:
            assert many[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name


def test_empty_statistics_are_all_explained():
    stats = ClassStats(5, 3)
    r = collapse_metrics(stats, torch.randn(5, 3), features=torch.zeros(0, 3), labels=torch.zeros(0, dtype=torch.long))
    assert r.num_present == 0 and r.absent_classes == [0, 1, 2, 3, 4]
    assert all(v is None for k, v in r.to_dict().items() if k not in ("num_samples", "num_present"))
    assert "no samples" in r.undefined["ncc_accuracy"] and "got 0" in r.undefined["nc1"]


@pytest.mark.parametrize("dtype,weight_dtype", [(torch.bfloat16, torch.float16), (torch.float16, torch.float32)])
def test_low_precision_inputs(dtype, weight_dtype):
    x, y = random_problem(n=400, d=8, k=4, seed=18)
    weight = torch.randn(4, 8, generator=torch.Generator().manual_seed(19))
    low = x.to(dtype)
    r = collapse_metrics(stats_of(low, y, 4), weight.to(weight_dtype), features=low, labels=y)
    expected = dense_reference(low.double(), y, 4, weight.to(weight_dtype).double())
    for name in ("nc1", "separation_fuzziness", "nc1_cdnv", "etf_error_means", "self_duality"):
        assert getattr(r, name) == pytest.approx(expected[name], rel=1e-5), name
    counts, _ = nearest_centre_reference(low, y, stats_of(low, y, 4).means, weight.to(weight_dtype))
    assert r.ncc_mismatch == pytest.approx(counts[2].item() / 400)


@pytest.mark.parametrize("rtol", [float("nan"), float("inf"), 2.0, 1.0, -0.1, True, "1e-3", torch.tensor(0.1)])
def test_rank_tolerance_is_validated(rtol):
    x, y = random_problem(seed=20)
    stats = stats_of(x, y, 7)
    for fn in (M.nc1, M.separation_fuzziness, collapse_metrics):
        with pytest.raises(ValueError, match=r"Expected `rtol` to be None or a finite number in \[0, 1\)"):
            fn(stats, rtol=rtol)


def test_rank_tolerance_accepts_real_numbers():
    np = pytest.importorskip("numpy")
    x, y = random_problem(seed=20)
    stats = stats_of(x, y, 7)
    base = M.nc1(stats)
    for rtol in (0, 0.0, 1e-12, np.float64(1e-12), np.float32(1e-12)):
        assert M.nc1(stats, rtol=rtol) == pytest.approx(base, rel=1e-12)
    # A tolerance that drops directions is honoured (fewer 1/s^2 terms, smaller NC1).
    assert M.nc1(stats, rtol=0.99) < base


def test_parameters_that_require_grad_are_detached():
    # nn.Parameter weights used to fail with "mm(): functions with out=... don't support
    # automatic differentiation"; metrics never take part in autograd.
    x, y = random_problem(n=300, d=24, k=7, seed=21)
    stats = stats_of(x, y, 7)
    lin = torch.nn.Linear(24, 7)
    feats = x.clone().requires_grad_()
    expected = collapse_metrics(stats, lin.weight.detach(), lin.bias.detach(), features=x, labels=y).to_dict()
    got = collapse_metrics(stats, lin.weight, lin.bias, features=feats, labels=y).to_dict()
    assert got == expected
    projected = stats_of(x, y, 7, within_cov=False)
    r = collapse_metrics(projected, lin.weight, lin.bias, features=[feats], labels=[y])
    assert r.nc1 == pytest.approx(expected["nc1"], rel=1e-6)
    for fn in (M.equinorm, M.mean_cosine, M.equiangularity, M.max_angle, M.etf_error, M.orthogonal_frame_error):
        assert fn(lin.weight) == fn(lin.weight.detach()), fn.__name__
    assert M.gnc2(lin.weight) == M.gnc2(lin.weight.detach())
    centred = stats.centred_means()
    assert M.self_duality(lin.weight, centred) == M.self_duality(lin.weight.detach(), centred)
    assert M.minority_collapse(stats, lin.weight, minority=[0, 1]).minority_spread is not None
    counts = nearest_centre_tallies(feats, y, stats.means, lin.weight, lin.bias)
    assert not counts.requires_grad and counts[0].item() == 300
    assert M.nc1(stats, features=feats, labels=y, mode="projected") == pytest.approx(expected["nc1"], rel=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_feature_rows_are_named(bad):
    # NaN rows used to be skipped silently by nearest_centre_tallies.
    x, y = random_problem(n=300, d=24, k=7, seed=22)
    stats = stats_of(x, y, 7)
    xb = x.clone()
    xb[237, 5] = bad
    match = "Expected finite `features`, got NaN or Inf in row 237"
    with pytest.raises(ValueError, match=match):
        nearest_centre_tallies(xb, y, stats.means, present=stats.present)
    with pytest.raises(ValueError, match=match):
        collapse_metrics(stats, features=list(xb.split(100)), labels=list(y.split(100)))
    with pytest.raises(ValueError, match=match):
        M.nc1(stats_of(x, y, 7, within_cov=False), features=xb, labels=y)
    # Opting out keeps the op's behaviour (a NaN row is left out) and needs no host sync.
    counts = nearest_centre_tallies(xb, y, stats.means, present=stats.present, check_finite=False)
    assert counts[0].item() == (299 if math.isnan(bad) else 300)


def test_feature_batches_are_checked():
    x, y = random_problem(n=100, d=24, k=7, seed=23)
    stats = stats_of(x, y, 7)
    with pytest.raises(ValueError, match=r"Expected `labels` to be a \(100,\) int32/int64 tensor"):
        collapse_metrics(stats, features=x, labels=y.float())
    with pytest.raises(ValueError, match=r"Expected `features` to be a 2-D \(N, d\) floating tensor"):
        nearest_centre_tallies(x.long(), y, stats.means)
    with pytest.raises(TypeError, match="Expected `labels` to be a torch.Tensor, got list"):
        nearest_centre_tallies(x, y.tolist(), stats.means)
    # Generators are iterated once: both the projected NC1 and the NC4 pass see the data.
    plain = stats_of(x, y, 7, within_cov=False)
    r = collapse_metrics(plain, features=(b for b in x.split(30)), labels=(b for b in y.split(30)))
    assert r.nc1 == pytest.approx(M.nc1(stats), rel=1e-6) and r.ncc_accuracy is not None


@pytest.mark.parametrize(
    "tallies",
    [
        torch.tensor([10, 11, 0]),
        torch.tensor([10, 1, 11]),
        torch.tensor([-1, 0, 0]),
        torch.tensor([10, -1, 0]),
        torch.tensor([10.0, 1.0, 0.0]),
        torch.tensor([True, True, False]),
        torch.tensor([10, 1]),
        [10, 1, 0],
    ],
)
def test_ncc_tallies_are_validated(tallies):
    x, y = random_problem(n=100, d=24, k=7, seed=24)
    stats = stats_of(x, y, 7)
    with pytest.raises(ValueError, match=r"Expected `ncc_tallies` to be a \(3,\) integer tensor \[n, ncc_correct"):
        collapse_metrics(stats, torch.randn(7, 24), ncc_tallies=tallies)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match=r"Expected `ncc_counts` to be a \(3,"):
        collapse_metrics(stats, torch.randn(7, 24), ncc_counts=tallies)
    with pytest.raises(ValueError, match=r"Expected `tallies` to be a \(3,\) integer tensor"):
        M.ncc_accuracy(tallies)
    assert collapse_metrics(stats, ncc_tallies=torch.tensor([10, 10, 10], dtype=torch.int32)).ncc_accuracy == 1.0


def test_numpy_integers_are_class_indices():
    np = pytest.importorskip("numpy")
    x, y = random_problem(seed=25)
    stats = stats_of(x, y, 7)
    weight = torch.randn(7, 24)
    assert M.minority_collapse(stats, weight, minority=[np.int64(3), 4]).minority == [3, 4]
    assert M.minority_collapse(stats, weight, minority=np.array([5, 6])).minority == [5, 6]
    assert collapse_metrics(stats, weight, minority=np.arange(2)).minority_classes == [0, 1]
    assert M.nc1_cdnv(stats, exponent=np.float32(2.0)) == pytest.approx(M.nc1_cdnv(stats, exponent=2.0))
    for bad in ([1.0], [True], np.array([True, False]), torch.tensor([1.0]), 3):
        with pytest.raises(ValueError, match=r"Expected `minority` to be class indices in \[0, 7\)"):
            M.minority_collapse(stats, weight, minority=bad)


def test_non_finite_weights_and_rows_are_refused():
    x, y = random_problem(seed=26)
    stats = stats_of(x, y, 7)
    weight = torch.randn(7, 24)
    weight[2, 3] = float("nan")
    with pytest.raises(ValueError, match="Expected finite `weight`, got NaN or Inf"):
        collapse_metrics(stats, weight)
    with pytest.raises(ValueError, match="Expected finite `weight`, got NaN or Inf"):
        M.minority_collapse(stats, weight, minority=[1, 2])
    with pytest.raises(ValueError, match="Expected finite `rows`, got NaN or Inf"):
        M.etf_error(torch.tensor([[1.0, 0.0], [float("inf"), 1.0]]))
    with pytest.raises(ValueError, match="Expected finite `bias`, got NaN or Inf"):
        collapse_metrics(stats, torch.randn(7, 24), torch.full((7,), float("nan")))
    with pytest.raises(TypeError, match="Expected `bias` to be a floating tensor, got torch.int64"):
        collapse_metrics(stats, torch.randn(7, 24), torch.zeros(7, dtype=torch.long))
