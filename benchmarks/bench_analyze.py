"""analyze's statistics pass over saved features against plain PyTorch over the same file.

Writes an (N, d) float32 feature file and (N,) int64 labels in [0, K) into a temporary
directory (``--dir``; deleted afterwards), as ``.npy`` and, with ``--formats``, as
``.safetensors`` and ``.h5`` holding the same bytes, then times in one run, per N of
``--rows`` (a sweep over N for the plots):
- floor: a bare ``sum over chunks of X_c^T X_c`` (fp32 GEMM) over the same rows read through
  the file's own reader (the .npy memory map, safetensors' ``get_slice``, the h5py
  dataset): no scatter pass can beat it;
- plain (.npy): what a user would write for the same result, a two-pass loop over the
  map: class sums by ``index_add_`` (float64), then the centred fp32 ``addmm_`` with the
  final means;
- analyze: ``analyze(path, labels=..., num_classes=K, ncc=False)``: one pass (ClassStats
  with S_W), then the metrics; for every format.
Each is the best of ``--repeats`` runs after one untimed run (the page cache then holds
the file, and a process's first pass pays one-time costs only there). The
anonymous resident memory (RssAnon of /proc/self/status: the page cache of the map
excluded) is sampled every 10 ms; its peak above the level before the pass is the memory
the pass needs, bounded by ``--chunk-rows`` (three chunks alive: reduced, queued, being
read) whatever the file size.

    python benchmarks/bench_analyze.py                                   # N = 200k, d = 512, K = 100 (400 MB)
    python benchmarks/bench_analyze.py --rows 1000000 --formats npy safetensors h5   # 2 GB per format
    python benchmarks/bench_analyze.py --rows 25000 50000 100000 --dim 128 --classes 10   # quick sweep

Targets (issue 11): analyze within 1.5x of the floor on .npy; peak RssAnon under 1 GiB for
a 4 GB file; .safetensors and .h5 within 1.2x of .npy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import tempfile
import threading
import time

import numpy as np
import torch
from common import machine, markdown, result_row, sync, write_json

from collapse_ext.analyze import analyze

FORMATS = ("npy", "safetensors", "h5")


def rss_anon_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakRss:
    """Samples RssAnon every 10 ms on a thread: ``start`` and ``peak`` in MiB."""

    def __enter__(self) -> PeakRss:
        self.start = self.peak = rss_anon_mib()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self) -> None:
        while not self.done.wait(0.01):
            self.peak = max(self.peak, rss_anon_mib())

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, rss_anon_mib())

    @property
    def extra(self) -> float:
        return max(self.peak - self.start, 0.0)


# ------------------------------------------------------------------------- files
def write_npy(path: str, n: int, d: int, k: int, seed: int = 0, block: int = 65536) -> str:
    """Features (n, d) float32 at ``path`` (class means * 3 + unit noise) and labels (n,)
    int64 beside it (``<stem>_labels.npy``), written block by block. Returns the labels' path."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((k, d), dtype=np.float32) * 3
    y = rng.integers(0, k, n)
    x = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        x[lo:hi] = means[y[lo:hi]] + rng.standard_normal((hi - lo, d), dtype=np.float32)
    x.flush()
    del x
    labels = path.replace(".npy", "_labels.npy")
    np.save(labels, y)
    return labels


def write_safetensors(src: str, path: str, block: int = 65536) -> None:
    """The .npy's features as ``features`` of a .safetensors file, streamed (the format is
    an 8-byte header size, a JSON header and the raw little-endian bytes)."""
    x = np.load(src, mmap_mode="r")
    n, d = x.shape
    header = json.dumps({"features": {"dtype": "F32", "shape": [n, d], "data_offsets": [0, n * d * 4]}}).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for lo in range(0, n, block):
            f.write(np.ascontiguousarray(x[lo : lo + block]).tobytes())


