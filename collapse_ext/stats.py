"""Streaming sufficient statistics of neural collapse (SPEC: "Sufficient statistics").

``ClassStats`` accumulates, per class, the count n_k, the mean mu_k and the sum of
squared deviations ss_k, and optionally the pooled within-class scatter S_W.

How an update stays exact and costs one GEMM
---------------------------------------------
Rows are centred about a per-class *shift* c_k: the class mean at the last fold (for a
class first seen in the current block, its first row). Between folds ("the pending
block", at most ``fold_rows`` rows) an update only adds, with no host synchronisation
in ``check="deferred"`` mode and O(rows x d) work whatever K:

    m_k += 1,  t_k += e_i,  q_k += ||e_i||^2,  P += e_i e_i^T,   e_i = h_i - c_{y_i},

with e_i formed in float64 and P accumulated in float32 (float64 for fp64 features, or
when float32 could overflow). A fold (every ``fold_rows`` rows, and before any read)
merges the block exactly: with N_k = n_k + m_k and c_k the exact mean of the n_k folded
rows (Chan, Golub & LeVeque 1979),

    mu_k <- c_k + t_k / N_k,   ss_k <- ss_k + q_k - ||t_k||^2 / N_k,
    S_W  <- S_W + P - sum_k t_k t_k^T / N_k.

Because c_k is within a few standard deviations of the class mean, e_i carries no common
offset and the correction term is small: nothing cancels, even on fully collapsed
features. The one-pass identity sum h h^T - n mu mu^T is never used.
"""

from __future__ import annotations

from typing import Any

import torch

from ._ops import check_backend, class_accumulate
from ._validate import choice, float_dtype, positive_int, tensor

