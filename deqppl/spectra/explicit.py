"""Shallow explicit networks whose conjugate kernel matches a DEQ's (SPEC 6, "explicit equivalent").

For $Y_\\ell=\\sigma_\\ell(W_\\ell Y_{\\ell-1})/\\sqrt m$, $Y_0=X$, $W_\\ell$ iid $\\mathcal N(0,1)$, each
$\\sigma_\\ell$ centred at its input scale $\\tau_{\\ell-1}$, the CK $Y_L^\\top Y_L$ has the form
$a_1X^\\top X+VM(a_2,a_3)V^\\top+(\\tau_L^2-a_1\\tau_0^2)I$ with the layer recursion
*(derived, docs/spectra.md)*, from $(a_1,a_2,a_3,a_4)=(1,0,0,1)$:

$$a_1\\leftarrow G_1a_1,\\quad a_2\\leftarrow G_1a_2+\\tfrac14G_2a_4^2,\\quad
a_3\\leftarrow G_1a_3+\\tfrac12G_2a_1^2,\\quad a_4\\leftarrow\\tfrac12G_4a_4,\\quad
\\tau_\\ell^2=\\mathrm{Var}\\,\\sigma_\\ell(\\tau_{\\ell-1}\\xi),$$

$G_1=(\\mathbb E\\sigma')^2$, $G_2=(\\mathbb E\\sigma'')^2$, $G_4=\\mathbb E(\\sigma^2)''$ at $\\tau_{\\ell-1}$
($a_4$ carries the diagonal fluctuation $\\mathrm{diag}(G_\\ell)_i-\\tau_\\ell^2\\approx a_4(\\psi_i+t_a/\\sqrt p)$).
`match_network` chooses the activations' parameters so that these four coefficients equal the
DEQ's CK coefficients.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .activations import AbstractActivation, Centred, HardTanh, LeakyReLU, gaussian_moments
from .gaussian import AbstractQuadrature, CompositeGaussLegendre
from .theory import DEQCoefficients, KernelCoefficients, SolveStatus, TheoryError

__all__ = [
    "ExplicitCoefficients",
    "explicit_coefficients",
    "ExplicitNetwork",
    "AbstractDesign",
    "TwoLayerLeakyReLU",
    "OneLayerHardTanh",
    "MatchResult",
    "match_network",
    "unmatched_activations",
]


@dataclass(frozen=True, kw_only=True)
class ExplicitCoefficients:
    """CK coefficients of an explicit network and its per-layer centring.

    Attributes
    ----------
    ck
        `KernelCoefficients` of $Y_L^\\top Y_L$.
    activations
        The layers' activations, centred at their input scales (``Centred``).
    scales
        $(\\tau_0,\\dots,\\tau_L)$.
    """

    ck: KernelCoefficients
    activations: tuple[Centred, ...]
    scales: tuple[float, ...]


def explicit_coefficients(activations: Sequence[AbstractActivation], tau0: float, *,
                          quadrature: AbstractQuadrature | None = None) -> ExplicitCoefficients:
    """The layer recursion of SPEC 6 for uncentred ``activations`` on data of scale ``tau0``.

    Examples
    --------
    >>> from deqppl.spectra import ReLU
    >>> e = explicit_coefficients([ReLU()], 1.0)
    >>> e.ck.c1, round(e.activations[0].shift, 6)  # (E relu')^2, E relu(xi)
    (0.25, 0.398942)
    """
    if isinstance(activations, AbstractActivation) or not isinstance(activations, Sequence) \
            or not activations:
        raise TypeError("activations must be a non-empty sequence of activations, one per layer")
    for i, act in enumerate(activations):
        if not isinstance(act, AbstractActivation) or isinstance(act, Centred):
            raise TypeError(f"activations[{i}] must be an uncentred activation (each layer is "
                            f"centred at its input scale), got {act!r}")
    if not isinstance(tau0, (int, float)) or isinstance(tau0, bool) or not tau0 > 0:
        raise ValueError(f"tau0 must be a number > 0, got {tau0!r}")
    quadrature = CompositeGaussLegendre() if quadrature is None else quadrature
    a1, a2, a3, a4 = 1.0, 0.0, 0.0, 1.0
    tau, scales, centred = float(tau0), [float(tau0)], []
    for act in activations:
        raw = gaussian_moments(act, tau, quadrature=quadrature)
        m = raw.shifted(raw.mean)
        a1, a2, a3, a4 = (m.g1 * a1, m.g1 * a2 + m.g2 * a4**2 / 4, m.g1 * a3 + m.g2 * a1**2 / 2,
                          m.g4 * a4 / 2)
        centred.append(Centred(base=act, shift=raw.mean))
        if not m.var > 0:
            raise TheoryError(f"{act!r} has zero variance at scale {tau:.4g}: the network is "
                              f"constant from this layer on")
        tau = math.sqrt(m.var)
        scales.append(tau)
    ck = KernelCoefficients(c1=a1, c2=a2, c3=a3, c0=tau**2 - a1 * tau0**2)
    return ExplicitCoefficients(ck=ck, activations=tuple(centred), scales=tuple(scales))


class ExplicitNetwork(nn.Module):
    """$Y_\\ell=\\sigma_\\ell(Y_{\\ell-1}W_\\ell^\\top)/\\sqrt m$ with frozen Gaussian weights, batched over draws.

    Parameters
    ----------
    activations
        Centred activations, one per layer (`ExplicitCoefficients.activations`).
    input_dim
        $p$.
    width
        $m$.
    num_draws
        $D$ independent weight draws held at once (buffers ``weight_l`` of shape ``(D, m, in)``).
    seed
        Seeds the weights.
    dtype
        Of the weights.

    Examples
    --------
    >>> import torch
    >>> from deqppl.spectra import ReLU
    >>> net = ExplicitNetwork(explicit_coefficients([ReLU(), ReLU()], 1.0).activations,
    ...                       input_dim=8, width=16, num_draws=2, seed=0)
    >>> net(torch.randn(5, 8, dtype=torch.float64)).shape
    torch.Size([2, 5, 16])
    """

    def __init__(self, activations: Sequence[Centred], *, input_dim: int, width: int,
                 num_draws: int = 1, seed: int = 0, dtype: torch.dtype = torch.float64):
        super().__init__()
        for name, value in (("input_dim", input_dim), ("width", width), ("num_draws", num_draws)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not activations or not all(isinstance(a, AbstractActivation) for a in activations):
            raise TypeError("activations must be a non-empty sequence of activations")
        self.activations = tuple(activations)
        self.width = width
        gen = torch.Generator().manual_seed(int(seed))
        fan_in = input_dim
        for layer in range(len(self.activations)):
            self.register_buffer(f"weight_{layer}", torch.randn(
                num_draws, width, fan_in, generator=gen, dtype=dtype))
            fan_in = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (n, p)`` -> features ``(D, n, m)``."""
        y = x.unsqueeze(0)
        root_m = math.sqrt(self.width)
        for layer, act in enumerate(self.activations):
            weight = getattr(self, f"weight_{layer}")
            y = act(torch.matmul(y, weight.transpose(1, 2))) / root_m
        return y

    def conjugate_kernel(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, n)`` $Y_L^\\top Y_L$ averaged over the draws."""
        y = self(x)
        return (y @ y.transpose(1, 2)).mean(0)


class AbstractDesign(abc.ABC):
    """A parametrised family of shallow networks to match a DEQ's CK; never instantiated."""

    #: Indices into $(c_1,c_2,c_3,c_0)$ that the design's unknowns are solved for.
    equations: tuple[int, ...]

    @property
    @abc.abstractmethod
    def num_layers(self) -> int:
        """Hidden layers of the network."""

    @abc.abstractmethod
    def activations(self, params: Sequence[float]) -> tuple[AbstractActivation, ...]:
        """The uncentred activations for the unknowns ``params``."""

    @abc.abstractmethod
    def initial_guesses(self) -> list[tuple[float, ...]]:
        """Starting points of the Newton solve, tried in order."""

    def canonical(self, params: Sequence[float]) -> tuple[float, ...]:
        """A representative of the parameters' symmetry class (default: unchanged)."""
        return tuple(float(p) for p in params)


