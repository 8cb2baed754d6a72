import os

import pytest
import torch
import torch.multiprocessing as mp
from helpers import collapsed_features, free_port, rel_err, stats_of
from hypothesis import given, settings
from hypothesis import strategies as st

from collapse_ext import ClassStats
from collapse_ext.reference import class_stats_reference, within_scatter_reference


def reference_covs(x, y, k):
    """float64 plain-PyTorch Sigma_W, Sigma_B (class-weighted), means, of all present classes."""
    counts, means, _ = class_stats_reference(x, y, k)
    present = counts > 0
    sigma_w = within_scatter_reference(x, y, means) / len(y)
    mu_g = (counts.double().unsqueeze(1) * means).sum(0) / counts.sum()
    centred = means[present] - mu_g
    sigma_b = centred.T @ centred / int(present.sum())
    return means, sigma_w, sigma_b


def one_pass_sigma_w(x, y, k):
    """The forbidden one-pass identity sum h h^T - n mu mu^T, in the input's precision."""
    counts = torch.bincount(y, minlength=k).to(x.dtype)
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype).index_add_(0, y, x)
    mu = sums / counts.clamp_min(1).unsqueeze(1)
    return (x.T @ x - (mu * counts.unsqueeze(1)).T @ mu) / len(y)


@pytest.mark.parametrize("noise,offset", [(1e-2, 0.0), (1e-3, 0.0), (1e-4, 0.0), (1e-3, 1e3), (1e-4, 1e3)])
def test_exact_on_collapsed_features(device, noise, offset):
    x, y = collapsed_features(4000, 32, 10, noise, offset)
    stats = ClassStats(10, 32, device=device)
    for xb, yb in zip(x.split(333), y.split(333)):
        stats.update(xb.to(device), yb.to(device))
    means, sigma_w, sigma_b = reference_covs(x, y, 10)
    assert rel_err(stats.means, means) <= 1e-6
    assert rel_err(stats.within_cov(), sigma_w) <= 1e-6
    assert rel_err(stats.between_cov(), sigma_b) <= 1e-6


def test_one_pass_identity_fails_the_same_tolerance():
    # The tolerance above is tight enough to catch the naive formula.
    x, y = collapsed_features(4000, 32, 10, 1e-3, 1e3)
    _, sigma_w, _ = reference_covs(x, y, 10)
    assert rel_err(one_pass_sigma_w(x, y, 10), sigma_w) > 1e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes(device, dtype):
    x, y = collapsed_features(1000, 16, 4, 1e-1, dtype=dtype)
    stats = ClassStats(4, 16, device=device).update(x.to(device), y.to(device))
    means, sigma_w, sigma_b = reference_covs(x, y, 4)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert rel_err(stats.means, means) <= tol
    assert rel_err(stats.within_cov(), sigma_w) <= tol


def _split_points(draw_indices, n):
    return sorted(set(i for i in draw_indices if 0 < i < n))


def _merge_tree(parts, tree):
    """Merge in a random tree: repeatedly merge a random pair (choices from ``tree``)."""
    choice = iter(tree * 4)
    while len(parts) > 1:
        i = next(choice) % len(parts)
        a = parts.pop(i)
        j = next(choice) % len(parts)
        parts[j] = a.merge(parts[j]) if next(choice) % 2 else parts[j].merge(a)
    return parts[0]


@settings(max_examples=20, deadline=None)
@given(
    cuts=st.lists(st.integers(0, 160), max_size=6),
    batch=st.integers(1, 40),
    seed=st.integers(0, 2**16),
    tree=st.lists(st.integers(0, 100), min_size=8, max_size=8),
)
def test_float32_state_split_and_merge_stay_exact(cuts, batch, seed, tree):
    """A float32 state on features 1e7 times their spread from the origin, fed in any
    batches, split at any rows and merged in any tree: the means are the exact ones rounded
    (within one float32 step), ss_k and S_W about the exact means."""
    g = torch.Generator().manual_seed(seed)
    n, d, k = 160, 6, 5
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * 1e-4 + 1e3
    y = torch.randint(0, k, (n,), generator=g)
    _, mu, ss = class_stats_reference(x, y, k)
    sw = within_scatter_reference(x, y, mu)
    points = [0] + _split_points(cuts, n) + [n]
    parts = []
    for a, b in zip(points[:-1], points[1:]):
        part = ClassStats(k, d, state_dtype=torch.float32)
        for xb, yb in zip(x[a:b].split(batch), y[a:b].split(batch)):
            part.update(xb, yb)
        parts.append(part)
    merged = _merge_tree(parts, tree)
    assert rel_err(merged.means, mu) <= 1e-7
    assert rel_err(merged.sqdev, ss) <= 1e-6
    assert rel_err(merged.scatter, sw) <= 1e-6


