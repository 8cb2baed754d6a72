"""Exact merging of ClassStats: with another accumulator (Chan et al.) and across the
ranks of a torch.distributed group."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .class_stats import ClassStats


class Mergeable:
    """``merge`` and ``all_reduce`` of ClassStats (folded states only)."""

    def _merged(self, other: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Chan et al. pairwise merge of this (folded) state with another (counts, means, sqdev[, scatter])."""
        mine = self._parts()
        n_a, mu_a, ss_a = mine[:3]
        n_b, mu_b, ss_b = other[:3]
        n = n_a + n_b
        na, nb, nf = n_a.double(), n_b.double(), n.double()
        safe = nf.clamp_min(1.0)
        delta = mu_b.double() - mu_a.double()
        mu = mu_a.double() + delta * (nb / safe).unsqueeze(1)
        c = na * nb / safe
        ss = ss_a + ss_b + c * (delta * delta).sum(1)
        merged = (n, mu, ss)
        if self._sw is not None:
            scaled = delta * c.unsqueeze(1)
            merged += (mine[3] + other[3] + scaled.T @ delta,)
        return merged

    def merge(self, other: ClassStats) -> ClassStats:
        """Fold another accumulator's statistics into this one (exact, order-independent
        up to rounding). ``other`` is not modified."""
        if not isinstance(other, Mergeable):
            raise TypeError(f"Expected `other` to be a ClassStats, got {type(other).__name__}")
        if (other.num_classes, other.dim) != (self.num_classes, self.dim):
            raise ValueError(
                f"Expected `other` with num_classes={self.num_classes}, dim={self.dim}, "
                f"got num_classes={other.num_classes}, dim={other.dim}"
            )
        if self.within_cov_enabled and not other.within_cov_enabled:
            raise ValueError("Expected `other` to track within_cov like this ClassStats")
        other.check_rejected()
        parts = other._parts()[: 4 if self._sw is not None else 3]
        self._assign(self._merged(tuple(p.to(self.device) for p in parts)))
        self._folded_rows = int(self._n.sum())
        return self

    def all_reduce(self, group: Any = None) -> ClassStats:
        """Merge the statistics of every rank of ``group`` exactly; all ranks end equal.

        First one small all-gather checks that every rank has the same K, d, within_cov
        and state dtype (a mismatch raises the same error on every rank). Then two sum
        all-reduces (any backend): counts and n_k mu_k, which give the pooled means; then
        ss_k and S_W plus every rank's between-shard terms n_rk ||mu_rk - mu_k||^2 and
        n_rk (mu_rk - mu_k)(mu_rk - mu_k)^T about those pooled means. Same result as
        Chan's merge, with O(state) memory.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("all_reduce needs torch.distributed to be initialised (init_process_group)")
        self._agree_shapes(dist, group)
        self.check_rejected()
        self._fold()
        k, d = self.num_classes, self.dim
        n_local = self._n.double()
        mu_local = self._exact_means().double()
        first = torch.cat([n_local, (mu_local * n_local.unsqueeze(1)).flatten()])
        dist.all_reduce(first, group=group)
        n = first[:k]
        mu = first[k:].view(k, d) / n.clamp_min(1.0).unsqueeze(1)
        delta = mu_local - mu
        delta = torch.where(n_local.unsqueeze(1) > 0, delta, torch.zeros_like(delta))
        second = [self._ss + n_local * (delta * delta).sum(1)]
        if self._sw is not None:
            second.append((self._exact_scatter() + (delta * n_local.unsqueeze(1)).T @ delta).flatten())
        flat = torch.cat(second)
        dist.all_reduce(flat, group=group)
        parts = (n.round().long(), mu, flat[:k].clone())
        if self._sw is not None:
            parts += (flat[k:].view(d, d).clone(),)
        self._assign(parts)
        self._folded_rows = int(self._n.sum())
        return self

    def _agree_shapes(self, dist: Any, group: Any) -> None:
        mine = torch.tensor(
            [self.num_classes, self.dim, int(self.within_cov_enabled), int(self.state_dtype == torch.float64)],
            dtype=torch.int64,
        )
        backend = dist.get_backend(group)
        device = self.device if backend == "nccl" else torch.device("cpu")
        world = dist.get_world_size(group)
        gathered = [torch.empty_like(mine, device=device) for _ in range(world)]
        dist.all_gather(gathered, mine.to(device), group=group)
        seen = {tuple(int(v) for v in g.cpu()) for g in gathered}
        if len(seen) > 1:
            names = "(num_classes, dim, within_cov, float64 state)"
            raise ValueError(
                f"Expected every rank to hold ClassStats of the same {names}, got {sorted(seen)}; "
                "construct them identically on every rank"
            )
