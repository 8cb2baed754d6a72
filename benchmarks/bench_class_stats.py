"""Class statistics (means + Sigma_W) through ClassStats vs plain PyTorch, in one run.

Four cases, each with its floor measured in the same run:
1. whole data sets in one update: (a) the float64 plain-PyTorch two-pass reference (what
   a user would write), (b) a bare fp32 `X.T @ X` of the same data, the floor (the scatter
   is one GEMM of 2 N d^2 flops), and ours (`ClassStats.update`);
2. a training loop's small batches (B = 128): ours (one streaming pass) vs the floor, one
   fp32 `addmm_` accumulation of the same batches, and vs a plain two-pass loop (class
   sums by `index_add_`, then centred `addmm_` with the final means: exact, but it needs
   all the data twice);
3. vocabulary-sized K (GPT-2's 50257 classes, d = 768, Zipfian labels): 8 updates of 1024
   rows of class means (within_cov=False) vs one bare fp32 `index_add_` of all 8192 rows.
4. size sweeps of case 1 (``--no-sweeps`` skips them): N, d and K varied one at a time,
   the other two fixed, for the log-log plots of ``python -m benchmarks.plots``.
Cases 2 and 3 alternate ours and the baselines over rounds (ABAB) and keep each one's
best round, so a noisy neighbour on a shared machine does not decide the ratio.

    python benchmarks/bench_class_stats.py [--device cuda] [--quick] [--no-sweeps] [--json out.json]

``--json`` writes the printed tables and ``results``: one row per measurement in the
suite's format (``common.result_row``: ours, plain PyTorch, floor, rate, peak memory).
"""

from __future__ import annotations

import argparse

import torch
from common import Rotating, machine, markdown, measure_with_peak, result_row, timeit, write_json

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


def bench_shape(n, d, k, repeats, device, sweep=None):
    """The table row (strings) and the result row (numbers) of one shape."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(n, d, generator=g) + 3.0).to(device)
    y = torch.randint(0, k, (n,), generator=g).to(device)
    flops = 2.0 * n * d * d
    stats_bytes = 2 * x.numel() * x.element_size()  # class_stats reads the batch twice
    rot = Rotating((x, y))  # inputs that are not in cache from the call before

    def gemm():
        xr, _ = rot.next()
        return xr.T @ xr

    t_gemm = timeit(gemm, device, repeats)
    t_ours, peak_ours = measure_with_peak(lambda: ours(*rot.next(), k), device, repeats)
    t_stats = timeit(lambda: class_stats(*rot.next(), k), device, repeats)
    t_ref, peak_ref = measure_with_peak(lambda: reference(*rot.next(), k), device, max(1, repeats // 2))
    t_ours, t_ref = t_ours.median, t_ref.median
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
    result = result_row(
        "ClassStats.update (means + Sigma_W)",
        {"N": n, "d": d, "K": k},
        t_ours,
        t_ref,
        plain="float64 two-pass reference (index_add_ means, centred X^T X)",
        work=flops,
        unit="GFLOP/s fp32",
        ours_peak_mib=peak_ours,
        plain_peak_mib=peak_ref,
        floor_s=t_gemm,
        floor="bare fp32 X.T @ X",
        sweep=sweep,
    )
    return row, result


def best_of_rounds(fns: dict, device, rounds: int) -> dict:
    """Best time in ms of each callable over `rounds` alternating rounds."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], 1e3 * timeit(fn, device, repeats=1, warmup=0))
    return best


