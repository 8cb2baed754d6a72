"""Fused metric ops against the plain PyTorch way, in one run: time and peak memory.

pairwise_stats at K = 1000, 2000, 5000, 10 000, 50 000 rows (``--ks``, d = 768 or
``--pairwise-d``: a sweep over K for the plots) against the full Gram matrix and the same statistics taken from
K x K tensors; nearest_centre at N = 100 000 (``--nearest-n``), K = 1000, d = 512 against
cdist + argmin and the full logit matrix + argmax. Every case runs in its own subprocess.
Its peak resident memory is reset once the inputs exist (/proc/self/clear_refs, else
getrusage maxrss) and reported above that resident size; the time is the best of
`--repeats` runs after one warm-up (4x as many for K <= 1000, half as many for
nearest_centre, one run for K >= 10 000); the cheap cases run plain and ours
alternately in two rounds. The plain pairwise way at K = 50 000
would need 10 GB per K x K fp32 matrix and several of them: it is not run.

    python benchmarks/bench_metrics.py                # the table, markdown, < 3 min
    python benchmarks/bench_metrics.py --device cuda  # adds matrix-product GFLOP/s
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch
from common import result_row, sync, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout, not an installed copy
PAIRWISE_KS = [1000, 2000, 5000, 10_000, 50_000]  # d = 768: a sweep over K
PAIRWISE_D = 768
PLAIN_PAIRWISE_MAX_K = 10_000  # beyond this the K x K temporaries exceed this machine's 24 GiB
NEAREST = [(100_000, 1000, 512)]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak resident size (VmHWM) to the current one (Linux >= 4.0), so
    temporaries of the input set-up do not count; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes(reset: bool) -> int:
    if reset:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def plain_pairwise(rows: torch.Tensor, variances: torch.Tensor) -> torch.Tensor:
    """What a user writes: the full Gram, cosines and distances as K x K tensors."""
    k = rows.shape[0]
    gram = rows @ rows.T
    sq = gram.diagonal()
    norms = sq.sqrt()
    upper = torch.ones(k, k, dtype=torch.bool, device=rows.device).triu(1)
    cos = (gram / norms[:, None] / norms[None, :])[upper].clamp(-1, 1)
    unit_sq = (2 - 2 * cos).clamp_min(0)
    log = -0.5 * unit_sq.log()
    riesz = unit_sq.rsqrt()
    dist_sq = (sq[:, None] + sq[None, :] - 2 * gram)[upper].clamp_min(0)
    cdnv = (variances[:, None] + variances[None, :])[upper] / (2 * dist_sq)
    dots = gram[upper]
    shifted = cos + 1 / (k - 1)
    return torch.stack(
        [
            cos.sum(),
            cos.min(),
            cos.max(),
            shifted.abs().sum(),
            shifted.square().sum(),
            log.sum(),
            log.square().sum(),
            riesz.sum(),
            riesz.square().sum(),
            cdnv.sum(),
            dots.square().sum(),
            dist_sq.max(),
        ]
    )


def plain_nearest(x, y, means, weight, bias) -> torch.Tensor:
    """What a user writes: cdist + argmin and the full logits + argmax."""
    nearest = torch.cdist(x, means).argmin(1)
    pred = (x @ weight.T + bias).argmax(1)
    n = torch.tensor(len(y), device=x.device)
    return torch.stack([n, (nearest == y).sum(), (nearest != pred).sum()])


def run_case(args: argparse.Namespace) -> dict:
    """Body of one subprocess: build inputs, then time one implementation."""
    sys.path.insert(0, ROOT)
    import collapse_ext

    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    if args.op == "pairwise":
        k, d = args.k, args.d
        rows = torch.randn(k, d, generator=g).to(device)
        variances = torch.rand(k, generator=g).to(device)
        rows -= rows.mean(0)
        if args.impl == "ours":
            fn = lambda: collapse_ext.pairwise_stats(rows, variances)  # noqa: E731
        elif args.impl == "plain":
            fn = lambda: plain_pairwise(rows, variances)  # noqa: E731
        else:
            fn = lambda: rows @ rows.T  # noqa: E731
        flops = 2 * k * k * d
    else:
        n, k, d = args.n, args.k, args.d
        means = 3 * torch.randn(k, d, generator=g)
        y = torch.randint(0, k, (n,), generator=g)
        x = (means[y] + torch.randn(n, d, generator=g)).to(device)
        means, y = means.to(device), y.to(device)
        weight, bias = torch.randn(k, d, generator=g).to(device), torch.randn(k, generator=g).to(device)
        if args.impl == "ours":
            fn = lambda: collapse_ext.nearest_centre(x, y, means, weight, bias)[0]  # noqa: E731
        elif args.impl == "plain":
            fn = lambda: plain_nearest(x, y, means, weight, bias)  # noqa: E731
        else:
            stacked = torch.cat([means, weight])
            fn = lambda: x @ stacked.T  # noqa: E731
        flops = 2 * n * (2 * k) * d
    sync(device)
    base = rss_bytes()
    reset = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_cuda = torch.cuda.memory_allocated(device)
    times = []
    for i in range(args.repeats + (1 if args.repeats > 1 else 0)):
        start = time.perf_counter()
        fn()
        sync(device)
        if args.repeats == 1 or i > 0:  # the first of several runs is the warm-up
            times.append(time.perf_counter() - start)
    peak = peak_rss_bytes(reset) - base
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base_cuda
    return {
        "time": min(times),
        "peak_mb": max(peak, 0) / 2**20,
        "gflops": flops / min(times) / 1e9,
        "threads": torch.get_num_threads(),
    }


def spawn(device: str, op: str, impl: str, repeats: int, **shape: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--device", device, "--op", op, "--impl", impl]
    cmd += ["--repeats", str(repeats)] + [f"--{key}={value}" for key, value in shape.items()]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def best(a: dict | None, b: dict) -> dict:
    """The faster of two measurements, with the larger of their peak memories."""
    if a is None:
        return b
    fast = a if a["time"] <= b["time"] else b
    return {**fast, "peak_mb": max(a["peak_mb"], b["peak_mb"])}


def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0]
    return f"{model}, {os.cpu_count()} cores, no GPU, load average {load:.1f} at start (shared machine)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-k", type=int, default=50_000, help="largest pairwise K to run")
    parser.add_argument("--ks", type=int, nargs="+", default=PAIRWISE_KS, help="pairwise K values")
    parser.add_argument(
        "--pairwise-d", type=int, default=PAIRWISE_D, help="d of the pairwise cases (768; 4096 for the GPU target)"
    )
    parser.add_argument("--nearest-n", type=int, default=NEAREST[0][0], help="rows N of the nearest_centre case")
    parser.add_argument("--json", default=None, help="write the rows (common.result_row) here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--op", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--d", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_case(args)))
        return

    # The parent never runs torch work (its OpenMP threads would compete with the cases).
    print(f"Machine: {machine(args.device)}, torch {torch.__version__}\n")
    header = (
        "| op | shape | ours (s) | plain (s) | plain / ours | ours peak MiB | plain peak MiB "
        "| ours GFLOP/s | matmul GFLOP/s |"
    )
    print(header)
    print("|" + "---|" * 9)
    cases = [("pairwise", dict(k=k, d=args.pairwise_d)) for k in sorted(args.ks) if k <= args.max_k]
    cases += [("nearest", dict(n=args.nearest_n, k=k, d=d)) for _, k, d in NEAREST]
    results = []
    for op, shape in cases:
        big = op == "pairwise" and shape["k"] > PLAIN_PAIRWISE_MAX_K
        # Best of several runs: other jobs on a shared machine make single timings noisy.
        if op == "pairwise":
            # K = 1000 takes ~20 ms: only many repeats see past other jobs' time slices.
            repeats = 1 if shape["k"] >= 10_000 else 4 * args.repeats if shape["k"] <= 1000 else args.repeats
        else:
            repeats = max(1, args.repeats // 2)
        # Cheap cases alternate plain and ours over two rounds and keep each one's best: the
        # first subprocess of a run is measurably slower here, whichever it runs.
        rounds = 1 if big or (op == "pairwise" and shape["k"] >= 10_000) else 2
        ours = plain = None
        for _ in range(rounds):
            if not big:
                plain = best(plain, spawn(args.device, op, "plain", repeats, **shape))
            ours = best(ours, spawn(args.device, op, "ours", repeats, **shape))
        mm = None if big else spawn(args.device, op, "matmul", repeats, **shape)
        label = ", ".join(f"{key.upper() if key != 'd' else key}={value}" for key, value in shape.items())
        # Our pairwise op multiplies only the upper triangle of tiles: about half the flops.
        ours_gflops = ours["gflops"] / 2 if op == "pairwise" else ours["gflops"]
        cells = [
            "pairwise_stats" if op == "pairwise" else "nearest_centre",
            label,
            f"{ours['time']:.3f}",
            f"not run (K x K fp32 = {4 * shape['k'] ** 2 / 1e9:.0f} GB each)" if big else f"{plain['time']:.3f}",
            "-" if big else f"{plain['time'] / ours['time']:.2f}x",
            f"{ours['peak_mb']:.0f}",
            "-" if big else f"{plain['peak_mb']:.0f}",
            f"{ours_gflops:.1f}",
            "-" if mm is None else f"{mm['gflops']:.1f}",
        ]
        print("| " + " | ".join(cells) + " |", flush=True)
        results.append(
            result_row(
                "pairwise_stats" if op == "pairwise" else "nearest_centre",
                {key.upper() if key != "d" else key: value for key, value in shape.items()},
                ours["time"],
                None if big else plain["time"],
                plain="full K x K Gram, the statistics from K x K tensors"
                if op == "pairwise"
                else "cdist + argmin and the full logit matrix + argmax",
                work=ours_gflops * 1e9 * ours["time"],
                unit="GFLOP/s fp32",
                ours_peak_mib=ours["peak_mb"],
                plain_peak_mib=None if big else plain["peak_mb"],
                floor_s=None if mm is None else mm["time"],
                floor="the bare matrix product (rows @ rows.T)" if op == "pairwise" else "x @ [means; W].T",
                sweep="K" if op == "pairwise" else None,
                note=f"plain not run: K x K fp32 temporaries above this machine's memory (K > {PLAIN_PAIRWISE_MAX_K})"
                if big
                else None,
            )
        )
    write_json(args.json, {"machine": machine(args.device), "results": results})


if __name__ == "__main__":
    main()
