import math

import pytest
import torch

from collapse_ext import lpm
from collapse_ext.reference import lpm_objective_grad_reference

E_PAIRS = [(1.0, 1.0), (1.0, 5.0), (0.3, 2.0), (4.0, 0.5)]


def _off_diagonal(M: torch.Tensor) -> torch.Tensor:
    K = M.shape[-1]
    return M[..., ~torch.eye(K, dtype=torch.bool, device=M.device)]


@pytest.mark.parametrize("K", [3, 5, 10, 20])
def test_balanced_ce_is_simplex_etf(K):
    E_W = torch.tensor([e[0] for e in E_PAIRS], dtype=torch.float64)
    E_H = torch.tensor([e[1] for e in E_PAIRS], dtype=torch.float64)
    res = lpm.solve([1.0] * K, E_W, E_H, seed=K)
    assert res.W.shape == (len(E_PAIRS), K, K) and res.converged.all()
    assert (_off_diagonal(res.cos_W) + 1 / (K - 1)).abs().max() < 1e-4
    assert (_off_diagonal(res.cos_H) + 1 / (K - 1)).abs().max() < 1e-4
    assert (res.norms_W - E_W.sqrt()[:, None]).abs().max() < 1e-4
    assert (res.norms_H - E_H.sqrt()[:, None]).abs().max() < 1e-4
    assert (res.cos_WH > 1 - 1e-4).all()  # h_k parallel to w_k
    for i, (ew, eh) in enumerate(E_PAIRS):
        assert res.objective[i].item() == pytest.approx(lpm.balanced_prediction(K, ew, eh)["objective"], rel=1e-10)
    assert (res.pg_norm <= 1e-8).all() and (res.kkt < 1e-7).all()
    assert (res.multipliers > 0).all()  # both constraints active


def test_etf_in_minimal_dimension():
    K = 6
    res = lpm.solve([2.0] * K, 1.0, 3.0, dim=K - 1)
    assert res.W.shape == (1, K, K - 1)
    assert (_off_diagonal(res.cos_W) + 1 / (K - 1)).abs().max() < 1e-4
    etf = lpm.simplex_etf(K, K - 1)
    # Rotation-invariant comparison: the Gram matrix of the ETF scaled to ||w|| = 1.
    assert (res.gram_W[0] - etf @ etf.T).abs().max() < 1e-4


def test_only_the_product_of_the_budgets_matters():
    counts = torch.tensor([[7.0, 3.0, 1.0, 1.0, 2.0]] * 3)
    E_W = torch.tensor([1.0, 4.0, 0.1], dtype=torch.float64)
    E_H = 5.0 / E_W
    res = lpm.solve(counts, E_W, E_H, seed=3)
    assert res.converged.all()
    assert (res.cos_W - res.cos_W[0]).abs().max() < 1e-6
    assert (res.cos_H - res.cos_H[0]).abs().max() < 1e-6
    assert (res.objective - res.objective[0]).abs().max() < 1e-8
    # W scales with sqrt(E_W), H with sqrt(E_H).
    scaled = res.norms_W / E_W.sqrt()[:, None]
    assert (scaled - scaled[0]).abs().max() < 1e-6
    # A different product gives a different geometry: the test can fail.
    other = lpm.solve(counts[0], 1.0, 1.0, seed=3)
    assert (other.cos_W[0] - res.cos_W[0]).abs().max() > 1e-2


