"""Forward hooks of a monitor: resolving the monitored modules of the model, pooling their
outputs to (N, d), and recording each forward with its labels (``update``, ``collect``).
:class:`Hooks` is a part of :class:`~collapse_ext.CollapseMonitor`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .monitor import CollapseMonitor

__all__ = ["PENULTIMATE", "Hooks", "out_features"]

PENULTIMATE = "penultimate"
_POOLS = ("avg", "max", "flatten")


def out_features(classifier: nn.Module) -> int | None:
    """The number of logits of a classifier with a (K, d) ``weight`` (None while unknown: no
    weight, another shape, or a lazy module before its first forward)."""
    w = getattr(classifier, "weight", None)
    if not isinstance(w, torch.Tensor) or isinstance(w, nn.parameter.UninitializedParameter) or w.dim() != 2:
        return None
    return int(w.shape[0])


class Hooks:
    """Module resolution, pooling, the hooks and the recording API of CollapseMonitor."""

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
        if isinstance(output, torch.Tensor) and output.dim() >= 2:
            self._check_out_features(output.shape[-1], self.classifier_name)  # a lazy classifier's first forward
        if self._session.layers[PENULTIMATE].means is None:
            return  # no NC4 in this measurement (yet): the argmax is only its mismatch's input
        pred = self._predictions(output)
        if pred is None:
            return
        if self._labels is not None:
            if self._recording:
                self._session.layers[PENULTIMATE].set_predictions(pred)
        elif self._batch % self.every == 0:
            self._stash_pred = pred

    def _predictions(self, output: Any) -> torch.Tensor | None:
        """The prediction (N,) int64 of every row of the classifier's output (N, K): its argmax."""
        if not isinstance(output, torch.Tensor) or output.dim() != 2:
            return None
        self._check_out_features(output.shape[1], self.classifier_name)
        return output.detach().argmax(1)

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
