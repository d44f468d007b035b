"""The paper's classifiers (Gabor, Piotrowski & Cavalcante, 2024, ICML; SPEC 5), for any image
size and channel count, with any implicit layer family in place of the pcDEQ.

Three architectures, each ``ImageInput -> implicit layer(s) -> BatchNorm -> head``:

- `linear_classifier`: flatten, one fully connected implicit layer of width 80, BN, linear.
- `single_conv_classifier`: one convolutional implicit layer (82 channels for MNIST, 125 for
  SVHN/CIFAR-10), BN, 8x8 average pooling, linear.
- `multi_conv_classifier`: convolutional implicit layers of widths ``channels`` (e.g. 12, 24,
  48), each followed by BN, with 2x2 average pooling between them and global average pooling
  at the end, then linear.

With the pcDEQ family these reproduce the paper's parameter counts exactly: MNIST (1x28x28)
70 410 / 69 136 / 41 278 (linear / single-conv / multi-conv 12, 24, 48) and CIFAR-10 (3x32x32)
164 760 / 130 950 / 661 470 (single-conv 125 / multi-conv 20, 50, 80 / multi-conv 100, 120, 140).
The pooling sizes are *(derived)*: they are the ones that give these counts.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..deq import AbstractAdjoint, AbstractSolver
from ._base import _check_positive_int, _check_positive_real
from ._weights import ConvWeight, DenseWeight
from .activations import AbstractActivation, AbstractInjection, ReLU, Tanh
from .cones import AbstractCone, SoftplusCone
from .mondeq import AbstractSplitting, MonDEQConv2d, MonDEQLinear
from .pcdeq import PCDEQConv2d, PCDEQLinear
from .unconstrained import DEQConv2d, DEQLinear

__all__ = [
    "ImageInput", "ExplicitLinear", "ExplicitConv2d",
    "AbstractLayerFamily", "PCDEQFamily", "MonDEQFamily", "DEQFamily", "ExplicitFamily",
    "linear_classifier", "single_conv_classifier", "multi_conv_classifier", "num_parameters",
]


def num_parameters(model: nn.Module) -> int:
    """Number of trainable scalars of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class ImageInput(nn.Module):
    """Checks that a batch is ``(B, channels, height, width)`` and passes it on unchanged.

    `deqppl.layers.fit_classifier` calls `check` on the whole training set before training.

    Examples
    --------
    >>> import torch
    >>> ImageInput(1, (8, 8))(torch.zeros(2, 1, 7, 8))
    Traceback (most recent call last):
    ...
    ValueError: images must have shape (B, 1, 8, 8) (channels, height, width), got (2, 1, 7, 8)
    """

    def __init__(self, channels: int, image_size: tuple[int, int]):
        super().__init__()
        self.channels = channels
        self.image_size = tuple(image_size)

    def check(self, x: object) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(x).__name__}")
        expected = (self.channels, *self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"images must have shape (B, {', '.join(map(str, expected))}) "
                             f"(channels, height, width), got {tuple(x.shape)}")

    def forward(self, x):
        self.check(x)
        return x


class _Explicit(nn.Module):
    """$z_{k+1} = \\sigma(Wz_k + b + Ux + c)$ for ``depth`` steps from $z_0 = 0$: a weight-tied
    explicit network with exactly the parameters of the implicit layer it stands in for."""

    def __init__(self, *, activation, depth):
        super().__init__()
        if not isinstance(activation, AbstractActivation):
            raise TypeError(f"activation must be an activation object, got {activation!r}")
        _check_positive_int("depth", depth)
        self.activation, self.depth = activation, depth

    def scale_weight_(self, factor: float) -> None:
        """Multiply the effective $W$ by ``factor > 0`` (the x10 stress test)."""
        _check_positive_real("factor", factor)
        with torch.no_grad():
            self.W.set_(factor * self.W.weight(), None, name="W")

    def forward(self, x):
        u = self.inject.apply(x)
        z = self.activation(u + self.W.bias().reshape(1, -1, *([1] * (u.ndim - 2))))
        for _ in range(self.depth - 1):
            z = self.activation(self.W.apply(z) + u)
        return z


