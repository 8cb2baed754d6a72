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
from common import lpm_step_inputs, machine, markdown, timeit

from collapse_ext import lpm_step
from collapse_ext.reference import lpm_step_reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = []
    for B, K in ((41, 10), (4096, 10), (64, 64)):
        inputs = lpm_step_inputs(B, K, dtype, device)
        fused = lpm_step(*inputs, args.iters, "ce", True)
        ref = lpm_step_reference(*inputs, args.iters, "ce", True)
        diff = max((a - b).abs().max().item() for a, b in zip(fused[:2], ref[:2]))
        t_fused = timeit(lambda inputs=inputs: lpm_step(*inputs, args.iters, "ce", True), device, args.repeats)
        t_ref = timeit(lambda inputs=inputs: lpm_step_reference(*inputs, args.iters, "ce", True), device, args.repeats)
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


if __name__ == "__main__":
    main()
