"""PEDEncoder: its fixed point is the conditional MAP of the ExpFamPCA Pyro model (SPEC §2)."""

import math

import pytest
import torch

from deqppl.deq import ConvergenceError, FixedPointIteration, Newton
from deqppl.encoders import AbstractMAPEncoder, PEDEncoder, default_rtol
from deqppl.expfam import (
    bernoulli,
    binomial,
    continuous_bernoulli,
    exponential,
    gaussian,
    identity,
    ising,
    leaky_smooth_relu,
    log_cosh,
    neg_smooth_relu,
    poisson,
    relu,
    smooth_relu,
)
from deqppl.inference import fit_map
from deqppl.optim import LBFGS
from deqppl.models import ExpFamPCA

D, L, N = 6, 2, 8

# (id, family, nonlinearity, lam, scale of W): scales chosen so Theorem 1 holds (asserted).
THEOREM1 = [
    ("gaussian", gaussian(), identity(), 1.0, 1.0),
    ("gaussian-precision", gaussian(2.5), identity(), 0.7, 1.0),
    ("bernoulli", bernoulli(), identity(), 1.0, 1.0),
    ("binomial5", binomial(5), identity(), 1.0, 0.7),
    ("poisson", poisson(), identity(), 1.0, 0.5),
    ("ising", ising(), identity(), 1.0, 1.0),
    ("continuous_bernoulli", continuous_bernoulli(), identity(), 1.0, 1.0),
    ("gaussian-smooth_relu", gaussian(), smooth_relu(0.5), 1.0, 0.2),
    ("bernoulli-smooth_relu", bernoulli(), smooth_relu(0.5), 1.0, 0.5),
    ("gaussian-leaky_smooth_relu", gaussian(), leaky_smooth_relu(0.5, 0.1), 1.0, 0.2),
    ("bernoulli-leaky_smooth_relu", bernoulli(), leaky_smooth_relu(0.5, 0.1), 1.0, 0.5),
    ("gaussian-log_cosh", gaussian(), log_cosh(), 1.0, 0.15),
    ("bernoulli-log_cosh", bernoulli(), log_cosh(), 1.0, 0.5),
    ("exponential-neg_smooth_relu", exponential(), neg_smooth_relu(1.0), 1.0, 0.3),
]


def _setup(fam, nl, lam, scale, *, n=N, seed=0):
    """Model, observations simulated from it, and fixed globals (W, B) of the given scale."""
    model = ExpFamPCA(family=fam, obs_dim=D, latent_dim=L, nonlinearity=nl, lam=lam)
    y = model.simulate(n, seed=seed, dtype=torch.float64).data["y"]
    gen = torch.Generator().manual_seed(seed + 1)
    W = scale * torch.randn(D, L, generator=gen, dtype=torch.float64)
    B = 0.3 * torch.randn(D, generator=gen, dtype=torch.float64)
    return model, y, W, B


def _grad_log_joint(model, y, W, B, z):
    """Per-row gradient of the Pyro log joint w.r.t. the latents z, ``(n, l)``."""
    z = z.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model.log_joint({"y": y}, {"W": W, "B": B, "z": z}), z)
    return g


def _hessian_blocks(model, y, W, B, z):
    """Per-row autograd Hessian of -log joint w.r.t. z, ``(n, l, l)``; off-row blocks are 0."""
    def neg(zz):
        return -model.log_joint({"y": y}, {"W": W, "B": B, "z": zz})

    H = torch.autograd.functional.hessian(neg, z.detach())  # (n, l, n, l)
    n = z.shape[0]
    blocks = torch.stack([H[i, :, i, :] for i in range(n)])
    off = H.clone()
    for i in range(n):
        off[i, :, i, :] = 0
    assert off.abs().max() == 0  # rows are independent given (W, B)
    return blocks


# ------------------------------------------------------------------------- MAP = fixed point
@pytest.mark.parametrize("fam, nl, lam, scale", [c[1:] for c in THEOREM1],
                         ids=[c[0] for c in THEOREM1])
