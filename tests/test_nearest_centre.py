import pytest
import torch
from helpers import collapsed_features, needs_cuda

from collapse_ext import nearest_centre
from collapse_ext.reference import class_stats_reference, nearest_centre_reference


def problem(n, d, k, seed=0, dtype=torch.float32, device="cpu", spread=3.0):
    g = torch.Generator().manual_seed(seed)
    mu = spread * torch.randn(k, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (n,), generator=g)
    x = mu[y] + torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(k, d, generator=g)
    b = torch.randn(k, generator=g)
    return x.to(dtype).to(device), y.to(device), mu.to(device), w.to(device), b.to(device)


def check(features, labels, means, weight=None, bias=None, present=None):
    tallies, assigned = nearest_centre(features, labels, means, weight, bias, present, True)
    r_tallies, r_assigned = nearest_centre_reference(
        features.cpu(),
        labels.cpu(),
        means.cpu(),
        None if weight is None else weight.cpu(),
        None if bias is None else bias.cpu(),
        None if present is None else present.cpu(),
    )
    assert tallies.dtype == torch.int64 and assigned.dtype == torch.int64
    assert tallies.device == features.device
    assert torch.equal(assigned.cpu(), r_assigned)
    assert torch.equal(tallies.cpu(), r_tallies)
    only_tallies, empty = nearest_centre(features, labels, means, weight, bias, present)
    assert torch.equal(only_tallies, tallies) and empty.shape == (0,)
    return tallies


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int64])
def test_matches_reference(device, dtype, label_dtype):
    x, y, mu, w, b = problem(600, 24, 9, dtype=dtype, device=device)
    # Centres from the (rounded) data itself, as the metrics use them.
    means = class_stats_reference(x.cpu(), y.cpu(), 9)[1].to(device)
    tallies = check(x, y.to(label_dtype), means, w, b)
    assert tallies[0] == 600 and tallies[1] > 500
    check(x, y, means, w.to(dtype))  # classifier in the features' dtype, no bias
    check(x, y, means)


def test_several_chunks_and_many_classes(device):
    # 2000 rows in CPU chunks of 256 (and a partial one), K = 1000 in two centre tiles.
    x, y, mu, w, b = problem(2000, 16, 1000, seed=1, device=device, spread=10.0)
    check(x, y, mu, w, b)


@pytest.mark.parametrize("n", [1, 5, 40])
def test_ties_across_centre_tiles(device, n):
    """Few rows against many centres (the CPU splits the centres between threads): equal
    centres and equal logits in different tiles go to the lowest index, absent ones never
    win, and the result does not depend on the split."""
    x, y, mu, w, b = problem(n, 12, 1300, seed=4, device=device, spread=4.0)
    mu[900] = mu[100]  # same distance in tiles 0 and 1
    mu[1250] = mu[100]
    w[1100], b[1100] = w[5], b[5]
    x[0] = mu[100]  # row 0 sits exactly on centre 100 (and 900, 1250)
    present = torch.ones(1300, dtype=torch.bool, device=device)
    present[100] = False  # absent: row 0 then goes to 900
    check(x, y, mu, w, b)
    check(x, y, mu, w, b, present)
    assert int(nearest_centre(x, y, mu, present=present, assignments=True)[1][0]) == 900


def test_present_mask_and_absent_centres(device):
    x, y, mu, w, b = problem(500, 8, 6, seed=2, device=device)
    present = torch.tensor([True, True, False, True, False, True], device=device)
    tallies = check(x, y, mu, w, b, present)
    got = nearest_centre(x, y, mu, present=present, assignments=True)[1]
    assert not torch.isin(got, torch.tensor([2, 4], device=device)).any()
    none = torch.zeros(6, dtype=torch.bool, device=device)
    tallies = check(x, y, mu, w, b, none)
    assert tallies.tolist() == [0, 0, 0]


