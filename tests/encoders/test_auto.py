"""AutoDEQ: an amortised MAP encoder derived from a model's trace (issue 17).

Oracles: the hand-written PED and deep PED encoders (same fixed point, to 1e-8 in float64), and
fit_map's L-BFGS conditional MAP on the Pyro log joint for three models written here as plain
Pyro programs (not in the zoo). Gradients: implicit adjoint against finite differences of the
solved fixed point; envelope gradient against the implicit one.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

from deqppl.deq import Anderson, ConvergenceError, Newton
from deqppl.encoders import (
    AutoDEQ,
    DeepPEDEncoder,
    NotAMinimumError,
    PEDEncoder,
    SafeguardedLBFGS,
    SafeguardedNewton,
    fit_encoder,
)
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
    smooth_relu,
)
from deqppl.inference import fit_map
from deqppl.kernels import SquaredExponential
from deqppl.models import ExpFamPCA, HierarchicalExpFamPCA, KernelGLM
from deqppl.optim import LBFGS, Adam
from deqppl.protocols import PyroModel

F64 = torch.float64
D, L, N = 6, 2, 10
# Both encoders solved far below the comparison tolerance, so that 1e-8 tests the fixed point
# itself, not the two stopping rules (each at 1e-8 relative would leave ~1e-8 apart).
TIGHT = 1e-12

# (id, family, nonlinearity, lam, scale of W): every family with the identity, and the smooth
# nonlinearities (scales as in test_ped.py, where Theorem 1 holds: a unique MAP).
CASES = [
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


def _pca(fam, nl, lam, scale, *, n=N, seed=0):
    model = ExpFamPCA(family=fam, obs_dim=D, latent_dim=L, nonlinearity=nl, lam=lam)
    y = model.simulate(n, seed=seed, dtype=F64).data["y"]
    gen = torch.Generator().manual_seed(seed + 1)
    W = scale * torch.randn(D, L, generator=gen, dtype=F64)
    B = 0.3 * torch.randn(D, generator=gen, dtype=F64)
    return model, y, {"W": W, "B": B}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_expfam_pca_fixed_point_equals_ped(case):
    _, fam, nl, lam, scale = case
    model, y, values = _pca(fam, nl, lam, scale)
    ped = PEDEncoder.from_values(model, values, solver=Newton(rtol=TIGHT, atol=0.0, max_steps=100,
                                                              max_backtracks=40))
    auto = AutoDEQ(model, values, solver=SafeguardedNewton(rtol=TIGHT))
    with torch.no_grad():
        z_ped, _ = ped(y)
        z_auto, sol = auto(y)
    assert bool(sol.converged.all())
    torch.testing.assert_close(z_auto, z_ped, rtol=0.0, atol=1e-8)
    # the layer is the PED layer up to the prior precision: f_auto(z) - z = lam (f_ped(z) - z)
    u = torch.randn(N, L, dtype=F64, generator=torch.Generator().manual_seed(3))
    data = auto.check_data(y)
    with torch.no_grad():
        torch.testing.assert_close(auto.layer(u, data) - u, lam * (ped.layer(u, data) - u))
        torch.testing.assert_close(auto.hessian(u, data), ped.hessian(u, data))
    if nl.is_identity:  # strictly convex: the Laplace approximations agree too
        torch.testing.assert_close(auto.laplace(y, z_auto).precision, ped.laplace(y, z_ped).precision)


@pytest.mark.parametrize(
    "widths, nls",
    [((6, 3, 2), None), ((5, 3), (smooth_relu(0.5),)), ((6, 4, 2), (smooth_relu(1.0), identity()))],
    ids=["identity-2layer", "smooth_relu-1layer", "smooth_relu-2layer"],
)
def test_hierarchical_fixed_point_equals_deep_ped(widths, nls):
    model = HierarchicalExpFamPCA(widths=widths, nonlinearities=nls, param_scale=0.5)
    sim = model.simulate(N, seed=1, dtype=F64)
    values = {name: sim.truth[name] for name in model.global_sites}
    # the deep encoder's own default for non-convex stacks: safeguarded Anderson (deep.py)
    deep = DeepPEDEncoder(model, values, solver=Anderson(rtol=TIGHT, atol=0.0, max_steps=5000))
    auto = AutoDEQ(model, values, solver=SafeguardedNewton(rtol=TIGHT))
    with torch.no_grad():
        sol_deep = deep.solve(sim.data["y"])
        sites, sol = auto.sites(sim.data["y"])
    assert bool(sol.converged.all()) and bool(sol_deep.converged.all())
    zeta = torch.cat([sites[name] for name in model.local_sites], dim=1)
    torch.testing.assert_close(zeta, sol_deep.value, rtol=0.0, atol=1e-8)
    assert bool(auto.curvature(sim.data["y"]).is_minimum.all())


# ----------------------------------------------------------------------------------------------
# three models that are not in the zoo, as plain Pyro programs
# ----------------------------------------------------------------------------------------------
NUM_FEATURES, NUM_FACTORS = 6, 2


def poisson_factor(y=None, *, num_data=None):
    """Poisson factor model with a log-normal size factor per row (a positive local)."""
    n = len(y) if y is not None else num_data
    W = pyro.sample("W", dist.Normal(torch.zeros(NUM_FEATURES, NUM_FACTORS, dtype=F64), 0.5).to_event(2))
    B = pyro.sample("B", dist.Normal(torch.zeros(NUM_FEATURES, dtype=F64), 1.0).to_event(1))
    with pyro.plate("data", n):
        z = pyro.sample("z", dist.Normal(torch.zeros(NUM_FACTORS, dtype=F64), 1.0).to_event(1))
        size = pyro.sample("size", dist.LogNormal(torch.tensor(0.0, dtype=F64), 0.5))
        rate = size[:, None] * torch.exp(z @ W.T + B)
        return pyro.sample("y", dist.Poisson(rate).to_event(1), obs=y)


def robust_pca(y=None, *, num_data=None):
    """Robust PCA: Student-t observations (3 degrees of freedom) around a linear factor model."""
    n = len(y) if y is not None else num_data
    W = pyro.sample("W", dist.Normal(torch.zeros(NUM_FEATURES, NUM_FACTORS, dtype=F64), 1.0).to_event(2))
    B = pyro.sample("B", dist.Normal(torch.zeros(NUM_FEATURES, dtype=F64), 1.0).to_event(1))
    with pyro.plate("data", n):
        z = pyro.sample("z", dist.Normal(torch.zeros(NUM_FACTORS, dtype=F64), 1.0).to_event(1))
        return pyro.sample("y", dist.StudentT(3.0, z @ W.T + B, 0.5).to_event(1), obs=y)


def item_response(y=None, *, num_data=None):
    """Two-parameter logistic item response: one ability per row, items' parameters global."""
    n = len(y) if y is not None else num_data
    a = pyro.sample("a", dist.LogNormal(torch.zeros(NUM_FEATURES, dtype=F64), 0.5).to_event(1))
    b = pyro.sample("b", dist.Normal(torch.zeros(NUM_FEATURES, dtype=F64), 1.0).to_event(1))
    with pyro.plate("data", n):
        ability = pyro.sample("ability", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
        logits = a * (ability[:, None] - b)
        return pyro.sample("y", dist.Bernoulli(logits=logits).to_event(1), obs=y)


USER_MODELS = {
    "poisson_factor": PyroModel(poisson_factor, data_names=("y",), local_sites=("z", "size"),
                                global_sites=("W", "B")),
    "robust_pca": PyroModel(robust_pca, data_names=("y",), local_sites=("z",), global_sites=("W", "B")),
    "item_response": PyroModel(item_response, data_names=("y",), local_sites=("ability",),
                               global_sites=("a", "b")),
}


def _simulated(name, n=40, seed=0):
    model = USER_MODELS[name]
    sim = model.simulate(n, seed=seed, dtype=F64)
    if name == "robust_pca":  # a few gross outliers, what the Student-t is for
        y = sim.data["y"].clone()
        y[::7, 0] += 8.0
        sim = type(sim)(data={"y": y}, truth=sim.truth)
    return model, sim


@pytest.mark.parametrize("name", list(USER_MODELS))
def test_user_model_fixed_point_equals_lbfgs_conditional_map(name):
    model, sim = _simulated(name)
    values = {site: sim.truth[site] for site in model.global_sites}
    enc = AutoDEQ(model, values)
    with torch.no_grad():
        sites, sol = enc.sites(sim.data)
    assert bool(sol.converged.all())
    assert bool(enc.curvature(sim.data).is_minimum.all())
    fit = fit_map(model, sim.data, fixed=values, progress=False, throw=True)
    for site in model.local_sites:
        torch.testing.assert_close(sites[site], fit.values[site], rtol=0.0, atol=1e-6)
    if name == "poisson_factor":
        assert bool((sites["size"] > 0).all())


def test_lbfgs_path_equals_newton_path():
    model, sim = _simulated("poisson_factor")
    values = {site: sim.truth[site] for site in model.global_sites}
    with torch.no_grad():
        u_newton = AutoDEQ(model, values, solver=SafeguardedNewton(rtol=TIGHT)).solve(sim.data).value
        sol = AutoDEQ(model, values, solver=SafeguardedLBFGS(rtol=1e-11)).solve(sim.data)
    assert bool(sol.converged.all()) and sol.num_jac_evals == 0
    torch.testing.assert_close(sol.value, u_newton, rtol=0.0, atol=1e-8)


# ----------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------
def test_implicit_gradient_matches_finite_differences():
    model, sim = _simulated("item_response", n=12)
    values = {site: sim.truth[site] for site in model.global_sites}
    enc = AutoDEQ(model, values, solver=SafeguardedNewton(rtol=TIGHT))
    weights = torch.linspace(-1.0, 1.0, 12, dtype=F64)

    def loss():
        return (weights * enc.sites(sim.data)[0]["ability"] ** 2).sum()

    loss().backward()
    b = enc.site_parameters()["b"]  # real support: the unconstrained leaf itself
    assert b is enc.unconstrained[1]
    analytic = b.grad.clone()
    eps = 1e-6
    numeric = torch.zeros_like(analytic)
    with torch.no_grad():
        for j in range(len(analytic)):
            b[j] += eps
            plus = loss()
            b[j] -= 2 * eps
            minus = loss()
            b[j] += eps
            numeric[j] = (plus - minus) / (2 * eps)
    # central differences of a solve at 1e-12: error O(eps^2) + O(1e-12 / eps) ~ 1e-6 relative
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-8)


