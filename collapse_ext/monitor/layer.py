"""The per-layer accumulation state of a monitor (:class:`Layer`: a buffer of captured
rows, reduced by the fused ops and merged exactly) and :class:`Session`, the layers of one
measurement (a training epoch, or an ``evaluate()`` pass)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from .._ops import nearest_centre
from ..stats import ClassStats
from ..stats.slots import select_classes

if TYPE_CHECKING:
    from .monitor import CollapseMonitor

__all__ = ["FLOAT_DTYPES", "Layer", "Session"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Layer:
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
        # NC4 tallies by true class (3, K + 1), when the monitor asks for them (frequency views)
        self.class_ncc: torch.Tensor | None = None
        self.dropped: torch.Tensor | None = None
        self.means: tuple[torch.Tensor, torch.Tensor] | None = None
        self.ncc_only = False

    @property
    def stats(self) -> ClassStats | None:
        """The K-class statistics of the reduced rows (a copy; ``None`` before the first batch)."""
        return None if self.acc is None else drop_class(self.acc, self.monitor.num_classes)

    def allocate(self, dim: int, device: torch.device) -> None:
        mon = self.monitor
        cov = mon._keeps_scatter(dim)
        self.check = mon.check or ("deferred" if device.type == "cuda" else "strict")
        with torch.inference_mode(False):
            self.acc = ClassStats(
                mon.num_classes + 1, dim, device=device, within_cov=cov, check=self.check, state_dtype=mon.state_dtype
            )
            self.ncc = torch.zeros(3, dtype=torch.int64, device=device)
            if mon._class_tallies:
                self.class_ncc = torch.zeros(3, mon.num_classes + 1, dtype=torch.int64, device=device)
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
        if x.dtype not in FLOAT_DTYPES:
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
                ncc, class_ncc = self.ncc, self.class_ncc
                if self.means is not None:
                    outcomes = _ncc_outcomes(x, y, *self.means, pred)
                    ncc = ncc + outcomes.sum(1)
                    if class_ncc is not None:
                        class_ncc = class_ncc.index_add(1, y, outcomes)
                if not self.ncc_only:
                    self.acc.update(x, y)
                self.ncc, self.class_ncc = ncc, class_ncc
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
        """Class centres for NC4: means (K, d) float (the state dtype), present (K,) bool."""
        self.means = (means, present)


def drop_class(acc: ClassStats, k: int) -> ClassStats:
    """The statistics of classes 0..k-1 of ``acc`` as a k-class ClassStats."""
    state = select_classes(acc.state_dict(), torch.arange(k, device=acc.device))
    out = ClassStats(k, acc.dim, device=acc.device, within_cov=acc.within_cov_enabled, state_dtype=acc.state_dtype)
    out.load_state_dict(state)
    return out


def add_class(stats: ClassStats, check: str) -> ClassStats:
    """``stats`` with one more, empty class (the accumulator of a monitored layer)."""
    k, dev = stats.num_classes, stats.device
    state = select_classes(stats.state_dict(), torch.arange(-1, k, device=dev).roll(-1))  # 0 .. k-1, then -1
    out = ClassStats(
        k + 1, stats.dim, device=dev, within_cov=stats.within_cov_enabled, check=check, state_dtype=stats.state_dtype
    )
    out.load_state_dict(state)
    return out


def _ncc_outcomes(
    x: torch.Tensor, y: torch.Tensor, means: torch.Tensor, present: torch.Tensor, pred: torch.Tensor
) -> torch.Tensor:
    """NC4 outcome of every row, (3, N) int64 0/1 [counted, ncc_correct, mismatch] on the
    device, no host synchronisation: summed over the rows they are the tallies, summed by
    label the tallies of each class.

    The nearest centre comes from the fused ``nearest_centre`` op (-1: row not counted); the
    mismatch compares it with ``pred``, the classifier's argmax in the same forward (-1:
    none, counted as agreeing), so it is the model's own prediction whatever the classifier
    module and precision."""
    _, nearest = nearest_centre(x, y, means, present=present, assignments=True)
    counted = nearest >= 0
    return torch.stack([counted, nearest == y, counted & (pred >= 0) & (pred != nearest)]).long()


def _ncc_tallies(
    x: torch.Tensor, y: torch.Tensor, means: torch.Tensor, present: torch.Tensor, pred: torch.Tensor
) -> torch.Tensor:
    """NC4 tallies [n, ncc_correct, mismatch] (3,) int64 on the device (see :func:`_ncc_outcomes`)."""
    return _ncc_outcomes(x, y, means, present, pred).sum(1)


class Session:
    """The per-layer states of one measurement (the training epoch, or an evaluate() pass)."""

    def __init__(self, monitor: CollapseMonitor) -> None:
        self.layers = {name: Layer(monitor) for name in monitor.layer_names}

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


def rank_rtol(layer: Any, stats: ClassStats) -> float | None:
    """NC1's rank tolerance max(K', d) * eps at the precision of the layer's features and
    means (float32 unless both are float64, then None: the float64 default): a direction
    the features only leave by rounding (the normal of a LayerNorm's hyperplane) has a
    between-class singular value ~eps32 * s_max, and its 1/s^2 would turn NC1 into noise."""
    wide = layer.buf is None or layer.buf.dtype == torch.float64
    if wide and stats.state_dtype == torch.float64:
        return None
    return min(0.5, max(int(stats.present.sum()), stats.dim) * torch.finfo(torch.float32).eps)
