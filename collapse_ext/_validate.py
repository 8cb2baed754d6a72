"""The one copy of the argument checks shared by the public API.

Each check returns the normalised value or raises with a message that names the
argument and the expected form ("Expected `num_classes` to be a positive int, got 0").
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch

__all__ = ["choice", "float_dtype", "positive_float", "positive_int", "tensor"]


def positive_int(value: Any, name: str) -> int:
    """Any integral value (int, numpy integer, 0-d integer tensor) > 0; bool is refused."""
    if isinstance(value, bool):
        raise ValueError(f"Expected `{name}` to be a positive int, got {value!r}")
    try:
        out = operator.index(value)
    except TypeError:
        raise ValueError(f"Expected `{name}` to be a positive int, got {value!r}") from None
    if out <= 0:
        raise ValueError(f"Expected `{name}` to be a positive int, got {value!r}")
    return out


def positive_float(value: Any, name: str) -> float:
    """A finite real number > 0 (bool refused)."""
    if isinstance(value, bool):
        raise ValueError(f"Expected `{name}` to be a positive finite number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"Expected `{name}` to be a positive finite number, got {value!r}") from None
    if not (math.isfinite(out) and out > 0):
        raise ValueError(f"Expected `{name}` to be a positive finite number, got {value!r}")
    return out


def choice(value: Any, name: str, options: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"Expected `{name}` to be one of {options}, got {value!r}")
    return value


def tensor(value: Any, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor, got {type(value).__name__}")
    return value


def float_dtype(value: Any, name: str, options: tuple[torch.dtype, ...]) -> torch.dtype:
    if value not in options:
        names = "/".join(str(o).replace("torch.", "") for o in options)
        raise ValueError(f"Expected `{name}` to be one of {names}, got {value!r}")
    return value