def test_envelope_gradient_equals_total_derivative():
    """d/dtheta of -log p(y, z*(theta), theta): detached z* (envelope) = through the adjoint."""
    model, sim = _simulated("poisson_factor", n=15)
    values = {site: sim.truth[site] for site in model.global_sites}
    enc = AutoDEQ(model, values, solver=SafeguardedNewton(rtol=TIGHT))

    def neg_log_joint(detach):
        sites, _ = enc.sites(sim.data)
        if detach:
            sites = {k: v.detach() for k, v in sites.items()}
        return -model.log_joint(sim.data, {**enc.site_parameters(), **sites})

    neg_log_joint(True).backward()
    envelope = {n: p.grad.clone() for n, p in enc.named_parameters()}
    enc.zero_grad()
    neg_log_joint(False).backward()
    for n, p in enc.named_parameters():
        torch.testing.assert_close(envelope[n], p.grad, rtol=1e-7, atol=1e-9)


# ----------------------------------------------------------------------------------------------
# what it cannot do, said before any solve
# ----------------------------------------------------------------------------------------------
def test_no_data_plate_is_refused():
    model = KernelGLM(gaussian(), SquaredExponential(lengthscale=1.0))
    with pytest.raises(ValueError, match="plate_name=None"):
        AutoDEQ(model, {})


