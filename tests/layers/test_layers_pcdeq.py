"""pcDEQ layers: the guarantees of SPEC 5 checked against independent oracles.

Oracles: a second start (random nonnegative) for uniqueness, the dense Jacobian's eigenvalues
(torch.linalg.eigvals) for rho(J), central finite differences for the implicit gradients.
"""

from __future__ import annotations

import math

import pytest
import torch

from deqppl.deq import FixedPointIteration, ImplicitAdjoint, fixed_point
from deqppl.layers import (PCDEQConv2d, PCDEQLinear, ReLU6, Sigmoid, Softsign, SquareCone, Tanh)

DTYPE = torch.float64
N = 200  # SPEC 5: N = 200-300
NORMS = [0.4, 4.0, 40.0]
ACTIVATIONS = {"tanh": Tanh(), "softsign": Softsign(), "relu6": ReLU6(), "sigmoid": Sigmoid()}
#: Far tighter than the 1e-10 agreement asked for: float64 round-off of z ~ 1 is ~1e-16.
TIGHT = FixedPointIteration(rtol=1e-14, atol=0.0, max_steps=400)


def random_nonnegative(n: int, norm: float, seed: int) -> torch.Tensor:
    """Random W >= 0 (uniform entries, 30% exact zeros) scaled to spectral norm ``norm``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n, n, generator=g, dtype=DTYPE)
    w = torch.where(torch.rand(n, n, generator=g, dtype=DTYPE) < 0.3, torch.zeros_like(w), w)
    return w * (norm / torch.linalg.matrix_norm(w, ord=2))


def make_layer(activation, norm, *, n=N, in_features=10, seed=0, solver=TIGHT, adjoint=None):
    layer = PCDEQLinear(in_features, n, activation=activation, cone=SquareCone(),
                        weight_norm=False, solver=solver, adjoint=adjoint, seed=seed, dtype=DTYPE)
    layer.set_weight(random_nonnegative(n, norm, seed + 1))
    return layer


def inputs(batch=4, in_features=10, seed=3):
    return torch.randn(batch, in_features, generator=torch.Generator().manual_seed(seed),
                       dtype=DTYPE)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("activation", list(ACTIVATIONS.values()), ids=list(ACTIVATIONS))
def test_unique_fixed_point_from_zero_and_random_starts(activation, norm):
    layer = make_layer(activation, norm)
    x = inputs()
    with torch.no_grad():
        sol = layer.solve(x, certify=True)
        u = layer.injection(x)
        assert float(torch.linalg.matrix_norm(layer.weight(), ord=2)) == pytest.approx(norm)
        z_star = sol.value
        assert bool(sol.solution.converged.all())
        # the solver's own residual, and an independent one
        assert float((layer.layer(z_star, u) - z_star).abs().max()) < 1e-12
        g = torch.Generator().manual_seed(7)
        for scale in (0.1, 1.0, 100.0):  # starts below, around and far above z*
            z0 = scale * torch.rand(z_star.shape, generator=g, dtype=DTYPE)
            other = fixed_point(lambda z: layer.layer(z, u), z0, solver=TIGHT)
            assert float((other.value - z_star).abs().max()) < 1e-10, scale
    assert sol.certificate.certified, sol.certificate


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("activation", list(ACTIVATIONS.values()), ids=list(ACTIVATIONS))
def test_iterates_from_zero_increase_monotonically(activation, norm):
    layer = make_layer(activation, norm)
    x = inputs()
    with torch.no_grad():
        u = layer.injection(x)
        z = torch.zeros(4, N, dtype=DTYPE)
        for _ in range(60):
            z_next = layer.layer(z, u)
            # nondecreasing up to round-off of the map (entries <= 6, eps ~ 2e-16)
            assert bool((z_next >= z - 1e-14).all())
            z = z_next
        assert bool((z > 0).all())


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("activation", list(ACTIVATIONS.values()), ids=list(ACTIVATIONS))
def test_spectral_radius_below_one(activation, norm):
    layer = make_layer(activation, norm, n=60)
    x = inputs(batch=3)
    sol = layer.solve(x, certify=True)
    cert = sol.certificate
    with torch.no_grad():
        u = layer.injection(x)
        pre = layer.pre_activation(sol.value, u)
        dense = activation.derivative(pre)[:, :, None] * layer.weight()  # diag(sigma') W
        exact = torch.linalg.eigvals(dense).abs().amax(1)
    assert bool((exact < 1).all())
    # the Collatz-Wielandt bound is rigorous: never below the true radius (up to round-off)
    assert bool((cert.spectral_radius_bound >= exact - 1e-12).all())
    assert bool((cert.spectral_radius_bound < 1).all())
    # power iteration (50 steps) agrees with the eigenvalues where the radius is not tiny;
    # its error after 50 steps is ~ (|l2|/|l1|)^25, 1e-3 is a loose bound for these spectra
    big = exact > 1e-3
    assert torch.allclose(cert.spectral_radius[big], exact[big], rtol=1e-3)
    assert bool((cert.spectral_radius[~big] < 1e-2).all())
    # J z* <= z* - g(0) (SPEC 5, derived)
    with torch.no_grad():
        jz = layer.jvp(sol.value, u, sol.value)
        g0 = layer.layer(torch.zeros_like(sol.value), u)
        assert bool((jz <= sol.value - g0 + 1e-9).all())
    assert bool((cert.rate_thompson < 1).all()) and cert.rate_residual < 1


def _directional_fd(loss, params, direction, h):
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(h * d)
        up = float(loss())
        for p, d in zip(params, direction):
            p.sub_(2 * h * d)
        down = float(loss())
        for p, d in zip(params, direction):
            p.add_(h * d)
    return (up - down) / (2 * h)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("activation", [Tanh(), Sigmoid()], ids=["tanh", "sigmoid"])
def test_implicit_gradient_matches_finite_differences(activation, norm):
    adjoint = ImplicitAdjoint(solver=FixedPointIteration(rtol=1e-13, atol=0.0, max_steps=400))
    layer = make_layer(activation, norm, n=30, adjoint=adjoint)
    x = inputs(batch=3)
    c = torch.randn(3, 30, generator=torch.Generator().manual_seed(5), dtype=DTYPE)

    def loss():
        return (layer(x) * c).sum()

    params = [p for p in layer.parameters()]
    layer.zero_grad()
    loss().backward()
    g = torch.Generator().manual_seed(11)
    for trial in range(3):
        direction = [torch.randn(p.shape, generator=g, dtype=DTYPE) for p in params]
        analytic = sum(float((p.grad * d).sum()) for p, d in zip(params, direction))
        # h = 1e-5: central differences have truncation ~h^2 ~ 1e-10 and round-off
        # ~ eps * |loss| / h ~ 1e-11, both far below the 1e-7 relative tolerance
        numeric = _directional_fd(loss, params, direction, 1e-5)
        assert analytic == pytest.approx(numeric, rel=1e-7, abs=1e-9), trial


def test_conv_layer_gradient_and_certificate():
    adjoint = ImplicitAdjoint(solver=FixedPointIteration(rtol=1e-13, atol=0.0, max_steps=400))
    layer = PCDEQConv2d(2, 3, activation=Softsign(), solver=TIGHT, adjoint=adjoint, seed=1,
                        dtype=DTYPE)
    layer.scale_weight_(20.0)  # far outside any contraction a norm bound would need
    x = torch.randn(2, 2, 6, 6, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    sol = layer.solve(x, certify=True)
    assert sol.certificate.certified, sol.certificate
    assert "CERTIFIED" in repr(sol)
    c = torch.randn(sol.value.shape, generator=torch.Generator().manual_seed(1), dtype=DTYPE)

    def loss():
        return (layer(x) * c).sum()

    params = list(layer.parameters())
    layer.zero_grad()
    loss().backward()
    direction = [torch.randn(p.shape, generator=torch.Generator().manual_seed(2 + i),
                             dtype=DTYPE) for i, p in enumerate(params)]
    analytic = sum(float((p.grad * d).sum()) for p, d in zip(params, direction))
    numeric = _directional_fd(loss, params, direction, 1e-5)  # see the linear test for h
    assert analytic == pytest.approx(numeric, rel=1e-7, abs=1e-9)


def test_zero_row_gives_finite_values_and_gradients():
    """The paper's weight norm divides by a row norm; an all-zero row must not give 0/0."""
    layer = PCDEQLinear(3, 4, cone=SquareCone(), weight_norm=True, dtype=DTYPE)
    w = torch.rand(4, 4, dtype=DTYPE)
    w[2] = 0.0
    layer.set_weight(w)
    assert torch.equal(layer.weight()[2], torch.zeros(4, dtype=DTYPE))
    assert torch.allclose(layer.weight(), w)
    z = layer(torch.randn(5, 3, dtype=DTYPE))
    z.sum().backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in layer.parameters())
    assert bool(torch.isfinite(z).all())


