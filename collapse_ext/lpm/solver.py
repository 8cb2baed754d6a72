"""The projected-gradient solver of the class-collapsed Layer-Peeled Model (package
docstring): the chunked loop with backtracking and freezing of converged instances, the
plain-PyTorch iteration it shares with the per-sample model, and :func:`solve`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .._ops import lpm_step
from .._validate import choice, class_sizes, positive_float, positive_int
from .problem import LOSSES, kkt_residual, lipschitz_bound, objective_grad, project

__all__ = ["LPMResult", "apg_iterations", "lpm_step_torch", "solve"]

_METHODS = ("apgd", "pgd")
_BACKENDS = ("fused", "reference")


def _per_instance(value: Any, name: str, batch: int) -> torch.Tensor:
    """Positive scalar or (B,) tensor -> (B,) float64 CPU."""
    t = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
    if t.dim() > 1 or (t.dim() == 1 and t.shape[0] not in (1, batch)):
        raise ValueError(f"Expected `{name}` to be a scalar or ({batch},), got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all() or (t <= 0).any():
        raise ValueError(f"Expected `{name}` to be positive and finite, got {value!r}")
    return t.expand(batch).clone() if t.dim() == 1 else t.repeat(batch)


def _batch_size(*candidates: torch.Tensor | Any) -> int:
    sizes = {int(torch.as_tensor(c).shape[0]) for c in candidates if torch.as_tensor(c).dim() >= 1}
    sizes.discard(1)
    if len(sizes) > 1:
        raise ValueError(f"Expected batch dimensions to agree, got sizes {sorted(sizes)}")
    return sizes.pop() if sizes else 1


def loop_options(loss, method, max_iter, chunk, tol, ftol, dtype) -> tuple[int, int, float, float]:
    """Check the options shared by every solver: (max_iter, chunk, tol, ftol); ftol
    defaults to 4 eps of ``dtype``."""
    choice(loss, "loss", LOSSES)
    choice(method, "method", _METHODS)
    max_iter, chunk = positive_int(max_iter, "max_iter"), positive_int(chunk, "chunk")
    tol = positive_float(tol, "tol", allow_zero=True)
    ftol = 4 * torch.finfo(dtype).eps if ftol is None else positive_float(ftol, "ftol", allow_zero=True)
    return max_iter, chunk, tol, ftol


def _rows(tensors: tuple[torch.Tensor, ...], index: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.index_select(0, index) for t in tensors)


def _iterate(stepper, X, Xp, theta, step, consts, *, max_iter, tol, ftol, chunk):
    """Chunks of ``stepper`` iterations on the active instances until each one stops.

    stepper(X, Xp, theta, step, consts, n) -> (X, Xp, theta, objective, pg_norm), where X,
    Xp are tuples of (B, ...) blocks. Returns the final state and per-instance records.
    """
    X, Xp, theta, objective, pg = stepper(X, Xp, theta, step, consts, 0)
    B = objective.shape[0]
    device = objective.device
    eps = torch.finfo(objective.dtype).eps
    iterations = torch.zeros(B, dtype=torch.long, device=device)
    converged = pg <= tol
    active = torch.nonzero(~converged).flatten()
    done = 0
    while active.numel() > 0 and done < max_iter:
        n = min(chunk, max_iter - done)
        nX, nXp, ntheta, nobj, npg = stepper(
            _rows(X, active), _rows(Xp, active), theta[active], step[active], _rows(consts, active), n
        )
        f0 = objective[active]
        # Rounding alone can raise a converged objective by a few ulps: only a larger rise
        # counts as a failed chunk.
        worse = ~(nobj <= f0 + 16 * eps * f0.abs().clamp_min(1))
        keep = ~worse
        kidx = active[keep]
        X = tuple(t.index_copy(0, kidx, nt[keep]) for t, nt in zip(X, nX))
        Xp = tuple(t.index_copy(0, kidx, nt[keep]) for t, nt in zip(Xp, nXp))
        theta = theta.index_copy(0, kidx, ntheta[keep])
        objective = objective.index_copy(0, kidx, nobj[keep])
        pg = pg.index_copy(0, kidx, npg[keep])
        widx = active[worse]
        # Backtrack: halve the step and drop the momentum of instances whose chunk failed.
        step = step.index_copy(0, widx, step[widx] / 2)
        theta = theta.index_fill(0, widx, 1.0)
        Xp = tuple(p.index_copy(0, widx, x[widx]) for p, x in zip(Xp, X))
        iterations[active] += n
        done += n
        stalled = (f0 - nobj).abs() <= ftol * nobj.abs().clamp_min(1)
        stop = keep & ((npg <= tol) | stalled)
        converged = converged.index_fill(0, active[stop], True)
        active = active[~stop]
    return X, Xp, theta, step, objective, pg, iterations, converged


def apg_iterations(objective_grad, X, Xp, theta, eta, radii, iters, momentum):
    """``iters`` iterations of the ``lpm_step`` op's iteration (its docstring) for any tuple
    of (B, ...) blocks X, their previous values Xp, theta (B,) and steps eta (B,):
    objective_grad(*X) -> (objective (B,), *grads); radii: squared radius (B,) or (1,) of
    each block's ball. Returns (X, Xp, theta, objective, pg_norm) at the returned X."""
    e = eta[:, None, None]
    for _ in range(iters):
        if momentum:
            theta_next = (1 + torch.sqrt(1 + 4 * theta * theta)) / 2
            beta = ((theta - 1) / theta_next)[:, None, None]
            Y = tuple(x + beta * (x - xp) for x, xp in zip(X, Xp))
        else:
            Y = X
        _, *grads = objective_grad(*Y)
        new = tuple(project(y - e * g, r) for y, g, r in zip(Y, grads, radii))
        if momentum:
            dot = sum(((y - nx) * (nx - x)).flatten(1).sum(1) for y, nx, x in zip(Y, new, X))
            theta = torch.where(dot > 0, torch.ones_like(theta), theta_next)
        Xp, X = X, new
    objective, *grads = objective_grad(*X)
    pg_sq = sum(((x - project(x - e * g, r)) ** 2).flatten(1).sum(1) for x, g, r in zip(X, grads, radii))
    return X, Xp, theta, objective, torch.sqrt(pg_sq) / eta


