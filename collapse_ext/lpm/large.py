"""Large-K solver of the class-collapsed Layer-Peeled Model (SPEC: "Layer-Peeled Model").

    minimise  f(W, H) = sum_k c_k L(W h_k, k)
    s.t.      (1/K) ||W||_F^2 <= E_W,   (1/K) ||H||_F^2 <= E_H,

the problem of ``lpm.solve`` (c_k = n_k / N times an optional loss weight, L cross entropy
or squared error to one-hot targets, W and H (K, p)), for one instance at K up to 1000+.

Why a second solver: ``lpm.solve`` runs projected gradient steps with one step size for
both blocks; at large K or E_W far from E_H it needs tens of thousands of iterations, and
its stopping rule (small gradient mapping or objective change) can leave the geometry
wrong by 1e-3 while the objective is right to 1e-7 (flat directions). Here:

1. Only E_W E_H matters (W -> a W, H -> H / a), so the problem is solved with both
   budgets rho = sqrt(E_W E_H) and rescaled at the end. Both constraints are active at the
   optimum (CE: scaling the logits of an optimum up lowers the loss; MSE with rho < 1: the
   target I lies outside the reachable set), so the feasible set is the product of the
   two spheres ||W||_F^2 = ||H||_F^2 = K rho.
2. L-BFGS (``torch.optim.LBFGS``, strong Wolfe line search) on the unconstrained
   parametrisation W = r U / ||U||_F, H = r V / ||V||_F, r = sqrt(K rho), in float64,
   until the KKT residual is below ``switch_tol``.
3. Riemannian Newton polish on the sphere product (Absil, Mahony & Sepulchre 2008,
   Sec. 6): each step solves Hess f [d] = -grad f on the tangent space by conjugate
   gradients preconditioned with the diagonal of the Euclidean Hessian plus the
   multiplier (Jacobi), then retracts by normalising each block. The Hessian-vector
   product is exact and costs six K x K x p GEMMs; a gradient costs three.

Every iteration is a handful of (batched) matmuls, on the CPU or a CUDA device.

Stopping rule (a bound on the geometry, not only on the objective): the scale-free KKT
residual (``lpm.kkt_residual``) <= ``tol`` and ``gram_error`` <= ``gram_tol``, where
gram_error is the first-order change of the Gram matrices W W^T and H H^T along the last
full Newton step d (dX X^T + X dX^T), max-abs divided by the largest squared row norm.
Near a non-degenerate optimum (up to rotation) Newton converges quadratically, so the
distance of the pre-step iterate to the optimum is the step itself up to second order:
gram_error bounds the Gram error of the returned point (which is one more step closer).
The first-order change is blind to rotations X -> X (I + A), A skew, the flat directions
of the Hessian (f is rotation invariant), along which a step from a point at rounding
level of stationarity can be long while the Grams do not change.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from .._validate import choice, class_sizes, positive_float, positive_int
from .problem import kkt_residual
from .solver import LPMResult, _random_block

__all__ = ["LargeLPMResult", "solve_large"]

_LOSSES = ("ce", "mse")


@dataclass
class LargeLPMResult(LPMResult):
    """``LPMResult`` (batch of one) plus the large-K solver's records.

    gram_error (1,) (an ``LPMResult`` field): the Gram-change bound of the stopping rule
    (module docstring); newton_steps (1,) int64: Newton steps taken (``iterations`` counts
    the L-BFGS ones);
    cg_iterations: total Hessian-vector products; flops: GEMM flops spent (2 K^2 p per
    K x K x p product); seconds: wall time; lbfgs_seconds: wall time when the L-BFGS phase
    ended (at KKT <= ``switch_tol``, unless it ran out of iterations).
    """

    newton_steps: torch.Tensor | None = None
    cg_iterations: int = 0
    flops: float = 0.0
    seconds: float = 0.0
    lbfgs_seconds: float = 0.0


class _Problem:
    """f, its gradient and exact Hessian-vector products for fixed weights c (K,)."""

    def __init__(self, c: torch.Tensor, loss: str, radius_sq: float):
        self.c, self.loss, self.r2 = c, loss, radius_sq
        self.K = c.shape[0]
        self.gemms = 0

    def state(self, W, H):
        """Objective, Euclidean gradients and what the Hessian products reuse."""
        Z = H @ W.T
        self.gemms += 1
        eye_diag = torch.diagonal(Z)
        if self.loss == "ce":
            S = torch.softmax(Z, dim=1)
            per = torch.logsumexp(Z, dim=1) - eye_diag
            G = S.clone()
        else:
            S = None
            per = 0.5 * ((Z * Z).sum(1) - 2 * eye_diag + 1)
            G = Z.clone()
        G.diagonal().sub_(1)
        G.mul_(self.c[:, None])
        gW, gH = G.T @ H, G @ W
        self.gemms += 2
        return (self.c * per).sum(), gW, gH, G, S

    def hvp(self, W, H, G, S, dW, dH):
        """Euclidean Hessian of f at (W, H) applied to (dW, dH)."""
        dZ = dH @ W.T + H @ dW.T
        if self.loss == "ce":
            dZ = S * (dZ - (S * dZ).sum(1, keepdim=True))
        dG = dZ.mul_(self.c[:, None])
        self.gemms += 6
        return dG.T @ H + G.T @ dH, dG @ W + G @ dW

    def diagonal(self, W, H, S):
        """Diagonal of the Euclidean Hessian, blocks (K, p) each (the Jacobi preconditioner)."""
        D = S * (1 - S) if self.loss == "ce" else torch.ones_like(W[:, :1]).expand(self.K, self.K)
        D = D * self.c[:, None]
        self.gemms += 2
        return D.T @ (H * H), D @ (W * W)


def _tangent(X, V, r2):
    return V - ((V * X).sum() / r2) * X


def _normalise(X, r):
    return X * (r / X.norm())


def _gram_change(blocks, steps) -> float:
    """max over the blocks X (K, p) and their steps dX of |dX X^T + X dX^T|_max / max_k ||x_k||^2."""
    out = 0.0
    for X, dX in zip(blocks, steps):
        change = dX @ X.T
        scale = float((X * X).sum(1).max().clamp_min(torch.finfo(X.dtype).tiny))
        out = max(out, float((change + change.T).abs().max()) / scale)
    return out


def _newton_direction(prob, W, H, gW, gH, G, S, mu, rtol, max_cg):
    """Preconditioned CG on the tangent space for Hess d = -grad (Riemannian Hessian:
    the tangent part of the Euclidean Hessian product plus mu_X d, mu_X = -<X, grad_X f> / r^2)."""
    r2 = prob.r2
    bW, bH = -_tangent(W, gW, r2), -_tangent(H, gH, r2)
    DW, DH = prob.diagonal(W, H, S)
    DW, DH = DW + mu[0], DH + mu[1]
    floor = 1e-12 * float(torch.maximum(DW.max(), DH.max()))
    DW, DH = DW.clamp_min(floor), DH.clamp_min(floor)

    def precondition(vW, vH):
        return _tangent(W, vW / DW, r2), _tangent(H, vH / DH, r2)

    dW, dH = torch.zeros_like(W), torch.zeros_like(H)
    rW, rH = bW.clone(), bH.clone()
    zW, zH = precondition(rW, rH)
    pW, pH = zW.clone(), zH.clone()
    rz = (rW * zW).sum() + (rH * zH).sum()
    b_norm = math.sqrt(float((bW * bW).sum() + (bH * bH).sum()))
    its = 0
    for its in range(1, max_cg + 1):
        hW, hH = prob.hvp(W, H, G, S, pW, pH)
        hW, hH = _tangent(W, hW, r2) + mu[0] * pW, _tangent(H, hH, r2) + mu[1] * pH
        curvature = (pW * hW).sum() + (pH * hH).sum()
        if curvature <= 0:
            if its == 1:
                dW, dH = zW, zH
            break
        alpha = rz / curvature
        dW, dH = dW + alpha * pW, dH + alpha * pH
        rW, rH = rW - alpha * hW, rH - alpha * hH
        if math.sqrt(float((rW * rW).sum() + (rH * rH).sum())) <= rtol * b_norm:
            break
        zW, zH = precondition(rW, rH)
        rz_next = (rW * zW).sum() + (rH * zH).sum()
        pW, pH = zW + (rz_next / rz) * pW, zH + (rz_next / rz) * pH
        rz = rz_next
    return dW, dH, its


def _start(init, shape: tuple[int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """``init`` = (W, H): two finite nonzero (K, p) tensors, as float64 on ``device``."""
    if not (isinstance(init, (tuple, list)) and len(init) == 2):
        raise ValueError(f"Expected `init` to be a pair (W, H) of {shape} tensors, got {type(init).__name__}")
    out = []
    for X in init:
        X = torch.as_tensor(X).detach().to(device=device, dtype=torch.float64)
        if tuple(X.shape) != shape or not bool(torch.isfinite(X).all()) or float(X.norm()) == 0.0:
            raise ValueError(f"Expected `init` to be two finite nonzero {shape} tensors, got shape {tuple(X.shape)}")
        out.append(X.clone())
    return out[0], out[1]


def _weights(counts, loss_weights) -> torch.Tensor:
    n = class_sizes(counts)
    if n.dim() != 1:
        raise ValueError(f"Expected `counts` to be (K,) for solve_large (one instance), got shape {tuple(n.shape)}")
    c = n / n.sum()
    if loss_weights is not None:
        lw = torch.as_tensor(loss_weights, dtype=torch.float64).detach().cpu()
        if lw.shape != c.shape or not torch.isfinite(lw).all() or (lw < 0).any():
            raise ValueError(
                f"Expected `loss_weights` to be ({c.shape[0]},) finite and non-negative, got {loss_weights!r}"
            )
        c = c * lw
        if c.sum() <= 0:
            raise ValueError("Expected `loss_weights` to leave a positive weight")
    return c


def solve_large(
    counts,
    E_W: float = 1.0,
    E_H: float = 1.0,
    *,
    dim: int | None = None,
    loss: str = "ce",
    loss_weights=None,
    tol: float = 1e-8,
    gram_tol: float = 1e-6,
    switch_tol: float = 1e-6,
    max_iter: int = 2000,
    max_newton: int = 30,
    max_cg: int = 500,
    seed: int = 0,
    init=None,
    device=None,
    verbose: bool = False,
) -> LargeLPMResult:
    """Solve one class-collapsed LPM at large K (module docstring for the method), float64.

    counts: (K,) class sizes (only n_k / N matters); E_W, E_H: positive budgets;
    dim: p (default K); loss: "ce" or "mse" (MSE needs E_W E_H < 1: otherwise the loss
    reaches 0 on a set of optima and no geometry is implied); loss_weights: (K,) factors on
    each class's loss term. tol: KKT residual target (same scale-free definition as
    ``lpm.kkt_residual``); gram_tol: bound on the Gram change of the last Newton step, in
    units of the largest squared row norm; switch_tol: KKT residual at which L-BFGS hands
    over to Newton; max_iter: L-BFGS iterations; max_newton, max_cg: Newton steps and CG
    iterations per step. The start is the Gaussian point of ``lpm.solve`` with the same
    seed (drawn on the CPU), or ``init`` = (W, H), two (K, p) float tensors (e.g. the
    solution for nearby budgets: a warm start), rescaled onto the constraint spheres.
    Returns a ``LargeLPMResult`` (tensors batched, B = 1);
    ``converged`` means both tolerances were met.
    """
    start = time.perf_counter()
    choice(loss, "loss", _LOSSES)
    E_W, E_H = positive_float(E_W, "E_W"), positive_float(E_H, "E_H")
    tol = positive_float(tol, "tol", allow_zero=True)
    gram_tol = positive_float(gram_tol, "gram_tol", allow_zero=True)
    switch_tol = positive_float(switch_tol, "switch_tol")
    max_iter = positive_int(max_iter, "max_iter")
    max_newton, max_cg = positive_int(max_newton, "max_newton"), positive_int(max_cg, "max_cg")
    c = _weights(counts, loss_weights)
    K = c.shape[0]
    p = K if dim is None else positive_int(dim, "dim")
    rho = math.sqrt(E_W * E_H)
    if loss == "mse" and rho >= 1:
        raise ValueError(
            f"Expected E_W * E_H < 1 for loss='mse' (the optimum is not unique otherwise), got {rho * rho!r}"
        )
    device = torch.device("cpu") if device is None else torch.device(device)
    r2 = K * rho
    r = math.sqrt(r2)
    level = torch.tensor([rho], dtype=torch.float64)
    if init is None:
        gen = torch.Generator().manual_seed(int(seed))
        W = _normalise(_random_block(gen, (1, K, p), level, torch.float64, device)[0], r)
        H = _normalise(_random_block(gen, (1, K, p), level, torch.float64, device)[0], r)
    else:
        W, H = (_normalise(X, r) for X in _start(init, (K, p), device))
    cw = c.to(device)
    prob = _Problem(cw, loss, r2)
    cw_b = cw[None]

    def kkt_of(W, H):
        prob.gemms += 3
        return float(kkt_residual(W[None], H[None], cw_b, rho, rho, loss)[0][0])

    def log(*parts: Any) -> None:
        if verbose:
            print(f"[solve_large {time.perf_counter() - start:7.1f}s]", *parts, flush=True)

    # Phase 1: L-BFGS on the unconstrained parametrisation.
    U, V = W.clone().requires_grad_(), H.clone().requires_grad_()
    opt = torch.optim.LBFGS(
        [U, V],
        lr=1,
        max_iter=20,
        history_size=20,
        tolerance_grad=0,
        tolerance_change=0,
        line_search_fn="strong_wolfe",
    )

    def closure():
        with torch.no_grad():
            nu, nv = U.norm(), V.norm()
            Wc, Hc = U * (r / nu), V * (r / nv)
            f, gW, gH, _, _ = prob.state(Wc, Hc)
            U.grad = (r / nu) * _tangent(Wc, gW, r2)
            V.grad = (r / nv) * _tangent(Hc, gH, r2)
        return f

    # A warm start may already be close enough for Newton.
    iterations, kkt = 0, kkt_of(W, H)
    while iterations < max_iter and kkt > switch_tol:
        opt.step(closure)
        iterations = opt.state[opt._params[0]]["n_iter"]
        with torch.no_grad():
            W, H = _normalise(U.detach(), r), _normalise(V.detach(), r)
        kkt = kkt_of(W, H)
        log(f"L-BFGS iteration {iterations}: KKT {kkt:.3e}")
        if kkt <= switch_tol or opt.state[opt._params[0]].get("d") is None:
            break
    W, H = W.detach().clone(), H.detach().clone()
    lbfgs_seconds = time.perf_counter() - start

    # Phase 2: Riemannian Newton-CG.
    gram_error, newton, cg_total = math.inf, 0, 0
    f, gW, gH, G, S = prob.state(W, H)
    kkt = kkt_of(W, H)
    converged = False
    while newton < max_newton:
        mu = (-(W * gW).sum() / r2, -(H * gH).sum() / r2)
        # Forcing term sqrt(KKT) (superlinear convergence), no tighter than 1e-3; once the
        # KKT target is met the direction only measures the remaining step (the Gram
        # bound), so 0.1 does: near rounding-level gradients CG stagnates, and the
        # certifying direction ran into max_cg (500 products) at K = 1000.
        rtol = 0.1 if kkt <= tol else min(0.1, max(math.sqrt(max(kkt, 0.0)), 1e-3))
        dW, dH, its = _newton_direction(prob, W, H, gW, gH, G, S, mu, rtol, max_cg)
        cg_total += its
        Wn, Hn = _normalise(W + dW, r), _normalise(H + dH, r)
        # The full Newton step estimates the distance to the optimum (module docstring).
        gram_error = _gram_change((W, H), (dW, dH))
        if kkt <= tol and gram_error <= gram_tol:
            converged = True
            kn = kkt_of(Wn, Hn)
            if kn <= max(kkt, tol):
                W, H, kkt = Wn, Hn, kn
            log(f"converged: KKT {kkt:.3e}, Gram change of the last Newton step {gram_error:.3e}")
            break
        step = 1.0
        for _ in range(30):
            Wn, Hn = _normalise(W + step * dW, r), _normalise(H + step * dH, r)
            kn = kkt_of(Wn, Hn)
            fn = prob.state(Wn, Hn)
            # Accept a step that lowers the residual, or the objective beyond rounding.
            eps = 64 * torch.finfo(torch.float64).eps * max(1.0, abs(float(f)))
            if kn < kkt or float(fn[0]) < float(f) - eps:
                break
            step /= 2
        else:
            log("Newton: no acceptable step, stopping")
            break
        newton += 1
        W, H, kkt = Wn, Hn, kn
        f, gW, gH, G, S = fn
        log(f"Newton step {newton}: CG {its}, step {step:g}, KKT {kkt:.3e}, Gram change {gram_error:.3e}")

    W = W * math.sqrt(E_W / rho)
    H = H * math.sqrt(E_H / rho)
    ew = torch.tensor([E_W], dtype=torch.float64, device=device)
    eh = torch.tensor([E_H], dtype=torch.float64, device=device)
    kkt_t, multipliers = kkt_residual(W[None], H[None], cw_b, ew, eh, loss)
    converged = converged and bool(kkt_t[0] <= tol)
    objective = prob.state(W * math.sqrt(rho / E_W), H * math.sqrt(rho / E_H))[0]
    return LargeLPMResult(
        W=W[None],
        H=H[None],
        objective=objective.reshape(1),
        pg_norm=torch.full((1,), math.nan, dtype=torch.float64, device=device),
        iterations=torch.tensor([iterations], device=device),
        converged=torch.tensor([converged], device=device),
        step=torch.full((1,), math.nan, dtype=torch.float64, device=device),
        kkt=kkt_t,
        multipliers=multipliers,
        weights=cw_b,
        E_W=ew,
        E_H=eh,
        loss=loss,
        gram_error=torch.tensor([gram_error], dtype=torch.float64),
        newton_steps=torch.tensor([newton]),
        cg_iterations=cg_total,
        flops=2.0 * K * K * p * prob.gemms,
        seconds=time.perf_counter() - start,
        lbfgs_seconds=lbfgs_seconds,
    )
