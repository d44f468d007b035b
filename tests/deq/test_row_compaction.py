"""Row compaction: on rows declared independent the driver steps only the rows still iterating.

Oracle: the same solve on the whole batch (``rows_independent=False``, the path of every solve
before compaction). The per-row computations are the same, so values, flags, statuses, step and
evaluation counts must agree (values to 1e-12: batched BLAS may round a subset differently),
while the number of rows evaluated must drop.
"""

import pytest
import torch

from deqppl.deq import (
    Anderson,
    Broyden,
    FixedPointIteration,
    FixedPointProblem,
    Newton,
    fixed_point,
    run_solver,
)
from deqppl.encoders import DeepPEDEncoder, KernelGLMEncoder, PEDEncoder
from deqppl.expfam import bernoulli, gaussian, poisson, smooth_relu
from deqppl.models import ExpFamPCA, HierarchicalExpFamPCA


B, N = 40, 3
SOLVERS = [
    ("newton", Newton(rtol=1e-12, atol=0.0)),
    ("newton-nols", Newton(rtol=1e-12, atol=0.0, line_search=False)),
    ("anderson", Anderson(rtol=1e-12, atol=0.0)),
    ("broyden", Broyden(rtol=1e-12, atol=0.0)),
    ("fpi", FixedPointIteration(rtol=1e-12, atol=0.0)),
]


def _problem(seed=0):
    """tanh map with per-row drives spanning four orders of magnitude: rows stop at different steps."""
    gen = torch.Generator().manual_seed(seed)
    A = 0.3 * torch.randn(N, N, generator=gen, dtype=torch.float64)
    c = torch.randn(B, N, generator=gen, dtype=torch.float64) \
        * torch.logspace(-2, 2, B, dtype=torch.float64)[:, None]
    calls = []

    def f(z, A, rows=None):
        calls.append(None if rows is None else rows.clone())
        return torch.tanh(z @ A.T + (c if rows is None else c.index_select(0, rows)))

    return f, A, calls


def _same(a, b, *, atol=1e-12, residual_scale=None):
    # 1e-12 (float64): the per-row arithmetic is the same, but BLAS may round a subset of the
    # rows differently from the whole batch (bitwise equal on these problems on some CPUs, not
    # on all). A converged row's residual sits at its rounding floor, which grows with the size
    # of the layer's output: ``residual_scale`` (per row) scales its tolerance.
    torch.testing.assert_close(a.value, b.value, atol=atol, rtol=0.0)
    assert torch.equal(a.converged, b.converged)
    assert a.status is b.status
    assert (a.num_steps, a.num_fevals, a.num_jac_evals) == (b.num_steps, b.num_fevals, b.num_jac_evals)
    if residual_scale is None:
        torch.testing.assert_close(a.residual, b.residual, atol=atol, rtol=0.0)  # inf == inf
    else:
        assert torch.equal(torch.isfinite(a.residual), torch.isfinite(b.residual))
        gap = (a.residual - b.residual).abs().nan_to_num(0.0)
        assert bool((gap <= atol * (1.0 + residual_scale)).all()), (gap, residual_scale)


@pytest.mark.parametrize("solver", [s for _, s in SOLVERS], ids=[i for i, _ in SOLVERS])
def test_compacted_solve_equals_full_batch(solver):
    f, A, calls = _problem()
    z0 = torch.zeros(B, N, dtype=torch.float64)
    full = fixed_point(f, z0, args=(A,), solver=solver, throw=False)
    assert all(r is None for r in calls)  # not declared: f is never asked for a subset
    compact = fixed_point(f, z0, args=(A,), solver=solver, throw=False, rows_independent=True)
    _same(full, compact)
    assert bool(compact.converged.all())
    # full batch: every evaluation on all B rows; compacted: strictly fewer rows in total
    assert full.num_row_fevals == full.num_fevals * B
    assert compact.num_row_fevals < full.num_row_fevals
    assert any(r is not None and 0 < r.numel() < B for r in calls)


def test_compacted_gradient_equals_full_batch():
    f, A, _ = _problem()
    z0 = torch.zeros(B, N, dtype=torch.float64)
    grads = []
    for flag in (False, True):
        A_ = A.clone().requires_grad_(True)
        sol = fixed_point(f, z0, args=(A_,), solver=Newton(rtol=1e-12, atol=0.0), rows_independent=flag)
        (g,) = torch.autograd.grad((sol.value ** 2).sum(), A_)
        grads.append(g)
    assert (grads[0] - grads[1]).abs().max() <= 1e-12


def test_newton_counts_fewer_jacobian_rows():
    f, A, _ = _problem()
    z0 = torch.zeros(B, N, dtype=torch.float64)
    full = fixed_point(f, z0, args=(A,), solver=Newton(rtol=1e-12, atol=0.0), throw=False)
    compact = fixed_point(f, z0, args=(A,), solver=Newton(rtol=1e-12, atol=0.0), throw=False,
                          rows_independent=True)
    assert full.num_row_jac_evals == full.num_jac_evals * B
    assert compact.num_row_jac_evals < full.num_row_jac_evals


def test_unconverged_and_nonfinite_rows_are_reported_alike():
    # row 0 has no fixed point (z + 1), row 1 becomes non-finite (log of a negative number),
    # the others converge: the per-sample flags and the status must not depend on compaction.
    c = torch.linspace(0.5, 3.0, B, dtype=torch.float64)[:, None].expand(B, N).clone()

    def f(z, rows=None):
        cc = c if rows is None else c.index_select(0, rows)
        out = 0.5 * z + cc
        bad0 = (torch.arange(B) if rows is None else rows) == 0
        bad1 = (torch.arange(B) if rows is None else rows) == 1
        out = torch.where(bad0[:, None], z + 1.0, out)
        return torch.where(bad1[:, None], torch.log(cc - 10.0 * z.abs() - 1.0), out)

    z0 = torch.zeros(B, N, dtype=torch.float64)
    for solver in (Anderson(rtol=1e-12, atol=0.0, max_steps=100),
                   FixedPointIteration(rtol=1e-12, atol=0.0, max_steps=100)):
        full = fixed_point(f, z0, solver=solver, throw=False)
        compact = fixed_point(f, z0, solver=solver, throw=False, rows_independent=True)
        _same(full, compact)
        assert not bool(full.converged[:2].any()) and bool(full.converged[2:].all())