def lpm_step_torch(
    W, H, W_prev, H_prev, theta, weights, E_W, E_H, step, num_iters, loss="ce", momentum=True, *, grad=None
):
    """The ``lpm_step`` op in plain PyTorch, computed in float64 and cast back to W's dtype
    (same arguments and results). ``grad(W, H, weights, loss)`` replaces the objective and
    gradient of the class-collapsed model (:func:`~collapse_ext.lpm.problem.objective_grad`)."""
    dtype = W.dtype
    W, H, Wp, Hp, theta, c, eta = (t.double() for t in (W, H, W_prev, H_prev, theta, weights, step))
    K = W.shape[1]
    labels = torch.arange(K, device=W.device)
    if grad is None:
        fn = lambda W, H: objective_grad(W, H, labels, c, loss)  # noqa: E731
    else:
        fn = lambda W, H: grad(W, H, c, loss)  # noqa: E731
    radii = (K * E_W.double(), K * E_H.double())
    X, Xp, theta, objective, pg = apg_iterations(fn, (W, H), (Wp, Hp), theta, eta, radii, num_iters, momentum)
    return tuple(t.to(dtype) for t in (*X, *Xp, theta, objective, pg))


def _collapsed_stepper(loss: str, momentum: bool, backend: str):
    step_fn = lpm_step if backend == "fused" else lpm_step_torch

    def stepper(X, Xp, theta, step, consts, n):
        weights, E_W, E_H = consts
        W, H, Wp, Hp, theta, objective, pg = step_fn(
            X[0], X[1], Xp[0], Xp[1], theta, weights, E_W, E_H, step, n, loss, momentum
        )
        return (W, H), (Wp, Hp), theta, objective, pg

    return stepper


def _random_block(gen, shape, level, dtype, device):
    """Gaussian (B, rows, p) block scaled to mean squared row norm ~ level, then projected."""
    X = torch.randn(*shape, generator=gen, dtype=torch.float64) * torch.sqrt(level / shape[2])[:, None, None]
    return project(X, shape[1] * level).to(device=device, dtype=dtype)


def _cosines(X: torch.Tensor) -> torch.Tensor:
    G = X @ X.transpose(-1, -2)
    n = torch.sqrt(torch.diagonal(G, dim1=-2, dim2=-1)).clamp_min(torch.finfo(X.dtype).tiny)
    return G / (n.unsqueeze(-1) * n.unsqueeze(-2))


