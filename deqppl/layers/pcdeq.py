"""Positive concave DEQ layers (Gabor, Piotrowski & Cavalcante, 2024, ICML; SPEC 5).

$z^* = \\sigma(W z^* + b + u(x))$ with $W \\ge 0$, $b \\ge 0$, $\\sigma$ nondecreasing, concave and
bounded on $\\mathbb R_+$, and $g_x(0) = \\sigma(b + u(x)) > 0$. Then $g_x$ is a standard
interference mapping: its fixed point exists and is unique for every $W \\ge 0$ whatever its
norm, and plain iteration from $z_0 = 0$ reaches it monotonically and geometrically. At $z^*$,
$J = \\mathrm{diag}(\\sigma')W \\ge 0$ and $Jz^* \\le z^* - g_x(0) < z^*$, so $\\rho(J) < 1$ and the
implicit-gradient system is solved by plain iteration too.
"""

from __future__ import annotations

import torch

from ..deq import (AbstractAdjoint, AbstractSolver, FixedPointIteration, FixedPointLinearSolver,
                   ImplicitAdjoint)
from ._base import AbstractImplicitLayer, LayerSolution, _check_positive_int, _check_positive_real
from ._weights import ConvWeight, DenseWeight
from .activations import (AbstractActivation, AbstractInjection, ReLUInjection,
                          SoftplusInjection, Tanh)
from .cones import AbstractCone, SoftplusCone

__all__ = ["PCDEQLinear", "PCDEQConv2d", "default_pcdeq_solver", "default_pcdeq_adjoint"]


def default_pcdeq_solver() -> FixedPointIteration:
    """Plain iteration, relative tolerance $10^{-4}$, at most 200 steps (the paper's settings)."""
    return FixedPointIteration(rtol=1e-4, max_steps=200)


def default_pcdeq_adjoint() -> ImplicitAdjoint:
    """Implicit adjoint whose linear solver is plain iteration on $u = J^\\top u + g$.

    Plain iteration suffices because $\\rho(J) < 1$ at a pcDEQ fixed point (SPEC 5, derived);
    a purely relative tolerance $10^{-4}$ (as the forward) so that small gradients are not
    declared converged by an absolute tolerance alone.
    """
    return ImplicitAdjoint(linear_solver=FixedPointLinearSolver(
        solver=FixedPointIteration(rtol=1e-4, atol=0.0, max_steps=200)))


def _check_activation_and_injection(activation, injection) -> AbstractInjection:
    if not isinstance(activation, AbstractActivation):
        raise TypeError(f"activation must be an activation object (Tanh(), Softsign(), ReLU6(), "
                        f"Sigmoid(), or CustomActivation(fn=..., ...)), got {activation!r}")
    if not activation.concave_nondecreasing:
        raise ValueError(f"activation {activation.name} is not concave and nondecreasing on "
                         f"[0, inf); a pcDEQ layer needs one that is (Tanh, Softsign, ReLU6, "
                         f"Sigmoid)")
    if not activation.bounded:
        raise ValueError(f"activation {activation.name} is unbounded on [0, inf), so the pcDEQ "
                         f"fixed point need not exist for large W; use a bounded activation "
                         f"(Tanh, Softsign, ReLU6, Sigmoid)")
    sigma0 = activation.value_at_zero()
    if sigma0 < 0:
        raise ValueError(f"activation {activation.name} has sigma(0) = {sigma0:.4g} < 0; a pcDEQ "
                         f"layer needs sigma(0) >= 0 so that it maps z >= 0 to z >= 0")
    if injection is None:
        injection = SoftplusInjection() if sigma0 == 0 else ReLUInjection()
    if not isinstance(injection, AbstractInjection):
        raise TypeError(f"injection must be an injection object (SoftplusInjection(), "
                        f"ReLUInjection()), got {injection!r}")
    if not injection.nonnegative:
        raise ValueError(f"injection {injection.name} can be negative; a pcDEQ layer needs a "
                         f"nonnegative injection (SoftplusInjection(), ReLUInjection())")
    if sigma0 == 0 and not injection.strictly_positive:
        raise ValueError(
            f"injection {injection.name} can be zero, and activation {activation.name} has "
            f"sigma(0) = 0: then g(0) can be 0 and z = 0 a second fixed point (pcDEQ-1 needs a "
            f"strictly positive injection); use SoftplusInjection(beta=5.0), or Sigmoid() "
            f"(pcDEQ-2)")
    return injection


