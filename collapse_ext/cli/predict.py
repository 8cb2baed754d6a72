"""``collapse-ext predict``: a theory prediction for a class-size profile.

    collapse-ext predict --counts FILE | --profile SPEC --model MODEL [--plot PATH] [--json [PATH]]

FILE: .txt / .csv (numbers separated by commas or whitespace), .npy, or .json (a list).
SPEC: ``exp:HI:LO:K=K`` (n_k = HI (LO/HI)^(k/(K-1))), ``step:HI:LO:K=K:KA=KA`` (KA classes
of HI, the rest LO), ``pareto:HI:ALPHA:K=K`` (n_k = HI / (1+k)^ALPHA). :func:`run` checks
the combinations itself, so the command also works on a parser of its own (as
``collapse_ext.theory_cli``, the module's former name, is used). Errors are one line on
stderr naming the option, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from .common import _PLOT_FORMATS, _finite_float, _int_at_least, _output_path

__all__ = ["add_parser", "parse_profile", "read_counts", "run"]


def _real(text: str, what: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number for {what} in {spec!r}, got {text!r}")
    return value


def parse_profile(spec: str) -> list[float]:
    """Counts from ``exp:HI:LO:K=..``, ``step:HI:LO:K=..:KA=..`` or ``pareto:HI:ALPHA:K=..``."""
    parts = spec.split(":")
    kind, values, keys = parts[0], [], {}
    for part in parts[1:]:
        if "=" in part:
            key, _, val = part.partition("=")
            keys[key] = val
        else:
            values.append(part)
    forms = {"exp": ("HI", "LO", {"K"}), "step": ("HI", "LO", {"K", "KA"}), "pareto": ("HI", "ALPHA", {"K"})}
    if kind not in forms or len(values) != 2 or set(keys) != forms[kind][2]:
        raise argparse.ArgumentTypeError(
            f"expected exp:HI:LO:K=K, step:HI:LO:K=K:KA=KA or pareto:HI:ALPHA:K=K, got {spec!r}"
        )
    a, b = (_real(v, name, spec) for v, name in zip(values, forms[kind][:2]))
    ints = {}
    for key, val in keys.items():
        try:
            ints[key] = int(val)
        except ValueError:
            ints[key] = 0
    K = ints["K"]
    if K < 2:
        raise argparse.ArgumentTypeError(f"expected an int K >= 2 in {spec!r}, got K={keys['K']!r}")
    if kind == "exp":
        return [a * (b / a) ** (k / (K - 1)) for k in range(K)]
    if kind == "pareto":
        return [a / (1 + k) ** b for k in range(K)]
    if not 1 <= ints["KA"] < K:
        raise argparse.ArgumentTypeError(f"expected an int KA in [1, K - 1] in {spec!r}, got KA={keys['KA']!r}")
    return [a] * ints["KA"] + [b] * (K - ints["KA"])


def read_counts(path: str) -> list[float]:
    """Class counts from a .txt/.csv/.npy/.json file (argparse type: errors are ArgumentTypeError)."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".txt", ".csv", ".npy", ".json"):
        raise argparse.ArgumentTypeError(f"expected a .txt, .csv, .npy or .json file, got {path!r}")
    try:
        if ext == ".npy":
            import numpy as np

            values = np.load(path, allow_pickle=False).ravel().tolist()
        elif ext == ".json":
            with open(path) as f:
                values = json.load(f)
        else:
            with open(path) as f:
                values = f.read().replace(",", " ").split()
    except (OSError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"cannot read {path!r}: {err}") from None
    try:
        counts = [float(v) for v in values]
    except (TypeError, ValueError):
        counts = []
    if len(counts) < 2 or not all(math.isfinite(c) and c >= 0 for c in counts) or sum(counts) <= 0:
        raise argparse.ArgumentTypeError(f"expected at least 2 non-negative class counts in {path!r}")
    return counts


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``predict`` on an argparse subparsers object; sets ``func=run``."""
    from ..theory import MODELS

    p = subparsers.add_parser("predict", help="predicted neural-collapse geometry for a class-size profile")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--counts", type=read_counts, metavar="FILE", help="class counts (.txt/.csv/.npy/.json)")
    src.add_argument("--profile", type=parse_profile, metavar="SPEC", help="exp:500:5:K=1000, step:..., pareto:...")
    p.add_argument("--model", choices=MODELS, default="lpm-ce")
    p.add_argument("--E-W", dest="E_W", type=_finite_float(), default=1.0, help="classifier budget (lpm, etf, seli)")
    p.add_argument("--E-H", dest="E_H", type=_finite_float(), default=1.0, help="feature budget (lpm, etf, seli)")
    p.add_argument("--lambda-W", dest="lambda_W", type=_finite_float(), help="weight decay of each layer (ufm-mse)")
    p.add_argument("--lambda-H", dest="lambda_H", type=_finite_float(), help="feature decay (ufm-mse)")
    p.add_argument("--depth", type=_int_at_least(1), default=1, help="linear layers M (ufm-mse)")
    p.add_argument(
        "--plot",
        metavar="PATH",
        type=_output_path(_PLOT_FORMATS),
        help="save the Gram matrices and norms (.png/.pdf/.svg)",
    )
    p.add_argument("--json", nargs="?", const="-", metavar="PATH", help="write the geometry as JSON (stdout: -)")
    p.set_defaults(func=run, _predict_parser=p)
    return p


def _params(args, parser) -> dict:
    if args.model == "ufm-mse":
        for name in ("lambda_W", "lambda_H"):
            if getattr(args, name) is None:
                parser.error(f"--{name.replace('_', '-')}: required for --model ufm-mse")
        return {"lambda_W": args.lambda_W, "lambda_H": args.lambda_H, "depth": args.depth}
    if args.lambda_W is not None or args.lambda_H is not None:
        parser.error(f"--lambda-W/--lambda-H: only for --model ufm-mse, got --model {args.model}")
    if args.model == "lpm-mse" and args.E_W * args.E_H >= 1:
        parser.error(f"--E-W/--E-H: expected E_W * E_H < 1 for --model lpm-mse, got {args.E_W * args.E_H:g}")
    return {"E_W": args.E_W, "E_H": args.E_H}


def run(args: argparse.Namespace) -> int:
    """Compute, print a summary, write --json / --plot; returns the exit status."""
    import torch

    from .. import theory

    parser = args._predict_parser
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot: needs matplotlib: pip install matplotlib")
    counts = args.counts if args.counts is not None else args.profile
    try:
        geometry = theory.predict(counts, args.model, **_params(args, parser))
    except ValueError as err:
        parser.error(f"--{'counts' if args.counts is not None else 'profile'}: {err}")
    norms = geometry.norms_W
    cos = geometry.cos_W
    K = geometry.num_classes
    off = cos[~torch.eye(K, dtype=torch.bool)]
    summary = (
        f"{args.model}: K = {K}, ||w_k|| in [{float(norms.min()):.4g}, {float(norms.max()):.4g}], "
        f"cos(w_j, w_k) in [{float(off.min()):.4g}, {float(off.max()):.4g}]"
    )
    if geometry.info:
        summary += ", " + ", ".join(
            f"{k} = {v:.3g}" if isinstance(v, float) else f"{k} = {v}" for k, v in geometry.info.items()
        )
    print(summary, file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json is not None:
        text = json.dumps(geometry.to_dict())
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text)
    if args.plot is not None:
        _plot(geometry, args.plot)
    return 0


def _plot(geometry, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, M, title in ((axes[0], geometry.cos_W, "cos(w_j, w_k)"), (axes[1], geometry.cos_H, "cos(h_j, h_k)")):
        im = ax.imshow(M.numpy(), cmap="coolwarm", vmin=-1, vmax=1)
        ax.set_title(title)
        fig.colorbar(im, ax=ax)
    axes[2].plot(geometry.norms_W.numpy(), label="||w_k||")
    axes[2].plot(geometry.norms_H.numpy(), label="||h_k||")
    axes[2].set_xlabel("class k")
    axes[2].legend()
    fig.suptitle(f"{geometry.model} prediction")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