def write_h5(src: str, path: str, block: int = 65536) -> None:
    """The .npy's features as dataset ``features`` of an .h5 file (contiguous layout)."""
    import h5py

    x = np.load(src, mmap_mode="r")
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("features", shape=x.shape, dtype=np.float32)
        for lo in range(0, x.shape[0], block):
            ds[lo : lo + block] = x[lo : lo + block]


# ------------------------------------------------------------------ plain passes
class _Reader:
    """Rows [lo, hi) of a feature file through its own reader, as a float32 tensor copy."""

    def __init__(self, fmt: str, path: str) -> None:
        self.fmt, self.close = fmt, lambda: None
        if fmt == "npy":
            self.data = np.load(path, mmap_mode="r")
        elif fmt == "safetensors":
            from safetensors import safe_open

            self.handle = safe_open(path, framework="pt")
            self.data = self.handle.get_slice("features")
        else:
            import h5py

            f = h5py.File(path, "r")
            self.data, self.close = f["features"], f.close
        self.n = self.data.get_shape()[0] if fmt == "safetensors" else self.data.shape[0]

    def read(self, lo: int, hi: int) -> torch.Tensor:
        if self.fmt == "safetensors":
            return self.data[lo:hi]
        return torch.from_numpy(np.array(self.data[lo:hi]))


def bare_gram(fmt: str, path: str, chunk: int, device: torch.device) -> torch.Tensor:
    """sum_c X_c^T X_c in fp32 over the file read in chunks: the floor of a scatter pass."""
    reader = _Reader(fmt, path)
    try:
        acc = None
        for lo in range(0, reader.n, chunk):
            c = reader.read(lo, min(lo + chunk, reader.n)).to(device)
            acc = c.T @ c if acc is None else acc.addmm_(c.T, c)
        return acc
    finally:
        reader.close()


def plain_two_pass(path: str, labels: str, k: int, chunk: int, device: torch.device) -> torch.Tensor:
    """What a user would write for means + S_W of a memory-mapped .npy: class sums in
    float64 over the map, then the centred fp32 scatter with the final means."""
    x = np.load(path, mmap_mode="r")
    y = torch.from_numpy(np.load(labels)).to(device)
    n, d = x.shape
    sums = torch.zeros(k, d, dtype=torch.float64, device=device)
    for lo in range(0, n, chunk):
        c = torch.from_numpy(np.array(x[lo : lo + chunk])).to(device)
        sums.index_add_(0, y[lo : lo + chunk], c.double())
    counts = torch.bincount(y, minlength=k).to(torch.float64)
    means = (sums / counts.clamp_min(1).unsqueeze(1)).float()
    scatter = torch.zeros(d, d, device=device)
    for lo in range(0, n, chunk):
        c = torch.from_numpy(np.array(x[lo : lo + chunk])).to(device)
        c -= means[y[lo : lo + chunk]]
        scatter.addmm_(c.T, c)
    return scatter / n


def timed(fn, device: torch.device, repeats: int) -> tuple[float, float]:
    """Best wall time of ``repeats`` calls and the largest RssAnon rise over a call (MiB)."""
    best, extra = float("inf"), 0.0
    for _ in range(repeats):
        with PeakRss() as rss:
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            best = min(best, time.perf_counter() - start)
        extra = max(extra, rss.extra)
    return best, extra


