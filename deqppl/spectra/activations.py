"""Elementwise activations with their Gaussian moments (SPEC 6).

Each activation is a small frozen object: ``act(t)`` evaluates it on a tensor, ``kinks`` lists the
points where it or its derivative is not smooth (the quadrature splits there), and
``closed_form(scale)`` returns its `GaussianMoments` in closed form where one exists (ReLU, leaky
ReLU, hard tanh) or ``None``. `gaussian_moments` uses the closed form when there is one and
quadrature otherwise; `quadrature_moments` always integrates (the tests cross-check the two).
`Centred` subtracts a constant, $\\phi-\\mathbb E\\phi(\\tau\\xi)$, as the DEQ of SPEC 6 does.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch

from .gaussian import AbstractQuadrature, CompositeGaussLegendre, GaussianMoments

__all__ = [
    "AbstractActivation",
    "ReLU",
    "LeakyReLU",
    "HardTanh",
    "Tanh",
    "ELU",
    "Swish",
    "Centred",
    "gaussian_moments",
    "quadrature_moments",
]

_SQRT_2PI = math.sqrt(2.0 * math.pi)


def _check_number(owner: str, name: str, value, *, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{owner}.{name} must be a finite real number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{owner}.{name} must be > 0, got {value!r}")


def _check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
            or scale <= 0:
        raise ValueError(f"scale must be a finite number > 0 (the standard deviation tau of the "
                         f"pre-activation), got {scale!r}")
    return float(scale)


class AbstractActivation(abc.ABC):
    """An elementwise activation $\\phi$; never instantiated."""

    @abc.abstractmethod
    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        """$\\phi(t)$, elementwise."""

    @property
    def kinks(self) -> tuple[float, ...]:
        """Points $t$ where $\\phi$, $\\phi'$ or $\\phi''$ jumps (empty for smooth $\\phi$)."""
        return ()

    @property
    def odd(self) -> bool:
        """Whether $\\phi(-t) = -\\phi(t)$ (then $\\mathbb E\\phi''=0$: $\\alpha_2=\\alpha_3=0$)."""
        return False

    def closed_form(self, scale: float) -> GaussianMoments | None:
        """The `GaussianMoments` at ``scale`` in closed form, or ``None`` if there is none."""
        return None

    def derivative(self, t: torch.Tensor) -> torch.Tensor:
        """$\\phi'(t)$ elementwise, by autograd (the value at a kink is autograd's choice)."""
        with torch.enable_grad():
            leaf = t.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self(leaf).sum(), leaf)
        return grad


def _leaky_moments(pos: float, neg: float, scale: float) -> GaussianMoments:
    # phi(t) = pos * t^+ + neg * t^-: E phi = (pos - neg) tau E xi^+, E phi'' = (pos - neg) p(0)/tau,
    # (phi^2)' = 2 pos^2 t^+ + 2 neg^2 t^- is continuous, so (phi^2)'' has no Dirac mass.
    return GaussianMoments(
        scale=scale, mean=(pos - neg) * scale / _SQRT_2PI, second=(pos**2 + neg**2) * scale**2 / 2,
        d1=(pos + neg) / 2, d2=(pos - neg) / (scale * _SQRT_2PI), d1_sq=(pos**2 + neg**2) / 2,
        sq_d2=pos**2 + neg**2, exact=True)


@dataclass(frozen=True)
class ReLU(AbstractActivation):
    """$\\phi(t)=\\max(t, 0)$.

    Examples
    --------
    >>> m = ReLU().closed_form(1.0)
    >>> round(m.var, 6), m.g1  # 1/2 - 1/(2 pi), (1/2)^2
    (0.340845, 0.25)
    """

    def __call__(self, t):
        return torch.clamp(t, min=0.0)

    @property
    def kinks(self):
        return (0.0,)

    def closed_form(self, scale):
        return _leaky_moments(1.0, 0.0, _check_scale(scale))


