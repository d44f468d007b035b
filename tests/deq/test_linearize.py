"""fixed_point's ``linearize`` (f with what its Jacobian shares) and the driver's select_rows."""

import pytest
import torch

from deqppl.deq import Anderson, Newton, fixed_point
from deqppl.deq.protocol import FixedPointProblem, select_rows

B, N = 40, 3


def _problem(seed=0):
    """f(z) = tanh(z A^T + c) per row; its Jacobian diag(1 - f^2) A shares f's tanh."""
    gen = torch.Generator().manual_seed(seed)
    A = 0.4 * torch.randn(N, N, generator=gen, dtype=torch.float64)
    c = torch.randn(B, N, generator=gen, dtype=torch.float64) \
        * torch.logspace(-2, 1, B, dtype=torch.float64)[:, None]
    counts = {"f": 0, "jac": 0, "lin": 0, "lin_jac": 0}

    def rows_of(t, rows):
        return t if rows is None else t.index_select(0, rows)

    def f(z, rows=None):
        counts["f"] += 1
        return torch.tanh(z @ A.T + rows_of(c, rows))

    def jac(z, rows=None):
        counts["jac"] += 1
        t = torch.tanh(z @ A.T + rows_of(c, rows))
        return (1 - t * t)[:, :, None] * A

    def linearize(z, rows=None):
        counts["lin"] += 1
        t = torch.tanh(z @ A.T + rows_of(c, rows))

        def jacobian(keep=None):
            counts["lin_jac"] += 1
            s = t if keep is None else t.index_select(0, keep)
            return (1 - s * s)[:, :, None] * A

        return t, jacobian

    return f, jac, linearize, counts


@pytest.mark.parametrize("compact", [False, True], ids=["full-batch", "compacted"])
def test_linearize_gives_the_same_solve_and_reuses_the_evaluation(compact):
    f, jac, linearize, counts = _problem()
    z0 = torch.zeros(B, N, dtype=torch.float64)
    solver = Newton(rtol=1e-12, atol=0.0)
    # without a graph, as an encoder's inference (with one, fixed_point's probe evaluates f(z0)
    # and Newton's first Jacobian is formed afresh)
    with torch.no_grad():
        plain = fixed_point(f, z0, solver=solver, jacobian=jac, rows_independent=compact)
        assert counts["lin"] == 0
        fresh_jacobians = counts["jac"]
        fused = fixed_point(f, z0, solver=solver, jacobian=jac, rows_independent=compact,
                            linearize=linearize)
    torch.testing.assert_close(fused.value, plain.value, rtol=0, atol=1e-14)
    assert torch.equal(fused.converged, plain.converged)
    assert (fused.num_steps, fused.num_fevals, fused.num_jac_evals) == \
        (plain.num_steps, plain.num_fevals, plain.num_jac_evals)
    assert fused.num_row_jac_evals == plain.num_row_jac_evals
    # every Jacobian came from a linearization: the driver linearized z0 for Newton's first
    # step, the line search every trial; none was formed afresh
    assert counts["jac"] == fresh_jacobians
    assert counts["lin_jac"] == fused.num_jac_evals
    assert counts["lin"] >= fused.num_jac_evals


def test_linearize_is_unused_by_solvers_without_jacobians():
    f, jac, linearize, counts = _problem()
    z0 = torch.zeros(B, N, dtype=torch.float64)
    fixed_point(f, z0, solver=Anderson(rtol=1e-10, atol=0.0), jacobian=jac, linearize=linearize)
    assert counts["lin"] == 0


def test_linearize_is_checked():
    f, jac, linearize, _ = _problem()
    z0 = torch.zeros(B, N, dtype=torch.float64)
    with pytest.raises(ValueError, match="linearize needs jacobian"):
        fixed_point(f, z0, solver=Newton(), linearize=linearize)
    with pytest.raises(TypeError, match="linearize must return a pair"):
        fixed_point(f, z0, solver=Newton(), jacobian=jac, linearize=lambda z: f(z))
    with pytest.raises(ValueError, match="jacobian must return a tensor of shape"):
        fixed_point(f, z0, solver=Newton(), jacobian=jac,
                    linearize=lambda z: (f(z), lambda keep=None: torch.zeros(B, N)))
    with pytest.raises(ValueError, match="linearize needs jac"):
        FixedPointProblem(torch.cos, linearize=lambda z: (torch.cos(z), None))


def test_select_rows_is_where():
    a = torch.arange(12.0).reshape(4, 3)
    b = -a
    for mask in ([True] * 4, [False] * 4, [True, False, False, True]):
        m = torch.tensor(mask)
        assert torch.equal(select_rows(m, a, b), torch.where(m[:, None], a, b))
        assert torch.equal(select_rows(m, a[:, 0], b[:, 0]), torch.where(m, a[:, 0], b[:, 0]))
    assert select_rows(torch.ones(4, dtype=torch.bool), a, b) is a  # uniform: no copy


def test_solution_never_aliases_the_start():
    z0 = torch.zeros(2, 1, dtype=torch.float64)
    sol = fixed_point(lambda z: 0 * z, z0, solver=Newton(rtol=1e-10, atol=1e-12))
    assert sol.num_steps == 0
    sol.value.add_(1.0)
    assert bool((z0 == 0).all())
