"""Layer-Peeled Model solver: fused ``lpm_step`` op vs the same algorithm in plain PyTorch.

Two workloads, both the Minority Collapse sweep of Fang et al. (2021) with K = 10,
K_A = 5, p = 10, E_W = 1, E_H = 5, solved to projected-gradient norm <= tol:
- "sweep": the 41 ratios R = 10^(0, 0.1, ..., 4) in one batch;
- "dense": 4096 ratios log-spaced over [1, 10^4] in one batch.
Each is solved by ``lpm.solve(..., backend="fused")`` and ``backend="reference"``
(identical iteration, chunking and stopping; the reference is a plain batched PyTorch
loop, what a user would write). Reports wall time, instances/s, iterations and the
largest objective difference between the two, as a markdown table.

    python benchmarks/bench_lpm_solve.py                 # CPU, float64, 1 thread
    python benchmarks/bench_lpm_solve.py --device cuda   # the same on a GPU
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from common import peak_memory_mib, result_row, sync, write_json

from collapse_ext import lpm

K, K_A, P, E_W, E_H = 10, 5, 10, 1.0, 5.0


def _counts(ratios: torch.Tensor) -> torch.Tensor:
    counts = torch.ones(ratios.numel(), K, dtype=torch.float64)
    counts[:, :K_A] = ratios.unsqueeze(1)
    return counts


def run(name, ratios, backend, args, device):
    # gram_tol=None: the iteration itself (the Newton polish is per instance, the same code for both).
    kwargs = dict(
        dim=P, tol=args.tol, max_iter=args.max_iter, chunk=args.chunk, device=device, dtype=args.dtype, gram_tol=None
    )
    lpm.solve(_counts(ratios[:8]), E_W, E_H, backend=backend, **{**kwargs, "max_iter": args.chunk})  # warm-up
    out = {}

    def solve():
        sync(device)
        start = time.perf_counter()
        out["res"] = lpm.solve(_counts(ratios), E_W, E_H, backend=backend, **kwargs)
        sync(device)
        out["seconds"] = time.perf_counter() - start

    peak = peak_memory_mib(solve, device)
    return out["res"], out["seconds"], peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--instances", type=int, default=4096, help="size of the dense sweep")
    parser.add_argument("--tol", type=float, default=1e-8)
    parser.add_argument("--max-iter", type=int, default=20000)
    parser.add_argument("--chunk", type=int, default=100)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads for both backends (default 1: on a shared machine, idle-spinning "
        "worker threads make the many small ops of the plain loop erratic)",
    )
    parser.add_argument("--json", default=None, help="write the rows (common.result_row) here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)

    workloads = [
        ("sweep", torch.logspace(0, 4, 41, dtype=torch.float64)),
        ("dense", torch.logspace(0, 4, args.instances, dtype=torch.float64)),
    ]
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = (
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
        )
    print(f"K = {K}, K_A = {K_A}, p = {P}, E_W = {E_W}, E_H = {E_H}, tol = {args.tol:g}, {args.dtype}, {machine}\n")
    print(
        "| workload | instances | backend | wall s | instances/s | iterations max / mean "
        "| converged | max abs objective diff | speed-up |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    results = []
    for name, ratios in workloads:
        fused, t_fused, peak_fused = run(name, ratios, "fused", args, device)
        ref, t_ref, peak_ref = run(name, ratios, "reference", args, device)
        results.append(
            result_row(
                "lpm.solve (Minority Collapse sweep)",
                {"instances": ratios.numel(), "K": K, "p": P},
                t_fused,
                t_ref,
                plain='lpm.solve(backend="reference"): the same iteration as a batched plain PyTorch loop',
                # three K x K x p products per instance-iteration (logits and both gradients)
                work=6.0 * K * K * P * float(fused.iterations.double().sum()),
                unit="GFLOP/s " + ("fp64" if args.dtype == torch.float64 else "fp32"),
                ours_peak_mib=peak_fused,
                plain_peak_mib=peak_ref,
                sweep="instances",
            )
        )
        diff = (fused.objective - ref.objective).abs().max().item()
        for label, res, t in (("fused lpm_step", fused, t_fused), ("plain PyTorch", ref, t_ref)):
            its = res.iterations.double()
            speed = f"{t_ref / t_fused:.1f}x" if res is fused else "1.0x"
            print(
                f"| {name} | {ratios.numel()} | {label} | {t:.2f} | {ratios.numel() / t:.0f} "
                f"| {int(its.max())} / {its.mean():.0f} | {int(res.converged.sum())}/{ratios.numel()} "
                f"| {diff:.1e} | {speed} |"
            )
    write_json(args.json, {"machine": machine, "results": results})


if __name__ == "__main__":
    main()