def test_fixed_point_is_conditional_map(fam, nl, lam, scale):
    model, y, W, B = _setup(fam, nl, lam, scale)
    enc = PEDEncoder(model, W=W, B=B)
    report = enc.uniqueness(y)
    assert report.theorem == "theorem 1" and report.holds and report.constant < 1
    with torch.no_grad():
        z, sol = enc(y)
    assert bool(sol.converged.all())
    fit = fit_map(model, {"y": y}, optimizer=LBFGS(), fixed={"W": W, "B": B}, progress=False)
    assert fit.converged
    lj_enc = model.log_joint({"y": y}, {"W": W, "B": B, "z": z})
    lj_fit = fit.log_joint
    assert abs(float(lj_enc - lj_fit)) <= 1e-6 * abs(float(lj_fit))
    # The encoder is at least as good as L-BFGS (up to round-off of the log joint).
    assert float(lj_enc) >= float(lj_fit) - 1e-12 * abs(float(lj_fit))
    # State tolerance from strong convexity: with H >= mu I, mu = lam (1 - constant)
    # (Theorem 1), ||z - z'|| <= ||grad F(z) - grad F(z')|| / mu for every pair of points, so the
    # distance between the two answers is bounded by their own gradients.
    mu = lam * (1.0 - report.constant)
    g_enc = _grad_log_joint(model, y, W, B, z).norm(dim=1)
    g_fit = _grad_log_joint(model, y, W, B, fit.values["z"]).norm(dim=1)
    dist = (z - fit.values["z"]).norm(dim=1)
    assert bool((dist <= (g_enc + g_fit) / mu + 1e-12).all()), (dist, g_enc, g_fit)


@pytest.mark.parametrize("fam, nl, lam, scale", [c[1:] for c in THEOREM1],
                         ids=[c[0] for c in THEOREM1])
def test_fixed_point_is_stationary_point_of_pyro_log_joint(fam, nl, lam, scale):
    model, y, W, B = _setup(fam, nl, lam, scale)
    enc = PEDEncoder(model, W=W, B=B)
    with torch.no_grad():
        z, sol = enc(y)
    g = _grad_log_joint(model, y, W, B, z)
    # f(z) - z = -grad F / lam (SPEC §2.2), so ||grad F|| = lam * residual, and the solver's
    # residual is <= rtol ||f(z)|| = 1e-8 ||z||; 1e-12 absorbs round-off in the log joint.
    bound = lam * 1e-8 * z.norm(dim=1) + 1e-12
    assert bool((g.norm(dim=1) <= bound).all()), (g.norm(dim=1), bound)


# ------------------------------------------------------------------------- Gaussian closed form
def test_gaussian_closed_form_where_plain_iteration_diverges():
    lam = 1.0
    model = ExpFamPCA(family=gaussian(), obs_dim=D, latent_dim=L, lam=lam)
    gen = torch.Generator().manual_seed(0)
    W = 1.5 * torch.randn(D, L, generator=gen, dtype=torch.float64)
    B = torch.randn(D, generator=gen, dtype=torch.float64)
    y = torch.randn(N, D, generator=gen, dtype=torch.float64)
    assert float(torch.linalg.eigvalsh(W.T @ W).max()) > 2 * lam  # J_f = -W^T W / lam
    closed = torch.linalg.solve(lam * torch.eye(L, dtype=W.dtype) + W.T @ W, W.T @ (y - B).T).T
    enc = PEDEncoder(model, W=W, B=B)
    with torch.no_grad():
        z, sol = enc(y)
    assert torch.allclose(z, closed, rtol=0, atol=1e-10)
    rho = enc.spectral_radius(y, z)
    assert bool((rho >= 1).all())
    exact = float(torch.linalg.eigvalsh(W.T @ W).max()) / lam
    # power iteration (50 steps) on a symmetric 2x2 Jacobian converges to ~1e-8 relative
    assert torch.allclose(rho, torch.full_like(rho, exact), rtol=1e-6)
    plain = PEDEncoder(model, W=W, B=B, solver=FixedPointIteration(max_steps=200))
    with torch.no_grad():
        bad = plain.solve(y, z0=torch.zeros_like(y[:, :L]), throw=False)
    assert not bool(bad.converged.any())
    assert bad.status.name in ("DIVERGED", "NONFINITE", "MAX_STEPS_REACHED")


