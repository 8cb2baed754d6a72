"""The streaming passes of :func:`~collapse_ext.analyze.analyze`: pass 1 accumulates a
ClassStats per features key; pass 2, when needed, the NC4 tallies with the final means
and the statistics of Q^T h for the projected NC1; then the bundles and the law of data
separation."""

from __future__ import annotations

import math
import sys
import time

import torch

from ..io import Chunk, iter_chunks
from ..metrics import (
    CollapseMetrics,
    UndefinedMetricError,
    collapse_metrics,
    fit_separation_law,
    nc1,
    nearest_centre_tallies,
    separation_fuzziness,
)
from ..stats import ClassStats
from .distributed import _agree, _sum
from .inputs import (
    _check_arrays,
    _check_classifier,
    _classifier_part,
    _from_checkpoint,
    _open_features,
    _open_labels,
    _RowError,
    _scan_labels,
)
from .result import AnalyzeResult

# Rows per ClassStats.update: the op's (rows, d) float32 centred output stays under
# glibc's mmap threshold (32 MiB at most), so it is reused from the heap instead of being
# mapped and page-faulted afresh for every chunk (measured: a 128 MiB output per 64k-row
# chunk cost a third of the statistics pass). The chunk's rows were checked already.
_UPDATE_BYTES = 16 << 20

# Largest d for which S_W (d x d, float64 + a float32 pending block: 12 d^2 bytes) is kept.
FULL_SCATTER_MAX_DIM = 4096


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


def _clean(chunk: Chunk, names: list[str], k: int, skip: bool, labels_name: str) -> tuple[list, torch.Tensor, int]:
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
        # One sum screens the whole chunk (NaN/Inf anywhere makes it non-finite) at a fifth
        # of the cost of the row-wise test, which runs only when the screen fires (also on a
        # sum that merely overflowed).
        if bool(torch.isfinite(x.sum())):
            continue
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
        for chunk in iter_chunks(arrays, label_array, lo, hi, chunk_rows, device):
            xs, y, dropped = _clean(chunk, names, k, skip, label_array.name)
            skipped += dropped
            for name, x in zip(names, xs):
                step = max(1, _UPDATE_BYTES // (4 * max(x.shape[1], 1)))
                for lo_row in range(0, x.shape[0], step):
                    stats[name].update(x[lo_row : lo_row + step], y[lo_row : lo_row + step])
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

    tallies: dict[str, torch.Tensor] = {}
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
        tallies = {name: torch.zeros(3, dtype=torch.int64) for name in names} if ncc else {}
        bar = _Progress(progress, hi - lo, f"pass 2/{passes}")
        try:
            for chunk in iter_chunks(arrays, label_array, lo, hi, chunk_rows, device):
                xs, y, _ = _clean(chunk, names, k, True, label_array.name)  # rows checked in pass 1
                for name, x in zip(names, xs):
                    if ncc:
                        last = name == last_name
                        tallies[name] += nearest_centre_tallies(
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
            tallies = {name: _sum(t, world, comm) for name, t in tallies.items()}
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
            ncc_tallies=tallies.get(name),
        )
        if name in tallies:
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
