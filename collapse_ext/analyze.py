"""Neural-collapse metrics of saved features: :func:`analyze` (``collapse-ext analyze``).

One streaming pass over the rows accumulates a :class:`~collapse_ext.ClassStats` per
feature key (S_W included when d <= 4096); a second pass runs only for what needs the
final class means: NC4 (``ncc=True``, the default) and the projected NC1 (``nc1_mode``
"projected", or "auto" when d > 4096). The projected pass accumulates the statistics of
Q^T h, Q (d, r) an orthonormal basis of the centred means' span: NC1 and the separation
fuzziness only see Sigma_W through that span (Sigma_B^+ lives in it), so they equal the
full-S_W values without the (d, d) matrix.

Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank reads its own contiguous row range and
the statistics merge exactly through ``ClassStats.all_reduce`` (gloo or nccl); every
rank ends with the same result.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import io
from .metrics import (
    CollapseMetrics,
    SeparationLaw,
    UndefinedMetricError,
    collapse_metrics,
    fit_separation_law,
    nc1,
    nearest_centre_counts,
    separation_fuzziness,
)
from .stats import ClassStats

__all__ = ["AnalyzeResult", "analyze"]

# Largest d for which S_W (d x d, float64 + a float32 pending block: 12 d^2 bytes) is kept.
FULL_SCATTER_MAX_DIM = 4096
_CLASSIFIER_DEFAULT_KEYS = {"weight": ("weight", "fc.weight"), "bias": ("bias", "fc.bias")}


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


def _open_features(source: Any, keys: list[str] | None, closers: list) -> tuple[str, list[tuple[str, io.Array]], Any]:
    if _in_memory(source):
        if keys is not None:
            raise ValueError(f"Expected `features_key` to be unset for in-memory features, got {keys!r}")
        return "<in-memory array>", [("features", io._wrap(source, "features", "source"))], None
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"Expected `source` to be a path, a glob or a tensor, got {type(source).__name__}")
    src = io.Source(source, "source")
    closers.append(src)
    if src.single:
        if keys is not None:
            raise ValueError(
                f"Expected no `features_key` for {os.fspath(source)!r}, which holds one unnamed array, got {keys}"
            )
        return src.text, [("features", src.array())], src
    keys = keys or ["features"]
    return src.text, [(k, src.array(k, "features_key")) for k in keys], src


def _open_labels(labels: Any, labels_key: str | None, src: Any, closers: list) -> io.Array:
    if labels is None:
        if src is None or src.single:
            raise ValueError(
                "Expected `labels` (a labels file, or a tensor) since the features source holds only the features"
            )
        return src.array(labels_key or "labels", "labels_key")
    if _in_memory(labels):
        return io._wrap(labels, "labels", "labels")
    if not isinstance(labels, (str, os.PathLike)):
        raise TypeError(f"Expected `labels` to be a path, a glob or a tensor, got {type(labels).__name__}")
    lsrc = io.Source(labels, "labels")
    closers.append(lsrc)
    return lsrc.array() if lsrc.single else lsrc.array(labels_key or "labels", "labels_key")


def _check_arrays(layers: list[tuple[str, io.Array]], labels: io.Array) -> int:
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
    return io.load_tensor(value, _CLASSIFIER_DEFAULT_KEYS[what], what)


def _from_checkpoint(path: Any, name: str) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """``name.weight`` / ``name.bias`` of a state_dict (nested under "state_dict",
    "model", ... or prefixed "module." is fine: the shortest dotted match wins)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"Expected `classifier` to be a module name such as 'fc', got {name!r}")
    text = os.fspath(path)
    if not os.path.isfile(text):
        raise ValueError(f"Expected `checkpoint` to be an existing file, got {text!r} (not found)")
    container = io._Container(text, "checkpoint")
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


def _scan_labels(labels: io.Array, chunk_rows: int) -> int:
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


