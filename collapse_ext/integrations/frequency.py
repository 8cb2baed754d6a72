"""Frequency views of token-level statistics (SPEC: "Language models": counts are Zipfian):
the buckets of token types by n_k (:func:`frequency_buckets`), the statistics of a subset
of classes (:func:`restrict`) and :class:`LMResult`, a MonitorResult with the views."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

import torch

from .._validate import positive_int
from ..metrics import CollapseMetrics
from ..monitor import MonitorResult
from ..monitor.result import layer_entry
from ..stats import ClassStats
from ..stats.slots import select_classes

__all__ = ["VIEWS", "FrequencyBuckets", "LMResult", "frequency_buckets", "restrict"]

# The frequency views of an LMResult, in this order.
VIEWS = ("frequent", "head", "body", "tail")


class FrequencyBuckets(NamedTuple):
    """Token ids (int64, by descending count, ties by id) of each frequency bucket of the
    tokens with n_k >= min_count, and the present tokens below it (``rare``, by id)."""

    head: torch.Tensor
    body: torch.Tensor
    tail: torch.Tensor
    rare: torch.Tensor

    @property
    def frequent(self) -> torch.Tensor:
        """Every token with n_k >= min_count (head, body, tail), by descending count."""
        return torch.cat([self.head, self.body, self.tail])


def _fraction(value: Any, name: str, closed: bool) -> float:
    x = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    if not (0 < x <= 1 if closed else 0 <= x < 1):
        interval = "(0, 1]" if closed else "[0, 1)"
        raise ValueError(f"Expected `{name}` to be a number in {interval}, got {value!r}")
    return x


def frequency_buckets(
    counts: torch.Tensor, *, min_count: int = 2, head: float = 0.01, tail: float = 0.5
) -> FrequencyBuckets:
    """Split the tokens by frequency.

    counts: (K,) int, n_k per token. Over the F tokens with n_k >= ``min_count``, sorted by
    descending count (ties by id): ``head`` = the first max(1, ceil(head * F)), ``tail`` =
    the last floor(tail * F) of the rest, ``body`` = what is between; ``rare`` = the
    present tokens (n_k >= 1) below ``min_count``. Example: Zipf counts n_k = 1000 // (k+1)
    for K = 1000, min_count 2: F = 500 (n_k >= 2 up to k = 499), head = [0, 1, 2, 3, 4],
    tail = the 250 tokens 250..499, rare = 500..999.
    """
    if not isinstance(counts, torch.Tensor) or counts.dim() != 1 or counts.is_floating_point():
        got = f"{tuple(counts.shape)} {counts.dtype}" if isinstance(counts, torch.Tensor) else type(counts).__name__
        raise ValueError(f"Expected `counts` to be a (K,) integer tensor, got {got}")
    min_count = positive_int(min_count, "min_count")
    head = _fraction(head, "head", closed=True)
    tail = _fraction(tail, "tail", closed=False)
    counts = counts.detach().cpu().long()
    kept = (counts >= min_count).nonzero().flatten()
    order = kept[torch.argsort(-counts[kept], stable=True)]
    f = order.numel()
    n_head = min(f, max(1, math.ceil(head * f)))
    n_tail = min(f - n_head, math.floor(tail * f))
    rare = ((counts >= 1) & (counts < min_count)).nonzero().flatten()
    return FrequencyBuckets(order[:n_head], order[n_head : f - n_tail], order[f - n_tail :], rare)


def restrict(stats: ClassStats, classes: torch.Tensor | Sequence[int]) -> ClassStats:
    """The statistics of the classes ``classes`` (K',) of ``stats`` as a K'-class ClassStats,
    class j being ``classes[j]``. The pooled S_W cannot be split by class, so the result has
    none (NC1's trace ratio needs it; the NC1 quotient and CDNV use the per-class ss_k)."""
    idx = torch.as_tensor(classes, dtype=torch.int64).to(stats.device)
    k = positive_int(idx.numel(), "len(classes)")
    state = select_classes(stats.state_dict(), idx)
    state.pop("scatter", None)
    state.update(num_classes=k, within_cov=False)
    out = ClassStats(k, stats.dim, device=stats.device, within_cov=False, global_mean=stats.global_mean_mode)
    out.load_state_dict(state)
    return out


@dataclass
class LMResult(MonitorResult):
    """A :class:`~collapse_ext.MonitorResult` with the frequency views of the final hidden
    states: ``views`` {``"frequent"``, ``"head"``, ``"body"``, ``"tail"``: CollapseMetrics}
    (a view with no token is left out, with the reason in ``notes``) and ``buckets``
    {view: {"tokens", "rows", "min_count", "max_count"}}. Class indices inside a view
    (``absent_classes``, ``minority_classes``) are positions in the view, not token ids."""

    views: dict[str, CollapseMetrics] = field(default_factory=dict)
    buckets: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["views"] = {name: layer_entry(m) for name, m in self.views.items()}
        out["buckets"] = {name: dict(b) for name, b in self.buckets.items()}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LMResult:
        base = MonitorResult.from_dict(data)
        views = MonitorResult.from_dict({**data, "layers": data.get("views", {})}).layers
        buckets = {k: {n: int(v) for n, v in b.items()} for k, b in data.get("buckets", {}).items()}
        return cls(**{f.name: getattr(base, f.name) for f in fields(MonitorResult)}, views=views, buckets=buckets)

    def flat(self) -> dict[str, float | int | str | None]:
        """The base row plus ``view/<view>/<metric>`` for every view (None when absent), so
        every row of a run has the same keys."""
        row = super().flat()
        names = CollapseMetrics().to_dict()
        for view in VIEWS:
            values = self.views[view].to_dict() if view in self.views else dict.fromkeys(names)
            for key, value in values.items():
                row[f"view/{view}/{key}"] = value
        return row

    def summary(self, layer: str | None = None) -> str:
        line = super().summary(layer)
        parts = []
        for view in ("head", "body", "tail"):
            m = self.views.get(view)
            if m is not None and m.nc1_cdnv is not None:
                parts.append(f"{view} {m.nc1_cdnv:.3g}")
        return line + ("  CDNV by frequency: " + ", ".join(parts) if parts else "")
