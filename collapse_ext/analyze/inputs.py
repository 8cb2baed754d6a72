"""The inputs of :func:`~collapse_ext.analyze.analyze`, opened and checked: features
(a path, a glob or a tensor; one or several keys), labels, the classifier (``FILE[:key]``,
tensors, or a module of a checkpoint) and K from the labels."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..io import Array, Source, load_tensor
from ..io.arrays import _wrap
from ..io.files import _Container

_CLASSIFIER_DEFAULT_KEYS = {"weight": ("weight", "fc.weight"), "bias": ("bias", "fc.bias")}


class _RowError(ValueError):
    """A data error at a global row (ranks agree on the first one before raising)."""

    def __init__(self, row: int, message: str) -> None:
        super().__init__(message)
        self.row = row


# --------------------------------------------------------------------------- inputs
def _keys(features_key: Any) -> list[str] | None:
    if features_key is None:
        return None
    if isinstance(features_key, str):
        keys = [k.strip() for k in features_key.split(",")]
    elif isinstance(features_key, Sequence) and all(isinstance(k, str) for k in features_key):
        keys = [k.strip() for k in features_key]
    else:
        raise TypeError(f"Expected `features_key` to be a str or a sequence of str, got {features_key!r}")
    if not keys or any(not k for k in keys) or len(set(keys)) != len(keys):
        raise ValueError(f"Expected `features_key` to be distinct non-empty keys, got {features_key!r}")
    return keys


def _in_memory(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, np.ndarray))


def _open_features(source: Any, keys: list[str] | None, closers: list) -> tuple[str, list[tuple[str, Array]], Any]:
    if _in_memory(source):
        if keys is not None:
            raise ValueError(f"Expected `features_key` to be unset for in-memory features, got {keys!r}")
        return "<in-memory array>", [("features", _wrap(source, "features", "source"))], None
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"Expected `source` to be a path, a glob or a tensor, got {type(source).__name__}")
    src = Source(source, "source")
    closers.append(src)
    if src.single:
        if keys is not None:
            raise ValueError(
                f"Expected no `features_key` for {os.fspath(source)!r}, which holds one unnamed array, got {keys}"
            )
        return src.text, [("features", src.array())], src
    keys = keys or ["features"]
    return src.text, [(k, src.array(k, "features_key")) for k in keys], src


def _open_labels(labels: Any, labels_key: str | None, src: Any, closers: list) -> Array:
    if labels is None:
        if src is None or src.single:
            raise ValueError(
                "Expected `labels` (a labels file, or a tensor) since the features source holds only the features"
            )
        return src.array(labels_key or "labels", "labels_key")
    if _in_memory(labels):
        return _wrap(labels, "labels", "labels")
    if not isinstance(labels, (str, os.PathLike)):
        raise TypeError(f"Expected `labels` to be a path, a glob or a tensor, got {type(labels).__name__}")
    lsrc = Source(labels, "labels")
    closers.append(lsrc)
    return lsrc.array() if lsrc.single else lsrc.array(labels_key or "labels", "labels_key")


def _check_arrays(layers: list[tuple[str, Array]], labels: Array) -> int:
    n = None
    for _, a in layers:
        if len(a.shape) != 2:
            raise ValueError(f"Expected `source` features to be 2-D (N, d), got shape {a.shape} in {a.name}")
        if a.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(
                f"Expected `source` features to be floating (fp16/bf16/fp32/fp64), got {a.dtype} in {a.name}"
            )
        if a.shape[1] == 0:
            raise ValueError(f"Expected `source` features with d >= 1, got shape {a.shape} in {a.name}")
        if n is not None and a.shape[0] != n:
            raise ValueError(f"Expected `source` layers of one length, got {n} rows and {a.shape[0]} in {a.name}")
        n = a.shape[0]
    if n == 0:
        raise ValueError(f"Expected `source` to hold at least one row, got 0 in {layers[0][1].name}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"Expected `labels` to be integers, got {labels.dtype} in {labels.name}")
    if len(labels.shape) != 1:
        raise ValueError(f"Expected `labels` to be 1-D (N,), got shape {labels.shape} in {labels.name}")
    if labels.shape[0] != n:
        raise ValueError(f"Expected `labels` of length {n} like the features, got {labels.shape[0]} in {labels.name}")
    return n


def _classifier_part(value: Any, what: str) -> tuple[torch.Tensor | None, str | None]:
    if value is None:
        return None, None
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return torch.as_tensor(value).detach().cpu(), f"<in-memory {what}>"
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"Expected `{what}` to be FILE[:key] or a tensor, got {type(value).__name__}")
    return load_tensor(value, _CLASSIFIER_DEFAULT_KEYS[what], what)


def _from_checkpoint(path: Any, name: str) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """``name.weight`` / ``name.bias`` of a state_dict (nested under "state_dict",
    "model", ... or prefixed "module." is fine: the shortest dotted match wins)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"Expected `classifier` to be a module name such as 'fc', got {name!r}")
    text = os.fspath(path)
    if not os.path.isfile(text):
        raise ValueError(f"Expected `checkpoint` to be an existing file, got {text!r} (not found)")
    container = _Container(text, "checkpoint")
    try:
        keys = container.keys() or []

        def find(suffix: str) -> str | None:
            hits = [k for k in keys if k == suffix or k.endswith("." + suffix)]
            return min(hits, key=len) if hits else None

        wkey, bkey = find(f"{name}.weight"), find(f"{name}.bias")
        if wkey is None:
            modules = sorted({k.rsplit(".", 1)[0] for k in keys if k.endswith(".weight")})
            raise ValueError(
                f"Expected `classifier` to name a module of {os.path.basename(text)} with a weight, got {name!r} "
                f"(modules with a weight: {', '.join(modules) or 'none'})"
            )
        w = container.array(wkey, "classifier")
        weight = w.read(0, len(w)).clone()
        bias = None
        if bkey is not None:
            b = container.array(bkey, "classifier")
            bias = b.read(0, len(b)).clone()
        return weight, bias, f"{text}:{wkey.rsplit('.', 1)[0]}"
    finally:
        container.close()