def test_certificate_reports_a_zero_injection():
    # float32 softplus(beta=5) underflows to exactly 0 for pre-activations below about -21;
    # with a zero bias, g(0) = tanh(0) = 0 there and the certificate must say so.
    layer = PCDEQLinear(2, 3, cone=SquareCone(), weight_norm=False)
    layer.W.set_bias_(torch.zeros(3), name="W")
    with torch.no_grad():
        layer.inject.raw.fill_(10.0)
        layer.inject.raw_bias.zero_()
    sol = layer.solve(torch.full((2, 2), -5.0), certify=True)
    assert not sol.certificate.injection_ok
    assert not sol.certificate.certified
    assert "g(0) has a zero entry" in repr(sol.certificate)


def test_certificate_is_cheap_to_read_as_a_row():
    layer = make_layer(Tanh(), 4.0, n=20)
    row = layer.solve(inputs(), certify=True).certificate.as_dict()
    assert row["certified"] == 1.0 and row["converged"] == 1.0
    assert 0 <= row["spectral_radius"] <= row["spectral_radius_bound"] < 1
    assert math.isfinite(row["rate_residual"])


def test_default_backward_is_plain_iteration_and_is_logged():
    """rho(J) < 1, so the default adjoint's linear solver is plain iteration; it converges."""
    layer = make_layer(Tanh(), 40.0, n=50, solver=None)
    sol = layer.solve(inputs())
    (sol.value * torch.randn(sol.value.shape, dtype=DTYPE)).sum().backward()
    (solve,) = sol.backward_solves()
    assert solve.solver == "FixedPointLinearSolver(FixedPointIteration)"
    assert bool(solve.converged.all()) and solve.num_steps <= 200