def test_minority_collapse():
    K, K_A = 10, 5
    ratios = torch.logspace(0, 4, 9, dtype=torch.float64)
    sweep = lpm.minority_collapse_sweep(K, K_A, ratios, 1.0, 5.0, threshold=True, rounds=3)
    assert sweep.converged.all()
    cos = sweep.minority_cos_mean
    assert cos[0].item() == pytest.approx(-1 / (K - 1), abs=1e-6)
    assert sweep.minority_spread[0].item() == pytest.approx(2 * K / (K - 1), rel=1e-6)  # ETF: 2 + 2/(K-1)
    assert (cos[1:] - cos[:-1] >= -1e-9).all()  # rises with R
    assert cos[-1] > 0.999 or sweep.minority_norm[-1] < 1e-3
    assert (sweep.minority_spread[-4:] < 1e-8).all()
    assert (sweep.majority_cos_mean < 0).all()
    # Minority rows shrink relative to the majority rows (never grow).
    assert (sweep.norm_ratio[1:] < sweep.norm_ratio[:-1] + 1e-9).all()
    R0 = sweep.threshold
    assert R0 is not None and 10 < R0 < 10**1.5
    # The threshold separates spread above / below the tolerance (1e-3 by default).
    near = lpm.minority_collapse_sweep(K, K_A, [0.9 * R0, 1.1 * R0], 1.0, 5.0)
    assert near.minority_spread[0] > 1e-3 > near.minority_spread[1]
    assert "minority_cos_mean" in sweep.to_markdown() and len(sweep.rows()) == 9


def test_oversampling_restores_the_etf():
    K, K_A = 10, 5
    sweep = lpm.minority_collapse_sweep(K, K_A, [1.0, 100.0, 1e4], 1.0, 5.0, oversample=True)
    cos = _off_diagonal(sweep.result.cos_W)
    assert (cos + 1 / (K - 1)).abs().max() < 1e-4
    assert (sweep.result.norms_W - 1).abs().max() < 1e-4
    assert (sweep.norm_ratio - 1).abs().max() < 1e-4


def test_global_optimality_from_random_starts():
    counts = torch.tensor([[10.0] * 5 + [1.0] * 5] * 20)  # R = 10, just below the threshold
    res = lpm.solve(counts, 1.0, 5.0, seed=123)
    assert res.converged.all()
    f = res.objective
    assert ((f.max() - f.min()) / f.min()).item() < 1e-6
    assert (res.kkt < 1e-7).all()
    # Same objective, same rotation-invariant geometry.
    assert (res.gram_W - res.gram_W[0]).abs().max() < 1e-5


def test_solve_full_is_class_collapsed():
    full = lpm.solve_full([3, 2, 4], 1.0, 2.0, seed=0)
    assert full.H.shape == (9, 3) and full.converged
    assert full.within_spread < 1e-6
    collapsed = lpm.solve([3, 2, 4], 1.0, 2.0)
    assert full.objective == pytest.approx(collapsed.objective.item(), rel=1e-9)
    # The class means solve the collapsed problem: same classifier geometry.
    cos_full = lpm.solver._cosines(full.W.unsqueeze(0))
    assert (cos_full - collapsed.cos_W).abs().max() < 1e-5


def test_balanced_mse_is_an_orthogonal_frame():
    K = 4
    E_W, E_H = torch.tensor([0.5, 0.2], dtype=torch.float64), torch.tensor([0.8, 1.0], dtype=torch.float64)
    rho = (E_W * E_H).sqrt()
    res = lpm.solve([1.0] * K, E_W, E_H, loss="mse")
    assert res.converged.all()
    assert _off_diagonal(res.cos_W).abs().max() < 1e-4
    assert (res.norms_W - E_W.sqrt()[:, None]).abs().max() < 1e-4
    assert (res.norms_H - E_H.sqrt()[:, None]).abs().max() < 1e-4
    eye = torch.eye(K, dtype=torch.float64)
    assert (res.logits - rho[:, None, None] * eye).abs().max() < 1e-4  # W h_k = rho e_k
    for i in range(2):
        expected = lpm.balanced_prediction(K, E_W[i].item(), E_H[i].item(), loss="mse")["objective"]
        assert res.objective[i].item() == pytest.approx(expected, rel=1e-8)
    with pytest.raises(ValueError, match="not unique"):
        lpm.balanced_prediction(K, 2.0, 1.0, loss="mse")


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_pgd_apgd_and_backends_agree(loss):
    counts = torch.tensor([[5.0, 1.0, 1.0, 3.0], [1.0, 1.0, 1.0, 1.0]])
    # The iterations themselves (no Newton polish, which may rotate the rows).
    apgd = lpm.solve(counts, 1.0, 0.7, loss=loss, seed=2, gram_tol=None)
    pgd = lpm.solve(counts, 1.0, 0.7, loss=loss, seed=2, method="pgd", gram_tol=None)
    ref = lpm.solve(counts, 1.0, 0.7, loss=loss, seed=2, backend="reference", gram_tol=None)
    assert apgd.converged.all() and pgd.converged.all()
    assert (apgd.objective - pgd.objective).abs().max() < 1e-10
    assert (apgd.gram_W - pgd.gram_W).abs().max() < 1e-5
    assert torch.equal(apgd.iterations, ref.iterations)
    assert (apgd.W - ref.W).abs().max() < 1e-10 and (apgd.H - ref.H).abs().max() < 1e-10