@settings(max_examples=30, deadline=None)
@given(
    cuts=st.lists(st.integers(0, 120), max_size=6),
    seed=st.integers(0, 2**16),
    tree=st.lists(st.integers(0, 100), min_size=8, max_size=8),
)
def test_batch_split_and_merge_tree_invariance(cuts, seed, tree):
    g = torch.Generator().manual_seed(seed)
    n, d, k = 120, 6, 5
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * 2 + 5  # fp64: tests the merge algebra
    y = torch.randint(0, k, (n,), generator=g)
    whole = ClassStats(k, d).update(x, y)
    points = [0] + _split_points(cuts, n) + [n]
    parts = [ClassStats(k, d).update(x[a:b], y[a:b]) for a, b in zip(points[:-1], points[1:])]
    merged = _merge_tree(parts, tree)
    assert torch.equal(merged.counts, whole.counts)
    assert rel_err(merged.means, whole.means) <= 1e-12
    assert rel_err(merged.sqdev, whole.sqdev) <= 1e-10
    assert rel_err(merged.scatter, whole.scatter) <= 1e-10


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_row_permutation_invariance(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(90, 7, generator=g)
    y = torch.randint(0, 4, (90,), generator=g)
    perm = torch.randperm(90, generator=g)
    a = ClassStats(4, 7).update(x, y)
    b = ClassStats(4, 7).update(x[perm], y[perm])
    assert torch.equal(a.counts, b.counts)
    assert rel_err(b.means, a.means) <= 1e-12
    assert rel_err(b.within_cov(), a.within_cov()) <= 1e-6


def test_sqdev_equals_trace_of_scatter():
    x, y = collapsed_features(500, 12, 3, 1e-2)
    stats = ClassStats(3, 12)
    for xb, yb in zip(x.split(64), y.split(64)):
        stats.update(xb, yb)
    assert stats.sqdev.sum().item() == pytest.approx(stats.scatter.trace().item(), rel=1e-6)  # fp32 products


def test_between_cov_options_and_global_mean():
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [4.0, 4.0]])
    y = torch.tensor([0, 0, 1])
    stats = ClassStats(3, 2, global_mean="class").update(x, y)
    torch.testing.assert_close(stats.global_mean(), torch.tensor([2.5, 2.0], dtype=torch.float64))
    torch.testing.assert_close(stats.global_mean("sample"), torch.tensor([2.0, 4 / 3], dtype=torch.float64))
    m = torch.tensor([[1.0, 0.0], [4.0, 4.0]], dtype=torch.float64) - stats.global_mean("sample")
    torch.testing.assert_close(stats.between_cov("class", "sample"), m.T @ m / 2)
    w = torch.tensor([2 / 3, 1 / 3], dtype=torch.float64)
    torch.testing.assert_close(stats.between_cov("sample", "sample"), (m * w[:, None]).T @ m)
    assert stats.present.tolist() == [True, True, False]
    torch.testing.assert_close(stats.class_variances(), torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))


