"""Training-loop integration: :class:`CollapseMonitor` (SPEC: "Metrics", measured while training).

Forward hooks on the classifier's input (the penultimate features) and on any named
layers feed one :class:`~collapse_ext.ClassStats` per layer. A training loop needs two
extra lines::

    monitor = CollapseMonitor(model, classifier="fc", num_classes=10)
    for epoch in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            monitor.update(y)              # labels of the forward that just ran
            opt.zero_grad(); loss.backward(); opt.step()
        print(monitor.compute())           # per-layer NC1..NC4, appended to monitor.history

Per batch the hooks only copy the detached (pooled) features into a per-layer buffer;
full buffers are reduced by the fused ``class_stats`` / ``within_scatter`` ops and merged
exactly (Chan et al.). Nothing in the per-batch path reads a value back to the host, so a
CUDA training loop never stalls: on CUDA the statistics use ``check="deferred"`` and the
NC4 counts accumulate on the device.

NC4 (nearest class centre, Papyan et al. 2020) needs the class means before the samples
are classified. During training it uses the previous epoch's means (said so in the
result; undefined in the first epoch); :meth:`CollapseMonitor.evaluate` makes the exact
two-pass measurement on a fixed model: statistics first, then NC4 with the final means.
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from ._ops import nearest_centre
from .metrics import CollapseMetrics, collapse_metrics, fit_separation_law
from .stats import ClassStats

__all__ = ["PENULTIMATE", "CollapseMonitor", "MonitorResult"]

PENULTIMATE = "penultimate"
_POOLS = ("avg", "max", "flatten")
_STATE_VERSION = 1


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _index(value: Any) -> int | None:
    """``value`` as a Python int when it is an integer (int, numpy integer, 0-dim integer
    tensor: anything with ``__index__``), None otherwise; bools are not integers here."""
    if isinstance(value, bool) or type(value).__name__ in ("bool", "bool_"):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _positive_int(value: Any, name: str) -> int:
    out = _index(value)
    if out is None or out <= 0:
        raise ValueError(f"Expected `{name}` to be a positive int, got {value!r}")
    return out


def _flag(value: Any, name: str) -> bool:
    """A bool (or numpy bool): ``bool("no")`` would silently be True."""
    if isinstance(value, bool) or type(value).__name__ in ("bool", "bool_"):
        return bool(value)
    raise TypeError(f"Expected `{name}` to be a bool, got {value!r}")


# ----------------------------------------------------------------------------- result
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
        layers = {}
        for name, m in self.layers.items():
            layers[name] = {
                "metrics": m.to_dict(),
                "absent_classes": list(m.absent_classes),
                "minority_classes": list(m.minority_classes),
                "ncc_means": m.ncc_means,
                "undefined": dict(m.undefined),
            }
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


# -------------------------------------------------------------------------- per layer
class _Layer:
    """Accumulation state of one monitored layer for one measurement (train or eval).

    Captured rows are copied into a preallocated buffer (one copy, no allocation) and
    reduced when it is full: large reductions keep the per-row cost of S_W at GEMM speed
    and run the O(K d^2) Chan merge once per buffer instead of once per batch.

    Every batch is validated when it is captured. ``check="strict"`` raises there (one host
    read) and records nothing of it. ``check="deferred"`` computes the batch's validity on
    the device (finite features, labels in [0, K)) and, for a bad batch, zeroes its rows
    and gives them the label K: the accumulator has K + 1 classes, and class K (rows of
    zeros about their own zero mean) adds nothing to counts, means, ss_k or S_W of the
    classes 0..K-1, so one reduction of the whole buffer drops exactly those rows without
    a host synchronisation. ``dropped`` counts them [batches, rows] for ``compute()``.
    """

    def __init__(self, monitor: CollapseMonitor) -> None:
        self.monitor = monitor
        self.acc: ClassStats | None = None  # K + 1 classes (class K: rows of dropped batches)
        self.check = "strict"
        self.buf: torch.Tensor | None = None
        self.lab: torch.Tensor | None = None
        self.pred: torch.Tensor | None = None
        self.fill = 0
        # first buffered row of the batch being recorded (and the drop counts before it):
        # an error inside the batch rolls back to there
        self.batch_start = 0
        self.batch_dropped: torch.Tensor | None = None
        self.last_rows: tuple[int, int, torch.Tensor | None] | None = None
        self.ncc: torch.Tensor | None = None
        self.dropped: torch.Tensor | None = None
        self.means: tuple[torch.Tensor, torch.Tensor] | None = None
        self.ncc_only = False

    @property
    def stats(self) -> ClassStats | None:
        """The K-class statistics of the reduced rows (a copy; ``None`` before the first batch)."""
        return None if self.acc is None else _drop_class(self.acc, self.monitor.num_classes)

    def allocate(self, dim: int, device: torch.device) -> None:
        mon = self.monitor
        cov = mon.within_cov if isinstance(mon.within_cov, bool) else dim <= mon.max_cov_dim
        self.check = mon.check or ("deferred" if device.type == "cuda" else "strict")
        with torch.inference_mode(False):
            self.acc = ClassStats(mon.num_classes + 1, dim, device=device, within_cov=cov, check=self.check)
            self.ncc = torch.zeros(3, dtype=torch.int64, device=device)
            self.dropped = torch.zeros(2, dtype=torch.int64, device=device)
        self.batch_dropped = self.dropped

    def begin_batch(self) -> None:
        self.batch_start = self.fill
        self.batch_dropped = self.dropped

    def rollback(self) -> None:
        """Forget what the batch being recorded captured (it failed)."""
        self.fill = self.batch_start
        self.last_rows = None
        self.dropped = self.batch_dropped

    def validate(self, name: str, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Check a batch before anything of it is recorded: shapes, dtype, device, and (strict)
        finite features and labels in [0, K). Returns the labels on the features' device and,
        in deferred mode, the batch's validity as a 0-dim bool tensor on the device."""
        k = self.monitor.num_classes
        if labels.shape[0] != x.shape[0]:
            raise ValueError(
                f"Expected labels for the {x.shape[0]} rows layer {name!r} saw in this forward, got {labels.shape[0]}"
            )
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"Expected layer {name!r} features to be float16/bfloat16/float32/float64, got {x.dtype}")
        if x.shape[1] == 0:
            raise ValueError(f"Expected layer {name!r} features of shape (N, d) with d > 0, got {tuple(x.shape)}")
        if self.acc is not None and x.shape[1] != self.acc.dim:
            raise ValueError(
                f"Expected layer {name!r} to give features of dim {self.acc.dim} like its first batch, "
                f"got {tuple(x.shape)}"
            )
        if self.acc is not None and x.device != self.acc.device:
            raise ValueError(f"Expected layer {name!r} features on {self.acc.device}, got {x.device}")
        check = (
            self.check
            if self.acc is not None
            else self.monitor.check or ("deferred" if x.device.type == "cuda" else "strict")
        )
        labels = labels.to(x.device, non_blocking=True)
        if check == "strict":
            if labels.numel() and not bool(((labels >= 0) & (labels < k)).all()):
                lo, hi = int(labels.min()), int(labels.max())
                raise ValueError(f"Expected `labels` in [0, {k}), got values in [{lo}, {hi}]")
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"Expected finite features of layer {name!r}, got NaN or Inf")
            return labels, None
        return labels, torch.isfinite(x).all() & ((labels >= 0) & (labels < k)).all()

    def capture(self, x: torch.Tensor, labels: torch.Tensor, ok: torch.Tensor | None) -> None:
        """Append a validated batch (``ok``: its device-side validity in deferred mode)."""
        if self.acc is None:
            self.allocate(x.shape[1], x.device)
        n = x.shape[0]
        if self.buf is not None and (self.buf.dtype != x.dtype or self.fill + n > self.buf.shape[0]):
            self.flush(upto=self.batch_start)
        if self.buf is None or self.buf.dtype != x.dtype or self.fill + n > self.buf.shape[0]:
            self._grow(x, self.fill + n)
        start, end = self.fill, self.fill + n
        self.buf[start:end].copy_(x)
        self.lab[start:end].copy_(labels)
        self.pred[start:end].fill_(-1)
        if ok is not None:
            bad = ~ok
            self.buf[start:end].masked_fill_(bad, 0)
            self.lab[start:end].masked_fill_(bad, self.monitor.num_classes)
            self.dropped = self.dropped + torch.stack([bad.long(), bad.long() * n])
        self.last_rows = (start, n, ok)
        self.fill = end

    def _grow(self, x: torch.Tensor, need: int) -> None:
        """A buffer for at least ``need`` rows that keeps the rows already buffered (those of
        the batch being recorded, after a flush)."""
        dtype = x.dtype if self.fill == 0 else torch.promote_types(self.buf.dtype, x.dtype)
        width = x.shape[1] * torch.empty((), dtype=dtype).element_size()
        rows = max(self.monitor.buffer_bytes // width, need)
        with torch.inference_mode(False):
            buf = torch.empty(rows, x.shape[1], dtype=dtype, device=x.device)
            lab = torch.empty(rows, dtype=torch.int64, device=x.device)
            pred = torch.empty(rows, dtype=torch.int64, device=x.device)
        if self.fill:
            buf[: self.fill].copy_(self.buf[: self.fill])
            lab[: self.fill].copy_(self.lab[: self.fill])
            pred[: self.fill].copy_(self.pred[: self.fill])
        self.buf, self.lab, self.pred = buf, lab, pred

    def set_predictions(self, pred: torch.Tensor) -> None:
        """Predictions (argmax of the logits) of the forward whose rows were captured last."""
        if self.last_rows is None or pred.shape[0] != self.last_rows[1]:
            return
        start, n, ok = self.last_rows
        rows = self.pred[start : start + n]
        rows.copy_(pred)
        if ok is not None:
            rows.masked_fill_(~ok, -1)

    def flush(self, upto: int | None = None) -> None:
        """Reduce the buffered rows [0, upto) (default: all) and keep the rest at the front.
        The buffer changes only once the reduction succeeded."""
        end = self.fill if upto is None else upto
        if end > 0:
            x, y, pred = self.buf[:end], self.lab[:end], self.pred[:end]
            with contextlib.ExitStack() as stack:
                stack.enter_context(torch.no_grad())
                stack.enter_context(torch.inference_mode(False))
                stack.enter_context(torch.autocast(x.device.type, enabled=False))
                ncc = self.ncc
                if self.means is not None:
                    ncc = ncc + _ncc_counts(x, y, *self.means, pred, self.monitor.num_classes)
                if not self.ncc_only:
                    self.acc.update(x, y)
                self.ncc = ncc
        rest = self.fill - end
        if rest and end:
            for t in (self.buf, self.lab, self.pred):
                t[:rest].copy_(t[end : self.fill].clone())
        self.fill = rest
        self.batch_start = max(self.batch_start - end, 0)
        if self.last_rows is not None:
            start, n, ok = self.last_rows
            self.last_rows = (start - end, n, ok) if start >= end else None

    def set_means(self, means: torch.Tensor, present: torch.Tensor) -> None:
        """Class centres for NC4: means (K, d) float64, present (K,) bool."""
        self.means = (means, present)


def _drop_class(acc: ClassStats, k: int) -> ClassStats:
    """The statistics of classes 0..k-1 of ``acc`` as a k-class ClassStats."""
    state = acc.state_dict()
    state.update(num_classes=k, counts=state["counts"][:k], means=state["means"][:k], sqdev=state["sqdev"][:k])
    out = ClassStats(k, acc.dim, device=acc.device, within_cov=acc.within_cov_enabled)
    out.load_state_dict(state)
    return out


def _add_class(stats: ClassStats, check: str) -> ClassStats:
    """``stats`` with one more, empty class (the accumulator of a monitored layer)."""
    state = stats.state_dict()
    k, dev = stats.num_classes, stats.device
    state.update(
        num_classes=k + 1,
        counts=torch.cat([state["counts"], torch.zeros(1, dtype=torch.int64, device=dev)]),
        means=torch.cat([state["means"], torch.zeros(1, stats.dim, dtype=torch.float64, device=dev)]),
        sqdev=torch.cat([state["sqdev"], torch.zeros(1, dtype=torch.float64, device=dev)]),
    )
    out = ClassStats(k + 1, stats.dim, device=dev, within_cov=stats.within_cov_enabled, check=check)
    out.load_state_dict(state)
    return out


def _tensor(value: Any, what: str, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"Expected {what} to be a tensor, got {type(value).__name__}")
    if tuple(value.shape) != shape or value.dtype not in dtypes:
        names = "/".join(str(t).removeprefix("torch.") for t in dtypes)
        raise ValueError(f"Expected {what} of shape {shape} and dtype {names}, got {tuple(value.shape)} {value.dtype}")
    return value


def _counts(value: Any, what: str, n: int) -> torch.Tensor:
    """A checked (n,) int64 tensor of non-negative counts."""
    value = _tensor(value, what, (n,), (torch.int64,))
    if bool((value < 0).any()):
        raise ValueError(f"Expected {what} to be non-negative counts, got {value.tolist()}")
    return value


def _out_features(classifier: nn.Module) -> int | None:
    """The number of logits of a classifier with a (K, d) ``weight`` (None while unknown: no
    weight, another shape, or a lazy module before its first forward)."""
    w = getattr(classifier, "weight", None)
    if not isinstance(w, torch.Tensor) or isinstance(w, nn.parameter.UninitializedParameter) or w.dim() != 2:
        return None
    return int(w.shape[0])


def _has_kernel(op: str, device: torch.device) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(op, key)


def _ncc_counts(
    x: torch.Tensor, y: torch.Tensor, means: torch.Tensor, present: torch.Tensor, pred: torch.Tensor, k: int
) -> torch.Tensor:
    """NC4 counts [n, ncc_correct, mismatch] (3,) int64 on the device, no host synchronisation.

    The nearest centre comes from the fused ``nearest_centre`` op (plain PyTorch where this
    build has no kernel for the device); the mismatch compares it with ``pred``, the
    classifier's argmax in the same forward (-1: none, counted as agreeing), so it is the
    model's own prediction whatever the classifier module and precision."""
    if _has_kernel("collapse_ext::nearest_centre", x.device):
        counts, nearest = nearest_centre(x, y, means, present=present, assignments=True)
        mismatch = ((nearest >= 0) & (pred >= 0) & (pred != nearest)).sum()
        return torch.stack([counts[0], counts[1], mismatch])
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    pw = present.double()
    centre = (means * pw.unsqueeze(1)).sum(0) / pw.sum().clamp_min(1.0)
    mu = (means - centre).to(dtype)
    sq = (mu * mu).sum(1).masked_fill(~present, float("inf"))
    nearest = torch.addmm(sq, x.to(dtype) - centre.to(dtype), mu.T, alpha=-2.0).argmin(1)
    valid = (y >= 0) & (y < k) & present.any()
    correct = (valid & (nearest == y)).sum()
    return torch.stack([valid.sum(), correct, (valid & (pred >= 0) & (pred != nearest)).sum()])


class _Session:
    """The per-layer states of one measurement (the training epoch, or an evaluate() pass)."""

    def __init__(self, monitor: CollapseMonitor) -> None:
        self.layers = {name: _Layer(monitor) for name in monitor.layer_names}

    def flush(self) -> None:
        for layer in self.layers.values():
            layer.flush()

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Scope of one recorded batch: if it fails, nothing of it stays recorded."""
        for layer in self.layers.values():
            layer.begin_batch()
        try:
            yield
        except BaseException:
            for layer in self.layers.values():
                layer.rollback()
            raise

    def check_dropped(self, num_classes: int) -> None:
        """Raise if the deferred check dropped batches (one host read per layer)."""
        lines = []
        for name, layer in self.layers.items():
            if layer.dropped is not None:
                batches, rows = layer.dropped.tolist()
                if batches:
                    lines.append(f"{batches} batch(es) ({rows} rows) were dropped at layer {name!r}")
        if lines:
            raise ValueError(
                "; ".join(lines) + f": labels outside [0, {num_classes}) or NaN/Inf features (check='deferred'); "
                "the other batches are kept, monitor.reset() starts the measurement over"
            )


# -------------------------------------------------------------------------- monitor
class CollapseMonitor:
    """Neural-collapse statistics of a model while it trains, through forward hooks.

    Args:
        model: the network (an ``nn.Module``; a DDP/DataParallel wrapper is looked through).
        classifier: the last layer, as a module of ``model`` or its name (``"fc"``). Its
            input are the penultimate features (layer ``"penultimate"``); its ``weight``
            (K, d) and ``bias`` (when it has them) give NC2 on the classifier, NC3 and the
            NC4 mismatch; its output's argmax is the prediction NC4 compares with.
        num_classes: K.
        layers: more modules whose *outputs* are monitored, for layer-wise analysis (He &
            Su's law of data separation): names or modules of ``model``, or a dict
            {key: name or module}. Ordered by their position in ``model``.
        penultimate: monitor the classifier's input (default True).
        pool: how outputs of more than two dims (N, C, *spatial) become (N, d): ``"avg"``
            (mean over the spatial dims, default), ``"max"``, ``"flatten"`` (d = C * H * W),
            a callable, or a dict {layer: one of these}.
        every: record one batch in ``every`` (1 = all); skipped batches cost nothing.
        within_cov: accumulate the (d, d) within-class scatter (needed by NC1 and the
            separation fuzziness): True, False, or ``"auto"`` = when d <= ``max_cov_dim``.
        buffer_bytes: per-layer buffer of captured rows reduced at once (0: one batch).
        train_ncc: count NC4 during training against the previous epoch's means (2 K d
            flops per row and layer); False leaves NC4 to :meth:`evaluate`.
        check: ClassStats checking; None = ``"strict"`` on CPU, ``"deferred"`` (no host
            synchronisation) on CUDA.
        minority, minority_threshold: passed to :func:`~collapse_ext.metrics.collapse_metrics`.
        sync: merge statistics across ranks in ``compute()`` when torch.distributed is
            initialised; process_group: the group (default: the world).
        loggers: objects with ``log(result)`` (see :mod:`collapse_ext.loggers`), called with
            every new result (on rank 0 only, unless ``log_all_ranks``).

    The hooks only read: model outputs and gradients are bit-identical with and without
    the monitor. Use ``monitor.update(y)`` after each forward, or ``with monitor.collect(y):``
    around it (needed when one step runs several forwards).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        classifier: nn.Module | str,
        num_classes: int,
        layers: Sequence[str | nn.Module] | Mapping[str, str | nn.Module] | None = None,
        penultimate: bool = True,
        pool: str | Callable | Mapping[str, str | Callable] = "avg",
        every: int = 1,
        within_cov: bool | str = "auto",
        max_cov_dim: int = 4096,
        buffer_bytes: int = 8 << 20,
        train_ncc: bool = True,
        check: str | None = None,
        minority: Sequence[int] | None = None,
        minority_threshold: float = 0.5,
        sync: bool = True,
        process_group: Any = None,
        loggers: Iterable[Any] = (),
        log_all_ranks: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Expected `model` to be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.num_classes = _positive_int(num_classes, "num_classes")
        self.every = _positive_int(every, "every")
        if not (isinstance(within_cov, bool) or within_cov == "auto"):
            raise ValueError(f"Expected `within_cov` to be True, False or 'auto', got {within_cov!r}")
        self.within_cov = within_cov
        self.max_cov_dim = _positive_int(max_cov_dim, "max_cov_dim")
        buffer = _index(buffer_bytes)
        if buffer is None or buffer < 0:
            raise ValueError(f"Expected `buffer_bytes` to be a non-negative int, got {buffer_bytes!r}")
        self.buffer_bytes = buffer
        self.train_ncc = _flag(train_ncc, "train_ncc")
        if check not in (None, "strict", "deferred"):
            raise ValueError(f"Expected `check` to be None, 'strict' or 'deferred', got {check!r}")
        self.check = check
        self.minority = None if minority is None else self._minority(minority)
        threshold = minority_threshold
        if _index(threshold) is None and not isinstance(threshold, float):
            threshold = math.nan
        if not 0 < threshold <= 1:
            raise ValueError(f"Expected `minority_threshold` to be a number in (0, 1], got {minority_threshold!r}")
        self.minority_threshold = float(threshold)
        self.sync = _flag(sync, "sync")
        self.process_group = process_group
        self.loggers = list(loggers)
        for logger in self.loggers:
            if not callable(getattr(logger, "log", None)):
                raise TypeError(f"Expected every logger to have a log(result) method, got {type(logger).__name__}")
        self.log_all_ranks = _flag(log_all_ranks, "log_all_ranks")
        penultimate = _flag(penultimate, "penultimate")

        self._named = self._named_modules(model)
        self.classifier, classifier_name = self._resolve(classifier, "classifier")
        self._check_out_features(_out_features(self.classifier), classifier_name)
        modules = self._layer_modules(layers)
        if not penultimate and not modules:
            raise ValueError("Expected at least one layer to monitor: penultimate=False and no `layers`")
        positions = {id(m): i for i, (_, m) in enumerate(self._named)}
        entries = [(positions[id(m)], key, m) for key, m in modules.items()]
        if penultimate:
            if PENULTIMATE in modules:
                raise ValueError(f"Expected no layer keyed {PENULTIMATE!r}: the classifier input has that name")
            entries.append((positions[id(self.classifier)] - 0.5, PENULTIMATE, None))
        entries.sort(key=lambda e: e[0])
        self.layer_names: list[str] = [key for _, key, _ in entries]
        self._pools = self._layer_pools(pool)

        self.history: list[MonitorResult] = []
        self._epoch = 0
        self._batch = 0
        self._session = _Session(self)
        self._prev: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._labels: torch.Tensor | None = None
        self._recording = False
        self._paused = 0
        self._stash: dict[str, tuple[torch.Tensor, int]] = {}
        self._stash_pred: torch.Tensor | None = None
        self._handles = []
        for _, key, module in entries:
            if module is None:
                self._handles.append(self.classifier.register_forward_pre_hook(self._input_hook))
            else:
                self._handles.append(module.register_forward_hook(self._make_output_hook(key)))
        self._handles.append(self.classifier.register_forward_hook(self._logits_hook))
        self.classifier_name = classifier_name

    # -------------------------------------------------------------- construction
    def _minority(self, minority: Any) -> list[int]:
        items = minority.tolist() if isinstance(minority, torch.Tensor) else minority
        if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
            raise ValueError(f"Expected `minority` to be class indices in [0, {self.num_classes}), got {minority!r}")
        items = list(items)
        out = [_index(c) for c in items]
        if any(c is None or not 0 <= c < self.num_classes for c in out):
            raise ValueError(f"Expected `minority` to be class indices in [0, {self.num_classes}), got {items!r}")
        return out

    def _check_out_features(self, out_features: int | None, name: str) -> None:
        if out_features is not None and out_features != self.num_classes:
            raise ValueError(
                f"Expected `num_classes` to equal the out_features {out_features} of the classifier {name!r}, "
                f"got {self.num_classes}"
            )

    @staticmethod
    def _named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
        inner = getattr(model, "module", None)
        wrapped = isinstance(inner, nn.Module) and type(model).__name__ in ("DistributedDataParallel", "DataParallel")
        return list((inner if wrapped else model).named_modules())

    def _resolve(self, item: Any, what: str) -> tuple[nn.Module, str]:
        if isinstance(item, str):
            for name, module in self._named:
                if name == item:
                    return module, name
            names = [n for n, _ in self._named if n]
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise ValueError(f"Expected `{what}` to name a submodule of `model`, got {item!r} (modules: {shown})")
        if isinstance(item, nn.Module):
            for name, module in self._named:
                if module is item:
                    return module, name
        raise TypeError(
            f"Expected `{what}` to be an nn.Module in `model` or the name of one, got "
            f"{type(item).__name__ if not isinstance(item, nn.Module) else 'a module that is not in `model`'}"
        )

    def _layer_modules(self, layers: Any) -> dict[str, nn.Module]:
        if layers is None:
            return {}
        if isinstance(layers, (str, nn.Module)):
            layers = [layers]
        items: list[tuple[str | None, Any]]
        if isinstance(layers, Mapping):
            items = [(str(k), v) for k, v in layers.items()]
        elif isinstance(layers, Sequence):
            items = [(None, v) for v in layers]
        else:
            raise TypeError(f"Expected `layers` to be a list of names/modules or a dict, got {type(layers).__name__}")
        out: dict[str, nn.Module] = {}
        for key, item in items:
            module, name = self._resolve(item, "layers")
            key = key if key is not None else (name or "model")
            if key in out:
                raise ValueError(f"Expected distinct `layers`, got {key!r} twice")
            out[key] = module
        return out

    def _layer_pools(self, pool: Any) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        def one(p: Any, key: str) -> Callable[[torch.Tensor], torch.Tensor]:
            if callable(p):
                return p
            if p == "avg":
                return lambda t: t.mean(dim=tuple(range(2, t.dim())))
            if p == "max":
                return lambda t: t.amax(dim=tuple(range(2, t.dim())))
            if p == "flatten":
                return lambda t: t.flatten(1)
            raise ValueError(f"Expected `pool` for layer {key!r} to be one of {_POOLS} or a callable, got {p!r}")

        if isinstance(pool, Mapping):
            unknown = set(pool) - set(self.layer_names)
            if unknown:
                raise ValueError(f"Expected `pool` keys among the layers {self.layer_names}, got {sorted(unknown)}")
            return {k: one(pool.get(k, "avg"), k) for k in self.layer_names}
        return {k: one(pool, k) for k in self.layer_names}

    def remove(self) -> None:
        """Remove the hooks (the monitor keeps its history and statistics)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> CollapseMonitor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    # -------------------------------------------------------------------- hooks
    def _features(self, key: str, value: Any) -> torch.Tensor:
        if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
            value = value[0]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"Expected layer {key!r} to give a Tensor (or a tuple starting with one), got {value!r}")
        x = value.detach()
        if x.dim() > 2:
            x = self._pools[key](x)
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"Expected the `pool` of layer {key!r} to return a Tensor, got {type(x).__name__}")
            x = x.detach()  # a pool with parameters would otherwise keep a graph in the buffer
        if x.dim() != 2:
            raise ValueError(f"Expected layer {key!r} features of shape (N, d) after pooling, got {tuple(x.shape)}")
        return x

    def _active(self) -> bool:
        return not self._paused and bool(self._handles)

    def _record(self, key: str, value: Any) -> None:
        if not self._active():
            return
        if self._labels is not None:
            if self._recording:
                x = self._features(key, value)
                layer = self._session.layers[key]
                layer.capture(x, *layer.validate(key, x, self._labels))
        elif self._batch % self.every == 0:
            x = self._features(key, value)
            self._stash[key] = (x, x._version)

    def _input_hook(self, module: nn.Module, args: tuple) -> None:
        if not args:
            raise TypeError(
                f"Expected the classifier {self.classifier_name!r} to get its features as a positional input"
            )
        self._record(PENULTIMATE, args[0])

    def _make_output_hook(self, key: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self._record(key, output)

        return hook

    def _logits_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not self._active() or PENULTIMATE not in self.layer_names:
            return
        if not isinstance(output, torch.Tensor) or output.dim() != 2:
            return
        self._check_out_features(output.shape[1], self.classifier_name)
        pred = output.detach().argmax(1)
        if self._labels is not None:
            if self._recording:
                self._session.layers[PENULTIMATE].set_predictions(pred)
        elif self._batch % self.every == 0:
            self._stash_pred = pred

    # ------------------------------------------------------------------ recording
    def _check_labels(self, labels: Any) -> torch.Tensor:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"Expected `labels` to be a torch.Tensor, got {type(labels).__name__}")
        if labels.dim() != 1 or labels.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"Expected `labels` of shape (N,) int32/int64, got {tuple(labels.shape)} {labels.dtype}")
        if labels.device.type == "cpu" and labels.numel() and (self.check or "strict") == "strict":
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= self.num_classes:
                raise ValueError(f"Expected `labels` in [0, {self.num_classes}), got values in [{lo}, {hi}]")
        return labels

    @contextlib.contextmanager
    def collect(self, labels: torch.Tensor) -> Iterator[CollapseMonitor]:
        """Record every forward of the monitored layers inside the block with ``labels``
        (N,) int: one training batch (counts once for ``every``)."""
        if self._labels is not None:
            raise RuntimeError("Expected collect() blocks not to nest")
        self._labels = self._check_labels(labels)
        self._recording = self._batch % self.every == 0
        try:
            with self._session.batch():
                yield self
        finally:
            self._labels = None
            self._recording = False
            self._batch += 1
            self._stash.clear()
            self._stash_pred = None

    def update(self, labels: torch.Tensor) -> None:
        """Record the forward that just ran with its ``labels`` (N,) int (call it once per
        training batch, after ``model(x)``; before or after ``backward()``)."""
        labels = self._check_labels(labels)
        recording = self._batch % self.every == 0
        self._batch += 1
        stash, pred = self._stash, self._stash_pred
        self._stash, self._stash_pred = {}, None
        if not recording or self._paused:
            return
        if not stash:
            raise RuntimeError(
                "update() found no features: run the model forward on the batch before update(labels) "
                "(and not inside monitor.paused())"
            )
        checked = []
        for key, (x, version) in stash.items():  # every layer first: a bad batch records nothing
            if x._version != version:
                raise RuntimeError(
                    f"The features of layer {key!r} were modified in place after the forward (e.g. by "
                    "nn.ReLU(inplace=True)); monitor another module or use `with monitor.collect(labels):`"
                )
            checked.append((key, x, *self._session.layers[key].validate(key, x, labels)))
        with self._session.batch():
            for key, x, y, ok in checked:
                layer = self._session.layers[key]
                layer.capture(x, y, ok)
                if key == PENULTIMATE and pred is not None and pred.shape[0] == x.shape[0]:
                    layer.set_predictions(pred)

    @contextlib.contextmanager
    def paused(self) -> Iterator[CollapseMonitor]:
        """Forwards inside the block are not recorded (validation passes, ...)."""
        self._paused += 1
        try:
            yield self
        finally:
            self._paused -= 1

    # ------------------------------------------------------------------ results
    def _world(self) -> int:
        import torch.distributed as dist

        if not self.sync or not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def _rank(self) -> int:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(self.process_group)
        return 0

    def _all_reduce(self, session: _Session, *, stats: bool = True) -> None:
        """Exact merge of every layer's statistics (ClassStats.all_reduce) and one sum of
        the NC4 and dropped-batch counts of all layers across ranks; a rank that saw no batch
        of a layer joins with empty statistics."""
        import torch.distributed as dist

        layers = [session.layers[name] for name in self.layer_names]
        device = self._comm_device(layers)
        dims = torch.tensor([0 if s.acc is None else s.acc.dim for s in layers], dtype=torch.int64, device=device)
        dist.all_reduce(dims, op=dist.ReduceOp.MAX, group=self.process_group)
        for layer, dim in zip(layers, dims.tolist()):
            if dim and layer.acc is None:
                layer.allocate(int(dim), device)
        active = [layer for layer in layers if layer.acc is not None]
        if stats:
            for layer in active:
                layer.acc.all_reduce(self.process_group)
        if active:
            counts = torch.stack([torch.cat([layer.ncc, layer.dropped]).to(device) for layer in active])
            dist.all_reduce(counts, group=self.process_group)
            for layer, row in zip(active, counts):
                row = row.to(layer.acc.device)
                layer.ncc, layer.dropped = row[:3].clone(), row[3:].clone()

    def _comm_device(self, layers: list[_Layer]) -> torch.device:
        for layer in layers:
            if layer.acc is not None:
                return layer.acc.device
        import torch.distributed as dist

        backend = dist.get_backend(self.process_group)
        if backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _classifier_params(self, dim: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        w = getattr(self.classifier, "weight", None)
        b = getattr(self.classifier, "bias", None)
        if not isinstance(w, torch.Tensor) or tuple(w.shape) != (self.num_classes, dim):
            return None, None
        if not isinstance(b, torch.Tensor) or tuple(b.shape) != (self.num_classes,):
            b = None
        return w.detach(), None if b is None else b.detach()

    def _result(
        self,
        session: _Session,
        views: dict[str, ClassStats | None],
        phase: str,
        ncc_note: str | None,
        missing_ncc: str,
    ) -> MonitorResult:
        session.check_dropped(self.num_classes)
        bundles: dict[str, CollapseMetrics] = {}
        notes: dict[str, str] = {}
        for name in self.layer_names:
            layer, stats = session.layers[name], views[name]
            if layer.acc is not None:
                layer.acc.check_rejected()
            if stats is None or stats.num_samples == 0:
                notes[name] = "no batch recorded"
                continue
            w, b = self._classifier_params(stats.dim) if name == PENULTIMATE else (None, None)
            counts = layer.ncc if layer.means is not None else None
            m = collapse_metrics(
                stats,
                w,
                b,
                minority=self.minority,
                minority_threshold=self.minority_threshold,
                ncc_counts=counts,
            )
            if counts is not None:
                m.ncc_means = ncc_note
                if name != PENULTIMATE:
                    m.undefined.setdefault("ncc_mismatch", "only for the classifier input (penultimate)")
            else:
                m.undefined["ncc_accuracy"] = missing_ncc
                if w is not None:
                    m.undefined["ncc_mismatch"] = missing_ncc
            bundles[name] = m
        if not bundles:
            raise RuntimeError(
                "compute() found no recorded batch: call monitor.update(labels) after each forward "
                "(or run the forward inside `with monitor.collect(labels):`)"
            )
        law = None
        values = [m.separation_fuzziness for m in bundles.values()]
        if len(values) < 2:
            notes["separation_law"] = "needs at least 2 monitored layers (pass `layers=`)"
        elif any(v is None or not math.isfinite(v) or v <= 0 for v in values):
            notes["separation_law"] = "needs a positive separation fuzziness on every layer"
        else:
            law = fit_separation_law(values)._asdict()
        return MonitorResult(
            epoch=self._epoch, phase=phase, step=self._batch, layers=bundles, separation_law=law, notes=notes
        )

    def _publish(self, result: MonitorResult) -> None:
        self.history.append(result)
        if self.log_all_ranks or self._rank() == 0:
            for logger in self.loggers:
                logger.log(result)

    def compute(self) -> MonitorResult:
        """End of an epoch: merge across ranks, compute the metric bundle of every layer,
        append it to ``history``, send it to the loggers and reset for the next epoch.

        NC4 uses the previous epoch's class means (``ncc_means`` says so); in the first
        epoch it is undefined: use :meth:`evaluate` for the exact two-pass NC4."""
        session = self._session
        session.flush()
        if self._world() > 1:
            self._all_reduce(session)
        views = {name: layer.stats for name, layer in session.layers.items()}
        self._epoch += 1
        try:
            result = self._result(
                session,
                views,
                "train",
                "previous epoch's class means (training statistics)",
                "first epoch: no previous class means yet; evaluate(loader) measures NC4 with the final means"
                if self.train_ncc
                else "train_ncc=False; evaluate(loader) measures NC4 with the final means",
            )
        except Exception:
            self._epoch -= 1
            raise
        self._prev = {}
        for name, stats in views.items():
            if stats is not None and stats.num_samples > 0:
                self._prev[name] = (stats.means, stats.present)
        self._session = self._new_session()
        self._publish(result)
        return result

    def _new_session(self) -> _Session:
        session = _Session(self)
        for name, (means, present) in self._prev.items() if self.train_ncc else ():
            session.layers[name].set_means(means, present)
        return session

    def reset(self) -> None:
        """Drop the statistics of the current epoch (history and previous means are kept)."""
        self._session = self._new_session()

    # -------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume mid-epoch with identical results: this rank's
        statistics, the rows still buffered, the NC4 and dropped-batch counts and centres,
        counters and the history (plain tensors, numbers and strings: loads with
        ``torch.load(weights_only=True)``). Buffered rows of dropped batches have label K."""
        layers = {}
        for name, layer in self._session.layers.items():
            entry: dict[str, Any] = {}
            if layer.acc is not None:
                n = layer.fill
                entry = {
                    "stats": layer.stats.state_dict(),
                    "ncc": layer.ncc.clone(),
                    "dropped": layer.dropped.clone(),
                    "rows": layer.buf[:n].clone() if n else None,
                    "labels": layer.lab[:n].clone() if n else None,
                    "preds": layer.pred[:n].clone() if n else None,
                    "capacity": 0 if layer.buf is None else layer.buf.shape[0],
                }
            layers[name] = entry
        return {
            "version": _STATE_VERSION,
            "layer_names": list(self.layer_names),
            "num_classes": self.num_classes,
            "epoch": self._epoch,
            "batch": self._batch,
            "layers": layers,
            "prev": {name: {"means": m.clone(), "present": p.clone()} for name, (m, p) in self._prev.items()},
            "history": [r.to_dict() for r in self.history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (on a monitor built with the same layers, K and
        ``within_cov``); the statistics go to the model's device. Everything is checked
        before anything is assigned: a state that does not fit raises and leaves the monitor
        as it was."""
        if not isinstance(state, Mapping):
            raise TypeError(
                f"Expected `state` to be a dict from CollapseMonitor.state_dict(), got {type(state).__name__}"
            )
        if state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"Expected a CollapseMonitor state of version {_STATE_VERSION}, got {state.get('version')!r}"
            )
        missing = [
            k for k in ("layer_names", "num_classes", "epoch", "batch", "layers", "prev", "history") if k not in state
        ]
        if missing:
            raise ValueError(f"Expected a CollapseMonitor state with the keys {missing} too, got {sorted(state)}")
        names, k = state["layer_names"], state["num_classes"]
        if not isinstance(names, Sequence) or list(names) != self.layer_names or _index(k) != self.num_classes:
            raise ValueError(
                f"Expected a state for layers {self.layer_names} with num_classes={self.num_classes}, "
                f"got layers {names!r} with num_classes={k!r}"
            )
        counters = []
        for key in ("epoch", "batch"):
            value = _index(state[key])
            if value is None or value < 0:
                raise ValueError(f"Expected `state[{key!r}]` to be a non-negative int, got {state[key]!r}")
            counters.append(value)
        device = self._model_device()
        layers = state["layers"]
        if not isinstance(layers, Mapping) or set(layers) != set(self.layer_names):
            got = sorted(layers) if isinstance(layers, Mapping) else type(layers).__name__
            raise ValueError(f"Expected `state['layers']` with one entry per layer {self.layer_names}, got {got}")
        session = self._session_from(state, device)
        prev = self._prev_from(state["prev"], session, device)
        history = state["history"]
        if not isinstance(history, Sequence):
            raise ValueError(f"Expected `state['history']` to be a list, got {type(history).__name__}")
        try:
            results = [MonitorResult.from_dict(r) for r in history]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(
                f"Expected `state['history']` entries from MonitorResult.to_dict(), got one that fails: {e!r}"
            ) from None
        # nothing above touched the monitor
        self._epoch, self._batch = counters
        self._prev = prev
        for name, (means, present) in prev.items() if self.train_ncc else ():
            session.layers[name].set_means(means, present)
        self._session = session
        self.history = results

    def _session_from(self, state: Mapping[str, Any], device: torch.device) -> _Session:
        """A new session holding the checked layer entries of ``state``."""
        k = self.num_classes
        session = _Session(self)
        for name in self.layer_names:
            entry = state["layers"][name]
            if not isinstance(entry, Mapping):
                raise ValueError(f"Expected `state['layers'][{name!r}]` to be a dict, got {type(entry).__name__}")
            if not entry:
                continue
            where = f"`state['layers'][{name!r}]`"
            for key in ("stats", "ncc", "rows", "labels", "preds", "capacity"):
                if key not in entry:
                    raise ValueError(f"Expected {where} to have the key {key!r}, got {sorted(entry)}")
            stats = self._stats_from(entry["stats"], f"{where}['stats']", device)
            layer = session.layers[name]
            layer.allocate(stats.dim, device)
            layer.acc = _add_class(stats, layer.check)
            layer.ncc = _counts(entry["ncc"], f"{where}['ncc']", 3).to(device)
            dropped = entry.get("dropped", torch.zeros(2, dtype=torch.int64))
            layer.dropped = layer.batch_dropped = _counts(dropped, f"{where}['dropped']", 2).to(device)
            rows = entry["rows"]
            if rows is None:
                continue
            n = rows.shape[0] if isinstance(rows, torch.Tensor) else -1
            _tensor(rows, f"{where}['rows']", (n, stats.dim), _FLOAT_DTYPES)
            labels = _tensor(entry["labels"], f"{where}['labels']", (n,), (torch.int32, torch.int64))
            preds = _tensor(entry["preds"], f"{where}['preds']", (n,), (torch.int32, torch.int64))
            if n and (int(labels.min()) < 0 or int(labels.max()) > k):
                raise ValueError(f"Expected {where}['labels'] in [0, {k}] (K: a dropped batch), got {labels.tolist()}")
            if n and (int(preds.min()) < -1 or int(preds.max()) >= k):
                raise ValueError(f"Expected {where}['preds'] in [-1, {k}), got {preds.tolist()}")
            capacity = _index(entry["capacity"])
            if capacity is None or capacity < n:
                raise ValueError(f"Expected {where}['capacity'] to be an int >= {n}, got {entry['capacity']!r}")
            layer._grow(rows, capacity)
            layer.buf[:n].copy_(rows)
            layer.lab[:n].copy_(labels)
            layer.pred[:n].copy_(preds)
            layer.fill = layer.batch_start = n
        return session

    def _stats_from(self, saved: Any, where: str, device: torch.device) -> ClassStats:
        """The K-class ClassStats of a saved layer, after checking every field."""
        k = self.num_classes
        if not isinstance(saved, Mapping):
            raise ValueError(f"Expected {where} to be a ClassStats state dict, got {type(saved).__name__}")
        for key in ("num_classes", "dim", "within_cov", "global_mean", "counts", "means", "sqdev"):
            if key not in saved:
                raise ValueError(f"Expected {where} to have the key {key!r}, got {sorted(saved)}")
        if _index(saved["num_classes"]) != k:
            raise ValueError(f"Expected {where} with num_classes={k}, got {saved['num_classes']!r}")
        d = _index(saved["dim"])
        if d is None or d <= 0:
            raise ValueError(f"Expected {where}['dim'] to be a positive int, got {saved['dim']!r}")
        cov = self.within_cov if isinstance(self.within_cov, bool) else d <= self.max_cov_dim
        if saved["within_cov"] is not cov:
            raise ValueError(
                f"Expected {where} with within_cov={cov} like this monitor (within_cov={self.within_cov!r}, "
                f"max_cov_dim={self.max_cov_dim}, d={d}), got {saved['within_cov']!r}"
            )
        if saved["global_mean"] not in ("sample", "class"):
            raise ValueError(f"Expected {where}['global_mean'] to be 'sample' or 'class', got {saved['global_mean']!r}")
        _counts(saved["counts"], f"{where}['counts']", k)
        floats = (torch.float32, torch.float64)
        means = _tensor(saved["means"], f"{where}['means']", (k, d), floats)
        sqdev = _tensor(saved["sqdev"], f"{where}['sqdev']", (k,), floats)
        parts = [means, sqdev]
        if cov:
            if "scatter" not in saved:
                raise ValueError(f"Expected {where} to have the key 'scatter' (within_cov=True), got {sorted(saved)}")
            parts.append(_tensor(saved["scatter"], f"{where}['scatter']", (d, d), floats))
        if not all(bool(torch.isfinite(p).all()) for p in parts) or bool((sqdev < 0).any()):
            raise ValueError(f"Expected {where} with finite means, sqdev, scatter and sqdev >= 0, got other values")
        if "rejected" in saved:
            _tensor(saved["rejected"], f"{where}['rejected']", (), (torch.int64,))
        stats = ClassStats(k, d, device=device, within_cov=cov)
        stats.load_state_dict(dict(saved))
        return stats

    def _prev_from(
        self, prev: Any, session: _Session, device: torch.device
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        k = self.num_classes
        if not isinstance(prev, Mapping) or not set(prev) <= set(self.layer_names):
            got = sorted(prev) if isinstance(prev, Mapping) else type(prev).__name__
            raise ValueError(f"Expected `state['prev']` keyed by layers among {self.layer_names}, got {got}")
        out = {}
        for name, entry in prev.items():
            where = f"`state['prev'][{name!r}]`"
            if not isinstance(entry, Mapping) or "means" not in entry or "present" not in entry:
                raise ValueError(f"Expected {where} to be a dict with 'means' and 'present', got {entry!r}")
            acc = session.layers[name].acc
            means = entry["means"]
            d = acc.dim if acc is not None else (means.shape[-1] if isinstance(means, torch.Tensor) else -1)
            means = _tensor(means, f"{where}['means']", (k, d), (torch.float32, torch.float64))
            present = _tensor(entry["present"], f"{where}['present']", (k,), (torch.bool,))
            if d <= 0 or not bool(torch.isfinite(means).all()):
                raise ValueError(f"Expected {where}['means'] finite of shape ({k}, d > 0), got {tuple(means.shape)}")
            out[name] = (means.to(device, torch.float64), present.to(device))
        return out

    def _model_device(self) -> torch.device:
        param = next(self.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def evaluate(
        self,
        loader: Iterable[Any],
        *,
        unpack: Callable[[Any], tuple[Any, torch.Tensor]] | None = None,
        device: torch.device | str | None = None,
    ) -> MonitorResult:
        """Exact measurement on the current model, two passes over ``loader`` in eval mode
        without gradients: statistics first, then NC4 with the final class means.

        loader: re-iterable batches ``(inputs, labels)`` (a DataLoader, a list); ``unpack``
        maps a batch to that pair; inputs go to ``device`` (default: the model's). The
        training statistics of the current epoch are left untouched; the result (phase
        ``"eval"``) is appended to ``history``."""
        if iter(loader) is loader:
            raise TypeError("Expected `loader` to be re-iterable (a DataLoader or a list): evaluate() makes two passes")
        unpack = unpack or _default_unpack
        if device is None:
            device = self._model_device()
        was_training = self.model.training
        saved = (self._session, self._labels, self._recording, self._stash, self._stash_pred)
        self._session, self._stash, self._stash_pred = _Session(self), {}, None
        self.model.eval()
        try:
            with torch.no_grad():
                self._pass(loader, unpack, device)
                self._session.flush()
                if self._world() > 1:
                    self._all_reduce(self._session)
                self._session.check_dropped(self.num_classes)
                views = {name: layer.stats for name, layer in self._session.layers.items()}
                for name, layer in self._session.layers.items():
                    if layer.acc is not None:
                        layer.set_means(views[name].means, views[name].present)
                        layer.ncc_only = True
                        layer.dropped = torch.zeros_like(layer.dropped)
                self._pass(loader, unpack, device)
                self._session.flush()
                if self._world() > 1:
                    self._all_reduce(self._session, stats=False)
            result = self._result(
                self._session,
                views,
                "eval",
                "final class means (second pass of evaluate())",
                "no sample reached this layer in the second pass",
            )
        finally:
            self._session, self._labels, self._recording, self._stash, self._stash_pred = saved
            self.model.train(was_training)
        self._publish(result)
        return result

    def _pass(self, loader: Iterable[Any], unpack: Callable, device: Any) -> None:
        self._labels, self._recording = None, True
        for batch in loader:
            inputs, labels = unpack(batch)
            labels = self._check_labels(labels).to(device, non_blocking=True)
            if isinstance(inputs, torch.Tensor):
                inputs = inputs.to(device, non_blocking=True)
            self._labels = labels
            try:
                with self._session.batch():
                    self.model(inputs)
            finally:
                self._labels = None
        self._recording = False


def _default_unpack(batch: Any) -> tuple[Any, torch.Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(
        f"Expected loader batches (inputs, labels), got {type(batch).__name__}: pass unpack=lambda b: (inputs, labels)"
    )