def test_gaussian_closed_form_with_observation_precision():
    # T(y) = sqrt(lam0) y, A = v^2/2: z* = (lam I + W^T W)^{-1} W^T (sqrt(lam0) y - B).
    lam, lam0 = 0.5, 3.0
    model = ExpFamPCA(family=gaussian(lam0), obs_dim=D, latent_dim=L, lam=lam)
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(D, L, generator=gen, dtype=torch.float64)
    B = torch.randn(D, generator=gen, dtype=torch.float64)
    y = torch.randn(N, D, generator=gen, dtype=torch.float64)
    closed = torch.linalg.solve(
        lam * torch.eye(L, dtype=W.dtype) + W.T @ W, W.T @ (math.sqrt(lam0) * y - B).T
    ).T
    z, _ = PEDEncoder(model, W=W, B=B)(y)
    assert torch.allclose(z.detach(), closed, rtol=0, atol=1e-10)


# ------------------------------------------------------------------------- layer and Jacobian
@pytest.mark.parametrize("fam, nl, lam, scale", [c[1:] for c in THEOREM1],
                         ids=[c[0] for c in THEOREM1])
def test_layer_jacobian_matches_autograd(fam, nl, lam, scale):
    model, y, W, B = _setup(fam, nl, lam, scale, n=4)
    enc = PEDEncoder(model, W=W, B=B)
    with torch.no_grad():
        z = enc(y)[0] + 0.1 * torch.randn(4, L, generator=torch.Generator().manual_seed(5),
                                           dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda u: enc.layer(u, y), z)
    blocks = torch.stack([J[i, :, i, :] for i in range(4)])
    assert torch.allclose(enc.layer_jacobian(z, y).detach(), blocks, rtol=1e-10, atol=1e-12)


def test_layer_is_spec_eq6_per_family():
    # Independent per-family formulas of SPEC §2.2 (R = identity).
    cases = [
        (bernoulli(), torch.sigmoid, lambda y: (torch.rand_like(y) < 0.5).to(y.dtype)),
        (poisson(), torch.exp, lambda y: torch.poisson(torch.ones_like(y))),
        (ising(), torch.tanh, lambda y: torch.where(torch.rand_like(y) < 0.5, -1.0, 1.0)),
    ]
    torch.manual_seed(0)
    for fam, mean, draw in cases:
        model = ExpFamPCA(family=fam, obs_dim=D, latent_dim=L, lam=2.0)
        enc = PEDEncoder(model, W=torch.randn(D, L, dtype=torch.float64),
                         B=torch.randn(D, dtype=torch.float64))
        y = draw(torch.zeros(3, D, dtype=torch.float64))
        z = torch.randn(3, L, dtype=torch.float64)
        eta = z @ enc.W.T + enc.B
        want = (y - mean(eta)) @ enc.W / 2.0
        assert torch.allclose(enc.layer(z, y), want, rtol=1e-12, atol=1e-14), fam


# ------------------------------------------------------------------------- Laplace
@pytest.mark.parametrize("idx", [0, 2, 4, 8], ids=lambda i: THEOREM1[i][0])
def test_laplace_precision_is_autograd_hessian(idx):
    _, fam, nl, lam, scale = THEOREM1[idx]
    model, y, W, B = _setup(fam, nl, lam, scale)
    enc = PEDEncoder(model, W=W, B=B)
    lap = enc.laplace(y)
    H = _hessian_blocks(model, y, W, B, lap.mean)
    assert torch.allclose(lap.precision, H, rtol=1e-10, atol=1e-12)
    eye = torch.eye(L, dtype=torch.float64).expand(N, L, L)
    assert torch.allclose(lap.precision @ lap.covariance, eye, atol=1e-10)


