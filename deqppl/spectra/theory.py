"""The four equations of SPEC 6 and the predicted implicit CK $\\bar G$ and NTK $\\bar\\Theta$.

A random DEQ $z\\leftarrow\\frac1{\\sqrt m}\\phi(\\sigma_aAz+\\sigma_bBx)$ with $A,B$ iid
$\\mathcal N(0,1)$ and centred $\\phi$ has, on high-dimensional Gaussian-mixture data, a conjugate
kernel $G^*=Z^{*\\top}Z^*$ close in operator norm to

$$\\bar G=c_1X^\\top X+V\\begin{bmatrix}c_2tt^\\top+c_3T&c_2t\\\\c_2t^\\top&c_2\\end{bmatrix}V^\\top+c_0I,$$

a `KernelCoefficients` $(c_1,c_2,c_3,c_0)$ found from four scalar equations (`solve_coefficients`);
the implicit NTK has the same form with other coefficients (derivation in docs/spectra.md).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import torch

from .activations import AbstractActivation, Centred, gaussian_moments
from .gaussian import AbstractQuadrature, CompositeGaussLegendre, GaussianMoments
from .mixture import MixtureStatistics

__all__ = [
    "RandomDEQ",
    "KernelCoefficients",
    "DEQCoefficients",
    "KernelPrediction",
    "SolveStatus",
    "TheoryError",
    "solve_coefficients",
    "assemble_kernel",
    "predict_kernels",
]

#: The variances must sum to one up to rounding of decimal inputs such as 0.2 + 0.8.
_SUM_TOL = 1e-9


class SolveStatus(enum.Enum):
    """Outcome of a scalar or small nonlinear solve in `deqppl.spectra`."""

    CONVERGED = "converged"
    MAX_STEPS_REACHED = "max_steps_reached"
    DIVERGED = "diverged"


class TheoryError(RuntimeError):
    """A solve of the kernel theory failed (no $\\tau_*$, or no matching network)."""


def _check_real(owner, name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{owner}.{name} must be a finite real number, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class RandomDEQ:
    """The distribution of a random DEQ of SPEC 6 (any width): activation and weight variances.

    Parameters
    ----------
    activation
        $\\phi$ before centring (`solve_coefficients` centres it at $\\tau_*$).
    var_a
        $\\sigma_a^2 > 0$, variance scale of the recurrent weights.
    var_b
        $\\sigma_b^2 > 0$ of the input weights; $\\sigma_a^2+\\sigma_b^2=1$.
    quadrature
        For activations without closed-form moments.

    Examples
    --------
    >>> from deqppl.spectra import ReLU
    >>> RandomDEQ(activation=ReLU(), var_a=0.2, var_b=0.8).var_a
    0.2
    """

    activation: AbstractActivation
    var_a: float = 0.2
    var_b: float = 0.8
    quadrature: AbstractQuadrature = field(default_factory=CompositeGaussLegendre)

    def __post_init__(self):
        if not isinstance(self.activation, AbstractActivation):
            raise TypeError(f"RandomDEQ.activation must be an activation such as ReLU(), got "
                            f"{self.activation!r}")
        if isinstance(self.activation, Centred):
            raise TypeError("RandomDEQ.activation must be uncentred: the theory centres it at "
                            "tau_* itself")
        if not isinstance(self.quadrature, AbstractQuadrature):
            raise TypeError(f"RandomDEQ.quadrature must be a quadrature object, got "
                            f"{self.quadrature!r}")
        for name in ("var_a", "var_b"):
            _check_real("RandomDEQ", name, getattr(self, name))
            if getattr(self, name) <= 0:
                raise ValueError(f"RandomDEQ.{name} must be > 0, got {getattr(self, name)!r}")
        total = self.var_a + self.var_b
        if abs(total - 1.0) > _SUM_TOL:
            raise ValueError(f"RandomDEQ: var_a + var_b must equal 1 (SPEC 6), got "
                             f"{self.var_a!r} + {self.var_b!r} = {total!r}")

    def moments(self, scale: float) -> GaussianMoments:
        """Gaussian moments of the uncentred activation at ``scale``."""
        return gaussian_moments(self.activation, scale, quadrature=self.quadrature)


@dataclass(frozen=True, kw_only=True)
class KernelCoefficients:
    """$(c_1,c_2,c_3,c_0)$ of $c_1X^\\top X+V M(c_2,c_3)V^\\top+c_0I$ (see the module docstring).

    For a kernel whose diagonal is $d$ (the variance of a unit), $c_0=d-c_1\\tau_0^2$.
    """

    c1: float
    c2: float
    c3: float
    c0: float

    def as_tensor(self) -> torch.Tensor:
        """``(4,)`` float64 ``[c1, c2, c3, c0]``."""
        return torch.tensor([self.c1, self.c2, self.c3, self.c0], dtype=torch.float64)


@dataclass(frozen=True, kw_only=True)
class DEQCoefficients:
    """Solution of the four equations of SPEC 6 and the NTK coefficients.

    Attributes
    ----------
    deq
        The `RandomDEQ`.
    tau0
        $\\tau_0$ of the data.
    tau
        $\\tau_*$, root of $\\tau^2=\\sigma_a^2\\mathrm{Var}\\phi(\\tau\\xi)+\\sigma_b^2\\tau_0^2$.
    activation
        The centred activation $\\phi-\\mathbb E\\phi(\\tau_*\\xi)$ the DEQ must use.
    moments
        `GaussianMoments` of the centred activation at $\\tau_*$.
    alpha1, alpha2, alpha3, alpha4
        The coefficients of $\\bar K$ (SPEC 6).
    kappa2
        $\\kappa^2=\\mathrm{Var}\\phi/(1-\\sigma_a^2\\mathbb E\\phi'^2)$, the NTK's diagonal.
    ck
        `KernelCoefficients` of $\\bar G=(\\bar K-\\sigma_b^2X^\\top X)/\\sigma_a^2$.
    ntk
        `KernelCoefficients` of $\\bar\\Theta$ (docs/spectra.md).
    status, num_steps, residual
        Of the scalar solve for $\\tau_*^2$ (``residual`` = $|F(\\tau_*^2)|$).
    """

    deq: RandomDEQ
    tau0: float
    tau: float
    activation: Centred
    moments: GaussianMoments
    alpha1: float
    alpha2: float
    alpha3: float
    alpha4: float
    kappa2: float
    ck: KernelCoefficients
    ntk: KernelCoefficients
    status: SolveStatus
    num_steps: int
    residual: float


def _solve_tau_sq(deq: RandomDEQ, tau0: float, *, rtol: float, max_steps: int):
    """$s=\\tau_*^2$ by fixed-point iteration of $s\\mapsto\\sigma_a^2\\mathrm{Var}\\phi(\\sqrt s\\xi)
    +\\sigma_b^2\\tau_0^2$ from $s_0=\\sigma_b^2\\tau_0^2$ with Aitken's $\\Delta^2$ every third step.

    The map's slope is $\\sigma_a^2\\,\\partial_s\\mathrm{Var}$, below $\\sigma_a^2$ for 1-Lipschitz
    $\\phi$, so plain iteration converges linearly; Aitken's step makes it superlinear.
    """
    base = deq.var_b * tau0**2

    def g(s):
        return deq.var_a * deq.moments(math.sqrt(s)).var + base

    s = base
    for step in range(1, max_steps + 1):
        s1 = g(s)
        s2 = g(s1)
        denom = s2 - 2.0 * s1 + s
        s_new = s2 - (s2 - s1) ** 2 / denom if denom != 0.0 and abs(denom) > 1e-300 else s2
        if not math.isfinite(s_new) or s_new <= 0:
            s_new = s2  # Aitken overshoot: keep the plain iterate
        if not math.isfinite(s_new) or s_new > 1e12 * max(base, 1e-300):
            return s_new, SolveStatus.DIVERGED, step
        if abs(s_new - s) <= rtol * s_new:
            return s_new, SolveStatus.CONVERGED, step
        s = s_new
    return s, SolveStatus.MAX_STEPS_REACHED, max_steps


def solve_coefficients(deq: RandomDEQ, tau0: float, *, rtol: float = 1e-14,
                       max_steps: int = 200, throw: bool = True) -> DEQCoefficients:
    """Solve the four equations of SPEC 6 for $(\\tau_*,\\alpha_1,\\alpha_2,\\alpha_3)$.

    With $g_1=(\\mathbb E\\phi')^2$, $g_2=(\\mathbb E\\phi'')^2$, $g_4=\\mathbb E(\\phi^2)''$ of the
    centred $\\phi$ at $\\tau_*$:
    $\\alpha_1=\\sigma_b^2/(1-\\sigma_a^2g_1)$, $\\alpha_4=\\sigma_b^2/(1-\\sigma_a^2g_4/2)$,
    $\\alpha_2=\\sigma_a^2g_2\\alpha_4^2/(4(1-\\sigma_a^2g_1))$,
    $\\alpha_3=\\sigma_a^2g_2\\alpha_1^2/(2(1-\\sigma_a^2g_1))$.
    The CK coefficients are $c_1=(\\alpha_1-\\sigma_b^2)/\\sigma_a^2$, $c_2=\\alpha_2/\\sigma_a^2$,
    $c_3=\\alpha_3/\\sigma_a^2$, $c_0=\\mathrm{Var}\\phi-c_1\\tau_0^2$; the NTK's, with
    $\\dot g=\\sigma_a^2g_1$: $\\beta_1=c_1/(1-\\dot g)$, $\\beta_2=c_2/(1-\\dot g)$,
    $\\beta_3=c_3/(1-\\dot g)+\\sigma_a^2g_1g_2\\alpha_1^2/(1-\\dot g)^2$, $\\beta_0=\\kappa^2-\\beta_1\\tau_0^2$.

    Parameters
    ----------
    deq
        The `RandomDEQ`.
    tau0
        $\\tau_0>0$ of the data (`MixtureStatistics.tau0`).
    rtol, max_steps
        Of the scalar solve for $\\tau_*^2$.
    throw
        Raise `TheoryError` if that solve fails; ``False`` records it in ``status``.

    Raises
    ------
    TheoryError
        If $\\tau_*$ is not found, or $1-\\sigma_a^2g_1$, $1-\\sigma_a^2g_4/2$ or
        $1-\\sigma_a^2\\mathbb E\\phi'^2$ is not positive (no stable kernel fixed point).

    Examples
    --------
    >>> from deqppl.spectra import ReLU, Tanh
    >>> c = solve_coefficients(RandomDEQ(activation=ReLU(), var_a=0.2, var_b=0.8), 1.0)
    >>> round(c.alpha1, 6)  # 0.8 / (1 - 0.2 / 4)
    0.842105
    >>> t = solve_coefficients(RandomDEQ(activation=Tanh()), 1.0)
    >>> abs(t.alpha2) < 1e-14 and abs(t.alpha3) < 1e-14
    True
    """
    if not isinstance(deq, RandomDEQ):
        raise TypeError(f"deq must be a RandomDEQ, got {type(deq).__name__}")
    if isinstance(tau0, bool) or not isinstance(tau0, (int, float)) or not math.isfinite(tau0) \
            or tau0 <= 0:
        raise ValueError(f"tau0 must be a finite number > 0 (the root mean squared norm of the "
                         f"data), got {tau0!r}")
    tau0 = float(tau0)
    s, status, steps = _solve_tau_sq(deq, tau0, rtol=rtol, max_steps=max_steps)
    if status is not SolveStatus.CONVERGED:
        message = (f"no tau_* for {deq.activation!r} with var_a = {deq.var_a}: the iteration "
                   f"tau^2 <- var_a Var phi(tau xi) + var_b tau0^2 {status.value} after {steps} "
                   f"steps (tau^2 = {s:.4g}); an activation growing faster than linearly may have "
                   f"no fixed point, try a smaller var_a")
        if throw:
            raise TheoryError(message)
        s = s if math.isfinite(s) and s > 0 else deq.var_b * tau0**2
    tau = math.sqrt(s)
    base = deq.moments(tau)
    phi = Centred(base=deq.activation, shift=base.mean)
    mom = base.shifted(base.mean)
    residual = abs(s - deq.var_a * mom.var - deq.var_b * tau0**2)
    va, vb = deq.var_a, deq.var_b
    for name, value in (("1 - var_a g1", 1.0 - va * mom.g1),
                        ("1 - var_a g4 / 2", 1.0 - va * mom.g4 / 2.0),
                        ("1 - var_a E phi'^2", 1.0 - va * mom.d1_sq)):
        if not value > 0:
            raise TheoryError(f"{name} = {value:.4g} <= 0 for {deq.activation!r} with var_a = "
                              f"{va}: the kernel fixed point of SPEC 6 is not stable; use a "
                              f"smaller var_a")
    gdot = va * mom.g1
    alpha1 = vb / (1.0 - gdot)
    alpha4 = vb / (1.0 - va * mom.g4 / 2.0)
    alpha2 = va * mom.g2 * alpha4**2 / (4.0 * (1.0 - gdot))
    alpha3 = va * mom.g2 * alpha1**2 / (2.0 * (1.0 - gdot))
    kappa2 = mom.var / (1.0 - va * mom.d1_sq)
    c1, c2, c3 = (alpha1 - vb) / va, alpha2 / va, alpha3 / va
    ck = KernelCoefficients(c1=c1, c2=c2, c3=c3, c0=mom.var - c1 * tau0**2)
    b1 = c1 / (1.0 - gdot)
    b3 = c3 / (1.0 - gdot) + va * mom.g1 * mom.g2 * alpha1**2 / (1.0 - gdot) ** 2
    ntk = KernelCoefficients(c1=b1, c2=c2 / (1.0 - gdot), c3=b3, c0=kappa2 - b1 * tau0**2)
    return DEQCoefficients(
        deq=deq, tau0=tau0, tau=tau, activation=phi, moments=mom, alpha1=alpha1, alpha2=alpha2,
        alpha3=alpha3, alpha4=alpha4, kappa2=kappa2, ck=ck, ntk=ntk, status=status,
        num_steps=steps, residual=residual)


def assemble_kernel(coefficients: KernelCoefficients, stats: MixtureStatistics) -> torch.Tensor:
    """``(n, n)`` $c_1X^\\top X+V M V^\\top+c_0I$ with $M=\\begin{bmatrix}c_2tt^\\top+c_3S&c_2t
    \\\\c_2t^\\top&c_2\\end{bmatrix}$, in the dtype of the data.

    SPEC 6 writes $T$ where this uses $S$ (`MixtureStatistics.S`, the class means of
    $p(x_i^\\top x_j)^2$; *derived*): $S=T+T_0\\mathbf 1\\mathbf 1^\\top+O(p^{-1/2})$ restores the
    terms of $(x_i^\\top x_j)^2$ that $T$ drops.

    Examples
    --------
    >>> from deqppl.spectra import two_class_mixture
    >>> mix = two_class_mixture(64)
    >>> stats = mix.statistics(mix.sample(64, seed=0))
    >>> K = assemble_kernel(KernelCoefficients(c1=1.0, c2=0.0, c3=0.0, c0=0.0), stats)
    >>> bool(torch.allclose(K, stats.gram))
    True
    """
    if not isinstance(coefficients, KernelCoefficients):
        raise TypeError(f"coefficients must be KernelCoefficients, got "
                        f"{type(coefficients).__name__}")
    if not isinstance(stats, MixtureStatistics):
        raise TypeError(f"stats must be MixtureStatistics, got {type(stats).__name__}")
    t = stats.t[:, None]
    top = torch.cat([coefficients.c2 * (t @ t.T) + coefficients.c3 * stats.S,
                     coefficients.c2 * t], dim=1)
    bottom = torch.cat([coefficients.c2 * t.T,
                        torch.full((1, 1), coefficients.c2, dtype=t.dtype, device=t.device)],
                       dim=1)
    M = torch.cat([top, bottom], dim=0)
    eye = torch.eye(stats.num_data, dtype=stats.x.dtype, device=stats.x.device)
    return coefficients.c1 * stats.gram + stats.V @ M @ stats.V.T + coefficients.c0 * eye


@dataclass(frozen=True, kw_only=True, eq=False)
class KernelPrediction:
    """Predicted implicit kernels of a `RandomDEQ` on given data.

    Attributes
    ----------
    ck
        ``(n, n)`` $\\bar G$.
    ntk
        ``(n, n)`` $\\bar\\Theta$.
    coefficients
        The `DEQCoefficients` behind them.
    """

    ck: torch.Tensor
    ntk: torch.Tensor
    coefficients: DEQCoefficients


def predict_kernels(deq: RandomDEQ, stats: MixtureStatistics) -> KernelPrediction:
    """$\\bar G$ and $\\bar\\Theta$ of ``deq`` on the data of ``stats`` (SPEC 6).

    Examples
    --------
    >>> from deqppl.spectra import ReLU, two_class_mixture
    >>> mix = two_class_mixture(128)
    >>> stats = mix.statistics(mix.sample(102, seed=0))
    >>> pred = predict_kernels(RandomDEQ(activation=ReLU()), stats)
    >>> pred.ck.shape, bool(torch.allclose(pred.ck, pred.ck.T))
    (torch.Size([102, 102]), True)
    """
    coefficients = solve_coefficients(deq, stats.tau0)
    return KernelPrediction(ck=assemble_kernel(coefficients.ck, stats),
                            ntk=assemble_kernel(coefficients.ntk, stats),
                            coefficients=coefficients)