def small_batches(device, n=20_000, d=512, k=10, batch=128, rounds=7):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(n, d, generator=g) + 3.0).to(device)
    y = torch.randint(0, k, (n,), generator=g).to(device)
    xs, ys = list(x.split(batch)), list(y.split(batch))

    def floor():
        acc = torch.zeros(d, d, device=device)
        for xb in xs:
            acc.addmm_(xb.T, xb)

    def two_pass():
        sums = torch.zeros(k, d, dtype=torch.float64, device=device)
        counts = torch.zeros(k, dtype=torch.float64, device=device)
        for xb, yb in zip(xs, ys):
            sums.index_add_(0, yb, xb.double())
            counts.index_add_(0, yb, torch.ones(len(yb), dtype=torch.float64, device=device))
        means = (sums / counts.unsqueeze(1)).float()
        acc = torch.zeros(d, d, device=device)
        for xb, yb in zip(xs, ys):
            centred = xb - means[yb]
            acc.addmm_(centred.T, centred)

    def ours():
        stats = ClassStats(k, d, device=device)
        for xb, yb in zip(xs, ys):
            stats.update(xb, yb)
        stats.within_cov()

    for fn in (floor, two_pass, ours):
        fn()
    t = best_of_rounds({"floor": floor, "two_pass": two_pass, "ours": ours}, device, rounds)
    result = result_row(
        f"ClassStats.update, batches of {batch}",
        {"N": n, "d": d, "K": k},
        t["ours"] / 1e3,
        t["two_pass"] / 1e3,
        plain="two-pass loop: index_add_ class sums, then centred fp32 addmm_",
        work=2.0 * n * d * d,
        unit="GFLOP/s fp32",
        floor_s=t["floor"] / 1e3,
        floor="one fp32 addmm_ per batch",
    )
    return result, {
        "case": f"B={batch} loop, N={n} d={d} K={k}",
        "addmm_ floor ms": f"{t['floor']:.1f}",
        "plain two-pass ms": f"{t['two_pass']:.1f}",
        "ours ms": f"{t['ours']:.1f}",
        "ours / floor": f"{t['ours'] / t['floor']:.2f}x (target <= 1.5x)",
        "ours / two-pass": f"{t['ours'] / t['two_pass']:.2f}x (target <= 1.2x)",
    }


