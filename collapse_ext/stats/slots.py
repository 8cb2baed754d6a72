"""The state of ClassStats, declared once (``_SLOTS``), and its persistence.

Allocation, reset, folding, ``state_dict`` and the validation of ``load_state_dict``
are all driven by the table, so adding a tensor to the state is one line here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .._validate import choice


@dataclass(frozen=True)
class _Slot:
    """One tensor of the state, declared once: allocation, reset, folding, persistence and
    validation are driven by this table. ``key`` is the ``state_dict`` key (None: part of
    the pending block, never saved: ``state_dict()`` folds first); ``shape`` is in K and
    d; ``dtype`` "state" means the ``state_dtype``; ``cov``: exists only with within_cov."""

    attr: str
    key: str | None
    shape: str
    dtype: str
    cov: bool = False


_SLOTS = (
    # Folded statistics of every row up to the last fold.
    _Slot("_n", "counts", "K", "int64"),
    _Slot("_mu", "means", "Kd", "state"),
    _Slot("_ss", "sqdev", "K", "float64"),
    _Slot("_sw", "scatter", "dd", "float64", cov=True),
    # Deferred-mode rejections: batches, rows.
    _Slot("_rejected", "rejected", "2", "int64"),
    # Pending block about the shifts c_k (the _mu rows). After a fold _t_k holds the
    # rounding residual n_k (exact mean - stored mean) of a float32 state (class_fold),
    # which state_dict() saves as "residual".
    _Slot("_m", None, "K", "int64"),
    _Slot("_t", None, "Kd", "state"),
    _Slot("_q", None, "K", "float64"),
    _Slot("_p", None, "dd", "float32", cov=True),
)
_FOLDED = tuple(slot for slot in _SLOTS if slot.key in ("counts", "means", "sqdev", "scatter"))


def select_classes(state: dict[str, Any], classes: torch.Tensor) -> dict[str, Any]:
    """A ``ClassStats.state_dict()`` for the classes ``classes`` (K',) int64 of ``state``:
    class j of the result is class ``classes[j]``, or a new empty class where it is -1.
    The per-class entries are re-indexed; S_W, pooled over the classes, is left as it is."""
    out = dict(state)
    out["num_classes"] = int(classes.numel())
    keep = classes >= 0
    for key in ("counts", "means", "sqdev", "residual"):
        if key in state:
            value = state[key].index_select(0, classes.clamp_min(0).to(state[key].device))
            mask = keep.to(value.device).reshape(-1, *([1] * (value.dim() - 1)))
            out[key] = torch.where(mask, value, torch.zeros_like(value))
    return out


class StatePersistence:
    """``state_dict`` / ``load_state_dict`` of ClassStats, driven by ``_SLOTS``."""

    def _shape(self, slot: _Slot) -> tuple[int, ...]:
        k, d = self.num_classes, self.dim
        return {"K": (k,), "Kd": (k, d), "dd": (d, d), "2": (2,)}[slot.shape]

    def _dtype(self, slot: _Slot) -> torch.dtype:
        return self.state_dtype if slot.dtype == "state" else getattr(torch, slot.dtype)

    def _active(self, slots: tuple[_Slot, ...] = _SLOTS) -> list[_Slot]:
        return [slot for slot in slots if self.within_cov_enabled or not slot.cov]

    def state_dict(self) -> dict[str, Any]:
        """The folded statistics and their metadata (tensors are copies). Like every read,
        it folds the pending block first."""
        self._fold()
        state: dict[str, Any] = {
            "num_classes": self.num_classes,
            "dim": self.dim,
            "within_cov": self.within_cov_enabled,
            "global_mean": self.global_mean_mode,
            "check": self.check,
            "state_dtype": str(self.state_dtype).replace("torch.", ""),
        }
        for slot in self._active():
            if slot.key is not None:
                state[slot.key] = getattr(self, slot.attr).clone()
        if self._sw is not None:
            state["scatter"] = self._exact_scatter().clone()
        if self.state_dtype != torch.float64:
            # The means' rounding, which the fold keeps in the pending sums (class_fold):
            # with it a float32 state loads exactly as it was saved.
            state["residual"] = self._t.clone()
        return state

    def load_state_dict(self, state: Any) -> None:
        """Replace the statistics by a ``state_dict()``'s. Everything is validated first;
        a state that does not fit raises and leaves this object as it was."""
        tensors, mode = self._checked_state(state)
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._allocate(self.device)
        for slot in self._active():
            if slot.key in tensors:
                setattr(new, slot.attr, tensors[slot.key].to(self.device, self._dtype(slot)).clone())
        if "residual" in tensors:  # the exact means, rounded to this state's dtype again
            exact = new._mu.double() + tensors["residual"].to(self.device, torch.float64) / new._n.double().clamp_min(
                1.0
            ).unsqueeze(1)
            new._assign(
                tuple(exact if slot.attr == "_mu" else getattr(new, slot.attr) for slot in new._active(_FOLDED))
            )
        new.global_mean_mode = mode
        new._folded_rows = int(new._n.sum())
        self.__dict__.update(new.__dict__)

    def _checked_state(self, state: Any) -> tuple[dict[str, torch.Tensor], str]:
        """The saved tensors of a state dict, validated against this object's K, d and
        within_cov, and its global-mean mode."""
        if not isinstance(state, dict):
            raise TypeError(f"Expected `state` to be a dict from ClassStats.state_dict(), got {type(state).__name__}")
        saved = [slot for slot in self._active() if slot.key is not None]
        required = ["num_classes", "dim", "within_cov", "global_mean"] + [s.key for s in saved if s.key != "rejected"]
        missing = [key for key in required if key not in state]
        if missing:
            raise ValueError(f"Expected `state` to have the keys {required}, missing {missing}")
        meta = (state["num_classes"], state["dim"], state["within_cov"])
        mine = (self.num_classes, self.dim, self.within_cov_enabled)
        if meta != mine:
            raise ValueError(f"Expected a state with (num_classes, dim, within_cov) = {mine}, got {meta}")
        mode = choice(state["global_mean"], "state['global_mean']", ("sample", "class"))
        tensors = {}
        for slot in saved:
            value = state.get(slot.key)
            if value is None and slot.key == "rejected":
                continue
            if slot.key == "rejected" and isinstance(value, torch.Tensor) and value.numel() == 1:
                value = torch.cat([value.reshape(1), value.new_zeros(1)])  # saved before rows were counted
            name = f"`state['{slot.key}']`"
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != self._shape(slot):
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"Expected {name} to be a tensor of shape {self._shape(slot)}, got {got}")
            if slot.dtype == "int64":
                if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
                    raise ValueError(f"Expected {name} to be an integer tensor, got {value.dtype}")
                if bool((value < 0).any()):
                    raise ValueError(f"Expected {name} to be non-negative")
            else:
                if not value.is_floating_point():
                    raise ValueError(f"Expected {name} to be a float tensor, got {value.dtype}")
                if not bool(torch.isfinite(value).all()):
                    raise ValueError(f"Expected {name} to be finite")
            tensors[slot.key] = value
        residual = state.get("residual")
        if residual is not None:
            shape = (self.num_classes, self.dim)
            if not isinstance(residual, torch.Tensor) or tuple(residual.shape) != shape:
                got = tuple(residual.shape) if isinstance(residual, torch.Tensor) else type(residual).__name__
                raise ValueError(f"Expected `state['residual']` to be a tensor of shape {shape}, got {got}")
            if not residual.is_floating_point() or not bool(torch.isfinite(residual).all()):
                raise ValueError("Expected `state['residual']` to be a finite float tensor")
            tensors["residual"] = residual
        if bool((tensors["sqdev"] < 0).any()):
            raise ValueError("Expected `state['sqdev']` to be non-negative")
        return tensors, mode
