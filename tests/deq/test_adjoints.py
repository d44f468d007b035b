"""Gradients through the fixed point, float64: gradcheck, closed forms, unrolled, differences."""

from __future__ import annotations

import pytest
import torch
from deq_problems import DTYPE, gaussian_pca_parts

from deqppl.deq import (
    Anderson,
    Broyden,
    ConvergenceError,
    ConvergenceWarning,
    FixedPointIteration,
    ImplicitAdjoint,
    Newton,
    NoAdjoint,
    OneStepAdjoint,
    UnrolledAdjoint,
    fixed_point,
)

TIGHT = dict(rtol=1e-12, atol=1e-14)  # forward error << gradcheck's eps = 1e-6 step


def _tanh_params(seed=0, n=3, batch=2):
    g = torch.Generator().manual_seed(seed)
    W = 0.3 * torch.randn(n, n, generator=g, dtype=DTYPE)  # ||W||_2 about 0.5: a contraction
    u = torch.randn(batch, n, generator=g, dtype=DTYPE)
    return W.requires_grad_(), u.requires_grad_()


def _solve_tanh(W, u, *, solver=None, adjoint=None):
    solver = solver or Anderson(**TIGHT)
    return fixed_point(lambda z: torch.tanh(z @ W.T + u), torch.zeros_like(u),
                       solver=solver, adjoint=adjoint).value


ADJOINTS = {
    "implicit_anderson": ImplicitAdjoint(solver=Anderson(**TIGHT)),
    "implicit_plain": ImplicitAdjoint(solver=FixedPointIteration(max_steps=2000, **TIGHT)),
    "implicit_broyden": ImplicitAdjoint(solver=Broyden(**TIGHT)),
    "implicit_newton": ImplicitAdjoint(solver=Newton(**TIGHT)),
    # truncated Neumann series: error about rho(J)^100 < 0.5^100
    "unrolled_100": UnrolledAdjoint(num_steps=100),
}


@pytest.mark.parametrize("adjoint", list(ADJOINTS.values()), ids=list(ADJOINTS))
def test_gradcheck(adjoint):
    W, u = _tanh_params()
    assert torch.autograd.gradcheck(lambda W, u: _solve_tanh(W, u, adjoint=adjoint), (W, u))


@pytest.mark.parametrize("solver", [Anderson(**TIGHT), Newton(**TIGHT)], ids=["anderson", "newton"])
def test_gradcheck_with_forward_solver(solver):
    W, u = _tanh_params(seed=1)
    assert torch.autograd.gradcheck(lambda W, u: _solve_tanh(W, u, solver=solver), (W, u))


def test_implicit_equals_closed_form_for_linear_map():
    g = torch.Generator().manual_seed(2)
    n = 4
    A = (0.2 * torch.randn(n, n, generator=g, dtype=DTYPE)).requires_grad_()
    b = torch.randn(3, n, generator=g, dtype=DTYPE).requires_grad_()
    c = torch.randn(3, n, generator=g, dtype=DTYPE)
    z = fixed_point(lambda z: z @ A.T + b, torch.zeros_like(b), solver=Anderson(**TIGHT),
                    adjoint=ImplicitAdjoint(solver=Anderson(**TIGHT))).value
    grads = torch.autograd.grad((c * z).sum(), (A, b))
    closed = torch.linalg.solve(torch.eye(n, dtype=DTYPE) - A, b.T).T
    expected = torch.autograd.grad((c * closed).sum(), (A, b))
    for got, want in zip(grads, expected):
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-11)


def test_implicit_on_non_contractive_pca_matches_closed_form():
    """The adjoint of the SPEC 2.3 map is not a contraction either; the default still solves it."""
    W, bias, y, lam = gaussian_pca_parts()
    W = W.clone().requires_grad_()
    y = y.clone().requires_grad_()
    c = torch.linspace(-1, 1, y.shape[0] * 2, dtype=DTYPE).reshape(-1, 2)
    z = fixed_point(lambda z: (y - bias - z @ W.T) @ W / lam, torch.zeros_like(c),
                    solver=Anderson(**TIGHT),
                    adjoint=ImplicitAdjoint(solver=Anderson(rtol=1e-12, atol=0.0))).value
    grads = torch.autograd.grad((c * z).sum(), (W, y))
    closed = torch.linalg.solve(lam * torch.eye(2, dtype=DTYPE) + W.T @ W, ((y - bias) @ W).T).T
    expected = torch.autograd.grad((c * closed).sum(), (W, y))
    for got, want in zip(grads, expected):
        assert torch.allclose(got, want, rtol=1e-8, atol=1e-10)


