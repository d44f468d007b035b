r"""The one optimiser loop: progress, trace, counters, stopping rules, non-finite handling.

Every fit in deqppl (``fit_map`` by L-BFGS or SVI, ``fit_encoder`` by profiled L-BFGS or Adam)
runs through :func:`drive`. What varies is a *stepper* (the optimistix ``init/step`` pattern):
``start()`` evaluates the starting point, ``step(budget)`` advances and reports an
:class:`Observation`. The driver alone decides when to stop and with which status.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from dataclasses import dataclass

from deqppl._progress import progress as _progress
from deqppl.optim._result import FitStatus

__all__ = ["AbstractStepper", "DriverOutcome", "Observation", "StopRules", "drive"]


@dataclass(frozen=True)
class Observation:
    """What a stepper reports about its current iterate after ``start`` or a ``step``.

    Attributes
    ----------
    loss
        The monitored loss (full-batch loss; SVI: the window's mean minibatch loss).
    losses
        Entries for the loss trace (default: ``(loss,)``).
    grad_max
        $\\max_i|g_i|$ of the full-batch gradient at the iterate, NaN if unknown.
    step_max
        $\\max_i|\\Delta x_i|$ over the step, NaN if unknown (or at the start).
    x_max
        $\\max_i|x_i|$ at the iterate (for the relative step rule), NaN if unknown.
    num_steps
        Optimiser updates the step made.
    num_evals
        Objective-with-gradient evaluations the step spent.
    stalled
        Set by a stepper that cannot make progress: the reason.
    decrement
        The decrease of the stepper's quadratic model of the loss along its next full step,
        $-\tfrac12 g^\top p$ (for L-BFGS, $p=-H_k g$), NaN if unknown: an estimate of how far the
        loss still is above the optimum. A stepper with a block-diagonal (or Fisher) model
        Hessian $H$, $\tfrac12 g^\top H^{-1}g$, says so (:class:`~deqppl.optim.AlternatingNewton`).
    """

    loss: float
    losses: tuple[float, ...] | None = None
    grad_max: float = math.nan
    step_max: float = math.nan
    x_max: float = math.nan
    num_steps: int = 1
    num_evals: int = 1
    stalled: str | None = None
    decrement: float = math.nan


@dataclass(frozen=True)
class StopRules:
    r"""The stopping rules, checked in this order at every observed iterate.

    1. non-finite loss or gradient: ``NONFINITE``;
    2. the stepper stalled: ``STALLED``, or ``CONVERGED`` if the gradient rule holds;
    3. gradient: $\max|g|\le\mathrm{gtol}\cdot\max(1,\min(|f|,|f_0|)/n)$ with $n$ =
       ``num_coords`` and $f_0$ the loss at the start: ``CONVERGED``. The smaller of the two
       magnitudes keeps the threshold from growing with a loss that runs off to $-\infty$.
       Where the stepper knows its model decrement $\delta$ (see :class:`Observation`), the rule
       also needs $\delta\le\mathrm{gtol}\cdot\max(1,\min(|f|,|f_0|))$: a loss whose size is
       mostly a constant (data of magnitude $10^{12}$, say) makes the gradient bound loose while
       the loss can still fall by far more than its tolerance;
    4. relative loss change $|f_k-f_{k-1}|\le\mathrm{rtol}\,|f_k|$ (``<`` if ``strict``):
       ``CONVERGED``;
    5. step $\max|\Delta x|\le\mathrm{xtol}$ (times $\max(1,\max|x|)$ if ``xtol_relative``):
       ``xtol_status``;
    6. curvature-scaled gradient alone: ``obs.decrement`` $\le\mathrm{dtol}\cdot\max(1,\min(|f|,|f_0|))$:
       ``CONVERGED`` (the decrease the stepper's Newton model still predicts is below ``dtol``
       relative; the rule of :class:`~deqppl.optim.AlternatingNewton`).

    A ``None`` tolerance switches its rule off.
    """

    gtol: float | None = None
    num_coords: int = 1
    rtol: float | None = None
    strict: bool = False
    xtol: float | None = None
    xtol_relative: bool = False
    xtol_status: FitStatus = FitStatus.CONVERGED
    dtol: float | None = None

    def gradient_threshold(self, loss: float, start_loss: float | None = None) -> float:
        """Right-hand side of the gradient rule at loss ``loss`` (start loss ``start_loss``)."""
        assert self.gtol is not None
        return self.gtol * max(1.0, self._size(loss, start_loss) / max(self.num_coords, 1))

    @staticmethod
    def _size(loss: float, start_loss: float | None) -> float:
        if start_loss is None or not math.isfinite(start_loss):
            return abs(loss)
        return min(abs(loss), abs(start_loss))

    def check(
        self, obs: Observation, prev_loss: float | None, start_loss: float | None = None
    ) -> tuple[FitStatus, str] | None:
        """The status and criterion if a rule fires at ``obs``, else None."""
        if not math.isfinite(obs.loss) or (
            not math.isnan(obs.grad_max) and not math.isfinite(obs.grad_max)
        ):
            return FitStatus.NONFINITE, f"loss {obs.loss}, max |grad| {obs.grad_max}"
        grad_ok = None
        if self.gtol is not None and not math.isnan(obs.grad_max):
            bound = self.gradient_threshold(obs.loss, start_loss)
            grad_ok = obs.grad_max <= bound
            text = f"max |grad| = {obs.grad_max:.3g} <= gtol * max(1, |loss|/n) = {bound:.3g}"
            if grad_ok and not math.isnan(obs.decrement):
                room = self.gtol * max(1.0, self._size(obs.loss, start_loss))
                grad_ok = obs.decrement <= room
                text += f" and model decrement {obs.decrement:.3g} <= gtol * max(1, |loss|) = {room:.3g}"
        if obs.stalled is not None:
            if grad_ok:
                return FitStatus.CONVERGED, text
            return FitStatus.STALLED, f"{obs.stalled}; max |grad| = {obs.grad_max:.3g}"
        if grad_ok:
            return FitStatus.CONVERGED, text
        if self.rtol is not None and prev_loss is not None:
            rel = abs(obs.loss - prev_loss) / max(abs(obs.loss), 1e-300)
            if rel < self.rtol if self.strict else rel <= self.rtol:
                op = "<" if self.strict else "<="
                return FitStatus.CONVERGED, f"relative loss change {rel:.3g} {op} rtol = {self.rtol:.3g}"
        if self.xtol is not None and not math.isnan(obs.step_max):
            bound = self.xtol * (max(1.0, obs.x_max) if self.xtol_relative else 1.0)
            if obs.step_max <= bound:
                how = " * max(1, max |x|)" if self.xtol_relative else ""
                return self.xtol_status, (
                    f"max |step| = {obs.step_max:.3g} <= xtol{how} = {bound:.3g}"
                    + ("" if math.isnan(obs.grad_max) else f"; max |grad| = {obs.grad_max:.3g}")
                )
        if self.dtol is not None and not math.isnan(obs.decrement):
            bound = self.dtol * max(1.0, self._size(obs.loss, start_loss))
            if obs.decrement <= bound:
                return FitStatus.CONVERGED, (
                    f"Newton decrement g'H^-1 g / 2 = {obs.decrement:.3g} <= dtol * max(1, |loss|) "
                    f"= {bound:.3g}"
                )
        return None


class AbstractStepper(abc.ABC):
    """The varying part of a fit: how to evaluate the start and take a step."""

    @abc.abstractmethod
    def start(self) -> Observation:
        """Evaluate the starting point."""

    @abc.abstractmethod
    def step(self, budget: int) -> Observation:
        """Advance by at most ``budget`` updates (``budget >= 1``)."""


@dataclass(frozen=True)
class DriverOutcome:
    """What :func:`drive` returns; the fit functions wrap it in their result type."""

    trace: list[float]
    num_steps: int
    num_evals: int
    status: FitStatus
    criterion: str
    last: Observation


def drive(
    stepper: AbstractStepper,
    rules: StopRules,
    *,
    max_steps: int,
    progress: bool,
    desc: str,
    callback: Callable[[int, float], None] | None = None,
    unit: str = "steps",
) -> DriverOutcome:
    """Run ``stepper`` until a rule of ``rules`` fires or ``max_steps`` updates were made.

    ``callback(num_steps, loss)`` is called after every step. A non-finite start is reported
    (status ``NONFINITE``), never raised: the caller still returns its result.
    """
    obs = stepper.start()
    trace = list(obs.losses if obs.losses is not None else (obs.loss,))
    num_steps, num_evals = 0, obs.num_evals
    prev: float | None = None
    first = obs.loss
    bar = iter(_progress(range(max_steps), enable=progress, desc=desc, total=max_steps))
    while True:
        stop = rules.check(obs, prev, first)
        if stop is not None:
            status, criterion = stop
            break
        if num_steps >= max_steps:
            grad = "" if math.isnan(obs.grad_max) else f"; max |grad| = {obs.grad_max:.3g}"
            status, criterion = FitStatus.MAX_STEPS, f"{unit} cap {max_steps} reached{grad}"
            break
        prev = obs.loss
        obs = stepper.step(max_steps - num_steps)
        num_steps += obs.num_steps
        num_evals += obs.num_evals
        trace.extend(obs.losses if obs.losses is not None else (obs.loss,))
        for _ in range(obs.num_steps):
            next(bar, None)
        if callback is not None:
            callback(num_steps, obs.loss)
    # close the bar (a tqdm iterator closes when exhausted or garbage-collected)
    close = getattr(bar, "close", None)
    if close is not None:
        close()
    return DriverOutcome(
        trace=trace,
        num_steps=num_steps,
        num_evals=num_evals,
        status=status,
        criterion=criterion,
        last=obs,
    )
