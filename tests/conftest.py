import pytest
import torch

import collapse_ext

DEVICES = ["cpu"]
if torch.cuda.is_available() and collapse_ext.cuda_compiled():
    DEVICES.append("cuda")


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


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
