"""Layer-Peeled Model solver (SPEC: "Layer-Peeled Model"; Fang, He, Long, Su, PNAS 2021).

Peel off the last layer and treat the features as free variables with a norm budget:

    minimise  sum_k c_k L(W h_k, k)
    s.t.      (1/K) sum_k ||w_k||^2 <= E_W,   (1/K) sum_k ||h_k||^2 <= E_H,

the class-collapsed form, with c_k = n_k / N * loss_weight_k (``loss_weights``
reweight or oversample a class's loss term, never its constraint weight), L the cross
entropy logsumexp(z) - z_k ("ce") or the squared error 0.5 ||z - e_k||^2 to one-hot
targets ("mse"), W (K, p) classifier rows, h_k (p,) features, p = ``dim``.

The solver is projected gradient descent on (W, H), plain ("pgd") or accelerated ("apgd":
FISTA momentum of Beck & Teboulle 2009 with the gradient restart of O'Donoghue & Candes
2015), run for a batch of independent instances at once by the fused ``lpm_step`` op
(CPU and CUDA; ``backend="reference"`` runs the same iteration in plain PyTorch). The
projection onto each constraint is a radial rescale of the whole block. Step size: 1 / L
with L a bound on the Lipschitz constant of the gradient over the feasible set
(``lipschitz_bound``); each chunk of iterations whose objective went up is undone and
retried with half the step (backtracking). Stopping: projected-gradient (gradient
mapping) norm <= ``tol``, or objective change over a chunk <= ``ftol`` * max(1, |f|).
Converged instances are frozen while the others continue.

What the solver reproduces (tests/test_lpm.py):
- balanced CE, p >= K - 1: W rows form a simplex ETF, ||w_k|| = sqrt(E_W),
  ||h_k|| = sqrt(E_H), h_k parallel to w_k; only E_W E_H matters;
- Minority Collapse past a finite imbalance ratio, and its removal by oversampling;
- balanced MSE (no bias), p >= K, E_W E_H < 1: W rows are an orthogonal frame (pairwise
  cosine 0), ||w_k|| = sqrt(E_W), h_k = sqrt(E_H / E_W) w_k and W h_k = sqrt(E_W E_H) e_k.
  (The nuclear norm of H W^T is at most K sqrt(E_W E_H), and the closest such matrix to
  the identity is sqrt(E_W E_H) I.) For E_W E_H >= 1 the objective reaches 0 and the
  minimiser is not unique, so no geometry is implied.
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass, field
from typing import Any

import torch

from ._ops import lpm_step
from .reference import lpm_objective_grad_reference, lpm_step_reference

__all__ = [
    "FullLPMResult",
    "LPMResult",
    "SweepResult",
    "balanced_prediction",
    "estimate_threshold",
    "kkt_residual",
    "lipschitz_bound",
    "minority_collapse_sweep",
    "minority_stats",
    "simplex_etf",
    "solve",
    "solve_full",
]

_LOSSES = ("ce", "mse")
_METHODS = ("apgd", "pgd")
_BACKENDS = ("fused", "reference")


# ----------------------------------------------------------------------------- checks


def _choice(value: Any, name: str, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ValueError(f"Expected `{name}` to be one of {options}, got {value!r}")
    return value


def _integral(value: Any) -> int | None:
    """int(value) for any integral (int, numpy integer, 0-d integer tensor; not bool), else None."""
    if isinstance(value, bool) or (hasattr(value, "dtype") and "bool" in str(value.dtype)):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _positive_int(value: Any, name: str) -> int:
    index = _integral(value)
    if index is None or index <= 0:
        raise ValueError(f"Expected `{name}` to be a positive int, got {value!r}")
    return index


def _positive_float(value: Any, name: str, allow_zero: bool = False) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        kind = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"Expected `{name}` to be {kind} finite number, got {value!r}")
    return float(value)


def _counts(counts: Any) -> torch.Tensor:
    """(K,) or (B, K) non-negative finite class sizes (real values allowed), as float64 CPU."""
    try:
        t = torch.as_tensor(counts).detach().to("cpu", torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"Expected `counts` to be a (K,) or (B, K) array of class sizes, got {counts!r}") from err
    if t.dim() not in (1, 2):
        raise ValueError(f"Expected `counts` to be (K,) or (B, K), got shape {tuple(t.shape)}")
    if t.shape[-1] < 2:
        raise ValueError(f"Expected `counts` to have at least 2 classes, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all() or (t < 0).any():
        raise ValueError("Expected `counts` to be finite and non-negative")
    if (t.sum(-1) <= 0).any():
        raise ValueError("Expected `counts` to have a positive total in every instance")
    return t


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


# ----------------------------------------------------------------------------- geometry


def simplex_etf(K: int, d: int | None = None, *, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """(K, d) unit rows with pairwise cosine -1/(K-1): a simplex equiangular tight frame.

    The rows of sqrt(K/(K-1)) (I - 11^T/K) expressed in an orthonormal basis of their
    (K-1)-dimensional span, zero-padded to d >= K - 1 (default d = K).
    """
    K = _positive_int(K, "K")
    if K < 2:
        raise ValueError(f"Expected `K` to be at least 2, got {K}")
    d = K if d is None else _positive_int(d, "d")
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
    _choice(loss, "loss", _LOSSES)
    E_W, E_H = _positive_float(E_W, "E_W"), _positive_float(E_H, "E_H")
    rho = math.sqrt(E_W * E_H)
    if loss == "ce":
        cosine = -1.0 / (K - 1)
        objective = math.log1p((K - 1) * math.exp(-rho * K / (K - 1)))
    else:
        if rho >= 1:
            raise ValueError(f"MSE optimum is not unique for E_W * E_H >= 1, got {E_W * E_H!r}")
        cosine, objective = 0.0, 0.5 * (1.0 - rho) ** 2
    return {"cosine": cosine, "norm_W": math.sqrt(E_W), "norm_H": math.sqrt(E_H), "objective": objective}


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


def _project(X: torch.Tensor, radius_sq: torch.Tensor) -> torch.Tensor:
    norm_sq = (X * X).flatten(1).sum(1)
    scale = torch.where(norm_sq > radius_sq, torch.sqrt(radius_sq / norm_sq), torch.ones_like(norm_sq))
    return X * scale.view(-1, *([1] * (X.dim() - 1)))


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
    _, gW, gH = lpm_objective_grad_reference(W, H, c, loss)
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


# ----------------------------------------------------------------------------- the loop


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


def _collapsed_stepper(loss: str, momentum: bool, backend: str):
    step_fn = lpm_step if backend == "fused" else lpm_step_reference

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
    return _project(X, shape[1] * level).to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------- results


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
    (B, 2) (see ``kkt_residual``); weights (B, K) = c_k; E_W, E_H (B,).
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
    float64, 1e-3 for float32). Budgets so large that the gradient's Lipschitz bound squared
    overflows ``dtype`` are refused. Instances start from
    Gaussian points drawn from ``seed`` on the CPU, so results do not depend on ``device``.
    backend: "fused" (the ``lpm_step`` op) or "reference" (plain batched PyTorch).
    """
    _choice(loss, "loss", _LOSSES)
    _choice(method, "method", _METHODS)
    _choice(backend, "backend", _BACKENDS)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"Expected `dtype` to be torch.float32 or torch.float64, got {dtype!r}")
    max_iter = _positive_int(max_iter, "max_iter")
    chunk = _positive_int(chunk, "chunk")
    tol = _positive_float(tol, "tol", allow_zero=True)
    ftol = 4 * torch.finfo(dtype).eps if ftol is None else _positive_float(ftol, "ftol", allow_zero=True)
    if kkt_tol is None:
        kkt_tol = 1e-6 if dtype == torch.float64 else 1e-3
    kkt_tol = _positive_float(kkt_tol, "kkt_tol", allow_zero=True)
    n = _counts(counts)
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
    p = K if dim is None else _positive_int(dim, "dim")
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
    )


