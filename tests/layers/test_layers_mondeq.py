"""Monotone-operator DEQ baseline and the unconstrained DEQ: oracles are the complementarity
(KKT) conditions of the monotone inclusion, the dense operator, and finite differences."""

from __future__ import annotations

import pytest
import torch

from deqppl.deq import (AbstractSolver, DirectLinearSolver, FixedPointIteration, ImplicitAdjoint,
                        Status, fixed_point)
from deqppl.layers import (DEQConv2d, DEQLinear, ForwardBackward, MonDEQConv2d, MonDEQLinear,
                           PeacemanRachford)
from deqppl.layers._weights import ConvWeight

DTYPE = torch.float64
TIGHT = dict(rtol=1e-12, atol=0.0, max_steps=20000)
SPLITTINGS = {"pr": PeacemanRachford(**TIGHT), "pr_alpha0.3": PeacemanRachford(alpha=0.3, **TIGHT),
              "fb": ForwardBackward(**TIGHT)}
#: Forward-backward converges at rate sqrt(1 - m^2 / L^2): with the default m = 0.05 it needs
#: thousands of steps for 1e-12, so its tests use a margin of 0.5 (tens of steps per digit).
MARGIN = {"pr": 0.05, "pr_alpha0.3": 0.05, "fb": 0.5}
#: Exact backward: J = diag(relu') W of a monDEQ need not be a contraction (plain iteration on
#: the adjoint may diverge), so the tight adjoint owns a dense LU solver.
TIGHT_ADJOINT = ImplicitAdjoint(linear_solver=DirectLinearSolver(rtol=1e-12))


def kkt_violation(layer, x, z):
    """z* solves 0 in (I - W) z - q + N_{>=0}(z): z >= 0, w = (I - W) z - q >= 0, z.w = 0."""
    with torch.no_grad():
        q = layer.injection(x)
        w = z - layer.apply_w(z) - q
        return max(float((-z).clamp(min=0).max()), float((-w).clamp(min=0).max()),
                   float((z * w).abs().max()))


@pytest.mark.parametrize("name", list(SPLITTINGS))
def test_linear_mondeq_solves_the_inclusion(name):
    layer = MonDEQLinear(5, 12, splitting=SPLITTINGS[name], margin=MARGIN[name],
                         adjoint=TIGHT_ADJOINT, seed=1, dtype=DTYPE)
    layer.scale_weight_(2.0)  # a strongly non-normal W: still monotone with margin m
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    sol = layer.solve(x)
    assert sol.solution.status is Status.CONVERGED
    assert kkt_violation(layer, x, sol.value) < 1e-9
    w = layer.weight().detach()
    i_minus_w = torch.eye(12, dtype=DTYPE) - w
    sym_min = float(torch.linalg.eigvalsh(0.5 * (i_minus_w + i_minus_w.T)).min())
    assert sol.extra["measured_margin"] == pytest.approx(sym_min)
    assert sym_min >= layer.margin - 1e-12  # I - W >= m I by construction
    # the same fixed point by the other splitting
    other = MonDEQLinear(5, 12, splitting=PeacemanRachford(alpha=2.0, **TIGHT),
                         margin=MARGIN[name], seed=1, dtype=DTYPE)
    other.load_state_dict(layer.state_dict())
    assert torch.allclose(other.solve(x).value, sol.value, atol=1e-9)


@pytest.mark.parametrize("name", ["pr", "fb"])
def test_mondeq_implicit_gradient_matches_finite_differences(name):
    layer = MonDEQLinear(4, 8, splitting=SPLITTINGS[name], margin=MARGIN[name],
                         adjoint=TIGHT_ADJOINT, seed=2, dtype=DTYPE)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    c = torch.randn(3, 8, generator=torch.Generator().manual_seed(2), dtype=DTYPE)

    def loss():
        return (layer(x) * c).sum()

    params = list(layer.parameters())
    loss().backward()
    direction = [torch.randn(p.shape, generator=torch.Generator().manual_seed(3 + i),
                             dtype=DTYPE) for i, p in enumerate(params)]
    analytic = sum(float((p.grad * d).sum()) for p, d in zip(params, direction))
    h = 1e-6  # ReLU kinks: a small step keeps every active set fixed at these random points
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(h * d)
        up = float(loss())
        for p, d in zip(params, direction):
            p.sub_(2 * h * d)
        down = float(loss())
    # central differences with h = 1e-6 on a loss of size ~1: round-off ~1e-10 / 1e-6 = 1e-4
    # relative at worst; truncation is zero between kinks (piecewise linear in the step)
    assert analytic == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-7)


