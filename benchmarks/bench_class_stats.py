"""Class statistics (means + Sigma_W) through ClassStats vs plain PyTorch, in one run.

For each shape: (a) the float64 plain-PyTorch two-pass reference (what a user would
write), (b) a bare fp32 `X.T @ X` of the same data, the floor (the scatter is one GEMM of
2 N d^2 flops), and ours (`ClassStats.update`, fused class_stats + within_scatter + merge).

    python benchmarks/bench_class_stats.py [--device cuda] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse

import torch
from common import machine, markdown, timeit, write_json

from collapse_ext import ClassStats, class_stats
from collapse_ext.reference import class_stats_reference, within_scatter_reference

CPU_SHAPES = [(20_000, 512, 10, 9), (200_000, 2048, 100, 1)]
CUDA_SHAPES = [(200_000, 512, 10, 10), (1_000_000, 2048, 100, 5)]


def reference(x, y, k):
    _, means, _ = class_stats_reference(x, y, k)
    return means, within_scatter_reference(x, y, means) / x.shape[0]


def ours(x, y, k):
    stats = ClassStats(k, x.shape[1], device=x.device).update(x, y)
    return stats.means, stats.within_cov()


def copy_bandwidth(x: torch.Tensor, device: torch.device) -> float:
    """Measured device copy bandwidth in GB/s (read + write counted)."""
    out = torch.empty_like(x)
    t = timeit(lambda: out.copy_(x), device, repeats=10)
    return 2 * x.numel() * x.element_size() / t / 1e9


def bench_shape(n, d, k, repeats, device):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(n, d, generator=g) + 3.0).to(device)
    y = torch.randint(0, k, (n,), generator=g).to(device)
    flops = 2.0 * n * d * d
    stats_bytes = 2 * x.numel() * x.element_size()  # class_stats reads the batch twice
    t_gemm = timeit(lambda: x.T @ x, device, repeats)
    t_ours = timeit(lambda: ours(x, y, k), device, repeats)
    t_stats = timeit(lambda: class_stats(x, y, k), device, repeats)
    t_ref = timeit(lambda: reference(x, y, k), device, max(1, repeats // 2))
    row = {
        "shape": f"N={n} d={d} K={k}",
        "reference ms": f"{1e3 * t_ref:.1f}",
        "X^T X (floor) ms": f"{1e3 * t_gemm:.1f}",
        "ours ms": f"{1e3 * t_ours:.1f}",
        "ours / floor": f"{t_ours / t_gemm:.2f}x",
        "speed-up vs reference": f"{t_ref / t_ours:.1f}x",
        "ours GFLOP/s": f"{flops / t_ours / 1e9:.0f}",
        "GEMM GFLOP/s": f"{flops / t_gemm / 1e9:.0f}",
        "class_stats GB/s": f"{stats_bytes / t_stats / 1e9:.1f}",
    }
    if device.type == "cuda":
        row["class_stats % of copy BW"] = f"{100 * stats_bytes / t_stats / 1e9 / copy_bandwidth(x, device):.0f}%"
    return row


def run(shapes, device):
    rows = []
    for n, d, k, repeats in shapes:
        rows.append(bench_shape(n, d, k, repeats, device))
        print(rows[-1], flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="only the small shape")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shapes = CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES
    if args.quick:
        shapes = shapes[:1]
    rows = run(shapes, device)
    columns = [
        "shape",
        "reference ms",
        "X^T X (floor) ms",
        "ours ms",
        "ours / floor",
        "speed-up vs reference",
        "ours GFLOP/s",
        "GEMM GFLOP/s",
        "class_stats GB/s",
    ]
    if device.type == "cuda":
        columns.append("class_stats % of copy BW")
    print(f"\nMachine: {machine(device)}\n")
    print(markdown(rows, columns))
    write_json(args.json, {"machine": machine(device), "rows": rows})


if __name__ == "__main__":
    main()
