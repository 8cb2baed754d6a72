"""Training-step time with and without a CollapseMonitor.

CPU (default): an MLP with BatchNorm, penultimate d = 512, K = 100, batch 256, random data;
the monitor records the penultimate features every step (exact S_W, NC4 tallies against
the previous epoch's means). CUDA (``--device cuda``): a ResNet-18 (CIFAR stem, 11M
parameters) on random 3 x 32 x 32 images, K = 100, batch 256, bf16 autocast, monitor on
the penultimate features and the four stages (average-pooled).

Timing: blocks of ``--steps`` steps, with and without the monitor alternating (ABBA order),
``--repeats`` times; step times are means over the blocks and the overhead is their ratio (the median
of the paired block ratios is shown next to it: the two differ by the noise of the
machine). The monitor's cost is lumpy (rows are reduced when its 8 MiB buffer is full:
every 16 steps for d = 512 fp32, batch 256), so a block must span whole buffer periods:
the default 32 steps is two of them. The monitor's ``compute()`` at the end of an epoch
is timed separately and shown amortised over an epoch of ``--epoch-steps`` steps.

    python benchmarks/bench_monitor.py                 # CPU
    python benchmarks/bench_monitor.py --device cuda   # GPU
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from common import result_row, sync, write_json  # noqa: E402

from collapse_ext import CollapseMonitor  # noqa: E402
from collapse_ext.data import make_mlp  # noqa: E402


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.short(x))


class ResNet18(nn.Module):
    """ResNet-18 with the CIFAR stem (3x3 conv, no max-pool): 11.2M parameters."""

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        stages, cin = [], 64
        for i, cout in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(self.pool(x).flatten(1))


def build(args: argparse.Namespace):
    torch.manual_seed(0)
    dev = torch.device(args.device)
    k, b = args.classes, args.batch
    if dev.type == "cuda":
        model = ResNet18(k).to(dev).to(memory_format=torch.channels_last)
        x = torch.randn(b, 3, 32, 32, device=dev).to(memory_format=torch.channels_last)
        layers = ["layer1", "layer2", "layer3", "layer4"]
        desc = f"ResNet-18 (CIFAR stem) on 3x32x32, bf16 autocast, layers {layers} + penultimate"
    else:
        model = make_mlp(args.in_dim, tuple(args.widths), k)
        x = torch.randn(b, args.in_dim)
        layers = []
        desc = f"MLP {args.in_dim}-{'-'.join(map(str, args.widths))}-{k} (BatchNorm, ReLU)"
    y = torch.randint(0, k, (b,), device=dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    return model, x, y, opt, layers, desc


def step(model, x, y, opt, monitor, amp: bool) -> None:
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        out = model(x)
    loss = F.cross_entropy(out.float(), y)
    if monitor is not None:
        monitor.update(y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def timed(fn, steps: int, device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t) / steps


def breakdown(d: int, k: int, batch: int, device: torch.device, repeats: int = 7) -> None:
    """What one recorded batch costs the monitor, part by part, on one 4096-row buffer."""
    from collapse_ext import ClassStats, class_stats, within_scatter
    from collapse_ext.monitor.layer import _ncc_tallies

    rows = 4096
    g = torch.Generator().manual_seed(0)
    h = torch.randn(rows, d, generator=g).to(device)
    y = torch.randint(0, k, (rows,), generator=g).to(device)
    pred = torch.randint(0, k, (rows,), generator=g).to(device)
    _, means, _ = class_stats(h, y, k)
    present = torch.ones(k, dtype=torch.bool, device=device)
    stats = ClassStats(k, d, device=device)
    buf = torch.empty_like(h)
    parts = {
        "copy into the buffer": lambda: buf.copy_(h),
        "class_stats (counts, means, ss_k)": lambda: class_stats(h, y, k),
        "within_scatter (S_W, 2 d^2 flops per row)": lambda: within_scatter(h, y, means),
        "ClassStats.update (both + Chan merge)": lambda: stats.update(h, y),
        "NC4 tallies (nearest_centre, 2 K d flops per row)": lambda: _ncc_tallies(h, y, means, present, pred),
    }
    print(f"\nper recorded batch of {batch} rows (d={d}, K={k}), reduced {rows} rows at a time:\n")
    print("| part | time per batch |")
    print("|---|---|")
    for name, fn in parts.items():
        fn()
        times = [timed(fn, 1, device) for _ in range(repeats)]
        print(f"| {name} | {1e3 * statistics.median(times) * batch / rows:.3f} ms |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--in-dim", type=int, default=3072, help="MLP input (default: a flattened 3x32x32 image)")
    p.add_argument("--widths", type=int, nargs="+", default=[1024, 1024, 512], help="MLP hidden widths")
    p.add_argument(
        "--steps", type=int, default=32, help="steps per timed block (a multiple of the monitor's buffer period)"
    )
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--epoch-steps", type=int, default=196, help="steps per epoch for the amortised compute()")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--within-cov", default="auto", choices=["auto", "true", "false"], help="monitor's within_cov")
    p.add_argument("--every", type=int, default=1, help="monitor's every (record one batch in N)")
    p.add_argument("--no-train-ncc", action="store_true", help="monitor's train_ncc=False")
    p.add_argument("--breakdown", action="store_true", help="also time the monitor's parts on one buffer")
    p.add_argument("--json", default=None, help="write the row (common.result_row) here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda needs a CUDA device")
    amp = dev.type == "cuda"
    model, x, y, opt, layers, desc = build(args)
    within_cov = {"auto": "auto", "true": True, "false": False}[args.within_cov]
    monitor = CollapseMonitor(
        model,
        classifier="fc",
        num_classes=args.classes,
        layers=layers,
        within_cov=within_cov,
        every=args.every,
        train_ncc=not args.no_train_ncc,
    )

    # A first "epoch" so the monitor has previous means and the NC4 tallies are on.
    for _ in range(3):
        step(model, x, y, opt, monitor, amp)
    monitor.compute()
    for _ in range(2):
        step(model, x, y, opt, None, amp)

    base, with_mon, ratios = [], [], []
    for r in range(args.repeats):
        # ABBA order: a drift or a cost of switching is shared by both sides
        if r % 2 == 0:
            t0 = timed(lambda: step(model, x, y, opt, None, amp), args.steps, dev)
            t1 = timed(lambda: step(model, x, y, opt, monitor, amp), args.steps, dev)
        else:
            t1 = timed(lambda: step(model, x, y, opt, monitor, amp), args.steps, dev)
            t0 = timed(lambda: step(model, x, y, opt, None, amp), args.steps, dev)
        base.append(t0)
        with_mon.append(t1)
        ratios.append(t1 / t0)
    sync(dev)
    t = time.perf_counter()
    monitor.compute()
    sync(dev)
    t_compute = time.perf_counter() - t

    b, m = statistics.fmean(base), statistics.fmean(with_mon)
    overhead = 100 * (m / b - 1)
    paired = 100 * (statistics.median(ratios) - 1)
    amortised = 100 * t_compute / (args.epoch_steps * b)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "no GPU"
    print(f"{desc}; K={args.classes}, batch {args.batch}, penultimate d={model.fc.in_features}")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads, {gpu}; torch {torch.__version__}"
    )
    print(f"{args.repeats} alternating blocks of {args.steps} steps each\n")
    print(
        "| model | monitor options | train step | with monitor | overhead per step (median of pairs) "
        "| compute() (per epoch) |"
    )
    print("|---|---|---|---|---|---|")
    print(
        f"| {desc.split(' (')[0]} | within_cov={args.within_cov}, every={args.every}, "
        f"train_ncc={not args.no_train_ncc} | {1e3 * b:.2f} ms | "
        f"{1e3 * m:.2f} ms | {overhead:+.1f}% ({paired:+.1f}%) | {1e3 * t_compute:.0f} ms "
        f"({amortised:.2f}% of {args.epoch_steps} steps) |"
    )
    monitor.remove()
    row = result_row(
        "CollapseMonitor on a training step",
        {"batch": args.batch, "d": model.fc.in_features, "K": args.classes},
        m,
        None,
        plain="none: the monitor adds work to a step; the floor is the same step without it",
        floor_s=b,
        floor="the training step without the monitor",
        note=f"{desc}; overhead {overhead:+.1f}% (median of pairs {paired:+.1f}%)",
    )
    write_json(args.json, {"results": [row]})
    if args.breakdown:
        breakdown(model.fc.in_features, args.classes, args.batch, dev)
    return 0


if __name__ == "__main__":
    sys.exit(main())
