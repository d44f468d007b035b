r"""L-BFGS on a flat vector with a strong-Wolfe line search driven by the directional derivative.

The objective is a callable ``fun(x) -> (f, g)`` returning the loss as a Python float and its
gradient as a tensor like ``x``; it may return a non-finite ``f`` (an overflow at a trial
point), which the line search treats as "too far".

References: Nocedal & Wright (2006), *Numerical Optimization*, 2nd ed., Springer: Algorithm
7.4 (two-loop recursion), Algorithms 3.5-3.6 (bracketing and zoom); Hager & Zhang (2005),
*SIAM J. Optim.* 16(1): the approximate Wolfe conditions used where loss differences are
below rounding.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from deqppl.optim._driver import AbstractStepper, Observation
from deqppl.optim._settings import LBFGS

__all__ = ["LBFGSStepper"]

Objective = Callable[[torch.Tensor], tuple[float, torch.Tensor]]

# A loss increase up to this many ulps of |f| is indistinguishable from rounding of a sum of
# many terms (torch's pairwise summation of M terms errs by ~log2(M) eps sum|terms|; 1000
# covers cancellation in sums of terms ~50x larger than their total). Only below this margin
# does the line search fall back on derivative-only decrease (Hager & Zhang's epsilon_k,
# which they set to 1e-6 |f|; ours is far stricter).
_NOISE_ULPS = 1000.0
# Keep secant / interpolation trial points this fraction of the bracket away from its ends,
# so that each trial shrinks the bracket by at least that much (Nocedal & Wright §3.5).
_SAFEGUARD = 0.1
# Expansion factor of the bracketing phase when the step is still too short.
_EXPAND = 4.0


@dataclass
class _Point:
    t: float
    f: float
    d: float  # phi'(t) = g(x + t p) . p
    g: torch.Tensor | None


def _finite(f: float, g: torch.Tensor) -> bool:
    return math.isfinite(f) and bool(torch.isfinite(g).all())


def _cubic_min(a: _Point, b: _Point) -> float | None:
    """Minimiser of the cubic through (t, f, d) at a and b (Nocedal & Wright eq. 3.59)."""
    d1 = a.d + b.d - 3.0 * (a.f - b.f) / (a.t - b.t)
    disc = d1 * d1 - a.d * b.d
    if not (math.isfinite(disc) and disc >= 0):
        return None
    d2 = math.copysign(math.sqrt(disc), b.t - a.t)
    denom = b.d - a.d + 2.0 * d2
    if denom == 0 or not math.isfinite(denom):
        return None
    t = b.t - (b.t - a.t) * (b.d + d2 - d1) / denom
    return t if math.isfinite(t) else None


class LBFGSStepper(AbstractStepper):
    """One L-BFGS iteration per ``step``; ``x`` holds the current (accepted) iterate."""

    def __init__(self, fun: Objective, x0: torch.Tensor, settings: LBFGS) -> None:
        self.fun = fun
        self.x = x0.detach().clone()
        self.settings = settings
        self.memory: deque[tuple[torch.Tensor, torch.Tensor, float]] = deque(
            maxlen=settings.history_size
        )
        self.eps = float(torch.finfo(x0.dtype).eps)
        self.f = math.nan
        self.g = torch.zeros_like(self.x)
        self._next: torch.Tensor | None = None

    # -------------------------------------------------------------------------- observations
    def _observe(self, *, step_max: float, evals: int, stalled: str | None = None) -> Observation:
        gmax = float(self.g.abs().max()) if self.g.numel() else 0.0
        xmax = float(self.x.abs().max()) if self.x.numel() else 0.0
        # The next search direction, computed once here: its model decrement -g.p/2 tells the
        # stopping rules how far the loss may still fall (steepest descent when p is no descent).
        self._next = self._direction() if math.isfinite(self.f) else None
        decrement = math.nan
        if self._next is not None:
            slope = float(self.g @ self._next)
            decrement = -0.5 * slope if slope < 0 else 0.5 * float(self.g @ self.g)
        return Observation(
            loss=self.f, grad_max=gmax, step_max=step_max, x_max=xmax, num_evals=evals,
            stalled=stalled, decrement=decrement,
        )

    def start(self) -> Observation:
        self.f, self.g = self.fun(self.x)
        if not _finite(self.f, self.g):
            self.f = self.f if not math.isfinite(self.f) else math.nan
        return self._observe(step_max=math.nan, evals=1)

    # -------------------------------------------------------------------------- direction
    def _direction(self) -> torch.Tensor:
        q = -self.g.clone()
        if not self.memory:
            return q
        alphas = []
        for s, y, rho in reversed(self.memory):
            a = rho * float(s @ q)
            alphas.append(a)
            q.add_(y, alpha=-a)
        s, y, _ = self.memory[-1]
        q.mul_(float(s @ y) / float(y @ y))  # H0 = gamma I (Nocedal & Wright eq. 7.20)
        for (s, y, rho), a in zip(self.memory, reversed(alphas), strict=True):
            b = rho * float(y @ q)
            q.add_(s, alpha=a - b)
        return q

    # -------------------------------------------------------------------------- line search
    def _line_search(self, p: torch.Tensor, t: float) -> tuple[_Point | None, int, str]:
        """Strong-Wolfe step along ``p``; returns (accepted point or None, evaluations, note)."""
        c1, c2 = self.settings.c1, self.settings.c2
        f0 = self.f
        d0 = float(self.g @ p)
        noise = _NOISE_ULPS * self.eps * max(1.0, abs(f0))
        pmax = float(p.abs().max())
        # The bracket cannot be resolved below a relative change of the iterate of one ulp.
        t_res = self.eps * max(1.0, float(self.x.abs().max())) / pmax
        lo = _Point(0.0, f0, d0, self.g)
        hi: _Point | None = None
        evals = 0
        while evals < self.settings.max_linesearch:
            f, g = self.fun(self.x + t * p)
            evals += 1
            if not _finite(f, g):
                hi = _Point(t, math.inf, math.nan, None)
            else:
                d = float(g @ p)
                armijo = f <= f0 + c1 * t * d0
                # Approximate Wolfe (Hager & Zhang 2005, eq. 23): Armijo's condition for the
                # quadratic model of phi, checked on phi' alone; valid while phi(t) is within
                # rounding of phi(0).
                approx = f <= f0 + noise and d <= (1.0 - 2.0 * c1) * abs(d0)
                point = _Point(t, f, d, g)
                if not (armijo or approx):
                    hi = point
                elif abs(d) <= c2 * abs(d0):
                    return point, evals, ""
                elif d > 0:
                    hi = point
                else:
                    lo = point
            if hi is None:
                t = _EXPAND * t
                continue
            width = hi.t - lo.t
            if width <= t_res:
                break
            t_new = None
            if math.isfinite(hi.f) and not math.isnan(hi.d):
                if hi.d > 0 and lo.d < 0:
                    # secant on phi': the root of the derivative's chord
                    t_new = lo.t - lo.d * (hi.t - lo.t) / (hi.d - lo.d)
                else:
                    t_new = _cubic_min(lo, hi)
            if t_new is None or not math.isfinite(t_new):
                t_new = 0.5 * (lo.t + hi.t)
            margin = _SAFEGUARD * width
            t = min(max(t_new, lo.t + margin), hi.t - margin)
        if lo.t > 0:
            # Sufficient decrease holds and phi' < 0 at lo: a usable (if short) step.
            return lo, evals, "line search ended on a short step"
        return None, evals, (
            f"line search found no decrease along the search direction in {evals} evaluations "
            f"(directional derivative {d0:.3g})"
        )

    # -------------------------------------------------------------------------- one iteration
    def step(self, budget: int) -> Observation:
        p = self._next if self._next is not None else self._direction()
        if not float(self.g @ p) < 0:
            self.memory.clear()
            p = -self.g.clone()
        evals = 0
        for attempt in range(2):
            if self.memory:
                t0 = 1.0
            else:
                # First (or restarted) step along -g: length 1 in the largest coordinate,
                # at most a unit step (torch.optim.LBFGS uses min(1, 1/|g|_1)).
                t0 = min(1.0, 1.0 / max(float(p.abs().max()), 1e-300))
            point, n, note = self._line_search(p, t0)
            evals += n
            if point is not None:
                break
            if not self.memory or attempt == 1:
                return self._observe(step_max=0.0, evals=evals, stalled=note)
            # restart along the steepest descent direction once
            self.memory.clear()
            p = -self.g.clone()
        s = point.t * p
        x_new = self.x + s
        y = point.g - self.g
        sy = float(s @ y)
        if sy > self.eps * float(y @ y) and math.isfinite(sy):
            self.memory.append((s, y, 1.0 / sy))
        self.x, self.f, self.g = x_new, point.f, point.g
        return self._observe(step_max=float(s.abs().max()) if s.numel() else 0.0, evals=evals)
