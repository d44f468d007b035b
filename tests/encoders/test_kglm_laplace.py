"""Laplace marginal likelihood of the kGLM vs an independent Rasmussen & Williams Algorithm 5.1 (SPEC §4.1)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deqppl.encoders.kglm import laplace_log_marginal
from deqppl.expfam import bernoulli, gaussian

sys.path.insert(0, str(Path(__file__).parent))
from kglm_reference import irls  # noqa: E402

pytestmark = pytest.mark.usefixtures("float64")


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _se(x, lengthscale, variance):
    d2 = (x[:, None] - x[None, :]) ** 2
    return variance * np.exp(-0.5 * d2 / lengthscale**2), d2


def algorithm_5_1(x, y, lengthscale, variance, lam):
    """R&W (2006) Algorithm 5.1, logistic likelihood, labels {0, 1}, prior covariance K / lam.

    Returns log q(y | theta) and its gradient in (lengthscale, variance, lam).
    """
    K0, d2 = _se(x, lengthscale, variance)
    alpha, _ = irls("bernoulli", K0, y, lam)
    Kp = K0 / lam
    f = K0 @ alpha  # the mode
    pi = 1 / (1 + np.exp(-f))
    grad = y - pi  # d log p / df
    W = pi * (1 - pi)
    d3 = -pi * (1 - pi) * (1 - 2 * pi)  # third derivative of log p
    sW = np.sqrt(W)
    n = len(y)
    L = np.linalg.cholesky(np.eye(n) + sW[:, None] * Kp * sW[None, :])
    a = grad  # at the mode f = Kp a
    log_lik = np.sum(y * f - np.logaddexp(0, f))
    log_z = -0.5 * a @ f + log_lik - np.sum(np.log(np.diag(L)))
    R = sW[:, None] * np.linalg.solve(L.T, np.linalg.solve(L, np.diag(sW)))
    C = np.linalg.solve(L, sW[:, None] * Kp)
    # d(-1/2 log|B|)/df_i = -1/2 [(K^-1 + W)^-1]_ii dW_ii/df_i with dW/df = -(third derivative):
    # a plus sign (as the GPML toolbox's infLaplace computes it; the printed line 7 of
    # Algorithm 5.1 carries a minus). Finite differences of log_z decide it below.
    s2 = 0.5 * (np.diag(Kp) - np.sum(C**2, axis=0)) * d3
    grads = []
    for Cj in (Kp * d2 / lengthscale**3, Kp / variance, -Kp / lam):
        s1 = 0.5 * a @ Cj @ a - 0.5 * np.sum(R * Cj)
        b = Cj @ grad
        s3 = b - Kp @ (R @ b)
        grads.append(s1 + s2 @ s3)
    return log_z, np.array(grads)


@pytest.mark.parametrize(("ell", "var", "lam"), [(0.7, 1.0, 0.5), (1.5, 2.0, 0.05)], ids=["a", "b"])
def test_bernoulli_equals_rasmussen_williams_algorithm_5_1(ell, var, lam) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.sort(4 * torch.rand(40, generator=g) - 2).values
    y = torch.bernoulli(torch.sigmoid(3 * torch.sin(2 * x)), generator=g)
    want, want_grad = algorithm_5_1(x.numpy(), y.numpy(), ell, var, lam)
    params = [torch.tensor(v, requires_grad=True) for v in (ell, var, lam)]
    ell_t, var_t, lam_t = params
    K = var_t * torch.exp(-0.5 * (x[:, None] - x[None, :]) ** 2 / ell_t**2)
    got = laplace_log_marginal(bernoulli(), K, y, lam=lam_t)
    got.backward()
    torch.testing.assert_close(float(got.detach()), float(want), rtol=0, atol=1e-8)
    torch.testing.assert_close(torch.stack([p.grad for p in params]), torch.from_numpy(want_grad), rtol=0, atol=1e-8)
    # the oracle's gradient is its own value's: central differences (error O(h^2) + IRLS 1e-14/h)
    h = 1e-5
    theta = np.array([ell, var, lam])
    fd = [(algorithm_5_1(x.numpy(), y.numpy(), *(theta + h * e))[0]
           - algorithm_5_1(x.numpy(), y.numpy(), *(theta - h * e))[0]) / (2 * h) for e in np.eye(3)]
    np.testing.assert_allclose(want_grad, fd, rtol=1e-6, atol=1e-7)


def test_gaussian_is_the_exact_gp_marginal_likelihood() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.linspace(-2, 2, 30)
    y = torch.sin(2 * x) + 0.3 * torch.randn(30, generator=g)
    lam = 0.4
    K = torch.exp(-0.5 * (x[:, None] - x[None, :]) ** 2 / 0.6**2)
    # y ~ N(0, K / lam + I) exactly for the Gaussian family with unit precision
    exact = torch.distributions.MultivariateNormal(torch.zeros(30), K / lam + torch.eye(30)).log_prob(y)
    torch.testing.assert_close(laplace_log_marginal(gaussian(), K, y, lam=lam), exact, rtol=0, atol=1e-10)
