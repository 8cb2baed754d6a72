"""Streaming sufficient statistics of neural collapse (SPEC: "Sufficient statistics").

``ClassStats`` accumulates, per class, the count n_k, the mean mu_k and the sum of
squared deviations ss_k, and optionally the pooled within-class scatter S_W. Each batch
is reduced about its own class means by the fused ``class_stats`` / ``within_scatter``
kernels, then merged with the exact pairwise update of Chan, Golub & LeVeque (1979):

    n = n_a + n_b,  delta = mu_b - mu_a,  c = n_a n_b / n
    mu = mu_a + delta n_b / n,  ss = ss_a + ss_b + c ||delta||^2,
    S_W = S_W,a + S_W,b + sum_k c_k delta_k delta_k^T.

The state is float64 whatever the feature dtype. The one-pass identity
sum h h^T - n mu mu^T is never used: on collapsed features it loses every digit.
"""

from __future__ import annotations

from typing import Any

import torch

from ._ops import check_backend, class_stats, within_scatter

__all__ = ["ClassStats"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LABEL_DTYPES = (torch.int32, torch.int64)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"Expected `{name}` to be a positive int, got {value!r}")
    return value


def _choice(value: Any, name: str, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ValueError(f"Expected `{name}` to be one of {options}, got {value!r}")
    return value


class ClassStats:
    """Exact, mergeable per-class statistics of features (N, d) with labels in [0, K).

    Args:
        num_classes: K, the number of classes.
        dim: d, the feature dimension.
        device: where the float64 state lives; ``None`` follows the first batch.
        within_cov: also accumulate the (d, d) within-class scatter S_W (the only
            O(d^2) state; everything else is O(K d)).
        global_mean: ``"sample"`` (sum_k n_k mu_k / N, Papyan et al. 2020) or
            ``"class"`` (plain average of the present class means).
        check: ``"strict"`` validates every batch and raises at once (on CUDA that is one
            host synchronisation per update); ``"deferred"`` never synchronises: a bad
            batch (labels out of range, NaN/Inf) is dropped on the device and
            ``check_rejected()`` (called by every read of the statistics) raises.

    Example::

        stats = ClassStats(num_classes=10, dim=64)
        for x, y in loader:
            stats.update(model.features(x), y)
        print(stats.within_cov().trace(), stats.between_cov().trace())
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        device: torch.device | str | None = None,
        within_cov: bool = True,
        global_mean: str = "sample",
        check: str = "strict",
    ) -> None:
        self.num_classes = _positive_int(num_classes, "num_classes")
        self.dim = _positive_int(dim, "dim")
        self.within_cov_enabled = bool(within_cov)
        self.global_mean_mode = _choice(global_mean, "global_mean", ("sample", "class"))
        self.check = _choice(check, "check", ("strict", "deferred"))
        self._follow_data = device is None
        self._allocate(torch.device("cpu") if device is None else torch.device(device))

    # ------------------------------------------------------------------ state
    def _allocate(self, device: torch.device) -> None:
        k, d = self.num_classes, self.dim
        f64 = dict(dtype=torch.float64, device=device)
        self.counts = torch.zeros(k, dtype=torch.int64, device=device)
        self.means = torch.zeros(k, d, **f64)
        self.sqdev = torch.zeros(k, **f64)
        self.scatter = torch.zeros(d, d, **f64) if self.within_cov_enabled else None
        self._rejected = torch.zeros((), dtype=torch.int64, device=device)

    @property
    def device(self) -> torch.device:
        return self.counts.device

    def reset(self) -> None:
        """Forget everything accumulated (the device is kept)."""
        self._allocate(self.device)

    def _parts(self) -> tuple[torch.Tensor, ...]:
        parts = (self.counts, self.means, self.sqdev)
        return parts + ((self.scatter,) if self.scatter is not None else ())

    def _assign(self, parts: tuple[torch.Tensor, ...]) -> None:
        self.counts, self.means, self.sqdev = parts[:3]
        if self.scatter is not None:
            self.scatter = parts[3]

    # ----------------------------------------------------------------- update
    def _validate(self, features: Any, labels: Any) -> None:
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"Expected `features` to be a torch.Tensor, got {type(features).__name__}")
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"Expected `labels` to be a torch.Tensor, got {type(labels).__name__}")
        if features.dim() > 2:
            raise ValueError(
                f"Expected `features` of shape (N, d), got {tuple(features.shape)}: pool or flatten "
                "conv features first, e.g. features.mean(dim=(2, 3)) or features.flatten(1)"
            )
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"Expected `features` of shape (N, {self.dim}), got {tuple(features.shape)}")
        if features.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"Expected `features` to be float16/bfloat16/float32/float64, got {features.dtype}")
        if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
            raise ValueError(
                f"Expected `labels` of shape ({features.shape[0]},) to match `features`, got {tuple(labels.shape)}"
            )
        if labels.dtype not in _LABEL_DTYPES:
            raise TypeError(f"Expected `labels` to be int32 or int64, got {labels.dtype}")
        if labels.device != features.device:
            raise ValueError(f"Expected `labels` on {features.device} like `features`, got {labels.device}")
        check_backend(features, "features")

    def _place(self, features: torch.Tensor) -> None:
        if features.device == self.device:
            return
        if self._follow_data and int(self.counts.sum()) == 0:
            self._allocate(features.device)
            return
        raise ValueError(f"Expected `features` on {self.device} (the statistics' device), got {features.device}")

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> ClassStats:
        """Add a batch: features (N, d) float (any of fp16/bf16/fp32/fp64, strided rows
        allowed), labels (N,) int32/int64 in [0, K). A batch that fails validation raises
        and leaves the statistics as they were."""
        self._validate(features, labels)
        self._place(features)
        if features.shape[0] == 0:
            return self
        k = self.num_classes
        invalid = ((labels < 0) | (labels >= k)).sum()
        if self.check == "strict" and int(invalid) > 0:
            lo, hi = int(labels.min()), int(labels.max())
            raise ValueError(f"Expected `labels` in [0, {k}), got values in [{lo}, {hi}]")
        counts, means, sqdev = class_stats(features, labels, k)
        finite = torch.isfinite(means).all() & torch.isfinite(sqdev).all()
        if self.check == "strict" and not bool(finite):
            raise ValueError("Expected finite `features`, got NaN or Inf")
        batch = (counts, means, sqdev)
        if self.scatter is not None:
            batch += (within_scatter(features, labels, means),)
        merged = self._merged(batch)
        if self.check == "deferred":
            ok = finite & (invalid == 0)
            merged = tuple(torch.where(ok, new, old) for new, old in zip(merged, self._parts()))
            self._rejected = self._rejected + (~ok).long()
        self._assign(merged)
        return self

    def _merged(self, other: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Chan et al. pairwise merge of this state with another (counts, means, sqdev[, scatter])."""
        n_a, mu_a, ss_a = self.counts, self.means, self.sqdev
        n_b, mu_b, ss_b = other[:3]
        n = n_a + n_b
        na, nb, nf = n_a.double(), n_b.double(), n.double()
        safe = nf.clamp_min(1.0)
        delta = mu_b - mu_a
        mu = mu_a + delta * (nb / safe).unsqueeze(1)
        c = na * nb / safe
        ss = ss_a + ss_b + c * (delta * delta).sum(1)
        merged = (n, mu, ss)
        if self.scatter is not None:
            scaled = delta * c.unsqueeze(1)
            merged += (self.scatter + other[3] + scaled.T @ delta,)
        return merged

    def merge(self, other: ClassStats) -> ClassStats:
        """Fold another accumulator's statistics into this one (exact, order-independent
        up to rounding)."""
        if not isinstance(other, ClassStats):
            raise TypeError(f"Expected `other` to be a ClassStats, got {type(other).__name__}")
        if (other.num_classes, other.dim) != (self.num_classes, self.dim):
            raise ValueError(
                f"Expected `other` with num_classes={self.num_classes}, dim={self.dim}, "
                f"got num_classes={other.num_classes}, dim={other.dim}"
            )
        if self.within_cov_enabled and not other.within_cov_enabled:
            raise ValueError("Expected `other` to track within_cov like this ClassStats")
        other.check_rejected()
        parts = other._parts()[:3] + ((other.scatter,) if self.scatter is not None else ())
        self._assign(self._merged(tuple(p.to(self.device) for p in parts)))
        return self

    def all_reduce(self, group: Any = None) -> ClassStats:
        """Merge the statistics of every rank of ``group`` exactly; all ranks end equal.

        Two sum all-reduces (any backend): first counts and n_k mu_k, which give the
        pooled means; then ss_k and S_W plus every rank's between-shard terms
        n_rk ||mu_rk - mu_k||^2 and n_rk (mu_rk - mu_k)(mu_rk - mu_k)^T about those
        pooled means. Same result as Chan's merge, with O(state) memory.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("all_reduce needs torch.distributed to be initialised (init_process_group)")
        self.check_rejected()
        k, d = self.num_classes, self.dim
        n_local = self.counts.double()
        first = torch.cat([n_local, (self.means * n_local.unsqueeze(1)).flatten()])
        dist.all_reduce(first, group=group)
        n = first[:k]
        mu = first[k:].view(k, d) / n.clamp_min(1.0).unsqueeze(1)
        delta = self.means - mu
        delta = torch.where(n_local.unsqueeze(1) > 0, delta, torch.zeros_like(delta))
        second = [self.sqdev + n_local * (delta * delta).sum(1)]
        if self.scatter is not None:
            second.append((self.scatter + (delta * n_local.unsqueeze(1)).T @ delta).flatten())
        flat = torch.cat(second)
        dist.all_reduce(flat, group=group)
        self.counts = n.round().long()
        self.means = mu
        self.sqdev = flat[:k].clone()
        if self.scatter is not None:
            self.scatter = flat[k:].view(d, d).clone()
        return self

    # ------------------------------------------------------------------ reads
    def check_rejected(self) -> None:
        """Raise if a deferred-check update dropped a bad batch (one host sync)."""
        if self.check == "deferred" and int(self._rejected) > 0:
            raise ValueError(
                f"{int(self._rejected)} batch(es) were dropped: labels outside [0, {self.num_classes}) "
                "or NaN/Inf features (check='deferred')"
            )

    @property
    def num_samples(self) -> int:
        return int(self.counts.sum())

    @property
    def present(self) -> torch.Tensor:
        """(K,) bool mask of classes with n_k > 0."""
        return self.counts > 0

    def class_variances(self) -> torch.Tensor:
        """sigma_k^2 = ss_k / n_k, (K,) float64 (0 for absent classes)."""
        return self.sqdev / self.counts.clamp_min(1).double()

    def global_mean(self, mode: str | None = None) -> torch.Tensor:
        """mu_G (d,) float64: ``"sample"`` weights classes by n_k (Papyan et al.),
        ``"class"`` averages the present class means."""
        self.check_rejected()
        mode = _choice(mode or self.global_mean_mode, "mode", ("sample", "class"))
        w = self.counts.double() if mode == "sample" else self.present.double()
        return (w.unsqueeze(1) * self.means).sum(0) / w.sum().clamp_min(1.0)

    def centred_means(self, mode: str | None = None) -> torch.Tensor:
        """M~ (K', d): rows mu_k - mu_G of the present classes, in class order."""
        return self.means[self.present] - self.global_mean(mode)

    def within_cov(self) -> torch.Tensor:
        """Sigma_W = S_W / N, (d, d) float64."""
        self.check_rejected()
        if self.scatter is None:
            raise RuntimeError("within_cov() needs ClassStats(..., within_cov=True)")
        return self.scatter / max(self.num_samples, 1)

    def between_cov(self, weighting: str = "class", mode: str | None = None) -> torch.Tensor:
        """Sigma_B (d, d) float64: ``"class"`` = (1/K') sum_k (mu_k - mu_G)(mu_k - mu_G)^T
        over present classes (Papyan et al.); ``"sample"`` = sum_k (n_k/N)(...)(...)^T
        (He & Su)."""
        _choice(weighting, "weighting", ("class", "sample"))
        centred = self.centred_means(mode)
        if weighting == "class":
            w = torch.full((centred.shape[0],), 1.0 / max(centred.shape[0], 1), dtype=torch.float64, device=self.device)
        else:
            w = self.counts[self.present].double() / max(self.num_samples, 1)
        return (centred * w.unsqueeze(1)).T @ centred

    # ------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:
        state = {
            "num_classes": self.num_classes,
            "dim": self.dim,
            "within_cov": self.within_cov_enabled,
            "global_mean": self.global_mean_mode,
            "counts": self.counts.clone(),
            "means": self.means.clone(),
            "sqdev": self.sqdev.clone(),
            "rejected": self._rejected.clone(),
        }
        if self.scatter is not None:
            state["scatter"] = self.scatter.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        meta = (state["num_classes"], state["dim"], state["within_cov"])
        if meta != (self.num_classes, self.dim, self.within_cov_enabled):
            raise ValueError(
                f"Expected a state with (num_classes, dim, within_cov) = "
                f"{(self.num_classes, self.dim, self.within_cov_enabled)}, got {meta}"
            )
        device = self.device
        self.global_mean_mode = state["global_mean"]
        self.counts = state["counts"].to(device, torch.int64).clone()
        self.means = state["means"].to(device, torch.float64).clone()
        self.sqdev = state["sqdev"].to(device, torch.float64).clone()
        self._rejected = state.get("rejected", torch.zeros((), dtype=torch.int64)).to(device).clone()
        if self.scatter is not None:
            self.scatter = state["scatter"].to(device, torch.float64).clone()

    def __repr__(self) -> str:
        return (
            f"ClassStats(num_classes={self.num_classes}, dim={self.dim}, samples={self.num_samples}, "
            f"present={int(self.present.sum())}, within_cov={self.within_cov_enabled}, device={self.device})"
        )