def test_laplace_samples_have_the_right_moments():
    model, y, W, B = _setup(bernoulli(), identity(), 1.0, 1.5, n=3)
    lap = PEDEncoder(model, W=W, B=B).laplace(y)
    k = 20_000
    s = lap.sample(k, generator=torch.Generator().manual_seed(0))
    assert s.shape == (k, 3, L)
    mean, cov = lap.mean, lap.covariance
    # standard errors of the sample mean and covariance of a Gaussian; 5 SE: each of the
    # 6 + 12 checked entries fails with probability < 6e-7 (and the draw is seeded).
    se_mean = (torch.diagonal(cov, dim1=1, dim2=2) / k).sqrt()
    assert bool(((s.mean(0) - mean).abs() <= 5 * se_mean).all())
    c = s - s.mean(0)
    emp = torch.einsum("sni,snj->nij", c, c) / (k - 1)
    var = torch.diagonal(cov, dim1=1, dim2=2)
    se_cov = ((var[:, :, None] * var[:, None, :] + cov**2) / k).sqrt()
    assert bool(((emp - cov).abs() <= 5 * se_cov).all())


def test_laplace_raises_on_non_pd_hessian():
    # Gaussian with smooth ReLU(0.1): at eta = 0 the curvature is
    # rho^2 + (R - y) rho' = 0.25 + (0.04 - y) 3.99, negative for y = 10, so a large W makes
    # H = lam I + W^T diag(c) W indefinite in row 1 (row 0, y = 0, stays PD).
    model = ExpFamPCA(family=gaussian(), obs_dim=D, latent_dim=L, nonlinearity=smooth_relu(0.1))
    W = 3.0 * torch.ones(D, L, dtype=torch.float64)
    enc = PEDEncoder(model, W=W, B=torch.zeros(D, dtype=torch.float64))
    y = torch.stack([torch.zeros(D), torch.full((D,), 10.0)]).double()
    with pytest.raises(ValueError, match="not positive definite at row 1"):
        enc.laplace(y, torch.zeros(2, L, dtype=torch.float64))


# ------------------------------------------------------------------------- gradients
GRAD_CASES = [THEOREM1[0], THEOREM1[2], THEOREM1[4], THEOREM1[7]]


@pytest.mark.parametrize("fam, nl, lam, scale", [c[1:] for c in GRAD_CASES],
                         ids=[c[0] for c in GRAD_CASES])
def test_gradcheck_through_fixed_point(fam, nl, lam, scale):
    model, y, W, B = _setup(fam, nl, lam, scale, n=3)
    # gradcheck's central differences (eps 1e-6) divide the forward error by 1e-6: solve to
    # round-off instead of the default rtol 1e-8 (Newton converges quadratically, so the cost
    # is one extra step).
    enc = PEDEncoder(model, W=W, B=B, solver=Newton(rtol=1e-13, atol=0.0, max_steps=100,
                                                    max_backtracks=40))

    def f(Wv, Bv):
        z, _ = torch.func.functional_call(enc, {"W": Wv, "B": Bv}, (y,))
        return z

    inputs = (W.clone().requires_grad_(True), B.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(f, inputs)


def test_implicit_gradient_equals_finite_differences():
    model, y, W, B = _setup(poisson(), identity(), 1.0, 0.5, n=4)
    tight = Newton(rtol=1e-14, atol=0.0, max_steps=100, max_backtracks=40)
    enc = PEDEncoder(model, W=W, B=B, solver=tight)
    target = torch.linspace(-1, 1, 4 * L, dtype=torch.float64).reshape(4, L)

    def loss(Wv):
        z, _ = torch.func.functional_call(enc, {"W": Wv, "B": B}, (y,))
        return ((z - target) ** 2).sum()

    Wg = W.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(Wg), Wg)
    h = 1e-5  # central differences: truncation O(h^2) ~ 1e-10, round-off O(eps/h) ~ 1e-11
    fd = torch.zeros_like(W)
    with torch.no_grad():
        for i in range(D):
            for j in range(L):
                E = torch.zeros_like(W)
                E[i, j] = h
                fd[i, j] = (loss(W + E) - loss(W - E)) / (2 * h)
    assert torch.allclose(grad, fd, rtol=1e-7, atol=1e-9)
    assert float(grad.abs().max()) > 1e-3  # the check is not vacuous


