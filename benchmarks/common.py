"""Helpers shared by the benchmarks: warm-up, synchronised timers, median and spread of
repeats, the machine's measured ceilings (bandwidth, matmul rates), tables and JSON; and
the inputs of the ``lpm_step`` op (its script and the pytest-benchmark case)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lpm_step_inputs(B: int, K: int, dtype: torch.dtype, device: torch.device) -> tuple:
    """``lpm_step``'s first nine arguments for B random instances of K classes, p = K."""
    from collapse_ext import lpm

    g = torch.Generator().manual_seed(0)
    W = torch.randn(B, K, K, generator=g, dtype=torch.float64)
    H = torch.randn(B, K, K, generator=g, dtype=torch.float64)
    weights = torch.rand(B, K, generator=g, dtype=torch.float64)
    weights = weights / weights.sum(1, keepdim=True)
    E_W, E_H = torch.ones(B, dtype=torch.float64), torch.full((B,), 5.0, dtype=torch.float64)
    step = 1.0 / lpm.lipschitz_bound(weights, E_W, E_H)
    theta = torch.ones(B, dtype=torch.float64)
    args = (W, H, W.clone(), H.clone(), theta, weights, E_W, E_H, step)
    return tuple(t.to(device=device, dtype=dtype).contiguous() for t in args)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Seconds per call over ``repeats`` synchronised runs after ``warmup`` untimed ones:
    median, min and max, and the spread (max - min) / median."""

    median: float
    min: float
    max: float
    repeats: int
    warmup: int

    @property
    def spread(self) -> float:
        return (self.max - self.min) / self.median if self.median > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "spread": self.spread}


def measure(fn: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 1) -> Timing:
    """Time ``fn`` ``repeats`` times after ``warmup`` calls, synchronising the device before
    the clock starts and after each call (so queued GPU work is inside the interval)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return Timing(statistics.median(times), min(times), max(times), repeats, warmup)


