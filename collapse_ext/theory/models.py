"""The models of ``theory.predict`` (SPEC: "Theory predictions").

Every prediction is a :class:`~collapse_ext.theory.Geometry`: rotation-invariant quantities only (classifier
Gram G_W = W W^T, class-mean Gram G_H = H H^T, their norms and cosines, and the logits
H W^T when the model fixes them), for a class-count profile n_k (k < K, N = sum n_k).

Models (``predict(counts, model=...)``):
- "etf": simplex equiangular tight frame, the balanced optimum of CE and MSE
  (Papyan, Han & Donoho 2020; Fang, He, Long & Su 2021): ``lpm.simplex_etf``.
- "seli": Simplex-Encoded-Labels Interpolation (Thrampoulidis, Kini, Vakilian & Behnia,
  "Imbalance Trouble: Revisiting Neural-Collapse Geometry", NeurIPS 2022), the limit of
  the CE unconstrained-features model as the regularisation vanishes. With M = I - 11^T/K
  and D = diag(n): Z_c = M D^{1/2} = U Lambda V^T, W = U Lambda^{1/2},
  H = D^{-1/2} V Lambda^{1/2}, so G_W = (M D M)^{1/2}, G_H = D^{-1/2} (D^{1/2} M D^{1/2})^{1/2}
  D^{-1/2} and H W^T = M (logits equal the simplex-encoded labels).
- "ufm-mse": imbalanced bias-free deep-linear MSE UFM (Dang, Tran, Osher, Tran-The, Ho &
  Nguyen, "Neural Collapse in Deep Linear Networks: From Balanced to Imbalanced Data",
  ICML 2023); see :func:`ufm_mse_norms`.
- "lpm-ce", "lpm-mse": the numerical optimum of the class-collapsed Layer-Peeled Model
  (Fang et al. 2021) by ``lpm.solve_large``.

"""

from __future__ import annotations

import math

import torch

from .. import lpm
from .._validate import class_sizes, positive_float, positive_int
from .geometry import Geometry

__all__ = ["MODELS", "lpm_geometry", "predict", "seli", "ufm_mse_norms"]

MODELS = ("lpm-ce", "lpm-mse", "seli", "ufm-mse", "etf")

# ----------------------------------------------------------------------------- closed forms


def seli(counts) -> tuple[torch.Tensor, torch.Tensor]:
    """SELI factors (Thrampoulidis, Kini, Vakilian & Behnia 2022): W (K, K), H (K, K), float64.

    Z_c = (I - 11^T/K) diag(n)^{1/2} = U Lambda V^T; W = U Lambda^{1/2} (classifier rows),
    H = diag(n)^{-1/2} V Lambda^{1/2} (class means). Z_c Z_c^T = Z Z^T for the K x N
    simplex-encoded label matrix Z = (I - 11^T/K) Y, and the sample-level right factor is
    V repeated over each class's samples and divided by sqrt(n_k), so these are the class-
    collapsed SELI of the paper: W W^T = U Lambda U^T, H W^T = I - 11^T/K. Counts must be positive.
    """
    n = class_sizes(counts)
    if n.dim() != 1 or (n <= 0).any():
        raise ValueError(f"Expected `counts` to be (K,) positive class sizes for SELI, got {counts!r}")
    K = n.shape[0]
    M = torch.eye(K, dtype=torch.float64) - 1.0 / K
    U, S, Vh = torch.linalg.svd(M * n.sqrt()[None, :])
    root = S.sqrt()
    return U * root, (Vh.T * root) / n.sqrt()[:, None]


