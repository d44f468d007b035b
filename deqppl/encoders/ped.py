r"""The PED layer: a DEQ whose fixed point is the MAP of exponential-family PCA latents.

For an :class:`~deqppl.models.ExpFamPCA` with loadings $W$ and bias $B$, the negative log
posterior of one latent is (SPEC §2.2)

$$F(z)=\tfrac\lambda2\lVert z\rVert^2-T(y)^\top R(Wz+B)+\mathbf 1^\top A(R(Wz+B)),$$

and $\nabla F = 0$ is exactly the fixed point of the PED layer (eq. 6 of Tsuchida & Ong, 2023,
AISTATS)

$$z=f(z;y)=\tfrac1\lambda W^\top\big(T(y)\odot\rho(Wz+B)-\sigma(Wz+B)\big),$$

with the soft-dropout mask $\rho = R'$ recomputed at every step and $\sigma = (A\circ R)'$. Since
$f(z) = z - \nabla F(z)/\lambda$, its Jacobian is $J_f = I - H/\lambda$ with $H$ the Hessian of
$F$: plain iteration diverges once $\lambda_{\max}(H) > 2\lambda$ even though $F$ is strongly
convex (SPEC §2.3), so the default solver is Newton on $z - f(z)$ with this exact Jacobian,
i.e. Newton's method on $F$, whose cost is a few batched $l\times l$ solves.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from deqppl.deq import AbstractAdjoint, AbstractSolver, Anderson, Newton
from deqppl.expfam import Likelihood, relu
from deqppl.io.registry import register
from deqppl.validation import as_tensor, check_finite, check_shape

from .base import (
    AbstractMAPEncoder,
    LaplaceResult,
    default_adjoint,
    default_rtol,
    gram_factors,
    graph_free,
    row_blocks,
    weighted_gram,
)
from .starts import AbstractStart, RidgeStart, WithStart

__all__ = ["LaplaceResult", "PEDEncoder", "UniquenessReport", "default_adjoint", "default_solver"]
# LaplaceResult and default_adjoint live in .base (shared by every encoder); re-exported here.

#: Latent dimensions up to this use Newton by default (its per-step cost is O(l^3) per sample;
#: above a few dozen, Anderson's O(m l) per step wins).
NEWTON_MAX_DIM = 64


def default_solver(latent_dim: int, dtype: torch.dtype) -> AbstractSolver:
    """Newton for small latent dimensions, Anderson otherwise, at :func:`default_rtol`.

    The tolerance is on the relative residual $\\lVert f(z)-z\\rVert/\\lVert f(z)\\rVert$
    (1e-8 in float64, 1e-4 in float32; see :func:`~deqppl.encoders.base.default_rtol` for the
    measurements behind them). Since $f(z) = z - \\nabla F(z)/\\lambda$ and
    $H \\succeq \\lambda I$, the distance to the MAP is at most the residual.
    """
    rtol = default_rtol(dtype)
    if latent_dim <= NEWTON_MAX_DIM:
        # Generous backtracking: far from the MAP of an exp-type family (Poisson) a full Newton
        # step overshoots by orders of magnitude, and halvings are only paid where needed.
        return Newton(rtol=rtol, atol=0.0, max_steps=100, max_backtracks=40)
    return Anderson(rtol=rtol, atol=0.0, max_steps=2000)


@dataclass(frozen=True)
class UniquenessReport:
    r"""Which uniqueness theorem of Tsuchida & Ong (2023) applies to the current parameters.

    Attributes
    ----------
    theorem
        ``"theorem 1"`` (smooth $R$) or ``"theorem 2"`` (hard ReLU).
    constant
        $\kappa\lVert W^\top W\rVert_2$ (Theorem 1) or $a\lVert W^\top W\rVert_2/\lambda$
        (Theorem 2); the condition is ``constant < 1``.
    holds
        Whether the condition holds: Theorem 1 then guarantees a unique MAP equal to the fixed
        point; Theorem 2 guarantees between 1 and $2^d$ stationary points, all local minima.
    detail
        How the constant was computed.
    """

    theorem: str
    constant: float
    holds: bool
    detail: str


def _observations(data: Mapping[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """``y`` from validated data (a bare ``y`` tensor is accepted for the tensor-level methods)."""
    return data["y"] if isinstance(data, Mapping) else data


@register("PEDEncoder")
class PEDEncoder(WithStart, AbstractMAPEncoder):
    r"""DEQ encoder whose fixed point is the conditional MAP of an ExpFamPCA's latents.

    An encoder of the protocol (:class:`~deqppl.encoders.AbstractMAPEncoder`): data
    ``{"y": (n, obs_dim)}`` (or the bare ``y``), fixed point ``(n, latent_dim)``, sites
    ``{"z": z}``, globals ``W`` and ``B``.

    Parameters
    ----------
    model
        The :class:`~deqppl.models.ExpFamPCA` whose latents are encoded. Its family and
        nonlinearity give $\sigma$ and $\rho$; its ``lam`` is $\lambda$.
    W, B
        Initial loadings ``(obs_dim, latent_dim)`` and bias ``(obs_dim,)``; default a seeded
        draw $W_{ij}\sim\mathcal N(0, 1/d)$, $B=0$. They are the Pyro model's globals: see
        :meth:`values` and :meth:`from_values`.
    solver
        Forward solver; default :func:`default_solver` (Newton with the exact Jacobian for
        ``latent_dim <= 64``), full-step Newton for the hard ReLU.
    adjoint
        How gradients reach $(W, B)$ through $z^*$; default implicit differentiation with a
        Newton adjoint solve (exact for small latent dimensions).
    throw
        Raise :class:`~deqppl.deq.ConvergenceError` if any datapoint's solve did not converge.
    seed
        Seed of the default initialisation.
    start
        Where the solve starts (:mod:`deqppl.encoders.starts`): default
        :class:`~deqppl.encoders.RidgeStart`; :class:`~deqppl.encoders.ZeroStart`, or a
        :class:`~deqppl.encoders.LearnedStart` fitted on training fixed points (one or two
        Newton steps instead of four to eight). The start changes the cost, not the fixed
        point. Settable later: ``enc.start = LearnedStart().fit(enc, y_train)``.

    Notes
    -----
    With the hard ReLU a coordinate with $T(y_i) < 0$ adds a convex kink to $F$ at
    $\eta_i = 0$, and the MAP can sit exactly on it; there $f$ jumps and has no fixed point, so
    the solve reports non-convergence for that datapoint rather than returning it.

    The tensor-level methods (:meth:`layer`, :meth:`layer_jacobian`, :meth:`hessian`,
    :meth:`initial_guess`) take validated data or the bare ``y`` and do not check it.

    Examples
    --------
    >>> import torch
    >>> from deqppl.expfam import gaussian
    >>> from deqppl.models import ExpFamPCA
    >>> model = ExpFamPCA(family=gaussian(), obs_dim=5, latent_dim=2, lam=1.0)
    >>> enc = PEDEncoder(model).double()
    >>> y = torch.randn(4, 5, dtype=torch.float64)
    >>> z, sol = enc(y)
    >>> W, B = enc.W.detach(), enc.B.detach()
    >>> closed = torch.linalg.solve(torch.eye(2, dtype=W.dtype) + W.T @ W, (W.T @ (y - B).T)).T
    >>> bool(torch.allclose(z, closed, atol=1e-10)), bool(sol.converged.all())
    (True, True)
    >>> sites, _ = enc.sites({"y": y})
    >>> sorted(sites), sorted(enc.values())
    (['z'], ['B', 'W'])
    """

    required_model_attributes = ("family", "nonlinearity", "obs_dim", "latent_dim", "lam")
    model_kind = "an ExpFamPCA-like model"
    # Every datum's latent is its own problem (SPEC eq. 6): solve only the rows still iterating.
    rows_independent = True

    def __init__(
        self,
        model,
        *,
        W: torch.Tensor | None = None,
        B: torch.Tensor | None = None,
        solver: AbstractSolver | None = None,
        adjoint: AbstractAdjoint | None = None,
        throw: bool = True,
        seed: int = 0,
        start: AbstractStart | None = None,
    ) -> None:
        super().__init__(model, solver=solver, adjoint=adjoint, throw=throw)
        self.likelihood = Likelihood(model.family, model.nonlinearity)
        d, l = model.obs_dim, model.latent_dim
        gen = torch.Generator().manual_seed(seed)
        if W is None:
            W = torch.randn(d, l, generator=gen) / math.sqrt(d)
        W = as_tensor(W, "W")
        B = torch.zeros(d, dtype=W.dtype) if B is None else as_tensor(B, "B", dtype=W.dtype)
        check_shape(W, (d, l), "W")
        check_shape(B, (d,), "B")
        # named here: a NaN would otherwise surface later as a residual of f, naming neither
        check_finite(W, "W")
        check_finite(B, "B")
        self.W = nn.Parameter(W.detach().clone())
        self.B = nn.Parameter(B.detach().clone())
        self.start = RidgeStart() if start is None else start

    # ---------------------------------------------------------------- saved models
    def config(self) -> dict:
        """Solver, adjoint and ``throw`` as JSON (the globals are the tensors); see :func:`deqppl.io.save`."""
        return self._settings_config()

    @classmethod
    def from_config(cls, model, config: Mapping, tensors: Mapping[str, torch.Tensor]) -> PEDEncoder:
        """Rebuild from :meth:`config` and the ``state_dict`` tensors ``{"W", "B"}`` (their dtype kept)."""
        return cls(model, W=tensors["W"], B=tensors["B"], **cls._settings_from_config(config))

    # ---------------------------------------------------------------- the layer (SPEC eq. 6)
    @property
    def lam(self) -> float:
        return float(self.model.lam)

    def eta(self, z: torch.Tensor) -> torch.Tensor:
        """Pre-activation $\\eta = Wz + B$, ``(n, d)``."""
        return z @ self.W.T + self.B

    def layer(self, z: torch.Tensor, data) -> torch.Tensor:
        r"""One PED layer $f(z;y)=\lambda^{-1}W^\top(T(y)\odot\rho(\eta)-\sigma(\eta))$.

        Without an autograd graph (inside the solver) it is evaluated in row blocks
        (:func:`~deqppl.encoders.base.row_blocks`) written into one output, the same
        arithmetic row by row as the whole-batch expression used when a graph is recorded.
        """
        y = _observations(data)
        W, B = self.W, self.B
        if not graph_free(z, W, B):
            return self.likelihood.drive(y, self.eta(z)) @ W / self.lam
        W, B = W.detach(), B.detach()
        out = z.new_empty(z.shape[0], W.shape[1])
        for rows in row_blocks(z.shape[0], W.shape[0]):
            eta = torch.addmm(B, z[rows], W.T)
            torch.mm(self.likelihood.drive(y[rows], eta), W, out=out[rows])
        return out.div_(self.lam)

    def layer_jacobian(self, z: torch.Tensor, data) -> torch.Tensor:
        r"""Exact per-sample Jacobian $J_f=-\lambda^{-1}W^\top\mathrm{diag}(c)W$, ``(n, l, l)``.

        $c = \sigma'(\eta)-T(y)\rho'(\eta)$ is :meth:`~deqppl.expfam.Likelihood.curvature`;
        the product is one GEMM over the $l(l+1)/2$ entries of the upper triangle
        (:func:`~deqppl.encoders.base.weighted_gram`), in row blocks without a graph (as
        :meth:`layer`).
        """
        y = _observations(data)
        W, B = self.W, self.B
        if not graph_free(z, W, B):
            return -weighted_gram(W, self.likelihood.curvature(y, self.eta(z))) / self.lam
        W, B = W.detach(), B.detach()
        l = W.shape[1]
        outer, index = gram_factors(W)
        outer = outer / -self.lam  # J_f = -H/lam: scaled once, not per row
        upper = z.new_empty(z.shape[0], outer.shape[1])
        for rows in row_blocks(z.shape[0], W.shape[0]):
            eta = torch.addmm(B, z[rows], W.T)
            torch.mm(self.likelihood.curvature(y[rows], eta), outer, out=upper[rows])
        return upper.index_select(1, index).view(-1, l, l)

    def linearize(self, z: torch.Tensor, data):
        r""":meth:`layer` at ``z`` and a function for :meth:`layer_jacobian` there, sharing $A'(\eta)$.

        For $R$ = identity the curvature $c = A''(\eta)$ is a function of the mean
        $m = A'(\eta)$ the layer computes anyway
        (:meth:`~deqppl.expfam.Likelihood.curvature_from_mean`, e.g. $m(1-m)$ for Bernoulli):
        one blocked pass computes $f(z)$ and keeps $m$ ``(n, d)``; the returned
        ``jacobian(keep)`` is then $c(m)$ and one GEMM on the rows ``keep`` (``None``: all),
        without a second pass over $\eta$ and its transcendental functions. What `Newton` uses
        after an accepted step (:func:`~deqppl.deq.fixed_point`'s ``linearize``). Otherwise
        (another $R$, or an autograd graph) the layer and a deferred :meth:`layer_jacobian`.

        Returns
        -------
        fz : torch.Tensor
            ``(n, l)``, bitwise :meth:`layer`.
        jacobian : callable
            ``keep -> (k, l, l)``, :meth:`layer_jacobian` at those rows (up to rounding).
        """
        y = _observations(data)
        W, B, lik = self.W, self.B, self.likelihood
        if not (lik.curvature_is_mean_function and graph_free(z, W, B)):
            return super().linearize(z, {"y": y})  # nothing shared: the two methods
        W, B, T = W.detach(), B.detach(), self.model.family.T
        n, (d, l) = z.shape[0], W.shape
        out = z.new_empty(n, l)
        blocks = row_blocks(n, d)
        # the means stay in their cache-sized blocks: one (n, d) buffer would be fresh memory
        # at every call (measured at d = 500: ~10 000 page faults, 18 ms, the whole saving)
        means = []
        for rows in blocks:
            m = lik.activation(torch.addmm(B, z[rows], W.T))  # R = identity: A'(eta)
            means.append(m)
            torch.mm(T(y[rows]) - m, W, out=out[rows])  # = drive, as in layer
        starts = [rows.start for rows in blocks] + [n]

        def jacobian(keep=None):
            outer, index = gram_factors(W)
            outer = outer / -self.lam
            size = n if keep is None else keep.shape[0]
            upper = z.new_empty(size, outer.shape[1])
            # kept rows of block b: positions bounds[b]:bounds[b + 1] of keep (it increases)
            bounds = starts if keep is None else torch.searchsorted(
                keep.cpu(), torch.tensor(starts, dtype=keep.dtype)).tolist()
            for b, m in enumerate(means):
                low, high = bounds[b], bounds[b + 1]
                if high == low:
                    continue
                if keep is not None:
                    m = m.index_select(0, keep[low:high] - starts[b])
                torch.mm(lik.curvature_from_mean(m), outer, out=upper[low:high])
            return upper.index_select(1, index).view(-1, l, l)

        return out.div_(self.lam), jacobian

    def hessian(self, z: torch.Tensor, data) -> torch.Tensor:
        r"""Hessian of the negative log posterior $H=\lambda(I-J_f)$, ``(n, l, l)``."""
        eye = torch.eye(self.model.latent_dim, dtype=z.dtype, device=z.device)
        return self.lam * (eye - self.layer_jacobian(z, data))

    # ---------------------------------------------------------------- the protocol
    def latent_shape(self, data) -> tuple[int, int]:
        """``(n, latent_dim)``."""
        return (_observations(data).shape[0], self.model.latent_dim)

    def to_sites(self, z: torch.Tensor, data=None) -> dict[str, torch.Tensor]:
        """``{"z": z}``: the fixed point is the model's local site."""
        return {"z": z}

    def _check_y(self, y: torch.Tensor) -> torch.Tensor:
        # Kept for callers written before check_data (the harness); use check_data.
        return self.check_data(y)["y"]

    def default_solver(self, dtype: torch.dtype) -> AbstractSolver:
        """The solver used when none was given, for this model's nonlinearity and ``dtype``."""
        l = self.model.latent_dim
        if self.model.nonlinearity == relu() and l <= NEWTON_MAX_DIM:
            # Hard ReLU makes f piecewise linear and discontinuous (rho = Theta). A full Newton
            # step solves the linear system of the current activation pattern exactly (an
            # active-set iteration); backtracking on the residual instead stalls at the jumps.
            # Measured on 600 rectified-Gaussian rows (W ~ N(0, s^2), s in {0.2, 0.4, 1},
            # y >= 0): full-step Newton failed on 0, Newton with line search on ~18%,
            # Anderson on 3%.
            return Newton(rtol=default_rtol(dtype), atol=0.0, max_steps=100, line_search=False)
        solver = default_solver(l, dtype)
        if isinstance(solver, Newton) and not self.model.nonlinearity.is_identity:
            # The 40 halvings are for exp-type families far from the MAP, which only the identity
            # R reaches (smooth R bound the natural parameter's growth). With a non-convex
            # posterior (smooth ReLU during fine-tuning) a row without a fixed point otherwise
            # costs 100 x 41 layer evaluations per solve: measured, one Figure 7 rectified
            # dataset ran > 4 min instead of 15 s.
            solver = Newton(rtol=solver.rtol, atol=0.0, max_steps=50, max_backtracks=10)
        return solver

    def initial_guess(self, data) -> torch.Tensor:
        """The start of the solve: :attr:`start` applied to these data (default ridge start)."""
        return self.start(self, data)

    def objective(self, z: torch.Tensor, data) -> torch.Tensor:
        r"""Per-row negative log posterior $F(z)$ up to a constant in $z$, ``(n,)``, no graph.

        $F(z)=\tfrac\lambda2\lVert z\rVert^2-T(y)^\top R(\eta)+\mathbf 1^\top A(R(\eta))$
        (SPEC §2.2), without $\log h(y)$: what :class:`~deqppl.encoders.LearnedStart` compares
        its candidates by.
        """
        with torch.no_grad():
            y = _observations(data)
            fam = self.model.family
            W, B = self.W.detach(), self.B.detach()
            out = 0.5 * self.lam * (z * z).sum(-1)
            for rows in row_blocks(z.shape[0], W.shape[0]):  # as layer: cache-sized blocks
                v = self.likelihood.natural(torch.addmm(B, z[rows], W.T))
                out[rows] += (fam.A(v) - fam.T(y[rows]) * v).sum(-1)
            return out

    def summary(self, data) -> torch.Tensor:
        r"""The data summary $s = W^\top T(y)$ ``(n, latent_dim)``, detached.

        For $R$ = identity the negative log posterior depends on $y$ only through $s$ (the
        fixed point solves $s = \lambda z + W^\top A'(Wz+B)$), so $z^*$ is a function of $s$:
        what :class:`~deqppl.encoders.LearnedStart` regresses on.
        """
        with torch.no_grad():
            return self.model.family.T(_observations(data)) @ self.W.detach()

    # ---------------------------------------------------------------- the structured joint fit
    def joint_structure(self):
        r"""One GLM layer: $y\mid\eta$ from the model's likelihood, globals ``W``, ``B``.

        Raises
        ------
        ValueError
            For the hard ReLU (the log joint is not differentiable where its MAPs sit), or a
            flat prior on ``W`` (``param_scale=None``: no joint MAP exists).
        """
        from .joint import GLMLayer, JointStructure

        m = self.model
        layer = GLMLayer(self.likelihood, "W", "B", m.latent_dim, m.param_scale)
        return JointStructure(layers=(layer,), top_precision=float(m.lam))

    def default_fit_optimizer(self):
        r"""``AlternatingNewton()`` for $R$ = identity (convex half-steps) and a Gaussian prior on
        the globals (with a flat one the joint MAP does not exist), else ``LBFGS()``."""
        from deqppl.optim import LBFGS, AlternatingNewton

        if self.model.nonlinearity.is_identity and self.model.param_scale is not None:
            return AlternatingNewton()
        return LBFGS()

    # ---------------------------------------------------------------- diagnostics
    def uniqueness(self, y: torch.Tensor | None = None) -> UniquenessReport:
        r"""Check Theorem 1 (or Theorem 2 for hard ReLU) of Tsuchida & Ong (2023).

        Theorem 1: $\kappa\lVert W^\top W\rVert_2<1$ with
        $\kappa=\lambda^{-1}\sup_\eta(T(y)\rho'(\eta)-\sigma'(\eta))$; the supremum is taken
        over a grid of $\eta\in[-50, 50]$ and the observed $T(y)$ (for $R$ = identity
        $\kappa\le 0$ and the condition holds for every $W$; other $R$ need ``y``).
        Theorem 2 (hard ReLU): $a\lVert W^\top W\rVert_2/\lambda<1$ with $a=\sup A''$.
        """
        with torch.no_grad():
            norm = float(torch.linalg.matrix_norm(self.W.T @ self.W, ord=2))
            name = self.model.nonlinearity.name
            if name == "relu":
                a = self.model.family.curvature_bound
                const = a * norm / self.lam
                return UniquenessReport(
                    "theorem 2", const, const < 1, f"a = sup A'' = {a:g}, ||W^T W|| = {norm:.4g}"
                )
            eta = torch.linspace(-50, 50, 20001, dtype=self.W.dtype)
            if y is None:
                if not self.model.nonlinearity.is_identity:
                    # kappa depends on sup T(y) rho'(eta), i.e. on the data, for every R but
                    # the identity (rho' = 0); a guessed range of T(y) would give a wrong bound.
                    raise ValueError(
                        f"uniqueness() needs the observations y for R = "
                        f"{self.model.nonlinearity.name}: the Theorem 1 constant depends on "
                        f"T(y) through T(y) rho'(eta); pass y (n, {self.model.obs_dim})"
                    )
                t_values = torch.zeros(1, dtype=self.W.dtype)  # rho' = 0: T(y) drops out
            else:
                y = self.check_data(y)["y"]
                t_values = self.model.family.T(y).reshape(-1)
                t_values = torch.stack([t_values.min(), t_values.max()])
            lik = self.likelihood
            rho_p = lik.nonlinearity.drho(eta)
            sig_p = lik.activation_grad(eta)
            vals = t_values[:, None] * rho_p[None, :] - sig_p[None, :]
            vals = vals[torch.isfinite(vals)]
            kappa = max(float(vals.max()), 0.0) / self.lam
            const = kappa * norm
            return UniquenessReport(
                "theorem 1",
                const,
                const < 1,
                f"kappa = {kappa:.4g} over eta in [-50, 50], ||W^T W|| = {norm:.4g}",
            )
