"""The suite's ops as pytest-benchmark tests: ``pytest benchmarks/ --benchmark-only``
(``make bench-pytest``; not part of ``make test``). One modest shape per op, on the CPU and,
when the extension has CUDA kernels and a GPU is present, on the GPU; every call ends with
a device synchronisation so the GPU's queued work is timed."""

from __future__ import annotations

import pytest
import torch

import collapse_ext
from collapse_ext import ClassStats, class_stats, lpm_step, nearest_centre, pairwise_stats, within_scatter

from .common import lpm_step_inputs, sync

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and collapse_ext.cuda_compiled() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def _run(benchmark, device, fn):
    def call():
        out = fn()
        sync(device)
        return out

    call()  # warm-up: first-call allocations and kernel loads stay out of the timing
    return benchmark(call)


def _features(n, d, k, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, k, (n,), generator=g)
    return x.to(device), y.to(device)


def test_class_stats(benchmark, device):
    x, y = _features(20_000, 512, 10, device)
    counts, _, _ = _run(benchmark, device, lambda: class_stats(x, y, 10))
    assert int(counts.sum()) == 20_000


def test_class_stats_update_with_scatter(benchmark, device):
    x, y = _features(20_000, 512, 10, device)
    stats = _run(benchmark, device, lambda: ClassStats(10, 512, device=device).update(x, y))
    assert stats.within_cov().shape == (512, 512)


def test_within_scatter(benchmark, device):
    x, y = _features(20_000, 512, 10, device)
    _, means, _ = class_stats(x, y, 10)
    scatter = _run(benchmark, device, lambda: within_scatter(x, y, means.float()))
    assert scatter.shape == (512, 512)


def test_pairwise_stats(benchmark, device):
    rows, _ = _features(1000, 768, 1, device)
    _run(benchmark, device, lambda: pairwise_stats(rows))


def test_nearest_centre(benchmark, device):
    x, y = _features(20_000, 512, 100, device)
    means = torch.randn(100, 512, device=device)
    _run(benchmark, device, lambda: nearest_centre(x, y, means))


def test_lpm_step(benchmark, device):
    args = lpm_step_inputs(512, 10, torch.float64, device)
    _run(benchmark, device, lambda: lpm_step(*args, 100, "ce", True))


def test_minority_collapse_sweep(benchmark):
    ratios = [10 ** (i / 10) for i in range(0, 41, 4)]
    benchmark.pedantic(lambda: collapse_ext.minority_collapse_sweep(10, 5, ratios, 1.0, 5.0), rounds=1, iterations=1)
