import csv
import importlib.util
import json

import pytest
import torch

from collapse_ext import CollapseMonitor, CSVLogger, JSONLinesLogger, TensorBoardLogger
from collapse_ext.data import make_mlp
from collapse_ext.loggers import _CallbackLogic, read_jsonl


def _monitor(**kwargs):
    torch.manual_seed(0)
    model = make_mlp(8, (12,), 3).eval()
    return model, CollapseMonitor(model, classifier="fc", num_classes=3, layers=["block1"], **kwargs)


def _epoch(model, mon, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(60, 8, generator=g), torch.arange(60) % 3
    with torch.no_grad():
        model(x)
    mon.update(y)
    return mon.compute()


class _Writer:
    def __init__(self):
        self.scalars = []
        self.flushed = 0

    def add_scalar(self, tag, value, global_step):
        self.scalars.append((tag, value, global_step))

    def flush(self):
        self.flushed += 1


def test_jsonl_round_trip_and_append(tmp_path):
    path = tmp_path / "sub" / "h.jsonl"
    model, mon = _monitor(loggers=[JSONLinesLogger(path, overwrite=True)])
    results = [_epoch(model, mon, s) for s in range(2)]
    back = read_jsonl(path)
    assert [r.to_dict() for r in back] == [r.to_dict() for r in results]
    for line in path.read_text().splitlines():
        json.loads(line)  # strict JSON: no NaN
    JSONLinesLogger(path).write(results)
    assert len(read_jsonl(path)) == 4
    JSONLinesLogger(path, overwrite=True)
    assert read_jsonl(path) == []


def test_csv_rows_align_across_phases(tmp_path):
    path = tmp_path / "h.csv"
    logger = CSVLogger(path)
    model, mon = _monitor(loggers=[logger])
    first = _epoch(model, mon)
    mon.evaluate([(torch.randn(30, 8), torch.arange(30) % 3)])
    _epoch(model, mon, 1)
    rows = list(csv.DictReader(path.open()))
    assert [r["phase"] for r in rows] == ["train", "eval", "train"]
    assert float(rows[0]["penultimate/nc1"]) == pytest.approx(first["penultimate"].nc1)
    assert rows[0]["penultimate/ncc_accuracy"] == ""  # undefined in the first epoch
    assert rows[1]["penultimate/ncc_accuracy"] != ""
    assert "separation_law/rho" in rows[0]


def test_tensorboard_adapter_with_a_writer():
    writer = _Writer()
    model, mon = _monitor(loggers=[TensorBoardLogger(writer)])
    result = _epoch(model, mon)
    tags = {tag: (value, step) for tag, value, step in writer.scalars}
    assert tags["collapse/train/penultimate/nc1"] == (result["penultimate"].nc1, 1)
    assert "collapse/train/separation_law/rho" in tags
    assert not any("ncc_accuracy" in t for t in tags)  # undefined metrics are skipped
    assert writer.flushed == 1
    with pytest.raises(TypeError, match="Expected `writer` to be a SummaryWriter or a log directory"):
        TensorBoardLogger(object())
    with pytest.raises(ValueError, match="Expected `step`"):
        TensorBoardLogger(writer, step="minute")


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_summary_writer(tmp_path):
    logger = TensorBoardLogger(tmp_path / "tb")
    model, mon = _monitor(loggers=[logger])
    _epoch(model, mon)
    logger.close()
    assert any((tmp_path / "tb").iterdir())


def test_loggers_only_on_rank_zero_by_default():
    writer = _Writer()
    model, mon = _monitor(loggers=[TensorBoardLogger(writer)])
    mon._rank = lambda: 1
    _epoch(model, mon)
    assert writer.scalars == []


class _Module(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = make_mlp(8, (12,), 3)
        self.logged = {}

    def forward(self, x):
        return self.net(x)

    def log_dict(self, values, sync_dist=False):
        self.logged.update(values)


def test_callback_logic_records_batches_and_logs_epochs():
    module = _Module().eval()
    x, y = torch.randn(40, 8), torch.arange(40) % 3
    loader = [(x[:20], y[:20]), (x[20:], y[20:])]
    cb = _CallbackLogic(classifier="net.fc", num_classes=3, evaluate_loader=loader)
    cb.setup(None, module, "fit")
    for i, batch in enumerate(loader):
        cb.on_train_batch_start(None, module, batch, i)
        with torch.no_grad():
            module(batch[0])
        cb.on_train_batch_end(None, module, None, batch, i)
    cb.on_train_epoch_end(None, module)
    assert [r.phase for r in cb.monitor.history] == ["train", "eval"]
    assert module.logged["collapse/train/penultimate/num_samples"] == 40
    assert "collapse/eval/penultimate/ncc_accuracy" in module.logged

    state = cb.state_dict()
    again = _CallbackLogic(classifier="net.fc", num_classes=3)
    again.load_state_dict(state)
    again.setup(None, module, "fit")
    assert len(again.monitor.history) == 2
    cb.teardown(None, module, "fit")
    again.teardown(None, module, "fit")


def test_lightning_callback():
    pytest.importorskip("lightning", reason="lightning is not installed")
    from lightning.pytorch import Callback

    from collapse_ext.loggers import CollapseCallback

    assert issubclass(CollapseCallback, Callback)


def test_lightning_missing_is_a_clear_error():
    if importlib.util.find_spec("lightning") or importlib.util.find_spec("pytorch_lightning"):
        pytest.skip("lightning is installed")
    with pytest.raises(ImportError, match="CollapseCallback needs PyTorch Lightning"):
        from collapse_ext.loggers import CollapseCallback  # noqa: F401


def _lightning_module(pl):
    class Digits(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_mlp(8, (12,), 3)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Digits()


def _loader(seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(96, 8, generator=g), torch.arange(96) % 3
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)


def _trainer(pl, callback, tmp_path, epochs):
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )


def test_lightning_callback_in_a_real_trainer(tmp_path):
    pl = pytest.importorskip("lightning.pytorch", reason="lightning is not installed")
    from collapse_ext.loggers import CollapseCallback

    torch.manual_seed(0)
    module = _lightning_module(pl)
    callback = CollapseCallback(classifier="net.fc", num_classes=3, evaluate_loader=_loader(1), evaluate_every=2)
    trainer = _trainer(pl, callback, tmp_path, epochs=2)
    trainer.fit(module, _loader())
    history = callback.monitor.history
    assert [(r.epoch, r.phase) for r in history] == [(1, "train"), (2, "train"), (2, "eval")]
    metrics = trainer.callback_metrics
    assert float(metrics["collapse/train/penultimate/num_samples"]) == 96
    assert float(metrics["collapse/train/penultimate/nc1"]) == pytest.approx(history[1]["penultimate"].nc1, rel=1e-6)
    assert "collapse/eval/penultimate/ncc_accuracy" in metrics

    # The monitor's state travels in Lightning checkpoints and resumes the history.
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    resumed = CollapseCallback(classifier="net.fc", num_classes=3)
    _trainer(pl, resumed, tmp_path, epochs=3).fit(_lightning_module(pl), _loader(), ckpt_path=path)
    assert [(r.epoch, r.phase) for r in resumed.monitor.history] == [
        *[(r.epoch, r.phase) for r in history],
        (3, "train"),
    ]
