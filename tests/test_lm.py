import json
import subprocess
import sys

import pytest
import torch

from collapse_ext import ClassStats, collapse_metrics
from collapse_ext.cli import main
from collapse_ext.integrations.transformers import LMCollapseMonitor, LMResult, frequency_buckets, restrict

transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()

V, T = 40, 12


def _model(seed=0, tie=True):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=V,
        n_positions=T,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=tie,
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def _batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(3):
        ids = torch.randint(0, V, (4, T), generator=g)
        mask = torch.ones(4, T, dtype=torch.int64)
        mask[1, T - 3 :] = 0  # right padding
        mask[2, :2] = 0  # left padding
        labels = ids.clone()
        labels[0, :5] = -100
        labels[3, 7] = -100
        out.append((ids, mask, labels if b != 1 else None))
    return out


def _oracle_rows(hidden, ids, mask, labels):
    """Plain float64 selection: position t has label (labels or ids)[t + 1]."""
    src = ids if labels is None else labels
    xs, ys = [], []
    for i in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            y = int(src[i, t + 1])
            if y == -100 or mask[i, t] == 0 or mask[i, t + 1] == 0:
                continue
            xs.append(hidden[i, t].double())
            ys.append(y)
    return torch.stack(xs), torch.tensor(ys)


def test_statistics_match_hidden_states():
    model = _model()
    mon = LMCollapseMonitor(model, layers="all", min_count=2)
    assert mon.layer_names == ["block0", "block1", "penultimate"]
    rows = {"block0": [], "penultimate": []}
    with torch.no_grad():
        for ids, mask, labels in _batches():
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            mon.update(ids, attention_mask=mask, labels=labels)
            # hidden_states: embeddings, block0 output, final (after ln_f) = the lm_head input
            for name, h in (("block0", out.hidden_states[1]), ("penultimate", out.hidden_states[-1])):
                rows[name].append(_oracle_rows(h, ids, mask, labels))
    session = mon._session
    session.flush()
    for name, parts in rows.items():
        x = torch.cat([p[0] for p in parts])
        y = torch.cat([p[1] for p in parts])
        stats = session.layers[name].stats
        counts = torch.bincount(y, minlength=V)
        assert torch.equal(stats.counts.cpu(), counts)
        present = counts > 0
        means = torch.zeros(V, x.shape[1], dtype=torch.float64).index_add_(0, y, x) / counts.clamp(min=1)[:, None]
        assert torch.allclose(stats.means[present], means[present], atol=1e-6, rtol=1e-6)
        dev = x - means[y]
        sqdev = torch.zeros(V, dtype=torch.float64).index_add_(0, y, (dev**2).sum(1))
        assert torch.allclose(stats.sqdev, sqdev, atol=1e-5, rtol=1e-5)
        assert torch.allclose(stats.scatter, dev.T @ dev, atol=1e-5, rtol=1e-5)
    result = mon.compute()
    assert isinstance(result, LMResult)
    assert result["penultimate"].num_samples == len(torch.cat([p[1] for p in rows["penultimate"]]))
    assert result.separation_law is not None or "separation_law" in result.notes


def test_weight_is_the_output_embedding_tied_or_not():
    for tie in (True, False):
        model = _model(tie=tie)
        assert (model.lm_head.weight is model.transformer.wte.weight) == tie
        mon = LMCollapseMonitor(model)
        x_all, y_all = [], []
        with torch.no_grad():
            for ids, mask, labels in _batches(1):
                out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
                mon.update(ids, attention_mask=mask, labels=labels)
                x, y = _oracle_rows(out.hidden_states[-1], ids, mask, labels)
                x_all.append(x)
                y_all.append(y)
        result = mon.compute()
        ref = collapse_metrics(ClassStats(V, 32).update(torch.cat(x_all), torch.cat(y_all)), model.lm_head.weight)
        got = result["penultimate"]
        for key in ("etf_error_weights", "self_duality", "nc1_cdnv", "nc1_quotient", "gnc2_means"):
            assert getattr(got, key) == pytest.approx(getattr(ref, key), rel=1e-6), key