def _discrete_local(y=None, *, num_data=None):
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
    with pyro.plate("data", len(y) if y is not None else num_data):
        c = pyro.sample("c", dist.Bernoulli(torch.tensor(0.5, dtype=F64)))
        return pyro.sample("y", dist.Normal(mu + c, 1.0), obs=y)


def _local_outside(y=None, *, num_data=None):
    shift = pyro.sample("shift", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
    with pyro.plate("data", len(y) if y is not None else num_data):
        return pyro.sample("y", dist.Normal(shift, 1.0), obs=y)


def _undeclared(y=None, *, num_data=None):
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
    with pyro.plate("data", len(y) if y is not None else num_data):
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        w = pyro.sample("w", dist.Normal(mu, 1.0))
        return pyro.sample("y", dist.Normal(z + w, 1.0), obs=y)


@pytest.mark.parametrize(
    "program, local, glob, match",
    [
        (_discrete_local, ("c",), ("mu",), r"local site 'c' .* is discrete"),
        (_local_outside, ("shift",), (), r"local site 'shift' .* is outside the plate 'data'"),
        (_undeclared, ("z",), ("mu",), r"latent sites \['w'\] declared neither"),
    ],
    ids=["discrete", "outside-plate", "undeclared"],
)
def test_structure_errors_name_the_site(program, local, glob, match):
    model = PyroModel(program, data_names=("y",), local_sites=local, global_sites=glob)
    enc = AutoDEQ(model, {name: torch.tensor(0.0, dtype=F64) for name in glob})
    with pytest.raises(ValueError, match=match):
        enc.solve(torch.zeros(4, dtype=F64))


def test_globals_missing_or_of_wrong_shape():
    model = USER_MODELS["robust_pca"]
    good = {"W": torch.zeros(NUM_FEATURES, NUM_FACTORS, dtype=F64), "B": torch.zeros(NUM_FEATURES, dtype=F64)}
    with pytest.raises(ValueError, match=r"missing \['B'\]"):
        AutoDEQ(model, {"W": good["W"]})
    enc = AutoDEQ(model, {**good, "W": torch.zeros(NUM_FEATURES + 1, NUM_FACTORS, dtype=F64)})
    with pytest.raises(ValueError, match=r"global site 'W' .* must have shape \(6, 2\) .* got .* \(7, 2\)"):
        enc.solve(torch.zeros(3, NUM_FEATURES, dtype=F64))
    with pytest.raises(ValueError, match="non-finite"):
        AutoDEQ(model, {**good, "B": torch.full((NUM_FEATURES,), float("nan"), dtype=F64)})


def test_bad_solver_type():
    model = USER_MODELS["robust_pca"]
    with pytest.raises(TypeError, match="solver"):
        AutoDEQ(model, {"W": torch.zeros(6, 2), "B": torch.zeros(6)}, solver="newton")
    with pytest.raises(ValueError, match="max_steps"):
        SafeguardedNewton(max_steps=0)


# ----------------------------------------------------------------------------------------------
# not locally convex: said, not hidden
# ----------------------------------------------------------------------------------------------
def _squared_mean(y=None, *, num_data=None):
    with pyro.plate("data", len(y) if y is not None else num_data):
        z = pyro.sample("z", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
        return pyro.sample("y", dist.Normal(z * z, 0.5), obs=y)


def test_stationary_point_that_is_not_a_minimum_is_reported():
    """y ~ N(z^2, 0.25), z ~ N(0, 1): for y > 1/8 the point z = 0 is a local maximum.

    F(z) = z^2/2 + 2 (y - z^2)^2, F''(0) = 1 - 8y; both minima at z^2 = y - 1/8.
    """
    model = PyroModel(_squared_mean, data_names=("y",), local_sites=("z",))
    enc = AutoDEQ(model, {})
    y = torch.tensor([2.0, 0.05], dtype=F64)
    start = torch.zeros(2, 1, dtype=F64)  # exactly stationary for both rows
    report = enc.curvature(y, start)
    torch.testing.assert_close(report.min_eigenvalue, 1.0 - 8.0 * y)
    assert report.is_minimum.tolist() == [False, True] and report.num_not_minimum == 1
    # a solve started exactly there meets the stopping rule at once, and says so
    with pytest.raises(NotAMinimumError, match=r"1 of 2 rows .* row 0, smallest Hessian eigenvalue -15"):
        enc.solve(y, z0=start)
    sol = enc.solve(y, z0=start, throw=False)
    assert bool(sol.converged.all()) and sol.solver_info.is_minimum.tolist() == [False, True]
    # the safeguarded Newton started off the maximum descends to a minimum
    sites, sol = enc.sites(y, z0=torch.full((2, 1), 1e-3, dtype=F64))
    assert bool(sol.converged.all())
    torch.testing.assert_close(sites["z"][0], torch.sqrt(y[0] - 0.125))
    assert bool(enc.curvature(y, sol.value).is_minimum.all())


def test_non_convergence_is_not_silent():
    model, sim = _simulated("poisson_factor")
    values = {site: sim.truth[site] for site in model.global_sites}
    enc = AutoDEQ(model, values, solver=SafeguardedNewton(max_steps=1))
    with pytest.raises(ConvergenceError, match="failed for"):
        enc.solve(sim.data)
    sol = enc.solve(sim.data, throw=False)
    assert not bool(sol.converged.all()) and sol.status.name != "CONVERGED"


def test_torch_func_grad_through_the_encoder_equals_backward():
    """The globals reach fixed_point as explicit arguments: torch.func.grad sees the adjoint."""
    model, sim = _simulated("item_response", n=12)
    values = {site: sim.truth[site] for site in model.global_sites}
    enc = AutoDEQ(model, values, solver=SafeguardedNewton(rtol=TIGHT))
    weights = torch.linspace(-1.0, 1.0, 12, dtype=F64)

    def loss(params):
        z, _ = torch.func.functional_call(enc, params, args=(sim.data,))
        return (weights * z[:, 0] ** 2).sum()

    grads = torch.func.grad(loss)({k: v.detach() for k, v in enc.named_parameters()})
    loss(dict(enc.named_parameters())).backward()
    for name, p in enc.named_parameters():
        assert float(p.grad.abs().max()) > 1e-3  # not a vacuous comparison
        torch.testing.assert_close(grads[name], p.grad)


# ----------------------------------------------------------------------------------------------
# the joint fit of the globals through AutoDEQ
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(USER_MODELS))
def test_joint_fit_reaches_fit_map_joint_optimum(name):
    model, sim = _simulated(name, n=30)
    start = {site: sim.truth[site] for site in model.global_sites}  # one basin for both fits
    ref = fit_map(model, sim.data, optimizer=LBFGS(), init=start, seed=0, progress=False, throw=True)
    enc = AutoDEQ(model, start, solver=SafeguardedNewton(rtol=TIGHT))
    fit = fit_encoder(enc, sim.data, progress=False, throw=True)
    assert -float(fit.loss_trace[-1]) == pytest.approx(float(ref.log_joint), rel=1e-8)
    # the fitted encoder's latents: a solve from fit_map's latents (the per-row posterior of
    # the Student-t model is multimodal with outliers, so a start from zero may find another
    # local minimum for some rows; the fits' branch is the one warm starts followed)
    start_u = torch.cat([enc._layout(enc.check_data(sim.data)).sites[i].transform.inv(ref.values[site])
                         .reshape(30, -1) for i, site in enumerate(model.local_sites)], dim=1)
    with torch.no_grad():
        sites, sol = enc.sites(sim.data, z0=start_u)
    assert bool(sol.converged.all())
    log_joint_auto = float(model.log_joint(sim.data, {**enc.values(), **sites}))
    assert log_joint_auto == pytest.approx(float(ref.log_joint), rel=1e-8)
    assert -float(fit.loss_trace[-1]) == pytest.approx(log_joint_auto, rel=1e-12)


def test_joint_fit_keeps_constrained_globals_in_their_support():
    model, sim = _simulated("item_response", n=30)
    enc = AutoDEQ(model, seed=3)  # seeded start from a one-row prior trace
    fit = fit_encoder(enc, sim.data, progress=False)
    assert fit.converged and bool((enc.values()["a"] > 0).all())
    assert float(fit.loss_trace[-1]) < float(fit.loss_trace[0])


def test_joint_fit_by_minibatch_adam_approaches_the_optimum():
    model, sim = _simulated("poisson_factor", n=40)
    start = {site: sim.truth[site] for site in model.global_sites}
    best = fit_encoder(AutoDEQ(model, start), sim.data, progress=False, throw=True).loss_trace[-1]
    enc = AutoDEQ(model, start)
    fit = fit_encoder(enc, sim.data, optimizer=Adam(lr=0.02, num_epochs=60, batch_size=10), progress=False)
    losses = fit.loss_trace
    assert fit.num_steps >= 5 and float(losses[-1]) < float(losses[0])
    # minibatch Adam with a plateau decay gets close to the L-BFGS optimum, not onto it
    assert float(losses[-1]) == pytest.approx(float(best), rel=1e-3)


def test_joint_fit_refuses_other_optimizers_and_encoders():
    model, sim = _simulated("robust_pca", n=5)
    enc = AutoDEQ(model, {s: sim.truth[s] for s in model.global_sites})
    with pytest.raises(TypeError, match="LBFGS"):
        fit_encoder(enc, sim.data, optimizer="lbfgs")
    with pytest.raises(TypeError, match="AbstractMAPEncoder"):
        fit_encoder(object(), sim.data)


# ----------------------------------------------------------------------------------------------
# the harness row "autodeq"
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(USER_MODELS))
def test_compare_produces_autodeq_rows_for_user_models(name):
    from deqppl.harness import DEQMethod, LBFGSMethod, compare

    model, sim = _simulated(name, n=30)
    data, heldout = {"y": sim.data["y"][:20]}, {"y": sim.data["y"][20:]}
    methods = [DEQMethod(name="autodeq", encoder=AutoDEQ, optimizer=LBFGS(max_steps=200)), LBFGSMethod()]
    summary = compare(model, data, methods=methods, heldout=heldout, progress=False).summary
    assert set(summary.index) == {"autodeq", "lbfgs"}
    assert summary.loc["autodeq", "converged"] == 1.0
    # same joint optimum and, under shared globals, the same held-out latents as L-BFGS
    # (rel 1e-6: the harness's LBFGS(max_steps=200) fit and default tolerances, not 1e-8)
    assert summary.loc["autodeq", "log_joint"] == pytest.approx(summary.loc["lbfgs", "log_joint"], rel=1e-6)
    assert summary.loc["autodeq", "max_abs_dz"] < 1e-6


