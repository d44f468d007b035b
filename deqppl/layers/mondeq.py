"""Monotone-operator DEQs (Winston & Kolter, 2020, NeurIPS; SPEC 5.1), the pcDEQ baseline.

$z^* = \\mathrm{ReLU}(Wz^* + Ux + b)$ with $W = (1 - m)I - A^\\top A + B - B^\\top$, so that
$I - W \\succeq mI$: the fixed point is the unique zero of the strongly monotone inclusion
$0 \\in (I - W)z - (Ux + b) + \\partial\\iota_{\\ge 0}(z)$ for any $A, B$. It is found by an operator
splitting, forward-backward or Peaceman-Rachford; the resolvent $(I + \\alpha(I - W))^{-1}$ of
Peaceman-Rachford is a dense inverse for linear layers and, with circular padding, one
$C\\times C$ inverse per spatial frequency (FFT) for convolutional ones.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..deq import (AbstractAdjoint, FixedPointIteration, ImplicitAdjoint, Solution,
                   fixed_point)
from ._base import AbstractImplicitLayer, LayerSolution, _check_positive_int, _check_positive_real
from ._weights import ConvWeight, DenseWeight

__all__ = ["AbstractSplitting", "ForwardBackward", "PeacemanRachford", "MonDEQLinear",
           "MonDEQConv2d"]


def _check_tolerances(rtol, atol, max_steps):
    for name, value in (("rtol", rtol), ("atol", atol)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if rtol == 0 and atol == 0:
        raise ValueError("at least one of rtol and atol must be positive")
    _check_positive_int("max_steps", max_steps)


class AbstractSplitting(abc.ABC):
    """An operator splitting for the monDEQ inclusion; never instantiated.

    Concrete splittings are frozen dataclasses with ``rtol``, ``atol``, ``max_steps`` and
    ``alpha``; the layer iterates the splitting's map with the DEQ core.
    """

    rtol: float
    atol: float
    max_steps: int

    @property
    def name(self) -> str:
        return type(self).__name__


@dataclass(frozen=True, kw_only=True)
class ForwardBackward(AbstractSplitting):
    """$z \\leftarrow \\mathrm{ReLU}(z - \\alpha((I - W)z - (Ux + b)))$.

    Converges for $0 < \\alpha < 2m/\\lVert I - W\\rVert_2^2$ with factor
    $\\sqrt{1 - 2\\alpha m + \\alpha^2 L^2}$, $L = \\lVert I - W\\rVert_2$, smallest at $\\alpha = m/L^2$.

    Parameters
    ----------
    alpha
        Step size; ``None`` (default) uses $m/L^2$ with $L$ computed exactly at every forward
        pass (dense spectral norm, or the largest singular value over FFT frequencies).
    rtol, atol, max_steps
        Stopping rule per sample on the residual of the inclusion, $\\lVert T(z) - z\\rVert/\\alpha$
        for the splitting map $T$ (its steps are $\alpha$ times shorter).

    Examples
    --------
    >>> ForwardBackward().alpha is None
    True
    """

    alpha: float | None = None
    rtol: float = 1e-4
    atol: float = 1e-8
    max_steps: int = 500

    def __post_init__(self):
        _check_tolerances(self.rtol, self.atol, self.max_steps)
        if self.alpha is not None:
            _check_positive_real("alpha", self.alpha)


@dataclass(frozen=True, kw_only=True)
class PeacemanRachford(AbstractSplitting):
    """Peaceman-Rachford splitting in the variable $v$, with $z = \\mathrm{ReLU}(v)$:

    $v_{1/2} = 2z - v$, $z_{1/2} = (I + \\alpha(I - W))^{-1}(v_{1/2} + \\alpha(Ux + b))$,
    $v \\leftarrow 2z_{1/2} - v_{1/2}$. Converges for every $\\alpha > 0$ (a contraction, since
    $I - W$ is strongly monotone and Lipschitz).

    Parameters
    ----------
    alpha
        Step size $> 0$ (default 1, Winston & Kolter's choice).
    rtol, atol, max_steps
        Stopping rule per sample on the residual in $v$.

    Examples
    --------
    >>> PeacemanRachford(alpha=0.5).alpha
    0.5
    """

    alpha: float = 1.0
    rtol: float = 1e-4
    atol: float = 1e-8
    max_steps: int = 500

    def __post_init__(self):
        _check_tolerances(self.rtol, self.atol, self.max_steps)
        _check_positive_real("alpha", self.alpha)


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
        solver = FixedPointIteration(rtol=splitting.rtol, atol=splitting.atol,
                                     max_steps=splitting.max_steps)
        if adjoint is None:
            # the transposed system by the same splitting: plain iteration of the splitting map's
            # transposed Jacobian, which is a contraction wherever the forward map is
            adjoint = ImplicitAdjoint(solver=FixedPointIteration(
                rtol=splitting.rtol, atol=0.0, max_steps=splitting.max_steps))
        super().__init__(solver=solver, adjoint=adjoint, throw=throw)
        self.margin = float(margin)
        self.splitting = splitting
        self._last_extra: dict[str, float] = {}

    # -- the operator ---------------------------------------------------------------------------
    def apply_w(self, z):
        """$Wz = (1 - m)z - A^\\top A z + Bz - B^\\top z$."""
        return ((1.0 - self.margin) * z - self.A.apply_transpose(self.A.apply(z, bias=False))
                + self.B.apply(z, bias=False) - self.B.apply_transpose(z))

    def injection(self, x):
        """$Ux + b$."""
        return self.inject.apply(x)

    def layer(self, z, u):
        """$\\mathrm{ReLU}(Wz + Ux + b)$, the DEQ map whose fixed point the splitting finds."""
        return torch.relu(self.apply_w(z) + u)

    @abc.abstractmethod
    def _operators(self, z_like: torch.Tensor) -> tuple[float, float, object]:
        """``(L, measured margin, resolvent(alpha) factory)`` for the current weights."""

    def scale_weight_(self, factor: float) -> None:
        """Multiply $A$ and $B$ by ``factor`` (the x10 stress test); $W$ stays monotone."""
        _check_positive_real("factor", factor)
        with torch.no_grad():
            for op in (self.A, self.B):
                op.set_(factor * op.weight(), None, name="A/B")

    def _solve(self, u, z0, *, throw, trace):
        lipschitz, measured, resolvent = self._operators(z0)
        splitting = self.splitting
        if isinstance(splitting, ForwardBackward):
            alpha = splitting.alpha if splitting.alpha is not None else self.margin / lipschitz ** 2

            def step(z):
                return torch.relu(z - alpha * (z - self.apply_w(z) - u))

            # The step moves z by alpha times the residual of the inclusion, so the stopping
            # rule is scaled by alpha to judge the inclusion's residual (equal accuracy with
            # Peaceman-Rachford and the pcDEQ), not the step length.
            solver = FixedPointIteration(rtol=splitting.rtol * alpha,
                                         atol=splitting.atol * alpha,
                                         max_steps=splitting.max_steps)
            solution = fixed_point(step, z0, solver=solver, adjoint=self.adjoint,
                                   throw=throw, trace=trace)
        else:
            alpha = splitting.alpha
            solve_r = resolvent(alpha)

            def step(v):
                z = torch.relu(v)
                v_half = 2 * z - v
                z_half = solve_r(v_half + alpha * u)
                return 2 * z_half - v_half

            solution = fixed_point(step, z0, solver=self.solver, adjoint=self.adjoint,
                                   throw=throw, trace=trace)
        self._last_extra = {"margin": self.margin, "measured_margin": measured,
                            "lipschitz": lipschitz, "alpha": float(alpha)}
        return solution

    def _extra(self):
        return dict(self._last_extra)

    def _solve_with_injection(self, x, *, throw, trace):
        result, u = super()._solve_with_injection(x, throw=throw, trace=trace)
        if isinstance(self.splitting, PeacemanRachford):
            # the splitting's variable is v; the layer's output is z = ReLU(v)
            result = LayerSolution(value=torch.relu(result.value), solution=result.solution,
                                   extra=result.extra)
        return result, u


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
