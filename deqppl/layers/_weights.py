"""Dense and convolutional weights, optionally weight-normalised and optionally in the cone.

Internal: the layers own these and expose what users need (effective weights, setters).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .cones import AbstractCone, check_nonnegative

__all__: list[str] = []


def _row_normalise(p: torch.Tensor) -> torch.Tensor:
    """``p`` with every row (dim 0 slice) of unit Euclidean norm; an all-zero row stays zero.

    The paper's code divides by the row norm unguarded, so an all-zero row gives 0/0 = NaN. Here
    the norm of such a row is replaced by 1 (the row is zero anyway), and the square root is never
    taken of 0, so the gradient is finite too.
    """
    sq = p.pow(2).flatten(1).sum(1)
    safe = torch.where(sq > 0, sq, torch.ones_like(sq))
    return p / torch.sqrt(safe).reshape(-1, *([1] * (p.ndim - 1)))


class _Weight(nn.Module):
    """Weight of shape ``shape`` (rows = dim 0) with optional gain (weight norm) and bias.

    With ``cone`` given, the effective weight, gain and bias are ``cone(raw)`` and so nonnegative;
    with ``cone=None`` they are the raw parameters. Weight normalisation (Salimans & Kingma,
    2016, NeurIPS) gives $W_i = g_i P_i / \\lVert P_i\\rVert$ per row $i$.
    """

    def __init__(self, shape: tuple[int, ...], *, cone: AbstractCone | None, weight_norm: bool,
                 bias: bool, init_scale: float, generator: torch.Generator,
                 dtype: torch.dtype | None):
        super().__init__()
        self.cone = cone
        self.weight_norm = weight_norm
        dtype = torch.get_default_dtype() if dtype is None else dtype
        fan_in = math.prod(shape[1:])
        if cone is None:
            # torch's default (Kaiming-uniform) range for nn.Linear / nn.Conv2d, times init_scale
            bound = init_scale / math.sqrt(fan_in)
            w0 = (2 * torch.rand(shape, generator=generator, dtype=torch.float64) - 1) * bound
            b0 = (2 * torch.rand(shape[0], generator=generator, dtype=torch.float64) - 1) * bound
        else:
            # Entries uniform on (0, 2 s / fan_in]: every row sums to s on average, so the Perron
            # root of a square W starts near s = init_scale. Strictly positive, so every cone
            # can represent it.
            w0 = (1 - torch.rand(shape, generator=generator, dtype=torch.float64)) * (
                2 * init_scale / fan_in)
            b0 = (1 - torch.rand(shape[0], generator=generator, dtype=torch.float64)) / fan_in
        self.raw = nn.Parameter(torch.empty(shape, dtype=dtype))
        self.raw_gain = nn.Parameter(torch.empty(shape[0], dtype=dtype)) if weight_norm else None
        self.raw_bias = nn.Parameter(torch.empty(shape[0], dtype=dtype)) if bias else None
        self.set_(w0.to(dtype), b0.to(dtype) if bias else None, name="initial weight")

    # -- effective values -------------------------------------------------------------------
    def _pos(self, raw: torch.Tensor) -> torch.Tensor:
        return raw if self.cone is None else self.cone(raw)

    def weight(self) -> torch.Tensor:
        p = self._pos(self.raw)
        if not self.weight_norm:
            return p
        gain = self._pos(self.raw_gain)
        return gain.reshape(-1, *([1] * (p.ndim - 1))) * _row_normalise(p)

    def bias(self) -> torch.Tensor | None:
        return None if self.raw_bias is None else self._pos(self.raw_bias)

    # -- setting and projecting -------------------------------------------------------------
    def _raw_of(self, w: torch.Tensor, name: str) -> torch.Tensor:
        if self.cone is None:
            return w.clone()
        return self.cone.inverse(w, name)

    @torch.no_grad()
    def set_(self, w: torch.Tensor, b: torch.Tensor | None = None, *, name: str) -> None:
        """Set the effective weight (and bias) exactly; ``w`` is checked to be in the cone."""
        if tuple(w.shape) != tuple(self.raw.shape):
            raise ValueError(f"{name} must have shape {tuple(self.raw.shape)}, got {tuple(w.shape)}")
        if self.cone is not None:
            check_nonnegative(w, name)
        w = w.to(self.raw.dtype)
        if self.weight_norm:
            norms = torch.linalg.vector_norm(w.flatten(1), dim=1)
            rows = torch.where((norms > 0).reshape(-1, *([1] * (w.ndim - 1))),
                               w / torch.where(norms > 0, norms, 1.0).reshape(-1, *([1] * (w.ndim - 1))),
                               torch.zeros_like(w))
            # zero rows: the direction is immaterial (gain 0); a uniform positive row can be
            # represented by every cone (the gain 0 only by those that allow zeros)
            zero = norms == 0
            if bool(zero.any()):
                rows[zero] = 1.0 / math.sqrt(math.prod(w.shape[1:]))
            self.raw.copy_(self._raw_of(rows, name))
            self.raw_gain.copy_(self._raw_of(norms, f"row norms of {name}"))
        else:
            self.raw.copy_(self._raw_of(w, name))
        if b is not None:
            if self.raw_bias is None:
                raise ValueError(f"{name} has no bias to set")
            if tuple(b.shape) != (w.shape[0],):
                raise ValueError(f"bias of {name} must have shape {(w.shape[0],)}, "
                                 f"got {tuple(b.shape)}")
            self.raw_bias.copy_(self._raw_of(b.to(self.raw.dtype), f"bias of {name}"))

    @torch.no_grad()
    def set_bias_(self, b: torch.Tensor, *, name: str) -> None:
        if self.raw_bias is None:
            raise ValueError(f"{name} has no bias to set")
        if tuple(b.shape) != tuple(self.raw_bias.shape):
            raise ValueError(f"bias of {name} must have shape {tuple(self.raw_bias.shape)}, "
                             f"got {tuple(b.shape)}")
        self.raw_bias.copy_(self._raw_of(b.to(self.raw.dtype), f"bias of {name}"))

    @torch.no_grad()
    def project_(self) -> None:
        if self.cone is None:
            return
        for p in (self.raw, self.raw_gain, self.raw_bias):
            if p is not None:
                self.cone.project_(p)

    @torch.no_grad()
    def min_effective(self) -> float:
        """Smallest effective entry of weight, gain and bias (the cone invariant is >= 0)."""
        values = [self.weight().min()]
        if self.raw_gain is not None:
            values.append(self._pos(self.raw_gain).min())
        if self.raw_bias is not None:
            values.append(self.bias().min())
        return float(torch.stack(values).min())


class DenseWeight(_Weight):
    """Matrix ``(out, in)``: ``apply(z) = z W^T + b`` on ``(B, in)``."""

    def __init__(self, out_features: int, in_features: int, **kwargs):
        super().__init__((out_features, in_features), **kwargs)

    def apply(self, z: torch.Tensor, *, bias: bool = True) -> torch.Tensor:
        return F.linear(z, self.weight(), self.bias() if bias else None)

    def apply_transpose(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.weight()


class ConvWeight(_Weight):
    """Kernel ``(out, in, k, k)``, stride 1, 'same' padding (zero or circular)."""

    def __init__(self, out_channels: int, in_channels: int, kernel_size: int, *,
                 circular: bool = False, **kwargs):
        super().__init__((out_channels, in_channels, kernel_size, kernel_size), **kwargs)
        self.circular = circular
        self.padding = kernel_size // 2

    def _pad(self, z):
        p = self.padding
        return F.pad(z, (p, p, p, p), mode="circular") if self.circular else z

    def apply(self, z: torch.Tensor, *, bias: bool = True) -> torch.Tensor:
        b = self.bias() if bias else None
        if self.circular:
            return F.conv2d(self._pad(z), self.weight(), b)
        return F.conv2d(z, self.weight(), b, padding=self.padding)

    def apply_transpose(self, z: torch.Tensor) -> torch.Tensor:
        w = self.weight()
        if self.circular:
            # the adjoint of a circular convolution is the circular correlation with the
            # flipped, channel-transposed kernel
            return F.conv2d(self._pad(z), w.transpose(0, 1).flip(2, 3))
        return F.conv_transpose2d(z, w, padding=self.padding)
