"""``collapse-ext lm-demo``: token-level neural collapse of a small GPT-2 trained on
Python's bundled documentation, measured by an LMCollapseMonitor."""

from __future__ import annotations

import argparse
import importlib.util
import re
import time

from .common import _add_seed_and_jsonl, _int_at_least, _Outputs, _with_history


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
    p.set_defaults(func=_lm_demo, check=_check_lm_demo, library_options={"seed": "--seed"})


def _check_lm_demo(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if importlib.util.find_spec("transformers") is None:
        parser.error("needs transformers for the GPT-2 model: pip install transformers")


def _lm_text(vocab: int) -> tuple[list[int], list[str]]:
    """Word-level tokens of pydoc_data.topics: ids by descending frequency, 0 = <unk>."""
    from collections import Counter
    from pydoc_data.topics import topics

    words = re.findall(r"[a-z]+|[0-9]+|[^\sa-z0-9]", " ".join(topics[k] for k in sorted(topics)).lower())
    itos = ["<unk>"] + [w for w, _ in Counter(words).most_common(vocab - 1)]
    stoi = {w: i for i, w in enumerate(itos)}
    return [stoi.get(w, 0) for w in words], itos


def _lm_demo(args: argparse.Namespace) -> int:
    return _with_history(_lm_demo_run, args)


def _lm_demo_run(args: argparse.Namespace, outputs: _Outputs) -> int:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from ..integrations.transformers import LMCollapseMonitor
    from ..loggers import JSONLinesLogger

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    ids, itos = _lm_text(args.vocab)
    data = torch.tensor(ids, dtype=torch.int64)
    context, batch = 32, 16
    config = GPT2Config(
        vocab_size=len(itos), n_positions=context, n_embd=64, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    loggers = [JSONLinesLogger(outputs.tmp(args.jsonl), overwrite=True)] if args.jsonl else []
    monitor = LMCollapseMonitor(model, layers="all", min_count=5, loggers=loggers)
    print(
        f"== lm-demo: {len(ids)} words of pydoc_data.topics, vocabulary {len(itos)} "
        f"(<unk> {100 * float((data == 0).float().mean()):.1f}%), GPT-2 2x64, {args.steps} steps",
        flush=True,
    )
    g = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    losses: list[float] = []

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3g}"

    for step in range(1, args.steps + 1):
        offsets = torch.randint(0, len(ids) - context, (batch,), generator=g)
        x = torch.stack([data[o : o + context] for o in offsets.tolist()])
        out = model(input_ids=x, labels=x)
        monitor.update(x)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
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
    return 0
