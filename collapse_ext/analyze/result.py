"""What :func:`~collapse_ext.analyze.analyze` measured: :class:`AnalyzeResult`, its
``--json`` object (SPEC: "`collapse-ext analyze --json` output") and its summary."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..metrics import CollapseMetrics, SeparationLaw
from ..stats import ClassStats


@dataclass
class AnalyzeResult:
    """What :func:`analyze` measured. ``layers`` maps each feature key to its bundle (in
    the order given); ``metrics`` is the bundle of the last key, the classifier's input;
    ``stats`` the merged ClassStats per key."""

    source: str
    num_samples: int
    num_classes: int
    layers: dict[str, CollapseMetrics]
    stats: dict[str, ClassStats]
    separation_law: SeparationLaw | None = None
    skipped_nonfinite: int = 0
    classifier: str | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    passes: int = 1
    seconds: float = 0.0
    bytes_read: int = 0
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def metrics(self) -> CollapseMetrics:
        return self.layers[self.classifier_layer]

    @property
    def classifier_layer(self) -> str:
        return list(self.layers)[-1]

    @property
    def absent_classes(self) -> list[int]:
        return self.metrics.absent_classes

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` object (SPEC: "`collapse-ext analyze --json` output"); non-finite
        numbers become null."""
        m = self.metrics
        out: dict[str, Any] = {
            "source": self.source,
            "num_samples": self.num_samples,
            "num_classes": self.num_classes,
            "absent_classes": list(m.absent_classes),
            "metrics": _numbers(m.to_dict()),
            "undefined": dict(m.undefined),
            "minority_classes": list(m.minority_classes),
            "ncc_means": m.ncc_means,
            "skipped_nonfinite": self.skipped_nonfinite,
            "classifier": self.classifier,
        }
        if len(self.layers) > 1:
            out["metrics_layer"] = self.classifier_layer
            out["layers"] = [
                {"name": name, "dim": self.stats[name].dim, "metrics": _numbers(b.to_dict()), "undefined": b.undefined}
                for name, b in self.layers.items()
            ]
            law = self.separation_law
            out["separation_law"] = None if law is None else _numbers(law._asdict())
        return out

    def summary(self) -> str:
        """A few lines: sizes, then the metric table of every layer."""
        lines = [
            f"{self.source}: {self.num_samples} samples, {self.num_classes} classes "
            f"({len(self.absent_classes)} absent), {len(self.layers)} layer(s), {self.passes} pass(es), "
            f"{self.seconds:.2f} s"
        ]
        if self.skipped_nonfinite:
            lines.append(f"skipped {self.skipped_nonfinite} rows with NaN/Inf features")
        for name, bundle in self.layers.items():
            lines += ["", f"== {name} (d = {self.stats[name].dim})", str(bundle)]
        if self.separation_law is not None:
            law = self.separation_law
            lines.append(
                f"\nlaw of data separation: rho = {law.rho:.4g}, R^2 = {law.r2:.4f}, pearson = {law.pearson:.4f}"
            )
        for what, note in self.notes.items():
            lines.append(f"{what}: {note}")
        return "\n".join(lines)


def _numbers(d: dict[str, Any]) -> dict[str, float | None]:
    return {k: (float(v) if v is not None and math.isfinite(float(v)) else None) for k, v in d.items()}
