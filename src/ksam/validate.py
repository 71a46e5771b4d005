"""Checks of option values, shared by the constructors that take them.

Each returns the value (converted where said) or raises ValueError naming the option and
what it got. A bool is never taken for a number: ``True`` is not a seed.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

__all__ = ["check_bool", "check_callable", "check_finite_number", "check_int"]


def check_int(name: str, value: Any, *, low: int = 0, high: int | None = None) -> int:
    """``value`` as an int in [``low``, ``high``]; ValueError for anything else (a bool, a
    float, a string)."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low \
            or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is True or False; ValueError for anything else (1, 'yes')."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_finite_number(name: str, value: Any, *, low: float = 0.0) -> float:
    """``value`` as a float, finite and >= ``low``; ValueError for anything else."""
    if isinstance(value, bool) or not isinstance(value, Real) \
            or not (math.isfinite(float(value)) and value >= low):
        raise ValueError(f"{name} must be a finite number >= {low:g}, got {value!r}")
    return float(value)


def check_callable(name: str, value: Any) -> Any:
    """``value`` if it is None or callable; ValueError otherwise."""
    if value is not None and not callable(value):
        raise ValueError(f"{name} must be a function or None, got {value!r}")
    return value