class Rotating:
    """Copies of a case's input tensors, enough to exceed the last-level cache
    (``min_bytes``, default 64 MiB), handed out in turn by :meth:`next`: each timed call then
    reads inputs that are not still in cache from the call before, as real data would not
    be (the same floor and ours see the same rotation). At most ``max_copies`` copies."""

    def __init__(self, tensors: tuple, min_bytes: int = 64 << 20, max_copies: int = 8) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors)
        copies = max(1, min(max_copies, -(-min_bytes // max(size, 1))))
        self.sets = [tensors] + [tuple(t.clone() for t in tensors) for _ in range(copies - 1)]
        self.i = 0

    def next(self) -> tuple:
        self.i = (self.i + 1) % len(self.sets)
        return self.sets[self.i]


def timeit(fn: Callable[[], object], device: torch.device, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of `fn` in seconds, synchronising the device around each call."""
    return measure(fn, device, repeats, warmup).median


def _bandwidth(elems: int, device: torch.device, repeats: int) -> dict:
    x = torch.rand(elems, device=device)
    out = torch.empty_like(x)
    nbytes = x.numel() * x.element_size()
    copy = measure(lambda: out.copy_(x), device, repeats)
    read = measure(lambda: x.sum(), device, repeats)
    return {"copy_gbs": 2 * nbytes / copy.median / 1e9, "read_gbs": nbytes / read.median / 1e9}


def ceilings(device: torch.device, quick: bool = False) -> dict:
    """The machine's measured ceilings on ``device``: copy bandwidth (read + write bytes
    counted), read bandwidth (a sum over a large buffer), fp32 and fp64 matmul rates
    (square n x n products, 2 n^3 flops). Sizes exceed the last-level cache."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    elems = (256 if cuda else 64) << 20 >> (2 if quick else 0)  # float32 elements: 256 / 64 MiB (CPU)
    repeats = 3 if quick else 10
    result = _bandwidth(elems, device, repeats)
    for dtype, key in ((torch.float32, "matmul_fp32_gflops"), (torch.float64, "matmul_fp64_gflops")):
        n = (8192 if cuda else 2048) >> (1 if quick else 0)
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        t = measure(lambda a=a, b=b: a @ b, device, max(3, repeats // 2))
        result[key] = 2 * n**3 / t.median / 1e9
    result["tf32"] = bool(cuda and torch.backends.cuda.matmul.allow_tf32)
    return result


def machine(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit() -> str | None:
    """The checkout's commit (with "-dirty" when it has local changes), None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=ROOT, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment(device: torch.device) -> dict:
    """Torch version, commit and a description of ``device`` for a results file."""
    device = torch.device(device)
    env = {
        "torch": torch.__version__,
        "commit": commit(),
        "device": device.type,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
        )
    try:
        import collapse_ext

        env["collapse_ext"] = collapse_ext.build_info()
    except ImportError:
        pass
    return env


def markdown(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def write_json(path: str | None, payload: dict) -> None:
    if path:
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)


# ----------------------------------------------------------------- result rows
# Every case hands back rows of one shape (``result_row``), so the driver, the table and the
# plots read all of them alike. Units of the achieved rate and the ceiling each is set against.
CEILINGS = {
    "GFLOP/s fp32": "matmul_fp32_gflops",
    "GFLOP/s fp64": "matmul_fp64_gflops",
    "GB/s": "read_gbs",
}


def result_row(
    op: str,
    sizes: dict,
    ours_s: float,
    plain_s: float | None,
    *,
    plain: str,
    work: float | None = None,
    unit: str | None = None,
    ours_peak_mib: float | None = None,
    plain_peak_mib: float | None = None,
    floor_s: float | None = None,
    floor: str | None = None,
    sweep: str | None = None,
    note: str | None = None,
) -> dict:
    """One measured row: ``ours_s`` against ``plain_s`` (the same result the plain PyTorch way,
    timed in the same run; None where it was not run), the achieved rate ``work / ours_s``
    (``work`` flops or bytes; ``unit`` one of ``CEILINGS``), peak memories in MiB above the
    inputs (None where not measurable), an optional floor (``floor_s``: e.g. the bare GEMM),
    and ``sweep``: the key of ``sizes`` this row's series varies (for the scaling plots)."""
    row = {
        "op": op,
        "shape": " ".join(f"{k}={v}" for k, v in sizes.items()),
        "sizes": dict(sizes),
        "ours_s": ours_s,
        "plain_s": plain_s,
        "plain": plain,
        "work": work,
        "unit": unit,
        "rate": None if work is None or not ours_s else work / ours_s / 1e9,
        "ours_peak_mib": ours_peak_mib,
        "plain_peak_mib": plain_peak_mib,
    }
    if floor_s is not None:
        row.update(floor_s=floor_s, floor=floor)
    if sweep is not None:
        row["sweep"] = sweep
    if note:
        row["note"] = note
    return annotate(row)


def annotate(row: dict, ceilings: dict | None = None) -> dict:
    """Add the fields derived from the measured ones (in place; returns ``row``):
    ``speedup`` = plain_s / ours_s, ``slower`` = ours took longer than the plain way (the
    ratio below 1: flagged, never dropped), ``vs_floor`` = ours_s / floor_s, and with the
    machine's measured ``ceilings`` the achieved rate's ``pct_of_ceiling``."""
    ours, plain = row.get("ours_s"), row.get("plain_s")
    if ours and plain:
        row["speedup"] = plain / ours
        row["slower"] = plain / ours < 1.0
    else:
        row["speedup"], row["slower"] = None, False
    if ours and row.get("floor_s"):
        row["vs_floor"] = ours / row["floor_s"]
    key = CEILINGS.get(row.get("unit") or "")
    if ceilings and key and ceilings.get(key) and row.get("rate") is not None:
        row["pct_of_ceiling"] = 100 * row["rate"] / ceilings[key]
    return row


def rss_bytes() -> int:
    """Resident size of this process now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory of one call of ``fn`` above what was resident before it, in MiB: on CUDA
    the caching allocator's peak; on the CPU the kernel's peak resident size (VmHWM, reset
    through /proc/self/clear_refs, Linux >= 4.0). None where that cannot be measured."""
    device = torch.device(device)
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    try:
        base = rss_bytes()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        fn()
        with open("/proc/self/status") as f:
            peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
    return max(peak - base, 0) / 2**20


def measure_with_peak(
    fn: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 1
) -> tuple[Timing, float | None]:
    """``measure`` and the peak memory of the timed calls (as ``peak_memory_mib``: above
    what was resident after the warm-up), without an extra call."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    timing: list[Timing] = []
    peak = peak_memory_mib(lambda: timing.append(measure(fn, device, repeats, warmup=0)), device)
    return timing[0], peak