# ----------------------------------------------------------------------------- per-sample model


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
    _choice(loss, "loss", _LOSSES)
    _choice(method, "method", _METHODS)
    n = _counts(counts)
    if n.dim() != 1 or (n != n.round()).any() or (n <= 0).any():
        raise ValueError(f"Expected `counts` to be (K,) positive integers for solve_full, got {counts!r}")
    max_iter, chunk = _positive_int(max_iter, "max_iter"), _positive_int(chunk, "chunk")
    tol = _positive_float(tol, "tol", allow_zero=True)
    ftol = 4 * torch.finfo(dtype).eps if ftol is None else _positive_float(ftol, "ftol", allow_zero=True)
    E_W, E_H = _positive_float(E_W, "E_W"), _positive_float(E_H, "E_H")
    K = n.shape[0]
    p = K if dim is None else _positive_int(dim, "dim")
    lw = torch.ones(K, dtype=torch.float64) if loss_weights is None else torch.as_tensor(loss_weights).double()
    if lw.shape != (K,) or not torch.isfinite(lw).all() or (lw < 0).any():
        raise ValueError(f"Expected `loss_weights` to be (K,) finite and non-negative, got {loss_weights!r}")
    device = torch.device("cpu") if device is None else torch.device(device)
    labels = torch.repeat_interleave(torch.arange(K), n.long())
    N = labels.numel()
    sample_w = (lw / N)[labels].to(device, dtype)
    scale = torch.sqrt(n)[labels].to(device, dtype)
    y = labels.to(device)
    onehot = torch.nn.functional.one_hot(y, K).to(dtype)

    def objective_grad(W, U):
        Hs = U * scale[None, :, None]
        Z = Hs @ W.transpose(1, 2)
        if loss == "ce":
            per = torch.logsumexp(Z, 2) - Z.gather(2, y.view(1, -1, 1)).squeeze(2)
            G = torch.softmax(Z, 2) - onehot
        else:
            per = 0.5 * ((Z - onehot) ** 2).sum(2)
            G = Z - onehot
        G = G * sample_w[None, :, None]
        return (per * sample_w).sum(1), G.transpose(1, 2) @ Hs, (G @ W) * scale[None, :, None]

    ew = torch.tensor([E_W], dtype=torch.float64)
    eh = torch.tensor([E_H], dtype=torch.float64)
    radii = (torch.tensor([K * E_W], dtype=dtype, device=device), torch.tensor([K * E_H], dtype=dtype, device=device))
    weights = (n * lw / N).unsqueeze(0)
    step = 1.0 / lipschitz_bound(weights, ew, eh, loss, feature_sq_max=n.max() * K * eh)

    def stepper(X, Xp, theta, eta, _consts, iters):
        return _apg_iterations(objective_grad, X, Xp, theta, eta, radii, iters, method == "apgd")

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


