"""The one copy of the argument checks shared by the public API.

Each check returns the normalised value or raises with a message that names the
argument and the expected form ("Expected `num_classes` to be a positive int, got 0").
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Iterable
from typing import Any

import torch

__all__ = [
    "choice",
    "class_sizes",
    "class_indices",
    "flag",
    "float_dtype",
    "index",
    "positive_float",
    "positive_int",
    "tensor",
]


def _is_bool(value: Any) -> bool:
    """bool, numpy bool or a bool tensor: never an integer or a number here."""
    return isinstance(value, bool) or "bool" in str(getattr(value, "dtype", ""))


def index(value: Any) -> int | None:
    """``value`` as a Python int when it is integral (int, numpy integer, 0-d integer
    tensor: anything with ``__index__``), None otherwise; bools are not integers here."""
    if _is_bool(value):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def positive_int(value: Any, name: str) -> int:
    """Any integral value (int, numpy integer, 0-d integer tensor) > 0; bool is refused."""
    out = index(value)
    if out is None or out <= 0:
        raise ValueError(f"Expected `{name}` to be a positive int, got {value!r}")
    return out


def positive_float(value: Any, name: str, *, allow_zero: bool = False) -> float:
    """A finite real number (int, float, numpy scalar; not bool) > 0, or >= 0 with ``allow_zero``."""
    ok = isinstance(value, numbers.Real) and not _is_bool(value) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"Expected `{name}` to be a {kind} finite number, got {value!r}")
    return float(value)


def flag(value: Any, name: str) -> bool:
    """A bool (or numpy bool): ``bool("no")`` would silently be True."""
    if isinstance(value, bool) or type(value).__name__ in ("bool", "bool_"):
        return bool(value)
    raise TypeError(f"Expected `{name}` to be a bool, got {value!r}")


def choice(value: Any, name: str, options: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"Expected `{name}` to be one of {options}, got {value!r}")
    return value


def class_indices(value: Any, name: str, num_classes: int) -> list[int]:
    """Class indices in [0, num_classes): a sequence or an integer tensor of integers."""
    bad = ValueError(f"Expected `{name}` to be class indices in [0, {num_classes}), got {value!r}")
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise bad
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise bad
    out = [index(k) for k in value]
    if any(k is None or not 0 <= k < num_classes for k in out):
        raise bad
    return out


def tensor(value: Any, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor, got {type(value).__name__}")
    return value


def float_dtype(value: Any, name: str, options: tuple[torch.dtype, ...]) -> torch.dtype:
    if value not in options:
        names = "/".join(str(o).replace("torch.", "") for o in options)
        raise ValueError(f"Expected `{name}` to be one of {names}, got {value!r}")
    return value


def class_sizes(counts: Any) -> torch.Tensor:
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
