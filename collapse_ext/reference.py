"""Plain float64 PyTorch references for every fused op.

They are the ground truth of the tests and the "what a user would write" baseline of the
benchmarks: straightforward, materialising whatever they need, computed in float64. No
module of the package imports this one.
"""

from __future__ import annotations

import torch

from ._ops import PAIRWISE_FIELDS
from .lpm.solver import lpm_step_torch

__all__ = [
    "PAIRWISE_FIELDS",
    "class_accumulate_reference",
    "class_fold_reference",
    "class_stats_reference",
    "lpm_objective_grad_reference",
    "lpm_step_reference",
    "nearest_centre_reference",
    "pairwise_stats_reference",
    "within_scatter_reference",
]


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


def class_accumulate_reference(
    features: torch.Tensor,
    labels: torch.Tensor,
    counts: torch.Tensor,
    means: torch.Tensor,
    pending: torch.Tensor,
    sums: torch.Tensor,
    sqsums: torch.Tensor,
    limit: float,
    return_centred: bool = True,
) -> tuple[torch.Tensor, ...]:
    """The contract of ``class_accumulate`` row by row, on copies: returns
    (centred, status, means, pending, sums, sqsums) with the state after the call."""
    means, pending, sums, sqsums = means.clone(), pending.clone(), sums.clone(), sqsums.clone()
    x, y = features.double(), labels.long()
    n, k = x.shape[0], means.shape[0]
    compute = torch.float64 if features.dtype == torch.float64 else torch.float32
    bad_label = next((i for i in range(n) if not 0 <= int(y[i]) < k), -1)
    finite = torch.isfinite(x).all(1)
    bad_row = next((i for i in range(n) if not bool(finite[i])), -1)
    fresh = {}  # new class -> its batch mean rounded to the state dtype
    for c in {int(v) for v in y.tolist()}:
        if 0 <= c < k and int(counts[c] + pending[c]) == 0:
            fresh[c] = x[y == c].mean(0).to(means.dtype).double()
    shifts = []
    for i in range(n):
        c = int(y[i])
        if not 0 <= c < k:
            shifts.append(torch.zeros_like(x[i]))
        else:
            shifts.append(fresh[c] if c in fresh else means[c].double())
    e = x - torch.stack(shifts) if n else x.clone()
    sq = (e * e).sum(1)
    good = [float(sq[i]) for i in range(n) if bool(finite[i]) and 0 <= int(y[i]) < k]
    good = [float("inf") if v != v else v for v in good]  # NaN (a new class's NaN row) counts as Inf
    peak = max(good, default=0.0)
    accepted = bad_label < 0 and bad_row < 0 and peak <= limit
    status = torch.tensor([float(accepted), peak, float(bad_label), float(bad_row)], dtype=torch.float64)
    rows = n if return_centred else 0
    if not accepted:
        return torch.zeros(rows, x.shape[1], dtype=compute), status, means, pending, sums, sqsums
    for c, shift in fresh.items():
        means[c] = shift.to(means.dtype)
    pending.index_add_(0, y, torch.ones_like(y))
    sums.index_add_(0, y, e.to(sums.dtype))
    sqsums.index_add_(0, y, sq)
    return e[:rows].to(compute), status, means, pending, sums, sqsums


