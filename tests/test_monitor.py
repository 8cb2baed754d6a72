import copy
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import free_port, needs_cuda, rel_err, stats_of
from torch import nn

import collapse_ext.monitor.layer as layer_module
from collapse_ext import ClassStats, CollapseMonitor, collapse_metrics, nearest_centre_tallies
from collapse_ext.data import make_mlp
from collapse_ext.monitor import PENULTIMATE, MonitorResult
from collapse_ext.reference import nearest_centre_reference


def _data(n=240, d=16, k=5, seed=0, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    means = 3 * torch.randn(k, d, generator=g)
    y = torch.arange(n) % k
    y = y[torch.randperm(n, generator=g)]
    x = means[y] + noise * torch.randn(n, d, generator=g)
    return x, y


def _mlp(d=16, k=5, seed=0):
    torch.manual_seed(seed)
    return make_mlp(d, (32, 24), k)


def _batches(x, y, size=32):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def _assert_same_stats(a: ClassStats, b: ClassStats, rtol=1e-12):
    assert torch.equal(a.counts, b.counts)
    torch.testing.assert_close(a.means, b.means, rtol=rtol, atol=1e-12)
    torch.testing.assert_close(a.sqdev, b.sqdev, rtol=rtol, atol=1e-12)
    assert rel_err(a.scatter, b.scatter) <= rtol


def _same_result(a: MonitorResult, b: MonitorResult):
    assert a.to_dict() == b.to_dict()


# ------------------------------------------------------------------------ hooks
def test_update_records_classifier_input_and_layers():
    x, y = _data()
    model = _mlp().eval()
    mon = CollapseMonitor(model, classifier="fc", num_classes=5, layers=["block1"], buffer_bytes=0)
    assert mon.layer_names == ["block1", PENULTIMATE]
    with torch.no_grad():
        for xb, yb in _batches(x, y):
            model(xb)
            mon.update(yb)
        h1 = model.block1(x)
        h2 = model.block2(h1)
    session = mon._session
    session.flush()
    _assert_same_stats(session.layers["block1"].stats, stats_of(h1.double(), y, 5), rtol=1e-6)
    _assert_same_stats(session.layers[PENULTIMATE].stats, stats_of(h2.double(), y, 5), rtol=1e-6)


def test_collect_equals_update_and_buffering_is_exact():
    x, y = _data()
    x, model = x.double(), _mlp().double().eval()  # float64: batching changes nothing but rounding
    results = []
    for api, buffer_bytes in (("update", 0), ("collect", 0), ("update", 1 << 20), ("collect", 3000)):
        mon = CollapseMonitor(model, classifier=model.fc, num_classes=5, layers=["block1"], buffer_bytes=buffer_bytes)
        with torch.no_grad():
            for _ in range(2):
                for xb, yb in _batches(x, y):
                    if api == "update":
                        model(xb)
                        mon.update(yb)
                    else:
                        with mon.collect(yb):
                            model(xb)
                results.append(mon.compute())
        mon.remove()
    for i, r in enumerate(results[2:]):
        first = results[i % 2]
        assert first.epoch == r.epoch
        for name in first.layers:
            for key, value in first[name].to_dict().items():
                other = r[name].to_dict()[key]
                assert (value is None) == (other is None), key
                if value is not None:
                    assert other == pytest.approx(value, rel=1e-9, abs=1e-12), key


def _conv_net(grid: int) -> nn.Sequential:
    """conv 3 -> 4 channels, ReLU ("act"), average pool to grid x grid, flatten, fc to 3 classes."""
    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(3, 4, 3, padding=1))
    model.add_module("act", nn.ReLU())
    model.add_module("pool", nn.AdaptiveAvgPool2d(grid))
    model.add_module("flat", nn.Flatten())
    model.add_module("fc", nn.Linear(4 * grid * grid, 3))
    return model


def test_conv_features_pooled_and_flattened():
    torch.manual_seed(0)
    model = _conv_net(grid=2)
    x = torch.randn(12, 3, 5, 5)
    y = torch.arange(12) % 3
    for pool, expect in (
        ("avg", lambda t: t.mean((2, 3))),
        ("max", lambda t: t.amax((2, 3))),
        ("flatten", lambda t: t.flatten(1)),
        (lambda t: t[:, :, 0, 0], lambda t: t[:, :, 0, 0]),
    ):
        mon = CollapseMonitor(model, classifier="fc", num_classes=3, layers=["act"], pool={"act": pool})
        with torch.no_grad():
            out = model.act(model.conv(x))
            model(x)
        mon.update(y)
        mon._session.flush()
        got = mon._session.layers["act"].stats
        _assert_same_stats(got, stats_of(expect(out).double(), y, 3), rtol=1e-6)
        mon.remove()


