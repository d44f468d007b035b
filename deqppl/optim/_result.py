"""One status enum and one result shape for every fit (MAP by optimisation, encoder fits)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from deqppl.optim._settings import AbstractOptimizer

__all__ = ["AbstractFitResult", "FitConvergenceError", "FitStatus"]


class FitStatus(enum.Enum):
    """Outcome of a fit; ``AbstractFitResult.criterion`` says which rule decided it, with the numbers."""

    #: A convergence rule was met (the gradient rule, or a relative-change rule the user set).
    CONVERGED = "converged"
    #: The step cap (``max_steps`` or ``num_epochs``) was reached without meeting a rule.
    MAX_STEPS = "max_steps"
    #: The loss or its gradient is NaN/Inf at the returned point (an overflow is not convergence).
    NONFINITE = "nonfinite"
    #: No further progress is possible at working precision (the line search could not
    #: improve, or the step vanished) before the gradient rule was met.
    STALLED = "stalled"


@dataclass(frozen=True, kw_only=True, repr=False, eq=False)
class AbstractFitResult:
    """Fields every fit result has (:class:`~deqppl.inference.MAPResult`,
    :class:`~deqppl.encoders.EncoderFitResult`); never instantiated itself.

    Attributes
    ----------
    loss_trace
        1-D: the monitored loss at the start and after each step (L-BFGS: every iteration;
        SVI: every update's, possibly minibatch, loss; Adam: the full-data loss per epoch).
    num_steps
        Optimiser steps: L-BFGS iterations, SVI updates, Adam epochs.
    num_grad_evals
        Evaluations of the objective with its gradient (line-search trials included).
    wall_time
        Seconds spent fitting (post-fit diagnostics excluded).
    status
        A :class:`FitStatus`.
    criterion
        Which rule stopped the fit, with the numbers.
    grad_norm
        Euclidean norm of the full-batch gradient of the loss at the returned point, in the
        optimiser's (unconstrained) coordinates; NaN where it is not known. On a
        $\\mu$-strongly convex loss $\\lVert x-x^*\\rVert\\le$ ``grad_norm`` $/\\mu$.
    optimizer
        The settings object that ran the fit.
    """

    loss_trace: torch.Tensor
    num_steps: int
    num_grad_evals: int
    wall_time: float
    status: FitStatus
    criterion: str
    grad_norm: float
    optimizer: AbstractOptimizer

    def __post_init__(self) -> None:
        if type(self) is AbstractFitResult:
            raise TypeError("AbstractFitResult is a base class; fits return MAPResult or EncoderFitResult")

    @property
    def converged(self) -> bool:
        """True when ``status`` is ``CONVERGED``."""
        return self.status is FitStatus.CONVERGED

    def _summary(self) -> str:
        return (
            f"optimizer={type(self.optimizer).__name__}, status={self.status.name}, "
            f"num_steps={self.num_steps}, num_grad_evals={self.num_grad_evals}, "
            f"grad_norm={self.grad_norm:.3g}, wall_time={self.wall_time:.3g} s, "
            f"criterion={self.criterion!r}"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._summary()})"


class FitConvergenceError(RuntimeError):
    """A fit with ``throw=True`` did not converge; ``.result`` holds the returned (last) point."""

    def __init__(self, result: AbstractFitResult, what: str = "fit") -> None:
        self.result = result
        if result.status is FitStatus.NONFINITE:
            hint = (
                "the loss became non-finite: check the data's support and scale, start closer "
                "to the data (init), or lower the learning rate"
            )
        elif result.status is FitStatus.STALLED:
            hint = (
                "no progress is possible at working precision: loosen gtol, rescale the problem, "
                "or use float64"
            )
        else:
            hint = "raise the step cap (max_steps / num_epochs), loosen the tolerances, or change lr"
        super().__init__(
            f"{what} by {type(result.optimizer).__name__} stopped with status "
            f"{result.status.name} after {result.num_steps} steps ({result.criterion}); {hint}"
        )