@pytest.mark.parametrize("zoo", ["expfam_pca", "hierarchical"])
def test_compare_puts_autodeq_next_to_the_hand_written_encoder(zoo):
    from deqppl.harness import DEQMethod, LBFGSMethod, compare

    if zoo == "expfam_pca":
        model, encoder = ExpFamPCA(family=poisson(), obs_dim=D, latent_dim=L, param_scale=0.5), PEDEncoder
    else:
        model, encoder = HierarchicalExpFamPCA(widths=(6, 3, 2), param_scale=0.5), DeepPEDEncoder
    y = model.simulate(30, seed=0, dtype=F64).data["y"]
    methods = [
        DEQMethod(encoder=encoder, optimizer=LBFGS(max_steps=200)),
        DEQMethod(name="autodeq", encoder=AutoDEQ, optimizer=LBFGS(max_steps=200)),
        LBFGSMethod(),
    ]
    summary = compare(model, {"y": y[:20]}, methods=methods, heldout={"y": y[20:]}, progress=False).summary
    assert set(summary.index) == {"deq", "autodeq", "lbfgs"}
    # rel 1e-6: both joint fits stop at the harness's default L-BFGS tolerances
    assert summary.loc["autodeq", "log_joint"] == pytest.approx(summary.loc["deq", "log_joint"], rel=1e-6)
    assert summary.loc["autodeq", "max_abs_dz"] < 1e-6 and summary.loc["deq", "max_abs_dz"] < 1e-6


