"""The Layer-Peeled Model itself (SPEC: "Layer-Peeled Model"; Fang, He, Long & Su 2021):
objective and gradient, the projection onto the norm constraints, a Lipschitz bound of the
gradient, the scale-free KKT residual, and the closed-form balanced optimum (simplex ETF)."""

from __future__ import annotations

import math

import torch

from .._validate import choice, positive_float, positive_int

__all__ = ["LOSSES", "balanced_prediction", "kkt_residual", "lipschitz_bound", "objective_grad", "simplex_etf"]

LOSSES = ("ce", "mse")


def simplex_etf(K: int, d: int | None = None, *, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """(K, d) unit rows with pairwise cosine -1/(K-1): a simplex equiangular tight frame.

    The rows of sqrt(K/(K-1)) (I - 11^T/K) expressed in an orthonormal basis of their
    (K-1)-dimensional span, zero-padded to d >= K - 1 (default d = K).
    """
    K = positive_int(K, "K")
    if K < 2:
        raise ValueError(f"Expected `K` to be at least 2, got {K}")
    d = K if d is None else positive_int(d, "d")
    if d < K - 1:
        raise ValueError(f"Expected `d` >= K - 1 = {K - 1} (no simplex ETF fits in fewer dimensions), got {d}")
    M = math.sqrt(K / (K - 1)) * (torch.eye(K, dtype=torch.float64) - 1.0 / K)
    U, S, _ = torch.linalg.svd(M)
    coords = U[:, : K - 1] * S[: K - 1]
    out = torch.zeros(K, d, dtype=torch.float64)
    out[:, : K - 1] = coords
    return out.to(device=device, dtype=dtype)


def balanced_prediction(K: int, E_W: float = 1.0, E_H: float = 1.0, loss: str = "ce") -> dict[str, float]:
    """Closed-form optimum of the balanced class-collapsed LPM (p >= K - 1 for CE, p >= K for MSE).

    CE (Fang et al. 2021, Thm 3): simplex ETF, ||w_k|| = sqrt(E_W), ||h_k|| = sqrt(E_H),
    h_k parallel to w_k, objective log(1 + (K-1) exp(-rho K/(K-1))) with rho = sqrt(E_W E_H).
    MSE (no bias), E_W E_H < 1: orthogonal frame, objective 0.5 (1 - rho)^2.
    """
    choice(loss, "loss", LOSSES)
    E_W, E_H = positive_float(E_W, "E_W"), positive_float(E_H, "E_H")
    rho = math.sqrt(E_W * E_H)
    if loss == "ce":
        cosine = -1.0 / (K - 1)
        objective = math.log1p((K - 1) * math.exp(-rho * K / (K - 1)))
    else:
        if rho >= 1:
            raise ValueError(f"MSE optimum is not unique for E_W * E_H >= 1, got {E_W * E_H!r}")
        cosine, objective = 0.0, 0.5 * (1.0 - rho) ** 2
    return {"cosine": cosine, "norm_W": math.sqrt(E_W), "norm_H": math.sqrt(E_H), "objective": objective}


def objective_grad(
    W: torch.Tensor, H: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, loss: str = "ce"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """f = sum_i c_i L(W h_i, y_i) and its gradients, in the dtype of W.

    W (B, K, p) classifier rows; H (B, N, p) feature rows of classes labels (N,) int64;
    weights (B, N) or (N,) the loss weights c_i. L = logsumexp(z) - z_y ("ce") or
    0.5 ||z - e_y||^2 ("mse") of the logits z = W h. The class-collapsed model is N = K,
    labels = arange(K). Returns objective (B,), grad_W (B, K, p), grad_H (B, N, p).
    """
    Z = H @ W.transpose(1, 2)
    y = labels.view(1, -1, 1).expand(Z.shape[0], -1, 1)
    onehot = torch.zeros_like(Z).scatter_(2, y, 1.0)
    if loss == "ce":
        per_row = torch.logsumexp(Z, 2) - Z.gather(2, y).squeeze(2)
        G = torch.softmax(Z, 2) - onehot
    else:
        per_row = 0.5 * ((Z - onehot) ** 2).sum(2)
        G = Z - onehot
    c = weights.expand(Z.shape[0], -1)
    G = G * c.unsqueeze(2)
    return (per_row * c).sum(1), G.transpose(1, 2) @ H, G @ W


def project(X: torch.Tensor, radius_sq: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each block X[b] onto ||X[b]||_F^2 <= radius_sq[b]: a radial rescale."""
    norm_sq = (X * X).flatten(1).sum(1)
    scale = torch.where(norm_sq > radius_sq, torch.sqrt(radius_sq / norm_sq), torch.ones_like(norm_sq))
    return X * scale.view(-1, *([1] * (X.dim() - 1)))


def lipschitz_bound(
    weights: torch.Tensor, E_W: torch.Tensor, E_H: torch.Tensor, loss: str = "ce", feature_sq_max=None
) -> torch.Tensor:
    """(B,) upper bound on the Lipschitz constant of grad f over the feasible set.

    With z_k = W h_k, the Hessian of f along (dW, dH) is
    sum_k c_k [dz_k^T (d^2L) dz_k + 2 g_k^T dW dh_k], dz_k = dW h_k + W dh_k, g_k = dL/dz_k.
    ||d^2L|| <= lam (1/2 for CE, 1 for MSE) and ||dW h + W dh||^2 <= 2(||dW||^2 ||h||^2 +
    ||W||_2^2 ||dh||^2) bound the first term by 2 lam c_max K max(E_W, E_H); Cauchy-Schwarz
    bounds the second by g_max ||c||_2, with g_max = sqrt(2) (CE) or
    sqrt(K E_W * feature_sq_max) + 1 (MSE; feature_sq_max bounds ||h_k||^2, K E_H here).
    """
    c = weights.double()
    K = c.shape[1]
    E_W, E_H = E_W.double(), E_H.double()
    lam = 0.5 if loss == "ce" else 1.0
    feature_sq_max = K * E_H if feature_sq_max is None else feature_sq_max
    g_max = math.sqrt(2.0) if loss == "ce" else torch.sqrt(K * E_W * feature_sq_max) + 1.0
    return 2 * lam * c.max(1).values * K * torch.maximum(E_W, E_H) + g_max * c.norm(dim=1)


def kkt_residual(W: torch.Tensor, H: torch.Tensor, weights: torch.Tensor, E_W, E_H, loss: str = "ce"):
    """Scale-free KKT residual (B,) and multipliers (B, 2) of the class-collapsed LPM at (W, H).

    Stationarity grad_W f + lam_W (2/K) W = 0 (same for H) with the least-squares
    multiplier lam = max(0, -K <grad, X> / (2 ||X||^2)) (returned in the units of the
    problem). The residual is measured in the variables X^ = X / sqrt(K E_X), whose
    constraint is the unit ball, and divided by the problem's gradient scale
    S = K sqrt(E_W E_H) ||c||_2 (a bound on ||grad f|| there, up to the loss's bound on
    dL/dz): the norm of (stationarity residuals / S, mu * constraint / S, constraint
    violation) with mu = lam E_X and the constraint ||X^||^2 - 1. So it is dimensionless,
    unchanged by a rescaling of the loss weights c and by (E_W, E_H) -> (a E_W, E_H / a)
    with W, H rescaled accordingly; float64.
    """
    W, H = W.detach().double(), H.detach().double()
    K = W.shape[1]
    c = weights.detach().double()
    _, gW, gH = objective_grad(W, H, torch.arange(K, device=W.device), c, loss)
    tiny = torch.finfo(torch.float64).tiny
    levels = [torch.as_tensor(e, dtype=torch.float64, device=W.device) for e in (E_W, E_H)]
    scale = (K * torch.sqrt(levels[0] * levels[1]) * c.norm(dim=-1)).clamp_min(tiny)
    parts, lams = [], []
    for X, g, level in ((W, gW, levels[0]), (H, gH, levels[1])):
        norm_sq = (X * X).sum((1, 2))
        lam = (-K * (g * X).sum((1, 2)) / (2 * norm_sq.clamp_min(tiny))).clamp_min(0)
        stationarity = ((g + (2 * lam / K)[:, None, None] * X) ** 2).sum((1, 2)) * (K * level)
        constraint = norm_sq / (K * level) - 1.0
        parts += [stationarity / scale**2, (lam * level * constraint / scale) ** 2, constraint.clamp_min(0) ** 2]
        lams.append(lam)
    return torch.sqrt(sum(parts)), torch.stack(lams, 1)