def test_edge_cases():
    s = ClassStats(1, 1)
    s.update(torch.zeros(0, 1), torch.zeros(0, dtype=torch.long))
    assert s.num_samples == 0
    s.update(torch.tensor([[1.0], [3.0]]), torch.tensor([0, 0], dtype=torch.int32))
    assert s.within_cov().item() == pytest.approx(1.0)
    k_gt_d = ClassStats(20, 3).update(torch.randn(5, 3), torch.tensor([0, 19, 7, 7, 3]))
    assert int(k_gt_d.present.sum()) == 4
    assert k_gt_d.centred_means().shape == (4, 3)
    no_cov = ClassStats(3, 2, within_cov=False).update(torch.randn(4, 2), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(RuntimeError, match="within_cov=True"):
        no_cov.within_cov()


def _state(stats):
    return [t.clone() for t in stats._parts()]


def _assert_unchanged(stats, before):
    for a, b in zip(stats._parts(), before):
        assert torch.equal(a, b)


def test_failed_update_leaves_state_unchanged():
    stats = ClassStats(3, 4).update(torch.randn(10, 4), torch.randint(0, 3, (10,)))
    before = _state(stats)
    bad = [
        (torch.randn(2, 4, 3, 3), torch.zeros(2, dtype=torch.long), ValueError, r"pool or flatten"),
        (torch.randn(5, 4), torch.tensor([0, 1, 3, 0, 0]), ValueError, r"labels` in \[0, 3\), got values in \[0, 3\]"),
        (torch.randn(5, 4), torch.tensor([0, -1, 2, 0, 0]), ValueError, r"labels` in \[0, 3\)"),
        (torch.tensor([[1.0, float("nan"), 0, 0]]), torch.tensor([1]), ValueError, "NaN or Inf"),
        (torch.tensor([[1.0, float("inf"), 0, 0]]), torch.tensor([1]), ValueError, "NaN or Inf"),
        (torch.randn(5, 3), torch.zeros(5, dtype=torch.long), ValueError, r"shape \(N, 4\)"),
        (torch.randn(5, 4), torch.zeros(4, dtype=torch.long), ValueError, r"labels` of shape \(5,\)"),
        (torch.randn(5, 4), torch.zeros(5), TypeError, "int32 or int64"),
        (torch.randn(5, 4).long(), torch.zeros(5, dtype=torch.long), TypeError, "float16/bfloat16"),
        (torch.randn(5, 4, device="meta"), torch.zeros(5, dtype=torch.long, device="meta"), ValueError, "on cpu"),
        ([[1.0] * 4], torch.zeros(1, dtype=torch.long), TypeError, "torch.Tensor"),
    ]
    for x, y, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            stats.update(x, y)
        _assert_unchanged(stats, before)


def test_deferred_check_drops_bad_batches_without_sync():
    stats = ClassStats(3, 2, check="deferred")
    stats.update(torch.ones(4, 2), torch.tensor([0, 1, 2, 0]))
    before = _state(stats)
    stats.update(torch.full((2, 2), float("nan")), torch.tensor([0, 1]))
    stats.update(torch.ones(2, 2), torch.tensor([0, 7]))
    _assert_unchanged(stats, before)
    with pytest.raises(ValueError, match=r"2 batch\(es\) were dropped \(4 rows\)"):
        stats.within_cov()


def test_constructor_errors():
    with pytest.raises(ValueError, match="`num_classes` to be a positive int, got 0"):
        ClassStats(0, 3)
    with pytest.raises(ValueError, match="`dim` to be a positive int"):
        ClassStats(3, 2.5)
    with pytest.raises(ValueError, match="`global_mean` to be one of"):
        ClassStats(3, 2, global_mean="median")
    with pytest.raises(ValueError, match="num_classes=3, dim=2, got num_classes=4"):
        ClassStats(3, 2).merge(ClassStats(4, 2))


def test_state_dict_round_trip(tmp_path):
    x, y = collapsed_features(300, 8, 4, 1e-2)
    a = ClassStats(4, 8).update(x[:150], y[:150])
    path = tmp_path / "stats.pt"
    torch.save(a.state_dict(), path)
    b = ClassStats(4, 8)
    b.load_state_dict(torch.load(path))
    a.update(x[150:], y[150:])
    b.update(x[150:], y[150:])
    for p, q in zip(a._parts(), b._parts()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="Expected a state with"):
        ClassStats(5, 8).load_state_dict(a.state_dict())


def test_device_follows_first_batch_and_rejects_mixing():
    s = ClassStats(2, 3)
    assert s.device.type == "cpu"
    s.update(torch.randn(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"on cpu \(the statistics' device\), got meta"):
        s.update(torch.randn(2, 3, device="meta"), torch.zeros(2, dtype=torch.long, device="meta"))


def _all_reduce_worker(rank, world, port, x, y, out, state_dtype=torch.float64):
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mine = slice(rank * 97, None if rank == world - 1 else (rank + 1) * 97)  # uneven shards
        stats = ClassStats(6, x.shape[1], state_dtype=state_dtype)
        for xb, yb in zip(x[mine].split(16), y[mine].split(16)):
            stats.update(xb, yb)
        stats.all_reduce()
        torch.save(stats.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_gloo_all_reduce_matches_one_pass(tmp_path):
    x, y = collapsed_features(250, 10, 6, 1e-3, offset=100.0, dtype=torch.float64)
    y[y == 5] = 4  # class 5 absent everywhere
    mp.spawn(_all_reduce_worker, args=(2, free_port(), x, y, str(tmp_path)), nprocs=2, join=True)
    whole = ClassStats(6, 10).update(x, y)
    for rank in range(2):
        got = ClassStats(6, 10)
        got.load_state_dict(torch.load(tmp_path / f"rank{rank}.pt"))
        assert torch.equal(got.counts, whole.counts)
        assert rel_err(got.means, whole.means) <= 1e-12
        assert rel_err(got.sqdev, whole.sqdev) <= 1e-9
        assert rel_err(got.within_cov(), whole.within_cov()) <= 1e-9


def test_gloo_all_reduce_of_float32_states_is_exact_far_from_the_origin(tmp_path):
    """Shards of features 4e7 times their spread from the origin: the ranks' float32 means
    round off by about the spread, the residuals the folds keep make the reduction exact."""
    x, y = collapsed_features(400, 10, 6, 1e-4, offset=1e3, mean_norm=1.0)
    mp.spawn(_all_reduce_worker, args=(2, free_port(), x, y, str(tmp_path), torch.float32), nprocs=2, join=True)
    _, mu, ss = class_stats_reference(x, y, 6)
    sw = within_scatter_reference(x, y, mu)
    for rank in range(2):
        got = ClassStats(6, 10, state_dtype=torch.float32)
        got.load_state_dict(torch.load(tmp_path / f"rank{rank}.pt"))
        assert torch.equal(got.means, mu.float())
        assert rel_err(got.sqdev, ss) <= 1e-7
        assert rel_err(got.scatter, sw) <= 1e-6


def test_update_detaches_features_that_require_grad():
    import gc
    import weakref

    layer = torch.nn.Linear(8, 8)
    stats = ClassStats(3, 8)
    refs = []
    for _ in range(3):
        inputs = torch.randn(16, 8)
        hidden = layer(inputs)  # the graph saves `inputs` for the backward of the product
        refs.append(weakref.ref(inputs))
        stats.update(hidden, torch.randint(0, 3, (16,)))
        del hidden, inputs
    gc.collect()
    assert all(r() is None for r in refs)  # no batch's graph is kept alive
    assert not stats.means.requires_grad and not stats.within_cov().requires_grad


@pytest.mark.parametrize("fold_rows", [1, 7, 64, 32768])
@pytest.mark.parametrize("batch", [1, 13, 500])
def test_fold_points_do_not_change_the_statistics(fold_rows, batch):
    x, y = collapsed_features(500, 9, 4, 1e-3, offset=1e3, dtype=torch.float32)
    stats = ClassStats(4, 9, fold_rows=fold_rows)
    for xb, yb in zip(x.split(batch), y.split(batch)):
        stats.update(xb, yb)
    means, sigma_w, _ = reference_covs(x, y, 4)
    assert rel_err(stats.means, means) <= 1e-12
    assert rel_err(stats.within_cov(), sigma_w) <= 1e-6


def test_wide_product_where_float32_overflows():
    # +-1e20 rows: the float32 squares overflow, so the product is taken in float64.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g) * 1e20
    y = torch.arange(64) % 2
    stats = ClassStats(2, 5).update(x, y)
    _, sigma_w, _ = reference_covs(x, y, 2)
    assert stats.wide_product
    assert torch.isfinite(stats.within_cov()).all()
    assert rel_err(stats.within_cov(), sigma_w) <= 1e-12
    # Finite float64 features far from float32's range are fine as long as the spread fits.
    big = torch.randn(40, 5, generator=g, dtype=torch.float64) * 1e140 + 1e150
    stats = ClassStats(2, 5).update(big, torch.arange(40) % 2)
    assert torch.isfinite(stats.within_cov()).all() and torch.isfinite(stats.means).all()
    _, sigma_w, _ = reference_covs(big, torch.arange(40) % 2, 2)
    # offset 1e10 x the spread: float64 keeps ~1e-11 of the scatter (norms of 1e280 would overflow)
    assert rel_err(stats.within_cov() / 1e280, sigma_w / 1e280) <= 1e-10
    with pytest.raises(ValueError, match="fit in float64 sums of squares"):
        ClassStats(2, 5).update(torch.randn(4, 5, dtype=torch.float64) * 1e200, torch.tensor([0, 0, 1, 1]))


def test_deferred_refuses_float32_overflow_and_counts_rows():
    stats = ClassStats(2, 3, check="deferred")
    stats.update(torch.ones(4, 3), torch.tensor([0, 1, 0, 1]))
    stats.update(torch.tensor([[1e20, 0, 0], [-1e20, 0, 0], [0, 0, 0.0]]), torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match=r"1 batch\(es\) were dropped \(3 rows\)"):
        stats.within_cov()


def test_numpy_integers_and_state_dtype():
    np = pytest.importorskip("numpy")
    stats = ClassStats(np.int64(3), np.int32(4))
    assert (stats.num_classes, stats.dim) == (3, 4)
    with pytest.raises(ValueError, match="`num_classes` to be a positive int, got True"):
        ClassStats(True, 4)
    with pytest.raises(ValueError, match="`state_dtype` to be one of float64/float32"):
        ClassStats(3, 4, state_dtype=torch.float16)


def test_float32_state_error_is_small():
    x, y = collapsed_features(3000, 16, 6, 1e-2, offset=10.0)
    exact = ClassStats(6, 16)
    light = ClassStats(6, 16, state_dtype=torch.float32)
    for xb, yb in zip(x.split(128), y.split(128)):
        exact.update(xb, yb)
        light.update(xb, yb)
    assert light.means.dtype == torch.float32
    assert rel_err(light.means, exact.means) <= 1e-7
    assert rel_err(light.within_cov(), exact.within_cov()) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("within_cov", [False, True])
def test_float32_state_is_exact_far_from_the_origin(dtype, within_cov):
    """Features 4e7 times their within-class spread from the origin: a float32 mean rounds
    off by about the spread itself. The folds keep that rounding in the pending sums
    (class_fold), so ss_k and S_W stay about the exact means through updates, merges and a
    state_dict round trip (before, ss_k was off by 20-50% here)."""
    x, y = collapsed_features(6000, 16, 6, 1e-4, offset=1e3, mean_norm=1.0, dtype=dtype)
    _, mu, ss = class_stats_reference(x, y, 6)
    sw = within_scatter_reference(x, y, mu)
    kw = dict(state_dtype=torch.float32, within_cov=within_cov)
    whole = stats_of(x, y, 6, batches=47, **kw)
    merged = stats_of(x[:2500], y[:2500], 6, batches=20, **kw).merge(stats_of(x[2500:], y[2500:], 6, batches=27, **kw))
    loaded = ClassStats(6, 16, **kw)
    loaded.load_state_dict(stats_of(x[:2500], y[:2500], 6, batches=20, **kw).state_dict())
    for xb, yb in zip(x[2500:].tensor_split(27), y[2500:].tensor_split(27)):
        loaded.update(xb, yb)
    for stats in (whole, merged, loaded):
        assert torch.equal(stats.means, mu.float())  # the exact means, rounded once
        assert rel_err(stats.sqdev, ss) <= 1e-7
        if within_cov:
            assert rel_err(stats.scatter, sw) <= 1e-6


def test_load_state_dict_is_atomic_and_validated():
    x, y = collapsed_features(300, 8, 4, 1e-2)
    stats = ClassStats(4, 8).update(x, y)
    good = stats.state_dict()
    before = _state(stats)

    def corrupt(**changes):
        state = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in good.items()}
        for key, value in changes.items():
            if value is None:
                del state[key]
            else:
                state[key] = value
        return state

    bad = [
        (corrupt(scatter=None), "missing \\['scatter'\\]"),
        (corrupt(counts=good["counts"][:3]), r"state\['counts'\]` to be a tensor of shape \(4,\)"),
        (corrupt(counts=-good["counts"]), r"state\['counts'\]` to be non-negative"),
        (corrupt(counts=good["counts"].double()), "integer tensor"),
        (corrupt(global_mean="median"), r"state\['global_mean'\]` to be one of"),
        (corrupt(means=torch.full((4, 8), float("nan"), dtype=torch.float64)), r"state\['means'\]` to be finite"),
        (corrupt(sqdev=-good["sqdev"] - 1), r"state\['sqdev'\]` to be non-negative"),
        (corrupt(dim=9), "Expected a state with"),
        (corrupt(residual=torch.zeros(3, 8)), r"state\['residual'\]` to be a tensor of shape \(4, 8\)"),
        (corrupt(residual=torch.full((4, 8), float("inf"))), r"state\['residual'\]` to be a finite float tensor"),
        ([1, 2], "to be a dict"),
    ]
    for state, msg in bad:
        with pytest.raises((ValueError, TypeError), match=msg):
            stats.load_state_dict(state)
        _assert_unchanged(stats, before)


def _mismatch_worker(rank, world, port, out):
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        stats = ClassStats(3 + rank, 4).update(torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))
        try:
            stats.all_reduce()
            message = "no error"
        except ValueError as err:
            message = str(err)
        with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
            f.write(message)
    finally:
        dist.destroy_process_group()


def test_all_reduce_with_different_shapes_raises_on_every_rank(tmp_path):
    mp.spawn(_mismatch_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert messages[0] == messages[1]
    assert "same (num_classes, dim, within_cov, float64 state)" in messages[0]
