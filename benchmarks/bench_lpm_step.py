"""``lpm_step`` op vs the plain-PyTorch reference iteration (``reference.lpm_step_reference``).

A batch of B class-collapsed Layer-Peeled Model instances (K classes, p = K), ``--iters``
accelerated projected-gradient iterations in one call; both compute the same iterates.
Prints a markdown table of the time per call and the largest difference of the iterates.
(The whole solver, with its stopping rule and backtracking: bench_lpm_solve.py.)

    python benchmarks/bench_lpm_step.py                # CPU, float64
    python benchmarks/bench_lpm_step.py --device cuda  # the same on a GPU
"""

from __future__ import annotations

import argparse

import torch
from common import lpm_step_inputs, machine, markdown, measure_with_peak, result_row, write_json

from collapse_ext import lpm_step
from collapse_ext.reference import lpm_step_reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the rows (common.result_row) here")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows, results = [], []
    for B, K in ((41, 10), (4096, 10), (64, 64)):
        inputs = lpm_step_inputs(B, K, dtype, device)
        fused = lpm_step(*inputs, args.iters, "ce", True)
        ref = lpm_step_reference(*inputs, args.iters, "ce", True)
        diff = max((a - b).abs().max().item() for a, b in zip(fused[:2], ref[:2]))
        t_fused, peak_fused = measure_with_peak(
            lambda inputs=inputs: lpm_step(*inputs, args.iters, "ce", True), device, args.repeats
        )
        t_ref, peak_ref = measure_with_peak(
            lambda inputs=inputs: lpm_step_reference(*inputs, args.iters, "ce", True), device, args.repeats
        )
        t_fused, t_ref = t_fused.median, t_ref.median
        results.append(
            result_row(
                "lpm_step",
                {"B": B, "K": K, "iters": args.iters},
                t_fused,
                t_ref,
                plain="reference.lpm_step_reference (batched plain PyTorch iteration)",
                # logits H W^T, grad_W = G^T H, grad_H = G W: three K x K x p products, p = K
                work=6.0 * B * K**3 * args.iters,
                unit="GFLOP/s " + ("fp64" if dtype == torch.float64 else "fp32"),
                ours_peak_mib=peak_fused,
                plain_peak_mib=peak_ref,
            )
        )
        rows.append(
            {
                "B x K": f"{B} x {K}",
                "lpm_step ms": f"{1e3 * t_fused:.1f}",
                "reference ms": f"{1e3 * t_ref:.1f}",
                "speed-up": f"{t_ref / t_fused:.1f}x",
                "max iterate diff": f"{diff:.1e}",
            }
        )
    print(f"{args.iters} iterations per call, CE, momentum, {args.dtype}, {machine(device)}\n")
    print(markdown(rows, list(rows[0])))
    write_json(args.json, {"machine": machine(device), "results": results})


if __name__ == "__main__":
    main()