# ----------------------------------------------------------------------------------------------
# the traced objective (deqppl/encoders/_traced.py): same fixed points, exact Hessians
# ----------------------------------------------------------------------------------------------
def _traced_kinds(enc):
    """Per traced batch shape: None (Pyro path), 'separable' or 'autograd' Hessians."""
    return [None if t is None else ("separable" if t.separable is not None else "autograd")
            for t in enc._traced.values()]


TRACED_PCA = [c for c in CASES if c[0] in ("poisson", "bernoulli", "gaussian", "binomial5",
                                             "bernoulli-smooth_relu", "exponential-neg_smooth_relu")]


@pytest.mark.parametrize("case", TRACED_PCA, ids=[c[0] for c in TRACED_PCA])
def test_traced_objective_equals_the_pyro_path(case):
    _, fam, nl, lam, scale = case
    model, y, values = _pca(fam, nl, lam, scale, n=40)
    solver = SafeguardedNewton(rtol=TIGHT)
    traced = AutoDEQ(model, values, solver=solver, trace_objective=True)
    plain = AutoDEQ(model, values, solver=solver, trace_objective=False)
    with torch.no_grad():
        sol_t, sol_p = traced.solve(y), plain.solve(y)
    assert _traced_kinds(traced) == ["separable"] and _traced_kinds(plain) == []
    assert bool(sol_t.converged.all())
    torch.testing.assert_close(sol_t.value, sol_p.value, rtol=0.0, atol=1e-10)
    # the separable Hessians at the solution against autograd's on the Pyro trace
    torch.testing.assert_close(sol_t.solver_info.hessian, plain.hessian(sol_t.value, traced.check_data(y)))


@pytest.mark.parametrize("name, kind", [("poisson_factor", "autograd"), ("robust_pca", "separable"),
                                        ("item_response", "separable")])
def test_traced_objective_on_user_models(name, kind):
    # poisson_factor: rate = size * exp(z W^T + B) multiplies two leaves pointwise (cross terms),
    # so its traced objective keeps autograd's Hessians
    model, sim = _simulated(name)
    values = {site: sim.truth[site] for site in model.global_sites}
    traced = AutoDEQ(model, values, trace_objective=True)
    plain = AutoDEQ(model, values, trace_objective=False)
    with torch.no_grad():
        sol_t, sol_p = traced.solve(sim.data), plain.solve(sim.data)
    assert _traced_kinds(traced) == [kind]
    # both stop at the default relative residual 1e-8 from the same start: equal to ~1e-8
    torch.testing.assert_close(sol_t.value, sol_p.value, rtol=0.0, atol=1e-7)
    torch.testing.assert_close(sol_t.solver_info.hessian, plain.hessian(sol_t.value, traced.check_data(sim.data)))


def _value_branching(y=None, *, num_data=None):
    """Control flow on a data value: traceable only with values, so it keeps the Pyro path."""
    n = len(y) if y is not None else num_data
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
    with pyro.plate("data", n):
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        scale = 2.0 if y is not None and float(y.abs().max()) > 100.0 else 1.0
        return pyro.sample("y", dist.Normal(z, scale), obs=y)


def test_untraceable_program_keeps_the_pyro_path():
    model = PyroModel(_value_branching, data_names=("y",), local_sites=("z",), global_sites=("mu",))
    y = torch.linspace(-2.0, 2.0, 20, dtype=F64)
    enc = AutoDEQ(model, {"mu": torch.tensor(0.5, dtype=F64)}, trace_objective=True)
    with torch.no_grad():
        z, sol = enc(y)
    assert _traced_kinds(enc) == [None]
    # closed form: z = (y + mu) / 2 (unit prior and likelihood variances)
    torch.testing.assert_close(z[:, 0], (y + 0.5) / 2)


