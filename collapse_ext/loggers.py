"""Loggers for :class:`~collapse_ext.CollapseMonitor` results: thin adapters over ``history``.

Each logger has ``log(result)`` (the monitor calls it with every new
:class:`~collapse_ext.monitor.MonitorResult`, on rank 0) and ``write(history)`` (log a whole
history at once). JSON lines and CSV need nothing else; TensorBoard needs the
``tensorboard`` package (or any writer with ``add_scalar``); the PyTorch Lightning callback
needs ``lightning`` (or ``pytorch_lightning``) and is built on first access, so importing
this module never imports either.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Iterable
from typing import Any

from .monitor import CollapseMonitor, MonitorResult

# CollapseCallback (Lightning) is built on first access, so it is not in __all__.
__all__ = ["CSVLogger", "JSONLinesLogger", "TensorBoardLogger", "read_jsonl"]


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    return value


class _Logger:
    def log(self, result: MonitorResult) -> None:
        raise NotImplementedError

    def write(self, history: Iterable[MonitorResult]) -> None:
        """Log every result of ``history`` (e.g. ``monitor.history``) in order."""
        for result in history:
            self.log(result)

    def close(self) -> None:
        """Release the file or writer (nothing to do for most loggers)."""


class JSONLinesLogger(_Logger):
    """One JSON object per result (``MonitorResult.to_dict()``, non-finite numbers as null /
    "inf"), appended to ``path`` and flushed at once, so a crashed run keeps its history.
    ``overwrite=True`` truncates the file when the logger is created."""

    def __init__(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        self.path = os.fspath(path)
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        if overwrite:
            open(self.path, "w").close()

    def log(self, result: MonitorResult) -> None:
        line = json.dumps(_json_value(result.to_dict()), allow_nan=False)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def read_jsonl(path: str | os.PathLike) -> list[MonitorResult]:
    """The results a :class:`JSONLinesLogger` wrote, in order."""
    out = []
    with open(path) as f:
        for line in f:
            if line.strip():
                out.append(MonitorResult.from_dict(json.loads(line)))
    return out


class CSVLogger(_Logger):
    """One row per result (``MonitorResult.flat()``: epoch, phase, step, ``<layer>/<metric>``,
    ``separation_law/<x>``; empty cells for undefined metrics). The file is rewritten on
    every ``log`` with the union of the columns seen, so rows from different phases or
    layer sets stay aligned."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        self.rows: list[dict[str, Any]] = []
        self.columns: list[str] = []

    def log(self, result: MonitorResult) -> None:
        row = result.flat()
        self.rows.append(row)
        self.columns += [c for c in row if c not in self.columns]
        tmp = self.path + ".tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, restval="")
            writer.writeheader()
            for r in self.rows:
                writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
        os.replace(tmp, self.path)


class TensorBoardLogger(_Logger):
    """Scalars ``<prefix>/<phase>/<layer>/<metric>`` (undefined metrics skipped) at
    ``global_step`` = the result's epoch (``step="epoch"``) or batch count (``"batch"``).

    writer: a ``torch.utils.tensorboard.SummaryWriter`` (or any object with
    ``add_scalar(tag, value, global_step)``), or a log directory for a new SummaryWriter
    (needs the ``tensorboard`` package)."""

    def __init__(self, writer: Any, *, prefix: str = "collapse", step: str = "epoch") -> None:
        if isinstance(writer, (str, os.PathLike)):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError(
                    "TensorBoardLogger(log_dir) needs the tensorboard package: pip install tensorboard "
                    "(or pass a writer with add_scalar)"
                ) from err
            writer = SummaryWriter(os.fspath(writer))
        if not callable(getattr(writer, "add_scalar", None)):
            raise TypeError(f"Expected `writer` to be a SummaryWriter or a log directory, got {type(writer).__name__}")
        if step not in ("epoch", "batch"):
            raise ValueError(f"Expected `step` to be 'epoch' or 'batch', got {step!r}")
        self.writer, self.prefix, self.step = writer, prefix, step

    def log(self, result: MonitorResult) -> None:
        global_step = result.epoch if self.step == "epoch" else result.step
        for key, value in result.flat().items():
            if key in ("epoch", "phase", "step") or value is None:
                continue
            self.writer.add_scalar(f"{self.prefix}/{result.phase}/{key}", float(value), global_step)
        flush = getattr(self.writer, "flush", None)
        if callable(flush):
            flush()

    def close(self) -> None:
        close = getattr(self.writer, "close", None)
        if callable(close):
            close()