@dataclass
class LPMResult:
    """Solution of a batch of class-collapsed LPM instances; tensors are batched (B, ...).

    W, H: (B, K, p); objective, pg_norm (gradient-mapping norm), step: (B,);
    iterations (B,) int64; converged (B,) bool: the stopping rule was met and the
    scale-free KKT residual is at most ``kkt_tol``; kkt (B,) that residual and multipliers
    (B, 2) (see ``kkt_residual``); weights (B, K) = c_k; E_W, E_H (B,); gram_error (B,)
    float64: a bound on the error of the Gram matrices W W^T, H H^T (max-abs over the
    largest squared row norm; the Gram change of the last Newton step, ``lpm.solve_large``),
    NaN where it was not estimated (``gram_tol=None``, float32, MSE with E_W E_H >= 1).
    The optimum is unique only up to rotation: use the Gram matrices, norms and cosines.
    """

    W: torch.Tensor
    H: torch.Tensor
    objective: torch.Tensor
    pg_norm: torch.Tensor
    iterations: torch.Tensor
    converged: torch.Tensor
    step: torch.Tensor
    kkt: torch.Tensor
    multipliers: torch.Tensor
    weights: torch.Tensor
    E_W: torch.Tensor
    E_H: torch.Tensor
    loss: str = "ce"
    gram_error: torch.Tensor | None = None

    @property
    def gram_W(self) -> torch.Tensor:
        """(B, K, K) W W^T."""
        return self.W @ self.W.transpose(1, 2)

    @property
    def gram_H(self) -> torch.Tensor:
        """(B, K, K) H H^T."""
        return self.H @ self.H.transpose(1, 2)

    @property
    def logits(self) -> torch.Tensor:
        """(B, K, K) Z = H W^T, Z[k, j] = <h_k, w_j>."""
        return self.H @ self.W.transpose(1, 2)

    @property
    def norms_W(self) -> torch.Tensor:
        """(B, K) ||w_k||."""
        return self.W.norm(dim=2)

    @property
    def norms_H(self) -> torch.Tensor:
        """(B, K) ||h_k||."""
        return self.H.norm(dim=2)

    @property
    def cos_W(self) -> torch.Tensor:
        """(B, K, K) cos(w_j, w_k)."""
        return _cosines(self.W)

    @property
    def cos_H(self) -> torch.Tensor:
        """(B, K, K) cos(h_j, h_k)."""
        return _cosines(self.H)

    @property
    def cos_WH(self) -> torch.Tensor:
        """(B, K) cos(w_k, h_k) (1 = self-duality)."""
        tiny = torch.finfo(self.W.dtype).tiny
        return (self.W * self.H).sum(2) / (self.norms_W * self.norms_H).clamp_min(tiny)


