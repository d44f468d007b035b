"""torch.func transforms through `fixed_point` vs central finite differences, float64.

Solver x problem x transform: `jacrev`, `jvp` and `vmap(grad)` of the implicit adjoint against
central differences of fixed points found by an independent, tighter solve (Newton at rtol
1e-14, no adjoint). Non-contractive problems make plain iteration fail, which must raise inside
the transform; a batch with a sample that has no fixed point raises with ``throw=True`` and
gives NaN (never a number) for that sample with ``throw=False``.
"""

from __future__ import annotations

import pytest
import torch
from deq_problems import BATCH, DTYPE, PARAM_PROBLEMS
from user_solvers import AdaptiveRelaxation

from deqppl.deq import (
    GMRES,
    Anderson,
    Broyden,
    ConvergenceError,
    DirectLinearSolver,
    FixedPointIteration,
    FixedPointLinearSolver,
    ImplicitAdjoint,
    Newton,
    NoAdjoint,
    fixed_point,
)

# torch 2.13 warns on the first torch.func.jvp of a process that torch.jit.script (used by its
# own jvp decompositions) is deprecated; that is torch's internals, not deqppl's.
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*torch.jit.script.* is deprecated:DeprecationWarning")

TIGHT = dict(rtol=1e-12, atol=0.0)
SOLVERS = {
    "plain": FixedPointIteration(max_steps=5000, **TIGHT),
    "anderson": Anderson(**TIGHT),
    "broyden": Broyden(**TIGHT),
    "newton": Newton(**TIGHT),
    "user_relaxation": AdaptiveRelaxation(**TIGHT),
}
# The default adjoint (direct for these small dimensions) and the iterative alternatives.
ADJOINTS = {
    "default": ImplicitAdjoint(),
    "gmres": ImplicitAdjoint(linear_solver=GMRES()),
    "anderson_linear": ImplicitAdjoint(linear_solver=FixedPointLinearSolver()),
}
# Central differences with step 1e-5 on fixed points accurate to ~1e-15: truncation
# O(eps^2 f''') ~ 1e-10, round-off ~1e-15 / 1e-5 = 1e-10; the implicit derivative is accurate
# to ~rtol * ||(I - J)^{-1}|| ~ 1e-11. 1e-7 relative leaves a margin of 100-1000.
EPS, RTOL_FD, ATOL_FD = 1e-5, 1e-7, 1e-9
ORACLE = Newton(rtol=1e-14, atol=0.0, max_steps=100)


def _solve(problem, params, *, solver, adjoint, throw=True):
    return fixed_point(problem.f, problem.z0, args=tuple(params), solver=solver,
                       adjoint=adjoint, jacobian=problem.jacobian, throw=throw)


def _oracle(problem, params):
    with torch.no_grad():
        return _solve(problem, params, solver=ORACLE, adjoint=NoAdjoint()).value


def _directions(problem, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(p.shape, generator=g, dtype=DTYPE) for p in problem.params)


def _fd(problem, directions):
    plus = [p + EPS * v for p, v in zip(problem.params, directions)]
    minus = [p - EPS * v for p, v in zip(problem.params, directions)]
    return (_oracle(problem, plus) - _oracle(problem, minus)) / (2 * EPS)


def _fails(problem, solver):
    return not problem.contractive and isinstance(solver, FixedPointIteration)


@pytest.fixture(params=PARAM_PROBLEMS, ids=[p.__name__[2:] for p in PARAM_PROBLEMS])
def pproblem(request):
    return request.param()


@pytest.mark.parametrize("solver", list(SOLVERS.values()), ids=list(SOLVERS))
def test_jacrev_matches_finite_differences(pproblem, solver):
    adjoint = ImplicitAdjoint()

    def z_star(*params):
        return _solve(pproblem, params, solver=solver, adjoint=adjoint).value

    argnums = tuple(range(len(pproblem.params)))
    if _fails(pproblem, solver):
        with pytest.raises(ConvergenceError, match="FixedPointIteration"):
            torch.func.jacrev(z_star, argnums=argnums)(*pproblem.params)
        return
    jac = torch.func.jacrev(z_star, argnums=argnums)(*pproblem.params)
    v = _directions(pproblem)
    out_dims = pproblem.z0.ndim
    jv = sum(torch.tensordot(j, d, dims=d.ndim) if d.ndim else j * d for j, d in zip(jac, v))
    assert jv.shape == pproblem.z0.shape and out_dims == 2
    torch.testing.assert_close(jv, _fd(pproblem, v), rtol=RTOL_FD, atol=ATOL_FD)


