"""``state_dict`` / ``load_state_dict`` of a monitor: everything needed to resume
mid-epoch, checked field by field before anything is assigned.
:class:`Persistence` is a part of :class:`~collapse_ext.CollapseMonitor`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .._validate import index
from ..stats import ClassStats
from .layer import FLOAT_DTYPES, Session, add_class
from .result import MonitorResult

__all__ = ["Persistence"]

_STATE_VERSION = 1


def _tensor(value: Any, what: str, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"Expected {what} to be a tensor, got {type(value).__name__}")
    if tuple(value.shape) != shape or value.dtype not in dtypes:
        names = "/".join(str(t).removeprefix("torch.") for t in dtypes)
        raise ValueError(f"Expected {what} of shape {shape} and dtype {names}, got {tuple(value.shape)} {value.dtype}")
    return value


def _nonnegative(value: Any, what: str, n: int) -> torch.Tensor:
    """A checked (n,) int64 tensor of non-negative integers (class sizes, tallies)."""
    value = _tensor(value, what, (n,), (torch.int64,))
    if bool((value < 0).any()):
        raise ValueError(f"Expected {what} to be non-negative integers, got {value.tolist()}")
    return value


class Persistence:
    """state_dict / load_state_dict of CollapseMonitor."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume mid-epoch with identical results: this rank's
        statistics, the rows still buffered, the NC4 tallies, the dropped-batch counters and centres,
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
                    "class_ncc": None if layer.class_ncc is None else layer.class_ncc.clone(),
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
        if not isinstance(names, Sequence) or list(names) != self.layer_names or index(k) != self.num_classes:
            raise ValueError(
                f"Expected a state for layers {self.layer_names} with num_classes={self.num_classes}, "
                f"got layers {names!r} with num_classes={k!r}"
            )
        counters = []
        for key in ("epoch", "batch"):
            value = index(state[key])
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

    def _session_from(self, state: Mapping[str, Any], device: torch.device) -> Session:
        """A new session holding the checked layer entries of ``state``."""
        k = self.num_classes
        session = Session(self)
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
            layer.acc = add_class(stats, layer.check)
            layer.ncc = _nonnegative(entry["ncc"], f"{where}['ncc']", 3).to(device)
            if layer.class_ncc is not None and entry.get("class_ncc") is not None:
                class_ncc = _tensor(entry["class_ncc"], f"{where}['class_ncc']", (3, k + 1), (torch.int64,))
                if bool((class_ncc < 0).any()):
                    raise ValueError(f"Expected {where}['class_ncc'] to be non-negative integers")
                layer.class_ncc = class_ncc.to(device)
            dropped = entry.get("dropped", torch.zeros(2, dtype=torch.int64))
            layer.dropped = layer.batch_dropped = _nonnegative(dropped, f"{where}['dropped']", 2).to(device)
            rows = entry["rows"]
            if rows is None:
                continue
            n = rows.shape[0] if isinstance(rows, torch.Tensor) else -1
            _tensor(rows, f"{where}['rows']", (n, stats.dim), FLOAT_DTYPES)
            labels = _tensor(entry["labels"], f"{where}['labels']", (n,), (torch.int32, torch.int64))
            preds = _tensor(entry["preds"], f"{where}['preds']", (n,), (torch.int32, torch.int64))
            if n and (int(labels.min()) < 0 or int(labels.max()) > k):
                raise ValueError(f"Expected {where}['labels'] in [0, {k}] (K: a dropped batch), got {labels.tolist()}")
            if n and (int(preds.min()) < -1 or int(preds.max()) >= k):
                raise ValueError(f"Expected {where}['preds'] in [-1, {k}), got {preds.tolist()}")
            capacity = index(entry["capacity"])
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
        if index(saved["num_classes"]) != k:
            raise ValueError(f"Expected {where} with num_classes={k}, got {saved['num_classes']!r}")
        d = index(saved["dim"])
        if d is None or d <= 0:
            raise ValueError(f"Expected {where}['dim'] to be a positive int, got {saved['dim']!r}")
        cov = self._keeps_scatter(d)
        if saved["within_cov"] is not cov:
            raise ValueError(
                f"Expected {where} with within_cov={cov} like this monitor (within_cov={self.within_cov!r}, "
                f"max_cov_dim={self.max_cov_dim}, d={d}), got {saved['within_cov']!r}"
            )
        if saved["global_mean"] not in ("sample", "class"):
            raise ValueError(f"Expected {where}['global_mean'] to be 'sample' or 'class', got {saved['global_mean']!r}")
        _nonnegative(saved["counts"], f"{where}['counts']", k)
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
            _tensor(saved["rejected"], f"{where}['rejected']", (2,), (torch.int64,))
        stats = ClassStats(k, d, device=device, within_cov=cov, state_dtype=self.state_dtype)
        stats.load_state_dict(dict(saved))
        return stats

    def _prev_from(
        self, prev: Any, session: Session, device: torch.device
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
            out[name] = (means.to(device, self.state_dtype), present.to(device))
        return out