def _apg_iterations(objective_grad, X, Xp, theta, eta, radii, iters, momentum):
    """The ``lpm_step`` iteration for any blocks and gradient (used by ``solve_full``)."""
    e = eta[:, None, None]
    for _ in range(iters):
        if momentum:
            theta_next = (1 + torch.sqrt(1 + 4 * theta * theta)) / 2
            beta = ((theta - 1) / theta_next)[:, None, None]
            Y = tuple(x + beta * (x - xp) for x, xp in zip(X, Xp))
        else:
            Y = X
        _, *grads = objective_grad(*Y)
        new = tuple(_project(y - e * g, r) for y, g, r in zip(Y, grads, radii))
        if momentum:
            dot = sum(((y - nx) * (nx - x)).flatten(1).sum(1) for y, nx, x in zip(Y, new, X))
            theta = torch.where(dot > 0, torch.ones_like(theta), theta_next)
        Xp, X = X, new
    objective, *grads = objective_grad(*X)
    pg_sq = sum(((x - _project(x - e * g, r)) ** 2).flatten(1).sum(1) for x, g, r in zip(X, grads, radii))
    return X, Xp, theta, objective, torch.sqrt(pg_sq) / eta


# ----------------------------------------------------------------------------- Minority Collapse


def minority_stats(W: torch.Tensor, minority: torch.Tensor) -> dict[str, torch.Tensor]:
    """Minority Collapse summaries (SPEC, Fang et al. 2021) of classifier rows W (B, K, p).

    minority: (K,) bool. Returns (B,) tensors: minority_cos_mean / _std and
    majority_cos_mean / _std over pairs j < k inside each group (population std),
    minority_norm and majority_norm (mean row norms), norm_ratio = their quotient, and
    minority_spread = max_{j,k minority} ||w_j - w_k||^2 / mean_k ||w_k||^2.
    """
    W = W.detach()
    minority = minority.to(W.device)
    cos = _cosines(W)
    norms = W.norm(dim=2)
    out = {}
    for name, mask in (("minority", minority), ("majority", ~minority)):
        idx = torch.nonzero(mask).flatten()
        block = cos[:, idx][:, :, idx]
        iu = torch.triu_indices(idx.numel(), idx.numel(), offset=1, device=W.device)
        pairs = block[:, iu[0], iu[1]]
        if pairs.shape[1] > 0:
            out[f"{name}_cos_mean"] = pairs.mean(1)
            out[f"{name}_cos_std"] = pairs.std(1, correction=0)
        else:
            out[f"{name}_cos_mean"] = out[f"{name}_cos_std"] = torch.full_like(norms[:, 0], float("nan"))
        out[f"{name}_norm"] = norms[:, idx].mean(1)
    out["norm_ratio"] = out["minority_norm"] / out["majority_norm"].clamp_min(torch.finfo(W.dtype).tiny)
    Wm = W[:, minority]
    dist = ((Wm.unsqueeze(1) - Wm.unsqueeze(2)) ** 2).sum(3)
    out["minority_spread"] = dist.flatten(1).max(1).values / (norms**2).mean(1)
    return out