def test_deterministic_and_device_independent(device):
    counts = torch.tensor([[4.0, 2.0, 1.0, 1.0, 1.0]])
    a = lpm.solve(counts, 1.0, 3.0, seed=7)
    assert a.converged.all() and float(a.gram_error[0]) <= 1e-6
    b = lpm.solve(counts, 1.0, 3.0, seed=7)
    assert torch.equal(a.W, b.W) and torch.equal(a.H, b.H) and torch.equal(a.iterations, b.iterations)
    c = lpm.solve(counts, 1.0, 3.0, seed=8)
    assert not torch.equal(a.W, c.W)
    d = lpm.solve(counts, 1.0, 3.0, seed=7, device=device)
    assert d.W.device.type == device.type
    assert (d.gram_W.cpu() - a.gram_W).abs().max() < 1e-8 and (d.objective.cpu() - a.objective).abs().max() < 1e-12


def test_float32(device):
    res = lpm.solve([1.0] * 5, 1.0, 2.0, dtype=torch.float32, tol=1e-5, device=device)
    assert res.W.dtype == torch.float32 and res.converged.all()
    assert (_off_diagonal(res.cos_W) + 0.25).abs().max() < 1e-3


def test_converged_instances_are_frozen_and_counted():
    # A balanced instance converges in a few hundred iterations, a near-threshold one needs more.
    counts = torch.tensor([[1.0] * 10, [12.0] * 5 + [1.0] * 5])
    res = lpm.solve(counts, 1.0, 5.0, seed=4, chunk=50, gram_tol=None)
    assert res.converged.all()
    assert res.iterations[0] < res.iterations[1]
    assert (res.iterations % 50 == 0).all()
    capped = lpm.solve(counts, 1.0, 5.0, seed=4, chunk=50, max_iter=int(res.iterations[0]), gram_tol=None)
    assert capped.converged.tolist() == [True, False]
    assert torch.equal(capped.W[0], res.W[0])  # the frozen instance did not move
    assert (capped.iterations == res.iterations[0]).all()
    # The Newton polish (default gram_tol) finishes the capped instance and bounds its Grams.
    polished = lpm.solve(counts, 1.0, 5.0, seed=4, chunk=50, max_iter=int(res.iterations[0]))
    assert polished.converged.all() and (polished.gram_error <= 1e-6).all() and (polished.kkt <= 1e-8).all()
    assert (polished.gram_W - res.gram_W).abs().max() < 1e-5


def test_lipschitz_bound_holds():
    g = torch.Generator().manual_seed(0)
    B, K, p = 64, 5, 5
    weights = torch.rand(B, K, generator=g, dtype=torch.float64)
    weights /= weights.sum(1, keepdim=True)
    E_W = 0.2 + 3 * torch.rand(B, generator=g, dtype=torch.float64)
    E_H = 0.2 + 3 * torch.rand(B, generator=g, dtype=torch.float64)

    def feasible():
        X = torch.randn(2, B, K, p, generator=g, dtype=torch.float64)
        X = X / X.norm(dim=(2, 3), keepdim=True)
        X[0] *= torch.sqrt(K * E_W)[:, None, None]
        X[1] *= torch.sqrt(K * E_H)[:, None, None]
        return X

    for loss in ("ce", "mse"):
        L = lpm.lipschitz_bound(weights, E_W, E_H, loss)
        worst = 0.0
        for _ in range(20):
            a, b = feasible(), feasible()
            _, gWa, gHa = lpm_objective_grad_reference(a[0], a[1], weights, loss)
            _, gWb, gHb = lpm_objective_grad_reference(b[0], b[1], weights, loss)
            dg = torch.sqrt(((gWa - gWb) ** 2).sum((1, 2)) + ((gHa - gHb) ** 2).sum((1, 2)))
            dx = (a - b).pow(2).sum((0, 2, 3)).sqrt()
            worst = max(worst, (dg / (L * dx)).max().item())
        assert 0.05 < worst <= 1.0  # a bound, and not a vacuous one


