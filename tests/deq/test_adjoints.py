"""Gradients through the fixed point, float64: gradcheck, closed forms, unrolled, differences."""

from __future__ import annotations

import pytest
import torch
from deq_problems import DTYPE, gaussian_pca_parts

from deqppl.deq import (
    GMRES,
    Anderson,
    Broyden,
    ConvergenceError,
    ConvergenceWarning,
    FixedPointIteration,
    ImplicitAdjoint,
    Newton,
    NoAdjoint,
    OneStepAdjoint,
    Status,
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


# ----------------------------------------------------------------------------------------------
# second edition: gradients as accurate as the forward solve, the adjoint log, higher order
# ----------------------------------------------------------------------------------------------


def _slow_symmetric_tanh(n, seed=11, batch=4, norm=0.95):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=DTYPE)
    W = A + A.T
    W = norm * W / torch.linalg.matrix_norm(W, ord=2)
    u = 0.5 * torch.randn(batch, n, generator=g, dtype=DTYPE)
    c = torch.randn(batch, n, generator=g, dtype=DTYPE)
    return W, u, c


@pytest.mark.parametrize("n", [16, 48], ids=["direct_default", "gmres_default"])
def test_default_implicit_gradient_matches_long_unrolled_to_1e9(n):
    """Forward at rtol 1e-12, adjoint at its defaults (which follow the forward tolerance)."""
    W0, u, c = _slow_symmetric_tanh(n)
    forward = Anderson(rtol=1e-12, atol=0.0, max_steps=500)

    def loss(W, adjoint):
        sol = fixed_point(lambda z, W: torch.tanh(z @ W + u), torch.zeros_like(u), args=(W,),
                          solver=forward, adjoint=adjoint)
        return (c * sol.value).sum(), sol

    W = W0.clone().requires_grad_()
    value, sol = loss(W, ImplicitAdjoint())
    (implicit,) = torch.autograd.grad(value, W)
    # rho(J) <= 0.95: 0.95^1500 ~ 1e-33, far below the 1e-9 tested
    (unrolled,) = torch.autograd.grad(loss(W, UnrolledAdjoint(num_steps=1500))[0], W)
    rel = torch.linalg.vector_norm(implicit - unrolled) / torch.linalg.vector_norm(unrolled)
    assert rel < 1e-9, float(rel)
    record = sol.adjoint_log.last
    assert record.solver == ("DirectLinearSolver" if n <= 32 else "GMRES")
    assert record.status is Status.CONVERGED and bool(record.rel_residual.max() <= 1e-12)


def test_adjoint_log_reports_the_achieved_residual():
    W, u = _tanh_params(seed=8)
    sol = fixed_point(lambda z, W, u: torch.tanh(z @ W.T + u), torch.zeros_like(u), args=(W, u),
                      solver=Anderson(rtol=1e-9, atol=0.0),
                      adjoint=ImplicitAdjoint(linear_solver=GMRES()))
    assert sol.adjoint_log.last is None  # nothing before backward
    sol.value.sum().backward()
    record = sol.adjoint_log.last
    assert sol.adjoint_log.kinds == ["adjoint"]
    # the followed tolerance is the forward one; the residual reported is recomputed exactly
    u_adj = record.value.detach()
    z = sol.value.detach()
    s = 1.0 - torch.tanh(z @ W.detach().T + u.detach()) ** 2
    jt_u = (s * u_adj) @ W.detach()  # J^T u for J = diag(s) W
    exact = torch.linalg.vector_norm(jt_u + 1.0 - u_adj, dim=1)
    torch.testing.assert_close(record.residual, exact, rtol=1e-6, atol=1e-15)
    assert bool((record.rel_residual <= 1e-9).all())


