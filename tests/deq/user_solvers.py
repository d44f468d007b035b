"""Solvers written the way a user would: public API only (`deqppl.deq`), no private modules."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from deqppl.deq import AbstractSolver, check_real


@dataclass(frozen=True, kw_only=True)
class AdaptiveRelaxation(AbstractSolver):
    """$z \\leftarrow z + \\beta_b (f(z) - z)$ with a per-sample $\\beta_b$ halved on every step
    whose residual grew (then restarted from the best iterate); gives up below ``min_beta``.

    For MAP maps of strongly convex objectives, $f(z) - z$ is a negative gradient, so a small
    enough $\\beta$ always decreases the residual: it converges where plain iteration diverges.
    """

    beta: float = 1.0
    min_beta: float = 1e-8
    rtol: float = 1e-6
    atol: float = 1e-8
    max_steps: int = 5000

    def __post_init__(self):
        self._check_common()
        check_real("beta", self.beta, low=0.0, high=1.0, low_open=True)
        check_real("min_beta", self.min_beta, low=0.0, high=self.beta, low_open=True)

    def init(self, problem, z0, fz0):
        return torch.full((z0.shape[0],), self.beta, dtype=z0.dtype, device=z0.device)

    def step(self, problem, beta, iterate):
        grew = iterate.residual_norm > iterate.best_residual_norm
        beta = torch.where(grew, 0.5 * beta, beta)
        start = torch.where(grew[:, None], iterate.best_z, iterate.z)
        direction = torch.where(grew[:, None], iterate.best_fz - iterate.best_z,
                                iterate.residual)
        return start + beta[:, None] * direction, None, beta

    def terminate(self, problem, beta, iterate):
        return beta < self.min_beta


@dataclass(frozen=True, kw_only=True)
class DouglasRachford(AbstractSolver):
    """Douglas-Rachford splitting for $z = \\mathrm{relu}(Wz + x)$ with $I - W \\succeq mI$.

    The fixed point solves $0 \\in (I - W)z - x + N_{\\ge 0}(z)$; with the user-provided
    resolvent $R(v) = (I + \\alpha(I - W))^{-1}(v + \\alpha x)$ of the linear part and the
    projection onto $z \\ge 0$ (the resolvent of the normal cone), the iteration on $u$ is
    $z = (u)_+$, $u \\leftarrow u + R(2z - u) - z$ (Lions & Mercier, 1979, SIAM J. Numer. Anal.;
    used for monotone-operator DEQs by Winston & Kolter, 2020, NeurIPS).
    """

    resolvent: Callable[[torch.Tensor], torch.Tensor]
    rtol: float = 1e-6
    atol: float = 1e-8
    max_steps: int = 2000

    def __post_init__(self):
        self._check_common()
        if not callable(self.resolvent):
            raise TypeError(f"resolvent must be callable, got {self.resolvent!r}")

    def init(self, problem, z0, fz0):
        return z0.clone()  # the splitting variable u, with z = relu(u)

    def step(self, problem, u, iterate):
        z = torch.relu(u)
        u = u + self.resolvent(2.0 * z - u) - z
        return torch.relu(u), None, u
