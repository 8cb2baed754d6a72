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
NC4 tallies accumulate on the device.

NC4 (nearest class centre, Papyan et al. 2020) needs the class means before the samples
are classified. During training it uses the previous epoch's means (said so in the
result; undefined in the first epoch); :meth:`CollapseMonitor.evaluate` makes the exact
two-pass measurement on a fixed model: statistics first, then NC4 with the final means.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .._validate import class_indices, flag, float_dtype, index, positive_int
from ..metrics import CollapseMetrics, collapse_metrics, fit_separation_law
from ..stats import ClassStats
from ..theory import Predictor
from .distributed import Distributed
from .hooks import PENULTIMATE, Hooks, out_features
from .layer import Session, rank_rtol
from .persistence import Persistence
from .result import MonitorResult

__all__ = ["CollapseMonitor"]


class CollapseMonitor(Hooks, Distributed, Persistence):
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
        state_dtype: dtype of each layer's two (K, d) ClassStats arrays: float64 (default)
            or float32, half the memory at vocabulary-sized K (means rounded to float32).
        minority, minority_threshold: passed to :func:`~collapse_ext.metrics.collapse_metrics`.
        predict: a theory model name (``"lpm-ce"``, ...) or a ``theory.Predictor``: each
            result's penultimate bundle then holds the prediction for its class counts and
            measured budgets beside the measurement (``collapse_metrics(predict=...)``),
            made at ``compute()`` / ``evaluate()`` only, with LPM solutions cached.
        sync: merge statistics across ranks in ``compute()`` when torch.distributed is
            initialised; process_group: the group (default: the world).
        loggers: objects with ``log(result)`` (see :mod:`collapse_ext.loggers`), called with
            every new result (on rank 0 only, unless ``log_all_ranks``).

    The hooks only read: model outputs and gradients are bit-identical with and without
    the monitor. Use ``monitor.update(y)`` after each forward, or ``with monitor.collect(y):``
    around it (needed when one step runs several forwards).
    """

    # NC4 tallies per class as well as in total (LMCollapseMonitor's frequency views)
    _class_tallies = False

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
        state_dtype: torch.dtype = torch.float64,
        minority: Sequence[int] | None = None,
        minority_threshold: float = 0.5,
        predict: str | Predictor | None = None,
        sync: bool = True,
        process_group: Any = None,
        loggers: Iterable[Any] = (),
        log_all_ranks: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Expected `model` to be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.num_classes = positive_int(num_classes, "num_classes")
        self.every = positive_int(every, "every")
        if not (isinstance(within_cov, bool) or within_cov == "auto"):
            raise ValueError(f"Expected `within_cov` to be True, False or 'auto', got {within_cov!r}")
        self.within_cov = within_cov
        self.max_cov_dim = positive_int(max_cov_dim, "max_cov_dim")
        buffer = index(buffer_bytes)
        if buffer is None or buffer < 0:
            raise ValueError(f"Expected `buffer_bytes` to be a non-negative int, got {buffer_bytes!r}")
        self.buffer_bytes = buffer
        self.train_ncc = flag(train_ncc, "train_ncc")
        if check not in (None, "strict", "deferred"):
            raise ValueError(f"Expected `check` to be None, 'strict' or 'deferred', got {check!r}")
        self.check = check
        self.state_dtype = float_dtype(state_dtype, "state_dtype", (torch.float64, torch.float32))
        self.minority = None if minority is None else class_indices(minority, "minority", self.num_classes)
        threshold = minority_threshold
        if index(threshold) is None and not isinstance(threshold, float):
            threshold = math.nan
        if not 0 < threshold <= 1:
            raise ValueError(f"Expected `minority_threshold` to be a number in (0, 1], got {minority_threshold!r}")
        self.minority_threshold = float(threshold)
        self.predictor = Predictor(predict) if isinstance(predict, str) else predict
        if predict is not None and not isinstance(self.predictor, Predictor):
            raise TypeError(f"Expected `predict` to be a theory model name or a Predictor, got {predict!r}")
        self.sync = flag(sync, "sync")
        self.process_group = process_group
        self.loggers = list(loggers)
        for logger in self.loggers:
            if not callable(getattr(logger, "log", None)):
                raise TypeError(f"Expected every logger to have a log(result) method, got {type(logger).__name__}")
        self.log_all_ranks = flag(log_all_ranks, "log_all_ranks")
        penultimate = flag(penultimate, "penultimate")

        self._named = self._named_modules(model)
        self.classifier, classifier_name = self._resolve(classifier, "classifier")
        self._check_out_features(out_features(self.classifier), classifier_name)
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
        self._session = Session(self)
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
    def _check_out_features(self, out_features: int | None, name: str) -> None:
        if out_features is not None and out_features != self.num_classes:
            raise ValueError(
                f"Expected `num_classes` to equal the out_features {out_features} of the classifier {name!r}, "
                f"got {self.num_classes}"
            )

    def _keeps_scatter(self, dim: int) -> bool:
        """Whether a layer of width ``dim`` accumulates S_W: ``within_cov``, or for "auto" d <= max_cov_dim."""
        return self.within_cov if isinstance(self.within_cov, bool) else dim <= self.max_cov_dim

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
        session: Session,
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
            tallies = layer.ncc if layer.means is not None else None
            m = collapse_metrics(
                stats,
                w,
                b,
                minority=self.minority,
                minority_threshold=self.minority_threshold,
                ncc_tallies=tallies,
                predict=self.predictor if name == PENULTIMATE else None,
                rtol=rank_rtol(layer, stats),
            )
            if tallies is not None:
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

    def _new_session(self) -> Session:
        session = Session(self)
        for name, (means, present) in self._prev.items() if self.train_ncc else ():
            session.layers[name].set_means(means, present)
        return session

    def reset(self) -> None:
        """Drop the statistics of the current epoch (history and previous means are kept)."""
        self._session = self._new_session()

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
        self._session, self._stash, self._stash_pred = Session(self), {}, None
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