_SWEEP_COLUMNS = (
    "ratio",
    "minority_cos_mean",
    "minority_cos_std",
    "majority_cos_mean",
    "majority_cos_std",
    "minority_norm",
    "majority_norm",
    "norm_ratio",
    "minority_spread",
    "objective",
)


@dataclass
class SweepResult:
    """Minority Collapse over imbalance ratios R = n_A / n_B (one row per R).

    Each field is a (R,) float64 CPU tensor (columns of ``minority_stats`` plus ratio and
    objective); ``converged`` (R,) bool; ``result`` the full ``LPMResult``;
    ``threshold`` the estimated R_0 (``estimate_threshold``) when requested, else None.
    """

    ratio: torch.Tensor
    minority_cos_mean: torch.Tensor
    minority_cos_std: torch.Tensor
    majority_cos_mean: torch.Tensor
    majority_cos_std: torch.Tensor
    minority_norm: torch.Tensor
    majority_norm: torch.Tensor
    norm_ratio: torch.Tensor
    minority_spread: torch.Tensor
    objective: torch.Tensor
    converged: torch.Tensor
    K: int
    K_A: int
    E_W: float
    E_H: float
    result: LPMResult = field(repr=False)
    threshold: float | None = None

    def rows(self) -> list[dict[str, float]]:
        """The table as a list of dicts, one per ratio."""
        return [{c: float(getattr(self, c)[i]) for c in _SWEEP_COLUMNS} for i in range(self.ratio.numel())]

    def to_markdown(self) -> str:
        """The table as markdown (the threshold, if estimated, in a last line)."""
        lines = ["| " + " | ".join(_SWEEP_COLUMNS) + " |", "|" + "---|" * len(_SWEEP_COLUMNS)]
        for row in self.rows():
            lines.append("| " + " | ".join(f"{row[c]:.6g}" for c in _SWEEP_COLUMNS) + " |")
        if self.threshold is not None:
            lines.append(f"\nEstimated Minority Collapse threshold R_0 = {self.threshold:.6g}")
        return "\n".join(lines)


def _imbalanced_counts(K: int, K_A: int, ratios: torch.Tensor) -> torch.Tensor:
    counts = torch.ones(ratios.numel(), K, dtype=torch.float64)
    counts[:, :K_A] = ratios.unsqueeze(1)
    return counts


def _imbalance_classes(K, K_A) -> tuple[int, int]:
    """K >= 3 classes of which K_A in [1, K - 2] are the majority: a ratio n_A / n_B needs
    both groups, and the minority spread needs at least two minority rows (with one it is 0,
    which would read as Minority Collapse at any ratio)."""
    K = _positive_int(K, "K")
    if K < 3:
        raise ValueError(f"Expected `K` >= 3 (one majority and two minority classes at least), got {K}")
    index = _integral(K_A)
    if index is None or not 1 <= index <= K - 2:
        raise ValueError(
            f"Expected `K_A` in [1, K - 2] (at least one majority and two minority classes), got K_A={K_A!r}, K={K}"
        )
    return K, index


def _sweep_args(K, K_A, ratios):
    K, K_A = _imbalance_classes(K, K_A)
    r = torch.as_tensor(ratios, dtype=torch.float64).detach().cpu().flatten()
    if r.numel() == 0 or not torch.isfinite(r).all() or (r <= 0).any():
        raise ValueError(f"Expected `ratios` to be positive finite numbers, got {ratios!r}")
    return K, K_A, r


