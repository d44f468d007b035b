"""Spectral radius by power iteration and the Hutchinson Jacobian penalty."""

from __future__ import annotations

import pytest
import torch
from deq_problems import DTYPE, gaussian_pca_parts

from deqppl.deq import jacobian_regularization, spectral_radius


def test_spectral_radius_of_symmetric_tanh_layer_at_zero():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 6, generator=g, dtype=DTYPE)
    W = A + A.T
    W = 0.9 * W / torch.linalg.matrix_norm(W, ord=2)  # symmetric: rho(W) = ||W||_2 = 0.9
    u = torch.zeros(3, 6, dtype=DTYPE)
    rho = spectral_radius(lambda z: torch.tanh(z @ W.T + u), torch.zeros_like(u), num_iters=300)
    assert rho.shape == (3,)
    # power iteration error decays like (|lambda_2| / |lambda_1|)^k; 300 steps is ample here
    assert torch.allclose(rho, torch.full_like(rho, 0.9), rtol=1e-3)


def test_spectral_radius_detects_non_contractive_pca_map():
    W, bias, y, lam = gaussian_pca_parts()
    rho = spectral_radius(lambda z: (y - bias - z @ W.T) @ W / lam,
                          torch.zeros(y.shape[0], 2, dtype=DTYPE), num_iters=100)
    expected = torch.linalg.eigvalsh(W.T @ W).max() / lam  # = 3 by construction
    assert torch.allclose(rho, expected.expand_as(rho), rtol=1e-6)


def test_spectral_radius_per_sample_and_seeded():
    scale = torch.tensor([[0.1], [0.5], [2.0]], dtype=DTYPE)
    z = torch.zeros(3, 4, dtype=DTYPE)
    rho = spectral_radius(lambda z: scale * z, z, seed=1)
    assert torch.allclose(rho, scale[:, 0])
    assert torch.equal(spectral_radius(torch.sin, z + 0.3, seed=2),
                       spectral_radius(torch.sin, z + 0.3, seed=2))


def test_jacobian_regularization_estimates_frobenius_norm_and_is_differentiable():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(5, 5, generator=g, dtype=DTYPE).requires_grad_()
    z = torch.zeros(2, 5, dtype=DTYPE)
    num = 4000
    est = jacobian_regularization(lambda z: z @ W.T, z, num_samples=num,
                                  generator=torch.Generator().manual_seed(2))
    exact = (W.detach() ** 2).sum()
    # Var ||W^T v||^2 = 2 ||W^T W||_F^2 for Gaussian v; allow 5 standard errors
    se = (2 * (W.detach() @ W.detach().T).pow(2).sum() / num) ** 0.5
    assert (est.detach() - exact).abs().max() < 5 * se
    est.sum().backward()
    assert W.grad is not None and torch.isfinite(W.grad).all()


def test_diagnostics_validate_arguments():
    with pytest.raises(ValueError):
        spectral_radius(torch.sin, torch.zeros(2, 2), num_iters=0)
    with pytest.raises(ValueError):
        jacobian_regularization(torch.sin, torch.zeros(2, 2), num_samples=0)