def solve(
    counts,
    E_W=1.0,
    E_H=1.0,
    *,
    dim: int | None = None,
    loss: str = "ce",
    loss_weights=None,
    method: str = "apgd",
    max_iter: int = 20000,
    tol: float = 1e-8,
    ftol: float | None = None,
    kkt_tol: float | None = None,
    gram_tol: float | None = 1e-6,
    chunk: int = 100,
    seed: int = 0,
    device=None,
    dtype: torch.dtype = torch.float64,
    backend: str = "fused",
) -> LPMResult:
    """Solve a batch of class-collapsed Layer-Peeled Models (module docstring for the model).

    counts: (K,) or (B, K) class sizes n_k >= 0 (real values allowed: only n_k / N
    matters); E_W, E_H: positive scalars or (B,); loss_weights: None, (K,) or (B, K)
    non-negative factors on each class's loss term (oversampling by w multiplies it by w).
    dim: feature dimension p (default K; the ETF needs p >= K - 1). loss: "ce" or "mse".
    method: "apgd" (accelerated, restarted) or "pgd". tol: stop when the
    projected-gradient norm is <= tol; ftol: or when the objective changes by at most
    ftol * max(1, |f|) over a chunk (default 4 eps of ``dtype``). Both rules are absolute or
    can be met by a step lost in rounding, so an instance counts as ``converged`` only when
    the scale-free KKT residual (``kkt_residual``) is also <= kkt_tol (default 1e-6 for
    float64, 1e-3 for float32). gram_tol: then each float64 instance (CE, or MSE with
    E_W E_H < 1) is polished by the Riemannian Newton steps of ``lpm.solve_large`` from the
    point reached, until the KKT residual is <= min(tol, kkt_tol) and the Gram bound
    ``gram_error`` <= gram_tol, which ``converged`` then also requires: projected gradients
    get the objective right long before the geometry in flat directions (a Zipf profile at
    K = 60 stops at the iteration cap with the classifier Gram off by 3e-4). None skips
    the polish (gram_error NaN). Budgets so large that the gradient's Lipschitz bound squared
    overflows ``dtype`` are refused. Instances start from
    Gaussian points drawn from ``seed`` on the CPU, so results do not depend on ``device``.
    backend: "fused" (the ``lpm_step`` op) or "reference" (plain batched PyTorch, ``lpm_step_torch``).
    """
    choice(backend, "backend", _BACKENDS)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"Expected `dtype` to be torch.float32 or torch.float64, got {dtype!r}")
    max_iter, chunk, tol, ftol = loop_options(loss, method, max_iter, chunk, tol, ftol, dtype)
    if kkt_tol is None:
        kkt_tol = 1e-6 if dtype == torch.float64 else 1e-3
    kkt_tol = positive_float(kkt_tol, "kkt_tol", allow_zero=True)
    n = class_sizes(counts)
    lw = None
    if loss_weights is not None:
        lw = torch.as_tensor(loss_weights, dtype=torch.float64).detach().cpu()
        if lw.dim() not in (1, 2) or lw.shape[-1] != n.shape[-1]:
            raise ValueError(
                f"Expected `loss_weights` to be (K,) or (B, K) with K = {n.shape[-1]}, got {tuple(lw.shape)}"
            )
        if not torch.isfinite(lw).all() or (lw < 0).any():
            raise ValueError("Expected `loss_weights` to be finite and non-negative")
    B = _batch_size(n if n.dim() == 2 else 0, E_W, E_H, lw if lw is not None and lw.dim() == 2 else 0)
    K = n.shape[-1]
    p = K if dim is None else positive_int(dim, "dim")
    weights = (n / n.sum(-1, keepdim=True)).expand(B, K)
    if lw is not None:
        weights = weights * lw.expand(B, K)
    if (weights.sum(1) <= 0).any():
        raise ValueError("Expected `loss_weights` to leave a positive weight in every instance")
    ew, eh = _per_instance(E_W, "E_W", B), _per_instance(E_H, "E_H", B)
    bound = lipschitz_bound(weights, ew, eh, loss)
    limit = math.sqrt(torch.finfo(dtype).max)
    if not (bound < limit).all():
        worst = int(torch.argmax(torch.nan_to_num(bound, nan=math.inf)))
        raise ValueError(
            f"Expected `E_W` and `E_H` small enough for {dtype} arithmetic, got E_W={float(ew[worst]):.3g}, "
            f"E_H={float(eh[worst]):.3g} (Lipschitz bound {float(bound[worst]):.3g} >= {limit:.3g})"
        )
    step = 1.0 / bound

    gen = torch.Generator().manual_seed(int(seed))
    device = torch.device("cpu") if device is None else torch.device(device)
    W0 = _random_block(gen, (B, K, p), ew, dtype, device)
    H0 = _random_block(gen, (B, K, p), eh, dtype, device)
    to = lambda t: t.to(device=device, dtype=dtype).contiguous()  # noqa: E731
    consts = (to(weights), to(ew), to(eh))
    theta = torch.ones(B, dtype=dtype, device=device)
    stepper = _collapsed_stepper(loss, method == "apgd", backend)
    (W, H), _, _, step, objective, pg, iterations, converged = _iterate(
        stepper, (W0, H0), (W0, H0), theta, to(step), consts, max_iter=max_iter, tol=tol, ftol=ftol, chunk=chunk
    )
    gram_error = torch.full((B,), math.nan, dtype=torch.float64)
    if gram_tol is not None and dtype == torch.float64:
        gram_tol = positive_float(gram_tol, "gram_tol", allow_zero=True)
        W, H, gram_error = _polish(W, H, consts, loss, min(tol, kkt_tol), gram_tol, p)
        converged = (gram_error <= gram_tol).to(converged.device)
        objective = objective_grad(W, H, torch.arange(K, device=W.device), consts[0], loss)[0]
    kkt, multipliers = kkt_residual(W, H, consts[0], consts[1], consts[2], loss)
    # A step lost in rounding (budgets far apart or huge) also "stalls": only a small
    # scale-free KKT residual certifies an optimum.
    converged = converged & (kkt <= kkt_tol).to(converged.device)
    return LPMResult(
        W=W,
        H=H,
        objective=objective,
        pg_norm=pg,
        iterations=iterations,
        converged=converged,
        step=step,
        kkt=kkt.to(dtype),
        multipliers=multipliers.to(dtype),
        weights=consts[0],
        E_W=consts[1],
        E_H=consts[2],
        loss=loss,
        gram_error=gram_error,
    )


def _polish(W, H, consts, loss, tol, gram_tol, p):
    """Newton-polish every instance of W, H (B, K, p) whose optimum is unique (CE, or MSE
    with E_W E_H < 1) with ``solve_large`` from its current point: (W, H, gram_error (B,))."""
    from .large import solve_large  # large builds on this module's LPMResult

    W, H = W.clone(), H.clone()
    gram_error = torch.full((W.shape[0],), math.nan, dtype=torch.float64)
    for b in range(W.shape[0]):
        ew, eh = float(consts[1][b]), float(consts[2][b])
        if loss == "mse" and ew * eh >= 1:
            continue
        res = solve_large(
            consts[0][b].cpu(), ew, eh, dim=p, loss=loss, tol=tol, gram_tol=gram_tol, init=(W[b], H[b]), device=W.device
        )
        W[b], H[b] = res.W[0], res.H[0]
        gram_error[b] = float(res.gram_error[0])
    return W, H, gram_error
