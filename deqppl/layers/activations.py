"""Activations and input injections of implicit layers, as small frozen objects (SPEC 5).

A pcDEQ layer $z = \\sigma(Wz + b + u(x))$ is well posed for every $W \\ge 0$ when $\\sigma$ is
nondecreasing and concave on $\\mathbb R_+$ and bounded, and $g_x(0) = \\sigma(b + u(x)) > 0$
(Gabor, Piotrowski & Cavalcante, 2024, ICML). The activations here declare those properties;
`CustomActivation` wraps any elementwise function and verifies them numerically.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = [
    "AbstractActivation",
    "Tanh",
    "Softsign",
    "ReLU6",
    "Sigmoid",
    "ReLU",
    "CustomActivation",
    "AbstractInjection",
    "SoftplusInjection",
    "ReLUInjection",
    "IdentityInjection",
    "check_concave_nondecreasing",
]


def _sech2(t: torch.Tensor) -> torch.Tensor:
    # sech^2 t, not 1 - tanh^2 t: tanh t rounds to 1 for t > 9 in float32, so the difference
    # cancels to exactly 0 while sech^2 t is representable down to ~1e-38 (t ~ 44)
    return torch.cosh(t).reciprocal() ** 2


def _sigmoid_slope(t: torch.Tensor) -> torch.Tensor:
    # s(t) s(-t), not s (1 - s): 1 - s(t) cancels to exactly 0 for t > 17 in float32
    return torch.sigmoid(t) * torch.sigmoid(-t)


def _accurate(name: str, value, slope, doc: str) -> type[torch.autograd.Function]:
    """An elementwise ``value`` whose backward and forward-mode derivative is ``slope``.

    Written with differentiable operations and a vmap rule, so higher derivatives and
    `torch.func` transforms keep working.
    """

    def setup_context(ctx, inputs, output):
        (t,) = inputs
        ctx.save_for_backward(t)
        ctx.save_for_forward(t)

    def backward(ctx, grad):
        (t,) = ctx.saved_tensors
        return grad * slope(t)

    def jvp(ctx, tangent):
        (t,) = ctx.saved_tensors
        return tangent * slope(t)

    return type(name, (torch.autograd.Function,), {
        "__doc__": doc,
        "generate_vmap_rule": True,
        "forward": staticmethod(lambda t: value(t)),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward),
        "jvp": staticmethod(jvp),
    })


_AccurateTanh = _accurate(
    "_AccurateTanh", torch.tanh, _sech2,
    """$\\tanh$ whose derivative is $\\mathrm{sech}^2$ (torch's backward uses $1 - \\tanh^2$,
    exactly 0 in float32 for $t > 9$). A saturated pcDEQ at a large $W$ then still gets the
    tiny but nonzero gradients that Adam, being scale invariant, turns into full steps out of
    saturation.""",
)
_AccurateSigmoid = _accurate(
    "_AccurateSigmoid", torch.sigmoid, _sigmoid_slope,
    """The logistic sigmoid with derivative $s(t)s(-t)$ (torch's $s(1 - s)$ is exactly 0 in
    float32 for $t > 17$); see `_AccurateTanh`.""",
)


class AbstractActivation(abc.ABC):
    """Elementwise activation $\\sigma$ with its derivative; never instantiated.

    Attributes (declared by each concrete activation)
    ----------------------------------------------
    concave_nondecreasing
        Whether $\\sigma$ is nondecreasing and concave on $[0, \\infty)$ (needed by pcDEQ layers).
    bounded
        Whether $\\sigma$ is bounded above on $[0, \\infty)$ (then a pcDEQ fixed point exists for
        every $W \\ge 0$, whatever its norm).
    """

    concave_nondecreasing: bool
    bounded: bool

    @property
    def name(self) -> str:
        """Name used in results and error messages."""
        return type(self).__name__

    @abc.abstractmethod
    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        """$\\sigma(t)$ elementwise."""

    @abc.abstractmethod
    def derivative(self, t: torch.Tensor) -> torch.Tensor:
        """$\\sigma'(t)$ elementwise (a one-sided value at kinks)."""

    def value_at_zero(self) -> float:
        """$\\sigma(0)$: when it is 0, a pcDEQ layer needs a strictly positive injection."""
        return float(self(torch.zeros((), dtype=torch.float64)))


@dataclass(frozen=True)
class Tanh(AbstractActivation):
    """$\\tanh$; concave nondecreasing and bounded on $\\mathbb R_+$, $\\sigma(0) = 0$ (pcDEQ-1).

    Examples
    --------
    >>> import torch
    >>> Tanh()(torch.tensor([0.0, 1.0])).tolist()
    [0.0, 0.7615941762924194]
    """

    concave_nondecreasing: bool = field(default=True, init=False)
    bounded: bool = field(default=True, init=False)

    def __call__(self, t):
        return _AccurateTanh.apply(t)

    def derivative(self, t):
        return _sech2(t)


