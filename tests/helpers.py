"""What the tests share: the devices to run on, the CUDA skip, data makers, the relative
error, a free TCP port for process groups and the command line's exit status.

Importable from any test module (``from helpers import ...``: pytest puts ``tests/`` on
``sys.path``); ``conftest.py`` builds the ``device`` fixture from :data:`DEVICES`.
"""

from __future__ import annotations

import socket

import pytest
import torch

import collapse_ext
from collapse_ext import ClassStats

DEVICES = ["cpu"]
if torch.cuda.is_available() and collapse_ext.cuda_compiled():
    DEVICES.append("cuda")

needs_cuda = pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA device and the CUDA build")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected||_F / ||expected||_F in float64 (absolute when expected is 0)."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    scale = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / scale if scale > 0 else diff


def collapsed_features(n, d, k, noise, offset=0.0, mean_norm=10.0, seed=0, dtype=torch.float32):
    """Features near collapse: class means of norm `mean_norm`, within-class noise
    `noise * mean_norm`, a common `offset` on every coordinate, labels balanced."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, d, generator=g, dtype=torch.float64)
    means = mean_norm * means / means.norm(dim=1, keepdim=True)
    labels = torch.arange(n) % k
    labels = labels[torch.randperm(n, generator=g)]
    x = means[labels] + noise * mean_norm * torch.randn(n, d, generator=g, dtype=torch.float64) / d**0.5
    return (x + offset).to(dtype), labels


def stats_of(x, y, k, device="cpu", batches=1, **kw) -> ClassStats:
    """A ClassStats of (x, y) fed in ``batches`` pieces on ``device``; ``kw`` to ClassStats."""
    stats = ClassStats(k, x.shape[1], device=device, **kw)
    for xb, yb in zip(x.tensor_split(batches), y.tensor_split(batches)):
        stats.update(xb.to(device), yb.to(device))
    return stats


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a process group's MASTER_PORT)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_main(argv) -> int:
    """``collapse_ext.cli.main(argv)``'s exit status, whether returned or raised."""
    from collapse_ext.cli import main

    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code