def minority_collapse_sweep(
    K: int,
    K_A: int,
    ratios,
    E_W: float = 1.0,
    E_H: float = 1.0,
    *,
    oversample: bool = False,
    threshold: bool = False,
    spread_tol: float = 1e-3,
    points: int = 8,
    rounds: int = 6,
    **solve_kwargs,
) -> SweepResult:
    """Solve the imbalanced LPM for every ratio R in one batch (Fang et al. 2021, Sec. 3).

    K_A majority classes of size R, K - K_A minority classes of size 1 (only proportions
    matter). oversample=True multiplies the minority loss weights by R (oversampling by
    w_r = R), which restores the balanced problem. threshold=True also estimates R_0, the
    smallest R whose minority spread is below ``spread_tol`` (``estimate_threshold`` with
    ``points`` and ``rounds``, searched between the smallest and largest ratio).
    solve_kwargs go to ``solve`` (dim, loss, method, max_iter, tol, seed, device, dtype, ...).
    """
    K, K_A, r = _sweep_args(K, K_A, ratios)
    if threshold and not float(r.min()) < float(r.max()):
        raise ValueError(f"Expected at least two distinct `ratios` to bracket the threshold, got {r.tolist()}")
    counts = _imbalanced_counts(K, K_A, r)
    lw = None
    if oversample:
        lw = torch.ones_like(counts)
        lw[:, K_A:] = r.unsqueeze(1)
    res = solve(counts, E_W, E_H, loss_weights=lw, **solve_kwargs)
    minority = torch.arange(K) >= K_A
    stats = {k: v.double().cpu() for k, v in minority_stats(res.W, minority).items()}
    R0 = None
    if threshold:
        R0 = estimate_threshold(
            K,
            K_A,
            E_W,
            E_H,
            spread_tol=spread_tol,
            lo=float(r.min()),
            hi=float(r.max()),
            points=points,
            rounds=rounds,
            **solve_kwargs,
        )
    return SweepResult(
        ratio=r,
        objective=res.objective.double().cpu(),
        converged=res.converged.cpu(),
        K=K,
        K_A=K_A,
        E_W=float(E_W),
        E_H=float(E_H),
        result=res,
        threshold=R0,
        **stats,
    )


def estimate_threshold(
    K: int,
    K_A: int,
    E_W: float = 1.0,
    E_H: float = 1.0,
    *,
    spread_tol: float = 1e-3,
    lo: float = 1.0,
    hi: float = 1e4,
    points: int = 8,
    rounds: int = 6,
    **solve_kwargs,
) -> float | None:
    """Smallest imbalance ratio R in [lo, hi] with minority spread <= spread_tol (Minority Collapse).

    Multisection on log R with the batched solver: each round solves ``points`` ratios at
    once and keeps the bracket where the spread crosses ``spread_tol``, shrinking it by
    points + 1. Returns the geometric midpoint of the last bracket, ``hi`` side included;
    None when the spread at ``hi`` is still above the tolerance; ``lo`` when it is below there.
    Assumes the spread decreases with R (Fang et al. 2021, Thm 5). Needs K >= 3 and
    1 <= K_A <= K - 2 (a majority, and at least two minority rows to have a spread).
    """
    K, K_A = _imbalance_classes(K, K_A)
    _positive_int(points, "points")
    _positive_int(rounds, "rounds")
    _positive_float(spread_tol, "spread_tol")
    lo, hi = _positive_float(lo, "lo"), _positive_float(hi, "hi")
    if not lo < hi:
        raise ValueError(f"Expected 0 < `lo` < `hi`, got lo={lo!r}, hi={hi!r}")
    minority = torch.arange(K) >= K_A

    def spreads(r: torch.Tensor) -> torch.Tensor:
        res = solve(_imbalanced_counts(K, K_A, r), E_W, E_H, **solve_kwargs)
        return minority_stats(res.W, minority)["minority_spread"].double().cpu()

    s = spreads(torch.tensor([lo, hi], dtype=torch.float64))
    if s[1] > spread_tol:
        return None
    if s[0] <= spread_tol:
        return lo
    a, b = math.log(lo), math.log(hi)
    for _ in range(rounds):
        grid = torch.linspace(a, b, points + 2, dtype=torch.float64)[1:-1]
        below = spreads(torch.exp(grid)) <= spread_tol
        first = int(torch.nonzero(below).flatten()[0]) if below.any() else points
        b = float(grid[first]) if first < points else b
        a = float(grid[first - 1]) if first > 0 else a
    return math.exp((a + b) / 2)
