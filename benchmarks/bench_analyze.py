"""analyze's statistics pass over a memory-mapped .npy against a bare X^T X over the same map.

Writes an (N, d) float32 .npy with labels in [0, K) (default N=200k, d=512, K=100: 400 MB),
then times, each on a cold-ish page cache (the file was just read by the previous run, so
both are warm in the same way):
- bare: ``sum over chunks of X_c^T X_c`` (float32 GEMM, the floor of any scatter pass);
- analyze: ``analyze(..., ncc=False)`` (one pass: ClassStats with S_W, then the metrics).
RssAnon (anonymous resident memory, excluding the page cache of the map) is reported at
the peak of each, to show that memory is bounded by the chunk, not by the file.

    python bench_analyze.py [--n 200000] [--d 512] [--k 100] [--chunk-rows 65536] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import threading
import time

import numpy as np
import torch

from collapse_ext.analyze import analyze


def rss_anon_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakRss:
    """Samples RssAnon every 10 ms on a thread; ``peak`` in MB."""

    def __enter__(self) -> PeakRss:
        self.peak, self.done = rss_anon_mb(), threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self) -> None:
        while not self.done.wait(0.01):
            self.peak = max(self.peak, rss_anon_mb())

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, rss_anon_mb())


def write(path: str, n: int, d: int, k: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((k, d), dtype=np.float32) * 3
    y = rng.integers(0, k, n)
    x = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    for lo in range(0, n, 65536):
        hi = min(lo + 65536, n)
        x[lo:hi] = means[y[lo:hi]] + rng.standard_normal((hi - lo, d), dtype=np.float32)
    x.flush()
    del x
    np.save(path.replace(".npy", "_labels.npy"), y)


def bare_gram(path: str, chunk: int, device: torch.device) -> torch.Tensor:
    x = np.load(path, mmap_mode="r")
    acc = torch.zeros(x.shape[1], x.shape[1], device=device)
    for lo in range(0, x.shape[0], chunk):
        c = torch.from_numpy(np.array(x[lo : lo + chunk])).to(device)
        acc += c.T @ c
    return acc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--chunk-rows", type=int, default=65536)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dir", default=None, help="where to write the .npy (default: a temporary directory)")
    args = p.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = os.path.join(tmp, "features.npy")
        write(path, args.n, args.d, args.k)
        gb = args.n * args.d * 4 / 1e9
        print(f"{args.n} x {args.d} float32 ({gb:.2f} GB), K = {args.k}, chunk {args.chunk_rows} rows, {device}, "
              f"{torch.get_num_threads()} threads; RssAnon at start {rss_anon_mb():.0f} MB")  # fmt: skip
        bare_gram(path, args.chunk_rows, device)  # page cache warm for both
        with PeakRss() as rss:
            start = time.perf_counter()
            bare_gram(path, args.chunk_rows, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            bare = time.perf_counter() - start
        print(f"bare X^T X over the map: {bare:.2f} s ({args.n / bare / 1e6:.2f} M rows/s, {gb / bare:.2f} GB/s), "
              f"peak RssAnon {rss.peak:.0f} MB")  # fmt: skip
        with PeakRss() as rss:
            start = time.perf_counter()
            result = analyze(path, labels=path.replace(".npy", "_labels.npy"), num_classes=args.k, device=device,
                             chunk_rows=args.chunk_rows, ncc=False, progress=False)  # fmt: skip
            took = time.perf_counter() - start
        print(f"analyze statistics pass: {took:.2f} s ({args.n / took / 1e6:.2f} M rows/s, {gb / took:.2f} GB/s), "
              f"{took / bare:.2f}x bare, peak RssAnon {rss.peak:.0f} MB; NC1 = {result.metrics.nc1:.4g}")  # fmt: skip
        print(f"max RSS of the process (page cache of the map included): "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")  # fmt: skip


if __name__ == "__main__":
    main()
