"""``collapse-ext lm-demo``: token-level neural collapse of a small GPT-2 trained on
Python's bundled documentation, measured by an LMCollapseMonitor; ``--plot`` writes the
report's figure (CDNV and NC1 quotient over training per frequency bucket, rare-token
classifier cosines against frequent ones)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import time
from typing import Any

from .common import (
    _PLOT_FORMATS,
    _add_seed_and_jsonl,
    _int_at_least,
    _output_path,
    _Outputs,
    _same_file,
    _shown,
    _with_history,
)

CONTEXT, BATCH = 32, 16


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "lm-demo",
        help="token-level neural collapse of a small GPT-2 trained on Python's own docs (no download)",
        description=(
            "Train a GPT-2-architecture model (transformers, random init; 2 blocks, d 64, 2 heads, context 32; "
            "AdamW lr 3e-3, batch 16) on the text of pydoc_data.topics (the standard library's documentation "
            "topics) with a word-level tokenizer built on the fly (the --vocab - 1 most frequent words, the rest "
            "<unk>), monitored by LMCollapseMonitor on every block and the final hidden states. Every --every "
            "steps: CDNV and NC1 quotient over all tokens and per frequency bucket (head 1%%, body, tail 50%% of "
            "the tokens seen >= 5 times), and the cosines of the rare tokens' classifier rows against the "
            "frequent ones'."
        ),
    )
    p.add_argument("--steps", type=_int_at_least(1), default=600, help="training steps (default 600)")
    p.add_argument("--vocab", type=_int_at_least(16, 50000), default=2000, help="vocabulary size (default 2000)")
    p.add_argument("--every", type=_int_at_least(1), default=100, help="steps between measurements (default 100)")
    _add_seed_and_jsonl(p)
    p.add_argument("--threads", type=_int_at_least(1, 1024), default=2, help="torch CPU threads (default 2)")
    p.add_argument(
        "--plot",
        metavar="PATH",
        type=_output_path(_PLOT_FORMATS),
        help="save the report's figure: CDNV, NC1 quotient and classifier cosines over training "
        "(png, pdf, svg; needs matplotlib)",
    )
    p.set_defaults(func=_lm_demo, check=_check_lm_demo, library_options={"seed": "--seed"})


def _check_lm_demo(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if importlib.util.find_spec("transformers") is None:
        parser.error("needs transformers for the GPT-2 model: pip install transformers")
    if _same_file(args.plot, args.jsonl):
        parser.error(f"--jsonl: expected a different path from --plot, got {_shown(args.jsonl)} for both")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot: needs matplotlib: pip install matplotlib (or collapse_ext[plot])")


def _lm_text(vocab: int) -> tuple[list[int], list[str]]:
    """Word-level tokens of pydoc_data.topics: ids by descending frequency, 0 = <unk>."""
    from collections import Counter
    from pydoc_data.topics import topics

    words = re.findall(r"[a-z]+|[0-9]+|[^\sa-z0-9]", " ".join(topics[k] for k in sorted(topics)).lower())
    itos = ["<unk>"] + [w for w, _ in Counter(words).most_common(vocab - 1)]
    stoi = {w: i for i, w in enumerate(itos)}
    return [stoi.get(w, 0) for w in words], itos


def lm_setup(vocab: int, seed: int) -> tuple[Any, Any, Any, list[str]]:
    """The demo's GPT-2 (2 blocks, d 64, 2 heads, random init), its AdamW, and the token ids
    (N,) int64 of pydoc_data.topics with their vocabulary ``itos``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    ids, itos = _lm_text(vocab)
    config = GPT2Config(
        vocab_size=len(itos), n_positions=CONTEXT, n_embd=64, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    return model, opt, torch.tensor(ids, dtype=torch.int64), itos


def lm_batch(data: Any, g: Any) -> Any:
    """A (BATCH, CONTEXT) int64 batch of token windows at random offsets of ``data``."""
    import torch

    offsets = torch.randint(0, len(data) - CONTEXT, (BATCH,), generator=g)
    return torch.stack([data[o : o + CONTEXT] for o in offsets.tolist()])


def lm_step(model: Any, opt: Any, x: Any, monitor: Any = None) -> float:
    """One training step of the demo on the batch ``x``, recorded by ``monitor`` when given;
    returns the loss."""
    out = model(input_ids=x, labels=x)
    if monitor is not None:
        monitor.update(x)
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    return float(out.loss.detach())


def _lm_demo(args: argparse.Namespace) -> int:
    return _with_history(_lm_demo_run, args)


def _lm_demo_run(args: argparse.Namespace, outputs: _Outputs) -> int:
    import torch

    from ..integrations.transformers import LMCollapseMonitor
    from ..loggers import JSONLinesLogger

    torch.set_num_threads(args.threads)
    model, opt, data, itos = lm_setup(args.vocab, args.seed)
    loggers = [JSONLinesLogger(outputs.tmp(args.jsonl), overwrite=True)] if args.jsonl else []
    monitor = LMCollapseMonitor(model, layers="all", min_count=5, loggers=loggers)
    print(
        f"== lm-demo: {len(data)} words of pydoc_data.topics, vocabulary {len(itos)} "
        f"(<unk> {100 * float((data == 0).float().mean()):.1f}%), GPT-2 2x64, {args.steps} steps",
        flush=True,
    )
    g = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    losses: list[float] = []

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3g}"

    for step in range(1, args.steps + 1):
        losses.append(lm_step(model, opt, lm_batch(data, g), monitor))
        if step % args.every == 0 or step == args.steps:
            r = monitor.compute()
            m = r["penultimate"]
            views = " ".join(
                f"{v} {fmt(r.views[v].nc1_cdnv)}/{fmt(r.views[v].nc1_quotient)}" if v in r.views else f"{v} -"
                for v in ("head", "body", "tail")
            )
            print(
                f"step {step:>5}  loss {sum(losses) / len(losses):.3f}  tokens {m.num_present}  "
                f"CDNV {fmt(m.nc1_cdnv)}  NC1q {fmt(m.nc1_quotient)}  CDNV/NC1q by bucket: {views}  "
                f"cos(W) rare {fmt(m.minority_cos_mean)} frequent {fmt(m.majority_cos_mean)}  "
                f"{time.perf_counter() - start:.0f} s",
                flush=True,
            )
            losses = []
    if args.plot:
        from ..lm_report import plot_lm_history

        title = f"lm-demo: GPT-2 2x64, vocabulary {len(itos)}, {args.steps} steps of {BATCH}x{CONTEXT} tokens"
        fmt_ = os.path.splitext(args.plot)[1][1:].lower()
        plot_lm_history(monitor.history, outputs.tmp(args.plot), title=title, format=fmt_)
        print(f"figure written to {args.plot}")
    return 0