@dataclass(frozen=True)
class LeakyReLU(AbstractActivation):
    """$\\phi(t)=a\\,t^+ + b\\,t^-$ ($t^-=\\min(t,0)$); for $a\\ge b$ this is $\\max(at, bt)$.

    Parameters
    ----------
    positive_slope
        $a$, the slope for $t>0$.
    negative_slope
        $b$, the slope for $t<0$.

    Examples
    --------
    >>> m = LeakyReLU(positive_slope=1.0, negative_slope=0.5).closed_form(2.0)
    >>> m.d1, m.d1_sq
    (0.75, 0.625)
    """

    positive_slope: float = 1.0
    negative_slope: float = 0.01

    def __post_init__(self):
        _check_number("LeakyReLU", "positive_slope", self.positive_slope)
        _check_number("LeakyReLU", "negative_slope", self.negative_slope)

    def __call__(self, t):
        return self.positive_slope * torch.clamp(t, min=0.0) \
            + self.negative_slope * torch.clamp(t, max=0.0)

    @property
    def kinks(self):
        return (0.0,)

    @property
    def odd(self):
        return self.positive_slope == self.negative_slope

    def closed_form(self, scale):
        return _leaky_moments(float(self.positive_slope), float(self.negative_slope),
                              _check_scale(scale))


@dataclass(frozen=True)
class HardTanh(AbstractActivation):
    """$\\phi(t)=a\\,\\mathrm{clip}(t,-c,c)$ (SPEC 6's matched activation for tanh-DEQs).

    Parameters
    ----------
    gain
        $a$.
    clip
        $c > 0$.

    Examples
    --------
    >>> m = HardTanh(gain=1.0, clip=1.0).closed_form(1.0)
    >>> round(m.d1, 6), m.d2  # erf(1/sqrt 2)
    (0.682689, 0.0)
    """

    gain: float = 1.0
    clip: float = 1.0

    def __post_init__(self):
        _check_number("HardTanh", "gain", self.gain)
        _check_number("HardTanh", "clip", self.clip, positive=True)

    def __call__(self, t):
        return self.gain * torch.clamp(t, min=-self.clip, max=self.clip)

    @property
    def kinks(self):
        return (-float(self.clip), float(self.clip))

    @property
    def odd(self):
        return True

    def closed_form(self, scale):
        tau = _check_scale(scale)
        a, c = float(self.gain), float(self.clip)
        k = c / tau
        inside = math.erf(k / math.sqrt(2.0))  # P(|xi| < k)
        density = math.exp(-0.5 * k * k) / _SQRT_2PI
        # E xi^2 1{|xi|<k} = P(|xi|<k) - 2 k p(k);
        # (phi^2)'' = 2a^2 1{|t|<c} - 2a^2 c (delta_c + delta_-c)
        truncated = inside - 2.0 * k * density
        return GaussianMoments(
            scale=tau, mean=0.0, second=a * a * (tau * tau * truncated + c * c * (1.0 - inside)),
            d1=a * inside, d2=0.0, d1_sq=a * a * inside, sq_d2=2.0 * a * a * truncated, exact=True)


@dataclass(frozen=True)
class Tanh(AbstractActivation):
    """$\\phi(t)=\\tanh t$ (moments by Gauss--Hermite quadrature)."""

    def __call__(self, t):
        return torch.tanh(t)

    @property
    def odd(self):
        return True


@dataclass(frozen=True)
class ELU(AbstractActivation):
    """$\\phi(t)=t$ for $t>0$, $\\alpha(e^t-1)$ otherwise (moments by quadrature).

    Parameters
    ----------
    alpha
        $\\alpha > 0$.
    """

    alpha: float = 1.0

    def __post_init__(self):
        _check_number("ELU", "alpha", self.alpha, positive=True)

    def __call__(self, t):
        return torch.where(t > 0, t, self.alpha * torch.expm1(torch.clamp(t, max=0.0)))

    @property
    def kinks(self):
        return (0.0,)  # phi'' jumps at 0 (and phi' too unless alpha = 1)


@dataclass(frozen=True)
class Swish(AbstractActivation):
    """$\\phi(t)=t\\,\\mathrm{sigmoid}(\\beta t)$ (SiLU for $\\beta=1$; moments by quadrature).

    Parameters
    ----------
    beta
        $\\beta > 0$.
    """

    beta: float = 1.0

    def __post_init__(self):
        _check_number("Swish", "beta", self.beta, positive=True)

    def __call__(self, t):
        return t * torch.sigmoid(self.beta * t)


