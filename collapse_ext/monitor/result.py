"""The result of one measurement of :class:`~collapse_ext.CollapseMonitor`: the metric
bundle of every monitored layer, its dict form (JSON, persistence) and its formatting."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from ..metrics import CollapseMetrics

__all__ = ["MonitorResult", "layer_entry"]


def layer_entry(m: CollapseMetrics) -> dict[str, Any]:
    """The dict form of one layer's bundle in :meth:`MonitorResult.to_dict` (read back by
    :meth:`MonitorResult.from_dict`)."""
    return {
        "metrics": m.to_dict(),
        "absent_classes": list(m.absent_classes),
        "minority_classes": list(m.minority_classes),
        "ncc_means": m.ncc_means,
        "prediction": m.prediction,
        "undefined": dict(m.undefined),
    }


@dataclass
class MonitorResult:
    """One measurement: the metric bundle of every monitored layer.

    epoch: training epochs completed when it was taken (1 for the first ``compute()``);
    phase: ``"train"`` (statistics of the batches seen since the last ``compute()``) or
    ``"eval"`` (:meth:`CollapseMonitor.evaluate`, fixed model, NC4 with the final means);
    step: batches seen so far; layers: {name: CollapseMetrics} from the input layer to the
    penultimate features; separation_law: He & Su's fit log D_l = a + l log rho over the
    layers' separation fuzziness (``rho``, ``r2``, ``pearson``, ``intercept``), or None
    with the reason in ``notes``.
    """

    epoch: int
    phase: str
    step: int
    layers: dict[str, CollapseMetrics]
    separation_law: dict[str, float] | None = None
    notes: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, layer: str) -> CollapseMetrics:
        try:
            return self.layers[layer]
        except KeyError:
            raise KeyError(f"Expected one of the monitored layers {list(self.layers)}, got {layer!r}") from None

    @property
    def separation_fuzziness(self) -> dict[str, float | None]:
        """{layer: D_l}, He & Su's tr(SS_W SS_B^+) per layer."""
        return {name: m.separation_fuzziness for name, m in self.layers.items()}

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict (JSON-ready); :meth:`from_dict` rebuilds the result."""
        layers = {name: layer_entry(m) for name, m in self.layers.items()}
        return {
            "epoch": self.epoch,
            "phase": self.phase,
            "step": self.step,
            "layers": layers,
            "separation_law": None if self.separation_law is None else dict(self.separation_law),
            "notes": dict(self.notes),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MonitorResult:
        known = {f.name for f in fields(CollapseMetrics)}
        layers = {}
        for name, entry in data["layers"].items():
            values = {k: v for k, v in entry["metrics"].items() if k in known}
            for count in ("num_samples", "num_present"):
                if values.get(count) is not None:
                    values[count] = int(values[count])
            layers[name] = CollapseMetrics(
                **values,
                absent_classes=list(entry.get("absent_classes", [])),
                minority_classes=list(entry.get("minority_classes", [])),
                ncc_means=entry.get("ncc_means"),
                prediction=entry.get("prediction"),
                undefined=dict(entry.get("undefined", {})),
            )
        law = data.get("separation_law")
        return cls(
            epoch=int(data["epoch"]),
            phase=str(data["phase"]),
            step=int(data["step"]),
            layers=layers,
            separation_law=None if law is None else dict(law),
            notes=dict(data.get("notes", {})),
        )

    def flat(self) -> dict[str, float | int | str | None]:
        """One flat row {"epoch", "phase", "step", "<layer>/<metric>", "separation_law/<x>"}."""
        row: dict[str, float | int | str | None] = {"epoch": self.epoch, "phase": self.phase, "step": self.step}
        for name, m in self.layers.items():
            for key, value in m.to_dict().items():
                row[f"{name}/{key}"] = value
        for key in ("rho", "r2", "pearson"):
            row[f"separation_law/{key}"] = None if self.separation_law is None else self.separation_law[key]
        return row

    def summary(self, layer: str | None = None) -> str:
        """One line of the headline numbers of ``layer`` (default: the last, penultimate)."""
        name = layer or list(self.layers)[-1]
        m = self[name]

        def fmt(v: float | None) -> str:
            return "-" if v is None else f"{v:.3g}"

        parts = [
            f"epoch {self.epoch:>4} {self.phase:<5}",
            f"NC1 {fmt(m.nc1)}",
            f"CDNV {fmt(m.nc1_cdnv)}",
            f"ETF(M) {fmt(m.etf_error_means)}",
            f"ETF(W) {fmt(m.etf_error_weights)}",
            f"NC3 {fmt(m.self_duality)}",
            f"NCC acc {fmt(m.ncc_accuracy)}",
            f"NC4 {fmt(m.ncc_mismatch)}",
        ]
        if m.minority_classes:
            parts.append(f"minority cos(W) {fmt(m.minority_cos_mean)}")
        if m.prediction:
            parts.append(f"vs {m.prediction}: dG(W) {fmt(m.gram_W_distance)} dG(M) {fmt(m.gram_H_distance)}")
        if self.separation_law is not None:
            parts.append(f"rho {self.separation_law['rho']:.3g}")
        return "  ".join(parts)

    def __str__(self) -> str:
        lines = [f"CollapseMonitor result: epoch {self.epoch}, phase {self.phase}, step {self.step}"]
        for name, m in self.layers.items():
            lines += ["", f"[{name}]", str(m)]
        lines.append("")
        if self.separation_law is not None:
            law = self.separation_law
            d = ", ".join(f"{k}={'-' if v is None else f'{v:.4g}'}" for k, v in self.separation_fuzziness.items())
            lines.append(f"separation fuzziness D_l: {d}")
            lines.append(f"separation law: rho={law['rho']:.4g}  R^2={law['r2']:.4f}  pearson={law['pearson']:.4f}")
        for key, note in self.notes.items():
            lines.append(f"{key}: {note}")
        return "\n".join(lines)
