"""Unconstrained DEQs of the same shape as the pcDEQ layers: the baseline without guarantees.

$z^* = \\sigma(Wz^* + b + Ux + c)$ with $W$ of any sign (weight-normalised like the pcDEQ, so the
parameter counts match), solved by Anderson acceleration (Bai, Kolter & Koltun, 2019, NeurIPS).
Nothing guarantees a fixed point exists, is unique, or is found.
"""

from __future__ import annotations

import torch

from ..deq import AbstractAdjoint, AbstractSolver, Anderson, ImplicitAdjoint
from ._base import AbstractImplicitLayer, _check_positive_int, _check_positive_real
from ._weights import ConvWeight, DenseWeight
from .activations import AbstractActivation, Tanh

__all__ = ["DEQLinear", "DEQConv2d", "default_deq_solver", "default_deq_adjoint"]


def default_deq_solver() -> Anderson:
    """Anderson (memory 10, relative ridge), relative tolerance $10^{-4}$, at most 200 steps."""
    return Anderson(rtol=1e-4, max_steps=200)


def default_deq_adjoint() -> ImplicitAdjoint:
    """Implicit adjoint solved by Anderson with the forward tolerance (purely relative)."""
    return ImplicitAdjoint(solver=Anderson(rtol=1e-4, atol=0.0, max_steps=200))


class _DEQBase(AbstractImplicitLayer):
    def __init__(self, *, activation, solver, adjoint, throw):
        if not isinstance(activation, AbstractActivation):
            raise TypeError(f"activation must be an activation object such as Tanh(), got "
                            f"{activation!r}")
        super().__init__(solver=default_deq_solver() if solver is None else solver,
                         adjoint=default_deq_adjoint() if adjoint is None else adjoint,
                         throw=throw)
        self.activation = activation

    def injection(self, x):
        """$Ux + c$."""
        return self.inject.apply(x)

    def layer(self, z, u):
        """$\\sigma(Wz + b + u)$."""
        return self.activation(self.W.apply(z) + u)

    def weight(self) -> torch.Tensor:
        return self.W.weight()

    def scale_weight_(self, factor: float) -> None:
        """Multiply the effective $W$ by ``factor > 0`` (the x10 stress test)."""
        _check_positive_real("factor", factor)
        with torch.no_grad():
            self.W.set_(factor * self.W.weight(), None, name="W")


class DEQLinear(_DEQBase):
    """Fully connected unconstrained DEQ with the shape and parameter count of `PCDEQLinear`.

    Parameters
    ----------
    in_features, features
        $d$ and $N$.
    activation
        Any activation object (default `Tanh`).
    weight_norm
        Weight-normalise $W$ and $U$ by rows (default, as the pcDEQ).
    init_scale
        Scale of the initial $W$ relative to torch's default (Kaiming-uniform) range.
    solver, adjoint
        Default `default_deq_solver`, `default_deq_adjoint`.
    throw, seed, dtype
        As for `PCDEQLinear`.

    Examples
    --------
    >>> import torch
    >>> from deqppl.layers import DEQLinear
    >>> layer = DEQLinear(3, 5, seed=0, dtype=torch.float64)
    >>> layer(torch.randn(2, 3, dtype=torch.float64)).shape
    torch.Size([2, 5])
    """

    def __init__(self, in_features: int, features: int, *,
                 activation: AbstractActivation = Tanh(), weight_norm: bool = True,
                 init_scale: float = 1.0, solver: AbstractSolver | None = None,
                 adjoint: AbstractAdjoint | None = None, throw: bool = True, seed: int = 0,
                 dtype: torch.dtype | None = None):
        _check_positive_int("in_features", in_features)
        _check_positive_int("features", features)
        _check_positive_real("init_scale", init_scale)
        super().__init__(activation=activation, solver=solver, adjoint=adjoint, throw=throw)
        generator = torch.Generator().manual_seed(seed)
        self.in_features, self.features = in_features, features
        common = dict(cone=None, weight_norm=weight_norm, bias=True, generator=generator,
                      dtype=dtype)
        self.inject = DenseWeight(features, in_features, init_scale=1.0, **common)
        self.W = DenseWeight(features, features, init_scale=init_scale, **common)

    @property
    def input_shape(self):
        return (self.in_features,)

    def event_shape(self, x):
        return (self.features,)


class DEQConv2d(_DEQBase):
    """Convolutional unconstrained DEQ with the shape and parameter count of `PCDEQConv2d`.

    Examples
    --------
    >>> import torch
    >>> from deqppl.layers import DEQConv2d
    >>> DEQConv2d(1, 2, dtype=torch.float64)(torch.randn(1, 1, 5, 5, dtype=torch.float64)).shape
    torch.Size([1, 2, 5, 5])
    """

    def __init__(self, in_channels: int, channels: int, *, kernel_size: int = 3,
                 activation: AbstractActivation = Tanh(), weight_norm: bool = True,
                 init_scale: float = 1.0, solver: AbstractSolver | None = None,
                 adjoint: AbstractAdjoint | None = None, throw: bool = True, seed: int = 0,
                 dtype: torch.dtype | None = None):
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("channels", channels)
        _check_positive_int("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (for 'same' padding), got {kernel_size}")
        _check_positive_real("init_scale", init_scale)
        super().__init__(activation=activation, solver=solver, adjoint=adjoint, throw=throw)
        generator = torch.Generator().manual_seed(seed)
        self.in_channels, self.channels, self.kernel_size = in_channels, channels, kernel_size
        common = dict(cone=None, weight_norm=weight_norm, bias=True, generator=generator,
                      dtype=dtype)
        self.inject = ConvWeight(channels, in_channels, kernel_size, init_scale=1.0, **common)
        self.W = ConvWeight(channels, channels, kernel_size, init_scale=init_scale, **common)

    @property
    def input_shape(self):
        return (self.in_channels, None, None)

    def event_shape(self, x):
        return (self.channels, x.shape[2], x.shape[3])