def test_layers_are_ordered_by_position_and_accept_modules_and_dicts():
    model = _mlp()
    mon = CollapseMonitor(model, classifier="fc", num_classes=5, layers=[model.block2, "block1"])
    assert mon.layer_names == ["block1", "block2", PENULTIMATE]
    mon.remove()
    mon = CollapseMonitor(model, classifier="fc", num_classes=5, layers={"first": "block1"}, penultimate=False)
    assert mon.layer_names == ["first"]
    mon.remove()


def test_outputs_and_gradients_bit_identical():
    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("conv", nn.Conv2d(3, 8, 3, padding=1))
    base.add_module("bn", nn.BatchNorm2d(8))
    base.add_module("act", nn.ReLU(inplace=True))
    base.add_module("gap", nn.AdaptiveAvgPool2d(1))
    base.add_module("flat", nn.Flatten())
    base.add_module("fc", nn.Linear(8, 4))
    x = torch.randn(3, 16, 3, 6, 6)
    y = torch.randint(0, 4, (3, 16))
    runs = []
    for use in (False, True):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        mon = CollapseMonitor(model, classifier="fc", num_classes=4, layers=["bn", "gap"]) if use else None
        outs, grads = [], []
        for xb, yb in zip(x, y):
            out = model(xb)
            if mon is not None:
                mon.update(yb)
            loss = F.cross_entropy(out, yb)
            opt.zero_grad()
            loss.backward()
            outs.append(out.detach().clone())
            grads.append([p.grad.clone() for p in model.parameters()])
            opt.step()
        if mon is not None:
            mon.compute()
        runs.append((outs, grads, [p.detach().clone() for p in model.parameters()]))
    (o1, g1, p1), (o2, g2, p2) = runs
    assert all(torch.equal(a, b) for a, b in zip(o1, o2))
    assert all(torch.equal(a, b) for ga, gb in zip(g1, g2) for a, b in zip(ga, gb))
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))


def test_every_records_one_batch_in_n():
    x, y = _data()
    model = _mlp().eval()
    mon = CollapseMonitor(model, classifier="fc", num_classes=5, every=3)
    with torch.no_grad():
        for xb, yb in _batches(x, y):
            model(xb)
            mon.update(yb)
    kept = torch.cat([yb for i, (_, yb) in enumerate(_batches(x, y)) if i % 3 == 0])
    assert mon.compute()[PENULTIMATE].num_samples == kept.numel()


def test_bf16_autocast_features_accepted():
    x, y = _data()
    model = _mlp().eval()
    mon = CollapseMonitor(model, classifier="fc", num_classes=5)
    ref = CollapseMonitor(copy.deepcopy(model), classifier="fc", num_classes=5)
    with torch.no_grad():
        for xb, yb in _batches(x, y):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(xb)
            assert out.dtype == torch.bfloat16
            mon.update(yb)
            ref.model(xb)
            ref.update(yb)
    assert mon._session.layers[PENULTIMATE].buf.dtype == torch.bfloat16
    got, want = mon.compute()[PENULTIMATE], ref.compute()[PENULTIMATE]
    assert got.num_samples == want.num_samples
    assert got.nc1 == pytest.approx(want.nc1, rel=5e-2)


def test_inference_mode_forward():
    x, y = _data()
    model = _mlp().eval()
    mon = CollapseMonitor(model, classifier="fc", num_classes=5)
    for xb, yb in _batches(x, y):
        with torch.inference_mode(), mon.collect(yb):
            model(xb)
    assert mon.compute()[PENULTIMATE].num_samples == len(y)
    with torch.no_grad():
        model(x)
    mon.update(y)
    assert mon.compute()[PENULTIMATE].num_samples == len(y)


def test_paused_and_removed_hooks_record_nothing():
    x, y = _data()
    model = _mlp().eval()
    mon = CollapseMonitor(model, classifier="fc", num_classes=5)
    with torch.no_grad(), mon.paused():
        model(x)
    with pytest.raises(RuntimeError, match="update\\(\\) found no features"):
        mon.update(y)
    mon.remove()
    with torch.no_grad():
        model(x)
    with pytest.raises(RuntimeError, match="compute\\(\\) found no recorded batch"):
        mon.compute()


