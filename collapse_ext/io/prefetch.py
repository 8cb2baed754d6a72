"""Chunks of rows read one ahead on a background thread (into pinned memory, copied
``non_blocking``, for a CUDA device): memory bounded by the chunk size whatever the file
size."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .arrays import Array


@dataclass
class Chunk:
    """Rows [start, start + len) of every feature array and of the labels, on the device."""

    start: int
    features: list[torch.Tensor]
    labels: torch.Tensor
    nbytes: int


_DONE = object()


def iter_chunks(
    arrays: Sequence[Array],
    labels: Array,
    start: int,
    stop: int,
    chunk_rows: int,
    device: torch.device | str = "cpu",
) -> Iterator[Chunk]:
    """Rows [start, stop) of ``arrays`` and ``labels`` in chunks of ``chunk_rows``, read one
    chunk ahead on a background thread. For a CUDA device the thread reads into pinned
    buffers and the copy is ``non_blocking`` (the pinned allocator keeps a buffer until its
    copy is done). At most three chunks are alive: reduced, queued, being read."""
    device = torch.device(device)
    pin = device.type == "cuda"
    q: queue.Queue = queue.Queue(maxsize=1)
    stop_event = threading.Event()

    def produce() -> None:
        try:
            for lo in range(start, stop, chunk_rows):
                hi = min(lo + chunk_rows, stop)
                parts = []
                for a in [*arrays, labels]:
                    out = torch.empty((hi - lo, *a.shape[1:]), dtype=a.dtype, pin_memory=pin) if pin else None
                    parts.append(a.read(lo, hi, out=out))
                nbytes = sum(p.numel() * p.element_size() for p in parts)
                while not stop_event.is_set():
                    try:
                        q.put((lo, parts, nbytes), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop_event.is_set():
                    return
            q.put(_DONE)
        except BaseException as err:  # handed to the consumer, raised there
            q.put(err)

    thread = threading.Thread(target=produce, name="collapse-ext-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            lo, parts, nbytes = item
            moved = [p.to(device, non_blocking=pin) for p in parts]
            yield Chunk(lo, moved[:-1], moved[-1], nbytes)
    finally:
        stop_event.set()
        while thread.is_alive():
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()
