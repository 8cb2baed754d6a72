"""``within_scatter`` op vs the plain float64 PyTorch reference (what a user would write).

The centred within-class scatter sum_i (h_i - m_{y_i})(h_i - m_{y_i})^T, full (d, d) and
projected onto a (d, r) basis, against ``reference.within_scatter_reference`` and the bare
``X.T @ X`` GEMM of the same input (the floor). Prints a markdown table.

    python benchmarks/bench_within_scatter.py                # CPU
    python benchmarks/bench_within_scatter.py --device cuda  # the same on a GPU
"""

from __future__ import annotations

import argparse

import torch
from common import machine, markdown, timeit

from collapse_ext import class_stats, within_scatter
from collapse_ext.reference import within_scatter_reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.n, args.d, generator=g).to(device)
    y = torch.randint(0, args.k, (args.n,), generator=g).to(device)
    means = class_stats(x, y, args.k)[1]
    basis = torch.linalg.qr(torch.randn(args.d, args.k - 1, generator=g, dtype=torch.float64))[0].to(device)
    cases = {
        "within_scatter (d, d)": lambda: within_scatter(x, y, means),
        "within_scatter projected (r, r)": lambda: within_scatter(x, y, means, basis),
        "reference (float64)": lambda: within_scatter_reference(x, y, means),
        "bare X.T @ X (fp32 GEMM)": lambda: x.T @ x,
    }
    rows = [{"what": name, "ms": f"{1e3 * timeit(fn, device, args.repeats):.1f}"} for name, fn in cases.items()]
    print(f"N = {args.n}, d = {args.d}, K = {args.k}, float32 input, {machine(device)}\n")
    print(markdown(rows, ["what", "ms"]))


if __name__ == "__main__":
    main()