# ------------------------------------------------------------------------- rectified (Theorem 2)
def test_relu_gaussian_fixed_point_is_local_map():
    lam = 1.0
    model, y, W, B = _setup(gaussian(), relu(), lam, 0.4)
    # y < 0 puts a convex kink into F at eta = 0 where the MAP can sit with no fixed point
    # (see PEDEncoder Notes); with y >= 0 every local minimum is a smooth stationary point.
    y = y.abs()
    enc = PEDEncoder(model, W=W, B=B)
    with torch.no_grad():
        z, sol = enc(y)
    assert bool(sol.converged.all())
    eta = z @ W.T + B
    # independent form of SPEC §2.2: z = W^T (Theta(eta) * (y - eta)) / lam
    assert torch.allclose(z, ((eta > 0).double() * (y - eta)) @ W / lam, rtol=0, atol=1e-10)
    g = _grad_log_joint(model, y, W, B, z)
    assert bool((g.norm(dim=1) <= lam * 1e-8 * z.norm(dim=1) + 1e-12).all())
    H = _hessian_blocks(model, y, W, B, z)
    assert bool((torch.linalg.eigvalsh(H) > 0).all())  # a strict local minimum
    # L-BFGS started at the fixed point cannot improve on it.
    fit = fit_map(model, {"y": y}, fixed={"W": W, "B": B}, init={"z": z}, progress=False)
    lj = model.log_joint({"y": y}, {"W": W, "B": B, "z": z})
    assert float(fit.log_joint) <= float(lj) + 1e-10 * abs(float(lj))
    assert torch.allclose(fit.values["z"], z, atol=1e-6)  # fit_map's gradient rule / mu >= lam

    report = enc.uniqueness()
    expected = float(torch.linalg.svdvals(W)[0]) ** 2 / lam  # a = sup A'' = 1 (Gaussian)
    assert report.theorem == "theorem 2"
    assert report.constant == pytest.approx(expected, rel=1e-12)
    assert report.holds == (expected < 1)


def test_uniqueness_theorem2_can_fail():
    model = ExpFamPCA(family=gaussian(), obs_dim=D, latent_dim=L, nonlinearity=relu(), lam=0.5)
    W = torch.ones(D, L, dtype=torch.float64)  # ||W^T W|| = 2 D = 12
    report = PEDEncoder(model, W=W).uniqueness()
    assert report.constant == pytest.approx(2 * D / 0.5) and not report.holds


def test_uniqueness_needs_y_for_nonidentity_R():
    model = ExpFamPCA(family=gaussian(), obs_dim=D, latent_dim=L, nonlinearity=smooth_relu(0.5))
    with pytest.raises(ValueError, match="needs the observations y"):
        PEDEncoder(model).uniqueness()
    ident = ExpFamPCA(family=poisson(), obs_dim=D, latent_dim=L)
    report = PEDEncoder(ident).uniqueness()
    assert report.holds and report.constant == 0.0


# ------------------------------------------------------------------------- input checks
def test_wrong_obs_dim_raises():
    model = ExpFamPCA(family=gaussian(), obs_dim=D, latent_dim=L)
    enc = PEDEncoder(model).double()
    with pytest.raises(ValueError, match=str(D)):
        enc(torch.zeros(3, D + 1, dtype=torch.float64))


def test_nan_raises_naming_row_and_column():
    model = ExpFamPCA(family=gaussian(), obs_dim=D, latent_dim=L)
    y = torch.zeros(3, D, dtype=torch.float64)
    y[2, 4] = float("nan")
    with pytest.raises(ValueError, match=r"(?s)row 2.*column 4|\(2, 4\)"):
        PEDEncoder(model).double()(y)


def test_negative_poisson_count_raises_naming_row_and_column():
    model = ExpFamPCA(family=poisson(), obs_dim=D, latent_dim=L)
    y = torch.ones(3, D, dtype=torch.float64)
    y[1, 3] = -2.0
    with pytest.raises(ValueError, match=r"(?s)(row 1.*column 3|\(1, 3\)).*non-negative"):
        PEDEncoder(model).double()(y)