@dataclass(frozen=True)
class TwoLayerLeakyReLU(AbstractDesign):
    """Two hidden layers of centred leaky ReLU $\\max(at,bt)-(a-b)\\tau/\\sqrt{2\\pi}$ (4 unknowns).

    SPEC 6's match for ReLU-DEQs. Unknowns $(a_1,b_1,a_2,b_2)$; $(a,b)$, $(b,a)$, $(-a,-b)$ give
    the same kernel (mirror and sign symmetries of Gaussian weights), so the solution is reported
    with $a\\ge b$ and $a+b\\ge0$.
    """

    equations: tuple[int, ...] = (0, 1, 2, 3)

    @property
    def num_layers(self):
        return 2

    def activations(self, params):
        a1, b1, a2, b2 = (float(p) for p in params)
        return (LeakyReLU(positive_slope=a1, negative_slope=b1),
                LeakyReLU(positive_slope=a2, negative_slope=b2))

    def initial_guesses(self):
        return [(1.0, 0.1, 1.0, 0.1), (1.0, -0.3, 1.0, 0.3), (1.0, 0.3, 1.0, -0.3),
                (0.8, 0.0, 1.2, 0.5), (1.5, -1.0, 0.5, 0.2), (0.5, 0.2, 1.5, -0.5)]

    def canonical(self, params):
        out = []
        for a, b in ((params[0], params[1]), (params[2], params[3])):
            a, b = max(a, b), min(a, b)
            if a + b < 0:
                a, b = -b, -a
            out += [float(a), float(b)]
        return tuple(out)