def test_frequency_buckets_on_zipf_counts():
    counts = 1000 // torch.arange(1, 1001)
    b = frequency_buckets(counts, min_count=2)
    assert b.head.tolist() == [0, 1, 2, 3, 4]
    assert b.tail.tolist() == list(range(250, 500))
    assert b.body.tolist() == list(range(5, 250))
    assert b.rare.tolist() == list(range(500, 1000))
    assert b.frequent.tolist() == list(range(500))
    b = frequency_buckets(counts, min_count=10, head=0.1, tail=0.2)  # n_k >= 10: k < 100
    assert b.head.tolist() == list(range(10))
    assert b.tail.tolist() == list(range(80, 100))
    assert b.rare.tolist() == list(range(100, 1000))
    shuffled = torch.randperm(1000, generator=torch.Generator().manual_seed(0))
    b2 = frequency_buckets(counts[shuffled], min_count=10, head=0.1, tail=0.2)
    assert sorted(shuffled[b2.head].tolist()) == list(range(10))
    # ties are broken by id, so only the counts of the tail are the same after shuffling
    assert sorted(counts[shuffled][b2.tail].tolist()) == sorted(counts[80:100].tolist())
    with pytest.raises(ValueError, match="Expected `head` to be a number in"):
        frequency_buckets(counts, head=0)
    with pytest.raises(ValueError, match="Expected `counts` to be a"):
        frequency_buckets(counts.double())


def test_views_and_minority_set_are_the_frequency_buckets():
    model = _model()
    mon = LMCollapseMonitor(model, min_count=3, tail=0.4)
    with torch.no_grad():
        for ids, mask, labels in _batches(2):
            model(input_ids=ids, attention_mask=mask)
            mon.update(ids, attention_mask=mask, labels=labels)
    mon._session.flush()
    stats = mon._session.layers["penultimate"].stats
    result = mon.compute()
    b = frequency_buckets(stats.counts, min_count=3, tail=0.4)
    assert result["penultimate"].minority_classes == sorted(b.tail.tolist())
    assert result.buckets["tail"]["tokens"] == b.tail.numel()
    assert result.buckets["rare"]["tokens"] == b.rare.numel()
    w = model.lm_head.weight.detach()
    for view in ("frequent", "body", "tail"):
        ids = getattr(b, view)
        ref = collapse_metrics(restrict(stats, ids), w[ids])
        assert result.views[view].nc1_cdnv == pytest.approx(ref.nc1_cdnv, rel=1e-9)
        assert result.views[view].nc1_quotient == pytest.approx(ref.nc1_quotient, rel=1e-9)
    back = LMResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert back.views["tail"].nc1_cdnv == pytest.approx(result.views["tail"].nc1_cdnv)
    assert set(result.flat()) >= {"view/head/nc1_cdnv", "view/tail/nc1_quotient"}


def test_errors():
    model = _model()
    with pytest.raises(ValueError, match="Expected `layers` to be 'last', 'all' or block indices"):
        LMCollapseMonitor(model, layers=[5])
    with pytest.raises(TypeError, match="Expected no `num_classes`"):
        LMCollapseMonitor(model, num_classes=3)
    with pytest.raises(TypeError, match="Expected `model` to have an output embedding"):
        LMCollapseMonitor(torch.nn.Linear(3, 3))
    mon = LMCollapseMonitor(model, layers=[-1])
    assert mon.layer_names == ["block1", "penultimate"]
    ids = torch.randint(0, V, (2, T))
    model(input_ids=ids)
    with pytest.raises(ValueError, match="Expected `attention_mask` of the shape"):
        mon.update(ids, attention_mask=torch.ones(2, 3))
    model(input_ids=ids)
    with pytest.raises(ValueError, match="Expected layer 'block1' to see the"):
        mon.update(ids[:1])


def test_import_is_lazy():
    code = "import sys, collapse_ext, collapse_ext.integrations; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_lm_demo_runs(tmp_path, capsys):
    path = tmp_path / "lm.jsonl"
    assert main(["lm-demo", "--steps", "4", "--vocab", "64", "--every", "2", "--seed", "1", "--jsonl", str(path)]) == 0
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 2
    assert {"frequent", "tail"} <= set(lines[-1]["views"])
    assert "CDNV" in capsys.readouterr().out
