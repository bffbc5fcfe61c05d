"""_validate.py - the argument checks every smallmind module shares.

Each check names the argument and the rule it broke, raises TypeError for a value of the wrong
type and ValidationError (a ValueError) for a value out of range, and returns the value as a
plain Python int or float. bool is never taken for a number (True is not a step count).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .errors import ValidationError

__all__ = ["is_int", "is_number", "check_int", "check_number", "check_optional_int",
           "check_type", "interval"]


def is_int(v: Any) -> bool:
    """True for Python and numpy integers, False for bool."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def is_number(v: Any) -> bool:
    """True for Python and numpy reals (ints and floats), False for bool."""
    return (isinstance(v, (int, float, np.integer, np.floating))
            and not isinstance(v, (bool, np.bool_)))


def interval(lo: float | None, hi: float | None, lo_open: bool = False,
             hi_open: bool = False) -> str:
    """The rule as words: ">= 1", "in [0, 1)", "<= 5"."""
    if lo is not None and hi is not None and hi != math.inf:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi}"
    return "a number"


def check_int(v: Any, name: str, lo: int | None = None, hi: int | None = None) -> int:
    """v as an int within [lo, hi] (either bound may be None)."""
    if not is_int(v):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ValidationError(f"{name} must be {interval(lo, hi)}, got {v}")
    return int(v)


def check_optional_int(v: Any, name: str, lo: int | None = None,
                       hi: int | None = None) -> int | None:
    """None, or check_int(v, ...)."""
    return None if v is None else check_int(v, name, lo, hi)


def check_number(v: Any, name: str, lo: float | None = None, hi: float | None = None, *,
                 lo_open: bool = False, hi_open: bool = False) -> float:
    """v as a float within the bounds (open or closed); NaN never passes, and neither does an
    infinity unless the bounds allow it (hi=None or hi=math.inf)."""
    if not is_number(v):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    f = float(v)
    ok = not math.isnan(f)
    if lo is not None:
        ok = ok and (f > lo if lo_open else f >= lo)
    if hi is not None:
        ok = ok and (f < hi if hi_open else f <= hi)
    if not ok:
        raise ValidationError(f"{name} must be {interval(lo, hi, lo_open, hi_open)}, got {v}")
    return f


def check_type(v: Any, name: str, kind: type | tuple[type, ...], what: str | None = None) -> Any:
    """v unchanged if it is an instance of kind, else a TypeError naming it."""
    if not isinstance(v, kind):
        if what is None:
            kinds = kind if isinstance(kind, tuple) else (kind,)
            what = " or ".join(k.__name__ for k in kinds)
        raise TypeError(f"{name} must be a {what}, got {type(v).__name__}")
    return v
