"""Deprecated alias of :mod:`deqppl.validation` (kept so that existing imports keep working)."""

from deqppl.validation import (  # noqa: F401
    FLOAT_DTYPES,
    as_tensor,
    check_data_keys,
    check_finite,
    check_int,
    check_mask,
    check_real,
    check_seed,
    check_shape,
    position,
)

__all__ = [
    "FLOAT_DTYPES",
    "as_tensor",
    "check_data_keys",
    "check_finite",
    "check_int",
    "check_mask",
    "check_real",
    "check_seed",
    "check_shape",
    "position",
]