class _PCDEQBase(AbstractImplicitLayer):
    """Shared by `PCDEQLinear` and `PCDEQConv2d` (internal)."""

    def __init__(self, *, activation, injection, solver, adjoint, throw):
        injection = _check_activation_and_injection(activation, injection)
        super().__init__(solver=default_pcdeq_solver() if solver is None else solver,
                         adjoint=default_pcdeq_adjoint() if adjoint is None else adjoint,
                         throw=throw)
        self.activation = activation
        self.injection_map = injection

    def injection(self, x):
        """$u(x) = \\phi(Ux + c)$ ($\\ge 0$, strictly positive for pcDEQ-1)."""
        return self.injection_map(self.inject.apply(x))

    def pre_activation(self, z, u):
        """$Wz + b + u$."""
        return self.W.apply(z) + u

    def layer(self, z, u):
        """$g_x(z) = \\sigma(Wz + b + u)$."""
        return self.activation(self.pre_activation(z, u))

    def jvp(self, z, u, v):
        """$J v = \\sigma'(Wz + b + u) \\odot (Wv)$, the Jacobian of `layer` at ``z`` times ``v``."""
        return self.activation.derivative(self.pre_activation(z, u)) * self.W.apply(v, bias=False)

    # -- the cone ------------------------------------------------------------------------------
    @property
    def cone(self) -> AbstractCone:
        return self.W.cone

    def weight(self) -> torch.Tensor:
        """The effective $W \\ge 0$ (a matrix, or a convolution kernel)."""
        return self.W.weight()

    def bias(self) -> torch.Tensor:
        """The effective bias $b \\ge 0$ of the recurrent term."""
        return self.W.bias()

    def set_weight(self, W: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Set the effective $W$ (and $b$) exactly.

        Raises
        ------
        ValueError
            If ``W`` or ``bias`` has a negative (or non-finite) entry, naming it, or has the
            wrong shape, or the cone cannot represent an exact zero (`SoftplusCone`, `ExpCone`).
        """
        if not isinstance(W, torch.Tensor):
            raise TypeError(f"W must be a torch.Tensor, got {type(W).__name__}")
        if bias is not None and not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        self.W.set_(W, bias, name="W")

    def scale_weight_(self, factor: float) -> None:
        """Multiply the effective $W$ by ``factor > 0`` (e.g. the x10 stress test)."""
        _check_positive_real("factor", factor)
        with torch.no_grad():
            self.W.set_(factor * self.W.weight(), None, name="W")

    def project_(self) -> None:
        """Project the parameters back into the cone (needed only with `ProjectedCone`)."""
        self.W.project_()

    def min_weight(self) -> float:
        """Smallest effective entry of $W$, its weight-norm gains and $b$ ($\\ge 0$ always)."""
        return self.W.min_effective()

    def check_cone(self) -> None:
        """Raise ``RuntimeError`` if some effective weight left the cone."""
        low = self.min_weight()
        if not low >= 0:
            raise RuntimeError(f"{type(self).__name__}: an effective weight is {low:.3g} < 0 "
                               f"(cone {self.cone.name}); the nonnegativity invariant is broken")

    # -- solving with a certificate -------------------------------------------------------------
    def solve(self, x: torch.Tensor, *, throw: bool | None = None, trace: bool = False,
              certify: bool = False) -> LayerSolution:
        """Find $z^*(x)$ by the layer's solver from $z_0 = 0$; optionally certify it.

        Parameters
        ----------
        x
            Input batch ``(B, *input_shape)``.
        throw
            Raise `deqppl.deq.ConvergenceError` if a sample did not converge (``None``: the
            layer's setting).
        trace
            Record the largest residual after every step (implied by ``certify``).
        certify
            Attach a `deqppl.layers.Certificate` (cone, activation and injection conditions,
            observed contraction rates, $\\rho(J)$ and a rigorous bound on it, convergence).
        """
        result, u = self._solve_with_injection(x, throw=throw, trace=trace or certify)
        if not certify:
            self.last_solution = result
            return result
        from .certificate import certify as make_certificate

        certificate = make_certificate(self, u.detach(), result.solution)
        result = LayerSolution(value=result.value, solution=result.solution,
                               certificate=certificate, extra=result.extra)
        self.last_solution = result
        return result


    def diagnose(self, x: torch.Tensor) -> dict[str, float]:
        """The `Certificate` of the batch ``x`` as floats (`Certificate.metrics`): the cone,
        activation and injection checks as 0/1, the observed contraction rates, $\\rho(J)$ and
        its rigorous bound, the largest slope $\\sigma'$ at $z^*$, and convergence."""
        return self.solve(x, throw=False, certify=True).certificate.metrics()


class PCDEQLinear(_PCDEQBase):
    """Fully connected pcDEQ layer, $z^* = \\sigma(Wz^* + b + \\phi(Ux + c))$, $z \\in \\mathbb R^N$.

    Parameters
    ----------
    in_features
        Input size $d$ (``x`` has shape ``(B, d)``).
    features
        $N$, the size of $z$.
    activation
        `Tanh` (default), `Softsign`, `ReLU6` (pcDEQ-1) or `Sigmoid` (pcDEQ-2), or a
        `CustomActivation`; must be nondecreasing, concave and bounded on $\\mathbb R_+$.
    injection
        $\\phi$; ``None`` picks ``SoftplusInjection(beta=5)`` when $\\sigma(0) = 0$ (pcDEQ-1) and
        ``ReLUInjection()`` otherwise (pcDEQ-2).
    cone
        Parametrisation keeping $W$, its gains and $b$ nonnegative (default `SoftplusCone`).
    weight_norm
        Weight-normalise $W$ and $U$ by rows (as the paper's code; adds one gain per row).
    init_scale
        Initial $W$ has rows summing to about ``init_scale`` (its Perron root).
    solver, adjoint
        DEQ core objects; default `default_pcdeq_solver` and `default_pcdeq_adjoint`.
    throw
        Raise on a failed forward solve (default) or record it in the solution.
    seed
        Seed of the initialisation.
    dtype
        Parameter dtype (default: torch's default).

    Raises
    ------
    TypeError, ValueError
        For an activation that is not concave, nondecreasing and bounded on $\\mathbb R_+$, an
        injection that can be zero with $\\sigma(0) = 0$, or malformed sizes.

    Examples
    --------
    >>> import torch
    >>> from deqppl.layers import PCDEQLinear
    >>> layer = PCDEQLinear(3, 5, seed=0, dtype=torch.float64)
    >>> layer.scale_weight_(40.0)  # any norm of W >= 0 is fine
    >>> z = layer(torch.randn(4, 3, dtype=torch.float64))
    >>> z.shape, bool((z > 0).all()), layer.last_solution.solution.status.name
    (torch.Size([4, 5]), True, 'CONVERGED')
    """

    def __init__(self, in_features: int, features: int, *,
                 activation: AbstractActivation = Tanh(),
                 injection: AbstractInjection | None = None,
                 cone: AbstractCone = SoftplusCone(), weight_norm: bool = True,
                 init_scale: float = 1.0, solver: AbstractSolver | None = None,
                 adjoint: AbstractAdjoint | None = None, throw: bool = True, seed: int = 0,
                 dtype: torch.dtype | None = None):
        _check_positive_int("in_features", in_features)
        _check_positive_int("features", features)
        _check_common(cone, weight_norm, init_scale, seed)
        super().__init__(activation=activation, injection=injection, solver=solver,
                         adjoint=adjoint, throw=throw)
        generator = torch.Generator().manual_seed(seed)
        self.in_features, self.features = in_features, features
        self.inject = DenseWeight(features, in_features, cone=None, weight_norm=weight_norm,
                                  bias=True, init_scale=1.0, generator=generator, dtype=dtype)
        self.W = DenseWeight(features, features, cone=cone, weight_norm=weight_norm, bias=True,
                             init_scale=init_scale, generator=generator, dtype=dtype)

    @property
    def input_shape(self):
        return (self.in_features,)

    def event_shape(self, x):
        return (self.features,)


class PCDEQConv2d(_PCDEQBase):
    """Convolutional pcDEQ layer: $W$ a $k\\times k$ convolution with a nonnegative kernel.

    $z^* = \\sigma(W * z^* + b + \\phi(U * x + c))$ with ``z`` of shape ``(B, C, H, W)`` for an input
    ``(B, C_in, H, W)`` (stride 1, zero 'same' padding, so any image size).

    Parameters
    ----------
    in_channels, channels
        $C_{in}$ and $C$.
    kernel_size
        Odd kernel size of both convolutions (default 3).
    activation, injection, cone, weight_norm, init_scale, solver, adjoint, throw, seed, dtype
        As for `PCDEQLinear` (weight norm per output channel).

    Examples
    --------
    >>> import torch
    >>> from deqppl.layers import PCDEQConv2d, Sigmoid
    >>> layer = PCDEQConv2d(1, 4, activation=Sigmoid(), seed=0, dtype=torch.float64)
    >>> sol = layer.solve(torch.randn(2, 1, 8, 8, dtype=torch.float64), certify=True)
    >>> sol.value.shape, sol.certificate.certified
    (torch.Size([2, 4, 8, 8]), True)
    """

    def __init__(self, in_channels: int, channels: int, *, kernel_size: int = 3,
                 activation: AbstractActivation = Tanh(),
                 injection: AbstractInjection | None = None,
                 cone: AbstractCone = SoftplusCone(), weight_norm: bool = True,
                 init_scale: float = 1.0, solver: AbstractSolver | None = None,
                 adjoint: AbstractAdjoint | None = None, throw: bool = True, seed: int = 0,
                 dtype: torch.dtype | None = None):
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("channels", channels)
        _check_positive_int("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (for 'same' padding), got {kernel_size}")
        _check_common(cone, weight_norm, init_scale, seed)
        super().__init__(activation=activation, injection=injection, solver=solver,
                         adjoint=adjoint, throw=throw)
        generator = torch.Generator().manual_seed(seed)
        self.in_channels, self.channels, self.kernel_size = in_channels, channels, kernel_size
        self.inject = ConvWeight(channels, in_channels, kernel_size, cone=None,
                                 weight_norm=weight_norm, bias=True, init_scale=1.0,
                                 generator=generator, dtype=dtype)
        self.W = ConvWeight(channels, channels, kernel_size, cone=cone, weight_norm=weight_norm,
                            bias=True, init_scale=init_scale, generator=generator, dtype=dtype)

    @property
    def input_shape(self):
        return (self.in_channels, None, None)

    def event_shape(self, x):
        return (self.channels, x.shape[2], x.shape[3])


def _check_common(cone, weight_norm, init_scale, seed):
    if not isinstance(cone, AbstractCone):
        raise TypeError(f"cone must be a cone object (SoftplusCone(), ExpCone(), SquareCone(), "
                        f"ProjectedCone()), got {cone!r}")
    if not isinstance(weight_norm, bool):
        raise TypeError(f"weight_norm must be a bool, got {weight_norm!r}")
    _check_positive_real("init_scale", init_scale)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
