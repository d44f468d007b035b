r"""Optimiser settings: small frozen objects whose fields are the settings (STYLE.md).

They say *how* to optimise; the fit functions (:func:`deqppl.inference.fit_map`,
:func:`deqppl.encoders.fit_encoder`) say *what*. Every object validates its fields when built,
so a nonsense setting fails before any work with a message naming the field, the value and
the allowed range.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from deqppl.optim._checks import check_float, check_int

__all__ = [
    "LBFGS",
    "SVI",
    "AbstractOptimizer",
    "AbstractSchedule",
    "Adam",
    "ConstantLR",
    "CosineDecay",
    "ExponentialDecay",
    "PlateauDecay",
]


def _eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


# --------------------------------------------------------------------------------------------
# Learning-rate schedules (for the stochastic optimisers)
# --------------------------------------------------------------------------------------------
class AbstractSchedule(abc.ABC):
    """A learning-rate schedule: a pure function of the progress of a fit.

    ``lr(base_lr, step=k, max_steps=K, num_plateaus=p)`` is the learning rate of update $k$
    (0-based) of at most $K$, after $p$ plateaus (monitoring windows, or epochs, whose mean loss
    did not decrease).
    """

    @abc.abstractmethod
    def lr(self, base_lr: float, *, step: int, max_steps: int, num_plateaus: int) -> float:
        """Learning rate of update ``step``."""


@dataclass(frozen=True)
class ConstantLR(AbstractSchedule):
    """The base learning rate throughout.

    Examples
    --------
    >>> ConstantLR().lr(0.1, step=5, max_steps=10, num_plateaus=3)
    0.1
    """

    def lr(self, base_lr: float, *, step: int, max_steps: int, num_plateaus: int) -> float:
        return base_lr


@dataclass(frozen=True)
class PlateauDecay(AbstractSchedule):
    r"""Multiply the learning rate by ``factor`` after each plateau: $\eta_k=\eta_0 f^p$.

    A constant Adam step keeps oscillating around the optimum at a relative level of order
    the learning rate; halving it whenever the windowed loss stops decreasing shrinks the
    oscillation geometrically, so the fit settles on a tight optimum.

    Parameters
    ----------
    factor
        In $(0, 1)$.
    min_factor
        Floor on $f^p$ (default 0: no floor).

    Examples
    --------
    >>> PlateauDecay(factor=0.5).lr(0.1, step=0, max_steps=10, num_plateaus=2)
    0.025
    """

    factor: float = 0.5
    min_factor: float = 0.0

    def __post_init__(self) -> None:
        check_float("PlateauDecay", "factor", self.factor, low=0.0, high=1.0, low_open=True, high_open=True)
        check_float("PlateauDecay", "min_factor", self.min_factor, low=0.0, high=1.0)

    def lr(self, base_lr: float, *, step: int, max_steps: int, num_plateaus: int) -> float:
        return base_lr * max(self.factor**num_plateaus, self.min_factor)


@dataclass(frozen=True)
class ExponentialDecay(AbstractSchedule):
    r"""Geometric decay from the base rate to ``final_factor`` times it over the fit.

    $\eta_k=\eta_0\,f^{k/K}$ with $K$ the step cap.

    Examples
    --------
    >>> ExponentialDecay(final_factor=0.01).lr(1.0, step=50, max_steps=100, num_plateaus=0)
    0.1
    """

    final_factor: float = 0.01

    def __post_init__(self) -> None:
        check_float(
            "ExponentialDecay", "final_factor", self.final_factor, low=0.0, high=1.0, low_open=True
        )

    def lr(self, base_lr: float, *, step: int, max_steps: int, num_plateaus: int) -> float:
        return base_lr * self.final_factor ** (step / max(max_steps, 1))


@dataclass(frozen=True)
class CosineDecay(AbstractSchedule):
    r"""Cosine decay (Loshchilov & Hutter, 2017, ICLR) from the base rate to ``final_factor`` times it.

    $\eta_k=\eta_0\big(f+(1-f)\tfrac12(1+\cos(\pi k/K))\big)$.

    Examples
    --------
    >>> CosineDecay(final_factor=0.0).lr(1.0, step=50, max_steps=100, num_plateaus=0)
    0.5
    """

    final_factor: float = 0.0

    def __post_init__(self) -> None:
        check_float("CosineDecay", "final_factor", self.final_factor, low=0.0, high=1.0)

    def lr(self, base_lr: float, *, step: int, max_steps: int, num_plateaus: int) -> float:
        t = min(step / max(max_steps, 1), 1.0)
        f = self.final_factor
        return base_lr * (f + (1.0 - f) * 0.5 * (1.0 + math.cos(math.pi * t)))


# --------------------------------------------------------------------------------------------
# Optimisers
# --------------------------------------------------------------------------------------------
class AbstractOptimizer(abc.ABC):
    """Base of the optimiser settings objects (:class:`LBFGS`, :class:`SVI`, :class:`Adam`).

    Concrete optimisers are frozen dataclasses; the fit functions dispatch on their type and
    raise ``TypeError`` naming the optimisers they accept.
    """

    #: Short name used in progress bars and messages.
    label: ClassVar[str] = "optimizer"


@dataclass(frozen=True, kw_only=True)
class LBFGS(AbstractOptimizer):
    r"""Full-batch, deterministic L-BFGS with a strong-Wolfe line search on the directional derivative.

    Parameters
    ----------
    max_steps
        Cap on quasi-Newton iterations; reaching it gives ``FitStatus.MAX_STEPS``. The
        gradient rule normally stops the fit long before: the joint MAP of Binomial(16) PCA
        on 600 digits (3 384 unknowns, a rotation-invariant, ill-conditioned problem from a
        random start) takes ~1 000 iterations.
    gtol
        Gradient rule (the main stopping rule):
        $\max_i\lvert g_i\rvert\le \mathrm{gtol}\cdot\max(1,\lvert f\rvert/n)$ with $f$ the
        loss, $g$ its gradient in the $n$ unconstrained coordinates, and $\lvert f\rvert$ the
        smaller of the loss magnitudes at the start and now (so that a loss running off to
        $-\infty$ cannot loosen the rule). $\lvert f\rvert/n$ is the loss per coordinate: the
        rule does not change when the loss is multiplied by a constant (more data, another
        unit). ``None``: $\epsilon^{2/3}$ of the dtype
        ($3.7\times10^{-11}$ in float64, $2.4\times10^{-5}$ in float32): the rounding floor
        of the gradient of a log joint of a few thousand terms is ~1e-11 per unit of loss
        scale in float64 (measured: Poisson PCA, 200 x 8, stalled at 1.2e-11 under a
        $\epsilon^{3/4}$ rule). On a
        $\mu$-strongly convex loss the distance to the minimiser is at most
        $\lVert g\rVert_2/\mu$, so in float64 this puts the MAP to ~1e-10 on the problems of
        the test suite.
    xtol
        Step rule: stop when the accepted step satisfies
        $\max_i\lvert\Delta x_i\rvert\le\mathrm{xtol}\cdot\max(1,\max_i\lvert x_i\rvert)$: the
        iterate no longer moves at working precision. ``None``: $10\epsilon$. It is reported as
        ``FitStatus.STALLED`` unless the gradient rule also holds, since a vanishing step is
        not by itself a stationary point.
    rtol
        Relative loss change $\lvert f_{k}-f_{k-1}\rvert\le\mathrm{rtol}\,\lvert f_k\rvert$;
        0 (default) switches this rule off: the loss changes by $O(\lVert g\rVert^2/\mu)$
        near the optimum, so a loss-change rule stops at $\lVert x-x^*\rVert\sim
        \sqrt{\mathrm{rtol}}$, far from the MAP (it stopped at 1e-7 from kernel ridge).
    history_size
        Number of curvature pairs $(s, y)$ kept (Nocedal & Wright, 2006, §7.2, recommend 3-20).
    max_linesearch
        Objective evaluations allowed per line search.
    c1, c2
        Sufficient-decrease and curvature constants of the strong Wolfe conditions,
        $0<c_1<c_2<1$ (Nocedal & Wright's 1e-4 and 0.9 for quasi-Newton methods).

    Notes
    -----
    The line search brackets a step $t$ with $\phi'(t)=g(x+tp)^\top p$ and shrinks the bracket
    by secant steps on $\phi'$ (cubic interpolation where only values bracket). Sufficient
    decrease is Armijo's $\phi(t)\le\phi(0)+c_1t\phi'(0)$ or, where the loss differences
    are below the rounding of $\phi$, the approximate Wolfe condition of Hager & Zhang
    (2005, SIAM J. Optim.) $\phi'(t)\le(1-2c_1)\lvert\phi'(0)\rvert$, which is Armijo's for
    a quadratic and is decided by derivatives alone. Near the optimum the loss differences
    ($\sim\lVert g\rVert^2/\mu$) drop below $\epsilon\lvert f\rvert$ long before the gradient
    reaches its own rounding level, so a search that compares loss values stalls there; one
    on $\phi'$ keeps going to the gradient rule.

    Examples
    --------
    >>> LBFGS(max_steps=200).history_size
    10
    >>> LBFGS(gtol=-1.0)
    Traceback (most recent call last):
    ...
    ValueError: LBFGS.gtol = -1.0 is not allowed; gtol must be a finite number in [0, inf) or None
    """

    label: ClassVar[str] = "L-BFGS"

    max_steps: int = 5000
    gtol: float | None = None
    xtol: float | None = None
    rtol: float = 0.0
    history_size: int = 10
    max_linesearch: int = 25
    c1: float = 1e-4
    c2: float = 0.9

    def __post_init__(self) -> None:
        check_int("LBFGS", "max_steps", self.max_steps, minimum=0)
        check_float("LBFGS", "gtol", self.gtol, low=0.0, optional=True)
        check_float("LBFGS", "xtol", self.xtol, low=0.0, optional=True)
        check_float("LBFGS", "rtol", self.rtol, low=0.0)
        check_int("LBFGS", "history_size", self.history_size, minimum=1)
        check_int("LBFGS", "max_linesearch", self.max_linesearch, minimum=1)
        check_float("LBFGS", "c1", self.c1, low=0.0, high=0.5, low_open=True, high_open=True)
        check_float("LBFGS", "c2", self.c2, low=self.c1, high=1.0, low_open=True, high_open=True)

    def resolved_gtol(self, dtype: torch.dtype) -> float:
        """``gtol``, or its dtype default $\\epsilon^{2/3}$."""
        return _eps(dtype) ** (2.0 / 3.0) if self.gtol is None else float(self.gtol)

    def resolved_xtol(self, dtype: torch.dtype) -> float:
        """``xtol``, or its dtype default $10\\epsilon$."""
        return 10.0 * _eps(dtype) if self.xtol is None else float(self.xtol)


@dataclass(frozen=True, kw_only=True)
class SVI(AbstractOptimizer):
    r"""MAP by SVI: Pyro's ``AutoDelta`` guide on ``Trace_ELBO``, with Adam and a learning-rate schedule.

    For a Delta guide the ELBO is exactly the log joint at the guide's point, so SVI is
    stochastic (or, full-batch, plain) gradient ascent on the same objective as
    :class:`LBFGS`. Progress is monitored on windows of ``window`` updates: the window's mean
    loss drives the plateau count of the schedule and the ``rtol`` rule, the change of the
    parameters over a window the ``xtol`` rule.

    Parameters
    ----------
    lr
        Adam's base learning rate.
    max_steps
        Cap on Adam updates; reaching it gives ``FitStatus.MAX_STEPS``.
    schedule
        Learning rate as a function of progress (:class:`PlateauDecay`,
        :class:`ExponentialDecay`, :class:`CosineDecay`, :class:`ConstantLR`).
    subsample_size
        Rows of the plate ``"data"`` per update (minibatch SVI; Pyro rescales the plate's
        terms by $N/n$); ``None`` is full batch.
    window
        Updates per monitoring window.
    rtol
        Stop when consecutive window means differ by at most ``rtol`` relative.
        ``None``: $10\epsilon$ of the dtype, i.e. the loss stopped changing at working
        precision (with a decaying learning rate that is where Adam settles).
    gtol
        Stop when the last update's gradient satisfies the rule of :class:`LBFGS` (full batch
        only: a minibatch gradient does not vanish at the optimum). ``None``:
        $\epsilon^{1/2}$.
    xtol
        Stop when no unconstrained parameter moved by more than ``xtol`` (absolute) over a
        window. ``None``: $\epsilon^{1/2}$. With minibatches this is the rule that normally
        stops SVI.
    betas
        Adam's moment decay rates $(\beta_1, \beta_2)$.

    Notes
    -----
    The defaults (lr 0.5, plateau halving over 25-update windows, rtol $10\epsilon$, full
    batch, cap 20 000) come from the sweep ``benchmarks/tune_svi.py`` (table and commands in
    ``docs/svi_tuning.md``) on the joint MAP of Binomial(16) PCA on 600 digits: the fastest
    setting that stops by itself with status ``CONVERGED`` at the L-BFGS optimum (relative
    log-joint gap 1.7e-14 after 4 925 updates, 27 s CPU; a gap of 1e-4 after 832 updates,
    4.5 s). The previous default lr 0.05 took 12 900 updates. Cosine decay over 2 000
    updates reached a gap of 6e-9 in 11 s but always ends at its budget (``MAX_STEPS``);
    ``rtol=1e-8`` stops after 1 825 updates at a gap of 2.5e-8. Minibatches did not pay on
    600 rows.

    Examples
    --------
    >>> SVI(lr=0.1, subsample_size=100).subsample_size
    100
    >>> SVI(lr=float("nan"))
    Traceback (most recent call last):
    ...
    ValueError: SVI.lr = nan is not allowed; lr must be a finite number in (0, inf)
    """

    label: ClassVar[str] = "SVI"

    lr: float = 0.5
    max_steps: int = 20_000
    schedule: AbstractSchedule = field(default_factory=PlateauDecay)
    subsample_size: int | None = None
    window: int = 25
    rtol: float | None = None
    gtol: float | None = None
    xtol: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        check_float("SVI", "lr", self.lr, low=0.0, low_open=True)
        check_int("SVI", "max_steps", self.max_steps, minimum=0)
        if not isinstance(self.schedule, AbstractSchedule):
            raise TypeError(
                f"SVI.schedule must be a deqppl.optim schedule (PlateauDecay, ExponentialDecay, "
                f"CosineDecay, ConstantLR), got {self.schedule!r}"
            )
        if self.subsample_size is not None:
            check_int("SVI", "subsample_size", self.subsample_size, minimum=1)
        check_int("SVI", "window", self.window, minimum=1)
        check_float("SVI", "rtol", self.rtol, low=0.0, optional=True)
        check_float("SVI", "gtol", self.gtol, low=0.0, optional=True)
        check_float("SVI", "xtol", self.xtol, low=0.0, optional=True)
        if not (isinstance(self.betas, tuple) and len(self.betas) == 2):
            raise ValueError(f"SVI.betas = {self.betas!r} is not allowed; betas must be a pair of numbers in [0, 1)")
        for b in self.betas:
            check_float("SVI", "betas", b, low=0.0, high=1.0, high_open=True)

    def resolved_tolerances(self, dtype: torch.dtype) -> tuple[float, float, float]:
        """``(rtol, gtol, xtol)`` with the dtype defaults filled in."""
        eps = _eps(dtype)
        return (
            10.0 * eps if self.rtol is None else float(self.rtol),
            math.sqrt(eps) if self.gtol is None else float(self.gtol),
            math.sqrt(eps) if self.xtol is None else float(self.xtol),
        )


@dataclass(frozen=True, kw_only=True)
class Adam(AbstractOptimizer):
    r"""Adam over epochs of shuffled minibatches: the joint fit of an encoder's globals on large data.

    Each minibatch loss is rescaled to an unbiased estimate of the full objective. After every
    epoch the full-data loss is evaluated; it drives the schedule (a plateau is an epoch that
    did not decrease it) and the stopping rule.

    Parameters
    ----------
    lr
        Base learning rate.
    num_epochs
        Cap on passes over the data; reaching it gives ``FitStatus.MAX_STEPS``.
    batch_size
        Rows per update (the last batch of an epoch may be smaller). A value at least the
        number of rows gives full-batch gradient descent.
    rtol
        Stop when the full-data loss changes by less than ``rtol`` relative over an epoch.
    schedule
        Learning rate per epoch (default: halve after every epoch that did not decrease the
        full-data loss).
    betas
        Adam's moment decay rates.

    Examples
    --------
    >>> Adam(num_epochs=30, batch_size=500, lr=1e-3).batch_size
    500
    >>> Adam(batch_size=0)
    Traceback (most recent call last):
    ...
    ValueError: Adam.batch_size = 0 is not allowed; batch_size must be an integer >= 1
    """

    label: ClassVar[str] = "Adam"

    lr: float = 0.02
    num_epochs: int = 200
    batch_size: int = 128
    rtol: float = 1e-6
    schedule: AbstractSchedule = field(default_factory=PlateauDecay)
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        check_float("Adam", "lr", self.lr, low=0.0, low_open=True)
        check_int("Adam", "num_epochs", self.num_epochs, minimum=1)
        check_int("Adam", "batch_size", self.batch_size, minimum=1)
        check_float("Adam", "rtol", self.rtol, low=0.0)
        if not isinstance(self.schedule, AbstractSchedule):
            raise TypeError(f"Adam.schedule must be a deqppl.optim schedule, got {self.schedule!r}")
        if not (isinstance(self.betas, tuple) and len(self.betas) == 2):
            raise ValueError(f"Adam.betas = {self.betas!r} is not allowed; betas must be a pair of numbers in [0, 1)")
        for b in self.betas:
            check_float("Adam", "betas", b, low=0.0, high=1.0, high_open=True)
