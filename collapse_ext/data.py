"""scikit-learn's bundled ``digits`` data and the small MLP that reaches neural collapse on it.

Shared by the demo (``collapse-ext demo``), the integration tests and the benchmarks; no
download: ``sklearn.datasets.load_digits`` ships with scikit-learn (1797 images, 8 x 8,
10 classes). The recipe is the one measured in the project notes: MLP 64-256-256-256-10
with BatchNorm and ReLU, SGD with momentum 0.9, batch 128, lr 0.1, weight decay 5e-3,
learning rate divided by 10 at 1/3 and 2/3 of training.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DigitsRun", "batches", "load_digits", "make_mlp", "subsample", "train_digits"]

MINORITY = (5, 6, 7, 8, 9)


def load_digits(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits data: features (1797, 64) ``dtype``, standardised per pixel (constant
    pixels stay 0), labels (1797,) int64 in [0, 10)."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as err:
        raise ImportError("the digits data needs scikit-learn: pip install scikit-learn") from err
    raw = sk_load_digits()
    x = torch.as_tensor(raw.data, dtype=torch.float64)
    std = x.std(0)
    x = (x - x.mean(0)) / torch.where(std > 0, std, torch.ones_like(std))
    return x.to(dtype), torch.as_tensor(raw.target, dtype=torch.int64)


def subsample(
    x: torch.Tensor, y: torch.Tensor, classes: Sequence[int] = MINORITY, factor: int = 10, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep one sample in ``factor`` of each of ``classes`` (at least one), chosen at random
    with ``seed``; the other classes are kept whole. Rows stay in their original order."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor <= 0:
        raise ValueError(f"Expected `factor` to be a positive int, got {factor!r}")
    g = torch.Generator().manual_seed(seed)
    keep = torch.ones(y.shape[0], dtype=torch.bool)
    for c in classes:
        idx = (y == c).nonzero().flatten()
        if idx.numel() == 0:
            continue
        chosen = idx[torch.randperm(idx.numel(), generator=g)[: max(1, idx.numel() // factor)]]
        keep[idx] = False
        keep[chosen] = True
    return x[keep], y[keep]


def make_mlp(
    in_dim: int = 64,
    widths: Sequence[int] = (256, 256, 256),
    num_classes: int = 10,
    *,
    batchnorm: bool = True,
) -> nn.Sequential:
    """Linear-BatchNorm-ReLU blocks named ``block1``, ``block2``, ... and the classifier
    ``fc``: the penultimate features are the output of the last block (input of ``fc``)."""
    blocks: OrderedDict[str, nn.Module] = OrderedDict()
    prev = in_dim
    for i, width in enumerate(widths, 1):
        parts = [nn.Linear(prev, width)] + ([nn.BatchNorm1d(width)] if batchnorm else []) + [nn.ReLU()]
        blocks[f"block{i}"] = nn.Sequential(*parts)
        prev = width
    blocks["fc"] = nn.Linear(prev, num_classes)
    return nn.Sequential(blocks)


def batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, *, generator: torch.Generator | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches of (x, y), shuffled with ``generator`` (in order without one); the last
    batch may be smaller."""
    order = torch.randperm(y.shape[0], generator=generator) if generator is not None else torch.arange(y.shape[0])
    for start in range(0, y.shape[0], batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx]


@dataclass
class DigitsRun:
    """What :func:`train_digits` returns: the trained model, its monitor and the train
    accuracy (eval mode) after every epoch."""

    model: nn.Module
    monitor: Any
    train_accuracy: list[float] = field(default_factory=list)
    data: tuple[torch.Tensor, torch.Tensor] | None = None


def train_digits(
    epochs: int = 300,
    *,
    imbalanced: bool = False,
    seed: int = 0,
    lr: float = 0.1,
    weight_decay: float = 5e-3,
    label_smoothing: float = 0.0,
    batch_size: int = 128,
    monitor_kwargs: dict[str, Any] | None = None,
    evaluate_every: int = 0,
    on_epoch: Callable[[int, DigitsRun], None] | None = None,
) -> DigitsRun:
    """Train the digits MLP with a :class:`~collapse_ext.CollapseMonitor` attached.

    imbalanced: classes 5-9 subsampled 10x; label_smoothing: of the cross-entropy (0.1
    about halves the final balanced NC1). The monitor (``monitor_kwargs`` override the
    defaults: classifier ``fc``, layers ``block1`` and ``block2``) records every training
    batch (``compute()`` each epoch, train-mode features); with ``evaluate_every`` = e > 0
    it also runs :meth:`~collapse_ext.CollapseMonitor.evaluate` (eval mode, exact NC4)
    every e epochs and after the last. ``on_epoch(epoch, run)`` is called after each epoch.
    """
    from .monitor import CollapseMonitor

    torch.manual_seed(seed)
    x, y = load_digits()
    if imbalanced:
        x, y = subsample(x, y, seed=seed)
    model = make_mlp()
    kwargs = dict(classifier="fc", num_classes=10, layers=["block1", "block2"])
    kwargs.update(monitor_kwargs or {})
    monitor = CollapseMonitor(model, **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[epochs // 3, 2 * epochs // 3], gamma=0.1)
    g = torch.Generator().manual_seed(seed)
    run = DigitsRun(model, monitor, data=(x, y))
    whole = [(x, y)]
    for epoch in range(1, epochs + 1):
        model.train()
        for xb, yb in batches(x, y, batch_size, generator=g):
            loss = F.cross_entropy(model(xb), yb, label_smoothing=label_smoothing)
            monitor.update(yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        monitor.compute()
        model.eval()
        with torch.no_grad(), monitor.paused():
            run.train_accuracy.append(float((model(x).argmax(1) == y).double().mean()))
        if evaluate_every and (epoch % evaluate_every == 0 or epoch == epochs):
            monitor.evaluate(whole)
        if on_epoch is not None:
            on_epoch(epoch, run)
    return run
