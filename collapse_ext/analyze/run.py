"""The entry point :func:`analyze`: argument checks, the device, the process group under
``torchrun``; the work is in :mod:`collapse_ext.analyze.passes`."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from .._ops import cuda_compiled
from .._validate import choice, positive_int
from .distributed import _backend, _world
from .inputs import _keys
from .passes import _analyze
from .result import AnalyzeResult

__all__ = ["analyze"]


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
    chunk_rows = positive_int(chunk_rows, "chunk_rows")
    nc1_mode = choice(nc1_mode, "nc1_mode", ("auto", "full", "projected"))
    if num_classes is not None:
        num_classes = positive_int(num_classes, "num_classes")
    if (checkpoint is None) != (classifier is None):
        raise ValueError("Expected `checkpoint` and `classifier` together, got only one of them")
    if checkpoint is not None and (weight is not None or bias is not None):
        raise ValueError("Expected `weight`/`bias` or `checkpoint`, got both")
    if bias is not None and weight is None:
        raise ValueError("Expected `weight` together with `bias`, got only `bias`")

    rank, world, init_here = _world()
    if device is None:
        device = "cuda" if torch.cuda.is_available() and cuda_compiled() else "cpu"
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
