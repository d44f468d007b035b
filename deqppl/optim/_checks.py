"""Checks of optimiser settings: each error names the class, the field, the value and what is allowed."""

from __future__ import annotations

import math


def _fail(owner: str, name: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"{owner}.{name} = {value!r} is not allowed; {name} must be {allowed}")


def check_int(owner: str, name: str, value: object, *, minimum: int) -> None:
    """``value`` must be a Python/NumPy integer (not a bool) and at least ``minimum``."""
    ok = (
        not isinstance(value, bool)
        and hasattr(value, "__index__")
        and int(value.__index__()) >= minimum
    )
    if not ok:
        raise _fail(owner, name, value, f"an integer >= {minimum}")


def check_float(
    owner: str,
    name: str,
    value: object,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
) -> None:
    """``value`` must be a finite real number in the stated interval (or None if ``optional``)."""
    if optional and value is None:
        return
    lo = "(" if low_open else "["
    hi = ")" if high_open or math.isinf(high) else "]"
    allowed = f"a finite number in {lo}{low:g}, {high:g}{hi}" + (" or None" if optional else "")
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise _fail(owner, name, value, allowed)
    v = float(value)
    if not math.isfinite(v):
        raise _fail(owner, name, value, allowed)
    if v < low or (low_open and v == low) or v > high or (high_open and v == high):
        raise _fail(owner, name, value, allowed)