def test_kkt_residual_detects_non_stationary_points():
    res = lpm.solve([1.0] * 4, 1.0, 1.0)
    good, _ = lpm.kkt_residual(res.W, res.H, res.weights, 1.0, 1.0)
    bad, _ = lpm.kkt_residual(res.W.flip(1), res.H, res.weights, 1.0, 1.0)
    assert good.item() < 1e-7 and bad.item() > 1e-2


def test_simplex_etf():
    for K, d in [(2, 1), (3, 3), (7, 6), (5, 9)]:
        M = lpm.simplex_etf(K, d)
        G = M @ M.T
        expected = torch.full((K, K), -1 / (K - 1), dtype=torch.float64).fill_diagonal_(1.0)
        assert M.shape == (K, d) and (G - expected).abs().max() < 1e-12
    with pytest.raises(ValueError, match=r"Expected `d` >= K - 1 = 4"):
        lpm.simplex_etf(5, 3)
    pred = lpm.balanced_prediction(10, 1.0, 5.0)
    assert pred["norm_H"] == pytest.approx(math.sqrt(5.0)) and pred["cosine"] == pytest.approx(-1 / 9)


def test_bad_input_messages():
    with pytest.raises(ValueError, match="Expected `counts` to be finite and non-negative"):
        lpm.solve([1.0, -1.0, 2.0])
    with pytest.raises(ValueError, match="Expected `counts` to have at least 2 classes"):
        lpm.solve([3.0])
    with pytest.raises(ValueError, match=r"Expected `counts` to be \(K,\) or \(B, K\)"):
        lpm.solve(torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="Expected `counts` to have a positive total"):
        lpm.solve([[1.0, 1.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match="Expected `E_W` to be positive and finite"):
        lpm.solve([1.0, 1.0], E_W=0.0)
    with pytest.raises(ValueError, match=r"Expected `E_H` to be a scalar or \(2,\)"):
        lpm.solve([[1.0, 1.0], [2.0, 1.0]], E_H=torch.ones(2, 2))
    with pytest.raises(ValueError, match="Expected `loss` to be one of"):
        lpm.solve([1.0, 1.0], loss="hinge")
    with pytest.raises(ValueError, match="Expected `method` to be one of"):
        lpm.solve([1.0, 1.0], method="adam")
    with pytest.raises(ValueError, match="Expected `max_iter` to be a positive int"):
        lpm.solve([1.0, 1.0], max_iter=0)
    with pytest.raises(ValueError, match=r"Expected `loss_weights` to be \(K,\) or \(B, K\) with K = 2"):
        lpm.solve([1.0, 1.0], loss_weights=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="Expected batch dimensions to agree"):
        lpm.solve(torch.ones(2, 3), E_W=torch.ones(3))
    with pytest.raises(ValueError, match=r"Expected `K_A` in \[1, K - 2\]"):
        lpm.minority_collapse_sweep(10, 9, [1.0, 2.0])
    with pytest.raises(ValueError, match="Expected `ratios` to be positive finite numbers"):
        lpm.minority_collapse_sweep(10, 5, [1.0, -2.0])
    with pytest.raises(ValueError, match=r"Expected `counts` to be \(K,\) positive integers for solve_full"):
        lpm.solve_full([1.5, 2.0])


@pytest.mark.parametrize(
    "K,K_A,match",
    [
        (4, 3, r"Expected `K_A` in \[1, K - 2\] .*got K_A=3, K=4"),
        (4, 0, r"Expected `K_A` in \[1, K - 2\] .*got K_A=0, K=4"),
        (4, -1, r"Expected `K_A` in \[1, K - 2\]"),
        (4, 1.5, r"Expected `K_A` in \[1, K - 2\] .*got K_A=1.5"),
        (4, True, r"Expected `K_A` in \[1, K - 2\]"),
        (2, 1, r"Expected `K` >= 3"),
        (0, 1, "Expected `K` to be a positive int"),
    ],
)
def test_threshold_needs_a_majority_and_two_minority_classes(K, K_A, match):
    # (4, 3) used to return 1.0 (one minority row has spread 0) and K_A = 0 returned None.
    with pytest.raises(ValueError, match=match):
        lpm.estimate_threshold(K, K_A, max_iter=10)
    with pytest.raises(ValueError, match=match):
        lpm.minority_collapse_sweep(K, K_A, [1.0, 2.0], max_iter=10)


def test_threshold_bracket_is_validated():
    with pytest.raises(ValueError, match=r"Expected 0 < `lo` < `hi`, got lo=10.0, hi=5.0"):
        lpm.estimate_threshold(5, 2, lo=10.0, hi=5.0)
    with pytest.raises(ValueError, match="Expected `hi` to be a positive finite number, got inf"):
        lpm.estimate_threshold(5, 2, hi=float("inf"))
    with pytest.raises(ValueError, match="Expected `lo` to be a positive finite number, got '1'"):
        lpm.estimate_threshold(5, 2, lo="1")
    with pytest.raises(ValueError, match="Expected at least two distinct `ratios` to bracket the threshold"):
        lpm.minority_collapse_sweep(5, 2, [3.0, 3.0], threshold=True)


def test_threshold_smallest_valid_problem():
    # K = 3, K_A = 1: two minority rows; they collapse at a finite ratio.
    R0 = lpm.estimate_threshold(3, 1, 1.0, 5.0, lo=1.0, hi=1e4, rounds=2)
    assert R0 is not None and 1.0 < R0 < 1e4


def test_overflowing_budgets_are_refused():
    # E_W = 1e300 used to report converged=True with a KKT residual of 5e149.
    with pytest.raises(ValueError, match=r"Expected `E_W` and `E_H` small enough for torch.float64 arithmetic"):
        lpm.solve([3.0, 1.0, 1.0, 2.0], 1e300, 1.0)
    with pytest.raises(ValueError, match=r"Expected `E_W` and `E_H` small enough for torch.float32 arithmetic"):
        lpm.solve([3.0, 1.0, 1.0, 2.0], 1.0, 1e25, dtype=torch.float32)


@pytest.mark.parametrize("E_W,E_H", [(1e150, 1e150), (1e-300, 1.0), (1.0, 1e-300)])
def test_converged_is_judged_on_the_problem_scale(E_W, E_H):
    # The gradient-mapping norm is 0 (the step is lost in rounding) or below tol only
    # because a ball is tiny: the stopping rule fires, the scale-free KKT residual does not.
    res = lpm.solve([3.0, 1.0, 1.0, 2.0], E_W, E_H, max_iter=300, gram_tol=None)
    assert not res.converged.any()
    assert (res.kkt > 1e-2).all()
    # The Newton polish works with both budgets sqrt(E_W E_H), on the problem's scale.
    polished = lpm.solve([3.0, 1.0, 1.0, 2.0], E_W, E_H, max_iter=300)
    assert polished.converged.all() and (polished.kkt <= 1e-8).all()


def test_kkt_residual_is_scale_free():
    res = lpm.solve([3.0, 1.0, 1.0, 2.0], 1.0, 5.0, max_iter=300, tol=0.0, ftol=0.0, gram_tol=None)
    base, lam = lpm.kkt_residual(res.W, res.H, res.weights, 1.0, 5.0)
    assert 1e-12 < base.item() < 1e-3  # not yet converged: the comparison below is not 0 == 0
    # Only E_W E_H matters: (E_W, E_H) -> (a E_W, E_H / a) with W, H rescaled ...
    for a in (1e-8, 1e8):
        moved, _ = lpm.kkt_residual(res.W * a**0.5, res.H / a**0.5, res.weights, a, 5.0 / a)
        assert moved.item() == pytest.approx(base.item(), rel=1e-4)
    # ... and so does a common factor on the loss weights (the multipliers scale with it).
    scaled, lam2 = lpm.kkt_residual(res.W, res.H, 1e6 * res.weights, 1.0, 5.0)
    assert scaled.item() == pytest.approx(base.item(), rel=1e-4)
    assert torch.allclose(lam2, 1e6 * lam, rtol=1e-9)


def test_kkt_tol():
    res = lpm.solve([3.0, 1.0, 1.0, 2.0], 1.0, 5.0, kkt_tol=0.0)
    assert not res.converged.any() and res.kkt.item() > 0
    with pytest.raises(ValueError, match="Expected `kkt_tol` to be a non-negative finite number"):
        lpm.solve([1.0, 1.0], kkt_tol=float("nan"))


def test_inputs_that_require_grad_are_detached():
    res = lpm.solve([2.0, 1.0, 1.0], 1.0, 1.0)
    W, H = res.W.clone().requires_grad_(), res.H.clone().requires_grad_()
    kkt, lam = lpm.kkt_residual(W, H, res.weights, 1.0, 1.0)
    assert not kkt.requires_grad and not lam.requires_grad
    stats = lpm.minority_stats(W, torch.tensor([False, True, True]))
    assert not any(v.requires_grad for v in stats.values())


def test_numpy_integers_and_reals_are_accepted():
    np = pytest.importorskip("numpy")
    assert lpm.simplex_etf(np.int64(4), np.int32(5)).shape == (4, 5)
    res = lpm.solve([1.0, 1.0, 1.0], np.float32(1.0), dim=np.int64(3), max_iter=np.int64(2000), chunk=np.int16(50))
    assert res.W.shape == (1, 3, 3) and res.converged.all()
    assert lpm.balanced_prediction(np.int64(3), np.int64(1), np.float32(2.0))["norm_H"] == pytest.approx(2**0.5)
    with pytest.raises(ValueError, match=r"Expected `K_A` in \[1, K - 2\]"):
        lpm.estimate_threshold(np.int64(4), np.int64(3))
    for bad in (4.0, True, np.bool_(True), np.float64(4.0)):
        with pytest.raises(ValueError, match="Expected `K` to be a positive int"):
            lpm.simplex_etf(bad)
    with pytest.raises(ValueError, match="Expected `E_W` to be a positive finite number"):
        lpm.balanced_prediction(3, True)


def test_zipf_k60_batched_and_large_paths_agree_and_pin_down_the_geometry():
    """The issue's profile n_k = 1000 / (1 + k)^1.2, K = 60, E_W = 1, E_H = 8: projected
    gradients alone stop at the iteration cap with the objective right and the Gram matrix
    off by ~3e-4; the Newton polish of ``solve`` (default gram_tol) and ``solve_large`` both
    certify the Grams to 1e-6 of the largest squared norm, and agree."""
    K = 60
    counts = 1000 / (1 + torch.arange(K, dtype=torch.float64)) ** 1.2
    small = lpm.solve(counts, 1.0, 8.0, max_iter=5000)
    large = lpm.solve_large(counts, 1.0, 8.0)
    for res in (small, large):
        assert res.converged.all() and float(res.kkt[0]) <= 1e-8 and float(res.gram_error[0]) <= 1e-6
    assert float(small.objective[0]) == pytest.approx(float(large.objective[0]), rel=1e-10)
    kkt_small, _ = lpm.kkt_residual(small.W, small.H, small.weights, 1.0, 8.0)
    kkt_large, _ = lpm.kkt_residual(large.W, large.H, large.weights, 1.0, 8.0)
    assert float(kkt_small[0]) <= 1e-8 and float(kkt_large[0]) <= 1e-8
    for gram in ("gram_W", "gram_H"):
        a, b = getattr(small, gram)[0], getattr(large, gram)[0]
        assert float((a - b).abs().max() / b.diagonal().max()) < 4e-6, gram
    assert float((small.cos_W[0] - large.cos_W[0]).abs().max()) < 1e-4
