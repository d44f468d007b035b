"""Fixed-point problems with known solutions (float64), shared by the deq tests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

DTYPE = torch.float64
BATCH = 4


@dataclass(frozen=True)
class Problem:
    """A batched fixed-point problem ``z = f(z)`` with its known solution."""

    name: str
    f: Callable[[torch.Tensor], torch.Tensor]
    z0: torch.Tensor
    solution: torch.Tensor
    contractive: bool  # whether plain iteration converges
    amplification: float  # bound on ||(I - J)^{-1}||: residual-to-error factor


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _spectral_scale(W: torch.Tensor, norm: float) -> torch.Tensor:
    return W * (norm / torch.linalg.matrix_norm(W, ord=2))


def linear_contraction() -> Problem:
    g = _gen(0)
    n = 5
    A = _spectral_scale(torch.randn(n, n, generator=g, dtype=DTYPE), 0.8)
    b = torch.randn(BATCH, n, generator=g, dtype=DTYPE)
    solution = torch.linalg.solve(torch.eye(n, dtype=DTYPE) - A, b.T).T
    return Problem("linear", lambda z: z @ A.T + b, torch.zeros_like(b), solution, True, 5.0)


def cosine() -> Problem:
    z0 = torch.zeros(BATCH, 3, dtype=DTYPE)
    dottie = torch.full_like(z0, 0.7390851332151607)  # the unique real root of cos z = z
    return Problem("cos", torch.cos, z0, dottie, True, 1.0)  # |1 - J| = 1 + sin z* > 1


def tanh_layer() -> Problem:
    g = _gen(1)
    n = 8
    W = _spectral_scale(torch.randn(n, n, generator=g, dtype=DTYPE), 0.9)
    u = torch.randn(BATCH, n, generator=g, dtype=DTYPE)
    f = lambda z: torch.tanh(z @ W.T + u)  # noqa: E731
    # Oracle independent of the library: 2000 plain steps of a 0.9-contraction (error < 1e-30).
    z = torch.zeros_like(u)
    for _ in range(2000):
        z = f(z)
    return Problem("tanh", f, torch.zeros_like(u), z, True, 10.0)


def quadratic_gradient_step() -> Problem:
    g = _gen(2)
    n = 6
    Q_root = torch.randn(n, n, generator=g, dtype=DTYPE)
    eigvals = torch.linspace(1.0, 10.0, n, dtype=DTYPE)
    basis, _ = torch.linalg.qr(Q_root)
    Q = basis @ torch.diag(eigvals) @ basis.T
    c = torch.randn(BATCH, n, generator=g, dtype=DTYPE)
    step = 1.0 / 10.0  # 1 / L: plain iteration contracts with ratio 1 - 1/10
    f = lambda z: z - step * (z @ Q - c)  # noqa: E731 - Q symmetric
    solution = torch.linalg.solve(Q, c.T).T
    return Problem("quadratic", f, torch.zeros_like(c), solution, True, 10.0)


def gaussian_pca_parts(lam: float = 1.0):
    """SPEC 2.3: W in R^{50x2}, entries N(0, 1/50), scaled up so lambda_max(W^T W) = 3 lam."""
    g = _gen(3)
    d, latent = 50, 2
    W = torch.randn(d, latent, generator=g, dtype=DTYPE) / d**0.5
    W = W * (3.0 * lam / torch.linalg.eigvalsh(W.T @ W).max()) ** 0.5
    bias = torch.randn(d, generator=g, dtype=DTYPE)
    y = torch.randn(BATCH, d, generator=g, dtype=DTYPE) + bias
    return W, bias, y, lam


def gaussian_pca() -> Problem:
    W, bias, y, lam = gaussian_pca_parts()
    f = lambda z: (y - bias - z @ W.T) @ W / lam  # noqa: E731
    solution = torch.linalg.solve(lam * torch.eye(2, dtype=DTYPE) + W.T @ W, ((y - bias) @ W).T).T
    return Problem("gaussian_pca", f, torch.zeros(BATCH, 2, dtype=DTYPE), solution, False, 1.0)


PROBLEMS = [linear_contraction, cosine, tanh_layer, quadratic_gradient_step, gaussian_pca]


# ----------------------------------------------------------------------------------------------
# The same problems with their parameters passed explicitly, f(z, *params), for derivative tests
# through torch.func transforms. `data` is a per-sample input that vmap(grad) maps over.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamProblem:
    """``z = f(z, *params)`` with ``params`` explicit; ``params[-1]`` is per-sample data."""

    name: str
    f: Callable[..., torch.Tensor]
    params: tuple
    z0: torch.Tensor
    contractive: bool
    jacobian: Callable[..., torch.Tensor] | None = None


def p_linear() -> ParamProblem:
    g = _gen(0)
    n = 5
    A = _spectral_scale(torch.randn(n, n, generator=g, dtype=DTYPE), 0.8)
    b = torch.randn(BATCH, n, generator=g, dtype=DTYPE)
    return ParamProblem("linear", lambda z, A, b: z @ A.T + b, (A, b), torch.zeros_like(b), True)


def p_cosine() -> ParamProblem:
    a = torch.tensor(0.9, dtype=DTYPE)
    x = torch.linspace(-0.5, 0.5, BATCH * 3, dtype=DTYPE).reshape(BATCH, 3)
    return ParamProblem("cos", lambda z, a, x: a * torch.cos(z) + x, (a, x),
                        torch.zeros(BATCH, 3, dtype=DTYPE), True)


def p_tanh() -> ParamProblem:
    g = _gen(1)
    n = 6
    W = _spectral_scale(torch.randn(n, n, generator=g, dtype=DTYPE), 0.9)
    u = torch.randn(BATCH, n, generator=g, dtype=DTYPE)
    return ParamProblem("tanh", lambda z, W, u: torch.tanh(z @ W.T + u), (W, u),
                        torch.zeros_like(u), True)


def p_quadratic() -> ParamProblem:
    g = _gen(2)
    n = 4
    basis, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DTYPE))
    Q = basis @ torch.diag(torch.linspace(1.0, 10.0, n, dtype=DTYPE)) @ basis.T
    c = torch.randn(BATCH, n, generator=g, dtype=DTYPE)
    # Q is used as (Q + Q^T) / 2 so that a perturbation of Q keeps the map a gradient step
    f = lambda z, Q, c: z - 0.1 * (z @ (0.5 * (Q + Q.T)) - c)  # noqa: E731
    return ParamProblem("quadratic", f, (Q, c), torch.zeros_like(c), True)


def p_gaussian_pca() -> ParamProblem:
    W, bias, y, lam = gaussian_pca_parts()
    f = lambda z, W, y: (y - bias - z @ W.T) @ W / lam  # noqa: E731 - not a contraction
    jac = lambda z, W, y: (-(W.T @ W) / lam).expand(z.shape[0], 2, 2)  # noqa: E731
    return ParamProblem("gaussian_pca", f, (W, y), torch.zeros(BATCH, 2, dtype=DTYPE), False,
                        jacobian=jac)


PARAM_PROBLEMS = [p_linear, p_cosine, p_tanh, p_quadratic, p_gaussian_pca]


@pytest.fixture(params=PROBLEMS, ids=[p.__name__ for p in PROBLEMS])
def problem(request) -> Problem:
    """Each problem of :data:`PROBLEMS` in turn (imported by the test modules that use it)."""
    return request.param()
