import time

import pytest
import torch

from collapse_ext.data import MINORITY, batches, load_digits, make_mlp, subsample, train_digits
from collapse_ext.monitor import PENULTIMATE


@pytest.fixture
def one_thread():
    # The MLP is tiny: one thread is fastest and steadiest on a shared 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_load_digits_is_standardised():
    x, y = load_digits()
    assert x.shape == (1797, 64) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10))
    used = x.std(0) > 0
    torch.testing.assert_close(x.mean(0), torch.zeros(64), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(0)[used], torch.ones(int(used.sum())), atol=1e-5, rtol=0)


def test_subsample_keeps_one_in_factor():
    x, y = load_digits()
    xs, ys = subsample(x, y, factor=10, seed=3)
    counts, full = torch.bincount(ys, minlength=10), torch.bincount(y, minlength=10)
    for c in range(10):
        assert counts[c] == (full[c] // 10 if c in MINORITY else full[c])
    assert xs.shape[0] == ys.shape[0]
    with pytest.raises(ValueError, match="Expected `factor` to be a positive int"):
        subsample(x, y, factor=0)


def test_make_mlp_names_and_batches():
    model = make_mlp(64, (32, 16), 10)
    assert [n for n, _ in model.named_children()] == ["block1", "block2", "fc"]
    assert model(torch.randn(5, 64)).shape == (5, 10)
    x, y = torch.randn(10, 3), torch.arange(10)
    got = list(batches(x, y, 4, generator=torch.Generator().manual_seed(0)))
    assert [len(b[1]) for b in got] == [4, 4, 2]
    assert sorted(torch.cat([b[1] for b in got]).tolist()) == list(range(10))


def _majority_cosine(weight, minority):
    keep = [k for k in range(weight.shape[0]) if k not in minority]
    w = torch.nn.functional.normalize(weight[keep].double(), dim=1)
    gram = w @ w.T
    n = len(keep)
    return float((gram.sum() - gram.diagonal().sum()) / (n * (n - 1)))


@pytest.mark.slow
def test_digits_balanced_reaches_neural_collapse(one_thread):
    start = time.perf_counter()
    run = train_digits(100, label_smoothing=0.1, evaluate_every=100)
    assert time.perf_counter() - start < 60
    assert run.train_accuracy[-1] == 1.0
    train = [r for r in run.monitor.history if r.phase == "train"]
    final = run.monitor.history[-1]
    assert len(train) == 100 and final.phase == "eval" and final.epoch == 100
    first, end = train[0][PENULTIMATE].nc1, final[PENULTIMATE].nc1
    assert first / end >= 10, (first, end)
    assert train[-1][PENULTIMATE].nc1 < first / 5  # the training statistics show it too
    m = final[PENULTIMATE]
    assert m.ncc_accuracy >= 0.99 and m.ncc_mismatch <= 0.01
    d = list(final.separation_fuzziness.values())
    assert d[0] > d[1] > d[2] and final.separation_law["rho"] < 1  # law of data separation


@pytest.mark.slow
def test_digits_imbalanced_shows_minority_collapse(one_thread):
    run = train_digits(50, imbalanced=True, evaluate_every=50)
    assert run.train_accuracy[-1] == 1.0
    first = run.monitor.history[0][PENULTIMATE].nc1
    final = run.monitor.history[-1][PENULTIMATE]
    assert first / final.nc1 >= 10, (first, final.nc1)
    assert final.minority_classes == list(MINORITY)
    majority = _majority_cosine(run.model.fc.weight.detach(), final.minority_classes)
    assert final.minority_cos_mean > majority + 0.05, (final.minority_cos_mean, majority)