def breakdown(path: str, labels: str, k: int, chunk: int, device: torch.device) -> list[dict]:
    """Where analyze's pass spends its time on a .npy: reading alone (analyze's reader and
    prefetch thread, nothing reduced), the memory map's plain read (``np.array`` of each
    chunk), and on one chunk held in memory, as many times as there are chunks: the
    statistics op (``ClassStats.update``), the bare GEMM, analyze's per-chunk finite check
    and a cheaper row-sum screen."""
    from collapse_ext import ClassStats, io

    x = np.load(path, mmap_mode="r")
    n, d = x.shape
    reps = -(-n // chunk)
    first = torch.from_numpy(np.array(x[:chunk])).to(device)
    y0 = torch.from_numpy(np.load(labels)[:chunk]).to(device)

    def read_io():
        arr, lab = io.open_array(path), io.open_array(labels)
        try:
            for _ in io.iter_chunks([arr], lab, 0, n, chunk, device):
                pass
        finally:
            arr.close()
            lab.close()

    def read_map():
        for lo in range(0, n, chunk):
            np.array(x[lo : lo + chunk])

    def stats_op():
        stats = ClassStats(k, d, device=device)
        for _ in range(reps):
            stats.update(first, y0)
        stats.within_cov()

    def gemm():
        acc = torch.zeros(d, d, device=device)
        for _ in range(reps):
            acc.addmm_(first.T, first)

    def finite_rows():
        for _ in range(reps):
            torch.isfinite(first).all(1)

    def finite_screen():
        for _ in range(reps):
            torch.isfinite(first.sum(1)).all()

    parts = {
        "read through collapse_ext.io.iter_chunks (prefetch thread, no reduction)": read_io,
        "read: np.array of each chunk of the map": read_map,
        f"ClassStats.update on one in-memory chunk, {reps} times": stats_op,
        f"bare fp32 X_c^T X_c on one in-memory chunk, {reps} times": gemm,
        f"analyze's finite check torch.isfinite(X_c).all(1), {reps} times": finite_rows,
        f"a row-sum screen torch.isfinite(X_c.sum(1)), {reps} times": finite_screen,
    }
    rows = []
    for name, fn in parts.items():
        fn()
        t, rss = timed(fn, device, 2)
        rows.append({"part": name, "s": f"{t:.2f}", "RssAnon rise MiB": f"{rss:.0f}"})
        print(rows[-1], flush=True)
    return rows


# -------------------------------------------------------------------------- main
def bench_rows(n: int, args: argparse.Namespace, device: torch.device, tmp: str) -> tuple[list, list, list]:
    d, k, chunk = args.dim, args.classes, args.chunk_rows
    gb = n * d * 4 / 1e9
    paths = {"npy": os.path.join(tmp, f"features_{n}.npy")}
    start = time.perf_counter()
    labels = write_npy(paths["npy"], n, d, k)
    if "safetensors" in args.formats:
        paths["safetensors"] = os.path.join(tmp, f"features_{n}.safetensors")
        write_safetensors(paths["npy"], paths["safetensors"])
    if "h5" in args.formats:
        paths["h5"] = os.path.join(tmp, f"features_{n}.h5")
        write_h5(paths["npy"], paths["h5"])
    print(f"N = {n}: wrote {', '.join(paths)} ({gb:.2f} GB each) in {time.perf_counter() - start:.1f} s", flush=True)
    table, results = [], []
    sizes = {"N": n, "d": d, "K": k}
    npy_time = None
    for fmt in args.formats:
        path = paths[fmt]
        bare_gram(fmt, path, chunk, device)  # the page cache holds the file for every pass below
        t_floor, rss_floor = timed(lambda fmt=fmt, path=path: bare_gram(fmt, path, chunk, device), device, args.repeats)
        t_plain = rss_plain = None
        if fmt == "npy" and not args.no_plain:
            plain_two_pass(path, labels, k, chunk, device)  # warm-up, as the floor's: first-call costs
            t_plain, rss_plain = timed(
                lambda path=path: plain_two_pass(path, labels, k, chunk, device), device, args.repeats
            )
        box = {}

        def run(path=path, box=box):
            box["result"] = analyze(
                path, labels=labels, num_classes=k, device=device, chunk_rows=chunk, ncc=False, progress=False
            )

        run()  # warm-up: the first analyze of a process pays its one-time costs (imports, threads)
        t_ours, rss_ours = timed(run, device, args.repeats)
        if fmt == "npy":
            npy_time = t_ours
        nc1 = box["result"].metrics.nc1
        table.append(
            {
                "format": fmt,
                "N": n,
                "GB": f"{gb:.2f}",
                "floor X^T X s": f"{t_floor:.2f}",
                "plain two-pass s": "-" if t_plain is None else f"{t_plain:.2f}",
                "analyze s": f"{t_ours:.2f}",
                "analyze / floor": f"{t_ours / t_floor:.2f}x (target <= 1.5x)",
                "vs .npy": "-" if fmt == "npy" or npy_time is None else f"{t_ours / npy_time:.2f}x (target <= 1.2x)",
                "analyze GB/s": f"{gb / t_ours:.2f}",
                "RssAnon rise MiB floor / plain / analyze": f"{rss_floor:.0f} / "
                + ("-" if rss_plain is None else f"{rss_plain:.0f}")
                + f" / {rss_ours:.0f}",
                "NC1": f"{nc1:.4g}",
            }
        )
        print(table[-1], flush=True)
        results.append(
            result_row(
                f"analyze statistics pass (.{fmt})",
                sizes,
                t_ours,
                t_plain,
                plain="two-pass loop over the memory map: float64 index_add_ class sums, then centred fp32 addmm_"
                if t_plain is not None
                else "not run for this format (the .npy row has it)",
                work=2.0 * n * d * d,  # the scatter's GEMM: at d = 512 the pass is compute-bound, not read-bound
                unit="GFLOP/s fp32",
                ours_peak_mib=rss_ours,
                plain_peak_mib=rss_plain,
                floor_s=t_floor,
                floor=f"bare fp32 X_c^T X_c over the chunks, read through the {fmt} reader",
                sweep="N",
                note=f"peak RssAnon rise; analyze / .npy analyze {t_ours / npy_time:.2f}x"
                if npy_time and fmt != "npy"
                else "peak RssAnon rise",
            )
        )
        if fmt != "npy":
            os.unlink(path)
    parts = breakdown(paths["npy"], labels, k, chunk, device) if args.breakdown else []
    for path in (paths["npy"], labels):
        os.unlink(path)
    return table, results, parts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", "--n", type=int, nargs="+", default=[200_000], help="N (several: a sweep over N)")
    p.add_argument("--dim", "--d", type=int, default=512, help="d")
    p.add_argument("--classes", "--k", type=int, default=100, help="K")
    p.add_argument("--formats", nargs="+", default=["npy"], choices=FORMATS, help="file formats to time")
    p.add_argument("--chunk-rows", type=int, default=65536)
    p.add_argument("--repeats", type=int, default=1, help="best of this many runs of each pass")
    p.add_argument("--no-plain", action="store_true", help="skip the plain two-pass loop")
    p.add_argument("--breakdown", action="store_true", help="also time the parts of the pass (read, stats, GEMM)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dir", default=None, help="where to write the files (default: a temporary directory)")
    p.add_argument("--json", default=None, help="write the rows (common.result_row) here")
    args = p.parse_args()
    if "npy" not in args.formats:
        args.formats = ["npy", *args.formats]  # the other formats are compared with it
    args.formats = [f for f in FORMATS if f in args.formats]
    device = torch.device(args.device)
    print(
        f"d = {args.dim}, K = {args.classes}, float32, chunk {args.chunk_rows} rows, formats {args.formats}, "
        f"{machine(device)}; RssAnon at start {rss_anon_mib():.0f} MiB"
    )
    table, results, parts = [], [], []
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench_analyze_") as tmp:
        for n in args.rows:
            rows, res, part = bench_rows(n, args, device, tmp)
            table += rows
            results += res
            parts += [{"N": n, **row} for row in part]
    print()
    print(markdown(table, list(table[0])))
    if parts:
        print("\nWhere the time goes (.npy):\n")
        print(markdown(parts, list(parts[0])))
    print(
        f"\nmax RSS of the process (page cache of the maps included): "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
    )
    write_json(args.json, {"machine": machine(device), "table": table, "breakdown": parts, "results": results})


if __name__ == "__main__":
    main()
