import numpy as np
import pytest
import torch

from collapse_ext.io import Source, iter_chunks, load_tensor, shard_paths

N, D = 500, 6


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, D, generator=g), torch.randint(0, 4, (N,), generator=g)


def _write(path, x, y):
    name = str(path)
    if name.endswith(".npz"):
        np.savez_compressed(name, features=x.numpy(), labels=y.numpy())
    elif name.endswith(".pt"):
        torch.save({"features": x, "labels": y}, name)
    elif name.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({"features": x.contiguous(), "labels": y.contiguous()}, name)
    elif name.endswith(".h5"):
        h5py = pytest.importorskip("h5py")
        with h5py.File(name, "w") as f:
            f["features"], f["labels"] = x.numpy(), y.numpy()


@pytest.mark.parametrize("ext", [".npz", ".pt", ".safetensors", ".h5"])
def test_every_keyed_format_reads_back_in_chunks(tmp_path, data, ext):
    x, y = data
    if ext == ".safetensors":
        pytest.importorskip("safetensors")
    _write(tmp_path / f"a{ext}", x, y)
    with Source(tmp_path / f"a{ext}") as src:
        assert src.keys() == ["features", "labels"]
        chunks = list(iter_chunks([src.array("features")], src.array("labels"), 7, N, 128))
    assert [c.start for c in chunks] == [7, 135, 263, 391]
    assert torch.equal(torch.cat([c.features[0] for c in chunks]), x[7:])
    assert torch.equal(torch.cat([c.labels for c in chunks]), y[7:])


def test_npy_is_memory_mapped_and_shards_concatenate_in_name_order(tmp_path, data):
    x, _ = data
    (tmp_path / "shards").mkdir()
    for i, (lo, hi) in enumerate([(0, 100), (100, 350), (350, N)]):
        np.save(tmp_path / "shards" / f"part-{i:02d}.npy", x[lo:hi].numpy())
    with Source(tmp_path / "shards" / "part-00.npy") as one:
        assert isinstance(one.containers[0].single, np.memmap)
    with Source(tmp_path / "shards") as src:
        array = src.array()
        assert array.shape == (N, D)
        assert torch.equal(array.read(90, 360), x[90:360])  # spans all three shards
    assert shard_paths(str(tmp_path / "shards" / "part-0[12].npy"))[0].endswith("part-01.npy")


def test_unknown_key_lists_the_keys(tmp_path, data):
    _write(tmp_path / "a.npz", *data)
    with (
        Source(tmp_path / "a.npz") as src,
        pytest.raises(ValueError, match=r"got 'feats' \(it holds: features, labels\)"),
    ):
        src.array("feats")


@pytest.mark.parametrize(
    "name, match",
    [
        ("missing.npy", "Expected `source` to be an existing file, directory or glob"),
        ("nothing-*.npy", "Expected `source` glob to match files"),
        ("a.txt", "Expected `source` to end in one of"),
        ("bad.npy", "Expected `source` to be a readable .npy file"),
    ],
)
def test_bad_sources(tmp_path, name, match):
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match=match):
        Source(tmp_path / name)


def test_load_tensor_takes_file_key_or_the_default(tmp_path):
    w = torch.randn(3, 4)
    torch.save({"weight": w, "other": torch.zeros(2)}, tmp_path / "c.pt")
    assert torch.equal(load_tensor(str(tmp_path / "c.pt"), ("weight",), "weight")[0], w)
    assert load_tensor(f"{tmp_path / 'c.pt'}:other", ("weight",), "weight")[0].shape == (2,)
    with pytest.raises(ValueError, match="Expected `weight` to name an array in c.pt, got 'nope'"):
        load_tensor(f"{tmp_path / 'c.pt'}:nope", ("weight",), "weight")


def test_prefetch_error_reaches_the_consumer_and_early_exit_stops_the_thread(tmp_path, data):
    x, y = data
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "y.npy", y.numpy())
    with Source(tmp_path / "x.npy") as xs, Source(tmp_path / "y.npy") as ys:
        gen = iter_chunks([xs.array()], ys.array(), 0, N, 50)
        next(gen)
        gen.close()  # the producer is told to stop and joined

        class Broken:
            shape, dtype, name = (N,), torch.int64, "broken"

            def read(self, lo, hi, out=None):
                raise OSError("disk gone")

        with pytest.raises(OSError, match="disk gone"):
            list(iter_chunks([xs.array()], Broken(), 0, N, 50))