def test_per_sample_nonconvergence_is_reported_in_the_mask():
    model = ExpFamPCA(family=gaussian(), obs_dim=D, latent_dim=L)
    gen = torch.Generator().manual_seed(0)
    W = 1.5 * torch.randn(D, L, generator=gen, dtype=torch.float64)  # plain iteration diverges
    y = torch.randn(4, D, generator=gen, dtype=torch.float64)
    closed = torch.linalg.solve(torch.eye(L, dtype=W.dtype) + W.T @ W, W.T @ y.T).T
    z0 = torch.zeros(4, L, dtype=torch.float64)
    z0[0] = closed[0]  # row 0 starts at its fixed point, the others do not
    solver = FixedPointIteration(max_steps=20)
    enc = PEDEncoder(model, W=W, solver=solver, throw=False)
    z, sol = enc(y, z0=z0)
    assert sol.converged.tolist() == [True, False, False, False]
    assert torch.allclose(z[0].detach(), closed[0], atol=1e-10)
    with pytest.raises(ConvergenceError, match="3 of 4"):
        PEDEncoder(model, W=W, solver=solver)(y, z0=z0)


def test_float32_follows_dtype():
    model = ExpFamPCA(family=gaussian(), obs_dim=D, latent_dim=L)
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(D, L, generator=gen)
    y = torch.randn(5, D, generator=gen)
    enc = PEDEncoder(model, W=W)
    assert enc.W.dtype == torch.float32
    z, sol = enc(y)
    assert z.dtype == torch.float32 and bool(sol.converged.all())
    W64 = W.double()
    closed = torch.linalg.solve(torch.eye(L, dtype=W64.dtype) + W64.T @ W64, W64.T @ y.double().T).T
    # float32, Gaussian: the ridge start is the MAP itself, so z carries only float32
    # round-off of the ~1e0 entries (eps 1.2e-7) through the l x l solve; 1e-5 allows ~80 eps
    # and sits below the default rtol 1e-4 (default_rtol), which a wrong start would show.
    assert torch.allclose(z.double(), closed, rtol=1e-5, atol=1e-5)
    z.sum().backward()  # the float32 adjoint converges too (it used to demand 1e-10)
    assert enc.W.grad is not None and enc.W.grad.dtype == torch.float32


def test_values_round_trip_through_from_values():
    model, y, W, B = _setup(bernoulli(), identity(), 1.0, 1.0)
    enc = PEDEncoder.from_values(model, {"W": W, "B": B})
    vals = enc.values()
    assert set(vals) == {"W", "B"} and torch.equal(vals["W"], W) and torch.equal(vals["B"], B)
    assert not vals["W"].requires_grad


# ------------------------------------------------------------------------- the encoder protocol
def test_ped_implements_the_encoder_protocol():
    model, y, W, B = _setup(poisson(), identity(), 1.0, 0.5)
    enc = PEDEncoder(model, W=W, B=B)
    assert isinstance(enc, AbstractMAPEncoder) and enc.model is model
    sol_tensor = enc.solve(y)
    sol_mapping = enc.solve({"y": y})
    assert torch.equal(sol_tensor.value, sol_mapping.value)
    data = enc.check_data({"y": y})
    assert torch.equal(enc.solve(data, validated=True).value, sol_tensor.value)
    sites, _ = enc.sites(y)
    assert set(sites) == set(model.local_sites) and torch.equal(sites["z"], sol_tensor.value)
    assert set(enc.values()) == set(model.global_sites)
    assert all(p is getattr(enc, k) for k, p in enc.site_parameters().items())
    assert enc.latent_shape(data) == (N, L)
    # warm start from the solution: already converged
    again = enc.solve(y, z0=sol_tensor.value)
    assert again.num_steps <= 1 and torch.allclose(again.value, sol_tensor.value, atol=1e-12)
    # the fixed point is a stationary point of the model's log joint at the encoder's globals
    g = _grad_log_joint(model, y, W, B, sol_tensor.value)
    assert float(g.abs().max()) < 1e-6