class ExplicitLinear(_Explicit):
    """Explicit counterpart of `DEQLinear` (same parameters, ``depth`` applications).

    Examples
    --------
    >>> import torch
    >>> ExplicitLinear(3, 4, dtype=torch.float64)(torch.zeros(2, 3, dtype=torch.float64)).shape
    torch.Size([2, 4])
    """

    def __init__(self, in_features: int, features: int, *, activation: AbstractActivation = ReLU(),
                 depth: int = 2, seed: int = 0, dtype: torch.dtype | None = None):
        super().__init__(activation=activation, depth=depth)
        generator = torch.Generator().manual_seed(seed)
        common = dict(cone=None, weight_norm=True, bias=True, init_scale=1.0,
                      generator=generator, dtype=dtype)
        self.inject = DenseWeight(features, in_features, **common)
        self.W = DenseWeight(features, features, **common)


class ExplicitConv2d(_Explicit):
    """Explicit counterpart of `DEQConv2d` (same parameters, ``depth`` applications)."""

    def __init__(self, in_channels: int, channels: int, *, kernel_size: int = 3,
                 activation: AbstractActivation = ReLU(), depth: int = 2, seed: int = 0,
                 dtype: torch.dtype | None = None):
        super().__init__(activation=activation, depth=depth)
        generator = torch.Generator().manual_seed(seed)
        common = dict(cone=None, weight_norm=True, bias=True, init_scale=1.0,
                      generator=generator, dtype=dtype)
        self.inject = ConvWeight(channels, in_channels, kernel_size, **common)
        self.W = ConvWeight(channels, channels, kernel_size, **common)


class AbstractLayerFamily(abc.ABC):
    """Builds the implicit (or explicit) layer of an architecture; never instantiated."""

    name: str

    @abc.abstractmethod
    def linear(self, in_features: int, features: int, *, seed: int,
               dtype: torch.dtype | None) -> nn.Module:
        """A fully connected layer ``(B, in_features) -> (B, features)``."""

    @abc.abstractmethod
    def conv(self, in_channels: int, channels: int, *, seed: int,
             dtype: torch.dtype | None) -> nn.Module:
        """A convolutional layer ``(B, in_channels, H, W) -> (B, channels, H, W)``."""


@dataclass(frozen=True, kw_only=True)
class PCDEQFamily(AbstractLayerFamily):
    """pcDEQ layers (`PCDEQLinear`, `PCDEQConv2d`) with these settings.

    Examples
    --------
    >>> from deqppl.layers import Sigmoid
    >>> PCDEQFamily(activation=Sigmoid()).name
    'pcdeq-2 (Sigmoid)'
    """

    activation: AbstractActivation = Tanh()
    injection: AbstractInjection | None = None
    cone: AbstractCone = SoftplusCone()
    init_scale: float = 1.0
    solver: AbstractSolver | None = None
    adjoint: AbstractAdjoint | None = None
    throw: bool = True

    def __post_init__(self):
        PCDEQLinear(1, 1, activation=self.activation, injection=self.injection, cone=self.cone,
                    init_scale=self.init_scale, solver=self.solver, adjoint=self.adjoint,
                    throw=self.throw)  # validates every setting now, before any model is built

    @property
    def name(self) -> str:
        kind = "pcdeq-1" if self.activation.value_at_zero() == 0 else "pcdeq-2"
        return f"{kind} ({self.activation.name})"

    def _kwargs(self):
        return dict(activation=self.activation, injection=self.injection, cone=self.cone,
                    init_scale=self.init_scale, solver=self.solver, adjoint=self.adjoint,
                    throw=self.throw)

    def linear(self, in_features, features, *, seed, dtype):
        return PCDEQLinear(in_features, features, seed=seed, dtype=dtype, **self._kwargs())

    def conv(self, in_channels, channels, *, seed, dtype):
        return PCDEQConv2d(in_channels, channels, seed=seed, dtype=dtype, **self._kwargs())


