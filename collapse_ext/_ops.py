"""Typed wrappers over ``torch.ops.collapse_ext.*`` and their fake (meta) kernels.

The fake kernels give every op its output shapes without running it, so the ops trace
under ``torch.compile`` and pass ``torch.library.opcheck``.
"""

from __future__ import annotations

import torch

from . import _C

__all__ = ["class_stats", "cuda_compiled", "lpm_step", "within_scatter"]


def cuda_compiled() -> bool:
    """True when the extension was built with its CUDA kernels."""
    return bool(_C.cuda_compiled())


def check_backend(tensor: torch.Tensor, name: str) -> None:
    """Raise a clear error for a device this build has no kernels for."""
    if tensor.device.type == "cuda" and not cuda_compiled():
        raise RuntimeError(
            f"`{name}` is on {tensor.device}, but collapse_ext was built without CUDA kernels; "
            "rebuild with a CUDA build of torch and nvcc on PATH (or FORCE_CUDA=1)"
        )
    if tensor.device.type not in ("cpu", "cuda", "meta"):
        raise RuntimeError(f"`{name}` is on {tensor.device}; collapse_ext supports cpu and cuda")


def class_stats(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-batch class statistics in one fused two-pass kernel.

    features: (N, d) float16/bfloat16/float32/float64, rows may be strided.
    labels: (N,) int32/int64; rows whose label is outside [0, num_classes) are skipped
    (validate beforehand: ``ClassStats.update`` does).
    Returns counts (K,) int64, means (K, d) float64 (zero rows for absent classes) and
    sqdev (K,) float64 = sum_{i: y_i = k} ||h_i - mu_k||^2, accumulated in float64.
    """
    check_backend(features, "features")
    return torch.ops.collapse_ext.class_stats.default(features, labels, num_classes)


def within_scatter(
    features: torch.Tensor,
    labels: torch.Tensor,
    means: torch.Tensor,
    basis: torch.Tensor | None = None,
) -> torch.Tensor:
    """Centred within-class scatter sum_i (h_i - m_{y_i})(h_i - m_{y_i})^T, float64.

    features: (N, d) float; labels: (N,) int32/int64 (rows out of [0, K) are skipped);
    means: (K, d) float, the centres m_k; basis: optional (d, r) float B, in which case
    the (r, r) projection B^T S B is returned without forming the (d, d) scatter.
    Rows are centred in float64 and rounded once to the compute dtype (float32 for
    fp16/bf16/fp32 input, float64 for fp64); products are summed in float64.
    """
    check_backend(features, "features")
    return torch.ops.collapse_ext.within_scatter.default(features, labels, means, basis)


@torch.library.register_fake("collapse_ext::class_stats")
def _class_stats_fake(features, labels, num_classes):
    torch._check(features.dim() == 2, lambda: "features must be 2-D (N, d)")
    torch._check(labels.dim() == 1, lambda: "labels must be 1-D (N,)")
    d = features.shape[1]
    return (
        features.new_empty((num_classes,), dtype=torch.int64),
        features.new_empty((num_classes, d), dtype=torch.float64),
        features.new_empty((num_classes,), dtype=torch.float64),
    )


@torch.library.register_fake("collapse_ext::within_scatter")
def _within_scatter_fake(features, labels, means, basis=None):
    torch._check(features.dim() == 2, lambda: "features must be 2-D (N, d)")
    r = basis.shape[1] if basis is not None else features.shape[1]
    return features.new_empty((r, r), dtype=torch.float64)


def lpm_step(
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
    """``num_iters`` projected-gradient iterations of the class-collapsed Layer-Peeled Model
    for a batch of B independent instances, fused (one kernel call, all iterations inside).

    W, H, W_prev, H_prev: (B, K, p) float32/float64, the iterate X = (W, H) and the
    previous one (momentum); theta: (B,) FISTA sequence (1 = no momentum yet);
    weights: (B, K) per-class loss weights c_k = n_k / N * loss_weight_k;
    E_W, E_H: (B,) constraint levels; step: (B,) step sizes eta. All of W's dtype and device.
    loss: "ce" (logsumexp(z) - z_k) or "mse" (0.5 ||z - e_k||^2), logits z_k = W h_k.

    Objective f = sum_k c_k L(W h_k, k) s.t. (1/K) ||W||_F^2 <= E_W, (1/K) ||H||_F^2 <= E_H
    (Fang, He, Long, Su 2021, class-collapsed form). With momentum (FISTA, Beck & Teboulle
    2009, with the gradient restart of O'Donoghue & Candes 2015) one iteration is
        theta' = (1 + sqrt(1 + 4 theta^2)) / 2,  Y = X + (theta - 1) / theta' (X - X_prev),
        X+ = P(Y - eta grad f(Y)),  theta <- 1 if <Y - X+, X+ - X> > 0 else theta';
    without it Y = X (plain projected gradient) and theta is returned unchanged. P rescales
    each block radially onto its ball. Accumulates in the input dtype.
    Returns (W, H, W_prev, H_prev, theta, objective, pg_norm), the last two (B,) at the
    returned X; pg_norm = ||X - P(X - eta grad f(X))||_F / eta (gradient mapping).
    """
    check_backend(W, "W")
    return torch.ops.collapse_ext.lpm_step.default(
        W, H, W_prev, H_prev, theta, weights, E_W, E_H, step, num_iters, loss, momentum
    )


@torch.library.register_fake("collapse_ext::lpm_step")
def _lpm_step_fake(W, H, W_prev, H_prev, theta, weights, E_W, E_H, step, num_iters, loss="ce", momentum=True):
    torch._check(W.dim() == 3, lambda: "W must be 3-D (B, K, p)")
    torch._check(H.shape == W.shape, lambda: "H must have the shape of W (B, K, p)")
    batch = W.shape[0]
    return (
        W.new_empty(W.shape),
        W.new_empty(W.shape),
        W.new_empty(W.shape),
        W.new_empty(W.shape),
        W.new_empty((batch,)),
        W.new_empty((batch,)),
        W.new_empty((batch,)),
    )
