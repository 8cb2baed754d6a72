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
from common import Rotating, machine, markdown, measure_with_peak, result_row, timeit, write_json

from collapse_ext import class_stats, within_scatter
from collapse_ext.reference import within_scatter_reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the rows (common.result_row) here")
    args = parser.parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.n, args.d, generator=g).to(device)
    y = torch.randint(0, args.k, (args.n,), generator=g).to(device)
    means = class_stats(x, y, args.k)[1]
    basis = torch.linalg.qr(torch.randn(args.d, args.k - 1, generator=g, dtype=torch.float64))[0].to(device)
    rot = Rotating((x, y))  # inputs that are not in cache from the call before
    measured = {
        name: measure_with_peak(fn, device, args.repeats)
        for name, fn in {
            "ours": lambda: within_scatter(*rot.next(), means),
            "ours_projected": lambda: within_scatter(*rot.next(), means, basis),
            "reference": lambda: within_scatter_reference(*rot.next(), means),
            "reference_projected": lambda: within_scatter_reference(*rot.next(), means, basis),
        }.items()
    }

    def gemm():
        xr, _ = rot.next()
        return xr.T @ xr

    t_gemm = timeit(gemm, device, args.repeats)
    names = {
        "ours": "within_scatter (d, d)",
        "ours_projected": "within_scatter projected (r, r)",
        "reference": "reference (float64)",
        "reference_projected": "reference projected (float64)",
    }
    rows = [
        {"what": names[key], "ms": f"{1e3 * t.median:.1f}", "peak MiB": f"{peak or 0:.0f}"}
        for key, (t, peak) in measured.items()
    ]
    rows.append({"what": "bare X.T @ X (fp32 GEMM)", "ms": f"{1e3 * t_gemm:.1f}", "peak MiB": "-"})
    sizes = {"N": args.n, "d": args.d, "K": args.k}
    r = args.k - 1
    results = [
        result_row(
            "within_scatter" + (" projected" if proj else ""),
            sizes,
            measured["ours" + proj][0].median,
            measured["reference" + proj][0].median,
            plain="float64 reference (centred copy, X^T X" + (" of the projection)" if proj else ")"),
            work=2.0 * args.n * (args.d * r + r * r if proj else args.d * args.d),  # projection + scatter
            unit="GFLOP/s fp32",
            ours_peak_mib=measured["ours" + proj][1],
            plain_peak_mib=measured["reference" + proj][1],
            floor_s=None if proj else t_gemm,
            floor=None if proj else "bare fp32 X.T @ X",
        )
        for proj in ("", "_projected")
    ]
    print(f"N = {args.n}, d = {args.d}, K = {args.k}, float32 input, {machine(device)}\n")
    print(markdown(rows, ["what", "ms", "peak MiB"]))
    write_json(args.json, {"machine": machine(device), "results": results})


if __name__ == "__main__":
    main()
