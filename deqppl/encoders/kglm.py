r"""Kernel GLMs are DEQs: closed-form weights, initialisations, layer and encoder (SPEC §4).

The RKHS-penalised exponential-family fit
$\hat f=\arg\min_f\sum_i[A(f(x_i))-T(y_i)f(x_i)]+\tfrac\lambda2\lVert f\rVert_{\mathcal H}^2$ has,
by the representer theorem, fitted means $z=A'(K\alpha)$ that solve the DEQ
$$z=\sigma(Wz+U\,T(y)+b),\qquad W=-K/\lambda,\ U=K/\lambda,\ b=0,\ \sigma=A'$$
(Tsuchida, Ong et al., 2022, ICLR). Predictions at new inputs use the head
$\eta^*=K_*(T(y)-z)/\lambda$, mean $\sigma(\eta^*)$.

This module holds the construction once (:func:`kglm_weights`, :func:`head_weights`), the
checks of a user's kernel matrix (:func:`check_kernel_matrix`), a functional solve
(:func:`solve_kglm`), the initialisation objects (:class:`Informed`, :class:`Naive`,
:class:`Random`), a trainable layer (:class:`KGLMLayer`) and the encoder of the protocol for
:class:`deqppl.models.kernel_glm.KernelGLM`-like models (:class:`KernelGLMEncoder`).

Examples
--------
>>> import torch
>>> from deqppl.expfam import gaussian
>>> from deqppl.kernels import SquaredExponential
>>> x = torch.linspace(-2, 2, 30, dtype=torch.float64)
>>> y = torch.sin(2 * x)
>>> K = SquaredExponential(lengthscale=0.5)(x)
>>> fit = solve_kglm(gaussian(), K, y, lam=0.1)
>>> krr = K @ torch.linalg.solve(K + 0.1 * torch.eye(30, dtype=torch.float64), y)
>>> bool(torch.allclose(fit.mean, krr, atol=1e-10)), fit.solution.solver
(True, 'NewtonGMRES')
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import nn

from deqppl.deq import (
    GMRES,
    AbstractAdjoint,
    AbstractSolver,
    Anderson,
    LinearProblem,
    Newton,
    Solution,
    backtracking_line_search,
    check_int,
    check_real,
    fixed_point,
)
from deqppl.expfam import ExpFamily
from deqppl.kernels import AbstractKernel, SquaredExponential
from deqppl.validation import as_tensor, check_finite

from .base import AbstractMAPEncoder, default_rtol

__all__ = [
    "DEQWeights",
    "HeadWeights",
    "Informed",
    "Naive",
    "Random",
    "AbstractInitialization",
    "ConvKGLMLayer",
    "conv_spectral_norm",
    "kernel_stencil",
    "KGLMFit",
    "KGLMLayer",
    "KernelGLMEncoder",
    "NewtonGMRES",
    "check_kernel_matrix",
    "check_lam",
    "default_kglm_solver",
    "head_weights",
    "kglm_weights",
    "laplace_log_marginal",
    "solve_kglm",
    "spectral_norm",
]


# --------------------------------------------------------------------------------------------
# the closed-form construction (the one source of truth; the zoo's KernelGLM calls it)
# --------------------------------------------------------------------------------------------
class DEQWeights(NamedTuple):
    r"""Closed-form weights of the DEQ $z=\sigma(Wz+U\,T(y)+b)$ whose fixed point is the kGLM fit.

    Attributes
    ----------
    W
        $-K/\lambda$, shape ``(n, n)``.
    U
        $K/\lambda$, shape ``(n, n)``, applied to $T(y)$.
    b
        Zeros, shape ``(n,)``.
    """

    W: torch.Tensor
    U: torch.Tensor
    b: torch.Tensor


class HeadWeights(NamedTuple):
    r"""Prediction head $\eta^*=W_*z+U_*T(y)+b_*$; closed form $W_*=-K_*/\lambda$, $U_*=K_*/\lambda$.

    Attributes
    ----------
    W, U
        Shape ``(m, n)``.
    b
        Zeros, shape ``(m,)``.
    """

    W: torch.Tensor
    U: torch.Tensor
    b: torch.Tensor


def check_lam(lam: object, name: str = "lam") -> None:
    """Raise ``ValueError`` unless ``lam`` is a positive finite number (or 0-dim tensor).

    Examples
    --------
    >>> check_lam(-1.0)
    Traceback (most recent call last):
    ...
    ValueError: lam must be a positive finite number (the RKHS penalty), got -1.0
    """
    if isinstance(lam, torch.Tensor):
        if lam.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(lam.shape)}")
        value = float(lam.detach())
    elif isinstance(lam, (int, float)) and not isinstance(lam, bool):
        value = float(lam)
    else:
        raise TypeError(f"{name} must be a positive number, got {lam!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number (the RKHS penalty), got {value}")


# Symmetry tolerance relative to max|K|: a kernel matrix computed from pairwise distances is
# symmetric up to a few ulps of its largest entry (the two triangles round differently).
_SYMMETRY_ULPS = 64.0
# PSD tolerance: rounding moves the eigenvalues of a computed dense K by about n eps ||K||
# (measured -3e-14 on a 400-point squared-exponential K in float64, -2e-5 in float32); a
# Cholesky factorisation of K + (tol * ||K||_inf) I exists iff lambda_min(K) > -tol ||K||_inf.
_PSD_ULPS = 16.0


def check_kernel_matrix(K: object, name: str = "K", *, psd: bool = True) -> torch.Tensor:
    r"""Return ``K`` as a tensor after checking it is a finite symmetric PSD ``(n, n)`` matrix.

    Round-off is allowed: asymmetry up to $64\varepsilon\max|K|$, eigenvalues down to
    $-16\,n\,\varepsilon\lVert K\rVert_\infty$ (checked by one Cholesky factorisation of the
    shifted matrix, $O(n^3/3)$; ``psd=False`` skips that factorisation).

    Raises
    ------
    TypeError
        If ``K`` is not numeric.
    ValueError
        If ``K`` is not square 2-D, has a non-finite entry, is not symmetric (naming the worst
        pair) or not positive semi-definite beyond round-off.

    Examples
    --------
    >>> check_kernel_matrix([[1.0, 2.0], [2.0, 1.0]])
    Traceback (most recent call last):
    ...
    ValueError: K is not positive semi-definite beyond round-off: ...
    """
    K = as_tensor(K, name)
    if K.dim() != 2 or K.shape[0] != K.shape[1] or K.shape[0] == 0:
        raise ValueError(f"{name} must be a square (n, n) matrix with n >= 1, got shape {tuple(K.shape)}")
    check_finite(K, name)
    eps = torch.finfo(K.dtype).eps
    scale = float(K.abs().max())
    asym = (K - K.T).abs()
    worst = float(asym.max())
    if worst > _SYMMETRY_ULPS * eps * max(scale, torch.finfo(K.dtype).tiny):
        i, j = divmod(int(torch.argmax(asym)), K.shape[0])
        raise ValueError(
            f"{name} is not symmetric: {name}[{i}, {j}] = {float(K[i, j])!r} but {name}[{j}, {i}] = "
            f"{float(K[j, i])!r} (largest asymmetry {worst:.3g}, allowed {_SYMMETRY_ULPS:g} eps "
            f"max|{name}| = {_SYMMETRY_ULPS * eps * scale:.3g}); a kernel matrix must be symmetric"
        )
    if not psd:
        return K
    n = K.shape[0]
    norm_inf = float(K.abs().sum(1).max())
    shift = _PSD_ULPS * n * eps * norm_inf + torch.finfo(K.dtype).tiny
    sym = 0.5 * (K + K.T)
    _, info = torch.linalg.cholesky_ex(sym + shift * torch.eye(n, dtype=K.dtype, device=K.device))
    if int(info) != 0:
        lo = float(torch.linalg.eigvalsh(sym)[0])
        raise ValueError(
            f"{name} is not positive semi-definite beyond round-off: its smallest eigenvalue is "
            f"{lo:.3g}, below the round-off allowance -{shift:.3g} (16 n eps ||{name}||_inf); a "
            f"kernel matrix must come from a positive-definite kernel"
        )
    return K


def kglm_weights(K: torch.Tensor, lam: float | torch.Tensor) -> DEQWeights:
    r"""The closed-form DEQ weights $W=-K/\lambda$, $U=K/\lambda$, $b=0$ (SPEC §4).

    Parameters
    ----------
    K
        Kernel matrix at the training inputs, ``(n, n)``; checked by the callers that take it
        from a user (:func:`solve_kglm`, :class:`KGLMLayer`), here only its shape.
    lam
        RKHS penalty $\lambda>0$ (a float, or a 0-dim tensor to differentiate through).

    Examples
    --------
    >>> kglm_weights(torch.eye(2), 2.0).W
    tensor([[-0.5000, -0.0000],
            [-0.0000, -0.5000]])
    """
    check_lam(lam)
    if K.dim() != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"K must be a square (n, n) matrix, got shape {tuple(K.shape)}")
    return DEQWeights(W=-K / lam, U=K / lam, b=torch.zeros_like(K[0]))


def head_weights(K_new: torch.Tensor, lam: float | torch.Tensor) -> HeadWeights:
    r"""Closed-form prediction head $W_*=-K_*/\lambda$, $U_*=K_*/\lambda$, $b_*=0$; ``K_new`` is ``(m, n)``."""
    check_lam(lam)
    if K_new.dim() != 2:
        raise ValueError(f"K_new must be an (m, n) matrix, got shape {tuple(K_new.shape)}")
    return HeadWeights(W=-K_new / lam, U=K_new / lam, b=torch.zeros_like(K_new[:, 0]))


def spectral_norm(K: torch.Tensor) -> float:
    r"""$\lVert K\rVert_2$ of a symmetric PSD matrix: its largest eigenvalue."""
    return float(torch.linalg.eigvalsh(0.5 * (K + K.T))[-1])


def _check_family(family: object) -> ExpFamily:
    if not isinstance(family, ExpFamily):
        raise TypeError(f"family must be a deqppl.expfam.ExpFamily, got {family!r}")
    if not family.domain.is_real_line:
        raise ValueError(
            f"a kernel GLM's natural parameter f = K alpha ranges over every real number; "
            f"{family.describe()} needs {family.domain_text}"
        )
    return family


def _check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# the fixed-point map and its Jacobian
# --------------------------------------------------------------------------------------------
def _kglm_map(z: torch.Tensor, W: torch.Tensor, c: torch.Tensor, family: ExpFamily) -> torch.Tensor:
    # z (B, n), W (n, n), c = U T(y) + b (B, n)
    return family.mean(z @ W.T + c)


def _kglm_jacobian(z: torch.Tensor, W: torch.Tensor, c: torch.Tensor, family: ExpFamily) -> torch.Tensor:
    # d/dz A'(W z + c) = diag(A''(eta)) W, per sample (B, n, n)
    eta = z @ W.T + c
    return family.variance(eta).unsqueeze(-1) * W


@dataclass(frozen=True, kw_only=True)
class NewtonGMRES(AbstractSolver):
    r"""Newton's method whose linear systems $(I-J)d=f(z)-z$ are solved by GMRES (Newton-Krylov).

    The Jacobian comes from the problem (``jacobian=`` of :func:`~deqppl.deq.fixed_point`); for
    the kGLM map it is $\mathrm{diag}(A''(\eta))W$, formed in $O(n^2)$, so each GMRES
    iteration is one batched matrix-vector product, $O(n^2)$, instead of the $O(n^3)$
    factorisation of :class:`~deqppl.deq.Newton`. Kernel matrices have fast-decaying spectra,
    so $I-J=I+VK/\lambda$ has clustered eigenvalues and GMRES needs few iterations
    (``benchmarks/bench_kglm.py``). Backtracking on $\lVert f(z)-z\rVert$ as ``Newton``. A
    non-finite GMRES direction falls back, per sample, to the fixed-point step.

    Parameters
    ----------
    restart, max_inner
        GMRES restart length and its largest number of iterations per Newton step.
    inner_rtol
        Relative residual of each linear solve; ``None``: ``rtol / 100`` (at least
        $64\varepsilon$), so that the outer tolerance is reached in the Newton regime.
    line_search, max_backtracks
        As :class:`~deqppl.deq.Newton`.
    rtol, atol, max_steps
        See :class:`~deqppl.deq.FixedPointIteration`.

    Examples
    --------
    >>> from deqppl.expfam import bernoulli
    >>> x = torch.linspace(-2, 2, 50, dtype=torch.float64)
    >>> K = SquaredExponential()(x)
    >>> fit = solve_kglm(bernoulli(), K, (x > 0).double(), lam=0.01, solver=NewtonGMRES(rtol=1e-12))
    >>> fit.converged, fit.solution.solver
    (True, 'NewtonGMRES')
    """

    restart: int = 50
    max_inner: int = 1000
    inner_rtol: float | None = None
    line_search: bool = True
    max_backtracks: int = 10
    rtol: float = 1e-10
    atol: float = 0.0
    max_steps: int = 100

    def __post_init__(self):
        self._check_common()
        check_int("restart", self.restart, minimum=1)
        check_int("max_inner", self.max_inner, minimum=1)
        if self.inner_rtol is not None:
            check_real("inner_rtol", self.inner_rtol, low=0.0, high=1.0, low_open=True, high_open=True)
        if not isinstance(self.line_search, bool):
            raise ValueError(f"line_search must be a bool, got {self.line_search!r}")
        check_int("max_backtracks", self.max_backtracks, minimum=1)

    def _hint(self) -> str:
        return ("Try a larger max_steps or max_inner, or Newton() (direct solves): GMRES stalls on "
                "very ill-conditioned systems (lam much smaller than ||K||).")

    def init(self, problem, z0, fz0):
        return None

    def step(self, problem, state, iterate):
        z, fz, r, active = iterate.z, iterate.fz, iterate.residual, iterate.active
        J = problem.jacobian(z)
        eps = torch.finfo(z.dtype).eps
        inner = self.inner_rtol if self.inner_rtol is not None else max(self.rtol * 1e-2, 64 * eps)
        lin = LinearProblem(lambda d: torch.bmm(J, d.unsqueeze(-1)).squeeze(-1), r, matrix=lambda: J)
        d = GMRES(rtol=inner, atol=0.0, restart=self.restart, max_steps=self.max_inner).solve(lin).value
        bad = ~torch.isfinite(d).all(-1)
        d = torch.where(bad[:, None], r, d)
        z_new, fz_new, _, _ = backtracking_line_search(
            problem, z, fz, d, active, line_search=self.line_search,
            max_backtracks=self.max_backtracks, armijo=1e-4)
        return z_new, fz_new, state


def default_kglm_solver(dtype: torch.dtype) -> AbstractSolver:
    r"""Default solver of the coupled $n$-dimensional kGLM fixed point: :class:`NewtonGMRES`.

    Chosen by measurement for $n$ from 100 to 5 000 (``benchmarks/bench_kglm.py``, table in
    docs/kglm.md): Newton with direct solves costs $O(n^3)$ per step (2.5-5x slower at
    $n=5000$); Anderson's step count grows with the conditioning of $I+K/\lambda$ (88-103 steps
    on the Gaussian family at $\lambda=0.01\lVert K\rVert$, where Newton-GMRES was up to 2.3x
    faster) although it was 1.2-2.2x faster on the Bernoulli rows (7-65 steps). Newton-GMRES
    takes Newton's 1-8 steps at $O(n^2)$ per inner iteration whether or not plain iteration
    contracts. The tolerance is :func:`~deqppl.encoders.default_rtol` divided by 100 so that
    the fitted means are accurate to about 1e-8 absolute in float64. For batches of many small
    independent problems (training) pass ``Anderson`` (measured faster there).
    """
    return NewtonGMRES(rtol=default_rtol(dtype) * 1e-2, atol=0.0, max_steps=100)


# --------------------------------------------------------------------------------------------
# functional solve
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KGLMFit:
    r"""Result of :func:`solve_kglm`.

    Attributes
    ----------
    mean
        Fitted means $z=A'(f)$ at the training inputs, ``(n,)``.
    natural
        Natural parameters $f=W z+U\,T(y)=K\alpha$, ``(n,)``.
    alpha
        Representer weights $\alpha=(T(y)-z)/\lambda$, ``(n,)``.
    prediction
        Predicted means $\sigma(\eta^*)$ at the new inputs, ``(m,)``, or ``None``.
    prediction_natural
        $\eta^*=K_*\alpha$, ``(m,)``, or ``None``.
    solution
        The fixed-point :class:`~deqppl.deq.Solution` (solver name, steps, residual, status).
    """

    mean: torch.Tensor
    natural: torch.Tensor
    alpha: torch.Tensor
    prediction: torch.Tensor | None
    prediction_natural: torch.Tensor | None
    solution: Solution

    @property
    def converged(self) -> bool:
        """Whether the fixed-point solve converged."""
        return bool(self.solution.converged.all())


def solve_kglm(
    family: ExpFamily,
    K: object,
    y: object,
    *,
    lam: float,
    K_new: object | None = None,
    solver: AbstractSolver | None = None,
    adjoint: AbstractAdjoint | None = None,
    z0: torch.Tensor | None = None,
    throw: bool = True,
    check_psd: bool = True,
) -> KGLMFit:
    r"""Fit a kernel GLM by solving its DEQ $z=A'(-Kz/\lambda+K\,T(y)/\lambda)$.

    Parameters
    ----------
    family
        Exponential family of $y$ (canonical link, any real natural parameter).
    K
        Kernel matrix at the training inputs, ``(n, n)``, symmetric PSD.
    y
        Observations, ``(n,)``, inside the family's support.
    lam
        RKHS penalty $\lambda>0$.
    K_new
        Optional cross-kernel $K_*=[k(x^*_a,x_j)]$, ``(m, n)``, for predictions.
    solver
        Forward solver; default :func:`default_kglm_solver`.
    adjoint
        Gradient strategy (default: the DEQ core's implicit adjoint).
    z0
        Start ``(n,)``; default $A'(0)$ (the fit with $\alpha=0$).
    throw
        Raise :class:`~deqppl.deq.ConvergenceError` if the solve fails.
    check_psd
        Certify that ``K`` is positive semi-definite beyond round-off (one Cholesky
        factorisation, $n^3/3$ flops: about half the cost of the solve itself at $n\ge1000$).
        ``False`` only for a ``K`` that is PSD by construction (the matrix of a
        :mod:`deqppl.kernels` kernel); finiteness, symmetry and shapes are always checked.

    Raises
    ------
    TypeError, ValueError
        Bad family, kernel matrix (:func:`check_kernel_matrix`), ``lam``, labels outside the
        support, or mismatched shapes of ``K``, ``y``, ``K_new`` -- all before any solve.
    """
    family = _check_family(family)
    check_lam(lam)
    if not isinstance(check_psd, bool):
        raise TypeError(f"check_psd must be True or False, got {check_psd!r}")
    K = check_kernel_matrix(K, "K", psd=check_psd)
    n = K.shape[0]
    y = as_tensor(y, "y", dtype=K.dtype, device=K.device)
    if y.shape != (n,):
        raise ValueError(f"y must have shape ({n},) to match K of shape {tuple(K.shape)}, got {tuple(y.shape)}")
    y = family.validate(y.unsqueeze(-1), "y").squeeze(-1)
    if K_new is not None:
        K_new = as_tensor(K_new, "K_new", dtype=K.dtype, device=K.device)
        if K_new.dim() != 2 or K_new.shape[1] != n:
            raise ValueError(
                f"K_new must have shape (m, {n}) (one column per training point of K), got {tuple(K_new.shape)}"
            )
        check_finite(K_new, "K_new")
    if z0 is None:
        z0 = family.mean(torch.zeros(1, n, dtype=K.dtype, device=K.device))
    else:
        z0 = as_tensor(z0, "z0", dtype=K.dtype).reshape(1, -1)
        if z0.shape != (1, n):
            raise ValueError(f"z0 must have shape ({n},), got {tuple(z0.shape)}")
        check_finite(z0, "z0")
    W, U, b = kglm_weights(K, lam)
    Ty = family.T(y)
    c = (Ty @ U.T + b).unsqueeze(0)
    sol = fixed_point(
        lambda z: _kglm_map(z, W, c, family),
        z0,
        solver=solver or default_kglm_solver(K.dtype),
        adjoint=adjoint,
        jacobian=lambda z: _kglm_jacobian(z, W, c, family),
        throw=throw,
    )
    z = sol.value[0]
    natural = W @ z + c[0]
    alpha = (Ty - z) / lam
    pred = pred_nat = None
    if K_new is not None:
        Wh, Uh, bh = head_weights(K_new, lam)
        pred_nat = Wh @ z + Uh @ Ty + bh
        pred = family.mean(pred_nat)
    return KGLMFit(mean=z, natural=natural, alpha=alpha, prediction=pred,
                   prediction_natural=pred_nat, solution=sol)


# --------------------------------------------------------------------------------------------
# initialisations (objects, not strings)
# --------------------------------------------------------------------------------------------
class AbstractInitialization(abc.ABC):
    """How a :class:`KGLMLayer` sets its weights. Never instantiated."""

    @abc.abstractmethod
    def weights(
        self, x: torch.Tensor, x_new: torch.Tensor | None, *, generator: torch.Generator
    ) -> tuple[DEQWeights, HeadWeights | None]:
        """Weights ``(n, n)`` and the head ``(m, n)`` (``None`` without ``x_new``)."""


@dataclass(frozen=True)
class Informed(AbstractInitialization):
    r"""Closed-form kGLM weights from a kernel, $\lambda=s\lVert K\rVert_2$ (SPEC §4).

    Parameters
    ----------
    kernel
        A kernel of :mod:`deqppl.kernels`.
    s
        Scale of the penalty. Plain iteration contracts when $s>\mathrm{Lip}(A')$, so per
        family: Gaussian (Lip 1) $s=1$ is the paper's regression choice (at the contraction
        boundary; the default Newton-GMRES solver does not need a contraction); Bernoulli (Lip 1/4)
        $s=2$ is the paper's logistic check; Ising (tanh, Lip 1) $s=1$; Poisson (exp,
        unbounded Lip) no $s$ guarantees contraction, $s=1$ with the default solver.

    Examples
    --------
    >>> x = torch.linspace(0, 1, 5, dtype=torch.float64)
    >>> (w, head) = Informed(SquaredExponential(), s=2.0).weights(x, None, generator=torch.Generator())
    >>> float(torch.linalg.matrix_norm(w.W, ord=2))
    0.5
    """

    kernel: AbstractKernel
    s: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.kernel, AbstractKernel):
            raise TypeError(f"kernel must be a deqppl.kernels kernel, got {self.kernel!r}")
        check_lam(self.s, "s")

    def lam(self, x: torch.Tensor) -> float:
        r"""$\lambda=s\lVert K\rVert_2$ at the inputs ``x``."""
        return self.s * spectral_norm(self.kernel(x))

    def weights(self, x, x_new, *, generator):
        K = self.kernel(x)
        lam = self.s * spectral_norm(K)
        head = None if x_new is None else head_weights(self.kernel(x_new, x), lam)
        return kglm_weights(K, lam), head


@dataclass(frozen=True)
class Naive(AbstractInitialization):
    r"""The informed construction with a generic squared-exponential kernel (the paper's baseline).

    Parameters
    ----------
    s
        As :class:`Informed`.
    lengthscale, variance
        Of the generic :class:`~deqppl.kernels.SquaredExponential` (default 1, 1).
    """

    s: float = 1.0
    lengthscale: float = 1.0
    variance: float = 1.0

    def __post_init__(self) -> None:
        check_lam(self.s, "s")
        SquaredExponential(lengthscale=self.lengthscale, variance=self.variance)  # validates

    def weights(self, x, x_new, *, generator):
        kernel = SquaredExponential(lengthscale=self.lengthscale, variance=self.variance)
        return Informed(kernel, s=self.s).weights(x, x_new, generator=generator)


@dataclass(frozen=True)
class Random(AbstractInitialization):
    r"""PyTorch's default ``nn.Linear`` initialisation: $U(-1/\sqrt n,1/\sqrt n)$ for every weight and bias.

    (Kaiming-uniform with $a=\sqrt5$ gives bound $1/\sqrt{\text{fan\_in}}$, as does the bias.)
    """

    def weights(self, x, x_new, *, generator):
        n = x.shape[0]
        bound = 1.0 / math.sqrt(n)

        def uniform(*shape):
            return (2 * torch.rand(*shape, generator=generator, dtype=x.dtype) - 1) * bound

        w = DEQWeights(W=uniform(n, n), U=uniform(n, n), b=uniform(n))
        head = None
        if x_new is not None:
            m = x_new.shape[0]
            head = HeadWeights(W=uniform(m, n), U=uniform(m, n), b=uniform(m))
        return w, head


# --------------------------------------------------------------------------------------------
# the trainable layer
# --------------------------------------------------------------------------------------------
class KGLMLayer(nn.Module):
    r"""Trainable kGLM DEQ $z=A'(Wz+U\,T(y)+b)$ on fixed inputs, with a prediction head.

    Parameters
    ----------
    family
        Exponential family whose $A'$ is the activation (any real natural parameter).
    x
        Training inputs ``(n,)`` or ``(n, p)``; observations are sequences ``(B, n)`` on them.
    init
        :class:`Informed`, :class:`Naive` or :class:`Random`.
    x_new
        Inputs of the prediction head ``(m,)`` or ``(m, p)``; ``None``: no head.
    solver, adjoint, throw
        Forward solver (default :func:`default_kglm_solver`), gradient strategy (default the
        implicit adjoint) and whether a failed solve raises.
    seed
        Seed of the :class:`Random` initialisation.
    check_support
        Reject observations outside the family's support (default). ``False`` lets the DEQ take
        any finite input (e.g. a tanh DEQ on real-valued sequences, experiment (a)); its
        fixed point is then a DEQ output, no longer a kGLM MAP.

    Notes
    -----
    Every weight (``W``, ``U``, ``b`` and the head's ``W_head``, ``U_head``, ``b_head``) is an
    ``nn.Parameter``, trainable by any optimiser through the implicit adjoint; no parameter is
    frozen in one initialisation and not another.
    """

    def __init__(
        self,
        family: ExpFamily,
        x: object,
        *,
        init: AbstractInitialization,
        x_new: object | None = None,
        solver: AbstractSolver | None = None,
        adjoint: AbstractAdjoint | None = None,
        throw: bool = True,
        seed: int = 0,
        check_support: bool = True,
    ) -> None:
        super().__init__()
        self.family, self.check_support = _check_family(family), _check_flag("check_support", check_support)
        if not isinstance(init, AbstractInitialization):
            raise TypeError(f"init must be Informed(...), Naive(...) or Random(), got {init!r}")
        x = as_tensor(x, "x")
        check_finite(x, "x")
        if x_new is not None:
            x_new = as_tensor(x_new, "x_new", dtype=x.dtype)
            check_finite(x_new, "x_new")
        weights, head = init.weights(x, x_new, generator=torch.Generator().manual_seed(int(seed)))
        self.W = nn.Parameter(weights.W.clone())
        self.U = nn.Parameter(weights.U.clone())
        self.b = nn.Parameter(weights.b.clone())
        if head is not None:
            self.W_head = nn.Parameter(head.W.clone())
            self.U_head = nn.Parameter(head.U.clone())
            self.b_head = nn.Parameter(head.b.clone())
        self.has_head = head is not None
        self.solver = solver
        self.adjoint = adjoint
        self.throw = throw

    @property
    def n(self) -> int:
        """Number of training inputs (the state's dimension)."""
        return self.W.shape[0]

    def _observations(self, y: object) -> torch.Tensor:
        y = as_tensor(y, "y", dtype=self.W.dtype, device=self.W.device)
        if y.dim() == 1:
            y = y.unsqueeze(0)
        if y.dim() != 2 or y.shape[1] != self.n:
            raise ValueError(f"y must have shape (B, {self.n}) or ({self.n},), got {tuple(y.shape)}")
        if not self.check_support:
            check_finite(y, "y")
            return y
        return self.family.validate(y, "y")

    def forward(self, y: object, *, z0: torch.Tensor | None = None) -> tuple[torch.Tensor, Solution]:
        """Fixed point $z^*$ ``(B, n)`` for observations ``y`` ``(B, n)`` and its solve."""
        y = self._observations(y)
        return self._solve(self.family.T(y), z0)

    def _solve(self, Ty: torch.Tensor, z0: torch.Tensor | None) -> tuple[torch.Tensor, Solution]:
        c = Ty @ self.U.T + self.b
        if z0 is None:
            z0 = self.family.mean(torch.zeros_like(Ty))
        W, family = self.W, self.family
        sol = fixed_point(
            lambda z: _kglm_map(z, W, c, family),
            z0.detach(),
            solver=self.solver or default_kglm_solver(Ty.dtype),
            adjoint=self.adjoint,
            jacobian=lambda z: _kglm_jacobian(z, W.detach(), c.detach(), family),
            throw=self.throw,
        )
        return sol.value, sol

    def predict(self, y: object, *, z0: torch.Tensor | None = None) -> tuple[torch.Tensor, Solution]:
        r"""Predicted means $A'(W_*z^*+U_*T(y)+b_*)$ ``(B, m)`` at ``x_new`` and the solve."""
        if not self.has_head:
            raise ValueError("this KGLMLayer has no prediction head: build it with x_new=...")
        y = self._observations(y)
        Ty = self.family.T(y)
        z, sol = self._solve(Ty, z0)
        return self.family.mean(z @ self.W_head.T + Ty @ self.U_head.T + self.b_head), sol


# --------------------------------------------------------------------------------------------
# the encoder of the protocol for KernelGLM
# --------------------------------------------------------------------------------------------
class KernelGLMEncoder(AbstractMAPEncoder):
    r"""Encoder of the protocol whose fixed point is a kernel GLM's MAP (fitted means).

    The state is one coupled problem of dimension $n$, shape ``(1, n)``; the layer is
    $z\mapsto A'(-K_jz/\lambda+K_jT(y)/\lambda)$ with the model's jittered kernel matrix
    $K_j$ (``model.gram``), so the fixed point is exactly the model's MAP; :meth:`to_sites`
    returns the whitened site $u=L^\top(T(y)-z)/\lambda$.

    Parameters
    ----------
    model
        A :class:`~deqppl.models.kernel_glm.KernelGLM`-like model (``family``, ``lam``,
        ``kernel``, ``gram``, ``cholesky``).
    solver, adjoint, throw
        As :class:`~deqppl.encoders.AbstractMAPEncoder`; default solver
        :func:`default_kglm_solver`.
    seed
        Accepted as every encoder of the protocol accepts it (the harness passes one); the
        kGLM has no global sites, so nothing is random.

    Examples
    --------
    >>> from deqppl.expfam import bernoulli
    >>> from deqppl.models.kernel_glm import KernelGLM
    >>> model = KernelGLM(bernoulli(), SquaredExponential(), lam=0.5)
    >>> data = {"x": torch.linspace(-1, 1, 6, dtype=torch.float64),
    ...         "y": torch.tensor([0., 0., 1., 0., 1., 1.], dtype=torch.float64)}
    >>> sites, sol = KernelGLMEncoder(model).sites(data)
    >>> sites["u"].shape, sol.solver, bool(sol.converged.all())
    (torch.Size([6]), 'NewtonGMRES', True)
    """

    required_model_attributes: ClassVar[tuple[str, ...]] = ("family", "lam", "kernel", "gram", "cholesky")
    model_kind: ClassVar[str] = "a KernelGLM-like model (deqppl.models.kernel_glm)"

    def __init__(self, model, *, solver=None, adjoint=None, throw: bool = True, seed: int = 0) -> None:
        super().__init__(model, solver=solver, adjoint=adjoint, throw=throw)
        # seed: the harness builds every encoder with one; a kGLM has no random globals to seed
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an integer, got {seed!r}")
        _check_family(model.family)
        check_lam(model.lam, "model.lam")
        self._cache: tuple[torch.Tensor, torch.Tensor, DEQWeights, torch.Tensor] | None = None

    def _weights(self, data: Mapping[str, torch.Tensor]) -> tuple[DEQWeights, torch.Tensor]:
        # one gram and one weight construction per solve (the layer is called every step)
        x, y = data["x"], data["y"]
        if self._cache is None or self._cache[0] is not x or self._cache[1] is not y:
            w = kglm_weights(self.model.gram(x), self.model.lam)
            c = (self.model.family.T(y) @ w.U.T + w.b).unsqueeze(0)
            self._cache = (x, y, w, c)
        return self._cache[2], self._cache[3]

    def layer(self, z, data):
        w, c = self._weights(data)
        return _kglm_map(z, w.W, c, self.model.family)

    def layer_jacobian(self, z, data):
        w, c = self._weights(data)
        return _kglm_jacobian(z, w.W, c, self.model.family)

    def latent_shape(self, data):
        return (1, data["x"].shape[0])

    def initial_guess(self, data):
        x = data["x"]
        return self.model.family.mean(torch.zeros(1, x.shape[0], dtype=x.dtype, device=x.device))

    def default_solver(self, dtype):
        return default_kglm_solver(dtype)

    def to_sites(self, z, data):
        L = self.model.cholesky(data["x"])
        alpha = (self.model.family.T(data["y"]) - z.reshape(-1)) / self.model.lam
        return {"u": L.T @ alpha}

    def predict(self, data: object, x_new: object, *, z: torch.Tensor | None = None) -> torch.Tensor:
        r"""Predicted means $A'(K_*(T(y)-z)/\lambda)$ at ``x_new`` ``(m,)`` (solves unless ``z`` given)."""
        data = self.check_data(data)
        x = data["x"]
        x_new = as_tensor(x_new, "x_new", dtype=x.dtype, device=x.device)
        if x_new.dim() != x.dim() or (x.dim() == 2 and x_new.shape[1] != x.shape[1]):
            raise ValueError(
                f"x_new must have shape (m,{'' if x.dim() == 1 else ' ' + str(x.shape[1])}) like x "
                f"{tuple(x.shape)}, got {tuple(x_new.shape)}"
            )
        check_finite(x_new, "x_new")
        if z is None:
            z = self.solve(data, validated=True).value
        h = head_weights(self.model.kernel(x_new, x), self.model.lam)
        Ty = self.model.family.T(data["y"])
        return self.model.family.mean(h.W @ z.reshape(-1) + h.U @ Ty + h.b)


# --------------------------------------------------------------------------------------------
# convolutional kGLM DEQs: a stationary kernel on a pixel grid
# --------------------------------------------------------------------------------------------
def kernel_stencil(kernel: AbstractKernel, radius: tuple[int, int], *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    r"""The stationary kernel's values $k(\delta)$ on pixel offsets $|\delta_r|\le r_0$, $|\delta_c|\le r_1$.

    Returns a ``(2 r_0 + 1, 2 r_1 + 1)`` stencil. On an ``(H, W)`` grid with ``radius =
    (H - 1, W - 1)`` the zero-padded convolution with it is exactly $K z$ for the dense kernel
    matrix of the grid's pixel positions; a smaller radius truncates the kernel (cheaper, but a
    truncated kernel need not be positive semi-definite).
    """
    r0, r1 = (int(r) for r in radius)
    if r0 < 0 or r1 < 0:
        raise ValueError(f"radius must be non-negative integers, got {radius!r}")
    rows = torch.arange(-r0, r0 + 1, dtype=dtype)
    cols = torch.arange(-r1, r1 + 1, dtype=dtype)
    offsets = torch.cartesian_prod(rows, cols)
    origin = torch.zeros(1, 2, dtype=dtype)
    return kernel(offsets, origin).reshape(2 * r0 + 1, 2 * r1 + 1)


def _conv(z: torch.Tensor, stencil: torch.Tensor) -> torch.Tensor:
    # z (B, H, W), stencil (kh, kw) with odd sizes: zero-padded 'same' correlation
    kh, kw = stencil.shape
    out = torch.nn.functional.conv2d(z.unsqueeze(1), stencil[None, None], padding=(kh // 2, kw // 2))
    return out.squeeze(1)


def _conv_transpose(z: torch.Tensor, stencil: torch.Tensor) -> torch.Tensor:
    kh, kw = stencil.shape
    out = torch.nn.functional.conv_transpose2d(z.unsqueeze(1), stencil[None, None], padding=(kh // 2, kw // 2))
    return out.squeeze(1)


def conv_spectral_norm(
    stencil: torch.Tensor, shape: tuple[int, int], *, num_iters: int = 500, rtol: float = 1e-12, seed: int = 0
) -> float:
    r"""$\lVert A\rVert_2$ of the zero-padded convolution $A$ on an ``shape`` grid, by power iteration.

    Iterates $v\leftarrow A^\top Av/\lVert A^\top Av\rVert$ with the convolution and its
    transpose (``conv_transpose2d``), never forming the dense matrix; stops when the Rayleigh
    quotient changes by less than ``rtol`` (relative) or after ``num_iters`` iterations.
    """
    g = torch.Generator().manual_seed(int(seed))
    v = torch.randn(1, *shape, generator=g, dtype=stencil.dtype)
    v = v / v.norm()
    est = 0.0
    for _ in range(int(num_iters)):
        w = _conv_transpose(_conv(v, stencil), stencil)
        new = float(torch.sqrt((v * w).sum().clamp_min(0)))
        v = w / w.norm()
        if abs(new - est) <= rtol * new:
            return new
        est = new
    return est


class ConvKGLMLayer(nn.Module):
    r"""Convolutional kGLM DEQ on an ``(H, W)`` pixel grid: $z=A'(w_W*z+w_U*T(y)+b)$.

    With a stationary kernel the products $Kz$ are convolutions with its stencil
    (:func:`kernel_stencil`), so the informed weights are the stencils $-k/\lambda$ and
    $k/\lambda$ with $\lambda=s\lVert K\rVert_2$, the spectral norm of the convolution by
    :func:`conv_spectral_norm` (SPEC §4).

    Parameters
    ----------
    family
        Exponential family whose $A'$ is the activation.
    shape
        Image shape ``(H, W)``.
    init
        :class:`Informed` (its kernel must be stationary) or :class:`Random` (``nn.Conv2d``'s
        default: $U(-1/\sqrt{k_hk_w},1/\sqrt{k_hk_w})$).
    radius
        Stencil half-sizes; default ``(H - 1, W - 1)``, exact for the dense kernel matrix.
    spectral_norm
        If given, the W stencil is rescaled so that $\lVert w_W*\cdot\rVert_2$ equals it (for
        the sweeps of experiment (b)); for :class:`Informed` this is $\lambda=\lVert K\rVert/\rho$.
    solver, adjoint, throw, seed, check_support
        As :class:`KGLMLayer`; the default solver is matrix-free ``Anderson``.
    """

    def __init__(
        self,
        family: ExpFamily,
        shape: tuple[int, int],
        *,
        init: AbstractInitialization,
        radius: tuple[int, int] | None = None,
        spectral_norm: float | None = None,
        solver: AbstractSolver | None = None,
        adjoint: AbstractAdjoint | None = None,
        throw: bool = True,
        seed: int = 0,
        check_support: bool = True,
    ) -> None:
        super().__init__()
        self.family, self.check_support = _check_family(family), _check_flag("check_support", check_support)
        H, W = (int(s) for s in shape)
        if H < 1 or W < 1:
            raise ValueError(f"shape must be two positive integers (H, W), got {shape!r}")
        self.shape = (H, W)
        radius = (H - 1, W - 1) if radius is None else tuple(int(r) for r in radius)
        if spectral_norm is not None:
            check_lam(spectral_norm, "spectral_norm")
        dtype = torch.get_default_dtype()
        if isinstance(init, Informed):
            k = kernel_stencil(init.kernel, radius, dtype=dtype)
            norm = conv_spectral_norm(k, self.shape)
            lam = init.s * norm if spectral_norm is None else norm / spectral_norm
            w_W, w_U, b = -k / lam, k / lam, torch.zeros((), dtype=dtype)
            self.lam = lam
        elif isinstance(init, Random):
            g = torch.Generator().manual_seed(int(seed))
            size = (2 * radius[0] + 1, 2 * radius[1] + 1)
            bound = 1.0 / math.sqrt(size[0] * size[1])
            w_W, w_U = ((2 * torch.rand(*size, generator=g, dtype=dtype) - 1) * bound for _ in range(2))
            b = (2 * torch.rand((), generator=g, dtype=dtype) - 1) * bound
            if spectral_norm is not None:
                w_W = w_W * (spectral_norm / conv_spectral_norm(w_W, self.shape))
            self.lam = None
        else:
            raise TypeError(f"init must be Informed(kernel) or Random(), got {init!r}")
        self.w_W = nn.Parameter(w_W)
        self.w_U = nn.Parameter(w_U)
        self.b = nn.Parameter(b)
        self.solver, self.adjoint, self.throw = solver, adjoint, throw

    def _observations(self, y: object) -> torch.Tensor:
        y = as_tensor(y, "y", dtype=self.w_W.dtype, device=self.w_W.device)
        if y.dim() == 2:
            y = y.unsqueeze(0)
        if y.dim() != 3 or tuple(y.shape[1:]) != self.shape:
            raise ValueError(f"y must have shape (B, {self.shape[0]}, {self.shape[1]}), got {tuple(y.shape)}")
        if not self.check_support:
            check_finite(y, "y")
            return y
        return self.family.validate(y, "y")

    def forward(self, y: object, *, z0: torch.Tensor | None = None) -> tuple[torch.Tensor, Solution]:
        """Fixed point ``(B, H, W)`` for images ``y`` ``(B, H, W)`` and its solve."""
        y = self._observations(y)
        c = _conv(self.family.T(y), self.w_U) + self.b
        if z0 is None:
            z0 = self.family.mean(torch.zeros_like(c))
        w_W, family = self.w_W, self.family
        dtype = c.dtype
        sol = fixed_point(
            lambda z: family.mean(_conv(z, w_W) + c),
            z0.detach(),
            solver=self.solver or Anderson(rtol=default_rtol(dtype) * 1e-2, atol=0.0, max_steps=2000),
            adjoint=self.adjoint,
            throw=self.throw,
        )
        return sol.value, sol


# --------------------------------------------------------------------------------------------
# kernel hyperparameters by the Laplace marginal likelihood (SPEC §4.1)
# --------------------------------------------------------------------------------------------
def laplace_log_marginal(
    family: ExpFamily,
    K: torch.Tensor,
    y: object,
    *,
    lam: float | torch.Tensor,
    solver: AbstractSolver | None = None,
    check_psd: bool = True,
) -> torch.Tensor:
    r"""Laplace approximation to $\log p(y\mid\theta)$ of the kGLM, differentiable in $K$ and $\lambda$.

    With $f\sim\mathcal N(0,K/\lambda)$ and the MAP $\hat f$ from the DEQ fixed point $z$
    ($\hat f=K(T(y)-z)/\lambda$),
    $$\log q=\log p(y\mid\hat f)-\tfrac12\hat a^\top\hat f-\sum_i\log L_{ii},\qquad
    LL^\top=B=I+V^{1/2}(K/\lambda)V^{1/2},$$
    $\hat a=T(y)-A'(\hat f)$, $V=\mathrm{diag}(A''(\hat f))$ (Rasmussen & Williams, 2006,
    *Gaussian Processes for Machine Learning*, eq. 3.32 and Algorithm 5.1 with $K\to K/\lambda$;
    SPEC §4.1). Gradients in whatever ``K`` and ``lam`` depend on (kernel hyperparameters)
    include the part through $\hat f(\theta)$, by the implicit adjoint of the fixed point.

    Parameters
    ----------
    family
        Exponential family of $y$.
    K
        Kernel matrix ``(n, n)``, possibly requiring grad (built from hyperparameter tensors).
    y
        Observations ``(n,)``.
    lam
        $\lambda>0$, float or 0-dim tensor (possibly requiring grad).
    solver
        Forward solver; default :func:`default_kglm_solver`.
    check_psd
        As :func:`solve_kglm`.

    Returns
    -------
    torch.Tensor
        0-dim log marginal likelihood.

    Raises
    ------
    ValueError
        As :func:`solve_kglm`, before any solve; if $B$ is not positive definite.
    """
    family = _check_family(family)
    check_lam(lam)
    check_kernel_matrix(K.detach(), "K", psd=check_psd)
    n = K.shape[0]
    y = as_tensor(y, "y", dtype=K.dtype, device=K.device)
    if y.shape != (n,):
        raise ValueError(f"y must have shape ({n},) to match K of shape {tuple(K.shape)}, got {tuple(y.shape)}")
    y = family.validate(y.unsqueeze(-1), "y").squeeze(-1)
    Ty = family.T(y)

    def f(z, K, lam):
        return family.mean(-(z @ K.T) / lam + (Ty @ K.T) / lam)

    eye = torch.eye(n, dtype=K.dtype, device=K.device)
    lam_t = lam if isinstance(lam, torch.Tensor) else torch.tensor(float(lam), dtype=K.dtype)
    z0 = family.mean(torch.zeros(1, n, dtype=K.dtype, device=K.device))
    sol = fixed_point(
        f, z0, args=(K, lam_t),
        solver=solver or default_kglm_solver(K.dtype),
        jacobian=lambda z, K, lam: family.variance(-(z @ K.T) / lam + (Ty @ K.T) / lam).unsqueeze(-1) * (-K / lam),
    )
    z = sol.value[0]
    a = Ty - z  # = lam * alpha = T(y) - A'(f_hat)
    f_hat = K @ a / lam_t
    v = family.variance(f_hat).clamp_min(0)
    sv = torch.sqrt(v)
    B = eye + sv[:, None] * (K / lam_t) * sv[None, :]
    L, info = torch.linalg.cholesky_ex(B)
    if int(info) != 0:
        raise ValueError("I + V^1/2 (K / lam) V^1/2 is not positive definite: K is not PSD")
    log_lik = family.log_prob(y, f_hat).sum()
    return log_lik - 0.5 * (a @ f_hat) - torch.log(torch.diagonal(L)).sum()