@pytest.mark.parametrize("solver", list(SOLVERS.values()), ids=list(SOLVERS))
def test_jvp_matches_finite_differences(pproblem, solver):
    def z_star(*params):
        return _solve(pproblem, params, solver=solver, adjoint=ImplicitAdjoint()).value

    v = _directions(pproblem, seed=1)
    if _fails(pproblem, solver):
        with pytest.raises(ConvergenceError, match="FixedPointIteration"):
            torch.func.jvp(z_star, pproblem.params, v)
        return
    value, tangent = torch.func.jvp(z_star, pproblem.params, v)
    torch.testing.assert_close(value, _oracle(pproblem, pproblem.params), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(tangent, _fd(pproblem, v), rtol=RTOL_FD, atol=ATOL_FD)


def _per_sample_grads(pproblem, solver, adjoint):
    """vmap over samples (the last parameter is per-sample data) of grad w.r.t. the first."""
    theta, data = pproblem.params[0], pproblem.params[-1]
    middle = pproblem.params[1:-1]
    weights = torch.linspace(-1.0, 1.0, pproblem.z0[0].numel(), dtype=DTYPE).reshape(
        pproblem.z0.shape[1:])
    z0 = pproblem.z0[:1]

    def loss(theta, x):
        params = (theta, *middle, x[None]) if data.ndim >= 1 and data.shape[:1] == (BATCH,) \
            else (theta, *middle, x)
        sol = fixed_point(pproblem.f, z0, args=params, solver=solver, adjoint=adjoint,
                          jacobian=pproblem.jacobian)
        return (weights * sol.value[0]).sum()

    return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(theta, data), weights


@pytest.mark.parametrize("solver", list(SOLVERS.values()), ids=list(SOLVERS))
def test_vmap_grad_per_sample_matches_finite_differences(pproblem, solver):
    if _fails(pproblem, solver):
        with pytest.raises(ConvergenceError, match="FixedPointIteration"):
            _per_sample_grads(pproblem, solver, ImplicitAdjoint())
        return
    grads, weights = _per_sample_grads(pproblem, solver, ImplicitAdjoint())
    theta = pproblem.params[0]
    assert grads.shape == (BATCH, *theta.shape)
    v = _directions(pproblem, seed=2)[0]
    zero = [torch.zeros_like(p) for p in pproblem.params[1:]]
    fd = (_fd(pproblem, (v, *zero)) * weights).flatten(1).sum(1)  # per-sample loss derivative
    got = (grads * v).flatten(1).sum(1) if theta.ndim else grads * v
    torch.testing.assert_close(got, fd, rtol=RTOL_FD, atol=ATOL_FD)


@pytest.mark.parametrize("adjoint", list(ADJOINTS.values()), ids=list(ADJOINTS))
def test_linear_solvers_agree_through_jacrev(pproblem, adjoint):
    def z_star(*params):
        return _solve(pproblem, params, solver=Anderson(**TIGHT), adjoint=adjoint).value

    jac = torch.func.jacrev(z_star)(*pproblem.params)
    v = _directions(pproblem, seed=3)[0]
    jv = torch.tensordot(jac, v, dims=v.ndim) if v.ndim else jac * v
    zero = [torch.zeros_like(p) for p in pproblem.params[1:]]
    torch.testing.assert_close(jv, _fd(pproblem, (v, *zero)), rtol=RTOL_FD, atol=ATOL_FD)


def _impossible_batch():
    """Sample 2 has no fixed point (f(z) = z + 1); the others are z = 0.5 z + b, z* = 2 b."""
    g = torch.Generator().manual_seed(5)
    b = torch.randn(5, 3, generator=g, dtype=DTYPE)
    flag = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0], dtype=DTYPE)[:, None]

    def f(z, b, flag):
        return torch.where(flag > 0, z + 1.0, 0.5 * z + b)

    return f, b, flag


def _per_sample(fn, b, flag):
    # one problem (batch of 1) per vmapped sample, each with its own loss
    grad = torch.func.grad(lambda x, fl: fn(x[None], fl[None]).sum())
    return torch.func.vmap(grad)(b, flag)


# Each returns the per-sample derivatives dz*_i / db_i (diagonal), shape (5, 3).
TRANSFORMS = {
    "jacrev": lambda fn, b, flag: torch.einsum(
        "iaia->ia", torch.func.jacrev(lambda x: fn(x, flag))(b)),
    "jvp": lambda fn, b, flag: torch.func.jvp(lambda x: fn(x, flag), (b,),
                                              (torch.ones_like(b),))[1],
    "vmap_grad": _per_sample,
}


@pytest.mark.parametrize("solver", [Anderson(), Broyden(max_steps=50), Newton(),
                                    FixedPointIteration(), AdaptiveRelaxation(max_steps=300)],
                         ids=["anderson", "broyden", "newton", "plain", "user_relaxation"])
@pytest.mark.parametrize("transform", list(TRANSFORMS.values()), ids=list(TRANSFORMS))
def test_sample_without_fixed_point_raises_or_is_nan(solver, transform):
    f, b, flag = _impossible_batch()

    def z_star(b, flag, throw=True):
        return fixed_point(f, torch.zeros_like(b), args=(b, flag), solver=solver,
                           throw=throw).value

    with pytest.raises(ConvergenceError, match="failed for 1 of"):
        transform(z_star, b, flag)
    out = transform(lambda x, fl: z_star(x, fl, throw=False), b, flag)
    assert out.shape == (5, 3)
    assert torch.isnan(out[2]).all()  # no number for the sample without a fixed point
    good = torch.cat([out[:2], out[3:]])
    # dz*_i / db_i = 2 where it converged (default rtol 1e-6 on a linear map: the derivative
    # of the linear solve is exact up to the followed tolerance)
    torch.testing.assert_close(good, torch.full_like(good, 2.0), rtol=1e-5, atol=1e-5)


def test_batched_error_names_the_failed_sample():
    f, b, flag = _impossible_batch()
    with pytest.raises(ConvergenceError, match="1 of 5 samples.*at sample 2"):
        torch.func.jacrev(lambda x: fixed_point(f, torch.zeros_like(x), args=(x, flag)).value)(b)
