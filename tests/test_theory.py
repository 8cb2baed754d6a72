import math

import pytest
import torch

from collapse_ext import lpm, theory


def _gram_cosine(A: torch.Tensor, B: torch.Tensor) -> float:
    return float((A * B).sum() / (A.norm() * B.norm()))


def _ufm_ce(counts, lam, seed=0):
    """L-BFGS on the CE unconstrained-features model with weight decay lam (class-collapsed)."""
    n = torch.tensor(counts, dtype=torch.float64)
    K = n.numel()
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(K, K, generator=g, dtype=torch.float64).requires_grad_()
    H = torch.randn(K, K, generator=g, dtype=torch.float64).requires_grad_()
    opt = torch.optim.LBFGS(
        [W, H], max_iter=5000, tolerance_grad=1e-12, tolerance_change=0, history_size=50, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        Z = H @ W.T
        ce = (n * (torch.logsumexp(Z, 1) - Z.diagonal())).sum() / n.sum()
        f = ce + lam / 2 * ((W * W).sum() + (n[:, None] * H * H).sum())
        f.backward()
        return f

    opt.step(closure)
    return W.detach(), H.detach()


def _ufm_mse(counts, lam, depth, seed=0):
    """L-BFGS on the deep-linear MSE UFM of Dang et al. (2023), class-collapsed features."""
    n = torch.tensor(counts, dtype=torch.float64)
    K, N = n.numel(), n.sum()
    g = torch.Generator().manual_seed(seed)
    Ws = [(0.5 * torch.randn(K, K, generator=g, dtype=torch.float64)).requires_grad_() for _ in range(depth)]
    H = (0.5 * torch.randn(K, K, generator=g, dtype=torch.float64)).requires_grad_()
    opt = torch.optim.LBFGS(
        [*Ws, H],
        max_iter=20000,
        tolerance_grad=1e-14,
        tolerance_change=0,
        history_size=50,
        line_search_fn="strong_wolfe",
    )
    eye = torch.eye(K, dtype=torch.float64)

    def product():
        P = Ws[0]
        for Wl in Ws[1:]:
            P = Wl @ P
        return P

    def closure():
        opt.zero_grad()
        fit = (n[:, None] * (H @ product().T - eye) ** 2).sum() / (2 * N)
        f = fit + lam / 2 * sum((Wl * Wl).sum() for Wl in Ws) + lam / 2 * (n[:, None] * H * H).sum()
        f.backward()
        return f

    opt.step(closure)
    return product().detach(), H.detach()


# ----------------------------------------------------------------------------- SELI


@pytest.mark.parametrize("K", [3, 5, 8])
def test_seli_balanced_is_the_simplex_etf(K):
    g = theory.predict([7] * K, "seli")
    etf = lpm.simplex_etf(K)
    assert (g.gram_W - etf @ etf.T).abs().max() < 1e-12
    assert (g.cos_H - etf @ etf.T).abs().max() < 1e-12
    assert (g.norms_W - 1).abs().max() < 1e-12


def test_seli_logits_are_the_simplex_encoded_labels():
    counts = torch.tensor([30.0, 10.0, 4.0, 1.0, 1.0])
    W, H = theory.seli(counts)
    K = counts.numel()
    assert (H @ W.T - (torch.eye(K, dtype=torch.float64) - 1 / K)).abs().max() < 1e-12
    # G_W = (Z Z^T)^{1/2} for the sample-level Z = (I - 11^T/K) Y.
    Y = torch.nn.functional.one_hot(torch.repeat_interleave(torch.arange(K), counts.long()), K).double().T
    Z = (torch.eye(K, dtype=torch.float64) - 1 / K) @ Y
    evals, evecs = torch.linalg.eigh(Z @ Z.T)
    root = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
    assert (W @ W.T - root).abs().max() < 1e-10
    g = theory.predict(counts, "seli")
    logits = g.logits / g.logits[0, 0]
    assert (logits - (torch.eye(K, dtype=torch.float64) - 1 / K) / (1 - 1 / K)).abs().max() < 1e-12


@pytest.mark.parametrize("counts", [[10, 10, 1, 1], [20, 5, 5, 2, 1]])
def test_vanishing_regularisation_approaches_seli(counts):
    P = theory.predict(counts, "seli")
    cos = []
    for lam in (1e-2, 1e-4):
        W, H = _ufm_ce(counts, lam)
        cos.append((_gram_cosine(W @ W.T, P.gram_W), _gram_cosine(H @ H.T, P.gram_H)))
    assert min(cos[1]) >= 0.99
    assert cos[1][0] > cos[0][0] and cos[1][1] > cos[0][1]  # closer as lambda -> 0
    # The ETF is not the answer: the test can fail.
    assert _gram_cosine(W @ W.T, theory.predict(counts, "etf").gram_W) < cos[1][0] - 1e-3


# ----------------------------------------------------------------------------- UFM-MSE


@pytest.mark.parametrize(("depth", "lam"), [(1, 0.0184), (2, 0.01), (3, 0.01)])
def test_ufm_mse_closed_form_matches_numerical_optimum(depth, lam):
    counts = [100, 50, 20, 2]
    row_sq, mean_sq = theory.ufm_mse_norms(counts, lam, lam, depth)
    assert row_sq[-1] == 0 and (row_sq[:-1] > 0).all()  # the smallest class is below its threshold
    P, H = _ufm_mse(counts, lam, depth)
    assert (P.norm(dim=1) - row_sq.sqrt()).abs().max() < 1e-4
    assert (H.norm(dim=1) - mean_sq.sqrt()).abs().max() < 1e-4
    G = theory.predict(counts, "ufm-mse", lambda_W=lam, lambda_H=lam, depth=depth)
    assert theory.compare(theory.Geometry.from_weights(P, H), G)["gram_W_distance"] < 1e-4


def test_ufm_mse_threshold_moves_with_regularisation():
    row_sq, _ = theory.ufm_mse_norms([100, 50, 20, 2], 1e-4, 1e-4, 2)
    assert (row_sq > 0).all()
    row_sq, _ = theory.ufm_mse_norms([100, 50, 20, 2], 1.0, 1.0, 2)
    assert (row_sq == 0).all()


# ----------------------------------------------------------------------------- LPM at large K


@pytest.mark.parametrize(
    ("counts", "E_W", "E_H", "loss"),
    [
        ([8.0, 8.0, 3.0, 1.0, 1.0, 1.0], 1.0, 5.0, "ce"),
        ([50.0, 20.0, 10.0, 5.0, 2.0, 1.0, 1.0, 1.0], 4.0, 0.5, "ce"),
        ([8.0, 4.0, 2.0, 1.0], 0.5, 0.8, "mse"),
    ],
)
def test_solve_large_agrees_with_the_batched_solver(counts, E_W, E_H, loss):
    small = lpm.solve(counts, E_W, E_H, loss=loss, tol=1e-10)
    large = lpm.solve_large(counts, E_W, E_H, loss=loss)
    assert small.converged.all() and large.converged.all()
    assert float(large.kkt[0]) <= 1e-8 and float(large.gram_error[0]) <= 1e-6
    assert float(large.objective[0]) == pytest.approx(float(small.objective[0]), rel=1e-9, abs=1e-12)
    kkt, _ = lpm.kkt_residual(large.W, large.H, large.weights, E_W, E_H, loss)
    assert float(kkt[0]) == pytest.approx(float(large.kkt[0]), rel=1e-6, abs=1e-14)
    scale = float(small.gram_W[0].diagonal().max())
    assert (large.gram_W[0] - small.gram_W[0]).abs().max() / scale < 1e-4
    assert (large.norms_W[0] ** 2).mean() == pytest.approx(E_W, rel=1e-9)
    assert (large.norms_H[0] ** 2).mean() == pytest.approx(E_H, rel=1e-9)


def test_solve_large_pins_down_the_geometry_on_a_zipf_profile():
    K = 16
    counts = 1000 / (1 + torch.arange(K, dtype=torch.float64)) ** 1.2
    res = lpm.solve_large(counts, 1.0, 8.0)
    assert res.converged.all() and float(res.gram_error[0]) <= 1e-6 and float(res.kkt[0]) <= 1e-8
    assert 0 < res.lbfgs_seconds <= res.seconds and res.cg_iterations > 0 and res.flops > 0
    again = lpm.solve_large(counts, 2.0, 4.0, seed=1)  # other start, same product
    scale = float(res.gram_W[0].diagonal().max())
    cos = (again.cos_W[0] - res.cos_W[0]).abs().max()
    assert cos < 1e-5 and (again.gram_W[0] * 0.5 - res.gram_W[0]).abs().max() / scale < 1e-5


def test_solve_large_bad_input():
    with pytest.raises(ValueError, match="E_W \\* E_H < 1"):
        lpm.solve_large([2, 1, 1], 1.0, 2.0, loss="mse")
    with pytest.raises(ValueError, match="`counts` to be \\(K,\\)"):
        lpm.solve_large([[2, 1, 1]], 1.0, 2.0)
    with pytest.raises(ValueError, match="`loss`"):
        lpm.solve_large([2, 1, 1], loss="hinge")
    with pytest.raises(ValueError, match="`init` to be two finite nonzero \\(3, 3\\)"):
        lpm.solve_large([2, 1, 1], init=(torch.zeros(3, 3), torch.ones(3, 3)))
    with pytest.raises(ValueError, match="`init` to be a pair"):
        lpm.solve_large([2, 1, 1], init=torch.ones(3, 3))


# ----------------------------------------------------------------------------- predict / compare


def test_predict_lpm_balanced_is_the_etf():
    g = theory.predict([3] * 5, "lpm-ce", E_W=1.0, E_H=2.0)
    etf = theory.predict([3] * 5, "etf", E_W=1.0, E_H=2.0)
    assert g.info["converged"] and (g.gram_W - etf.gram_W).abs().max() < 1e-6
    assert (g.gram_H - etf.gram_H).abs().max() < 1e-6


def test_compare_is_rotation_invariant_and_detects_differences():
    counts = torch.tensor([20.0, 5.0, 5.0, 2.0, 1.0])
    W, H = theory.seli(counts)
    Q, _ = torch.linalg.qr(torch.randn(7, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    pad = lambda X: torch.nn.functional.pad(X, (0, 2))  # noqa: E731
    measured = theory.Geometry.from_weights(3 * pad(W) @ Q, 0.5 * pad(H) @ Q, counts=counts)
    out = theory.compare(measured, theory.predict(counts, "seli"))
    assert out["gram_W_distance"] < 1e-12 and out["gram_H_distance"] < 1e-12
    assert out["norm_corr_W"] == pytest.approx(1.0) and abs(out["minority_cos_gap"]) < 1e-12
    other = theory.compare(measured, theory.predict(counts, "etf"))
    assert other["gram_W_distance"] > 0.05 and other["minority_cos_gap"] > 0.05
    assert math.isnan(other["norm_corr_W"])  # the ETF's norms are constant


def test_predict_bad_input():
    with pytest.raises(ValueError, match="`model`"):
        theory.predict([1, 2], "svm")
    with pytest.raises(ValueError, match="lambda_W"):
        theory.predict([1, 2], "ufm-mse")
    with pytest.raises(ValueError, match="Unexpected parameters"):
        theory.predict([1, 2], "seli", depth=2)
    with pytest.raises(ValueError, match="same shape"):
        theory.Geometry.from_weights(torch.zeros(3, 2), torch.zeros(3, 3))
