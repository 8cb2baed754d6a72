"""ClassStats: the streaming accumulator (see the package docstring for the algebra)."""

from __future__ import annotations

import torch

from .._ops import class_accumulate, class_fold
from .._validate import choice, float_dtype, positive_int
from .batch import check_batch, refused_error
from .merge import Mergeable
from .slots import _FOLDED, _SLOTS, StatePersistence

__all__ = ["ClassStats"]

_STATE_DTYPES = (torch.float64, torch.float32)
# Largest |e| for which a float32 product over a pending block stays finite:
# block_rows * |e|^2 must stay below float32's max (3.4e38) with room to spare.
_F32_LIMIT = 1e36
_F64_LIMIT = 1e300


class ClassStats(StatePersistence, Mergeable):
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
        fold_rows: rows per pending block when it holds S_W's float32 products (exact
            enough over this many rows; see the package docstring).

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
        with torch.inference_mode(False):
            for slot in _SLOTS:
                value = None
                if self.within_cov_enabled or not slot.cov:
                    value = torch.zeros(self._shape(slot), dtype=self._dtype(slot), device=device)
                setattr(self, slot.attr, value)
        self._p64: torch.Tensor | None = None  # float64 products of the pending block, when needed
        self._pending_rows = 0
        self._folded_rows = 0
        self._p_rows = 0  # rows in the float32 products since they were last added to S_W
        self._corrections: list[tuple[torch.Tensor, float]] = []  # (c, sign): S_W += sign c^T c, not yet applied
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
        return self._exact_scatter()

    def _parts(self) -> tuple[torch.Tensor, ...]:
        """The folded state (counts, means, sqdev[, scatter]) about the exact means: a
        float32 state's stored means plus the rounding residual the last fold left
        (float64), and S_W without that residual's rank-one terms."""
        self._fold()
        parts = [getattr(self, slot.attr) for slot in self._active(_FOLDED)]
        parts[1] = self._exact_means()
        if self._sw is not None:
            parts[3] = self._exact_scatter()
        return tuple(parts)

    def _residual_scatter(self) -> torch.Tensor | None:
        """sum_k t_k t_k^T / n_k over the folded residuals t_k = n_k (exact - stored mean),
        which the folded S_W holds (it is the scatter about the stored means, see
        _merge_block); None when there is none (a float64 state) or when its trace, sum_k
        q_k, is below 1e-9 of S_W's: then it is under S_W's own float32 rounding and the
        O(K d^2) product is skipped (it matters only when the features' common offset is
        ~1e5 times their within-class spread or more)."""
        if self._sw is None or self.state_dtype == torch.float64:
            return None
        with torch.no_grad(), torch.inference_mode(False):
            if float(self._q.sum()) <= 1e-9 * float(self._sw.diagonal().sum()):
                return None
            g = self._t.double() / self._n.double().clamp_min(1.0).sqrt().unsqueeze(1)
            return g.T @ g

    def _exact_scatter(self) -> torch.Tensor | None:
        residual = self._residual_scatter()
        return self._sw if residual is None else self._sw - residual

    def _exact_means(self) -> torch.Tensor:
        """The folded means without their rounding: mu_k + t_k / n_k (after a fold t_k holds
        the residual n_k (exact - stored), zero with a float64 state)."""
        if self.state_dtype == torch.float64:
            return self._mu
        return self._mu.double() + self._t.double() / self._n.double().clamp_min(1.0).unsqueeze(1)

    def _assign(self, parts: tuple[torch.Tensor, ...]) -> None:
        """Replace the folded state (nothing pending) by (counts, means, sqdev[, scatter]);
        the means are rounded to the state dtype, their residual kept (class_fold's form)."""
        for slot, value in zip(self._active(_FOLDED), parts):
            if slot.attr != "_mu":
                setattr(self, slot.attr, value.to(self._dtype(slot)))
        exact = parts[1].double()
        n = self._n.double().clamp_min(1.0).unsqueeze(1)
        self._mu = exact.to(self.state_dtype)
        self._t = (n * (exact - self._mu.double())).to(self.state_dtype)
        self._q = self._t.double().square().sum(1) / n.squeeze(1)
        residual = self._residual_scatter()
        if residual is not None:
            self._sw = self._sw + residual

    # ----------------------------------------------------------------- update
    def _place(self, features: torch.Tensor) -> None:
        if features.is_cpu and self._n.is_cpu or features.device == self.device:
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
        check_batch(features, labels, self.dim)
        self._place(features)
        rows = features.shape[0]
        if rows == 0:
            return self
        x, y = features.detach(), labels.detach().long()
        # The inputs are detached and the state never requires grad, so nothing is
        # recorded by autograd. Inference mode would make new state tensors inference
        # tensors, and autocast could lower the products' precision: leave both, but
        # only when they are on (entering a context costs microseconds per update).
        device_type = x.device.type
        if torch.is_inference_mode_enabled() or torch.is_autocast_enabled(device_type):
            with torch.inference_mode(False), torch.autocast(device_type, enabled=False):
                self._add(x, y)
        else:
            self._add(x, y)
        return self

    def _add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        rows, strict = x.shape[0], self.check == "strict"
        if self._p_rows + rows > self.fold_rows and self._capped:
            self._fold(sync=strict)
        fp64 = x.dtype == torch.float64
        # Every entry of a pending block's products is at most block * max_i ||e_i||^2.
        # Strict mode accepts anything float64 can sum and widens the product when float32
        # cannot; deferred mode cannot choose without a sync, so it refuses such a batch.
        block = max(self.fold_rows, rows)
        limit = (_F64_LIMIT if strict or fp64 else _F32_LIMIT) / block
        centred, status = class_accumulate(
            x, y, self._n, self._mu, self._m, self._t, self._q, limit, return_centred=self._p is not None
        )
        wide = False
        if strict:
            accepted, peak, bad_label, bad_row = status.tolist()
            if not accepted:
                raise refused_error(y, self.num_classes, peak, int(bad_label), int(bad_row))
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
        self._p_rows += rows
        # Early blocks fold as soon as they hold as many rows as every fold before them
        # (1, 2, 4, ... batches), so no block is centred about shifts estimated from far
        # fewer rows than it holds: a poor shift leaves a rank-one term of about
        # d x the within-class variance in the float32 products, which costs digits.
        # These folds renew the shifts only: the products stay in float32 (up to
        # fold_rows rows in all) and their corrections wait, so no (d, d) work is done.
        # A float64 state without S_W has no float32 parts: it sums about any shift exactly
        # enough (each class's first shift is already its batch mean) and skips these
        # folds, each an O(touched x d) pass (package docstring).
        if (self._capped or self.state_dtype != torch.float64) and self._pending_rows >= self._folded_rows:
            self._fold(sync=strict, flush=False)

    def _fold(self, sync: bool = True, flush: bool = True) -> None:
        """Merge the pending block into the folded state (exact; see the module docstring).

        With ``sync`` the classes touched since the last fold are found first (one host
        synchronisation) and only their rows are visited: O(touched x d + d^2). Without
        it (deferred mode, inside an update) every row is: O(K d), no synchronisation.
        With ``flush`` (every read) the float32 products and the corrections of every
        fold since the last flush are added to S_W; without it they wait: the products
        about old and new shifts may share one sum because each fold's correction
        -t t^T / N depends only on that fold's block."""
        if self._pending_rows:
            self._merge_block(sync)
        if flush and self._p_rows:
            self._flush_products()
            self._p_rows = 0

    def _merge_block(self, sync: bool) -> None:
        """class_fold, O(K + touched x d); with S_W also its rank-one terms: -t_k t_k^T / N_k
        for each class folded and, with a float32 state, + r_k r_k^T / N_k for the rounding
        residual r_k = N_k (exact mean - stored mean) the fold leaves in the pending block
        (csrc/class_fold.h). With ``sync`` these rows are gathered for the classes touched
        since the last fold only (one host synchronisation), else for every class."""
        with torch.no_grad(), torch.inference_mode(False):
            if self._sw is None:
                class_fold(self._n, self._mu, self._m, self._t, self._q, self._ss)
            else:
                rows = self._m.nonzero().squeeze(1) if sync else None

                def take(a: torch.Tensor) -> torch.Tensor:
                    return a if rows is None else a.index_select(0, rows)

                root = (take(self._n) + take(self._m)).double().clamp_min(1.0).sqrt().unsqueeze(1)
                self._correct(take(self._t).double() / root, -1.0)
                class_fold(self._n, self._mu, self._m, self._t, self._q, self._ss)
                if self.state_dtype != torch.float64:
                    self._correct(take(self._t).double() / root, 1.0)
        self._folded_rows += self._pending_rows
        self._pending_rows = 0

    def _correct(self, rows: torch.Tensor, sign: float) -> None:
        """S_W += sign * rows^T rows: now if it costs a (d, d) pass anyway, else queued."""
        if rows.shape[0] > self.dim:
            self._sw.addmm_(rows.T, rows, alpha=sign)
        else:
            self._corrections.append((rows, sign))

    def _flush_products(self) -> None:
        """S_W += P (the float32 products, and the float64 ones if any) - the waiting
        corrections; P starts again from zero."""
        if self._sw is None:
            return
        with torch.no_grad(), torch.inference_mode(False):
            self._sw.add_(self._p)  # promoted to float64 element by element, no copy
            for sign in (-1.0, 1.0):
                rows = [c for c, s in self._corrections if s == sign]
                if rows:
                    c = torch.cat(rows)
                    self._sw.addmm_(c.T, c, alpha=sign)
            self._corrections = []
            if self._p64 is not None:
                self._sw += self._p64
                self._p64 = None
            self._p.zero_()

    @property
    def _capped(self) -> bool:
        """Whether a pending block folds at ``fold_rows`` rows: when it holds S_W's float32
        products. Without them the block folds when it outgrows the rows folded before it
        (a float32 state) and on reads (package docstring)."""
        return self.within_cov_enabled

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
    def __repr__(self) -> str:
        return (
            f"ClassStats(num_classes={self.num_classes}, dim={self.dim}, samples={self.num_samples}, "
            f"present={int(self.present.sum())}, within_cov={self.within_cov_enabled}, device={self.device})"
        )