@dataclass(frozen=True, kw_only=True)
class MonDEQFamily(AbstractLayerFamily):
    """Monotone-operator DEQ layers (`MonDEQLinear`, `MonDEQConv2d`)."""

    margin: float = 0.05
    splitting: AbstractSplitting | None = None
    adjoint: AbstractAdjoint | None = None
    throw: bool = True

    def __post_init__(self):
        MonDEQLinear(1, 1, margin=self.margin, splitting=self.splitting, adjoint=self.adjoint,
                     throw=self.throw)

    @property
    def name(self) -> str:
        splitting = "PeacemanRachford" if self.splitting is None else self.splitting.name
        return f"mondeq ({splitting})"

    def linear(self, in_features, features, *, seed, dtype):
        return MonDEQLinear(in_features, features, margin=self.margin, splitting=self.splitting,
                            adjoint=self.adjoint, throw=self.throw, seed=seed, dtype=dtype)

    def conv(self, in_channels, channels, *, seed, dtype):
        return MonDEQConv2d(in_channels, channels, margin=self.margin, splitting=self.splitting,
                            adjoint=self.adjoint, throw=self.throw, seed=seed, dtype=dtype)


@dataclass(frozen=True, kw_only=True)
class DEQFamily(AbstractLayerFamily):
    """Unconstrained DEQ layers (`DEQLinear`, `DEQConv2d`), Anderson by default."""

    activation: AbstractActivation = Tanh()
    init_scale: float = 1.0
    solver: AbstractSolver | None = None
    adjoint: AbstractAdjoint | None = None
    throw: bool = True

    def __post_init__(self):
        DEQLinear(1, 1, activation=self.activation, init_scale=self.init_scale,
                  solver=self.solver, adjoint=self.adjoint, throw=self.throw)

    @property
    def name(self) -> str:
        return f"deq ({self.activation.name})"

    def _kwargs(self):
        return dict(activation=self.activation, init_scale=self.init_scale, solver=self.solver,
                    adjoint=self.adjoint, throw=self.throw)

    def linear(self, in_features, features, *, seed, dtype):
        return DEQLinear(in_features, features, seed=seed, dtype=dtype, **self._kwargs())

    def conv(self, in_channels, channels, *, seed, dtype):
        return DEQConv2d(in_channels, channels, seed=seed, dtype=dtype, **self._kwargs())


@dataclass(frozen=True, kw_only=True)
class ExplicitFamily(AbstractLayerFamily):
    """Explicit weight-tied layers with the implicit layer's parameters (`ExplicitLinear`)."""

    activation: AbstractActivation = ReLU()
    depth: int = 2

    def __post_init__(self):
        ExplicitLinear(1, 1, activation=self.activation, depth=self.depth)

    @property
    def name(self) -> str:
        return f"explicit ({self.activation.name}, depth {self.depth})"

    def linear(self, in_features, features, *, seed, dtype):
        return ExplicitLinear(in_features, features, activation=self.activation,
                              depth=self.depth, seed=seed, dtype=dtype)

    def conv(self, in_channels, channels, *, seed, dtype):
        return ExplicitConv2d(in_channels, channels, activation=self.activation,
                              depth=self.depth, seed=seed, dtype=dtype)


def _check_image(image_size, in_channels, num_classes, seed):
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    if not (isinstance(image_size, tuple) and len(image_size) == 2):
        raise TypeError(f"image_size must be an int or a (height, width) tuple, got "
                        f"{image_size!r}")
    for name, value in (("image height", image_size[0]), ("image width", image_size[1]),
                        ("in_channels", in_channels), ("num_classes", num_classes)):
        _check_positive_int(name, value)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    return image_size


def _check_family(family):
    if not isinstance(family, AbstractLayerFamily):
        raise TypeError(f"family must be a layer family (PCDEQFamily(), MonDEQFamily(), "
                        f"DEQFamily(), ExplicitFamily()), got {family!r}")


def linear_classifier(family: AbstractLayerFamily, *, image_size: int | tuple[int, int],
                      in_channels: int, features: int = 80, num_classes: int = 10,
                      seed: int = 0, dtype: torch.dtype | None = None) -> nn.Sequential:
    """Flatten, fully connected implicit layer of width ``features``, BatchNorm, linear head.

    Examples
    --------
    >>> from deqppl.layers import PCDEQFamily
    >>> model = linear_classifier(PCDEQFamily(), image_size=28, in_channels=1)
    >>> num_parameters(model)  # the paper's MNIST linear pcDEQ
    70410
    """
    _check_family(family)
    image_size = _check_image(image_size, in_channels, num_classes, seed)
    _check_positive_int("features", features)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    d = in_channels * image_size[0] * image_size[1]
    return nn.Sequential(
        ImageInput(in_channels, image_size), nn.Flatten(),
        family.linear(d, features, seed=seed, dtype=dtype),
        nn.BatchNorm1d(features, dtype=dtype), _linear(features, num_classes, seed, dtype))