@pytest.mark.parametrize("idx", [4, 8, 12], ids=lambda i: THEOREM1[i][0])
def test_analytic_hessian_equals_protocol_default_from_the_trace(idx):
    # The base class differentiates the Pyro log joint twice; the PED closed form must agree.
    _, fam, nl, lam, scale = THEOREM1[idx]
    model, y, W, B = _setup(fam, nl, lam, scale)
    enc = PEDEncoder(model, W=W, B=B)
    data = enc.check_data(y)
    z = enc.solve(data, validated=True).value
    default = AbstractMAPEncoder.hessian(enc, z, data)
    torch.testing.assert_close(enc.hessian(z, data), default, rtol=1e-10, atol=1e-12)


def test_protocol_input_checks():
    model, y, W, B = _setup(gaussian(), identity(), 1.0, 1.0)
    enc = PEDEncoder(model, W=W, B=B)
    with pytest.raises(ValueError, match="keys"):
        enc.solve({"x": y})
    with pytest.raises(ValueError, match=r"z0 must have shape \(8, 2\)"):
        enc.solve(y, z0=torch.zeros(N, L + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="z0 contains a non-finite"):
        enc.solve(y, z0=torch.full((N, L), float("nan"), dtype=torch.float64))
    with pytest.raises(TypeError, match="solver must be"):
        PEDEncoder(model, solver="newton")
    with pytest.raises(TypeError, match="adjoint must be"):
        PEDEncoder(model, adjoint="implicit")
    with pytest.raises(TypeError, match="throw must be"):
        PEDEncoder(model, throw="yes")
    with pytest.raises(TypeError, match=r"PEDEncoder needs an ExpFamPCA-like model .*object, which lacks \['data_names'.*'family'"):
        PEDEncoder(object())
    with pytest.raises(ValueError, match="missing \\['B'\\]"):
        PEDEncoder.from_values(model, {"W": W})
    with pytest.raises(ValueError, match="W contains a non-finite"):
        PEDEncoder.from_values(model, {"W": torch.full_like(W, float("nan")), "B": B})


def test_default_rtol_is_shared():
    model = ExpFamPCA(family=poisson(), obs_dim=D, latent_dim=L)
    for dtype in (torch.float32, torch.float64):
        assert PEDEncoder(model).default_solver(dtype).rtol == default_rtol(dtype)


def test_hard_relu_default_start_is_not_a_spurious_fixed_point():
    # Regression (Figure 7's rectified column, test MSE 22.8 = var(z1 + z2)): with the mask
    # Theta(0) = 0, the default start z = 0 with the default B = 0 put every eta exactly on the
    # kink, where f(0) = 0 for any y, so every row "converged" in zero steps to z* = 0 and W, B
    # got zero gradient. With Theta(0) = 1 the solve must leave z = 0 and reach a strict local
    # minimum that the Pyro log joint (the independent oracle) prefers to z = 0.
    lam = 1.0
    model, y, W, _ = _setup(gaussian(), relu(), lam, 0.4)
    y = y.abs() + 0.1  # y > 0: no convex kinks, every local minimum is a smooth stationary point
    B = torch.zeros(D, dtype=torch.float64)
    enc = PEDEncoder(model, W=W, B=B)
    zeros = torch.zeros(N, L, dtype=torch.float64)
    with torch.no_grad():
        assert float((enc.layer(zeros, y) - zeros).norm()) > 1e-3  # z = 0 is no fixed point
        z, sol = enc(y)
    assert bool(sol.converged.all()) and float(z.abs().min()) > 1e-6
    g = _grad_log_joint(model, y, W, B, z)
    assert bool((g.norm(dim=1) <= lam * 1e-8 * z.norm(dim=1) + 1e-12).all())
    assert bool((torch.linalg.eigvalsh(_hessian_blocks(model, y, W, B, z)) > 0).all())
    per = lambda zz: model.log_joint({"y": y}, {"W": W, "B": B, "z": zz}, per_datum=True)
    assert bool((per(z) > per(zeros)).all())
