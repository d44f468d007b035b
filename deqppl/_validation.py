"""Deprecated alias of :mod:`deqppl.validation` (kept so that existing imports keep working)."""

from deqppl.validation import (  # noqa: F401
    as_tensor,
    check_data_keys,
    check_finite,
    check_mask,
    check_shape,
    position,
)

__all__ = ["as_tensor", "check_data_keys", "check_finite", "check_mask", "check_shape", "position"]