class _CallbackLogic:
    """What the Lightning callback does, independent of Lightning's base class.

    setup: attach a :class:`CollapseMonitor` to the LightningModule; every training batch:
    record the forward with ``labels_fn(batch)``; end of each training epoch: ``compute()``
    and ``pl_module.log_dict`` of the flat numbers (already merged across ranks, so
    ``sync_dist`` is off); ``evaluate_loader`` (optional): ``evaluate()`` on it after each
    ``evaluate_every`` epochs. The monitor's state goes into Lightning checkpoints.
    """

    def __init__(
        self,
        *,
        classifier: Any,
        num_classes: int,
        labels_fn: Callable[[Any], Any] | None = None,
        evaluate_loader: Iterable[Any] | None = None,
        evaluate_every: int = 1,
        prefix: str = "collapse",
        **monitor_kwargs: Any,
    ) -> None:
        super().__init__()
        self.monitor_kwargs = dict(classifier=classifier, num_classes=num_classes, **monitor_kwargs)
        self.labels_fn = labels_fn or (lambda batch: batch[1])
        self.evaluate_loader = evaluate_loader
        self.evaluate_every = evaluate_every
        self.prefix = prefix
        self.monitor: CollapseMonitor | None = None
        self._pending_state: dict[str, Any] | None = None
        self._block: Any = None

    def setup(self, trainer: Any, pl_module: Any, stage: str | None = None) -> None:
        if self.monitor is None:
            self.monitor = CollapseMonitor(pl_module, **self.monitor_kwargs)
            if self._pending_state is not None:
                self.monitor.load_state_dict(self._pending_state)
                self._pending_state = None

    def teardown(self, trainer: Any, pl_module: Any, stage: str | None = None) -> None:
        if self.monitor is not None:
            self.monitor.remove()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._block = self.monitor.collect(self.labels_fn(batch))
        self._block.__enter__()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        block, self._block = self._block, None
        if block is not None:
            block.__exit__(None, None, None)

    def _log(self, pl_module: Any, result: MonitorResult) -> None:
        values = {}
        for key, value in result.flat().items():
            if key in ("epoch", "phase", "step") or value is None:
                continue
            values[f"{self.prefix}/{result.phase}/{key}"] = float(value)
        pl_module.log_dict(values, sync_dist=False)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._log(pl_module, self.monitor.compute())
        epoch = self.monitor.history[-1].epoch
        if self.evaluate_loader is not None and epoch % self.evaluate_every == 0:
            self._log(pl_module, self.monitor.evaluate(self.evaluate_loader))

    def state_dict(self) -> dict[str, Any]:
        return {} if self.monitor is None else self.monitor.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.monitor is None:
            self._pending_state = state_dict
        else:
            self.monitor.load_state_dict(state_dict)


def _lightning_callback_base() -> type:
    try:
        from lightning.pytorch import Callback
    except ImportError:
        try:
            from pytorch_lightning import Callback
        except ImportError as err:
            raise ImportError(
                "CollapseCallback needs PyTorch Lightning: pip install lightning (or pytorch-lightning)"
            ) from err
    return Callback


def __getattr__(name: str) -> Any:
    if name == "CollapseCallback":
        cls = type(
            "CollapseCallback",
            (_CallbackLogic, _lightning_callback_base()),
            {"__doc__": _CallbackLogic.__doc__, "__module__": __name__},
        )
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
