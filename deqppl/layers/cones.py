"""Parametrisations of the nonnegative cone $\\{W \\ge 0\\}$ for pcDEQ weights (SPEC 5).

A cone object maps an unconstrained parameter to an effective weight that cannot leave the
cone (`SoftplusCone`, `ExpCone`, `SquareCone`), or, for `ProjectedCone`, uses the parameter as
the weight and projects it back after each optimiser step (what the paper's code does; the
training helper calls the projection and checks the invariant after every step).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._validation import position

__all__ = ["AbstractCone", "SoftplusCone", "ExpCone", "SquareCone", "ProjectedCone",
           "check_nonnegative"]


def check_nonnegative(w: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` naming the first negative or non-finite entry of ``w``.

    Examples
    --------
    >>> import torch
    >>> check_nonnegative(torch.tensor([[0.0, 1.0], [-0.5, 2.0]]), "W")
    Traceback (most recent call last):
    ...
    ValueError: W has a negative entry -0.5 at row 1, column 0 (1 negative entries in all); a pcDEQ layer needs W >= 0 entrywise
    """
    bad = ~torch.isfinite(w)
    if bool(bad.any()):
        idx = torch.nonzero(bad)[0].tolist()
        raise ValueError(f"{name} has a non-finite entry {w[tuple(idx)].item()} at "
                         f"{position(idx)}; only finite numbers are allowed")
    bad = w < 0
    if bool(bad.any()):
        idx = torch.nonzero(bad)[0].tolist()
        raise ValueError(
            f"{name} has a negative entry {w[tuple(idx)].item():.6g} at {position(idx)} "
            f"({int(bad.sum())} negative entries in all); a pcDEQ layer needs {name} >= 0 "
            f"entrywise")


class AbstractCone(abc.ABC):
    """Parametrisation of nonnegative weights; never instantiated."""

    #: Whether the training helper must call `project_` after each optimiser step.
    needs_projection: bool = False

    @property
    def name(self) -> str:
        return type(self).__name__

    @abc.abstractmethod
    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        """Effective weight $\\ge 0$ from the raw parameter (same shape)."""

    @abc.abstractmethod
    def inverse(self, w: torch.Tensor, name: str) -> torch.Tensor:
        """A raw parameter whose effective weight is ``w`` (checked $\\ge 0$ first)."""

    def project_(self, raw: torch.Tensor) -> None:
        """Project ``raw`` in place so that its effective weight is in the cone (no-op here)."""


@dataclass(frozen=True)
class SoftplusCone(AbstractCone):
    """$W = \\log(1 + e^{V})$: strictly positive, gradients everywhere (the default).

    Examples
    --------
    >>> import torch
    >>> cone = SoftplusCone()
    >>> w = torch.tensor([0.5, 2.0], dtype=torch.float64)
    >>> torch.allclose(cone(cone.inverse(w, "W")), w)
    True
    """

    def __call__(self, raw):
        return F.softplus(raw)

    def inverse(self, w, name):
        check_nonnegative(w, name)
        if bool((w == 0).any()):
            idx = torch.nonzero(w == 0)[0].tolist()
            raise ValueError(f"{name} has an exact zero at {position(idx)}, which SoftplusCone "
                             f"cannot represent; use SquareCone() or ProjectedCone()")
        # log(expm1(w)) = w + log(1 - exp(-w)), stable for large w
        return w + torch.log(-torch.expm1(-w))


@dataclass(frozen=True)
class ExpCone(AbstractCone):
    """$W = e^{V}$: strictly positive, multiplicative updates.

    Examples
    --------
    >>> import torch
    >>> ExpCone()(torch.zeros(2)).tolist()
    [1.0, 1.0]
    """

    def __call__(self, raw):
        return torch.exp(raw)

    def inverse(self, w, name):
        check_nonnegative(w, name)
        if bool((w == 0).any()):
            idx = torch.nonzero(w == 0)[0].tolist()
            raise ValueError(f"{name} has an exact zero at {position(idx)}, which ExpCone cannot "
                             f"represent; use SquareCone() or ProjectedCone()")
        return torch.log(w)


@dataclass(frozen=True)
class SquareCone(AbstractCone):
    """$W = V \\odot V$: nonnegative, exact zeros allowed.

    Examples
    --------
    >>> import torch
    >>> SquareCone()(torch.tensor([-2.0, 0.0])).tolist()
    [4.0, 0.0]
    """

    def __call__(self, raw):
        return raw * raw

    def inverse(self, w, name):
        check_nonnegative(w, name)
        return torch.sqrt(w)


@dataclass(frozen=True)
class ProjectedCone(AbstractCone):
    """$W = V$, kept in the cone by the projection $V \\leftarrow \\max(V, 0)$ after each step.

    The paper's scheme (Gabor et al., 2024): between a gradient step and its projection the
    weight may be negative, so the training helper projects and then verifies the invariant.

    Examples
    --------
    >>> import torch
    >>> raw = torch.tensor([-1.0, 3.0])
    >>> ProjectedCone().project_(raw); raw.tolist()
    [0.0, 3.0]
    """

    needs_projection = True

    def __call__(self, raw):
        return raw

    def inverse(self, w, name):
        check_nonnegative(w, name)
        return w.clone()

    def project_(self, raw):
        with torch.no_grad():
            raw.clamp_(min=0.0)