def test_trace_objective_must_be_a_bool_or_none():
    model, _, values = _pca(poisson(), identity(), 1.0, 0.5)
    with pytest.raises(TypeError, match="trace_objective"):
        AutoDEQ(model, values, trace_objective="yes")


def test_constrained_globals_are_held_unconstrained():
    model, sim = _simulated("item_response", n=5)
    values = {site: sim.truth[site] for site in model.global_sites}
    enc = AutoDEQ(model, values)
    # a ~ LogNormal: positive, held as log(a); b ~ Normal: real, held as itself
    torch.testing.assert_close(enc.unconstrained[0].detach(), values["a"].log())
    assert enc.site_parameters()["b"] is enc.unconstrained[1]
    torch.testing.assert_close(enc.values()["a"], values["a"])
    assert enc.fit_parameters() == list(enc.unconstrained)
    flipped = {**values, "a": -values["a"]}
    with pytest.raises(ValueError, match="outside the support of global site 'a'"):
        AutoDEQ(model, flipped)
    with pytest.raises(ValueError, match="outside the support of global site 'a'"):
        enc.load_values(flipped)
    enc.load_values({**values, "a": 2 * values["a"]})
    torch.testing.assert_close(enc.values()["a"], 2 * values["a"])


def _assert_traced_derivatives_equal_autograd(enc, data, u, subsets):
    """The evaluator's F (plus its offset), gradients, Hessians (all, and a selection as the
    Newton steps ask for them) on the batch and on row subsets, against autograd on the Pyro
    log joint of those rows."""
    layout, params = enc._layout(data), enc._globals(detach=True)
    with torch.no_grad():
        ev = enc._evaluator(data, layout, params, torch.zeros_like(u))
        assert ev.fast is not None and ev.fast.compact
        for rows in (torch.arange(u.shape[0]), *subsets):
            F, g, hess = ev.linearize(rows, u[rows])
            sub = {k: v[rows] for k, v in data.items()}
            F_ref, g_ref, hess_ref = enc._linearize(u[rows], sub, layout, params)
            # the traced values leave out each row's latent-free terms; the offset adds them back
            F_ref = F_ref - ev.offset(rows)
            torch.testing.assert_close(F, F_ref, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(hess(), hess_ref(), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(hess(torch.tensor([0])), hess_ref()[:1], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(ev.value(rows, u[rows]), F_ref, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(ev.value_and_grad(rows, u[rows])[1], g_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", TRACED_PCA, ids=[c[0] for c in TRACED_PCA])
def test_traced_derivatives_of_row_subsets_equal_autograd_on_the_pyro_trace(case):
    # the derivative graphs (autograd's passes traced, folded, hoisted, rewritten for any
    # number of rows) against autograd on the Pyro log joint, on the batch and on subsets
    _, fam, nl, lam, scale = case
    model, y, values = _pca(fam, nl, lam, scale, n=40)
    enc = AutoDEQ(model, values, trace_objective=True)
    u = 0.5 * torch.randn(40, L, generator=torch.Generator().manual_seed(3), dtype=F64)
    _assert_traced_derivatives_equal_autograd(enc, enc.check_data(y), u,
                                              (torch.tensor([3, 17, 39]), torch.tensor([5])))


@pytest.mark.parametrize("name", ["robust_pca", "item_response"])
def test_traced_derivatives_of_user_models_equal_autograd_on_the_pyro_trace(name):
    # the graph rewrites (dropped constants, linear terms on the latent side, log-sigmoid,
    # broadcast fills, equal-row inputs) on graphs that are not ExpFamPCA's: a Student-t
    # likelihood (lgamma of the degrees of freedom, log1p) and logits a * (ability - b)
    model, sim = _simulated(name, n=30)
    values = {site: sim.truth[site] for site in model.global_sites}
    enc = AutoDEQ(model, values, trace_objective=True)
    data = enc.check_data(sim.data)
    n, dim = enc.latent_shape(data)
    u = 0.7 * torch.randn(n, dim, generator=torch.Generator().manual_seed(5), dtype=F64)
    _assert_traced_derivatives_equal_autograd(enc, data, u, (torch.tensor([0, 11, 29]), torch.tensor([4])))


@pytest.mark.parametrize("case", TRACED_PCA, ids=[c[0] for c in TRACED_PCA])
def test_traced_values_leave_out_the_latent_free_terms(case):
    # lgamma(y + 1), log(2 pi) / 2 and the prior's log scale are constants per row: no graph
    # evaluated per solve computes them, and offset + value is the Pyro objective
    _, fam, nl, lam, scale = case
    model, y, values = _pca(fam, nl, lam, scale, n=40)
    enc = AutoDEQ(model, values, trace_objective=True)
    data = enc.check_data(y)
    layout, params = enc._layout(data), enc._globals(detach=True)
    u = 0.5 * torch.randn(40, L, generator=torch.Generator().manual_seed(4), dtype=F64)
    with torch.no_grad():
        ev = enc._evaluator(data, layout, params, torch.zeros_like(u))
        traced = ev.fast.traced
        assert traced.stripped
        per_solve = [traced.prologue, traced.body, *[g for gs in traced.separable.derivatives.graphs.values()
                                                     for g in gs[:2]]]
        ops = {str(n.target) for gm in per_solve for n in gm.graph.nodes if n.op == "call_function"}
        assert not any("lgamma" in op for op in ops)
        everything = torch.arange(40)
        F_pyro = enc._neg_rows(u, data, layout, params)
        torch.testing.assert_close(ev.value(everything, u) + ev.offset(everything), F_pyro,
                                   rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ev.fast.full_value(u), F_pyro, rtol=1e-12, atol=1e-12)
        # a start comparing candidates inside a solve: the solve's values, up to the offset
        enc._solving = ev
        try:
            torch.testing.assert_close(enc.objective(u, data) + ev.offset(everything), F_pyro,
                                       rtol=1e-12, atol=1e-12)
        finally:
            enc._solving = None
        torch.testing.assert_close(enc.objective(u, data), F_pyro, rtol=1e-12, atol=1e-12)
    if fam == poisson():
        assert any("lgamma" in str(n.target) for n in traced.full.graph.nodes)


@pytest.mark.parametrize("family", [poisson(), bernoulli()], ids=["poisson", "bernoulli"])
def test_derivative_graphs_read_the_data_through_per_row_products_only(family):
    # y eta is linear in the latents (u . (y W) + y . B, hoisted), the gradient's y W too, and
    # autograd's ones(n, d) cotangent is a broadcast scalar: no per-evaluation input has more
    # than D entries per row, so no pass over the n x d data is spent on them
    model, y, values = _pca(family, identity(), 1.0, 0.5, n=40)
    enc = AutoDEQ(model, values, trace_objective=True)
    data = enc.check_data(y)
    with torch.no_grad():
        ev = enc._evaluator(data, enc._layout(data), enc._globals(detach=True), torch.zeros(40, L, dtype=F64))
        bound = ev.fast.curvature
        for kind in ("grad", "curv"):
            _, consts, _, rowwise = bound.derived[kind]
            widths = [c[:1].numel() for c, row in zip(consts, rowwise) if row]
            assert max(widths) <= L, (kind, widths)


def test_log_sigmoid_rewrite_is_accurate_at_extreme_logits():
    # binary_cross_entropy_with_logits as x - y x - log(sigmoid(x)), sharing the gradient's
    # sigmoid, against ATen's kernel: the same to rounding from -1000 to 1000, finite everywhere
    from torch.fx.experimental.proxy_tensor import make_fx

    from deqppl.encoders._traced import _log_sigmoid_from_sigmoid

    def f(x, y):
        bce = torch.nn.functional.binary_cross_entropy_with_logits(x, y, reduction="none")
        return bce, torch.sigmoid(x) - y

    x = torch.tensor([-1000.0, -745.5, -720.0, -700.0, -40.0, -36.1, -36.0, -5.0, -1e-3, 0.0,
                      1e-3, 5.0, 36.0, 40.0, 700.0, 1000.0], dtype=F64).repeat(2)
    y = torch.cat([torch.zeros(16, dtype=F64), torch.ones(16, dtype=F64)])
    gm = make_fx(f, tracing_mode="fake")(x, y)
    _log_sigmoid_from_sigmoid(gm.graph, F64)
    gm.recompile()
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.binary_cross_entropy_with_logits.default not in targets
    assert targets.count(torch.ops.aten.sigmoid.default) == 1
    want, got = f(x, y), gm(x, y)
    assert bool(torch.isfinite(got[0]).all())
    torch.testing.assert_close(got[0], want[0], rtol=4 * torch.finfo(F64).eps, atol=8 * torch.finfo(F64).eps)
    torch.testing.assert_close(got[1], want[1], rtol=0.0, atol=0.0)


# ----------------------------------------------------------------------------------------------
# starts: summary() is the score at u = 0, a start changes the cost only
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("traced", [False, True], ids=["pyro", "traced"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_summary_is_the_score_at_zero(case, traced):
    # closed form from the hand-written layer: f(z) = z - grad F(z) / lam, so the score at 0
    # is -grad F(0) = lam * f(0) (every family and nonlinearity)
    _, fam, nl, lam, scale = case
    model, y, values = _pca(fam, nl, lam, scale, n=40)
    auto = AutoDEQ(model, values, trace_objective=traced)
    ped = PEDEncoder.from_values(model, values)
    with torch.no_grad():
        s = auto.summary(auto.check_data(y))
        want = lam * ped.layer(torch.zeros(40, L, dtype=F64), y)
    torch.testing.assert_close(s, want, rtol=1e-12, atol=1e-12)
    if nl == identity():  # an affine map of the PED summary W^T T(y)
        torch.testing.assert_close(s, ped.summary(y) - values["W"].T @ fam.dA(values["B"]))


@pytest.mark.parametrize("name", list(USER_MODELS))
def test_summary_equals_finite_differences_of_the_objective(name):
    model, sim = _simulated(name, n=12)
    values = {site: sim.truth[site] for site in model.global_sites}
    enc = AutoDEQ(model, values)
    data = enc.check_data(sim.data)
    s = enc.summary(data)
    n, dim = enc.latent_shape(data)
    h = 1e-5
    fd = torch.empty(n, dim, dtype=F64)
    with torch.no_grad():
        for k in range(dim):
            e = torch.zeros(n, dim, dtype=F64)
            e[:, k] = h
            up, down = enc.objective(e, data, validated=True), enc.objective(-e, data, validated=True)
            fd[:, k] = -(up - down) / (2 * h)
    # central differences: error O(h^2 |F'''|) ~ 1e-9 here
    torch.testing.assert_close(s, fd, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("traced", [False, True], ids=["pyro", "traced"])
@pytest.mark.parametrize("family", [poisson(), bernoulli()], ids=["poisson", "bernoulli"])
def test_learned_start_changes_the_cost_not_the_fixed_point(family, traced):
    from deqppl.encoders import LearnedStart, ZeroStart

    model, y, values = _pca(family, identity(), 1.0, 0.5, n=60)
    y_train = model.simulate(300, seed=5, dtype=F64).data["y"]
    solver = SafeguardedNewton(rtol=TIGHT)
    zero = AutoDEQ(model, values, solver=solver, trace_objective=traced)
    assert isinstance(zero.start, ZeroStart)
    unfitted = AutoDEQ(model, values, start=LearnedStart(degree=2))
    with pytest.raises(ValueError, match="not fitted"):
        unfitted(y)
    learned = AutoDEQ(model, values, solver=solver, trace_objective=traced)
    learned.start = LearnedStart(degree=2, fallback=ZeroStart()).fit(learned, y_train)
    with torch.no_grad():
        sol_zero, sol_learned = zero.solve(y), learned.solve(y)
        z0 = learned.initial_guess(learned.check_data(y))
    assert bool(sol_zero.converged.all()) and bool(sol_learned.converged.all())
    torch.testing.assert_close(sol_learned.value, sol_zero.value, rtol=0.0, atol=1e-10)
    # the start is nearer the fixed points than zero, and the solve no longer
    assert float((z0 - sol_zero.value).norm()) < float(sol_zero.value.norm())
    assert sol_learned.num_steps <= sol_zero.num_steps


def test_bad_starts_raise_clearly():
    from deqppl.encoders import AbstractStart, LearnedStart

    model, y, values = _pca(poisson(), identity(), 1.0, 0.5, n=30)
    with pytest.raises(TypeError, match="start must be a deqppl.encoders start object"):
        AutoDEQ(model, values, start="zeros")

    class Wrong(AbstractStart):
        def __init__(self, value):
            self.value = value

        def __call__(self, encoder, data):
            return self.value

    with pytest.raises(ValueError, match="the start Wrong"):
        AutoDEQ(model, values, start=Wrong(torch.zeros(30, L + 1, dtype=F64)))(y)
    with pytest.raises(ValueError, match="the start Wrong"):
        AutoDEQ(model, values, start=Wrong(torch.full((30, L), float("nan"), dtype=F64)))(y)
    # a learned start fitted for another latent size
    other, y_other, values_other = _pca(poisson(), identity(), 1.0, 0.5, n=60)
    wide = ExpFamPCA(family=poisson(), obs_dim=D, latent_dim=L + 1)
    ped = PEDEncoder(wide).double()
    start = LearnedStart(degree=1).fit(ped, y_other)
    with pytest.raises(ValueError, match="width"):
        AutoDEQ(model, values, start=start)(y)


def test_traced_derivatives_in_row_blocks_equal_the_whole_batch(monkeypatch):
    # blocks of 7 rows (the widest intermediate: D entries per row) against one block: the same values
    import deqppl.encoders._traced as traced_module

    model, y, values = _pca(poisson(), identity(), 1.0, 0.5, n=40)
    gen = torch.Generator().manual_seed(4)
    u = 0.5 * torch.randn(40, L, generator=gen, dtype=F64)
    rows = torch.arange(1, 40, 2)
    results = []
    for entries in (traced_module.TRACED_BLOCK_ENTRIES, 7 * D):
        monkeypatch.setattr(traced_module, "TRACED_BLOCK_ENTRIES", entries)
        enc = AutoDEQ(model, values, trace_objective=True)
        data = enc.check_data(y)
        with torch.no_grad():
            ev = enc._evaluator(data, enc._layout(data), enc._globals(detach=True), torch.zeros_like(u))
            assert ev.fast.compact and ev.fast.curvature.block_rows == entries // D
            F, g, hess = ev.linearize(rows, u[rows])
            results.append((F, g, hess(), ev.value(rows, u[rows]), enc.solve(y).value))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("D", [1, 3, 5, 8, 12])
def test_batched_cholesky_matches_lapack(D):
    """The Newton step's batched Cholesky (column by column over the batch for small D) against
    LAPACK's cholesky_ex / cholesky_solve: same solves, same positive-definiteness verdicts on
    indefinite, singular and non-finite rows; also on (n, D, D) views of a (D, D, n) layout."""
    from deqppl.encoders.auto import _cholesky, _cholesky_solve

    g = torch.Generator().manual_seed(D)
    n = 64
    A = torch.randn(n, D, 2 * D, generator=g, dtype=torch.float64)
    H = A @ A.transpose(1, 2) / D + 0.1 * torch.eye(D, dtype=torch.float64)
    H[0] = -H[0]  # negative definite
    H[1, -1, -1] = -50.0  # indefinite in the last pivot only
    H[2] = 0.0  # singular
    H[3, 0, 0] = float("nan")
    H[4, -1, 0] = H[4, 0, -1] = float("inf")
    b = torch.randn(n, D, generator=g, dtype=torch.float64)
    chol, info = torch.linalg.cholesky_ex(H)
    for H_in in (H, H.permute(1, 2, 0).contiguous().permute(2, 0, 1)):
        L, ok = _cholesky(H_in)
        assert torch.equal(ok, info == 0)
        want = torch.cholesky_solve(b[ok].unsqueeze(-1), chol[ok]).squeeze(-1)
        got = _cholesky_solve(L, b)[ok]
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
