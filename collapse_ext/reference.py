"""Plain float64 PyTorch references for every fused op.

They are the ground truth of the tests and the "what a user would write" baseline of the
benchmarks: straightforward, materialising whatever they need, computed in float64.
"""

from __future__ import annotations

import torch

__all__ = ["class_stats_reference", "lpm_objective_grad_reference", "lpm_step_reference", "within_scatter_reference"]


def class_stats_reference(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Counts (K,) int64, means (K, d) float64, sqdev (K,) float64 by index_add in float64."""
    x = features.double()
    y = labels.long()
    keep = (y >= 0) & (y < num_classes)
    x, y = x[keep], y[keep]
    counts = torch.bincount(y, minlength=num_classes)
    sums = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, device=x.device)
    sums.index_add_(0, y, x)
    means = sums / counts.clamp_min(1).unsqueeze(1)
    centred = x - means[y]
    sqdev = torch.zeros(num_classes, dtype=torch.float64, device=x.device)
    sqdev.index_add_(0, y, (centred * centred).sum(1))
    return counts, means, sqdev


def within_scatter_reference(
    features: torch.Tensor,
    labels: torch.Tensor,
    means: torch.Tensor,
    basis: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum_i (h_i - m_{y_i})(h_i - m_{y_i})^T in float64 (or B^T S B with a basis)."""
    y = labels.long()
    keep = (y >= 0) & (y < means.shape[0])
    centred = features.double()[keep] - means.double()[y[keep]]
    if basis is not None:
        centred = centred @ basis.double()
    return centred.T @ centred


def lpm_objective_grad_reference(
    W: torch.Tensor, H: torch.Tensor, weights: torch.Tensor, loss: str = "ce"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Objective (B,), grad_W (B, K, p), grad_H (B, K, p) of the class-collapsed LPM, float64.

    f = sum_k c_k L(W h_k, k) with logits z_k = W h_k (Z = H W^T, (B, K, K));
    L = logsumexp(z) - z_k ("ce") or 0.5 ||z - e_k||^2 ("mse"). dL/dz = G_k, so
    grad_W = G^T H and grad_H = G W with G = diag(c) (softmax(Z) - I) or diag(c) (Z - I).
    """
    W, H, c = W.double(), H.double(), weights.double()
    Z = H @ W.transpose(1, 2)
    eye = torch.eye(Z.shape[1], dtype=Z.dtype, device=Z.device)
    if loss == "ce":
        per_class = torch.logsumexp(Z, dim=2) - torch.diagonal(Z, dim1=1, dim2=2)
        G = c.unsqueeze(2) * (torch.softmax(Z, dim=2) - eye)
    else:
        per_class = 0.5 * ((Z - eye) ** 2).sum(2)
        G = c.unsqueeze(2) * (Z - eye)
    return (c * per_class).sum(1), G.transpose(1, 2) @ H, G @ W


def _project_ball(X: torch.Tensor, radius_sq: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each (K, p) block onto ||X||_F^2 <= radius_sq: a radial rescale."""
    norm_sq = (X * X).sum((1, 2))
    scale = torch.where(norm_sq > radius_sq, torch.sqrt(radius_sq / norm_sq), torch.ones_like(norm_sq))
    return X * scale[:, None, None]


def lpm_step_reference(
    W: torch.Tensor,
    H: torch.Tensor,
    W_prev: torch.Tensor,
    H_prev: torch.Tensor,
    theta: torch.Tensor,
    weights: torch.Tensor,
    E_W: torch.Tensor,
    E_H: torch.Tensor,
    step: torch.Tensor,
    num_iters: int,
    loss: str = "ce",
    momentum: bool = True,
) -> tuple[torch.Tensor, ...]:
    """``num_iters`` projected-gradient iterations of the class-collapsed LPM, in float64.

    The same iteration as the fused ``lpm_step`` op (see its docstring), written as a
    plain batched PyTorch loop; results are cast back to the dtype of ``W``.
    Returns (W, H, W_prev, H_prev, theta, objective, pg_norm).
    """
    dtype = W.dtype
    W, H, Wp, Hp, theta, c, eta = (t.double() for t in (W, H, W_prev, H_prev, theta, weights, step))
    K = W.shape[1]
    rw, rh = K * E_W.double(), K * E_H.double()
    eta3 = eta[:, None, None]
    for _ in range(num_iters):
        if momentum:
            theta_next = (1 + torch.sqrt(1 + 4 * theta * theta)) / 2
            beta = ((theta - 1) / theta_next)[:, None, None]
            YW, YH = W + beta * (W - Wp), H + beta * (H - Hp)
        else:
            YW, YH = W, H
        _, gW, gH = lpm_objective_grad_reference(YW, YH, c, loss)
        NW, NH = _project_ball(YW - eta3 * gW, rw), _project_ball(YH - eta3 * gH, rh)
        if momentum:
            dot = ((YW - NW) * (NW - W)).sum((1, 2)) + ((YH - NH) * (NH - H)).sum((1, 2))
            theta = torch.where(dot > 0, torch.ones_like(theta), theta_next)
        Wp, Hp, W, H = W, H, NW, NH
    objective, gW, gH = lpm_objective_grad_reference(W, H, c, loss)
    DW, DH = W - _project_ball(W - eta3 * gW, rw), H - _project_ball(H - eta3 * gH, rh)
    pg_norm = torch.sqrt((DW * DW).sum((1, 2)) + (DH * DH).sum((1, 2))) / eta
    return tuple(t.to(dtype) for t in (W, H, Wp, Hp, theta, objective, pg_norm))
