"""Typed wrappers over ``torch.ops.collapse_ext.*`` and their fake (meta) kernels.

The fake kernels give every op its output shapes without running it, so the ops trace
under ``torch.compile`` and pass ``torch.library.opcheck``.
"""

from __future__ import annotations

import torch

from . import _C

__all__ = ["class_stats", "cuda_compiled", "within_scatter"]


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
