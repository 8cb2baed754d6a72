"""The per-sample Layer-Peeled Model (SPEC: every sample its own feature vector), solved
for one small instance by the plain-PyTorch iteration of the solver: its optimum is
class-collapsed, which the tests check against :func:`~collapse_ext.lpm.solver.solve`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .._validate import class_sizes, positive_float, positive_int
from .problem import lipschitz_bound, objective_grad
from .solver import _iterate, _random_block, apg_iterations, loop_options

__all__ = ["FullLPMResult", "solve_full"]


@dataclass
class FullLPMResult:
    """Solution of the per-sample LPM: W (K, p), H (N, p) with labels (N,) int64.

    within_spread = max_i ||h_i - mean_{y_i}|| / mean_k ||mean_k||: 0 means the features
    are class-collapsed (NC1 = 0 inside the LPM). class_means (K, p).
    """

    W: torch.Tensor
    H: torch.Tensor
    labels: torch.Tensor
    objective: float
    pg_norm: float
    iterations: int
    converged: bool
    class_means: torch.Tensor = field(repr=False)
    within_spread: float = 0.0


def solve_full(
    counts,
    E_W: float = 1.0,
    E_H: float = 1.0,
    *,
    dim: int | None = None,
    loss: str = "ce",
    loss_weights=None,
    method: str = "apgd",
    max_iter: int = 20000,
    tol: float = 1e-8,
    ftol: float | None = None,
    chunk: int = 100,
    seed: int = 0,
    device=None,
    dtype: torch.dtype = torch.float64,
) -> FullLPMResult:
    """Solve the per-sample LPM of SPEC for one small instance (plain PyTorch).

    minimise (1/N) sum_k sum_{i<=n_k} lw_k L(W h_ki, k) s.t. (1/K) sum ||w_k||^2 <= E_W,
    (1/K) sum_k (1/n_k) sum_i ||h_ki||^2 <= E_H; counts (K,) positive ints.
    In the variables u_ki = h_ki / sqrt(n_k) the feature constraint is a ball, so the
    projection stays a radial rescale; the iteration is otherwise that of ``solve``.
    """
    max_iter, chunk, tol, ftol = loop_options(loss, method, max_iter, chunk, tol, ftol, dtype)
    n = class_sizes(counts)
    if n.dim() != 1 or (n != n.round()).any() or (n <= 0).any():
        raise ValueError(f"Expected `counts` to be (K,) positive integers for solve_full, got {counts!r}")
    E_W, E_H = positive_float(E_W, "E_W"), positive_float(E_H, "E_H")
    K = n.shape[0]
    p = K if dim is None else positive_int(dim, "dim")
    lw = torch.ones(K, dtype=torch.float64) if loss_weights is None else torch.as_tensor(loss_weights).double()
    if lw.shape != (K,) or not torch.isfinite(lw).all() or (lw < 0).any():
        raise ValueError(f"Expected `loss_weights` to be (K,) finite and non-negative, got {loss_weights!r}")
    device = torch.device("cpu") if device is None else torch.device(device)
    labels = torch.repeat_interleave(torch.arange(K), n.long())
    N = labels.numel()
    sample_w = (lw / N)[labels].to(device, dtype)
    scale = torch.sqrt(n)[labels].to(device, dtype)
    y = labels.to(device)

    def grad_in_u(W, U):
        f, gW, gH = objective_grad(W, U * scale[None, :, None], y, sample_w, loss)
        return f, gW, gH * scale[None, :, None]

    ew = torch.tensor([E_W], dtype=torch.float64)
    eh = torch.tensor([E_H], dtype=torch.float64)
    radii = (torch.tensor([K * E_W], dtype=dtype, device=device), torch.tensor([K * E_H], dtype=dtype, device=device))
    weights = (n * lw / N).unsqueeze(0)
    step = 1.0 / lipschitz_bound(weights, ew, eh, loss, feature_sq_max=n.max() * K * eh)

    def stepper(X, Xp, theta, eta, _consts, iters):
        return apg_iterations(grad_in_u, X, Xp, theta, eta, radii, iters, method == "apgd")

    gen = torch.Generator().manual_seed(int(seed))
    W0 = _random_block(gen, (1, K, p), ew, dtype, device)
    U0 = _random_block(gen, (1, N, p), eh * K / N, dtype, device)
    (W, U), _, _, _, objective, pg, iterations, converged = _iterate(
        stepper,
        (W0, U0),
        (W0, U0),
        torch.ones(1, dtype=dtype, device=device),
        step.to(device, dtype),
        (),
        max_iter=max_iter,
        tol=tol,
        ftol=ftol,
        chunk=chunk,
    )
    H = (U * scale[None, :, None])[0]
    means = torch.zeros(K, p, dtype=dtype, device=device).index_add_(0, y, H) / n.to(device, dtype)[:, None]
    spread = (H - means[y]).norm(dim=1).max() / means.norm(dim=1).mean().clamp_min(torch.finfo(dtype).tiny)
    return FullLPMResult(
        W=W[0],
        H=H,
        labels=y,
        objective=float(objective[0]),
        pg_norm=float(pg[0]),
        iterations=int(iterations[0]),
        converged=bool(converged[0]),
        class_means=means,
        within_spread=float(spread),
    )