@pytest.mark.parametrize("means_dtype", [torch.float32, torch.float64])
def test_set_up_in_row_blocks(device, means_dtype):
    """The centres are shifted, rounded and normed in blocks of 2^22 / d rows (512 at
    d = 8192), so K = 1100 takes three, the last partial; the classifier rows, W c + b and
    the present mask follow the same blocks; the common offset tests the float64 centre."""
    x, y, mu, w, b = problem(96, 8192, 1100, seed=4, device=device, spread=1.0)
    x, mu = x + 50.0, (mu + 50.0).to(means_dtype)
    present = torch.arange(1100, device=device) % 7 != 3
    check(x, y, mu, w, b, present)
    check(x, y, mu)


def test_large_offset_needs_the_shift(device):
    x, y = collapsed_features(3000, 32, 10, noise=1e-3, offset=1e4)
    means = class_stats_reference(x, y, 10)[1]
    tallies = check(x.to(device), y.to(device), means.to(device))
    assert tallies.tolist() == [3000, 3000, 0]
    # The unshifted Gram identity in fp32 is what the shift avoids.
    x32, mu32 = x.float(), means.float()
    naive = ((mu32 * mu32).sum(1) - 2 * x32 @ mu32.T).argmin(1)
    assert (naive != y).sum() > 100


@pytest.mark.parametrize("n,d,k", [(0, 4, 3), (5, 0, 3), (7, 3, 1), (4, 3, 0), (50, 2, 30)])
def test_edges(device, n, d, k):
    x, y, mu, w, b = problem(n, d, max(k, 1), seed=n + d + k, device=device)
    mu, w, b = mu[:k], w[:k], b[:k]
    y = y.clamp_max(max(k - 1, 0))
    check(x, y, mu, w, b)


def test_invalid_labels_and_non_contiguous(device):
    x, y, mu, w, b = problem(300, 40, 5, seed=3, device=device)
    y[::7] = -1
    y[1::11] = 5
    check(x[:, :20], y, mu[:, :20], w[:, :20], b)
    xt = x.t().contiguous().t()
    check(xt, y, mu, w, b)
    check(x[::2], y[::2], mu, w.t().contiguous().t(), b)


def test_bad_input_messages(device):
    x, y, mu, w, b = problem(10, 4, 3, device=device)
    with pytest.raises(RuntimeError, match=r"means must have d \(the columns of features\) = 4"):
        nearest_centre(x, y, mu[:, :3])
    with pytest.raises(RuntimeError, match=r"weight must have K \(the rows of means\) = 3"):
        nearest_centre(x, y, mu, w[:2])
    with pytest.raises(RuntimeError, match="bias needs weight"):
        nearest_centre(x, y, mu, None, b)
    with pytest.raises(RuntimeError, match=r"bias must have K \(the rows of means\) = 3"):
        nearest_centre(x, y, mu, w, b[:2])
    with pytest.raises(RuntimeError, match="present must be a bool tensor"):
        nearest_centre(x, y, mu, present=torch.ones(3, device=device))
    with pytest.raises(RuntimeError, match=r"labels must be 1-D \(N,\)"):
        nearest_centre(x, y[:, None], mu)


def test_opcheck(device):
    x, y, mu, w, b = problem(40, 5, 4, device=device)
    op = torch.ops.collapse_ext.nearest_centre.default
    torch.library.opcheck(op, (x, y, mu))
    torch.library.opcheck(op, (x, y, mu, w, b, torch.tensor([True, False, True, True], device=device), True))


def test_compiles_under_torch_compile(device):
    x, y, mu, w, b = problem(60, 5, 4, device=device)

    @torch.compile(fullgraph=True, backend="eager")
    def f(x, y):
        return nearest_centre(x, y, mu, w, b)[0] * 2

    assert torch.equal(f(x, y).cpu(), 2 * nearest_centre_reference(x.cpu(), y.cpu(), mu.cpu(), w.cpu(), b.cpu())[0])


@needs_cuda
def test_no_host_synchronisation_on_cuda():
    x, y, mu, w, b = problem(5000, 32, 50, device="cuda")
    present = torch.ones(50, dtype=torch.bool, device="cuda")
    nearest_centre(x, y, mu, w, b, present)  # warm up allocations
    torch.cuda.set_sync_debug_mode("error")
    try:
        tallies, _ = nearest_centre(x, y, mu, w, b, present)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert tallies.device.type == "cuda"