def test_problem_without_subset_is_never_compacted():
    problem = FixedPointProblem(lambda z: 0.5 * z + 1.0)
    assert not problem.rows_independent
    with pytest.raises(ValueError, match="not declared independent"):
        problem.restrict(torch.tensor([0]))
    z0 = torch.linspace(-1e3, 1e3, B, dtype=torch.float64)[:, None]
    sol = run_solver(FixedPointIteration(rtol=1e-12, atol=0.0), problem, z0)
    assert sol.num_row_fevals == sol.num_fevals * B


def test_solver_without_support_is_not_compacted():
    from dataclasses import dataclass

    from deqppl.deq import AbstractSolver

    @dataclass(frozen=True, kw_only=True)
    class Relaxed(AbstractSolver):  # a user solver that does not declare compaction support
        rtol: float = 1e-12
        atol: float = 0.0
        max_steps: int = 500

        def __post_init__(self):
            self._check_common()

        def init(self, problem, z0, fz0):
            return None

        def step(self, problem, state, iterate):
            return iterate.z + 0.5 * iterate.residual, None, state

    f, A, calls = _problem()
    sol = fixed_point(f, torch.zeros(B, N, dtype=torch.float64), args=(A,), solver=Relaxed(),
                      rows_independent=True)
    assert sol.num_row_fevals == sol.num_fevals * B
    assert all(r is None for r in calls)


def test_rows_independent_must_be_bool():
    with pytest.raises(TypeError, match="rows_independent must be a bool"):
        fixed_point(torch.cos, torch.zeros(2, 1), rows_independent=1)


# ------------------------------------------------------------------ encoders
def _full_batch(enc, data, z0):
    """The same encoder solve on the whole batch: the layer without a row subset."""
    return fixed_point(lambda z: enc.layer(z, data), z0, solver=enc.default_solver(z0.dtype),
                       jacobian=lambda z: enc.layer_jacobian(z, data), throw=False)


# (id, family, nonlinearity, param_scale, whether rows stop at different steps). The Gaussian
# map is linear: one Newton step solves every row, so there is nothing to compact.
PED_CASES = [
    ("gaussian", gaussian(), None, 1.0, False),
    ("bernoulli", bernoulli(), None, 1.0, True),
    ("bernoulli-smooth_relu", bernoulli(), smooth_relu(0.5), 0.5, True),
    ("poisson", poisson(), None, 0.5, True),
    ("poisson-huge-counts", poisson(), None, 1.0, True),
]


@pytest.mark.parametrize("fam, nl, scale, drops", [c[1:] for c in PED_CASES],
                         ids=[c[0] for c in PED_CASES])
def test_ped_compacted_equals_full_batch(fam, nl, scale, drops):
    kw = {} if nl is None else {"nonlinearity": nl}
    model = ExpFamPCA(family=fam, obs_dim=6, latent_dim=2, param_scale=scale, **kw)
    sim = model.simulate(60, seed=0, dtype=torch.float64)
    y = sim.data["y"]
    if fam == poisson() and scale == 1.0:
        y = y.clone()
        y[:3] = torch.tensor([1e7, 3e6, 2e7], dtype=torch.float64)[:, None]  # a few huge rows
    enc = PEDEncoder(model, W=sim.truth["W"], B=sim.truth["B"])
    assert PEDEncoder.rows_independent
    data = enc.check_data(y)
    z0 = enc.initial_guess(data)
    compact = enc.solve(data, z0=z0, throw=False, validated=True)
    full = _full_batch(enc, data, z0)
    # rounding floor of a row's residual: its layer output, of the size of W^T T(y) / lam
    _same(full, compact, residual_scale=y.abs().sum(1) * sim.truth["W"].abs().max())
    assert bool(full.converged.all())
    assert full.num_row_fevals == full.num_fevals * y.shape[0]
    if drops:
        assert compact.num_row_fevals < full.num_row_fevals
        assert compact.num_row_jac_evals < full.num_row_jac_evals
    else:
        assert compact.num_row_fevals == full.num_row_fevals


def test_deep_ped_compacted_equals_full_batch():
    model = HierarchicalExpFamPCA(widths=(6, 4, 2), nonlinearities=(smooth_relu(0.5), smooth_relu(0.5)),
                                  precisions=(2.0, 1.5, 0.7), param_scale=0.5)
    sim = model.simulate(50, seed=1, dtype=torch.float64)
    enc = DeepPEDEncoder.from_values(model, {k: sim.truth[k] for k in model.global_sites})
    data = enc.check_data(sim.data["y"])
    z0 = enc.initial_guess(data)
    compact = enc.solve(data, z0=z0, throw=False, validated=True)
    full = fixed_point(lambda z: enc.layer(z, data), z0, solver=enc.default_solver(z0.dtype),
                       jacobian=lambda z: enc.layer_jacobian(z, data), throw=False)
    _same(full, compact)
    assert compact.num_row_fevals <= full.num_row_fevals


def test_coupled_encoder_does_not_declare_independent_rows():
    # the kernel GLM's latents are coupled through the kernel: its rows must never be compacted
    assert not KernelGLMEncoder.rows_independent