def ufm_mse_norms(counts, lambda_W: float, lambda_H: float, depth: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared norms (K,), (K,) of the product classifier rows and class means, float64.

    Imbalanced bias-free deep-linear MSE UFM (Dang et al. 2023), minimising
    (1/2N) ||W_M ... W_1 H - Y||_F^2 + (lambda_W/2) sum_l ||W_l||_F^2 + (lambda_H/2) ||H||_F^2
    (H: d x N features, d >= K): the classifier rows and the class means form orthogonal
    frames; class k has s_k^{2M} = N lambda_H x_k^M with x_k the largest root of
    x^{M-1} / (x^M + 1)^2 = N (N lambda_H lambda_W^M)^{1/M} / n_k, and 0 when there is
    none (the class is below its threshold). Row norm^2 s_k^{2M}, mean norm^2
    s_k^{2M} / (s_k^{2M} + N lambda_H)^2. The root is also checked against the zero
    solution on the class's reduced objective
    g(t) = n_k/(2N) (t - 1)^2 + (M+1)/2 (lambda_W^M lambda_H n_k t^2)^{1/(M+1)},
    t = s^{2M} / (s^{2M} + N lambda_H) the class's logit, and dropped if g(t) >= g(0).
    """
    n = class_sizes(counts)
    if n.dim() != 1:
        raise ValueError(f"Expected `counts` to be (K,), got shape {tuple(n.shape)}")
    lw, lh = positive_float(lambda_W, "lambda_W"), positive_float(lambda_H, "lambda_H")
    M = positive_int(depth, "depth")
    N = float(n.sum())
    row_sq = torch.zeros_like(n)
    for k, nk in enumerate(n.tolist()):
        if nk <= 0:
            continue
        rhs = N * (N * lh * lw**M) ** (1.0 / M) / nk
        x = _largest_root(M, rhs)
        if x is None:
            continue
        s2M = N * lh * x**M
        t = s2M / (s2M + N * lh)
        g = nk / (2 * N) * (t - 1) ** 2 + (M + 1) / 2 * (lw**M * lh * nk * t * t) ** (1.0 / (M + 1))
        if g < nk / (2 * N):
            row_sq[k] = s2M
    return row_sq, row_sq / (row_sq + N * lh) ** 2


def _largest_root(M: int, rhs: float) -> float | None:
    """Largest x > 0 with x^{M-1} / (x^M + 1)^2 = rhs, or None (bisection on the decreasing branch)."""

    def phi(x: float) -> float:
        return x ** (M - 1) / (x**M + 1) ** 2

    # phi peaks at x* = ((M-1)/(M+1))^{1/M} (x* = 0 for M = 1) and decreases to 0 beyond.
    peak = ((M - 1) / (M + 1)) ** (1.0 / M)
    if phi(peak) < rhs:
        return None
    lo, hi = peak, max(2 * peak, 1.0)
    while phi(hi) > rhs:
        hi *= 2
    if phi(lo) == rhs:
        return lo if lo > 0 else None
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if phi(mid) > rhs else (lo, mid)
    x = (lo + hi) / 2
    return x if x > 0 else None


# ----------------------------------------------------------------------------- predict


def _scaled(W: torch.Tensor, H: torch.Tensor, E_W: float, E_H: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale W, H to mean squared row norms E_W, E_H."""
    K = W.shape[0]
    return W * math.sqrt(K * E_W) / W.norm(), H * math.sqrt(K * E_H) / H.norm()


def predict(counts, model: str = "lpm-ce", **params) -> Geometry:
    """Predicted geometry for class sizes ``counts`` (K,) under ``model`` (one of MODELS).

    params: "etf", "seli": E_W, E_H (mean squared norms, default 1; the shapes do not
    depend on them); "ufm-mse": lambda_W, lambda_H (required), depth (default 1);
    "lpm-ce", "lpm-mse": E_W, E_H (default 1) and any keyword of
    ``lpm.solve_large`` (dim, tol, gram_tol, seed, device, ...). Returns a Geometry
    (``info`` holds the objective, KKT residual and gram_error for the LPM).
    """
    if model not in MODELS:
        raise ValueError(f"Expected `model` to be one of {MODELS}, got {model!r}")
    n = class_sizes(counts)
    if n.dim() != 1:
        raise ValueError(f"Expected `counts` to be (K,), got shape {tuple(n.shape)}")
    K = n.shape[0]
    allowed = {
        "etf": {"E_W", "E_H"},
        "seli": {"E_W", "E_H"},
        "ufm-mse": {"lambda_W", "lambda_H", "depth"},
    }.get(model)
    if allowed is not None and set(params) - allowed:
        raise ValueError(f"Unexpected parameters {sorted(set(params) - allowed)} for model {model!r}")
    if model in ("etf", "seli"):
        E_W = positive_float(params.get("E_W", 1.0), "E_W")
        E_H = positive_float(params.get("E_H", 1.0), "E_H")
        if model == "etf":
            W = lpm.simplex_etf(K)
            W, H = _scaled(W, W.clone(), E_W, E_H)
        else:
            W, H = _scaled(*seli(n), E_W, E_H)
        return Geometry(gram_W=W @ W.T, gram_H=H @ H.T, logits=H @ W.T, counts=n, model=model)
    if model == "ufm-mse":
        if "lambda_W" not in params or "lambda_H" not in params:
            raise ValueError("Expected `lambda_W` and `lambda_H` for model 'ufm-mse'")
        row_sq, mean_sq = ufm_mse_norms(n, params["lambda_W"], params["lambda_H"], params.get("depth", 1))
        logits = torch.diag(torch.sqrt(row_sq * mean_sq))
        return Geometry(gram_W=torch.diag(row_sq), gram_H=torch.diag(mean_sq), logits=logits, counts=n, model=model)
    E_W, E_H = params.pop("E_W", 1.0), params.pop("E_H", 1.0)
    return lpm_geometry(lpm.solve_large(n, E_W, E_H, loss=model[4:], **params), n, model)


def lpm_geometry(res: lpm.LargeLPMResult, counts: torch.Tensor, model: str) -> Geometry:
    """The Geometry of an ``lpm.solve_large`` result (``info``: objective, KKT residual,
    gram_error, converged, seconds)."""
    W, H = res.W[0].cpu(), res.H[0].cpu()
    info = {
        "objective": float(res.objective[0]),
        "kkt": float(res.kkt[0]),
        "gram_error": float(res.gram_error[0]),
        "converged": bool(res.converged[0]),
        "seconds": res.seconds,
    }
    return Geometry(gram_W=W @ W.T, gram_H=H @ H.T, logits=H @ W.T, counts=counts, model=model, info=info)