@dataclass(frozen=True)
class Softsign(AbstractActivation):
    """Softsign $t / (1 + |t|)$; concave nondecreasing and bounded on $\\mathbb R_+$ (pcDEQ-1).

    Examples
    --------
    >>> import torch
    >>> Softsign()(torch.tensor([1.0, -3.0])).tolist()
    [0.5, -0.75]
    """

    concave_nondecreasing: bool = field(default=True, init=False)
    bounded: bool = field(default=True, init=False)

    def __call__(self, t):
        return t / (1.0 + t.abs())

    def derivative(self, t):
        return 1.0 / (1.0 + t.abs()) ** 2


@dataclass(frozen=True)
class ReLU6(AbstractActivation):
    """$\\min(\\max(t, 0), 6)$; concave nondecreasing and bounded on $\\mathbb R_+$ (pcDEQ-1).

    Examples
    --------
    >>> import torch
    >>> ReLU6()(torch.tensor([-1.0, 2.0, 9.0])).tolist()
    [0.0, 2.0, 6.0]
    """

    concave_nondecreasing: bool = field(default=True, init=False)
    bounded: bool = field(default=True, init=False)

    def __call__(self, t):
        return F.relu6(t)

    def derivative(self, t):
        return ((t > 0) & (t < 6)).to(t.dtype)


@dataclass(frozen=True)
class Sigmoid(AbstractActivation):
    """Logistic sigmoid; concave nondecreasing and bounded on $\\mathbb R_+$, $\\sigma(0) = 1/2$
    (pcDEQ-2, whose injection need only be nonnegative).

    Examples
    --------
    >>> import torch
    >>> Sigmoid()(torch.tensor([0.0])).tolist()
    [0.5]
    """

    concave_nondecreasing: bool = field(default=True, init=False)
    bounded: bool = field(default=True, init=False)

    def __call__(self, t):
        return _AccurateSigmoid.apply(t)

    def derivative(self, t):
        return _sigmoid_slope(t)


@dataclass(frozen=True)
class ReLU(AbstractActivation):
    """$\\max(t, 0)$: the monotone-operator DEQ's activation (Winston & Kolter, 2020, NeurIPS).

    Concave and nondecreasing on $\\mathbb R_+$ but unbounded, so a pcDEQ fixed point need not
    exist for large $W$; pcDEQ layers reject it.

    Examples
    --------
    >>> import torch
    >>> ReLU()(torch.tensor([-1.0, 2.0])).tolist()
    [0.0, 2.0]
    """

    concave_nondecreasing: bool = field(default=True, init=False)
    bounded: bool = field(default=False, init=False)

    def __call__(self, t):
        return torch.relu(t)

    def derivative(self, t):
        return (t > 0).to(t.dtype)


#: Grid on which `check_concave_nondecreasing` tests a function: 0 to 50 in steps of 1/20.
#: Fifty covers the saturation range of every bounded activation in use; the step is small
#: enough to see the curvature of tanh and softsign near 0.
_GRID = torch.linspace(0.0, 50.0, 1001, dtype=torch.float64)
#: Slack for round-off in the first and second differences on `_GRID` (float64 values of size
#: <= 1e3 have round-off ~1e-13; the differences of a convex function such as exp or t^2 are
#: of order step^2 = 2.5e-3 and far above this).
_SLACK = 1e-9


def check_concave_nondecreasing(fn: Callable[[torch.Tensor], torch.Tensor], name: str) -> None:
    """Raise ``ValueError`` unless ``fn`` is nondecreasing and concave on $[0, 50]$.

    Checked on a grid of 1 001 points in float64 through first and second differences; the
    message names the first point where the property fails.

    Examples
    --------
    >>> import torch
    >>> check_concave_nondecreasing(torch.tanh, "tanh")
    >>> check_concave_nondecreasing(torch.exp, "exp")
    Traceback (most recent call last):
    ...
    ValueError: activation exp is not concave on [0, inf): its second difference is +... at t = 0.05...
    """
    t = _GRID
    values = fn(t)
    if not isinstance(values, torch.Tensor) or values.shape != t.shape:
        raise TypeError(f"activation {name} must map a tensor elementwise to a tensor of the "
                        f"same shape")
    values = values.to(torch.float64)
    if not bool(torch.isfinite(values).all()):
        idx = int(torch.nonzero(~torch.isfinite(values))[0])
        raise ValueError(f"activation {name} is not finite at t = {float(t[idx]):.4g}")
    # round-off is relative to the local size of the values
    local = 1.0 + values.abs()
    first = values[1:] - values[:-1]
    bad = first < -_SLACK * torch.maximum(local[1:], local[:-1])
    if bool(bad.any()):
        idx = int(torch.nonzero(bad)[0])
        raise ValueError(
            f"activation {name} is not nondecreasing on [0, inf): it decreases by "
            f"{-float(first[idx]):.3g} between t = {float(t[idx]):.4g} and {float(t[idx + 1]):.4g}; "
            f"pcDEQ layers need an activation that is nondecreasing and concave there")
    second = first[1:] - first[:-1]
    bad = second > _SLACK * torch.maximum(torch.maximum(local[2:], local[1:-1]), local[:-2])
    if bool(bad.any()):
        idx = int(torch.nonzero(bad)[0])
        raise ValueError(
            f"activation {name} is not concave on [0, inf): its second difference is "
            f"+{float(second[idx]):.3g} at t = {float(t[idx + 1]):.4g}; pcDEQ layers need an "
            f"activation that is nondecreasing and concave there")


