"""Invariances of the NC metrics (SPEC "Metrics": every NC metric is invariant under a
common translation of the features, tested with offsets up to 1e4 x the between-class
spread), and of the whole bundle under sample order, scale and rotation."""

import pytest
import torch
from helpers import stats_of
from hypothesis import given, settings
from hypothesis import strategies as st

from collapse_ext import collapse_metrics
from collapse_ext import metrics as M


def offset_problem(k=10, d=64, n=4000, seed=0):
    """Class means with between-class spread 1 (RMS norm of the centred means), within-class
    noise 0.5 / sqrt(d) per coordinate, and a unit direction for the common offset."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(k, d, generator=g, dtype=torch.float64)
    mu = mu - mu.mean(0)
    mu = mu / mu.square().sum(1).mean().sqrt()
    y = torch.arange(n) % k
    x = mu[y] + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64) / d**0.5
    direction = torch.ones(d, dtype=torch.float64) / d**0.5
    return x, y, direction


@pytest.mark.parametrize("batches", [1, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("offset", [0.0, 1.0, 1e2, 3e2, 1e3, 1e4])
def test_nc1_and_fuzziness_are_translation_invariant(offset, dtype, batches):
    k = 10
    x, y, direction = offset_problem(k=k)
    shift = offset * direction  # |shift| = offset x the between-class spread
    shifted = (x + shift).to(dtype)
    # The truth for exactly these (rounded) features, computed without the offset.
    plain = stats_of(shifted.double() - shift, y, k)
    expected_nc1, expected_sep = M.nc1(plain), M.separation_fuzziness(plain)
    assert 0.01 < expected_nc1 < 1

    stats = stats_of(shifted, y, k, batches=batches)
    assert M.nc1(stats, mode="full") == pytest.approx(expected_nc1, rel=1e-5)
    assert M.separation_fuzziness(stats, mode="full") == pytest.approx(expected_sep, rel=1e-5)
    feats, labs = list(shifted.tensor_split(batches)), list(y.tensor_split(batches))
    projected = M.nc1(stats, features=feats, labels=labs, mode="projected")
    assert projected == pytest.approx(expected_nc1, rel=1e-5)
    sep = M.separation_fuzziness(stats, features=feats, labels=labs, mode="projected")
    assert sep == pytest.approx(expected_sep, rel=1e-5)
    bundle = collapse_metrics(stats)
    assert bundle.nc1 == pytest.approx(expected_nc1, rel=1e-5)
    assert bundle.separation_fuzziness == pytest.approx(expected_sep, rel=1e-5)


def test_nc1_uses_at_most_k_minus_one_directions_whatever_rtol():
    x, y, direction = offset_problem(k=4, d=8, n=400, seed=1)
    stats = stats_of(x + 1e4 * direction, y, 4)
    expected = M.nc1(stats_of(x, y, 4))
    # rtol = 0 keeps every nonzero singular value: the cap alone must hold.
    assert M.nc1(stats, rtol=0.0) == pytest.approx(expected, rel=1e-6)
    assert M.separation_fuzziness(stats, rtol=0.0) == pytest.approx(M.separation_fuzziness(stats_of(x, y, 4)), rel=1e-6)


# ----------------------------------------------------------------- the whole bundle
def _problem(seed, k, d, n=120):
    g = torch.Generator().manual_seed(seed)
    mu = 3 * torch.randn(k, d, generator=g, dtype=torch.float64)
    y = torch.arange(n) % k
    y = y[torch.randperm(n, generator=g)]
    x = mu[y] + torch.randn(n, d, generator=g, dtype=torch.float64)
    weight = torch.randn(k, d, generator=g, dtype=torch.float64)
    bias = torch.randn(k, generator=g, dtype=torch.float64)
    return x, y, weight, bias, g


def _bundle(x, y, k, weight, bias, batches=1):
    stats = stats_of(x, y, k, batches=batches)
    feats, labs = list(x.tensor_split(batches)), list(y.tensor_split(batches))
    return collapse_metrics(stats, weight, bias, features=feats, labels=labs).to_dict()


def _assert_same(got, expected, skip=(), rel=1e-6):
    # abs 1e-7: etf_error is sqrt(2 - 2x), so a zero value is only known to ~sqrt(eps).
    assert set(got) == set(expected)
    for name, value in expected.items():
        if name in skip:
            continue
        if value is None:
            assert got[name] is None, name
        else:
            assert got[name] == pytest.approx(value, rel=rel, abs=1e-7), name


SMALL = dict(seed=st.integers(0, 10_000), k=st.integers(2, 6), d=st.integers(3, 8))


@settings(max_examples=20, deadline=None)
@given(**SMALL, exponent=st.integers(-2, 4))
def test_bundle_is_translation_invariant(seed, k, d, exponent):
    x, y, weight, bias, g = _problem(seed, k, d)
    base = _bundle(x, y, k, weight, bias)
    spread = (x.mean(0) - x[y == 0].mean(0)).norm().item() + 1.0
    shift = 10.0**exponent * spread * torch.randn(d, generator=g, dtype=torch.float64)
    # The classifier follows the features (bias - W t), so the logits are the same.
    moved = _bundle(x + shift, y, k, weight, bias - weight @ shift, batches=3)
    # The orthogonal frame of the (uncentred) class means is about the origin by definition.
    _assert_same(moved, base, skip=("orthogonal_frame_error_means",))


@settings(max_examples=20, deadline=None)
@given(**SMALL, scale=st.floats(1e-3, 1e3))
def test_bundle_is_scale_invariant(seed, k, d, scale):
    x, y, weight, bias, _ = _problem(seed, k, d)
    base = _bundle(x, y, k, weight, bias)
    _assert_same(_bundle(scale * x, y, k, weight, scale * bias), base)


@settings(max_examples=20, deadline=None)
@given(**SMALL)
def test_bundle_is_rotation_invariant(seed, k, d):
    x, y, weight, bias, g = _problem(seed, k, d)
    base = _bundle(x, y, k, weight, bias)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    _assert_same(_bundle(x @ q, y, k, weight @ q, bias), base)


@settings(max_examples=20, deadline=None)
@given(**SMALL, batches=st.integers(1, 5))
def test_bundle_is_invariant_to_sample_order(seed, k, d, batches):
    x, y, weight, bias, g = _problem(seed, k, d)
    base = _bundle(x, y, k, weight, bias)
    perm = torch.randperm(len(y), generator=g)
    _assert_same(_bundle(x[perm], y[perm], k, weight, bias, batches=batches), base, rel=1e-9)
