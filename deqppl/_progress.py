"""The one progress-bar helper: every long loop in deqppl reports through it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

__all__ = ["counter", "progress"]


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


class _NoBar:
    """What :func:`counter` returns when disabled: ``update`` does nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def counter(*, total: int | None = None, enable: bool = True, desc: str | None = None, unit: str = "it"):
    """A bar advanced by hand (``bar.update(n)``), e.g. in rows of a streamed table.

    Use as a context manager; disabled, it is a no-op object with the same methods.

    Examples
    --------
    >>> with counter(total=10, enable=False, unit="rows") as bar:
    ...     bar.update(4)
    """
    if not enable:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, leave=False, dynamic_ncols=True)
