"""Checks of option values: one rule per kind of value, used by every constructor.

Each returns the value (converted where said) or raises ValueError naming the option, what
it must be and what it got. A bool is never taken for a number (``True`` is not a seed),
a number is always finite, and a string is never taken for a number.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Integral, Real
from typing import Any

__all__ = ["check_bool", "check_callable", "check_choice", "check_int", "check_number",
           "check_fraction"]


def check_int(name: str, value: Any, *, low: int = 0, high: int | None = None) -> int:
    """``value`` as an int in [``low``, ``high``]; ValueError for anything else (a bool, a
    float, a string)."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low \
            or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")
    return int(value)


def check_number(name: str, value: Any, *, low: float | None = None,
                 high: float | None = None, low_open: bool = False,
                 high_open: bool = False) -> float:
    """``value`` as a float: a finite real number within the bounds given (``low_open``:
    ``low`` itself excluded; likewise ``high_open``). ValueError for anything else."""
    ok = not isinstance(value, bool) and isinstance(value, Real) \
        and math.isfinite(float(value))
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise ValueError(f"{name} must be a finite number{_bounds(low, high, low_open, high_open)}"
                         f", got {value!r}")
    return float(value)


def check_fraction(name: str, value: Any, *, low_open: bool = False,
                   high_open: bool = False) -> float:
    """``value`` as a float in [0, 1] (ends excluded as said)."""
    return check_number(name, value, low=0.0, high=1.0, low_open=low_open,
                        high_open=high_open)


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is True or False; ValueError for anything else (1, 'yes')."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value`` if it is one of ``choices``; ValueError naming them otherwise."""
    choices = tuple(choices)
    if isinstance(value, bool) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, "
                         f"got {value!r}")
    return value


def check_callable(name: str, value: Any) -> Any:
    """``value`` if it is None or callable; ValueError otherwise."""
    if value is not None and not callable(value):
        raise ValueError(f"{name} must be a function or None, got {value!r}")
    return value


def _bounds(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high:g}"
    return ""