@dataclass(frozen=True)
class CustomActivation(AbstractActivation):
    """Any elementwise function, checked to be nondecreasing and concave on $\\mathbb R_+$.

    Parameters
    ----------
    fn
        Elementwise torch function.
    label
        Name used in results and messages.
    bounded
        Whether ``fn`` is bounded above on $[0, \\infty)$; the caller declares it (it cannot be
        verified on a finite grid) and pcDEQ layers require it.

    Raises
    ------
    ValueError
        If ``fn`` decreases or is convex somewhere on the check grid (`check_concave_nondecreasing`).

    Examples
    --------
    >>> import torch
    >>> act = CustomActivation(fn=lambda t: 1 - torch.exp(-t), label="1-exp(-t)", bounded=True)
    >>> act.name, round(act.value_at_zero(), 6)
    ('1-exp(-t)', 0.0)
    """

    fn: Callable[[torch.Tensor], torch.Tensor]
    label: str
    bounded: bool
    concave_nondecreasing: bool = field(default=True, init=False)

    def __post_init__(self):
        if not callable(self.fn):
            raise TypeError(f"fn must be callable, got {type(self.fn).__name__}")
        if not isinstance(self.label, str) or not self.label:
            raise TypeError(f"label must be a non-empty str, got {self.label!r}")
        if not isinstance(self.bounded, bool):
            raise TypeError(f"bounded must be a bool, got {self.bounded!r}")
        check_concave_nondecreasing(self.fn, self.label)

    @property
    def name(self) -> str:
        return self.label

    def __call__(self, t):
        return self.fn(t)

    def derivative(self, t):
        with torch.enable_grad():
            tt = t.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.fn(tt).sum(), tt)
        return grad


class AbstractInjection(abc.ABC):
    """Map $u = \\phi(a)$ applied to the affine input term $a = Ux + c$; never instantiated.

    Attributes
    ----------
    strictly_positive
        Whether $\\phi(a) > 0$ for every real $a$ (in exact arithmetic).
    nonnegative
        Whether $\\phi(a) \\ge 0$ for every real $a$.
    """

    strictly_positive: bool
    nonnegative: bool

    @property
    def name(self) -> str:
        return type(self).__name__

    @abc.abstractmethod
    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        """$\\phi(a)$ elementwise."""


@dataclass(frozen=True, kw_only=True)
class SoftplusInjection(AbstractInjection):
    """$\\mathrm{softplus}_\\beta(a) = \\log(1 + e^{\\beta a})/\\beta > 0$ (pcDEQ-1, $\\beta = 5$, SPEC 5).

    In floating point it underflows to 0 for $a \\lesssim -20$ (float32) or $-150$ (float64);
    the layer's certificate checks the computed injection.

    Examples
    --------
    >>> import torch
    >>> round(float(SoftplusInjection()(torch.tensor(0.0))), 6)  # log(2) / 5
    0.138629
    """

    beta: float = 5.0
    strictly_positive: bool = field(default=True, init=False)
    nonnegative: bool = field(default=True, init=False)

    def __post_init__(self):
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or \
                not math.isfinite(self.beta) or self.beta <= 0:
            raise ValueError(f"beta must be a finite number > 0, got {self.beta!r}")

    def __call__(self, a):
        # threshold=20 (torch's default) switches to the identity where beta*a > 20: exact to
        # within e^-20 relative, and it avoids overflow of exp.
        return F.softplus(a, beta=self.beta)


@dataclass(frozen=True)
class ReLUInjection(AbstractInjection):
    """$\\max(a, 0) \\ge 0$ (pcDEQ-2 with the sigmoid, whose $\\sigma(0) = 1/2 > 0$).

    Examples
    --------
    >>> import torch
    >>> ReLUInjection()(torch.tensor([-1.0, 2.0])).tolist()
    [0.0, 2.0]
    """

    strictly_positive: bool = field(default=False, init=False)
    nonnegative: bool = field(default=True, init=False)

    def __call__(self, a):
        return torch.relu(a)


@dataclass(frozen=True)
class IdentityInjection(AbstractInjection):
    """$a$ itself (any sign): the injection of monotone-operator and unconstrained DEQs.

    Examples
    --------
    >>> import torch
    >>> IdentityInjection()(torch.tensor([-1.0])).tolist()
    [-1.0]
    """

    strictly_positive: bool = field(default=False, init=False)
    nonnegative: bool = field(default=False, init=False)

    def __call__(self, a):
        return a
