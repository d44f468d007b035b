"""Monotone-operator DEQs (Winston & Kolter, 2020, NeurIPS; SPEC 5.1), the pcDEQ baseline.

$z^* = \\mathrm{ReLU}(Wz^* + Ux + b)$ with $W = (1 - m)I - A^\\top A + B - B^\\top$, so that
$I - W \\succeq mI$: the fixed point is the unique zero of the strongly monotone inclusion
$0 \\in (I - W)z - (Ux + b) + \\partial\\iota_{\\ge 0}(z)$ for any $A, B$. It is found by an operator
splitting, forward-backward or Peaceman-Rachford, written as solvers of the DEQ core's public
protocol (``init``/``step``, one driver): the driver's stopping rule is the layer's own residual
$\\lVert f(z) - z\\rVert$, the step uses the structure of $W$. The resolvent $(I + \\alpha(I - W))^{-1}$ of
Peaceman-Rachford is a dense inverse for linear layers and, with circular padding, one
$C\\times C$ inverse per spatial frequency (FFT) for convolutional ones.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..deq import AbstractAdjoint, AbstractSolver, ImplicitAdjoint, fixed_point
from ._base import AbstractImplicitLayer, _check_positive_int, _check_positive_real
from ._weights import ConvWeight, DenseWeight

__all__ = ["AbstractSplitting", "ForwardBackward", "PeacemanRachford", "MonotoneOperator",
           "MonDEQLinear", "MonDEQConv2d"]


@dataclass(frozen=True, eq=False)
class MonotoneOperator:
    """The linear part of one batch's monDEQ inclusion, on flattened ``(B, n)`` tensors.

    $0 \\in (I - W)z - q + N_{\\ge 0}(z)$ with $q = Ux + b$. Built by the monDEQ layers for every
    forward solve (without autograd: a solver never differentiates) and bound to a splitting
    solver with its ``bind``.

    Attributes
    ----------
    apply
        ``z (B, n) -> (I - W) z``.
    q
        ``(B, n)``.
    resolvent
        ``alpha -> (r (B, n) -> (I + alpha (I - W))^{-1} r)``; factorises once per ``alpha``.
    lipschitz
        $L = \\lVert I - W\\rVert_2$ (exact: dense norm, or the largest over FFT frequencies).
    margin
        The measured $\\lambda_{\\min}$ of the symmetric part of $I - W$ ($\\ge m$).
    """

    apply: Callable[[torch.Tensor], torch.Tensor]
    q: torch.Tensor
    resolvent: Callable[[float], Callable[[torch.Tensor], torch.Tensor]]
    lipschitz: float
    margin: float


class AbstractSplitting(AbstractSolver):
    """An operator-splitting solver of the public protocol for monDEQ fixed points.

    The problem the driver sees is the DEQ map $f(z) = \\mathrm{ReLU}(Wz + q)$, so the stopping
    rule judges the layer's own residual $\\lVert f(z) - z\\rVert$, like every other solver; the
    step uses the structure of $W$ through a bound `MonotoneOperator` (``bind``). Concrete
    splittings are frozen dataclasses with ``alpha``, ``rtol``, ``atol``, ``max_steps``.
    """

    operator: MonotoneOperator | None

    def bind(self, operator: MonotoneOperator) -> AbstractSplitting:
        """This splitting with ``operator`` attached (the layers do this on every forward)."""
        if not isinstance(operator, MonotoneOperator):
            raise TypeError(f"operator must be a MonotoneOperator, got {operator!r}")
        return dataclasses.replace(self, operator=operator)

    def _operator(self) -> MonotoneOperator:
        if self.operator is None:
            raise ValueError(f"{self.name} needs the structure of W: use it through a monDEQ "
                             f"layer, or bind(MonotoneOperator(...)) first")
        return self.operator

    def _hint(self) -> str:
        return ("monDEQ splittings converge for every monotone W but slowly when the margin m "
                "is small against ||I - W||: try a larger max_steps, PeacemanRachford() (faster "
                "than ForwardBackward), or another alpha.")


@dataclass(frozen=True, kw_only=True)
class ForwardBackward(AbstractSplitting):
    """Forward-backward splitting, $z \\leftarrow \\mathrm{ReLU}(z - \\alpha((I - W)z - q))$.

    Converges for $0 < \\alpha < 2m/\\lVert I - W\\rVert_2^2$ with factor
    $\\sqrt{1 - 2\\alpha m + \\alpha^2 L^2}$, $L = \\lVert I - W\\rVert_2$, smallest at $\\alpha = m/L^2$.

    Parameters
    ----------
    alpha
        Step size; ``None`` (default) uses $\\mu/L^2$ with the bound operator's $L$ and its
        measured margin $\\mu \\ge m$.
    rtol, atol, max_steps
        The driver's per-sample stopping rule on $\\lVert f(z) - z\\rVert$.
    operator
        Bound by the layer; leave ``None``.

    Examples
    --------
    >>> ForwardBackward().alpha is None
    True
    """

    alpha: float | None = None
    rtol: float = 1e-4
    atol: float = 1e-8
    max_steps: int = 500
    operator: MonotoneOperator | None = field(default=None, repr=False)

    def __post_init__(self):
        self._check_common()
        if self.alpha is not None:
            _check_positive_real("alpha", self.alpha)

    def step_size(self) -> float:
        op = self._operator()
        return self.alpha if self.alpha is not None else op.margin / op.lipschitz ** 2

    def init(self, problem, z0, fz0):
        return self.step_size()

    def step(self, problem, alpha, iterate):
        op = self._operator()
        z = iterate.z
        return torch.relu(z - alpha * (op.apply(z) - op.q)), None, alpha


@dataclass(frozen=True, kw_only=True)
class PeacemanRachford(AbstractSplitting):
    """Peaceman-Rachford splitting in the variable $v$, with $z = \\mathrm{ReLU}(v)$:

    $v_{1/2} = 2z - v$, $z_{1/2} = (I + \\alpha(I - W))^{-1}(v_{1/2} + \\alpha q)$,
    $v \\leftarrow 2z_{1/2} - v_{1/2}$. Converges for every $\\alpha > 0$ (a contraction, since
    $I - W$ is strongly monotone and Lipschitz). The resolvent is factorised once per solve.

    Parameters
    ----------
    alpha
        Step size $> 0$ (default 1, Winston & Kolter's choice).
    rtol, atol, max_steps
        The driver's per-sample stopping rule on $\\lVert f(z) - z\\rVert$.
    operator
        Bound by the layer; leave ``None``.

    Examples
    --------
    >>> PeacemanRachford(alpha=0.5).alpha
    0.5
    """

    alpha: float = 1.0
    rtol: float = 1e-4
    atol: float = 1e-8
    max_steps: int = 500
    operator: MonotoneOperator | None = field(default=None, repr=False)

    def __post_init__(self):
        self._check_common()
        _check_positive_real("alpha", self.alpha)

    def step_size(self) -> float:
        return self.alpha

    def init(self, problem, z0, fz0):
        return z0.clone(), self._operator().resolvent(self.alpha)

    def step(self, problem, state, iterate):
        v, solve_r = state
        op = self._operator()
        z = torch.relu(v)
        v_half = 2 * z - v
        z_half = solve_r(v_half + self.alpha * op.q)
        v = 2 * z_half - v_half
        return torch.relu(v), None, (v, solve_r)


class _MonDEQBase(AbstractImplicitLayer):
    """Shared by `MonDEQLinear` and `MonDEQConv2d` (internal)."""

    def __init__(self, *, margin, splitting, adjoint, throw):
        _check_positive_real("margin", margin)
        if margin >= 1:
            raise ValueError(f"margin must lie in (0, 1), got {margin!r}")
        splitting = PeacemanRachford() if splitting is None else splitting
        if not isinstance(splitting, AbstractSplitting):
            raise TypeError(f"splitting must be ForwardBackward() or PeacemanRachford(), got "
                            f"{splitting!r}")
        # The backward pass: J = diag(relu') W need not be a contraction (rho(J) can exceed 1
        # for a monotone W), so the adjoint owns a Krylov or direct linear solver, not plain
        # iteration: ImplicitAdjoint() picks DirectLinearSolver for n <= 32 and GMRES above,
        # at the forward's tolerance.
        super().__init__(solver=splitting, adjoint=ImplicitAdjoint() if adjoint is None
                         else adjoint, throw=throw)
        self.margin = float(margin)
        self.splitting = splitting
        self._last_extra: dict[str, float] = {}

    # -- the operator ---------------------------------------------------------------------------
    def apply_w(self, z):
        """$Wz = (1 - m)z - A^\\top A z + Bz - B^\\top z$."""
        return ((1.0 - self.margin) * z - self.A.apply_transpose(self.A.apply(z, bias=False))
                + self.B.apply(z, bias=False) - self.B.apply_transpose(z))

    def injection(self, x):
        """$q = Ux + b$."""
        return self.inject.apply(x)

    def layer(self, z, u):
        """$\\mathrm{ReLU}(Wz + Ux + b)$, the DEQ map whose fixed point the splitting finds."""
        return torch.relu(self.apply_w(z) + u)

    @abc.abstractmethod
    def _operators(self, z_like: torch.Tensor) -> tuple[float, float, object]:
        """``(L, measured margin, resolvent(alpha) factory on (B, *event))`` for the weights."""

    def monotone_operator(self, u: torch.Tensor) -> MonotoneOperator:
        """The `MonotoneOperator` of the inclusion for the injection ``u`` ``(B, *event)``,
        on flattened tensors, computed without autograd."""
        shape = u.shape
        with torch.no_grad():
            lipschitz, measured, resolvent = self._operators(u)
            q = u.detach().reshape(shape[0], -1)

            def apply(z):
                zz = z.reshape(shape)
                return (zz - self.apply_w(zz)).reshape(shape[0], -1)

            def flat_resolvent(alpha):
                solve_r = resolvent(alpha)
                return lambda r: solve_r(r.reshape(shape)).reshape(shape[0], -1)

        return MonotoneOperator(apply=apply, q=q, resolvent=flat_resolvent,
                                lipschitz=lipschitz, margin=measured)

    def scale_weight_(self, factor: float) -> None:
        """Multiply $A$ and $B$ by ``factor`` (the x10 stress test); $W$ stays monotone."""
        _check_positive_real("factor", factor)
        with torch.no_grad():
            for op in (self.A, self.B):
                op.set_(factor * op.weight(), None, name="A/B")

    def _solve(self, u, z0, *, throw, trace):
        operator = self.monotone_operator(u)
        solver = self.splitting.bind(operator)
        solution = fixed_point(lambda z: self.layer(z, u), z0, solver=solver,
                               adjoint=self.adjoint, throw=throw, trace=trace)
        self._last_extra = {"margin": self.margin, "measured_margin": operator.margin,
                            "lipschitz": operator.lipschitz, "alpha": float(solver.step_size())}
        return solution

    def _extra(self):
        return dict(self._last_extra)

    def diagnose(self, x: torch.Tensor) -> dict[str, float]:
        """`AbstractImplicitLayer.diagnose` plus what makes the fixed point unique:
        ``monotonicity_margin`` (the margin $m$ the parametrisation enforces),
        ``measured_margin`` ($\\lambda_{\\min}$ of the symmetric part of $I - W$, $\\ge m$) and
        ``lipschitz`` ($L = \\lVert I - W\\rVert_2$, which sets the splittings' speed)."""
        out = super().diagnose(x)
        extra = self.last_solution.extra
        out.update(monotonicity_margin=self.margin, measured_margin=extra["measured_margin"],
                   lipschitz=extra["lipschitz"])
        return out


class MonDEQLinear(_MonDEQBase):
    """Fully connected monotone-operator DEQ, $z \\in \\mathbb R^N$ (Winston & Kolter, 2020).

    Parameters
    ----------
    in_features, features
        Input size $d$ and $N$.
    margin
        Monotonicity margin $m \\in (0, 1)$; $I - W \\succeq mI$ (default 0.05).
    splitting
        `PeacemanRachford` (default) or `ForwardBackward`.
    adjoint
        Default: the implicit adjoint solved by plain iteration of the splitting map.
    throw, seed, dtype
        As for `PCDEQLinear`.

    Examples
    --------
    >>> import torch
    >>> from deqppl.layers import MonDEQLinear
    >>> layer = MonDEQLinear(3, 6, seed=0, dtype=torch.float64)
    >>> sol = layer.solve(torch.randn(4, 3, dtype=torch.float64))
    >>> sol.solution.status.name, sol.extra["measured_margin"] >= layer.margin - 1e-12
    ('CONVERGED', True)
    """

    def __init__(self, in_features: int, features: int, *, margin: float = 0.05,
                 splitting: AbstractSplitting | None = None,
                 adjoint: AbstractAdjoint | None = None, throw: bool = True, seed: int = 0,
                 dtype: torch.dtype | None = None):
        _check_positive_int("in_features", in_features)
        _check_positive_int("features", features)
        super().__init__(margin=margin, splitting=splitting, adjoint=adjoint, throw=throw)
        generator = torch.Generator().manual_seed(seed)
        self.in_features, self.features = in_features, features
        common = dict(cone=None, weight_norm=False, init_scale=1.0, generator=generator,
                      dtype=dtype)
        self.inject = DenseWeight(features, in_features, bias=True, **common)
        self.A = DenseWeight(features, features, bias=False, **common)
        self.B = DenseWeight(features, features, bias=False, **common)

    @property
    def input_shape(self):
        return (self.in_features,)

    def event_shape(self, x):
        return (self.features,)

    def weight(self) -> torch.Tensor:
        """The dense $W$ ``(N, N)``."""
        eye = torch.eye(self.features, dtype=self.A.raw.dtype, device=self.A.raw.device)
        return self.apply_w(eye).T

    def _operators(self, z_like):
        w = self.weight()
        eye = torch.eye(self.features, dtype=w.dtype, device=w.device)
        i_minus_w = eye - w
        with torch.no_grad():
            lipschitz = float(torch.linalg.matrix_norm(i_minus_w, ord=2))
            measured = float(torch.linalg.eigvalsh(0.5 * (i_minus_w + i_minus_w.T)).min())

        def resolvent(alpha):
            inverse = torch.linalg.inv(eye + alpha * i_minus_w)
            return lambda r: r @ inverse.T

        return lipschitz, measured, resolvent


class MonDEQConv2d(_MonDEQBase):
    """Convolutional monotone-operator DEQ on ``(B, C, H, W)`` with circular padding.

    $A, B$ are $k\\times k$ convolutions $C \\to C$; the injection is a $k\\times k$ convolution
    $C_{in} \\to C$ with bias. Circular padding makes every operator diagonal in the 2-D Fourier
    basis, so $L = \\lVert I - W\\rVert_2$, the measured margin and the Peaceman-Rachford
    resolvent are computed exactly frequency by frequency.

    Parameters
    ----------
    in_channels, channels, kernel_size
        Sizes ($k$ odd, default 3).
    margin, splitting, adjoint, throw, seed, dtype
        As for `MonDEQLinear`.

    Examples
    --------
    >>> import torch
    >>> from deqppl.layers import MonDEQConv2d
    >>> layer = MonDEQConv2d(1, 3, seed=0, dtype=torch.float64)
    >>> layer.solve(torch.randn(2, 1, 6, 6, dtype=torch.float64)).value.shape
    torch.Size([2, 3, 6, 6])
    """

    def __init__(self, in_channels: int, channels: int, *, kernel_size: int = 3,
                 margin: float = 0.05, splitting: AbstractSplitting | None = None,
                 adjoint: AbstractAdjoint | None = None, throw: bool = True, seed: int = 0,
                 dtype: torch.dtype | None = None):
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("channels", channels)
        _check_positive_int("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (for 'same' padding), got {kernel_size}")
        super().__init__(margin=margin, splitting=splitting, adjoint=adjoint, throw=throw)
        generator = torch.Generator().manual_seed(seed)
        self.in_channels, self.channels, self.kernel_size = in_channels, channels, kernel_size
        common = dict(cone=None, weight_norm=False, init_scale=1.0, generator=generator,
                      dtype=dtype, circular=True)
        self.inject = ConvWeight(channels, in_channels, kernel_size, bias=True, **common)
        self.A = ConvWeight(channels, channels, kernel_size, bias=False, **common)
        self.B = ConvWeight(channels, channels, kernel_size, bias=False, **common)

    @property
    def input_shape(self):
        return (self.in_channels, None, None)

    def event_shape(self, x):
        return (self.channels, x.shape[2], x.shape[3])

    def check_input(self, x):
        x = super().check_input(x)
        if x.shape[2] < self.kernel_size or x.shape[3] < self.kernel_size:
            raise ValueError(f"images must be at least {self.kernel_size}x{self.kernel_size} for "
                             f"a circular {self.kernel_size}x{self.kernel_size} convolution, got "
                             f"{tuple(x.shape[2:])}")
        return x

    def fourier_weight(self, height: int, width: int) -> torch.Tensor:
        """$\\hat W(\\omega)$, shape ``(H, W, C, C)`` complex: $\\widehat{Wz}(\\omega) = \\hat W(\\omega)
        \\hat z(\\omega)$ for the 2-D DFT over the spatial dimensions."""
        c = self.channels
        dtype = self.A.raw.dtype
        delta = torch.zeros(c, c, height, width, dtype=dtype, device=self.A.raw.device)
        delta[torch.arange(c), torch.arange(c), 0, 0] = 1.0
        # the impulse responses (one per input channel) are the circular-convolution kernels
        response = self.apply_w(delta)  # (C_in, C_out, H, W)
        return torch.fft.fft2(response).permute(2, 3, 1, 0)  # (H, W, C_out, C_in)

    def _operators(self, z_like):
        height, width = z_like.shape[2], z_like.shape[3]
        w_hat = self.fourier_weight(height, width)
        eye = torch.eye(self.channels, dtype=w_hat.dtype, device=w_hat.device)
        i_minus_w = eye - w_hat
        with torch.no_grad():
            lipschitz = float(torch.linalg.matrix_norm(i_minus_w, ord=2).max())
            herm = 0.5 * (i_minus_w + i_minus_w.conj().transpose(-1, -2))
            measured = float(torch.linalg.eigvalsh(herm).min())

        def resolvent(alpha):
            inverse = torch.linalg.inv(eye + alpha * i_minus_w)  # (H, W, C, C)

            def apply(r):
                r_hat = torch.fft.fft2(r)  # (B, C, H, W)
                out = torch.einsum("hwoc,bchw->bohw", inverse, r_hat)
                return torch.fft.ifft2(out).real

            return apply

        return lipschitz, measured, resolvent