# --------------------------------------------------------------------- results
def test_compute_bundle_nc4_previous_means_and_separation_law():
    x, y = _data(noise=1.0)
    model = _mlp().eval()
    mon = CollapseMonitor(model, classifier="fc", num_classes=5, layers=["block1"])
    with torch.no_grad():
        h = model.block2(model.block1(x))
        pred = model(x).argmax(1)
    for xb, yb in _batches(x, y):
        with torch.no_grad():
            model(xb)
        mon.update(yb)
    first = mon.compute()
    assert first.epoch == 1 and first.phase == "train" and mon.history == [first]
    m = first[PENULTIMATE]
    assert m.ncc_accuracy is None and "first epoch" in m.undefined["ncc_accuracy"]
    assert m.nc1 is not None and m.self_duality is not None
    assert set(first.separation_fuzziness) == {"block1", PENULTIMATE}
    assert first.separation_law is not None and first.separation_law["rho"] > 0
    stats = stats_of(h.double(), y, 5)
    want = collapse_metrics(stats, model.fc.weight.detach(), model.fc.bias.detach())
    assert m.nc1 == pytest.approx(want.nc1, rel=1e-5)
    assert m.self_duality == pytest.approx(want.self_duality, rel=1e-5)

    for xb, yb in _batches(x, y):
        with torch.no_grad():
            model(xb)
        mon.update(yb)
    second = mon.compute()[PENULTIMATE]
    assert "previous epoch" in second.ncc_means
    tallies = nearest_centre_tallies(h, y, stats.means, model.fc.weight.detach(), model.fc.bias.detach())
    n, correct, mismatch = tallies.tolist()
    assert second.ncc_accuracy == pytest.approx(correct / n)
    assert second.ncc_mismatch == pytest.approx(mismatch / n)
    assert torch.equal(pred, model(x).argmax(1))
    assert len(mon.history) == 2


def test_ncc_tallies_match_reference():
    x, y = _data(noise=2.0)
    means = stats_of(x.double(), y, 5).means
    present = torch.tensor([True, True, False, True, True])
    pred = torch.randint(-1, 5, (len(y),))
    fused = layer_module._ncc_tallies(x, y, means, present, pred)
    tallies, nearest = nearest_centre_reference(x, y, means, present=present)
    mismatch = ((nearest >= 0) & (pred >= 0) & (pred != nearest)).sum()
    assert torch.equal(fused, torch.stack([tallies[0], tallies[1], mismatch]))


def test_evaluate_two_passes_with_final_means():
    x, y = _data(noise=1.5)
    model = _mlp()
    model.train()
    mon = CollapseMonitor(model, classifier="fc", num_classes=5, layers=["block1"])
    model(x[:32])
    mon.update(y[:32])
    loader = _batches(x, y, 50)
    result = mon.evaluate(loader)
    assert model.training
    assert result.phase == "eval" and result.epoch == 0 and mon.history[-1] is result
    assert mon._session.layers[PENULTIMATE].fill == 32
    model.eval()
    with torch.no_grad():
        h = model.block2(model.block1(x))
    w, b = model.fc.weight.detach(), model.fc.bias.detach()
    want = collapse_metrics(stats_of(h.double(), y, 5), w, b, features=h, labels=y)
    got = result[PENULTIMATE]
    assert "final class means" in got.ncc_means
    assert got.ncc_accuracy == pytest.approx(want.ncc_accuracy)
    assert got.ncc_mismatch == pytest.approx(want.ncc_mismatch)
    assert got.nc1 == pytest.approx(want.nc1, rel=1e-5)
    assert result["block1"].ncc_accuracy is not None
    with pytest.raises(TypeError, match="re-iterable"):
        mon.evaluate(iter(loader))


def test_nc1_of_layer_normed_features_drops_the_rounding_direction():
    # LayerNorm without affine: every row sums to 0, so neither the class means nor the rows
    # leave that hyperplane; in float32 its normal carries only rounding, whose 1/s^2 made NC1 noise
    # (K' = 40 > d = 16: the normal is among the K' - 1 directions); it was -7.5e4 against 0.084
    x, y = _data(n=2000, d=16, k=40, noise=1.0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16, elementwise_affine=False), nn.Linear(16, 40)).eval()
    mon = CollapseMonitor(model, classifier="2", num_classes=40)
    with torch.no_grad():
        for xb, yb in _batches(x, y):
            model(xb)
            mon.update(yb)
        h = model[1](model[0](x)).double()
    want = collapse_metrics(stats_of(h, y, 40), rtol=1e-6)
    got = mon.compute()[PENULTIMATE]
    assert got.nc1 == pytest.approx(want.nc1, rel=1e-5)
    assert got.separation_fuzziness == pytest.approx(want.separation_fuzziness, rel=1e-5)


def test_minority_metrics_when_imbalanced():
    x, y = _data(n=300, noise=0.5)
    keep = (y < 3) | (torch.arange(len(y)) % 10 == 0)
    x, y = x[keep], y[keep]
    model = _mlp().eval()
    mon = CollapseMonitor(model, classifier="fc", num_classes=5)
    with torch.no_grad():
        model(x)
    mon.update(y)
    m = mon.compute()[PENULTIMATE]
    assert m.minority_classes == [3, 4]
    assert m.minority_cos_mean is not None