def test_implicit_unrolled_and_finite_differences_agree():
    g = torch.Generator().manual_seed(3)
    n = 6
    W0 = torch.randn(n, n, generator=g, dtype=DTYPE)
    W0 = 0.9 * W0 / torch.linalg.matrix_norm(W0, ord=2)  # rho(J) <= 0.9: 0.9^500 ~ 1e-23
    u = torch.randn(4, n, generator=g, dtype=DTYPE)
    c = torch.randn(4, n, generator=g, dtype=DTYPE)

    def loss(W, adjoint):
        z = fixed_point(lambda z: torch.tanh(z @ W.T + u), torch.zeros_like(u),
                        solver=Anderson(**TIGHT), adjoint=adjoint).value
        return (c * z).sum()

    W = W0.clone().requires_grad_()
    (implicit,) = torch.autograd.grad(loss(W, ImplicitAdjoint(solver=Anderson(**TIGHT))), W)
    (unrolled,) = torch.autograd.grad(loss(W, UnrolledAdjoint(num_steps=500)), W)
    assert torch.allclose(implicit, unrolled, rtol=1e-9, atol=1e-11)
    eps = 1e-6  # central differences: truncation O(eps^2), round-off O(1e-16 / eps) = 1e-10
    fd = torch.zeros_like(W0)
    for i, j in [(0, 0), (1, 3), (5, 2), (4, 4)]:
        E = torch.zeros_like(W0)
        E[i, j] = eps
        with torch.no_grad():
            fd[i, j] = (loss(W0 + E, NoAdjoint()) - loss(W0 - E, NoAdjoint())) / (2 * eps)
        assert float(implicit[i, j]) == pytest.approx(float(fd[i, j]), rel=1e-6, abs=1e-8)


def test_one_step_adjoint_is_jacobian_free_gradient():
    W, u = _tanh_params(seed=4)
    z = _solve_tanh(W, u, adjoint=OneStepAdjoint())
    grads = torch.autograd.grad(z.sum(), (W, u))
    z_star = z.detach()
    expected = torch.autograd.grad(torch.tanh(z_star @ W.T + u).sum(), (W, u))
    assert torch.allclose(z, z_star)
    for got, want in zip(grads, expected):
        assert torch.allclose(got, want)


def test_forward_value_is_the_solver_output_for_every_adjoint():
    W, u = _tanh_params(seed=5)
    reference = _solve_tanh(W, u, adjoint=NoAdjoint())
    assert not reference.requires_grad
    for adjoint in (ImplicitAdjoint(), UnrolledAdjoint(num_steps=3), OneStepAdjoint()):
        value = _solve_tanh(W, u, adjoint=adjoint)
        assert value.requires_grad and torch.equal(value.detach(), reference)


def test_no_graph_when_nothing_requires_grad():
    z = fixed_point(torch.cos, torch.zeros(2, 1, dtype=DTYPE)).value
    assert not z.requires_grad


def test_failed_adjoint_solve_raises():
    """Plain iteration cannot solve u = J^T u + g when J = -W^T W / lam has eigenvalue -3."""
    W, bias, y, lam = gaussian_pca_parts()
    W = W.clone().requires_grad_()
    z = fixed_point(lambda z: (y - bias - z @ W.T) @ W / lam, torch.zeros(y.shape[0], 2, dtype=DTYPE),
                    adjoint=ImplicitAdjoint(solver=FixedPointIteration())).value
    with pytest.raises(ConvergenceError, match="implicit adjoint solve.*worst residual"):
        z.sum().backward()


def test_failed_adjoint_solve_warns_without_throw():
    W, u = _tanh_params(seed=6)
    adjoint = ImplicitAdjoint(solver=FixedPointIteration(max_steps=2, rtol=1e-12), throw=False)
    z = _solve_tanh(W, u, adjoint=adjoint)
    with pytest.warns(ConvergenceWarning, match="implicit adjoint solve"):
        z.sum().backward()


def test_double_backward_is_refused():
    W, u = _tanh_params(seed=7)
    z = _solve_tanh(W, u)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(z.sum(), W, create_graph=True)