# ------------------------------------------------------------------- distributed
def _world() -> tuple[int, int, bool]:
    """(rank, world size, whether this call initialised the process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available():
        return -1, int(os.environ["WORLD_SIZE"]), True
    return 0, 1, False


def _agree(error: BaseException | None, world: int) -> None:
    """Every rank raises the same error (the one at the smallest row), or none does."""
    if world == 1:
        if error is not None:
            raise error
        return
    import torch.distributed as dist

    mine = None if error is None else (getattr(error, "row", -1), type(error).__name__, str(error))
    seen: list = [None] * world
    dist.all_gather_object(seen, mine)
    errors = sorted(e for e in seen if e is not None)
    if errors:
        _, kind, message = errors[0]
        raise (TypeError if kind == "TypeError" else ValueError)(message)


def _sum(t: torch.Tensor, world: int, comm: torch.device) -> torch.Tensor:
    if world > 1:
        import torch.distributed as dist

        moved = t.to(comm)
        dist.all_reduce(moved)
        return moved.to(t.device)
    return t


# ---------------------------------------------------------------------------- passes
class _Progress:
    def __init__(self, enabled: bool, total: int, desc: str) -> None:
        self.bar = None
        self.start, self.bytes = time.perf_counter(), 0
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, desc=desc, unit="rows", unit_scale=True, file=sys.stderr, delay=0.5, leave=False
            )

    def update(self, rows: int, nbytes: int) -> None:
        self.bytes += nbytes
        if self.bar is not None:
            rate = self.bytes / max(time.perf_counter() - self.start, 1e-9) / 1e9
            self.bar.set_postfix_str(f"{rate:.2f} GB/s", refresh=False)
            self.bar.update(rows)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _clean(chunk: io.Chunk, names: list[str], k: int, skip: bool, labels_name: str) -> tuple[list, torch.Tensor, int]:
    """Check labels and finite rows of a chunk; drop the NaN/Inf rows when ``skip``."""
    y = chunk.labels.long()
    bad = (y < 0) | (y >= k)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise _RowError(
            chunk.start + i,
            f"Expected `labels` in [0, {k}), got {int(y[i])} in row {chunk.start + i} of {labels_name}",
        )
    keep = None
    for name, x in zip(names, chunk.features):
        ok = torch.isfinite(x).all(1)
        if not bool(ok.all()):
            if not skip:
                i = int((~ok).nonzero()[0, 0])
                raise _RowError(
                    chunk.start + i,
                    f"Expected finite `source` features, got NaN or Inf in row {chunk.start + i} of {name!r} "
                    "(skip_nonfinite / --skip-nonfinite drops such rows)",
                )
            keep = ok if keep is None else keep & ok
    if keep is None:
        return chunk.features, y, 0
    return [x[keep] for x in chunk.features], y[keep], int((~keep).sum())


def _projection_basis(stats: ClassStats) -> torch.Tensor | None:
    """Q (d, r): orthonormal basis of the span of the centred class means (r <= K' - 1)."""
    centred = stats.centred_means()
    if centred.shape[0] < 2:
        return None
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return None
    keep = s[: centred.shape[0] - 1] > max(centred.shape) * torch.finfo(torch.float64).eps * s[0]
    return vh[: centred.shape[0] - 1][keep].T.contiguous()


def analyze(
    source: Any,
    *,
    labels: Any = None,
    features_key: str | Sequence[str] | None = None,
    labels_key: str | None = None,
    weight: Any = None,
    bias: Any = None,
    checkpoint: Any = None,
    classifier: str | None = None,
    num_classes: int | None = None,
    device: torch.device | str | None = None,
    chunk_rows: int = 65536,
    ncc: bool = True,
    nc1_mode: str = "auto",
    skip_nonfinite: bool = False,
    minority: Sequence[int] | None = None,
    minority_threshold: float = 0.5,
    progress: bool | None = None,
) -> AnalyzeResult:
    """Neural-collapse metrics of saved features, read in chunks (memory bounded by
    ``chunk_rows`` whatever the file size).

    source: a file (.npy, .npz, .pt, .safetensors, .h5/.hdf5), a directory or a glob of
    shards (name order), or an (N, d) tensor/array. features_key: key(s) of the features
    in a keyed file (default "features"); several keys ("layer1,layer2,penultimate" or a
    list) give per-layer bundles and the law of data separation (He & Su 2023); the last
    key is the classifier's input. labels: (N,) integers in [0, K): a file/directory/glob
    (key ``labels_key``, default "labels") or a tensor; default: ``labels_key`` of the
    source. weight / bias: "FILE[:key]" or tensors (K, d) / (K,); or checkpoint +
    classifier: ``<classifier>.weight`` / ``.bias`` of a state_dict. num_classes: K
    (default: the classifier's rows, else max label + 1). device: "cpu" / "cuda" (default
    cuda when available). ncc: the NC4 second pass with the final means. nc1_mode:
    "full" (S_W, O(d^2) memory), "projected" (second pass, O(d K)) or "auto" (full when
    d <= 4096). skip_nonfinite: drop NaN/Inf rows (counted in the result) instead of
    raising. progress: a tqdm bar on stderr (default: when stderr is a terminal).

    Bad input raises ValueError/TypeError naming the argument ("Expected `labels` in
    [0, 10), got 12 in row 7 of y.npy"). Returns an :class:`AnalyzeResult`.
    """
    started = time.perf_counter()
    keys = _keys(features_key)
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"Expected `chunk_rows` to be a positive int, got {chunk_rows!r}")
    if nc1_mode not in ("auto", "full", "projected"):
        raise ValueError(f"Expected `nc1_mode` to be one of ('auto', 'full', 'projected'), got {nc1_mode!r}")
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
    ):
        raise ValueError(f"Expected `num_classes` to be a positive int, got {num_classes!r}")
    if (checkpoint is None) != (classifier is None):
        raise ValueError("Expected `checkpoint` and `classifier` together, got only one of them")
    if checkpoint is not None and (weight is not None or bias is not None):
        raise ValueError("Expected `weight`/`bias` or `checkpoint`, got both")
    if bias is not None and weight is None:
        raise ValueError("Expected `weight` together with `bias`, got only `bias`")

    rank, world, init_here = _world()
    if device is None:
        device = "cuda" if torch.cuda.is_available() and _cuda_built() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else 0)
    if init_here:
        import torch.distributed as dist

        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank = dist.get_rank()
    comm = device if world > 1 and _backend() == "nccl" else torch.device("cpu")
    if progress is None:
        progress = sys.stderr.isatty()
    progress = bool(progress) and rank == 0

    closers: list = []
    try:
        return _analyze(
            source, labels, keys, labels_key, weight, bias, checkpoint, classifier, num_classes, device, chunk_rows,
            ncc, nc1_mode, skip_nonfinite, minority, minority_threshold, progress, rank, world, comm, closers, started,
        )  # fmt: skip
    finally:
        for c in closers:
            c.close()
        if init_here:
            import torch.distributed as dist

            dist.destroy_process_group()