def vocabulary(device, k=50257, d=768, batch=1024, updates=8, rounds=5, state_dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    zipf = 1.0 / torch.arange(1, k + 1, dtype=torch.float64)
    y = torch.multinomial(zipf / zipf.sum(), batch * updates, replacement=True, generator=g).to(device)
    x = torch.randn(batch * updates, d, generator=g).to(device)
    sums = torch.zeros(k, d, device=device)
    stats = ClassStats(k, d, device=device, within_cov=False, state_dtype=state_dtype)

    def floor():
        sums.index_add_(0, y, x)

    def fresh():  # the audit's floor: index_add_ into a new (K, d) zeros, as the issue timed it
        torch.zeros(k, d, device=device).index_add_(0, y, x)

    def ours():
        for xb, yb in zip(x.split(batch), y.split(batch)):
            stats.update(xb, yb)

    def read():
        _ = stats.means  # folds the pending block (touched classes only)

    floor()
    ours()
    read()
    t = best_of_rounds({"floor": floor, "fresh": fresh, "ours": ours, "read": read}, device, rounds)
    state_mib = 2 * k * d * stats.means.element_size() / 2**20
    result = result_row(
        f"ClassStats.update class means, {str(state_dtype)[6:]} state",
        {"N": batch * updates, "d": d, "K": k},
        t["ours"] / 1e3,
        t["floor"] / 1e3,
        plain="in-place fp32 index_add_ of the rows (class sums only, no counts)",
        work=batch * updates * d * 4.0,
        unit="GB/s",
    )
    return result, {
        "case": f"K={k} d={d}, {updates} updates of {batch} rows, {str(state_dtype)[6:]} state",
        "bare index_add_ ms": f"{t['floor']:.1f}",
        "ours ms": f"{t['ours']:.1f}",
        "ours / floor": f"{t['ours'] / t['floor']:.2f}x (target <= 3x)",
        "index_add_ into new zeros ms": f"{t['fresh']:.1f}",
        "ours / that": f"{t['ours'] / t['fresh']:.2f}x",
        "fold on read ms": f"{t['read']:.1f}",
        "state MiB": f"{state_mib:.0f}",
    }


def float32_state_error(device, k=50257, d=768, rows=65536, batch=1024) -> float:
    """Relative Frobenius error of the class means kept in a float32 state, against the
    float64 state, on Zipfian labels and features with a common offset of 10 x their spread."""
    g = torch.Generator().manual_seed(1)
    zipf = 1.0 / torch.arange(1, k + 1, dtype=torch.float64)
    y = torch.multinomial(zipf / zipf.sum(), rows, replacement=True, generator=g).to(device)
    x = (torch.randn(rows, d, generator=g) + 10.0).to(device)
    exact = ClassStats(k, d, device=device, within_cov=False)
    light = ClassStats(k, d, device=device, within_cov=False, state_dtype=torch.float32)
    for xb, yb in zip(x.split(batch), y.split(batch)):
        exact.update(xb, yb)
        light.update(xb, yb)
    return float((light.means.double() - exact.means).norm() / exact.means.norm())


def run(shapes, device):
    rows, results = [], []
    for n, d, k, repeats in shapes:
        row, result = bench_shape(n, d, k, repeats, device)
        rows.append(row)
        results.append(result)
        print(rows[-1], flush=True)
    return rows, results


def run_sweeps(sweeps, device, repeats):
    """Scaling rows: one size varied at a time, the others fixed (plots: benchmarks.plots)."""
    rows, results = [], []
    for var, shapes in sweeps.items():
        for n, d, k in shapes:
            row, result = bench_shape(n, d, k, repeats, device, sweep=var)
            rows.append(row)
            results.append(result)
            print(f"sweep over {var}: {row}", flush=True)
    return rows, results


def _sweep_shapes(n, d, k, ns, ds, ks):
    return {"N": [(v, d, k) for v in ns], "d": [(n, v, k) for v in ds], "K": [(n, d, v) for v in ks]}


# Size sweeps (N, d, K one at a time; the other two fixed): small enough for --quick on 2 cores.
CPU_SWEEPS = _sweep_shapes(20_000, 512, 10, [5000, 20_000, 80_000, 200_000], [128, 256, 512, 1024], [10, 100, 1000])
CPU_SWEEPS_QUICK = _sweep_shapes(10_000, 256, 10, [2500, 10_000, 40_000], [64, 128, 256, 512], [10, 100, 1000])
CUDA_SWEEPS = _sweep_shapes(
    200_000, 512, 10, [50_000, 200_000, 800_000, 2_000_000], [128, 256, 512, 1024, 2048], [10, 100, 1000, 10_000]
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="only the small shape")
    parser.add_argument("--json", default=None)
    parser.add_argument("--no-sweeps", action="store_true", help="skip the size sweeps over N, d and K")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shapes = CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES
    if args.quick:
        shapes = shapes[:1]
    rows, results = run(shapes, device)
    sweep_rows = []
    if not args.no_sweeps:
        sweeps = CUDA_SWEEPS if device.type == "cuda" else CPU_SWEEPS_QUICK if args.quick else CPU_SWEEPS
        sweep_rows, sweep_results = run_sweeps(sweeps, device, repeats=3 if args.quick else 5)
        results += sweep_results
    result, row = small_batches(device)
    streaming = [row]
    results.append(result)
    print(streaming[-1], flush=True)
    for state_dtype in (torch.float64, torch.float32):
        result, row = vocabulary(device, state_dtype=state_dtype)
        streaming.append(row)
        results.append(result)
        print(streaming[-1], flush=True)
    streaming[-1]["fp32-state error of the means"] = f"{float32_state_error(device):.1e}"
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
    print()
    if sweep_rows:
        print("Size sweeps (one of N, d, K varied at a time):\n")
        print(markdown(sweep_rows, columns))
        print()
    print(markdown(streaming[:1], list(streaming[0])))
    print()
    print(markdown(streaming[1:], list(streaming[1])))
    write_json(
        args.json,
        {"machine": machine(device), "rows": rows, "sweeps": sweep_rows, "streaming": streaming, "results": results},
    )


if __name__ == "__main__":
    main()