def test_result_round_trips_and_prints():
    x, y = _data()
    model = _mlp().eval()
    mon = CollapseMonitor(model, classifier="fc", num_classes=5, layers=["block1"])
    with torch.no_grad():
        model(x)
    mon.update(y)
    r = mon.compute()
    again = MonitorResult.from_dict(r.to_dict())
    _same_result(r, again)
    text = str(r)
    assert "[penultimate]" in text and "separation law" in text
    assert r.summary().startswith("epoch    1 train")
    flat = r.flat()
    assert flat["penultimate/nc1"] == r[PENULTIMATE].nc1
    with pytest.raises(KeyError, match="monitored layers"):
        r["nope"]


# --------------------------------------------------------------------- resume
def test_state_dict_resumes_mid_epoch_identically(tmp_path):
    x, y = _data()
    batches = _batches(x, y, 24)
    kwargs = dict(classifier="fc", num_classes=5, layers=["block1"], buffer_bytes=4000)

    model = _mlp()
    mon = CollapseMonitor(model, **kwargs)
    with torch.no_grad():
        for xb, yb in batches:
            model(xb)
            mon.update(yb)
    mon.compute()
    for xb, yb in batches[:7]:
        with torch.no_grad():
            model(xb)
        mon.update(yb)
    assert mon._session.layers[PENULTIMATE].fill > 0
    path = tmp_path / "mon.pt"
    torch.save({"model": model.state_dict(), "monitor": mon.state_dict()}, path)
    for xb, yb in batches[7:]:
        with torch.no_grad():
            model(xb)
        mon.update(yb)
    want = mon.compute()

    ckpt = torch.load(path, weights_only=True)
    model2 = _mlp(seed=1)
    model2.load_state_dict(ckpt["model"])
    mon2 = CollapseMonitor(model2, **kwargs)
    mon2.load_state_dict(ckpt["monitor"])
    assert len(mon2.history) == 1
    for xb, yb in batches[7:]:
        with torch.no_grad():
            model2(xb)
        mon2.update(yb)
    got = mon2.compute()
    _same_result(want, got)
    assert [r.to_dict() for r in mon.history] == [r.to_dict() for r in mon2.history]
    with pytest.raises(ValueError, match="Expected a state for layers"):
        CollapseMonitor(model2, classifier="fc", num_classes=5).load_state_dict(ckpt["monitor"])


# ------------------------------------------------------------------------ errors
def test_clear_errors():
    model = _mlp()
    with pytest.raises(TypeError, match="Expected `model` to be an nn.Module"):
        CollapseMonitor("model", classifier="fc", num_classes=5)
    with pytest.raises(TypeError, match="Expected `classifier` to be an nn.Module in `model`"):
        CollapseMonitor(model, classifier=nn.Linear(3, 3), num_classes=5)
    with pytest.raises(TypeError, match="Expected `classifier` to be an nn.Module in `model`"):
        CollapseMonitor(model, classifier=3, num_classes=5)
    with pytest.raises(ValueError, match="Expected `classifier` to name a submodule of `model`, got 'head'"):
        CollapseMonitor(model, classifier="head", num_classes=5)
    with pytest.raises(ValueError, match="Expected `num_classes` to be a positive int"):
        CollapseMonitor(model, classifier="fc", num_classes=0)
    with pytest.raises(ValueError, match="Expected `every` to be a positive int"):
        CollapseMonitor(model, classifier="fc", num_classes=5, every=0)
    with pytest.raises(ValueError, match="Expected `pool` for layer 'penultimate' to be one of"):
        CollapseMonitor(model, classifier="fc", num_classes=5, pool="median")
    with pytest.raises(ValueError, match="Expected distinct `layers`"):
        CollapseMonitor(model, classifier="fc", num_classes=5, layers=["block1", model.block1])
    with pytest.raises(ValueError, match="Expected at least one layer"):
        CollapseMonitor(model, classifier="fc", num_classes=5, penultimate=False)
    with pytest.raises(TypeError, match="log\\(result\\)"):
        CollapseMonitor(model, classifier="fc", num_classes=5, loggers=[object()])

    mon = CollapseMonitor(model, classifier="fc", num_classes=5)
    x, y = _data()
    model(x)
    with pytest.raises(ValueError, match="Expected labels for the 240 rows"):
        mon.update(y[:10])
    with pytest.raises(ValueError, match="Expected `labels` in \\[0, 5\\)"):
        mon.update(y + 3)
    with pytest.raises(TypeError, match="Expected `labels` to be a torch.Tensor"):
        mon.update([0, 1])
    with pytest.raises(RuntimeError, match="not to nest"):
        with mon.collect(y), mon.collect(y):
            pass


