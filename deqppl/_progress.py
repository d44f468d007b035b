"""The one progress-bar helper: every long loop in deqppl reports through it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

__all__ = ["progress"]


def progress(
    iterable: Iterable[T], *, enable: bool = True, desc: str | None = None, total: int | None = None
) -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm bar when ``enable`` is true, else return it unchanged.

    Examples
    --------
    >>> sum(progress(range(3), enable=False))
    3
    """
    if not enable:
        return iter(iterable)
    return iter(tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True))