__all__ = ["ClassStats"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LABEL_DTYPES = (torch.int32, torch.int64)
_STATE_DTYPES = (torch.float64, torch.float32)
# Largest |e| for which a float32 product over a pending block stays finite:
# block_rows * |e|^2 must stay below float32's max (3.4e38) with room to spare.
_F32_LIMIT = 1e36
_F64_LIMIT = 1e300


class ClassStats:
    """Exact, mergeable per-class statistics of features (N, d) with labels in [0, K).

    Args:
        num_classes: K, the number of classes.
        dim: d, the feature dimension.
        device: where the state lives; ``None`` follows the first batch.
        within_cov: also accumulate the (d, d) within-class scatter S_W (the only
            O(d^2) state; everything else is O(K d)).
        global_mean: ``"sample"`` (sum_k n_k mu_k / N, Papyan et al. 2020) or
            ``"class"`` (plain average of the present class means).
        check: ``"strict"`` validates every batch and raises at once (on CUDA that is one
            host synchronisation per update); ``"deferred"`` never synchronises: a bad
            batch (labels out of range, NaN/Inf, values whose products overflow float32)
            is dropped on the device and ``check_rejected()`` (called by every read of the
            statistics) raises, counting the batches and rows dropped.
        state_dtype: dtype of the two (K, d) arrays (the means and the pending sums):
            float64 (default) or float32, which halves the memory at vocabulary-sized K
            at the cost of rounding the means to float32 (see the README's memory table).
        fold_rows: rows per pending block (float32 products are exact enough over this
            many rows; see the module docstring).

    Memory: two (K, d) ``state_dtype`` arrays plus, with ``within_cov``, one (d, d)
    float64 and one (d, d) float32 matrix.

    Example::

        stats = ClassStats(num_classes=10, dim=64)
        for x, y in loader:
            stats.update(model.features(x), y)   # inputs that require grad are detached
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
        state_dtype: torch.dtype = torch.float64,
        fold_rows: int = 32768,
    ) -> None:
        self.num_classes = positive_int(num_classes, "num_classes")
        self.dim = positive_int(dim, "dim")
        if not isinstance(within_cov, bool):
            raise ValueError(f"Expected `within_cov` to be a bool, got {within_cov!r}")
        self.within_cov_enabled = within_cov
        self.global_mean_mode = choice(global_mean, "global_mean", ("sample", "class"))
        self.check = choice(check, "check", ("strict", "deferred"))
        self.state_dtype = float_dtype(state_dtype, "state_dtype", _STATE_DTYPES)
        self.fold_rows = positive_int(fold_rows, "fold_rows")
        self._follow_data = device is None
        self._allocate(torch.device("cpu") if device is None else torch.device(device))

    # ------------------------------------------------------------------ state
    def _allocate(self, device: torch.device) -> None:
        k, d = self.num_classes, self.dim
        f64 = dict(dtype=torch.float64, device=device)
        state = dict(dtype=self.state_dtype, device=device)
        with torch.inference_mode(False):
            # Folded state: exact statistics of every row up to the last fold.
            self._n = torch.zeros(k, dtype=torch.int64, device=device)
            self._mu = torch.zeros(k, d, **state)
            self._ss = torch.zeros(k, **f64)
            self._sw = torch.zeros(d, d, **f64) if self.within_cov_enabled else None
            # Pending block, about the shifts c_k (= _mu rows).
            self._m = torch.zeros(k, dtype=torch.int64, device=device)
            self._t = torch.zeros(k, d, **state)
            self._q = torch.zeros(k, **f64)
            self._p = torch.zeros(d, d, dtype=torch.float32, device=device) if self.within_cov_enabled else None
            self._p64: torch.Tensor | None = None
            self._rejected = torch.zeros(2, dtype=torch.int64, device=device)  # batches, rows
        self._pending_rows = 0
        self.wide_product = False

    @property
    def device(self) -> torch.device:
        return self._n.device

    def reset(self) -> None:
        """Forget everything accumulated (the device is kept)."""
        self._allocate(self.device)

    @property
    def counts(self) -> torch.Tensor:
        """n_k, (K,) int64."""
        self._fold()
        return self._n

    @property
    def means(self) -> torch.Tensor:
        """mu_k, (K, d) ``state_dtype`` (zero rows for absent classes)."""
        self._fold()
        return self._mu

    @property
    def sqdev(self) -> torch.Tensor:
        """ss_k = sum_{i: y_i = k} ||h_i - mu_k||^2, (K,) float64."""
        self._fold()
        return self._ss

    @property
    def scatter(self) -> torch.Tensor | None:
        """S_W = sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T, (d, d) float64 (None without within_cov)."""
        self._fold()
        return self._sw

    def _parts(self) -> tuple[torch.Tensor, ...]:
        """The folded state (counts, means, sqdev[, scatter])."""
        self._fold()
        parts = (self._n, self._mu, self._ss)
        return parts + ((self._sw,) if self._sw is not None else ())

    def _assign(self, parts: tuple[torch.Tensor, ...]) -> None:
        self._n, self._mu, self._ss = parts[0], parts[1].to(self.state_dtype), parts[2]
        if self._sw is not None:
            self._sw = parts[3]

    # ----------------------------------------------------------------- update
    def _validate(self, features: Any, labels: Any) -> None:
        tensor(features, "features")
        tensor(labels, "labels")
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
        if self._follow_data and self._pending_rows == 0 and int(self._n.sum()) == 0:
            self._allocate(features.device)
            return
        raise ValueError(f"Expected `features` on {self.device} (the statistics' device), got {features.device}")

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> ClassStats:
        """Add a batch: features (N, d) float (any of fp16/bf16/fp32/fp64, strided rows
        allowed; detached), labels (N,) integer in [0, K). A batch that fails validation
        raises (strict) or is dropped whole (deferred) and leaves the statistics as they
        were. Costs O(N d) plus one (d, d) rank-N product; no O(K d) work."""
        self._validate(features, labels)
        self._place(features)
        rows = features.shape[0]
        if rows == 0:
            return self
        with torch.no_grad(), torch.inference_mode(False), torch.autocast(features.device.type, enabled=False):
            self._add(features.detach(), labels.detach().long())
        return self

    def _add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        rows, strict = x.shape[0], self.check == "strict"
        if self._pending_rows + rows > self.fold_rows:
            self._fold(sync=strict)
        fp64 = x.dtype == torch.float64
        # Every entry of a pending block's products is at most block * max_i ||e_i||^2.
        # Strict mode accepts anything float64 can sum and widens the product when float32
        # cannot; deferred mode cannot choose without a sync, so it refuses such a batch.
        block = max(self.fold_rows, rows)
        limit = (_F64_LIMIT if strict or fp64 else _F32_LIMIT) / block
        centred, status = class_accumulate(x, y, self._n, self._mu, self._m, self._t, self._q, limit)
        wide = False
        if strict:
            accepted, peak, bad_label, bad_row = status.tolist()
            if not accepted:
                self._raise_refused(x, y, peak, int(bad_label), int(bad_row))
            wide = not fp64 and peak * block > _F32_LIMIT
        else:
            refused = 1 - status[0].long()
            self._rejected += torch.stack([refused, refused * rows])
        if self._p is not None:
            if wide:  # recentre in float64: the shifts are the means rows now
                centred = x.double() - self._mu.index_select(0, y).double()
                self.wide_product = True
            if centred.dtype == torch.float64:
                if self._p64 is None:
                    self._p64 = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=x.device)
                self._p64.addmm_(centred.T, centred)
            else:
                self._p.addmm_(centred.T, centred)
        self._pending_rows += rows

    def _raise_refused(self, x: torch.Tensor, y: torch.Tensor, peak: float, bad_label: int, bad_row: int) -> None:
        if bad_label >= 0:
            lo, hi = (int(v) for v in torch.aminmax(y))
            raise ValueError(
                f"Expected `labels` in [0, {self.num_classes}), got values in [{lo}, {hi}] (first bad row {bad_label})"
            )
        if bad_row >= 0:
            raise ValueError(f"Expected finite `features`, got NaN or Inf in row {bad_row}")
        raise ValueError(
            "Expected `features` whose within-class deviations fit in float64 sums of squares, got a squared "
            f"deviation of {peak:.3g} in one row"
        )

    def _fold(self, sync: bool = True) -> None:
        """Merge the pending block into the folded state (exact; see the module docstring).

        With ``sync`` the classes touched since the last fold are found first (one host
        synchronisation) and only their rows are visited: O(touched x d + d^2). Without
        it (deferred mode, inside an update) every row is: O(K d), no synchronisation."""
        if self._pending_rows == 0:
            return
        with torch.no_grad(), torch.inference_mode(False):
            rows = self._m.nonzero().squeeze(1) if sync else None

            def take(a: torch.Tensor) -> torch.Tensor:
                return a if rows is None else a.index_select(0, rows)

            m = take(self._m)
            n = take(self._n) + m
            nf = n.double().clamp_min(1.0)
            t = take(self._t).double()
            mu = (take(self._mu).double() + t / nf.unsqueeze(1)).to(self.state_dtype)
            ss = take(self._ss) + take(self._q) - (t * t).sum(1) / nf
            if self._sw is not None:
                scaled = t / nf.sqrt().unsqueeze(1)
                self._sw += self._p.double()
                self._sw -= scaled.T @ scaled
                if self._p64 is not None:
                    self._sw += self._p64
                    self._p64 = None
                self._p.zero_()
            if rows is None:
                self._n, self._mu, self._ss = n, mu, ss
                self._t.zero_()
                self._m.zero_()
                self._q.zero_()
            else:
                self._n.index_copy_(0, rows, n)
                self._mu.index_copy_(0, rows, mu)
                self._ss.index_copy_(0, rows, ss)
                self._t.index_fill_(0, rows, 0.0)
                self._m.index_fill_(0, rows, 0)
                self._q.index_fill_(0, rows, 0.0)
        self._pending_rows = 0

    def _merged(self, other: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Chan et al. pairwise merge of this (folded) state with another (counts, means, sqdev[, scatter])."""
        n_a, mu_a, ss_a = self._parts()[:3]
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
            merged += (self._sw + other[3] + scaled.T @ delta,)
        return merged

    def merge(self, other: ClassStats) -> ClassStats:
        """Fold another accumulator's statistics into this one (exact, order-independent
        up to rounding). ``other`` is not modified."""
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
        parts = other._parts()[:3] + ((other._sw,) if self._sw is not None else ())
        self._assign(self._merged(tuple(p.to(self.device) for p in parts)))
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
        mu_local = self._mu.double()
        first = torch.cat([n_local, (mu_local * n_local.unsqueeze(1)).flatten()])
        dist.all_reduce(first, group=group)
        n = first[:k]
        mu = first[k:].view(k, d) / n.clamp_min(1.0).unsqueeze(1)
        delta = mu_local - mu
        delta = torch.where(n_local.unsqueeze(1) > 0, delta, torch.zeros_like(delta))
        second = [self._ss + n_local * (delta * delta).sum(1)]
        if self._sw is not None:
            second.append((self._sw + (delta * n_local.unsqueeze(1)).T @ delta).flatten())
        flat = torch.cat(second)
        dist.all_reduce(flat, group=group)
        self._n = n.round().long()
        self._mu = mu.to(self.state_dtype)
        self._ss = flat[:k].clone()
        if self._sw is not None:
            self._sw = flat[k:].view(d, d).clone()
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

    # ------------------------------------------------------------------ reads
    def check_rejected(self) -> None:
        """Raise if a deferred-check update dropped a bad batch (one host sync)."""
        if self.check != "deferred":
            return
        batches, rows = (int(v) for v in self._rejected.tolist())
        if batches > 0:
            raise ValueError(
                f"{batches} batch(es) were dropped ({rows} rows): labels outside [0, {self.num_classes}), "
                "NaN/Inf features, or values whose products overflow (check='deferred')"
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
        ``"class"`` averages the present class means. Computed in two stages (a first
        estimate, then the weighted mean of the residuals about it) so a large common
        offset leaves no error beyond the rounding of the means themselves."""
        self.check_rejected()
        mode = choice(mode or self.global_mean_mode, "mode", ("sample", "class"))
        present = self.present
        w = self.counts.double() if mode == "sample" else present.double()
        total = w.sum().clamp_min(1.0)
        mu = self.means.double()
        first = (w.unsqueeze(1) * mu).sum(0) / total
        residual = torch.where(present.unsqueeze(1), mu - first, 0.0)
        return first + (w.unsqueeze(1) * residual).sum(0) / total

    def centred_means(self, mode: str | None = None) -> torch.Tensor:
        """M~ (K', d) float64: rows mu_k - mu_G of the present classes, in class order."""
        return self.means[self.present].double() - self.global_mean(mode)

    def within_cov(self) -> torch.Tensor:
        """Sigma_W = S_W / N, (d, d) float64."""
        self.check_rejected()
        if not self.within_cov_enabled:
            raise RuntimeError("within_cov() needs ClassStats(..., within_cov=True)")
        return self.scatter / max(self.num_samples, 1)

    def between_weights(self, weighting: str = "class") -> torch.Tensor:
        """(K',) float64 class weights of Sigma_B over the present classes: ``"class"`` =
        1/K' (Papyan et al.), ``"sample"`` = n_k / N (He & Su)."""
        choice(weighting, "weighting", ("class", "sample"))
        present = self.present
        kp = int(present.sum())
        if weighting == "class":
            return torch.full((kp,), 1.0 / max(kp, 1), dtype=torch.float64, device=self.device)
        return self.counts[present].double() / max(self.num_samples, 1)

    def between_cov(self, weighting: str = "class", mode: str | None = None) -> torch.Tensor:
        """Sigma_B (d, d) float64 = sum_k w_k (mu_k - mu_G)(mu_k - mu_G)^T over the present
        classes, with the weights of ``between_weights(weighting)``."""
        w = self.between_weights(weighting)
        centred = self.centred_means(mode)
        return (centred * w.unsqueeze(1)).T @ centred

    # ------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:
        """The folded statistics and their metadata (tensors are copies)."""
        self._fold()
        state = {
            "num_classes": self.num_classes,
            "dim": self.dim,
            "within_cov": self.within_cov_enabled,
            "global_mean": self.global_mean_mode,
            "check": self.check,
            "state_dtype": str(self.state_dtype).replace("torch.", ""),
            "counts": self._n.clone(),
            "means": self._mu.clone(),
            "sqdev": self._ss.clone(),
            "rejected": self._rejected.clone(),
        }
        if self._sw is not None:
            state["scatter"] = self._sw.clone()
        return state

    def load_state_dict(self, state: Any) -> None:
        """Replace the statistics by a ``state_dict()``'s. Everything is validated first;
        a state that does not fit raises and leaves this object as it was."""
        parts = _checked_state(state, self.num_classes, self.dim, self.within_cov_enabled)
        device = self.device
        with torch.inference_mode(False):
            counts, means, sqdev, scatter, rejected, mode = parts
            new = ClassStats.__new__(ClassStats)
            new.__dict__.update(self.__dict__)
            new._allocate(device)
        new._n = counts.to(device, torch.int64).clone()
        new._mu = means.to(device, self.state_dtype).clone()
        new._ss = sqdev.to(device, torch.float64).clone()
        if scatter is not None:
            new._sw = scatter.to(device, torch.float64).clone()
        new._rejected = rejected.to(device).clone()
        new.global_mean_mode = mode
        self.__dict__.update(new.__dict__)

    def __repr__(self) -> str:
        return (
            f"ClassStats(num_classes={self.num_classes}, dim={self.dim}, samples={self.num_samples}, "
            f"present={int(self.present.sum())}, within_cov={self.within_cov_enabled}, device={self.device})"
        )


def _checked_state(state: Any, k: int, d: int, within_cov: bool) -> tuple:
    """Validate a ClassStats state dict against (K, d, within_cov); return its parts."""
    if not isinstance(state, dict):
        raise TypeError(f"Expected `state` to be a dict from ClassStats.state_dict(), got {type(state).__name__}")
    required = ["num_classes", "dim", "within_cov", "global_mean", "counts", "means", "sqdev"]
    required += ["scatter"] if within_cov else []
    missing = [key for key in required if key not in state]
    if missing:
        raise ValueError(f"Expected `state` to have the keys {required}, missing {missing}")
    meta = (state["num_classes"], state["dim"], state["within_cov"])
    if meta != (k, d, within_cov):
        raise ValueError(f"Expected a state with (num_classes, dim, within_cov) = {(k, d, within_cov)}, got {meta}")
    mode = choice(state["global_mean"], "state['global_mean']", ("sample", "class"))
    shapes = {"counts": (k,), "means": (k, d), "sqdev": (k,), "scatter": (d, d)}
    for key, shape in shapes.items():
        if key not in state or (key == "scatter" and not within_cov):
            continue
        value = state[key]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"Expected `state['{key}']` to be a tensor of shape {shape}, got {got}")
    counts = state["counts"]
    if counts.is_floating_point() or counts.is_complex() or counts.dtype == torch.bool:
        raise ValueError(f"Expected `state['counts']` to be an integer tensor, got {counts.dtype}")
    if bool((counts < 0).any()):
        raise ValueError("Expected `state['counts']` to be non-negative")
    for key in ("means", "sqdev", "scatter"):
        value = state.get(key) if (key != "scatter" or within_cov) else None
        if value is None:
            continue
        if not value.is_floating_point():
            raise ValueError(f"Expected `state['{key}']` to be a float tensor, got {value.dtype}")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"Expected `state['{key}']` to be finite")
    if bool((state["sqdev"] < 0).any()):
        raise ValueError("Expected `state['sqdev']` to be non-negative")
    rejected = state.get("rejected", torch.zeros(2, dtype=torch.int64))
    if not isinstance(rejected, torch.Tensor) or rejected.numel() not in (1, 2) or rejected.is_floating_point():
        raise ValueError("Expected `state['rejected']` to be an integer tensor of (batches[, rows])")
    rejected = rejected.reshape(-1).long()
    if rejected.numel() == 1:  # states saved before rows were counted
        rejected = torch.cat([rejected, torch.zeros(1, dtype=torch.int64)])
    return counts, state["means"], state["sqdev"], state.get("scatter") if within_cov else None, rejected, mode
