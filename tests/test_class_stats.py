import pytest
import torch
from helpers import rel_err

from collapse_ext import class_stats
from collapse_ext.reference import class_stats_reference

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _compare(x, y, k):
    counts, means, sqdev = class_stats(x, y, k)
    r_counts, r_means, r_sqdev = class_stats_reference(x.cpu(), y.cpu(), k)
    assert counts.dtype == torch.int64 and means.dtype == torch.float64 and sqdev.dtype == torch.float64
    assert torch.equal(counts.cpu(), r_counts)
    assert rel_err(means, r_means) <= 1e-12
    assert rel_err(sqdev, r_sqdev) <= 1e-10


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int64])
def test_matches_reference(device, dtype, label_dtype):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(500, 37, generator=g) * 3 + 1).to(dtype).to(device)
    y = torch.randint(0, 7, (500,), generator=g).to(label_dtype).to(device)
    _compare(x, y, 7)


@pytest.mark.parametrize(
    "n,d,k",
    [(0, 5, 3), (10, 0, 3), (1, 1, 1), (50, 1, 4), (40, 3, 60), (5, 8, 20), (300, 200, 1), (1000, 130, 300)],
)
def test_shapes_and_edges(device, n, d, k):
    g = torch.Generator().manual_seed(n + d + k)
    x = torch.randn(n, d, generator=g).to(device)
    y = torch.randint(0, k, (n,), generator=g).to(device)
    _compare(x, y, k)


def test_non_contiguous(device):
    g = torch.Generator().manual_seed(2)
    wide = torch.randn(300, 64, generator=g).to(device)
    y = torch.randint(0, 5, (300,), generator=g).to(device)
    _compare(wide[:, 10:40], y, 5)  # strided rows
    _compare(torch.randn(24, 300, generator=g).to(device).t(), y, 5)  # transposed
    _compare(wide[::2], torch.randint(0, 5, (600,), generator=g).to(device)[::4], 5)


def test_absent_classes_are_zero(device):
    x = torch.randn(20, 4, device=device)
    y = torch.tensor([0, 2] * 10, device=device)
    counts, means, sqdev = class_stats(x, y, 4)
    assert counts.tolist() == [10, 0, 10, 0]
    assert means[1].abs().sum() == 0 and sqdev[3] == 0


def test_out_of_range_rows_are_skipped(device):
    x = torch.randn(6, 3, device=device)
    y = torch.tensor([0, 1, -1, 5, 1, 0], device=device)
    counts, means, _ = class_stats(x, y, 2)
    assert counts.tolist() == [2, 2]
    torch.testing.assert_close(means[0], x[[0, 5]].double().mean(0))


def test_fp16_squares_do_not_overflow(device):
    # 300^2 = 9e4 is beyond float16's 65504: the accumulation must be wider.
    x = torch.full((64, 8), 300.0, dtype=torch.float16, device=device)
    x[::2] = -300.0
    y = torch.zeros(64, dtype=torch.long, device=device)
    counts, means, sqdev = class_stats(x, y, 1)
    assert torch.isfinite(sqdev).all()
    assert sqdev.item() == pytest.approx(64 * 8 * 300.0**2)


def test_bad_input_messages(device):
    x = torch.randn(4, 3, device=device)
    with pytest.raises(RuntimeError, match=r"features must be 2-D \(N, d\)"):
        class_stats(x[0], torch.zeros(3, dtype=torch.long, device=device), 2)
    with pytest.raises(RuntimeError, match="labels must be int32 or int64"):
        class_stats(x, torch.zeros(4, device=device), 2)
    with pytest.raises(RuntimeError, match=r"labels must have N \(the rows of features\) = 4"):
        class_stats(x, torch.zeros(5, dtype=torch.long, device=device), 2)
    with pytest.raises(RuntimeError, match="num_classes must be a positive int"):
        class_stats(x, torch.zeros(4, dtype=torch.long, device=device), 0)
    with pytest.raises(RuntimeError, match="features must be a floating tensor"):
        class_stats(x.long(), torch.zeros(4, dtype=torch.long, device=device), 2)


def test_opcheck(device):
    x = torch.randn(50, 6, device=device)
    y = torch.randint(0, 4, (50,), device=device)
    torch.library.opcheck(torch.ops.collapse_ext.class_stats.default, (x, y, 4))


def test_compiles_under_torch_compile(device):
    x = torch.randn(50, 6, device=device)
    y = torch.randint(0, 4, (50,), device=device)

    @torch.compile(fullgraph=True, backend="eager")
    def f(x, y):
        counts, means, sqdev = class_stats(x, y, 4)
        return means * 2, counts

    means2, counts = f(x, y)
    torch.testing.assert_close(means2, 2 * class_stats_reference(x.cpu(), y.cpu(), 4)[1].to(device))