def class_fold_reference(
    counts: torch.Tensor,
    means: torch.Tensor,
    pending: torch.Tensor,
    sums: torch.Tensor,
    sqsums: torch.Tensor,
    sqdev: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """The contract of ``class_fold`` on copies, in float64: returns (counts, means,
    pending, sums, sqsums, sqdev) after the fold."""
    counts, means, pending, sums, sqsums, sqdev = (t.clone() for t in (counts, means, pending, sums, sqsums, sqdev))
    rows = pending > 0
    n = (counts + pending).double().clamp_min(1.0)
    t = sums.double()
    exact = means.double() + t / n.unsqueeze(1)
    stored = exact.to(means.dtype)
    residual = (n.unsqueeze(1) * (exact - stored.double())).to(sums.dtype)
    folded_sqdev = (sqdev + sqsums - (t * t).sum(1) / n).clamp_min(0.0)
    r = residual.double()
    means[rows] = stored[rows]
    sums[rows] = residual[rows]
    sqdev[rows] = folded_sqdev[rows]
    sqsums[rows] = ((r * r).sum(1) / n)[rows]
    counts[rows] += pending[rows]
    pending[rows] = 0
    return counts, means, pending, sums, sqsums, sqdev


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

    The same iteration as the fused ``lpm_step`` op (see its docstring): the plain batched
    PyTorch loop of ``collapse_ext.lpm.solver.lpm_step_torch`` driven by the gradient of
    :func:`lpm_objective_grad_reference`; results are cast back to the dtype of ``W``.
    Returns (W, H, W_prev, H_prev, theta, objective, pg_norm).
    """
    args = (W, H, W_prev, H_prev, theta, weights, E_W, E_H, step, num_iters, loss, momentum)
    return lpm_step_torch(*args, grad=lpm_objective_grad_reference)


def pairwise_stats_reference(
    rows: torch.Tensor,
    variances: torch.Tensor | None = None,
    subset: torch.Tensor | None = None,
    riesz_s: float = 1.0,
    cdnv_p: float = 1.0,
) -> torch.Tensor:
    """The ``pairwise_stats`` vector (see PAIRWISE_FIELDS) from the full K x K Gram in float64."""
    a = rows.double()
    v = variances.double() if variances is not None else None
    if subset is not None:
        a = a[subset.long()]
        v = v[subset.long()] if v is not None else None
    m = a.shape[0]
    tol = 4 * torch.finfo(torch.float64 if rows.dtype == torch.float64 else torch.float32).eps
    out = torch.zeros(len(PAIRWISE_FIELDS), dtype=torch.float64)
    out[PAIRWISE_FIELDS.index("cos_min")] = float("inf")
    out[PAIRWISE_FIELDS.index("cos_max")] = float("-inf")
    out[PAIRWISE_FIELDS.index("dist_sq_max")] = float("-inf")
    if m < 2:
        return out.to(rows.device)
    j, k = torch.triu_indices(m, m, offset=1, device=a.device)
    gram = a @ a.T
    sq = gram.diagonal()
    norms = sq.sqrt()
    dot = gram[j, k]
    dist_sq = (sq[j] + sq[k] - 2 * dot).clamp_min(0)
    separate = dist_sq > tol * (sq[j] + sq[k])
    valid = (norms[j] > 0) & (norms[k] > 0)
    cos = (dot[valid] / (norms[j] * norms[k])[valid]).clamp(-1, 1)
    unit_sq = (2 - 2 * cos).clamp_min(0)
    apart = unit_sq > 2 * tol
    log = -0.5 * unit_sq[apart].log()
    riesz = unit_sq[apart].pow(-riesz_s / 2)
    fields = {
        "pairs": float(j.numel()),
        "cos_pairs": float(cos.numel()),
        "cos_sum": cos.sum(),
        "etf_abs_sum": (cos + 1.0 / (m - 1)).abs().sum(),
        "etf_sq_sum": (cos + 1.0 / (m - 1)).square().sum(),
        "kernel_pairs": float(log.numel()),
        "log_sum": log.sum(),
        "log_sq_sum": (log * log).sum(),
        "riesz_sum": riesz.sum(),
        "riesz_sq_sum": (riesz * riesz).sum(),
        "coincident": float((~separate).sum()),
        "dot_sq_sum": (dot * dot).sum(),
        "dist_sq_max": dist_sq.max(),
    }
    if cos.numel() > 0:
        fields["cos_min"] = cos.min()
        fields["cos_max"] = cos.max()
    if v is not None:
        fields["cdnv_sum"] = ((v[j] + v[k])[separate] / (2 * dist_sq[separate].pow(cdnv_p))).sum()
    for name, value in fields.items():
        out[PAIRWISE_FIELDS.index(name)] = value
    return out.to(rows.device)


def nearest_centre_reference(
    features: torch.Tensor,
    labels: torch.Tensor,
    means: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    present: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tallies [n, ncc_correct, mismatch] (3,) int64 and the nearest-centre assignment (N,)
    int64 from the full (N, K) distance and logit matrices in float64. Only centres with
    ``present[k]`` compete (all when None); rows with a label outside [0, K), or with no
    competing centre, get assignment -1 and are not counted; without `weight` mismatch is 0.
    Ties go to the lowest class index."""
    x = features.double()
    mu = means.double()
    k = mu.shape[0]
    y = labels.long()
    # Direct differences, not the Gram identity: the reference must not cancel on offsets.
    dist = torch.cdist(x, mu, compute_mode="donot_use_mm_for_euclid_dist").square()
    if present is not None:
        dist = dist.masked_fill(~present.bool().cpu().to(dist.device), float("inf"))
    if k and (present is None or bool(present.any())):
        nearest = dist.argmin(1) if x.shape[0] else torch.zeros(0, dtype=torch.long, device=x.device)
    else:
        nearest = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
    valid = (y >= 0) & (y < k)
    nearest = torch.where(valid, nearest, torch.full_like(nearest, -1))
    correct = (nearest == y) & valid
    mismatch = torch.zeros_like(valid)
    if weight is not None and x.shape[0] and k:
        logits = x @ weight.double().T
        if bias is not None:
            logits = logits + bias.double()
        mismatch = valid & (nearest >= 0) & (logits.argmax(1) != nearest)
    counted = nearest >= 0
    tallies = torch.tensor([int(counted.sum()), int(correct.sum()), int(mismatch.sum())], dtype=torch.int64)
    return tallies, nearest