def test_conv_mondeq_fourier_operators_match_the_convolutions():
    layer = MonDEQConv2d(2, 3, splitting=PeacemanRachford(**TIGHT), seed=0, dtype=DTYPE)
    z = torch.randn(2, 3, 6, 5, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    w_hat = layer.fourier_weight(6, 5).detach()
    via_fft = torch.fft.ifft2(torch.einsum("hwoc,bchw->bohw", w_hat, torch.fft.fft2(z))).real
    assert torch.allclose(via_fft, layer.apply_w(z), atol=1e-12)
    # the resolvent inverts I + alpha (I - W)
    _, measured, resolvent = layer._operators(z)
    r = resolvent(0.7)(z)
    assert torch.allclose(r + 0.7 * (r - layer.apply_w(r)), z, atol=1e-10)
    assert measured >= layer.margin - 1e-12


@pytest.mark.parametrize("name", ["pr", "fb"])
def test_conv_mondeq_solves_the_inclusion(name):
    layer = MonDEQConv2d(1, 3, splitting=SPLITTINGS[name], margin=MARGIN[name], seed=0,
                         dtype=DTYPE)
    x = torch.randn(2, 1, 5, 5, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    sol = layer.solve(x)
    assert sol.solution.status is Status.CONVERGED
    assert kkt_violation(layer, x, sol.value) < 1e-9


@pytest.mark.parametrize("circular", [False, True], ids=["zero_pad", "circular"])
def test_conv_transpose_is_the_adjoint(circular):
    op = ConvWeight(3, 2, 3, circular=circular, cone=None, weight_norm=True, bias=False,
                    init_scale=1.0, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    z = torch.randn(2, 2, 5, 6, dtype=DTYPE)
    y = torch.randn(2, 3, 5, 6, dtype=DTYPE)
    lhs = (op.apply(z, bias=False) * y).sum()
    rhs = (z * op.apply_transpose(y)).sum()
    assert float(lhs.detach()) == pytest.approx(float(rhs.detach()), rel=1e-12)


def test_unconstrained_deq_matches_pcdeq_shape_and_can_fail_loudly():
    layer = DEQLinear(4, 10, seed=0, dtype=DTYPE, throw=False)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    assert layer.solve(x).solution.status is Status.CONVERGED
    # W of any sign scaled far up: nothing guarantees a fixed point is found, and the solution
    # must say whether it was (never a silent success)
    layer.scale_weight_(30.0)
    sol = layer.solve(x)
    with torch.no_grad():
        res = (layer.layer(sol.value, layer.injection(x)) - sol.value).norm(dim=1)
    converged = sol.solution.converged
    assert bool((res[converged] <= 1e-4 * sol.value.norm(dim=1)[converged] + 1e-8).all())
    assert bool((sol.solution.residual[~converged] > 0).all())
    conv = DEQConv2d(1, 2, dtype=DTYPE)
    assert conv(torch.randn(1, 1, 4, 4, dtype=DTYPE)).shape == (1, 2, 4, 4)


def test_splittings_are_solvers_of_the_public_protocol():
    """A user can run a splitting through fixed_point with a bound operator: the stopping rule
    is then the DEQ map's own residual, like every other solver's."""
    assert isinstance(PeacemanRachford(), AbstractSolver)
    layer = MonDEQLinear(3, 7, seed=4, dtype=DTYPE)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    with torch.no_grad():
        u = layer.injection(x)
        operator = layer.monotone_operator(u)
        for splitting in (PeacemanRachford(**TIGHT), ForwardBackward(**TIGHT)):
            sol = fixed_point(lambda z: layer.layer(z, u), torch.zeros_like(u),
                              solver=splitting.bind(operator))
            assert sol.status is Status.CONVERGED and sol.solver == splitting.name
            assert float(sol.rel_residual.max()) <= 1e-12
            assert kkt_violation(layer, x, sol.value) < 1e-9
    with pytest.raises(ValueError, match="needs the structure of W"):
        fixed_point(lambda z: layer.layer(z, u), torch.zeros_like(u), solver=PeacemanRachford())


def test_backward_solves_are_logged():
    layer = MonDEQLinear(3, 40, seed=0, dtype=DTYPE)  # n = 40 > 32: GMRES by default
    sol = layer.solve(torch.randn(4, 3, dtype=DTYPE))
    sol.value.sum().backward()
    (solve,) = sol.backward_solves()
    assert solve.solver == "GMRES" and bool(solve.converged.all())