def test_in_place_modified_features_are_refused():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("lin", nn.Linear(4, 6))
    model.add_module("act", nn.ReLU(inplace=True))
    model.add_module("fc", nn.Linear(6, 3))
    mon = CollapseMonitor(model, classifier="fc", num_classes=3, layers=["lin"])
    x, y = torch.randn(9, 4), torch.arange(9) % 3
    model(x)
    with pytest.raises(RuntimeError, match="modified in place"):
        mon.update(y)
    with mon.collect(y):
        model(x)
    assert mon.compute()["lin"].num_samples == 9


def test_dataparallel_wrapper_is_looked_through():
    model = _mlp().eval()
    wrapped = nn.DataParallel(model) if not torch.cuda.is_available() else model
    mon = CollapseMonitor(wrapped, classifier="fc", num_classes=5)
    x, y = _data()
    with torch.no_grad():
        wrapped(x)
    mon.update(y)
    assert mon.compute()[PENULTIMATE].num_samples == len(y)


# --------------------------------------------------------------------- distributed
def _run_epochs(model, mon, batches, shard=None):
    out = []
    for _ in range(2):
        for i, (xb, yb) in enumerate(batches):
            if shard is not None and i % shard[1] != shard[0]:
                continue
            with torch.no_grad():
                model(xb)
            mon.update(yb)
        out.append(mon.compute())
    return out