def _check_classifier(weight, bias, wname, dim, layer, num_classes) -> int:
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"Expected `weight` to be a 2-D (K, d) float tensor, got {weight.dtype} {tuple(weight.shape)}")
    if weight.shape[1] != dim:
        raise ValueError(
            f"Expected `weight` of shape (K, {dim}) (d of the features {layer!r}), got {tuple(weight.shape)} in {wname}"
        )
    if num_classes is not None and weight.shape[0] != num_classes:
        raise ValueError(
            f"Expected `weight` of shape ({num_classes}, {dim}) (num_classes = {num_classes}), "
            f"got {tuple(weight.shape)} in {wname}"
        )
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"Expected finite `weight`, got NaN or Inf in {wname}")
    k = weight.shape[0]
    if bias is not None:
        if tuple(bias.shape) != (k,) or not bias.is_floating_point():
            raise ValueError(
                f"Expected `bias` to be a ({k},) float tensor like the weight's rows, got {tuple(bias.shape)}"
            )
        if not bool(torch.isfinite(bias).all()):
            raise ValueError("Expected finite `bias`, got NaN or Inf")
    return k


def _scan_labels(labels: Array, chunk_rows: int) -> int:
    """K = max label + 1, checking that no label is negative (a cheap pass: labels only)."""
    top = -1
    step = max(chunk_rows, 1 << 20)
    for lo in range(0, len(labels), step):
        y = labels.read(lo, min(lo + step, len(labels)))
        if y.numel() == 0:
            continue
        low = int(y.min())
        if low < 0:
            row = lo + int((y < 0).nonzero()[0, 0])
            raise _RowError(row, f"Expected `labels` >= 0, got {int(y[row - lo])} in row {row} of {labels.name}")
        top = max(top, int(y.max()))
    return top + 1