def _cuda_built() -> bool:
    from ._ops import cuda_compiled

    return cuda_compiled()


def _backend() -> str:
    import torch.distributed as dist

    return dist.get_backend()


def _analyze(
    source, labels, keys, labels_key, weight, bias, checkpoint, classifier, num_classes, device, chunk_rows,
    ncc, nc1_mode, skip, minority, minority_threshold, progress, rank, world, comm, closers, started,
) -> AnalyzeResult:  # fmt: skip
    text, layers, src = _open_features(source, keys, closers)
    label_array = _open_labels(labels, labels_key, src, closers)
    n = _check_arrays(layers, label_array)
    names = [name for name, _ in layers]
    arrays = [a for _, a in layers]
    last_name, last_dim = names[-1], arrays[-1].shape[1]

    if checkpoint is not None:
        w, b, wname = _from_checkpoint(checkpoint, classifier)
    else:
        w, wname = _classifier_part(weight, "weight")
        b, _ = _classifier_part(bias, "bias")
    if w is not None:
        num_classes = _check_classifier(w, b, wname, last_dim, last_name, num_classes)
    if num_classes is None:
        try:
            error = None
            num_classes = _scan_labels(label_array, chunk_rows)
        except _RowError as err:
            error = err
        _agree(error, world)
    k = num_classes

    lo, hi = n * rank // world, n * (rank + 1) // world
    full = {
        name: nc1_mode == "full" or (nc1_mode == "auto" and a.shape[1] <= FULL_SCATTER_MAX_DIM) for name, a in layers
    }
    stats = {
        name: ClassStats(k, a.shape[1], device=device, within_cov=full[name], check="deferred") for name, a in layers
    }
    bytes_read = 0
    skipped = 0
    passes = 1 + int(ncc or not all(full.values()))
    bar = _Progress(progress, hi - lo, f"pass 1/{passes}")
    error = None
    try:
        for chunk in io.iter_chunks(arrays, label_array, lo, hi, chunk_rows, device):
            xs, y, dropped = _clean(chunk, names, k, skip, label_array.name)
            skipped += dropped
            for name, x in zip(names, xs):
                stats[name].update(x, y)
            bar.update(len(chunk.labels), chunk.nbytes)
    except _RowError as err:
        error = err
    finally:
        bar.close()
    bytes_read += bar.bytes
    _agree(error, world)
    if world > 1:
        for s in stats.values():
            s.all_reduce()
        skipped = int(_sum(torch.tensor([skipped]), world, comm))
    for s in stats.values():
        s.check_rejected()

    counts: dict[str, torch.Tensor] = {}
    projected: dict[str, ClassStats] = {}
    if passes > 1:
        bases = {name: _projection_basis(stats[name]) for name in names if not full[name]}
        means = {name: stats[name].means.to(device) for name in names}
        present = {name: stats[name].present.to(device) for name in names}
        wd = w.to(device) if w is not None else None
        bd = b.to(device) if b is not None else None
        for name, q in bases.items():
            if q is not None:
                projected[name] = ClassStats(k, q.shape[1], device=device, within_cov=True, check="deferred")
                bases[name] = q.to(device)
        counts = {name: torch.zeros(3, dtype=torch.int64) for name in names} if ncc else {}
        bar = _Progress(progress, hi - lo, f"pass 2/{passes}")
        try:
            for chunk in io.iter_chunks(arrays, label_array, lo, hi, chunk_rows, device):
                xs, y, _ = _clean(chunk, names, k, True, label_array.name)  # rows checked in pass 1
                for name, x in zip(names, xs):
                    if ncc:
                        last = name == last_name
                        counts[name] += nearest_centre_counts(
                            x,
                            y,
                            means[name],
                            wd if last else None,
                            bd if last else None,
                            present=present[name],
                            check_finite=False,
                        ).cpu()
                    if name in projected:
                        projected[name].update(x.double() @ bases[name], y)
                bar.update(len(chunk.labels), chunk.nbytes)
        finally:
            bar.close()
        bytes_read += bar.bytes
        if world > 1:
            counts = {name: _sum(c, world, comm) for name, c in counts.items()}
            for s in projected.values():
                s.all_reduce()

    bundles: dict[str, CollapseMetrics] = {}
    for name in names:
        last = name == last_name
        m = collapse_metrics(
            stats[name],
            w if last else None,
            b if last else None,
            minority=minority,
            minority_threshold=minority_threshold,
            ncc_counts=counts.get(name),
        )
        if name in counts:
            m.ncc_means = "current class means (second pass over the source)"
            if not last:
                m.undefined.setdefault("ncc_mismatch", "only for the classifier's input (the last features key)")
        else:
            m.undefined["ncc_accuracy"] = "not measured (ncc=False / --no-ncc skips the second pass)"
        if not full[name]:
            _projected_nc1(m, projected.get(name))
        bundles[name] = m

    law, notes = None, {}
    if len(names) > 1:
        values = [bundles[name].separation_fuzziness for name in names]
        if all(v is not None and math.isfinite(v) and v > 0 for v in values):
            law = fit_separation_law(values)
        else:
            notes["separation_law"] = "needs a positive separation fuzziness on every layer"
    return AnalyzeResult(
        source=text,
        num_samples=stats[last_name].num_samples,
        num_classes=k,
        layers=bundles,
        stats=stats,
        separation_law=law,
        skipped_nonfinite=skipped,
        classifier=wname,
        weight=w,
        bias=b,
        passes=passes,
        seconds=time.perf_counter() - started,
        bytes_read=bytes_read,
        notes=notes,
    )


def _projected_nc1(m: CollapseMetrics, pstats: ClassStats | None) -> None:
    """NC1 and the separation fuzziness from the statistics of Q^T h (second pass)."""
    for name, fn in (("nc1", nc1), ("separation_fuzziness", separation_fuzziness)):
        if pstats is None:
            m.undefined[name] = "all present class means coincide, or fewer than 2 present classes"
            continue
        try:
            setattr(m, name, fn(pstats))
            m.undefined.pop(name, None)
        except UndefinedMetricError as err:
            m.undefined[name] = str(err)