def _ddp_worker(rank, world, port, state, x, y, out):
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _mlp().double()
        model.load_state_dict(state)
        model = torch.nn.parallel.DistributedDataParallel(model.eval())
        mon = CollapseMonitor(model, classifier="fc", num_classes=5, layers=["block1"])
        results = _run_epochs(model, mon, _batches(x, y, 20), shard=(rank, world))
        shard = [b for i, b in enumerate(_batches(x, y, 30)) if i % world == rank]
        results.append(mon.evaluate(shard))
        torch.save([r.to_dict() for r in results], os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _assert_close_results(a: MonitorResult, b: MonitorResult):
    assert a.phase == b.phase and a.epoch == b.epoch
    for name in a.layers:
        da, db = a[name].to_dict(), b[name].to_dict()
        for key, value in da.items():
            assert (value is None) == (db[key] is None), (name, key)
            if value is not None:
                assert db[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (name, key)


def test_gloo_two_processes_match_one(tmp_path):
    x, y = _data(n=250, noise=1.5)
    y[y == 4] = 3  # class 4 absent
    x, model = x.double(), _mlp().double().eval()  # float64: the merge order changes nothing but rounding
    mon = CollapseMonitor(model, classifier="fc", num_classes=5, layers=["block1"])
    single = _run_epochs(model, mon, _batches(x, y, 20))
    single.append(mon.evaluate(_batches(x, y, 30)))
    state = model.state_dict()
    mp.spawn(_ddp_worker, args=(2, free_port(), state, x, y, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = [MonitorResult.from_dict(d) for d in torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)]
        assert len(got) == 3
        for a, b in zip(single, got):
            _assert_close_results(a, b)
        assert got[1][PENULTIMATE].ncc_accuracy is not None
        assert got[0][PENULTIMATE].absent_classes == [4]


# ---------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@needs_cuda
def test_cuda_training_loop_never_synchronises():
    x, y = _data(n=512)
    x, y = x.cuda(), y.cuda()
    model = _mlp().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    # buffer_bytes=0: every batch is reduced (at the next capture) inside the checked loop
    mon = CollapseMonitor(model, classifier="fc", num_classes=5, layers=["block1"], buffer_bytes=0)
    for _ in range(2):
        torch.cuda.set_sync_debug_mode("error")
        try:
            for xb, yb in _batches(x, y, 64):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = model(xb)
                mon.update(yb)
                loss = F.cross_entropy(out.float(), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        result = mon.compute()
    assert result[PENULTIMATE].num_samples == 512
    assert result[PENULTIMATE].ncc_accuracy is not None


def test_without_within_cov_nc1_is_undefined_but_the_rest_is_there():
    x, y = _data()
    model = _mlp().eval()
    mon = CollapseMonitor(model, classifier="fc", num_classes=5, layers=["block1"], within_cov=False)
    auto = CollapseMonitor(model, classifier="fc", num_classes=5, layers=["block1"], max_cov_dim=30)
    with torch.no_grad():
        model(x)
    mon.update(y)
    auto.update(y)
    m = mon.compute()[PENULTIMATE]
    assert m.nc1 is None and m.undefined["nc1"]
    assert m.nc1_cdnv is not None and m.self_duality is not None
    r = auto.compute()
    assert r["block1"].nc1 is None and r[PENULTIMATE].nc1 is not None  # d = 32 > 30, d = 24 <= 30
    assert r.separation_law is None and "separation_law" in r.notes


def test_deferred_check_raises_at_compute():
    x, y = _data()
    model = _mlp().eval()
    mon = CollapseMonitor(model, classifier="fc", num_classes=5, check="deferred")
    with torch.no_grad():
        model(x)
    mon.update(y + 1)  # label 5 is out of range: not checked per batch
    with pytest.raises(ValueError, match="1 batch\\(es\\) \\(240 rows\\) were dropped at layer 'penultimate'"):
        mon.compute()


def test_train_ncc_off_leaves_nc4_to_evaluate():
    x, y = _data()
    model = _mlp().eval()
    mon = CollapseMonitor(model, classifier="fc", num_classes=5, train_ncc=False)
    for _ in range(2):
        with torch.no_grad():
            model(x)
        mon.update(y)
        m = mon.compute()[PENULTIMATE]
    assert m.ncc_accuracy is None and "train_ncc=False" in m.undefined["ncc_accuracy"]
    assert mon.evaluate([(x, y)])[PENULTIMATE].ncc_accuracy is not None


# ------------------------------------------------------------------- bad batches
class _Poison(nn.Module):
    """Identity, or NaN everywhere while ``on``: a batch that goes bad inside the model."""

    def __init__(self):
        super().__init__()
        self.on = False

    def forward(self, x):
        return x * float("nan") if self.on else x


def _poisonable_model(d=16, k=5):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("lin", nn.Linear(d, 12))
    model.add_module("poison", _Poison())
    model.add_module("fc", nn.Linear(12, k))
    return model.eval()


def _counts_of(mon, name):
    session = mon._session
    session.flush()
    return session.layers[name].stats.counts


def test_strict_bad_batch_raises_at_its_update_and_keeps_the_others():
    x, y = _data()
    batches = _batches(x, y)
    model = _mlp().eval()
    mon = CollapseMonitor(model, classifier="fc", num_classes=5, layers=["block1"], check="strict")
    with torch.no_grad():
        for xb, yb in batches[:3]:
            model(xb)
            mon.update(yb)
        model(torch.full_like(batches[3][0], float("nan")))
        with pytest.raises(ValueError, match="Expected finite features of layer 'block1', got NaN or Inf"):
            mon.update(batches[3][1])
        for xb, yb in batches[4:]:
            model(xb)
            mon.update(yb)
    good = torch.cat([yb for i, (_, yb) in enumerate(batches) if i != 3])
    want = torch.bincount(good, minlength=5)
    for name in ("block1", PENULTIMATE):
        assert torch.equal(_counts_of(mon, name), want)
    assert mon.compute()[PENULTIMATE].num_samples == good.numel()


def test_strict_bad_batch_in_collect_records_nothing_of_that_batch():
    x, y = _data()
    batches = _batches(x, y)
    model = _poisonable_model()
    mon = CollapseMonitor(model, classifier="fc", num_classes=5, layers=["lin"], check="strict")
    with torch.no_grad():
        for i, (xb, yb) in enumerate(batches):
            model.poison.on = i == 2
            if i == 2:
                # "lin" is captured before the poisoned penultimate features raise: rolled back
                with pytest.raises(ValueError, match="Expected finite features of layer 'penultimate'"):
                    with mon.collect(yb):
                        model(xb)
            else:
                with mon.collect(yb):
                    model(xb)
    good = torch.cat([yb for i, (_, yb) in enumerate(batches) if i != 2])
    want = torch.bincount(good, minlength=5)
    assert torch.equal(_counts_of(mon, "lin"), want)
    assert torch.equal(_counts_of(mon, PENULTIMATE), want)


def test_strict_rollback_survives_a_flush_inside_one_collect_block():
    x, y = _data()
    model = _poisonable_model()
    # room for 40 rows of 12 float32: the second forward of a block flushes mid-block
    mon = CollapseMonitor(model, classifier="fc", num_classes=5, layers=["lin"], check="strict", buffer_bytes=40 * 48)
    with torch.no_grad():
        with mon.collect(y[:30]):
            model(x[:30])
        with pytest.raises(ValueError, match="Expected finite features"):
            with mon.collect(y[30:40]):  # two forwards of one batch: "lin" flushes in the second
                model(x[30:40])
                model.poison.on = True
                model(x[30:40])
        model.poison.on = False
    want = torch.bincount(y[:30], minlength=5)
    assert torch.equal(_counts_of(mon, "lin"), want)
    assert torch.equal(_counts_of(mon, PENULTIMATE), want)


def test_deferred_drops_exactly_the_bad_batches_and_counts_rows():
    x, y = _data()
    batches = _batches(x, y)
    model = _mlp().eval()
    mon = CollapseMonitor(model, classifier="fc", num_classes=5, layers=["block1"], check="deferred")
    bad = {2: "nan", 5: "labels"}
    with torch.no_grad():
        for i, (xb, yb) in enumerate(batches):
            if bad.get(i) == "nan":
                xb = xb.clone()
                xb[3, 0] = float("inf")
            if bad.get(i) == "labels":
                yb = yb.clone()
                yb[0] = 5
            model(xb)
            mon.update(yb)
    rows = sum(len(batches[i][1]) for i in bad)
    with pytest.raises(ValueError, match=f"2 batch\\(es\\) \\({rows} rows\\) were dropped at layer 'block1'"):
        mon.compute()
    good = torch.cat([yb for i, (_, yb) in enumerate(batches) if i not in bad])
    want = torch.bincount(good, minlength=5)
    for name in ("block1", PENULTIMATE):
        assert torch.equal(_counts_of(mon, name), want)
    ref = stats_of(model.block1(torch.cat([xb for i, (xb, _) in enumerate(batches) if i not in bad])).double(), good, 5)
    _assert_same_stats(mon._session.layers["block1"].stats, ref, rtol=1e-6)


def test_failed_flush_leaves_the_buffer_as_it_was(monkeypatch):
    x, y = _data()
    model = _mlp().eval()
    mon = CollapseMonitor(model, classifier="fc", num_classes=5)
    with torch.no_grad():
        for xb, yb in _batches(x, y):
            model(xb)
            mon.update(yb)
    layer = mon._session.layers[PENULTIMATE]
    fill = layer.fill
    original = ClassStats.update

    def broken(self, features, labels):
        raise RuntimeError("injected")

    monkeypatch.setattr(ClassStats, "update", broken)
    with pytest.raises(RuntimeError, match="injected"):
        mon.compute()
    assert layer.fill == fill
    monkeypatch.setattr(ClassStats, "update", original)
    assert mon.compute()[PENULTIMATE].num_samples == len(y)


# ------------------------------------------------------------------ load_state_dict
def _corruptions(state):
    def edit(fn):
        s = copy.deepcopy(state)
        fn(s)
        return s

    pen = PENULTIMATE
    yield "version", edit(lambda s: s.update(version=99))
    yield "missing key", edit(lambda s: s.pop("history"))
    yield "layer names", edit(lambda s: s.update(layer_names=["block1"]))
    yield "num_classes", edit(lambda s: s.update(num_classes=6))
    yield "layers keys", edit(lambda s: s["layers"].pop("block1"))
    yield "negative counts", edit(lambda s: s["layers"][pen]["stats"]["counts"].__setitem__(0, -3))
    yield "float counts", edit(lambda s: s["layers"][pen]["stats"].update(counts=torch.ones(5)))
    yield "means shape", edit(lambda s: s["layers"][pen]["stats"].update(means=torch.zeros(5, 7, dtype=torch.float64)))
    yield "within_cov", edit(lambda s: s["layers"][pen]["stats"].update(within_cov=False))
    yield "stats num_classes", edit(lambda s: s["layers"][pen]["stats"].update(num_classes=4))
    yield "ncc shape", edit(lambda s: s["layers"][pen].update(ncc=torch.zeros(2, dtype=torch.int64)))
    yield "rows dim", edit(lambda s: s["layers"][pen].update(rows=s["layers"][pen]["rows"][:, :3]))
    yield "labels range", edit(lambda s: s["layers"][pen]["labels"].__setitem__(0, 17))
    yield "prev shape", edit(lambda s: s["prev"][pen].update(means=torch.zeros(5, 3, dtype=torch.float64)))
    yield "prev layer", edit(lambda s: s["prev"].update(nope=s["prev"][pen]))
    yield "history", edit(lambda s: s["history"].append({"epoch": 1}))
    yield "epoch", edit(lambda s: s.update(epoch=-1))


def test_load_state_dict_is_atomic():
    x, y = _data()
    batches = _batches(x, y, 24)
    kwargs = dict(classifier="fc", num_classes=5, layers=["block1"], buffer_bytes=4000)
    model = _mlp().eval()
    mon = CollapseMonitor(model, **kwargs)
    twin = CollapseMonitor(copy.deepcopy(model), **kwargs)
    for m in (mon, twin):
        with torch.no_grad():
            for xb, yb in batches:
                m.model(xb)
                m.update(yb)
        m.compute()
        for xb, yb in batches[:5]:
            with torch.no_grad():
                m.model(xb)
            m.update(yb)
    state = mon.state_dict()
    twin.state_dict()  # saving folds the pending statistics (as every read does) in both
    assert state["layers"][PENULTIMATE]["rows"] is not None
    for what, bad in _corruptions(state):
        with pytest.raises((ValueError, TypeError), match="Expected"):
            mon.load_state_dict(bad)
        assert mon._epoch == 1 and len(mon.history) == 1, what
    _same_result(mon.compute(), twin.compute())


# ---------------------------------------------------------------- construction
def test_num_classes_must_match_the_classifier():
    model = _mlp()  # fc: Linear(24, 5)
    with pytest.raises(ValueError, match="Expected `num_classes` to equal the out_features 5 of the classifier 'fc'"):
        CollapseMonitor(model, classifier="fc", num_classes=7)
    torch.manual_seed(0)
    lazy = nn.Sequential()
    lazy.add_module("lin", nn.Linear(4, 6))
    lazy.add_module("fc", nn.LazyLinear(3))
    CollapseMonitor(lazy, classifier="fc", num_classes=4)
    with pytest.raises(ValueError, match="Expected `num_classes` to equal the out_features 3 of the classifier 'fc'"):
        lazy(torch.randn(8, 4))


def test_numpy_integers_accepted_and_bools_refused():
    np = pytest.importorskip("numpy")
    model = _mlp().eval()
    mon = CollapseMonitor(
        model,
        classifier="fc",
        num_classes=np.int64(5),
        every=np.int32(2),
        max_cov_dim=np.int64(30),
        buffer_bytes=np.int64(4096),
        minority=[np.int64(3), 4],
    )
    assert type(mon.num_classes) is int and mon.num_classes == 5 and mon.every == 2
    x, y = _data()
    with torch.no_grad():
        model(x)
    mon.update(y)
    assert mon.compute()[PENULTIMATE].num_samples == len(y)
    for name in ("num_classes", "every", "max_cov_dim"):
        kwargs = {"classifier": "fc", "num_classes": 5, name: True}
        with pytest.raises(ValueError, match=f"Expected `{name}` to be a positive int, got True"):
            CollapseMonitor(model, **kwargs)
    with pytest.raises(ValueError, match="Expected `num_classes` to be a positive int, got 5.0"):
        CollapseMonitor(model, classifier="fc", num_classes=5.0)
    with pytest.raises(ValueError, match="Expected `buffer_bytes` to be a non-negative int, got False"):
        CollapseMonitor(model, classifier="fc", num_classes=5, buffer_bytes=False)


def test_other_arguments_accepted_silently_but_wrong_are_refused():
    model = _mlp()
    base = dict(classifier="fc", num_classes=5)
    with pytest.raises(ValueError, match="Expected `within_cov` to be True, False or 'auto', got 1"):
        CollapseMonitor(model, **base, within_cov=1)
    with pytest.raises(ValueError, match="Expected `minority` to be class indices in \\[0, 5\\), got \\[1.5\\]"):
        CollapseMonitor(model, **base, minority=[1.5])
    with pytest.raises(ValueError, match="Expected `minority` to be class indices in \\[0, 5\\), got \\[0, 5\\]"):
        CollapseMonitor(model, **base, minority=[0, 5])
    with pytest.raises(ValueError, match="Expected `minority_threshold` to be a number in \\(0, 1\\], got nan"):
        CollapseMonitor(model, **base, minority_threshold=float("nan"))
    for name in ("train_ncc", "sync", "log_all_ranks", "penultimate"):
        with pytest.raises(TypeError, match=f"Expected `{name}` to be a bool, got 'no'"):
            CollapseMonitor(model, **base, **{name: "no"})


def test_integer_features_are_refused_at_capture():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("emb", nn.Identity())
    model.add_module("fc", nn.Linear(4, 3))
    mon = CollapseMonitor(model, classifier="fc", num_classes=3, layers=["emb"], penultimate=False)
    model.fc.register_forward_pre_hook(lambda m, a: (a[0].float(),))
    model(torch.arange(12).view(3, 4))
    with pytest.raises(TypeError, match="Expected layer 'emb' features to be float16/bfloat16/float32/float64"):
        mon.update(torch.tensor([0, 1, 2]))


# --------------------------------------------------------------------- autograd
def test_statistics_keep_no_autograd_graph():
    import gc
    import weakref

    torch.manual_seed(0)
    model = _conv_net(grid=1)
    proj = nn.Linear(4, 2)  # a learnable pool: its output would carry a graph
    mon = CollapseMonitor(
        model, classifier="fc", num_classes=3, layers=["act"], pool={"act": lambda t: proj(t.mean((2, 3)))}
    )
    refs = []
    model.act.register_forward_hook(lambda m, a, out: refs.append(weakref.ref(out)))
    x, y = torch.randn(6, 3, 5, 5), torch.arange(6) % 3
    for api in ("update", "collect"):
        if api == "update":
            out = model(x)
            mon.update(y)
        else:
            with mon.collect(y):
                out = model(x)
        out.sum().backward()
        for layer in mon._session.layers.values():
            assert layer.buf.grad_fn is None and not layer.buf.requires_grad
        del out
        gc.collect()
        assert refs[-1]() is None, api
    assert mon.compute()["act"].num_samples == 12
