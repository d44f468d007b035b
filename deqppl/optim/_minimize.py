"""``minimize``: the L-BFGS driver on a plain function of one flat tensor."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from deqppl.optim._driver import StopRules, drive
from deqppl.optim._lbfgs import LBFGSStepper
from deqppl.optim._result import AbstractFitResult, FitConvergenceError, FitStatus
from deqppl.optim._settings import LBFGS

__all__ = ["MinimizeResult", "lbfgs_rules", "minimize"]


def lbfgs_rules(settings: LBFGS, dtype: torch.dtype, num_coords: int) -> StopRules:
    """The stopping rules of ``settings`` for ``num_coords`` coordinates of ``dtype``."""
    return StopRules(
        gtol=settings.resolved_gtol(dtype),
        num_coords=num_coords,
        rtol=settings.rtol if settings.rtol > 0 else None,
        xtol=settings.resolved_xtol(dtype),
        xtol_relative=True,
        xtol_status=FitStatus.STALLED,
    )


@dataclass(frozen=True, kw_only=True, repr=False, eq=False)
class MinimizeResult(AbstractFitResult):
    """Result of :func:`minimize`: the common fields plus ``x`` and ``loss`` at the returned point."""

    x: torch.Tensor
    loss: float

    def __repr__(self) -> str:
        return f"MinimizeResult(loss={self.loss:.10g}, {self._summary()})"


def minimize(
    fun: Callable[[torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    *,
    optimizer: LBFGS | None = None,
    progress: bool = False,
    throw: bool = False,
) -> MinimizeResult:
    r"""Minimise a scalar function of one tensor by :class:`LBFGS` (autograd gradients).

    Parameters
    ----------
    fun
        ``x -> scalar tensor``, differentiable by autograd; it is evaluated at ``x`` of the
        shape and dtype of ``x0``.
    x0
        Starting point (any shape); the fit runs in its dtype.
    optimizer
        An :class:`LBFGS` (default ``LBFGS()``).
    progress
        Show a progress bar.
    throw
        Raise :class:`FitConvergenceError` unless the fit converged.

    Returns
    -------
    MinimizeResult

    Examples
    --------
    >>> import torch
    >>> A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    >>> b = torch.tensor([1.0, -1.0], dtype=torch.float64)
    >>> res = minimize(lambda x: 0.5 * x @ A @ x - b @ x, torch.zeros(2, dtype=torch.float64))
    >>> res.status.name, bool(torch.allclose(res.x, torch.linalg.solve(A, b), rtol=0, atol=1e-10))
    ('CONVERGED', True)
    """
    optimizer = LBFGS() if optimizer is None else optimizer
    if not isinstance(optimizer, LBFGS):
        raise TypeError(f"minimize needs an LBFGS optimizer, got {optimizer!r}")
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point():
        raise TypeError(f"x0 must be a floating-point tensor, got {x0!r}")
    start = time.perf_counter()
    shape = x0.shape

    def flat_fun(x: torch.Tensor) -> tuple[float, torch.Tensor]:
        x = x.detach().reshape(shape).requires_grad_(True)
        with torch.enable_grad():
            value = fun(x)
            if not torch.isfinite(value):
                return float(value.detach()), torch.zeros(x.numel(), dtype=x.dtype)
            (g,) = torch.autograd.grad(value, x)
        return float(value.detach()), g.reshape(-1)

    stepper = LBFGSStepper(flat_fun, x0.detach().reshape(-1), optimizer)
    out = drive(
        stepper,
        lbfgs_rules(optimizer, x0.dtype, x0.numel()),
        max_steps=int(optimizer.max_steps),
        progress=progress,
        desc="minimize (L-BFGS)",
    )
    result = MinimizeResult(
        x=stepper.x.reshape(shape),
        loss=stepper.f,
        loss_trace=torch.tensor(out.trace, dtype=torch.float64),
        num_steps=out.num_steps,
        num_grad_evals=out.num_evals,
        wall_time=time.perf_counter() - start,
        status=out.status,
        criterion=out.criterion,
        grad_norm=float(stepper.g.norm()),
        optimizer=optimizer,
    )
    if throw and not result.converged:
        raise FitConvergenceError(result, "minimize")
    return result