# --- the x10 stress test: a saturated layer must still pass its (tiny) gradient -------------
@pytest.mark.parametrize("activation", [Tanh(), Sigmoid()], ids=lambda a: a.name)
def test_saturated_layer_float32_gradient_equals_float64(activation):
    """At W x10 the pre-activations are ~10: torch's backward 1 - tanh^2 (s(1 - s)) rounds to
    exactly 0 in float32 there, which zeroed ~85 % of the parameter gradient (60 % relative
    error); Adam, being scale invariant, needs those tiny entries to leave saturation."""

    def gradient(dtype):
        layer = PCDEQLinear(16, 20, activation=activation, seed=0, dtype=dtype)
        layer.scale_weight_(10.0)
        x = torch.rand(32, 16, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64).to(dtype)
        loss = (layer(x) * torch.linspace(-1, 1, 20, dtype=dtype)).sum()
        grads = torch.autograd.grad(loss, list(layer.parameters()))
        return torch.cat([g.flatten() for g in grads]).double()

    g32, g64 = gradient(torch.float32), gradient(torch.float64)
    assert float(g64.abs().max()) < 0.1  # saturated: the gradient is small ...
    # ... but float32 gets it to float32 accuracy (measured 9e-7), with no extra exact zeros
    assert float((g32 - g64).norm() / g64.norm()) < 1e-4
    assert int((g32 == 0).sum()) == int((g64 == 0).sum())


# torch 2.13 warns on the first torch.func.jvp of a process that torch.jit.script (used by its
# forward-mode decompositions) is deprecated: torch's own warning, not ours
@pytest.mark.filterwarnings("ignore:.*torch.jit.script.* is deprecated:DeprecationWarning")
@pytest.mark.parametrize("activation", [Tanh(), Sigmoid()], ids=lambda a: a.name)
def test_activation_slopes_are_accurate_in_float32(activation):
    t = torch.linspace(-40.0, 40.0, 161)
    exact = activation.derivative(t.double())
    assert torch.allclose(activation.derivative(t).double(), exact, rtol=1e-5, atol=0)
    tt = t.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(activation(tt).sum(), tt)
    assert torch.allclose(grad.double(), exact, rtol=1e-5, atol=0)  # float32 rounding only
    # second derivatives and forward mode go through the same rule (the DEQ core uses both)
    t64 = torch.linspace(-20, 20, 41, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(activation, (t64,))
    _, tangent = torch.func.jvp(activation, (t64.detach(),), (torch.ones_like(t64),))
    assert torch.allclose(tangent, activation.derivative(t64.detach()))