@dataclass(frozen=True)
class Centred(AbstractActivation):
    """$\\phi(t) - c$: an activation shifted by a constant (composition, not a subclass).

    Parameters
    ----------
    base
        The activation $\\phi$.
    shift
        $c$; SPEC 6 centres at $c=\\mathbb E\\phi(\\tau\\xi)$ (see `Centred.at`).

    Examples
    --------
    >>> phi = Centred.at(ReLU(), 1.0)
    >>> round(phi.shift, 6), round(gaussian_moments(phi, 1.0).mean, 12)
    (0.398942, 0.0)
    """

    base: AbstractActivation
    shift: float = 0.0

    def __post_init__(self):
        if not isinstance(self.base, AbstractActivation):
            raise TypeError(f"Centred.base must be an activation such as ReLU(), got "
                            f"{self.base!r}")
        if isinstance(self.base, Centred):
            raise TypeError("Centred.base must not itself be Centred; add the shifts instead")
        _check_number("Centred", "shift", self.shift)

    @classmethod
    def at(cls, base: AbstractActivation, scale: float, *,
           quadrature: AbstractQuadrature | None = None) -> Centred:
        """$\\phi - \\mathbb E\\phi(\\tau\\xi)$ at $\\tau$ = ``scale``."""
        return cls(base=base, shift=gaussian_moments(base, scale, quadrature=quadrature).mean)

    def __call__(self, t):
        return self.base(t) - self.shift

    @property
    def kinks(self):
        return self.base.kinks

    @property
    def odd(self):
        return self.base.odd and self.shift == 0.0

    def closed_form(self, scale):
        moments = self.base.closed_form(scale)
        return None if moments is None else moments.shifted(float(self.shift))

    def derivative(self, t):
        return self.base.derivative(t)


def quadrature_moments(activation: AbstractActivation, scale: float, *,
                       quadrature: AbstractQuadrature | None = None) -> GaussianMoments:
    """The `GaussianMoments` of ``activation`` at ``scale`` by quadrature (Stein's lemma).

    Parameters
    ----------
    activation
        Any `AbstractActivation`.
    scale
        $\\tau > 0$.
    quadrature
        A quadrature object; ``None`` means ``CompositeGaussLegendre()``.

    Returns
    -------
    GaussianMoments
        With ``exact=False``.

    Raises
    ------
    ValueError
        If ``scale`` is not a positive number, or a moment is not finite (an activation growing
        too fast for its Gaussian moments to exist, or overflowing).

    Examples
    --------
    >>> exact, quad = ReLU().closed_form(0.7), quadrature_moments(ReLU(), 0.7)
    >>> max(abs(a - b) for a, b in zip(exact.as_tuple(), quad.as_tuple())) < 1e-12
    True
    """
    if not isinstance(activation, AbstractActivation):
        raise TypeError(f"activation must be an AbstractActivation such as ReLU(), got "
                        f"{activation!r}")
    tau = _check_scale(scale)
    quadrature = CompositeGaussLegendre() if quadrature is None else quadrature
    if not isinstance(quadrature, AbstractQuadrature):
        raise TypeError(f"quadrature must be a quadrature object such as "
                        f"CompositeGaussLegendre(), got {quadrature!r}")
    xi, w = quadrature.rule(tuple(k / tau for k in activation.kinks))
    t = tau * xi
    phi = activation(t)
    dphi = activation.derivative(t)
    he2 = xi * xi - 1.0
    values = {
        "mean": (w * phi).sum(),
        "second": (w * phi * phi).sum(),
        "d1": (w * phi * xi).sum() / tau,
        "d2": (w * phi * he2).sum() / tau**2,
        "d1_sq": (w * dphi * dphi).sum(),
        "sq_d2": (w * phi * phi * he2).sum() / tau**2,
    }
    for name, value in values.items():
        if not bool(torch.isfinite(value)):
            raise ValueError(f"the Gaussian moment {name} of {activation!r} at scale {tau!r} is "
                             f"not finite ({float(value)}): its quadrature overflowed; the "
                             f"activation must have finite Gaussian moments at this scale")
    return GaussianMoments(scale=tau, exact=False, **{k: float(v) for k, v in values.items()})


def gaussian_moments(activation: AbstractActivation, scale: float, *,
                     quadrature: AbstractQuadrature | None = None) -> GaussianMoments:
    """The `GaussianMoments` of ``activation`` at ``scale``: closed form if any, else quadrature.

    Examples
    --------
    >>> gaussian_moments(ReLU(), 1.0).exact, gaussian_moments(Tanh(), 1.0).exact
    (True, False)
    """
    if not isinstance(activation, AbstractActivation):
        raise TypeError(f"activation must be an AbstractActivation such as ReLU(), got "
                        f"{activation!r}")
    exact = activation.closed_form(_check_scale(scale))
    return exact if exact is not None else quadrature_moments(activation, scale,
                                                               quadrature=quadrature)
