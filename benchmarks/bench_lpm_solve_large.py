"""Large-K Layer-Peeled Model: ``lpm.solve_large`` on the exponential profile.

Workload (the issue's target): K = p = 1000 classes with n_k = 500 (5/500)^(k/(K-1)),
an exponential profile 500 -> 5, cross entropy, E_W = E_H = 1, solved to the scale-free
KKT residual <= 1e-6 (``--tol``) with the Gram change of the last Newton step <= 1e-6
(``--gram-tol``). Prints wall time, L-BFGS iterations, Newton steps, CG iterations
(Hessian-vector products), the KKT residual, gram_error, the GEMM flops spent and the
floor they imply at ``--gflops`` GFLOP/s (the issue's ~80 GFLOP/s for this CPU), and the
GEMM rate measured on this machine right before the solve.

    python benchmarks/bench_lpm_solve_large.py               # K = 1000, CPU
    python benchmarks/bench_lpm_solve_large.py --K 300       # quicker
    python benchmarks/bench_lpm_solve_large.py --device cuda
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from common import peak_memory_mib, result_row, sync, write_json

from collapse_ext import lpm


def gemm_rate(K: int, device: torch.device) -> float:
    """Measured float64 GFLOP/s of one K x K x K matmul (median of 5)."""
    a = torch.randn(K, K, dtype=torch.float64, device=device)
    b = torch.randn(K, K, dtype=torch.float64, device=device)
    a @ b
    times = []
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * K**3 / sorted(times)[2] / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--K", type=int, default=1000)
    parser.add_argument("--E-W", type=float, default=1.0)
    parser.add_argument("--E-H", type=float, default=1.0)
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--gram-tol", type=float, default=1e-6)
    parser.add_argument("--gflops", type=float, default=80.0, help="rate assumed for the floor estimate")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--json", default=None, help="write the row (common.result_row) here")
    args = parser.parse_args()
    device = torch.device(args.device)
    K = args.K
    counts = 500.0 * (5.0 / 500.0) ** (torch.arange(K, dtype=torch.float64) / (K - 1))
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        cpu = platform.processor() or platform.machine()
        machine = f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    rate = gemm_rate(K, device)
    print(f"K = p = {K}, exponential 500 -> 5, CE, E_W = {args.E_W}, E_H = {args.E_H}, float64, {machine}")
    print(f"measured GEMM rate: {rate:.1f} GFLOP/s")
    out = {}

    def solve():
        sync(device)
        start = time.perf_counter()
        out["res"] = lpm.solve_large(
            counts, args.E_W, args.E_H, tol=args.tol, gram_tol=args.gram_tol, device=device, verbose=args.verbose
        )
        sync(device)
        out["seconds"] = time.perf_counter() - start

    peak = peak_memory_mib(solve, device)
    res, seconds = out["res"], out["seconds"]
    print(
        "| K | wall s | L-BFGS s (KKT <= switch_tol) | L-BFGS its | Newton steps | CG its | KKT | gram_error "
        "| converged | GFLOP | floor s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {K} | {seconds:.1f} | {res.lbfgs_seconds:.1f} | {int(res.iterations[0])} | {int(res.newton_steps[0])} "
        f"| {res.cg_iterations} "
        f"| {float(res.kkt[0]):.2e} | {float(res.gram_error[0]):.2e} | {bool(res.converged[0])} "
        f"| {res.flops / 1e9:.0f} | {res.flops / 1e9 / args.gflops:.1f} (at {args.gflops:g} GFLOP/s), "
        f"{res.flops / 1e9 / rate:.1f} (at the measured rate) |"
    )

    row = result_row(
        "lpm.solve_large",
        {"K": K, "p": K},
        seconds,
        None,
        plain="none in the suite at this K (a single large instance)",
        work=res.flops,
        unit="GFLOP/s fp64",
        ours_peak_mib=peak,
        note=(
            f"converged {bool(res.converged[0])}, KKT {float(res.kkt[0]):.1e}, gram_error "
            f"{float(res.gram_error[0]):.1e}; L-BFGS phase (KKT <= 1e-6) {res.lbfgs_seconds:.1f} s"
        ),
    )
    write_json(args.json, {"machine": machine, "results": [row]})


if __name__ == "__main__":
    main()
