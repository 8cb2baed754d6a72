"""Neural collapse of causal language models (SPEC: "Language models"): the classes are the
vocabulary, the label of position t is the next token, W is the output embedding.

:class:`LMCollapseMonitor` is a :class:`~collapse_ext.CollapseMonitor` for any
``transformers`` model with an output embedding (``model.get_output_embeddings()``)::

    monitor = LMCollapseMonitor(model, layers="all", min_count=5)
    for batch in loader:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        monitor.update(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        out.loss.backward(); opt.step(); opt.zero_grad()
    result = monitor.compute()   # an LMResult: per-layer bundles + frequency views

A forward pre-hook on the output embedding records its input, the final hidden states
(B, T, d) (no second forward, no ``output_hidden_states``); ``update`` keeps the
positions that have a label and feeds them to the per-layer :class:`~collapse_ext.ClassStats`.

Token counts are Zipfian, so besides the bundle over all present tokens (``result.layers``)
the result has frequency views of the final hidden states (``result.views``): the tokens
with n_k >= ``min_count`` (``"frequent"``), and, among those, the buckets ``"head"`` (the
top ``head`` fraction of token types by count), ``"tail"`` (the bottom ``tail`` fraction)
and ``"body"`` (the rest). The tail tokens are the minority set of Minority Collapse
(Fang et al. 2021) in every bundle: ``minority_cos_mean`` (cosines among rare-token
classifier rows) against ``majority_cos_mean`` (among the others).

``transformers`` is imported by nothing here: the monitor only calls the model's
``get_output_embeddings()`` and reads ``model.config.num_hidden_layers``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import fields
from typing import Any

import torch
from torch import nn

from .._validate import index, positive_int
from ..metrics import collapse_metrics
from ..monitor import PENULTIMATE, CollapseMonitor, MonitorResult
from .frequency import VIEWS, FrequencyBuckets, LMResult, _fraction, frequency_buckets, restrict

__all__ = ["VIEWS", "FrequencyBuckets", "LMCollapseMonitor", "LMResult", "frequency_buckets", "restrict"]

_NOT_ALLOWED = ("classifier", "num_classes", "penultimate", "pool", "minority", "minority_threshold")


def _tokens(t: torch.Tensor) -> torch.Tensor:
    """(B, T, d) hidden states -> (B * T, d) rows, position-major within each sequence."""
    return t.reshape(-1, t.shape[-1])


def _unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", None)
    wrapped = isinstance(inner, nn.Module) and type(model).__name__ in ("DistributedDataParallel", "DataParallel")
    return inner if wrapped else model


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: the first ModuleList of config.num_hidden_layers modules."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and n is not None and len(module) == n:
            return list(module)
    raise ValueError(
        "Expected `model` to hold its blocks in an nn.ModuleList of config.num_hidden_layers modules, "
        f"found none (num_hidden_layers={n!r}); pass layers='last'"
    )


class LMCollapseMonitor(CollapseMonitor):
    """CollapseMonitor of a causal language model: classes = the vocabulary.

    Args:
        model: a ``transformers`` causal LM (or any ``nn.Module`` with
            ``get_output_embeddings()`` returning a module with a (V, d) ``weight``; a DDP
            wrapper is looked through). W is that weight (tied to the input embedding or
            not, the same tensor either way); its bias, only if it has one.
        layers: ``"last"`` (default: the final hidden states entering the output
            embedding, layer ``"penultimate"``), ``"all"`` (also the output of every block,
            ``"block0"``, ``"block1"``, ..., for the law of data separation across depth)
            or a list of block indices (negative ones count from the end).
        ignore_index: label value of positions without a target (default -100, as in
            ``transformers``).
        min_count: tokens with n_k < min_count are left out of the frequency views (their
            mean and variance are too noisy); default 2.
        head, tail: fractions of the frequent token types in the head and tail buckets
            (default 0.01 and 0.5, see :func:`frequency_buckets`).
        **kwargs: the other options of :class:`~collapse_ext.CollapseMonitor` (``every``,
            ``within_cov``, ``max_cov_dim``, ``buffer_bytes``, ``train_ncc``, ``check``,
            ``sync``, ``process_group``, ``loggers``, ``log_all_ranks``).

    Defaults at vocabulary K: the state per layer is two (V, d) float64 arrays and, with
    ``within_cov="auto"`` (d <= 4096), the (d, d) S_W that NC1's trace ratio needs;
    CDNV, GNC2 and the NC1 quotient need only the per-class sums. NC4 comes from
    :meth:`evaluate` (exact, with the final means): ``train_ncc`` is False by default here,
    since counting NC4 during training against the previous ``compute()``'s means costs
    2 V d flops per token and layer, as much as the output layer's forward (+10% of the
    lm-demo's step); ``train_ncc=True`` turns it on (tiled, O(N) memory).

    Call ``monitor.update(input_ids, attention_mask=..., labels=...)`` after each forward,
    or run the forwards of a step inside ``with monitor.collect(input_ids, attention_mask,
    labels):``. Selecting the labelled positions is a boolean gather (one host
    synchronisation per batch on CUDA). :meth:`evaluate` is the exact two-pass measurement
    over a loader of ``input_ids`` batches.
    """

    _class_tallies = True  # NC4 of each frequency view

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: str | Sequence[int] = "last",
        ignore_index: int = -100,
        min_count: int = 2,
        head: float = 0.01,
        tail: float = 0.5,
        **kwargs: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Expected `model` to be an nn.Module, got {type(model).__name__}")
        bad = [k for k in kwargs if k in _NOT_ALLOWED]
        if bad:
            raise TypeError(f"Expected no `{bad[0]}`: LMCollapseMonitor sets it from the model")
        inner = _unwrap(model)
        get = getattr(inner, "get_output_embeddings", None)
        head_module = get() if callable(get) else None
        weight = getattr(head_module, "weight", None)
        if not isinstance(head_module, nn.Module) or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise TypeError(
                "Expected `model` to have an output embedding: model.get_output_embeddings() returning a module "
                f"with a (V, d) weight, got {type(head_module).__name__}"
            )
        ignore = index(ignore_index)
        if ignore is None:
            raise ValueError(f"Expected `ignore_index` to be an int, got {ignore_index!r}")
        self.ignore_index = ignore
        self.min_count = positive_int(min_count, "min_count")
        self.head = _fraction(head, "head", closed=True)
        self.tail = _fraction(tail, "tail", closed=False)
        self._keep: torch.Tensor | None = None  # (B * T,) positions recorded by collect() / evaluate()
        super().__init__(
            model,
            classifier=head_module,
            num_classes=int(weight.shape[0]),
            layers=self._block_layers(inner, layers),
            pool=_tokens,
            minority=[],
            **{"train_ncc": False, **kwargs},
        )

    @staticmethod
    def _block_layers(model: nn.Module, layers: Any) -> dict[str, nn.Module] | None:
        if isinstance(layers, str):
            if layers == "last":
                return None
            if layers != "all":
                raise ValueError(f"Expected `layers` to be 'last', 'all' or a list of block indices, got {layers!r}")
            return {f"block{i}": b for i, b in enumerate(_blocks(model))}
        picked = [index(i) for i in layers] if isinstance(layers, Sequence) else [None]
        blocks = _blocks(model)
        n = len(blocks)
        if not picked or any(i is None or not -n <= i < n for i in picked):
            raise ValueError(f"Expected `layers` to be 'last', 'all' or block indices in [-{n}, {n}), got {layers!r}")
        chosen = sorted({i % n for i in picked})
        return {f"block{i}": blocks[i] for i in chosen}

    # ----------------------------------------------------------------- recording
    def targets(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The positions recorded and their labels.

        input_ids: (B, T) int; attention_mask: (B, T) (0 = padding), optional; labels:
        (B, T) int in the ``transformers`` convention (unshifted, ``ignore_index`` where no
        loss), optional. The label of position t is labels[:, t + 1] (default
        input_ids[:, t + 1]); position t is skipped when it is the last, when that label
        is ``ignore_index``, or when attention_mask[:, t] or attention_mask[:, t + 1] is 0.
        Returns keep (B * T,) bool and the labels (N,) int64 of the kept positions, in
        row-major (b, t) order."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            got = (
                f"{tuple(input_ids.shape)} {input_ids.dtype}"
                if isinstance(input_ids, torch.Tensor)
                else type(input_ids).__name__
            )
            raise ValueError(f"Expected `input_ids` to be a (B, T) integer tensor, got {got}")
        for name, t in (("attention_mask", attention_mask), ("labels", labels)):
            if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(input_ids.shape)):
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"Expected `{name}` of the shape {tuple(input_ids.shape)} of `input_ids`, got {got}")
        source = (input_ids if labels is None else labels).long()
        target = torch.full_like(source, self.ignore_index)
        target[:, :-1] = source[:, 1:]
        valid = target != self.ignore_index
        if attention_mask is not None:
            mask = attention_mask.to(valid.device) != 0
            valid &= mask
            valid[:, :-1] &= mask[:, 1:]
        keep = valid.flatten()
        return keep, target.flatten()[keep]

    def update(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> None:
        """Record the forward that just ran on ``input_ids`` (see :meth:`targets`)."""
        keep, y = self.targets(input_ids, attention_mask, labels)
        for key, (x, version) in list(self._stash.items()):
            if x._version != version:
                continue  # CollapseMonitor.update reports the in-place change
            if x.shape[0] != keep.shape[0]:
                raise ValueError(
                    f"Expected layer {key!r} to see the {tuple(input_ids.shape)} positions of `input_ids` "
                    f"({keep.shape[0]} rows), got {x.shape[0]}: call update() with the forward's input_ids"
                )
            rows = x[keep.to(x.device)]
            self._stash[key] = (rows, rows._version)
        pred = self._stash_pred
        if pred is not None and pred.shape[0] == keep.shape[0]:
            self._stash_pred = pred[keep.to(pred.device)]
        super().update(y)

    def _features(self, key: str, value: Any) -> torch.Tensor:
        x = super()._features(key, value)
        keep = self._keep
        if keep is None:
            return x
        if x.shape[0] != keep.shape[0]:
            raise ValueError(
                f"Expected layer {key!r} to see the {keep.shape[0]} positions of `input_ids`, got {x.shape[0]} rows: "
                "run the forward on the input_ids given to collect()"
            )
        return x[keep.to(x.device)]

    def _predictions(self, output: Any) -> torch.Tensor | None:
        if isinstance(output, torch.Tensor) and output.dim() == 3:
            output = output.reshape(-1, output.shape[-1])
        pred = super()._predictions(output)
        keep = self._keep
        if pred is not None and keep is not None and pred.shape[0] == keep.shape[0]:
            pred = pred[keep.to(pred.device)]
        return pred

    @contextlib.contextmanager
    def collect(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> Iterator[LMCollapseMonitor]:
        """Record every forward on ``input_ids`` inside the block (one training batch; see
        :meth:`targets` for the arguments): for a step that runs several forwards, or
        instead of :meth:`update`."""
        keep, y = self.targets(input_ids, attention_mask, labels)
        with super().collect(y):
            self._keep = keep
            try:
                yield self
            finally:
                self._keep = None

    def evaluate(
        self,
        loader: Iterable[Any],
        *,
        unpack: Callable[[Any], tuple[Any, Any, Any]] | None = None,
        device: torch.device | str | None = None,
    ) -> LMResult:
        """Exact measurement on the current model: two passes over ``loader`` in eval mode
        without gradients, the token statistics first, then NC4 (overall and per frequency
        view) with the final class means; each forward is ``model(input_ids=...,
        attention_mask=...)``.

        loader: re-iterable batches, each a dict with ``"input_ids"`` (and optionally
        ``"attention_mask"``, ``"labels"``, as a ``transformers`` collator gives them), a
        tuple ``(input_ids[, attention_mask[, labels]])`` or a bare ``input_ids`` tensor;
        ``unpack`` maps a batch to ``(input_ids, attention_mask or None, labels or None)``.
        Tensors go to ``device`` (default: the model's). The running statistics are left
        alone; the result (phase ``"eval"``) is appended to ``history``."""
        return super().evaluate(loader, unpack=unpack or _unpack, device=device)

    def _pass(self, loader: Iterable[Any], unpack: Callable, device: Any) -> None:
        self._labels, self._recording = None, True
        for batch in loader:
            ids, mask, labels = (t.to(device) if isinstance(t, torch.Tensor) else t for t in unpack(batch))
            keep, y = self.targets(ids, mask, labels)
            self._labels, self._keep = self._check_labels(y), keep
            try:
                with self._session.batch():
                    self.model(input_ids=ids, attention_mask=mask)
            finally:
                self._labels, self._keep = None, None
        self._recording = False

    # ------------------------------------------------------------------ results
    def _result(self, session, views, phase, ncc_note, missing_ncc) -> LMResult:
        final = views.get(PENULTIMATE) if PENULTIMATE in views else None
        buckets = None
        if final is not None and final.num_samples > 0:
            buckets = frequency_buckets(final.counts, min_count=self.min_count, head=self.head, tail=self.tail)
            self.minority = buckets.tail.tolist()
        base = super()._result(session, views, phase, ncc_note, missing_ncc)
        out = LMResult(**{f.name: getattr(base, f.name) for f in fields(MonitorResult)})
        if buckets is None:
            return out
        counts = final.counts.cpu()
        w, b = self._classifier_params(final.dim)
        layer = session.layers[PENULTIMATE]
        by_class = layer.class_ncc if layer.means is not None else None
        tail = set(buckets.tail.tolist())
        for view in VIEWS:
            ids = getattr(buckets, view)
            if ids.numel() == 0:
                out.notes[f"view/{view}"] = f"no token in this bucket (min_count {self.min_count})"
                continue
            sub = restrict(final, ids)
            idx = ids.to(final.device)
            minority = [j for j, k in enumerate(ids.tolist()) if k in tail] if view == "frequent" else []
            m = collapse_metrics(
                sub,
                None if w is None else w[idx],
                None if b is None else b[idx],
                minority=minority,
                ncc_tallies=None if by_class is None else by_class[:, idx].sum(1),
            )
            if by_class is not None:
                m.ncc_means = f"{ncc_note}; rows of this view's tokens against every present token's centre"
            else:
                m.undefined["ncc_accuracy"] = m.undefined["ncc_mismatch"] = missing_ncc
            why = "per-view S_W is not kept (the pooled S_W does not split by token); see the NC1 quotient"
            m.undefined["nc1"] = m.undefined["separation_fuzziness"] = why
            out.views[view] = m
            n = counts[ids]
            out.buckets[view] = {
                "tokens": int(ids.numel()),
                "rows": int(n.sum()),
                "min_count": int(n.min()),
                "max_count": int(n.max()),
            }
        out.buckets["rare"] = {"tokens": int(buckets.rare.numel()), "rows": int(counts[buckets.rare].sum())}
        return out


def _unpack(batch: Any) -> tuple[Any, Any, Any]:
    """(input_ids, attention_mask, labels) of a dict, a tuple of 1 to 3 tensors or a tensor."""
    if isinstance(batch, torch.Tensor):
        return batch, None, None
    if isinstance(batch, Mapping) and "input_ids" in batch:
        return batch["input_ids"], batch.get("attention_mask"), batch.get("labels")
    if isinstance(batch, (tuple, list)) and 1 <= len(batch) <= 3:
        return (*batch, *(None,) * (3 - len(batch)))
    raise TypeError(
        "Expected loader batches with input_ids (a dict with 'input_ids', a tuple (input_ids[, attention_mask"
        f"[, labels]]) or a tensor), got {type(batch).__name__}: pass unpack=lambda b: (ids, mask, labels)"
    )