@dataclass(frozen=True)
class OneLayerHardTanh(AbstractDesign):
    """One hidden layer of hard tanh $a\\,\\mathrm{clip}(t,-c,c)$ (2 unknowns, $a$ and $c$).

    SPEC 6's match for tanh-DEQs. Hard tanh is odd, so $c_2=c_3=0$: the unknowns are solved for
    $c_1$ and $c_0$; against a DEQ with $c_2,c_3\\neq0$ the residual shows the mismatch.
    """

    equations: tuple[int, ...] = (0, 3)

    @property
    def num_layers(self):
        return 1

    def activations(self, params):
        a, c = (float(p) for p in params)
        return (HardTanh(gain=a, clip=abs(c) if c != 0 else 1e-12),)

    def initial_guesses(self):
        return [(1.0, 1.0), (1.5, 0.5), (0.7, 2.0), (3.0, 0.2)]

    def canonical(self, params):
        return (abs(float(params[0])), abs(float(params[1])))


@dataclass(frozen=True, kw_only=True, eq=False)
class MatchResult:
    """The shallow network whose CK coefficients match a DEQ's.

    Attributes
    ----------
    design
        The `AbstractDesign`.
    params
        The solved unknowns (canonical representative).
    explicit
        `ExplicitCoefficients` of the matched network (its centred activations and scales).
    target
        The DEQ's CK `KernelCoefficients`.
    residual
        ``(4,)`` float64: achieved minus target $(c_1,c_2,c_3,c_0)$, all four equations.
    status
        `SolveStatus` of the Newton solve.
    num_steps
        Newton steps of the successful start (or of the best start when none succeeded).
    tau0
        $\\tau_0$ of the data the network was matched on (its centrings depend on it).
    """

    design: AbstractDesign
    params: tuple[float, ...]
    explicit: ExplicitCoefficients
    target: KernelCoefficients
    residual: torch.Tensor
    status: SolveStatus
    num_steps: int
    tau0: float

    @property
    def max_residual(self) -> float:
        return float(self.residual.abs().max())

    def network(self, *, input_dim: int, width: int, num_draws: int = 1, seed: int = 0,
                dtype: torch.dtype = torch.float64) -> ExplicitNetwork:
        """The matched network with frozen random weights."""
        return ExplicitNetwork(self.explicit.activations, input_dim=input_dim, width=width,
                               num_draws=num_draws, seed=seed, dtype=dtype)


def _newton(fun, x0, *, tol, max_steps):
    """Newton's method with central-difference Jacobians and backtracking on $\\lVert r\\rVert$."""
    x = torch.tensor(x0, dtype=torch.float64)
    r = fun(x)
    for step in range(1, max_steps + 1):
        if float(r.abs().max()) <= tol:
            return x, r, SolveStatus.CONVERGED, step - 1
        h = 1e-6 * torch.clamp(x.abs(), min=1.0)
        J = torch.stack([(fun(x + h[k] * e) - fun(x - h[k] * e)) / (2 * h[k])
                         for k, e in enumerate(torch.eye(x.numel(), dtype=torch.float64))], dim=1)
        try:
            dx = torch.linalg.lstsq(J, -r[:, None]).solution[:, 0]
        except RuntimeError:
            return x, r, SolveStatus.DIVERGED, step
        lam, norm = 1.0, float(r.norm())
        while lam > 1e-6:
            try:
                r_new = fun(x + lam * dx)
            except (TheoryError, ValueError):
                r_new = None
            if r_new is not None and bool(torch.isfinite(r_new).all()) and \
                    float(r_new.norm()) < norm:
                break
            lam /= 2
        else:
            return x, r, SolveStatus.DIVERGED, step
        x, r = x + lam * dx, r_new
    status = SolveStatus.CONVERGED if float(r.abs().max()) <= tol else SolveStatus.MAX_STEPS_REACHED
    return x, r, status, max_steps


