import pytest
import torch
from helpers import collapsed_features, rel_err

from collapse_ext import class_stats, within_scatter
from collapse_ext.reference import class_stats_reference, within_scatter_reference


@pytest.mark.parametrize(
    "dtype,tol", [(torch.float16, 1e-6), (torch.bfloat16, 1e-6), (torch.float32, 1e-6), (torch.float64, 1e-13)]
)
def test_matches_reference(device, dtype, tol):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(700, 45, generator=g) + 2).to(dtype).to(device)
    y = torch.randint(0, 6, (700,), generator=g).to(device)
    means = class_stats_reference(x.cpu(), y.cpu(), 6)[1]
    got = within_scatter(x, y, means.to(device))
    assert got.shape == (45, 45) and got.dtype == torch.float64
    assert rel_err(got, within_scatter_reference(x.cpu(), y.cpu(), means)) <= tol


@pytest.mark.parametrize("noise,offset", [(1e-3, 0.0), (1e-4, 0.0), (1e-3, 1e3)])
def test_collapsed_features_exact(device, noise, offset):
    x, y = collapsed_features(3000, 64, 10, noise, offset)
    x, y = x.to(device), y.to(device)
    _, means, _ = class_stats(x, y, 10)
    expected = within_scatter_reference(x.cpu(), y.cpu(), class_stats_reference(x.cpu(), y.cpu(), 10)[1])
    assert rel_err(within_scatter(x, y, means), expected) <= 1e-6


def test_chunked_rows(device):
    # Enough rows that the CPU path runs several chunks (chunk = 8 MiB of fp32 rows).
    g = torch.Generator().manual_seed(4)
    x = torch.randn(9000, 300, generator=g).to(device)
    y = torch.randint(0, 3, (9000,), generator=g).to(device)
    means = class_stats(x, y, 3)[1]
    assert rel_err(within_scatter(x, y, means), within_scatter_reference(x.cpu(), y.cpu(), means.cpu())) <= 1e-6


def test_projected_basis(device):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(400, 30, generator=g, dtype=torch.float64).to(device)
    y = torch.randint(0, 4, (400,), generator=g).to(device)
    means = class_stats(x, y, 4)[1]
    basis = torch.linalg.qr(torch.randn(30, 3, generator=g, dtype=torch.float64))[0].to(device)
    full = within_scatter(x, y, means)
    got = within_scatter(x, y, means, basis)
    assert got.shape == (3, 3)
    torch.testing.assert_close(got, basis.T @ full @ basis, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("n,d,k", [(0, 4, 2), (5, 1, 3), (3, 7, 10), (20, 0, 2)])
def test_edges(device, n, d, k):
    x = torch.randn(n, d, device=device)
    y = torch.randint(0, k, (n,), device=device)
    means = torch.randn(k, d, device=device)
    got = within_scatter(x, y, means)
    assert rel_err(got, within_scatter_reference(x.cpu(), y.cpu(), means.cpu())) <= 1e-6


def test_non_contiguous_and_invalid_rows(device):
    g = torch.Generator().manual_seed(6)
    wide = torch.randn(100, 50, generator=g).to(device)
    x = wide[:, 5:25]
    y = torch.randint(-1, 4, (100,), generator=g).to(device)  # -1 rows are skipped
    means = torch.randn(3, 20, generator=g).to(device)
    assert rel_err(within_scatter(x, y, means), within_scatter_reference(x.cpu(), y.cpu(), means.cpu())) <= 1e-6
    xt = torch.randn(20, 100, generator=g).to(device).t()
    assert rel_err(within_scatter(xt, y, means), within_scatter_reference(xt.cpu(), y.cpu(), means.cpu())) <= 1e-6


def test_bad_input_messages(device):
    x = torch.randn(4, 3, device=device)
    y = torch.zeros(4, dtype=torch.long, device=device)
    with pytest.raises(RuntimeError, match=r"means must have d \(the columns of features\) = 3"):
        within_scatter(x, y, torch.zeros(2, 4, device=device))
    with pytest.raises(RuntimeError, match=r"means must be 2-D \(K, d\)"):
        within_scatter(x, y, torch.zeros(3, device=device))
    with pytest.raises(RuntimeError, match=r"basis must have d \(the columns of features\) = 3"):
        within_scatter(x, y, torch.zeros(2, 3, device=device), torch.zeros(4, 2, device=device))


def test_opcheck(device):
    x = torch.randn(40, 5, device=device)
    y = torch.randint(0, 3, (40,), device=device)
    means = torch.randn(3, 5, device=device)
    torch.library.opcheck(torch.ops.collapse_ext.within_scatter.default, (x, y, means, None))
    torch.library.opcheck(
        torch.ops.collapse_ext.within_scatter.default, (x, y, means, torch.randn(5, 2, device=device))
    )


def test_long_batches_stay_exact_across_fp32_accumulation(device):
    # 40 000 x 256 fp32: 5 chunks of 8192 rows, products summed in fp32 up to 32 768 rows
    # before each float64 flush; collapsed features with an offset must still be exact.
    x, y = collapsed_features(40_000, 256, 10, 1e-4, offset=1e3)
    x, y = x.to(device), y.to(device)
    _, means, _ = class_stats(x, y, 10)
    expected = within_scatter_reference(x.cpu(), y.cpu(), class_stats_reference(x.cpu(), y.cpu(), 10)[1])
    assert rel_err(within_scatter(x, y, means), expected) <= 1e-6