# torch 2.13 warns on the first torch.func.jvp of a process that torch.jit.script (used by its
# own jvp decompositions) is deprecated; that is torch's internals, not deqppl's.
@pytest.mark.filterwarnings("ignore:.*torch.jit.script.* is deprecated:DeprecationWarning")
def test_hessian_vector_product_through_the_fixed_point():
    """grad of grad and jvp of grad (forward-over-reverse) against differences of gradients."""
    W, u = _tanh_params(seed=9, n=4, batch=3)
    W, u = W.detach(), u.detach()
    c = torch.linspace(-1.0, 1.0, u.numel(), dtype=DTYPE).reshape(u.shape)

    def loss(W):
        z = fixed_point(lambda z, W: torch.tanh(z @ W.T + u), torch.zeros_like(u), args=(W,),
                        solver=Anderson(**TIGHT)).value
        return (c * z).sum() + (z ** 2).sum()

    v = torch.randn(W.shape, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    grad = torch.func.grad(loss)
    _, hvp_fwd = torch.func.jvp(grad, (W,), (v,))
    hvp_rev = torch.func.grad(lambda W: (grad(W) * v).sum())(W)
    eps = 1e-5  # central differences of the gradient: truncation ~1e-10, round-off ~1e-11
    fd = (grad(W + eps * v) - grad(W - eps * v)) / (2 * eps)
    torch.testing.assert_close(hvp_fwd, fd, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(hvp_rev, fd, rtol=1e-7, atol=1e-9)


def test_closure_over_a_transformed_tensor_is_refused():
    W, u = _tanh_params(seed=10)
    W, u = W.detach(), u.detach()

    def loss(W):  # W captured by the closure, not passed through args
        return fixed_point(lambda z: torch.tanh(z @ W.T + u), torch.zeros_like(u)).value.sum()

    with pytest.raises(TypeError, match="args="):
        torch.func.grad(loss)(W)
    with pytest.raises(TypeError, match="args="):
        torch.func.vmap(lambda x: fixed_point(lambda z: torch.tanh(z @ W.T + x),
                                              torch.zeros(1, 3, dtype=DTYPE)).value)(u[:, None])


def test_closure_and_explicit_parameters_give_the_same_gradient():
    W, u = _tanh_params(seed=12)
    closure = torch.autograd.grad(_solve_tanh(W, u).sum(), (W, u))
    explicit_value = fixed_point(lambda z, W, u: torch.tanh(z @ W.T + u), torch.zeros_like(u),
                                 args=(W, u), solver=Anderson(**TIGHT)).value
    explicit = torch.autograd.grad(explicit_value.sum(), (W, u))
    for a, b in zip(closure, explicit):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_pytree_arguments():
    W, u = _tanh_params(seed=13)
    params = {"W": W, "u": u}
    z = fixed_point(lambda z, p, scale: torch.tanh(scale * (z @ p["W"].T + p["u"])),
                    torch.zeros_like(u), args=(params, 1.0), solver=Anderson(**TIGHT)).value
    grads = torch.autograd.grad(z.sum(), (W, u))
    expected = torch.autograd.grad(_solve_tanh(W, u).sum(), (W, u))
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_implicit_adjoint_settings_are_validated():
    with pytest.raises(ValueError, match="at most one"):
        ImplicitAdjoint(solver=Anderson(), linear_solver=GMRES())
    with pytest.raises(TypeError, match="AbstractLinearSolver"):
        ImplicitAdjoint(linear_solver=Anderson())


def test_forward_solve_runs_on_plain_detached_tensors_inside_transforms():
    W, u = _tanh_params(seed=14)
    W, u = W.detach(), u.detach()
    seen = []

    def f(z, W):
        seen.append((torch._C._functorch.is_functorch_wrapped_tensor(z), z.requires_grad,
                     torch.is_grad_enabled()))
        return torch.tanh(z @ W.T + u)

    _, vjp_fn = torch.func.vjp(lambda W: fixed_point(f, torch.zeros_like(u), args=(W,)).value, W)
    # the first call is fixed_point's probe of f at the transform's level; then the solve
    solve_calls = seen[1:]
    assert len(solve_calls) > 3
    assert all(call == (False, False, False) for call in solve_calls), set(solve_calls)
    (grad,) = vjp_fn(torch.ones_like(u))
    assert torch.isfinite(grad).all()