def match_network(coefficients: DEQCoefficients, design: AbstractDesign, *, tol: float = 1e-12,
                  max_steps: int = 60, throw: bool = True) -> MatchResult:
    """Solve for the shallow network of ``design`` whose CK coefficients equal the DEQ's.

    Parameters
    ----------
    coefficients
        The DEQ's `DEQCoefficients` (its ``ck`` and ``tau0`` are used).
    design
        `TwoLayerLeakyReLU` (ReLU-DEQs) or `OneLayerHardTanh` (tanh-DEQs), or any design.
    tol
        Newton stops when the design's equations hold to ``tol`` (absolute).
    max_steps
        Newton steps per starting point.
    throw
        Raise `TheoryError` if no starting point reaches ``tol`` on the design's equations.

    Returns
    -------
    MatchResult
        With the residual of all four equations (the design's and the others).

    Examples
    --------
    >>> from deqppl.spectra import RandomDEQ, ReLU, solve_coefficients
    >>> deq = solve_coefficients(RandomDEQ(activation=ReLU()), 1.0)
    >>> match = match_network(deq, TwoLayerLeakyReLU())
    >>> match.status.name, match.max_residual < 1e-8
    ('CONVERGED', True)
    """
    if not isinstance(coefficients, DEQCoefficients):
        raise TypeError(f"coefficients must be DEQCoefficients, got {type(coefficients).__name__}")
    if not isinstance(design, AbstractDesign):
        raise TypeError(f"design must be a design such as TwoLayerLeakyReLU(), got {design!r}")
    target = coefficients.ck.as_tensor()
    eqs = list(design.equations)
    tau0, quad = coefficients.tau0, coefficients.deq.quadrature

    def full_residual(params):
        e = explicit_coefficients(design.activations([float(v) for v in params]), tau0,
                                  quadrature=quad)
        return e.ck.as_tensor() - target

    def residual(params):
        return full_residual(params)[eqs]

    best = None
    for guess in design.initial_guesses():
        try:
            x, r, status, steps = _newton(residual, guess, tol=tol, max_steps=max_steps)
        except (TheoryError, ValueError):
            continue
        if best is None or float(r.abs().max()) < float(best[1].abs().max()):
            best = (x, r, status, steps)
        if status is SolveStatus.CONVERGED:
            break
    if best is None:
        raise TheoryError(f"{type(design).__name__}: every starting point failed")
    x, r, status, steps = best
    params = design.canonical([float(v) for v in x])
    explicit = explicit_coefficients(design.activations(params), tau0, quadrature=quad)
    full = explicit.ck.as_tensor() - target
    if throw and status is not SolveStatus.CONVERGED:
        raise TheoryError(f"{type(design).__name__} found no network matching the DEQ's CK: best "
                          f"residual {float(r.abs().max()):.3g} on its equations after {steps} "
                          f"Newton steps (status {status.name}); the design may not reach these "
                          f"coefficients (e.g. hard tanh cannot produce c2, c3 != 0)")
    return MatchResult(design=design, params=params, explicit=explicit, target=coefficients.ck,
                       residual=full, status=status, num_steps=steps, tau0=tau0)


def unmatched_activations(coefficients: DEQCoefficients,
                          design: AbstractDesign) -> tuple[AbstractActivation, ...]:
    """The unmatched baseline: ``design.num_layers`` layers of the DEQ's own activation.

    For a ReLU-DEQ and `TwoLayerLeakyReLU` this is two centred ReLU layers; for a tanh-DEQ and
    `OneLayerHardTanh`, one tanh layer (the explicit baselines of Ling et al., 2024, ICML).
    """
    return (coefficients.deq.activation,) * design.num_layers
