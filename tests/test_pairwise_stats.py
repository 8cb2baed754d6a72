import pytest
import torch

from collapse_ext import pairwise_stats
from collapse_ext.reference import PAIRWISE_FIELDS, pairwise_stats_reference

F = {name: i for i, name in enumerate(PAIRWISE_FIELDS)}


def check(got, rows, variances=None, subset=None, riesz_s=1.0, cdnv_p=1.0, rtol=1e-12):
    """Compare with the float64 reference on the same (rounded) values, field by field."""
    expected = pairwise_stats_reference(
        rows.cpu(),
        None if variances is None else variances.cpu(),
        None if subset is None else subset.cpu(),
        riesz_s,
        cdnv_p,
    )
    assert got.shape == (len(PAIRWISE_FIELDS),) and got.dtype == torch.float64
    got = got.cpu()
    for name, i in F.items():
        # Bounded terms (cosines) may sum to ~0: measure them against the pair count.
        atol = rtol * max(expected[F["pairs"]].item(), 1.0)
        torch.testing.assert_close(got[i], expected[i], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def rows_of(k, d, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(k, d, generator=g, dtype=torch.float64) + 0.3).to(dtype).to(device)


@pytest.mark.parametrize(
    "dtype,rtol", [(torch.float16, 1e-5), (torch.bfloat16, 1e-5), (torch.float32, 1e-5), (torch.float64, 1e-11)]
)
def test_matches_reference(device, dtype, rtol):
    rows = rows_of(90, 33, dtype=dtype, device=device)
    variances = torch.rand(90, generator=torch.Generator().manual_seed(1)).to(device)
    check(pairwise_stats(rows), rows, rtol=rtol)
    check(pairwise_stats(rows, variances), rows, variances, rtol=rtol)


def test_several_tiles_subset_and_options(device):
    # 1100 rows: several CPU tiles (138 rows), a partial last tile, diagonal and off-diagonal ones.
    rows = rows_of(1100, 20, seed=2, dtype=torch.float64, device=device)
    variances = torch.rand(1100, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(device)
    check(pairwise_stats(rows, variances, None, 2.5, 2.0), rows, variances, None, 2.5, 2.0, rtol=1e-11)
    subset = torch.randperm(1100, generator=torch.Generator().manual_seed(4))[:600].to(device)
    check(pairwise_stats(rows, variances, subset), rows, variances, subset, rtol=1e-11)
    check(pairwise_stats(rows, variances, subset.int()), rows, variances, subset, rtol=1e-11)


@pytest.mark.parametrize("k,d", [(0, 5), (1, 5), (2, 1), (300, 3), (40, 0), (7, 200)])
def test_shapes_and_edges(device, k, d):
    # K > d (no simplex ETF fits), one row, no rows, zero-width rows.
    rows = rows_of(k, d, seed=k + d, dtype=torch.float64, device=device)
    variances = torch.rand(k, dtype=torch.float64).to(device)
    check(pairwise_stats(rows, variances), rows, variances, rtol=1e-11)


def test_degenerate_rows(device):
    rows = torch.tensor(
        [[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [2.0, 0.0], [-1.0, 0.0], [0.0, 3.0]], dtype=torch.float64, device=device
    )
    got = pairwise_stats(rows, torch.ones(6, dtype=torch.float64, device=device))
    check(got, rows, torch.ones(6, dtype=torch.float64), rtol=1e-12)
    assert got[F["pairs"]] == 15 and got[F["cos_pairs"]] == 10  # the zero row has no cosine
    assert got[F["coincident"]] == 1 and got[F["kernel_pairs"]] == 7  # rows 0, 1, 3 point the same way
    assert got[F["cos_min"]] == -1 and got[F["cos_max"]] == 1


def test_empty_set_identities(device):
    got = pairwise_stats(torch.zeros(1, 3, device=device))
    assert got[F["cos_min"]] == float("inf") and got[F["cos_max"]] == float("-inf")
    assert got[F["dist_sq_max"]] == float("-inf") and got[F["pairs"]] == 0


def test_non_contiguous(device):
    wide = rows_of(60, 50, seed=5, dtype=torch.float64, device=device)
    check(pairwise_stats(wide[:, 7:30]), wide[:, 7:30], rtol=1e-11)
    check(pairwise_stats(wide[::3]), wide[::3], rtol=1e-11)
    check(pairwise_stats(wide.t()), wide.t(), rtol=1e-11)
    v = torch.rand(120, dtype=torch.float64, device=device)[::2]
    check(pairwise_stats(wide, v), wide, v, rtol=1e-11)


def test_bad_input_messages(device):
    rows = torch.randn(5, 3, device=device)
    with pytest.raises(RuntimeError, match=r"rows must be 2-D \(K, d\)"):
        pairwise_stats(rows[0])
    with pytest.raises(RuntimeError, match="rows must be a floating tensor"):
        pairwise_stats(rows.long())
    with pytest.raises(RuntimeError, match=r"variances must have K \(the rows of rows\) = 5"):
        pairwise_stats(rows, torch.ones(4, device=device))
    with pytest.raises(RuntimeError, match=r"subset must hold row indices in \[0, 5\), got values in \[0, 5\]"):
        pairwise_stats(rows, None, torch.tensor([0, 5], device=device))
    with pytest.raises(RuntimeError, match="subset must be int32 or int64"):
        pairwise_stats(rows, None, torch.tensor([0.0, 1.0], device=device))
    with pytest.raises(RuntimeError, match="riesz_s must be a positive finite number"):
        pairwise_stats(rows, None, None, 0.0)
    with pytest.raises(RuntimeError, match="cdnv_p must be a positive finite number"):
        pairwise_stats(rows, None, None, 1.0, float("nan"))


def test_opcheck(device):
    rows = torch.randn(20, 6, device=device, dtype=torch.float64)
    op = torch.ops.collapse_ext.pairwise_stats.default
    torch.library.opcheck(op, (rows,))
    torch.library.opcheck(op, (rows, torch.rand(20, device=device), torch.tensor([1, 4, 7], device=device), 2.0, 1.5))


def test_compiles_under_torch_compile(device):
    rows = torch.randn(30, 4, device=device, dtype=torch.float64)

    @torch.compile(fullgraph=True, backend="eager")
    def f(r):
        return pairwise_stats(r - r.mean(0))[F["cos_sum"]]

    expected = pairwise_stats_reference((rows - rows.mean(0)).cpu())[F["cos_sum"]]
    torch.testing.assert_close(f(rows).cpu(), expected)


def awkward_rows(k, d, dtype):
    """Rows with repeats, scaled copies (coinciding directions), antipodes and zero rows."""
    rows = rows_of(k, d, seed=k, dtype=torch.float64)
    rows[5], rows[9] = rows[3], 2.0 * rows[3]
    rows[11], rows[17] = -rows[3], 0.0
    rows[k - 1] = 0.0
    return rows.to(dtype)


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.float64, 1e-11)])
@pytest.mark.parametrize("riesz_s,cdnv_p", [(1.0, 1.0), (2.0, 2.0), (0.5, 1.0), (1.0, 0.7)])
@pytest.mark.parametrize("baseline", [False, True])
def test_cpu_reduction_paths(monkeypatch, dtype, rtol, riesz_s, cdnv_p, baseline):
    # The CPU reduction runs 4 columns per step where the CPU has AVX2+FMA, else pair by
    # pair (forced by COLLAPSE_EXT_CPU_BASELINE=1): K = 203 leaves partial lane groups.
    if baseline:
        monkeypatch.setenv("COLLAPSE_EXT_CPU_BASELINE", "1")
    rows = awkward_rows(203, 9, dtype)
    variances = torch.rand(203, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    for v in (None, variances):
        got = pairwise_stats(rows, v, None, riesz_s, cdnv_p)
        check(got, rows, v, None, riesz_s, cdnv_p, rtol=rtol)
    assert got[F["coincident"]] == 2 and got[F["pairs"]] == 203 * 202 // 2


def test_cpu_threads_do_not_change_the_result():
    rows = rows_of(1500, 24, seed=7)
    variances = torch.rand(1500, generator=torch.Generator().manual_seed(8))
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(pairwise_stats(rows, variances, None, 0.5, 2.0))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, results[0]) for r in results)
