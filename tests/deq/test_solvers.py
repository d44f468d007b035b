"""One table of fixed-point problems crossed with one table of solvers."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from deqppl.deq import (
    Anderson,
    Broyden,
    ConvergenceError,
    FixedPointIteration,
    Newton,
    Status,
    fixed_point,
)

from deq_problems import BATCH, DTYPE, gaussian_pca, gaussian_pca_parts, problem  # noqa: F401 (fixture)
from user_solvers import AdaptiveRelaxation, DouglasRachford

TIGHT = dict(rtol=1e-11, atol=1e-13)  # well above float64 round-off, so every solver can reach it

SOLVERS = {
    "plain": FixedPointIteration(max_steps=2000, **TIGHT),
    "damped": FixedPointIteration(damping=0.7, max_steps=3000, **TIGHT),
    "anderson": Anderson(**TIGHT),
    "anderson_m2_damped": Anderson(memory=2, damping=0.5, restart=10, **TIGHT),
    "anderson_absolute_ridge_off": Anderson(ridge=0.0, **TIGHT),
    "broyden": Broyden(**TIGHT),
    "newton": Newton(**TIGHT),
    "newton_no_line_search": Newton(line_search=False, **TIGHT),
    # written in tests/deq/user_solvers.py against the public protocol only
    "user_adaptive_relaxation": AdaptiveRelaxation(**TIGHT),
}


@pytest.mark.parametrize("solver", list(SOLVERS.values()), ids=list(SOLVERS))
def test_solver_finds_known_fixed_point(problem, solver):
    if not problem.contractive and isinstance(solver, FixedPointIteration):
        # (Damped) plain iteration diverges on this non-contractive map (SPEC 2.3): it must say
        # so through the status and the per-sample mask, without raising when throw=False.
        sol = fixed_point(problem.f, problem.z0, solver=solver, throw=False)
        assert sol.status is not Status.CONVERGED
        assert not sol.converged.all()
        return
    sol = fixed_point(problem.f, problem.z0, solver=solver)
    assert sol.status is Status.CONVERGED
    assert sol.converged.all()
    assert sol.value.shape == problem.z0.shape and sol.value.dtype == DTYPE
    tol = solver.atol + solver.rtol * torch.linalg.vector_norm(problem.f(sol.value), dim=1)
    assert (sol.residual <= tol).all()
    # error <= ||(I - J)^{-1}|| * residual, with a factor 10 for the linearization
    err = torch.linalg.vector_norm(sol.value - problem.solution, dim=1)
    assert (err <= 10 * problem.amplification * tol).all(), err
    assert sol.num_fevals >= sol.num_steps


def test_default_solver_converges_on_every_problem(problem):
    sol = fixed_point(problem.f, problem.z0)
    assert sol.solver == "Anderson" and sol.status is Status.CONVERGED
    # default rtol 1e-6 on the residual; error amplified by at most `amplification` (10x margin)
    scale = torch.linalg.vector_norm(problem.solution, dim=1)
    err = torch.linalg.vector_norm(sol.value.detach() - problem.solution, dim=1)
    assert (err <= 10 * problem.amplification * (1e-6 * scale + 1e-8)).all(), err


def test_pca_map_is_not_a_contraction():
    W, _, _, lam = gaussian_pca_parts()
    assert torch.linalg.eigvalsh(W.T @ W).max() > lam  # SPEC 2.3: plain iteration must diverge


def test_plain_iteration_fails_on_pca_without_throw():
    problem = gaussian_pca()
    sol = fixed_point(problem.f, problem.z0, solver=FixedPointIteration(), throw=False)
    assert sol.status in (Status.DIVERGED, Status.NONFINITE)
    assert not sol.converged.any()
    assert torch.isfinite(sol.value).all()  # the best finite iterate is kept, flagged


def test_plain_iteration_fails_on_pca_with_throw():
    problem = gaussian_pca()
    with pytest.raises(ConvergenceError, match=r"worst residual .* at sample \d") as info:
        fixed_point(problem.f, problem.z0, solver=FixedPointIteration())
    message = str(info.value)
    assert f"{BATCH} of {BATCH} samples" in message and "FixedPointIteration" in message
    assert "Anderson" in message and "damping" in message  # says what to try
    assert info.value.solution.status is Status.DIVERGED


def test_newton_uses_supplied_jacobian():
    W, bias, y, lam = gaussian_pca_parts()
    problem = gaussian_pca()
    jac = -(W.T @ W) / lam

    def jacobian(z):
        return jac.expand(z.shape[0], 2, 2)

    sol = fixed_point(problem.f, problem.z0, solver=Newton(**TIGHT), jacobian=jacobian)
    auto = fixed_point(problem.f, problem.z0, solver=Newton(**TIGHT))
    assert torch.allclose(sol.value, problem.solution, atol=1e-10)
    assert torch.allclose(auto.value, problem.solution, atol=1e-10)
    assert sol.num_jac_evals >= 1 and sol.num_steps <= 2  # linear: one Newton step is exact


def test_per_sample_convergence_mask():
    """Sample 2 has no fixed point (f(z) = z + 1); the others are easy contractions."""
    g = torch.Generator().manual_seed(5)
    b = torch.randn(5, 3, generator=g, dtype=DTYPE)
    impossible = torch.tensor([False, False, True, False, False])[:, None]

    def f(z):
        return torch.where(impossible, z + 1.0, 0.5 * z + b)

    for solver in (Anderson(), FixedPointIteration(), Broyden(max_steps=50), Newton()):
        sol = fixed_point(f, torch.zeros_like(b), solver=solver, throw=False)
        assert sol.converged.tolist() == [True, True, False, True, True], solver
        assert sol.status is not Status.CONVERGED
        good = ~impossible[:, 0]
        assert torch.allclose(sol.value[good], 2.0 * b[good], atol=1e-5)
        with pytest.raises(ConvergenceError, match="1 of 5 samples.*at sample 2"):
            fixed_point(f, torch.zeros_like(b), solver=solver)


def test_converged_samples_are_frozen_and_independent_of_the_batch():
    problem = gaussian_pca()
    alone = fixed_point(problem.f, problem.z0).value.detach()
    # same problems with a harder extra sample appended: results of the others must not move
    W, bias, y, lam = gaussian_pca_parts()
    y2 = torch.cat([y, 100.0 * y[:1]])

    def f2(z):
        return (y2 - bias - z @ W.T) @ W / lam

    both = fixed_point(f2, torch.zeros(BATCH + 1, 2, dtype=DTYPE)).value.detach()
    assert torch.allclose(both[:BATCH], alone, rtol=1e-12, atol=1e-14)


def test_trace_records_residual_per_step():
    problem = gaussian_pca()
    sol = fixed_point(problem.f, problem.z0, trace=True)
    assert sol.trace is not None and sol.trace.shape == (sol.num_steps + 1,)
    assert float(sol.trace[-1]) == pytest.approx(float(sol.residual.max()))
    assert fixed_point(problem.f, problem.z0).trace is None


def test_event_dims_dtype_and_repr():
    z0 = torch.zeros(3, 2, 4, dtype=torch.float32)
    sol = fixed_point(lambda z: 0.5 * torch.cos(z), z0)
    assert sol.value.shape == (3, 2, 4) and sol.value.dtype == torch.float32
    assert sol.residual.shape == (3,) and sol.converged.shape == (3,)
    assert sol.rel_residual.dtype == torch.float32
    text = repr(sol)
    assert "CONVERGED" in text and "Anderson" in text and "3/3" in text


def test_solvers_are_frozen_and_keyword_only():
    solver = Anderson()
    with pytest.raises(dataclasses.FrozenInstanceError):
        solver.memory = 3
    with pytest.raises(TypeError):
        Anderson(5)
    assert dataclasses.replace(solver, memory=3).memory == 3


def test_user_solver_gives_up_through_terminate():
    """f(z) = z + 1 + z^2 has no real fixed point: every step grows the residual 1 + z^2, so
    beta halves down to min_beta and the solver gives up."""
    def f(z):
        return z + 1.0 + z * z

    sol = fixed_point(f, torch.zeros(2, 3, dtype=DTYPE),
                      solver=AdaptiveRelaxation(min_beta=1e-3), throw=False)
    assert sol.status is Status.STAGNATED and not sol.converged.any()
    assert sol.num_steps < 50  # ten halvings, not max_steps
    with pytest.raises(ConvergenceError, match="STAGNATED"):
        fixed_point(f, torch.zeros(2, 3, dtype=DTYPE), solver=AdaptiveRelaxation(min_beta=1e-3))


def _mondeq(seed=0, n=6, batch=4, m=0.5):
    """z = relu(W z + x), W = (1 - m) I - A^T A + B - B^T (Winston & Kolter, 2020): I - W >= mI.

    A is scaled so that ||W||_2 > 1: plain iteration is not guaranteed to converge.
    """
    g = torch.Generator().manual_seed(seed)
    A = 1.5 * torch.randn(n, n, generator=g, dtype=DTYPE) / n**0.5
    B = torch.randn(n, n, generator=g, dtype=DTYPE) / n**0.5
    W = (1 - m) * torch.eye(n, dtype=DTYPE) - A.T @ A + B - B.T
    x = torch.randn(batch, n, generator=g, dtype=DTYPE)
    return W, x


def _douglas_rachford_for(W, x):
    n = W.shape[0]
    eye = torch.eye(n, dtype=DTYPE)
    # alpha = 1 / sqrt(m L) with L = ||I - W||_2 balances the two resolvents (a standard DR
    # step-size choice for a strongly monotone, Lipschitz operator)
    alpha = 1.0 / (0.5 * float(torch.linalg.matrix_norm(eye - W, ord=2))) ** 0.5
    inverse = torch.linalg.inv(eye + alpha * (eye - W))

    def resolvent(v):  # (I + alpha (I - W))^{-1} (v + alpha x)
        return (v + alpha * x) @ inverse.T

    return DouglasRachford(resolvent=resolvent, rtol=1e-12, atol=0.0)


def test_user_splitting_solver_with_a_resolvent():
    """Douglas-Rachford with the user's resolvent of the linear part, through the protocol."""
    W, x = _mondeq()
    assert float(torch.linalg.matrix_norm(W, ord=2)) > 1.0

    def f(z, W):
        return torch.relu(z @ W.T + x)

    def solve(W):
        return fixed_point(f, torch.zeros_like(x), args=(W,),
                           solver=_douglas_rachford_for(W.detach(), x))

    sol = solve(W)
    assert sol.status is Status.CONVERGED and sol.solver == "DouglasRachford"
    # oracle: the monotone inclusion has a unique solution, also found by full-step Newton
    # (the map is piecewise linear: Newton is an active-set iteration, exact once it settles)
    oracle = fixed_point(f, torch.zeros_like(x), args=(W,),
                         solver=Newton(rtol=1e-13, atol=0.0, line_search=False, max_steps=100))
    torch.testing.assert_close(sol.value, oracle.value, rtol=1e-10, atol=1e-11)
    # the implicit gradient works with the user's solver like with any other
    jac = torch.func.jacrev(lambda W: solve(W).value)(W)
    v = torch.randn(W.shape, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    eps = 1e-6  # piecewise linear map: central differences exact away from kinks
    with torch.no_grad():
        fd = (solve(W + eps * v).value - solve(W - eps * v).value) / (2 * eps)
    # fixed points to ~1e-12 relative, differenced over 2e-6: ~1e-6 noise
    torch.testing.assert_close(torch.tensordot(jac, v, dims=2), fd, rtol=1e-5, atol=1e-5)
