r"""Settings of the structured joint fit: alternating batched Newton half-steps, Anderson-accelerated."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from deqppl.optim._checks import check_float, check_int
from deqppl.optim._settings import AbstractOptimizer

__all__ = ["AlternatingNewton"]


@dataclass(frozen=True, kw_only=True)
class AlternatingNewton(AbstractOptimizer):
    r"""Joint MAP of globals and latents by alternating batched Newton half-steps (SPEC §2.4.1).

    For a model whose globals decouple by rows given the latents and whose latents decouple by
    data rows given the globals (exponential-family PCA, the hierarchical model), one *sweep*
    $G$ is: one batched Newton (Fisher-scoring) step on every row of $[W\;B]$, each an
    $(l+1)$-dimensional GLM, then one batched Newton step on every latent, each the
    $l$-dimensional PED problem, both warm-started at the current iterate and safeguarded by
    per-row step halving so that no row's objective increases. The sweeps are accelerated by
    Anderson acceleration of $\theta\mapsto G(\theta)$ (Walker & Ni, 2011, SIAM J. Numer.
    Anal.), with the safeguard of DAAREM (Henderson & Varadhan, 2019, J. Comput. Graph.
    Stat.): the extrapolated point is kept only when its objective is no higher than that
    of the plain sweep, else the history restarts. The objective therefore never increases.

    Parameters
    ----------
    max_steps
        Cap on outer iterations (one sweep each, plus one objective evaluation at the
        extrapolated point); reaching it gives ``FitStatus.MAX_STEPS``.
    dtol
        Stopping rule on the joint gradient scaled by the curvature: stop when
        $\tfrac12\sum_b g_b^\top H_b^{-1}g_b\le\mathrm{dtol}\cdot\max(1,|f|)$, the sum over the
        blocks $b$ (rows of $[W\;B]$, latents of the data rows) of the decrease their Newton
        steps predict, $g_b$ the block's gradient and $H_b$ its (Fisher) Hessian. ``None``:
        $\epsilon^{2/3}$ of the dtype ($3.7\times10^{-11}$ in float64), the same bound
        :class:`~deqppl.optim.LBFGS`'s default gradient rule puts on its model decrement, so
        that the protocol's optimisers stop at one accuracy target. The rule sees only the
        block-diagonal curvature; along the rotation/scale ridge between $W$ and $Z$ the
        remaining gap to the optimum can be larger by the coupling factor, so the distance
        left is measured rather than assumed (``docs/bench_joint.md``: a relative log-joint gap
        of 5e-13 on the Poisson anchor problem and 2e-10 on the digits; ``dtol=1e-14``
        takes it to the rounding level, ~5e-15, in 30-40% more sweeps).
    memory
        Anderson history (number of past sweeps combined); 0 runs the plain alternation.
        Measured sweeps to the stopping rule (``docs/bench_joint.md``; under the former default
        ``dtol`` of $10\epsilon$) for memories 2 / 3 / 5 / 8: 16 / 14 / 14 / 14 on the Poisson anchor problem and 39 / 34 / 34 / 31 on the
        digits, at equal CPU time for 3-8; the plain alternation took 46 sweeps on the anchor.
    regularization
        Tikhonov term of Anderson's least-squares problem, relative to the largest squared
        residual difference (keeps the combination bounded when differences are nearly
        collinear, as on the ridge).
    spectral_start
        Start from the top-$l$ principal subspace of the data's linearised natural parameters
        (:meth:`deqppl.encoders.joint._Problem.spectral_start`; one layer with $R$ = identity)
        instead of the encoder's current globals. On the anchor problem of
        ``benchmarks/bench_joint.py`` it replaces the first ~6 of ~19 sweeps. ``False`` keeps
        the encoder's globals as the start (to continue a fit).
    max_backtracks
        Step halvings per row of a half-step before that row keeps its old value (far from
        the optimum a full Newton step of an exp-type family can overshoot by orders of
        magnitude).

    Notes
    -----
    For $R$ = identity both half-steps are convex Newton steps. For other smooth $R$ the
    half-steps use the expected (Fisher) curvature $A''(R(\eta))\rho(\eta)^2\ge0$ instead of
    the observed one, which can be negative, so every half-step is a descent step guarded by
    step halving: the fit converges to a stationary point, linearly rather than quadratically.

    Examples
    --------
    >>> AlternatingNewton().memory
    5
    >>> AlternatingNewton(memory=-1)
    Traceback (most recent call last):
    ...
    ValueError: AlternatingNewton.memory = -1 is not allowed; memory must be an integer >= 0
    """

    label: ClassVar[str] = "alternating Newton"

    max_steps: int = 2000
    dtol: float | None = None
    memory: int = 5
    regularization: float = 1e-10
    spectral_start: bool = True
    max_backtracks: int = 30

    def __post_init__(self) -> None:
        check_int("AlternatingNewton", "max_steps", self.max_steps, minimum=0)
        check_float("AlternatingNewton", "dtol", self.dtol, low=0.0, optional=True)
        check_int("AlternatingNewton", "memory", self.memory, minimum=0)
        check_float("AlternatingNewton", "regularization", self.regularization, low=0.0)
        check_int("AlternatingNewton", "max_backtracks", self.max_backtracks, minimum=0)
        if not isinstance(self.spectral_start, bool):
            raise ValueError(
                f"AlternatingNewton.spectral_start = {self.spectral_start!r} is not allowed; "
                f"spectral_start must be True or False"
            )

    def resolved_dtol(self, dtype: torch.dtype) -> float:
        """``dtol``, or its dtype default $\\epsilon^{2/3}$ (the default of ``LBFGS.gtol``)."""
        return float(torch.finfo(dtype).eps) ** (2.0 / 3.0) if self.dtol is None else float(self.dtol)