def single_conv_classifier(family: AbstractLayerFamily, *, image_size: int | tuple[int, int],
                           in_channels: int, channels: int = 82, pool: int = 8,
                           num_classes: int = 10, seed: int = 0,
                           dtype: torch.dtype | None = None) -> nn.Sequential:
    """One convolutional implicit layer, BatchNorm, ``pool`` x ``pool`` average pooling, linear.

    Examples
    --------
    >>> from deqppl.layers import PCDEQFamily
    >>> num_parameters(single_conv_classifier(PCDEQFamily(), image_size=28, in_channels=1))
    69136
    """
    _check_family(family)
    image_size = _check_image(image_size, in_channels, num_classes, seed)
    _check_positive_int("channels", channels)
    _check_positive_int("pool", pool)
    if pool > min(image_size):
        raise ValueError(f"pool ({pool}) must not exceed the image size {image_size}")
    dtype = torch.get_default_dtype() if dtype is None else dtype
    pooled = (image_size[0] // pool) * (image_size[1] // pool)
    return nn.Sequential(
        ImageInput(in_channels, image_size),
        family.conv(in_channels, channels, seed=seed, dtype=dtype),
        nn.BatchNorm2d(channels, dtype=dtype), nn.AvgPool2d(pool), nn.Flatten(),
        _linear(channels * pooled, num_classes, seed, dtype))


def multi_conv_classifier(family: AbstractLayerFamily, *, image_size: int | tuple[int, int],
                          in_channels: int, channels: tuple[int, ...] = (12, 24, 48),
                          num_classes: int = 10, seed: int = 0,
                          dtype: torch.dtype | None = None) -> nn.Sequential:
    """Convolutional implicit layers of widths ``channels``, each followed by BatchNorm, 2x2
    average pooling between them, global average pooling, linear head.

    Examples
    --------
    >>> from deqppl.layers import PCDEQFamily
    >>> num_parameters(multi_conv_classifier(PCDEQFamily(), image_size=28, in_channels=1))
    41278
    """
    _check_family(family)
    image_size = _check_image(image_size, in_channels, num_classes, seed)
    if not isinstance(channels, tuple) or not channels:
        raise TypeError(f"channels must be a non-empty tuple of ints, got {channels!r}")
    for c in channels:
        _check_positive_int("every entry of channels", c)
    downsamples = len(channels) - 1
    if min(image_size) < 2 ** downsamples:
        raise ValueError(f"an image of size {image_size} cannot be halved {downsamples} times "
                         f"for {len(channels)} stages")
    dtype = torch.get_default_dtype() if dtype is None else dtype
    modules: list[nn.Module] = [ImageInput(in_channels, image_size)]
    previous = in_channels
    for k, c in enumerate(channels):
        modules.append(family.conv(previous, c, seed=seed + k, dtype=dtype))
        modules.append(nn.BatchNorm2d(c, dtype=dtype))
        if k < downsamples:
            modules.append(nn.AvgPool2d(2))
        previous = c
    modules += [nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                _linear(previous, num_classes, seed, dtype)]
    return nn.Sequential(*modules)


def _linear(in_features, out_features, seed, dtype):
    # torch's default initialisation, seeded without touching the global generator
    layer = nn.Linear(in_features, out_features, dtype=dtype)
    generator = torch.Generator().manual_seed(seed + 7919)
    bound = 1.0 / math.sqrt(in_features)
    with torch.no_grad():
        layer.weight.copy_((2 * torch.rand(layer.weight.shape, generator=generator,
                                           dtype=torch.float64) - 1) * bound)
        layer.bias.copy_((2 * torch.rand(layer.bias.shape, generator=generator,
                                         dtype=torch.float64) - 1) * bound)
    return layer
