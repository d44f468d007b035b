"""Contract every zoo model passes: one table of (model factory, num_data, recovery check).

Adding a model is one row in ``ZOO`` (and in ``CHECKED``, the table the shipped
:func:`deqppl.protocols.check_model` runs on).
"""

import math

import pytest
import torch

from deqppl.expfam import binomial, exponential, family, identity, neg_smooth_relu, relu, smooth_relu
from deqppl.inference import fit_map, principal_angles
from deqppl.optim import LBFGS
from deqppl.kernels import Matern32, SquaredExponential
from deqppl.models import ExpFamPCA, HierarchicalExpFamPCA, KernelGLM
from deqppl.protocols import MODEL_RULES, check_model


def _subspace_error(model, sim, values):
    """Largest principal angle between true and fitted loadings (rotation invariant)."""
    return float(principal_angles(sim.truth["W"], values["W"]).max())


def _hier_subspace_error(model, sim, values):
    return float(principal_angles(sim.truth["W1"], values["W1"]).max())


def _function_error(model, sim, values):
    """Relative L2 error of the fitted latent function f = L u against the true one."""
    x = sim.data["x"]
    f_true, f_fit = model.natural(sim.truth, x), model.natural(values, x)
    return float(torch.linalg.vector_norm(f_fit - f_true) / torch.linalg.vector_norm(f_true))


# (id, model factory, num_data, recovery metric, tolerance). The subspace tolerances are ~2x the
# value measured at seed 0 (float64 joint L-BFGS MAP) and far below the ~1.2 rad of unrelated
# planes. The kernel GLM's is for a smooth function observed with unit-variance noise at 200
# points: the MAP (kernel ridge) fit's relative error was 0.14 at seed 0; 0.3 allows for the
# rough prior components that no data can recover while failing any fit that ignores the data.
ZOO = [
    pytest.param(
        lambda: ExpFamPCA(family=family("gaussian"), obs_dim=8, latent_dim=2),
        200, _subspace_error, 0.2, id="expfam_pca-gaussian",
    ),
    pytest.param(
        lambda: ExpFamPCA(family=family("bernoulli"), obs_dim=8, latent_dim=2),
        200, _subspace_error, 0.6, id="expfam_pca-bernoulli",
    ),
    pytest.param(
        lambda: ExpFamPCA(family=family("poisson"), obs_dim=8, latent_dim=2),
        200, _subspace_error, 0.2, id="expfam_pca-poisson",
    ),
    pytest.param(
        lambda: HierarchicalExpFamPCA(widths=(8, 2, 2)),
        200, _hier_subspace_error, 0.4, id="hierarchical-2layer",
    ),
    pytest.param(
        lambda: KernelGLM(family("gaussian"), SquaredExponential(lengthscale=1.0), lam=1.0),
        200, _function_error, 0.3, id="kernel_glm-gaussian",
    ),
]


@pytest.mark.parametrize(("make", "num_data", "metric", "tol"), ZOO)
def test_simulate_shapes_and_sites(make, num_data, metric, tol):
    model = make()
    sim = model.simulate(7, seed=0)
    assert set(sim.data) == set(model.data_names)
    assert set(sim.truth) == set(model.local_sites) | set(model.global_sites)
    for name in model.local_sites:
        assert sim.truth[name].shape[0] == 7
    for name in model.data_names:
        assert sim.data[name].shape[0] == 7
    again = model.simulate(7, seed=0)
    assert all(torch.equal(again.truth[k], v) for k, v in sim.truth.items())
    lj = model.log_joint(sim.data, sim.truth)
    assert lj.shape == () and math.isfinite(float(lj))


@pytest.mark.parametrize(("make", "num_data", "metric", "tol"), ZOO)
def test_simulate_then_fit_recovers_truth(make, num_data, metric, tol):
    model = make()
    sim = model.simulate(num_data, seed=0, dtype=torch.float64)
    fit = fit_map(model, sim.data, optimizer=LBFGS(max_steps=2000), progress=False)
    err = metric(model, sim, fit.values)
    print(f"\n{model.__class__.__name__}: {fit.criterion}; recovery error {err:.3g} (tol {tol})")
    assert fit.converged
    assert err < tol


@pytest.mark.parametrize(("make", "num_data", "metric", "tol"), ZOO)
def test_validate_rejects_bad_input(make, num_data, metric, tol):
    model = make()
    data = model.simulate(4, seed=0).data
    y = data["y"].clone()
    bad = y.clone()
    if y.dim() == 2:
        bad[2, 1] = float("nan")
        where, truncated = "row 2, column 1", y[:, :-1]
    else:  # one observation per row
        bad[2] = float("nan")
        where, truncated = "row 2", y[:-1]
    with pytest.raises(ValueError, match=where):
        model.validate({**data, "y": bad})
    with pytest.raises(ValueError, match="shape"):
        model.validate({**data, "y": truncated})
    with pytest.raises(ValueError, match="keys"):
        model.validate({"wrong_name": y})
    with pytest.raises(TypeError):
        model.validate({**data, "y": "not numbers"})


# The shipped contract check on every zoo model: ExpFamPCA for every family (the exponential
# with the nonlinearity its domain needs), rectified and flat-prior variants, the hierarchy and
# the kernel GLM (coupled locals).
CHECKED = [
    *[
        pytest.param(lambda name=name: ExpFamPCA(family=family(name), obs_dim=4, latent_dim=2), id=f"pca-{name}")
        for name in ("gaussian", "bernoulli", "poisson", "ising", "continuous_bernoulli")
    ],
    pytest.param(lambda: ExpFamPCA(family=binomial(16), obs_dim=4, latent_dim=2), id="pca-binomial16"),
    pytest.param(
        lambda: ExpFamPCA(family=exponential(), nonlinearity=neg_smooth_relu(0.5), obs_dim=4, latent_dim=2),
        id="pca-exponential-neg_smooth_relu",
    ),
    pytest.param(
        lambda: ExpFamPCA(family=family("poisson"), nonlinearity=smooth_relu(0.5), obs_dim=4, latent_dim=2),
        id="pca-poisson-smooth_relu",
    ),
    pytest.param(
        lambda: ExpFamPCA(family=family("gaussian"), nonlinearity=relu(), obs_dim=4, latent_dim=1, param_scale=None),
        id="pca-gaussian-relu-flat",
    ),
    pytest.param(lambda: HierarchicalExpFamPCA(widths=(5, 3, 2)), id="hierarchical-2layer"),
    pytest.param(
        lambda: HierarchicalExpFamPCA(
            widths=(5, 3, 2, 1), nonlinearities=(smooth_relu(0.5),) * 3, precisions=(2.0, 1.0, 0.5, 1.0),
            param_scale=None,
        ),
        id="hierarchical-3layer-smooth_relu-flat",
    ),
    pytest.param(lambda: KernelGLM(family("gaussian"), SquaredExponential(lengthscale=1.0)), id="kglm-gaussian"),
    pytest.param(lambda: KernelGLM(family("bernoulli"), Matern32(), lam=0.5), id="kglm-bernoulli"),
    pytest.param(lambda: KernelGLM(family("poisson"), SquaredExponential()), id="kglm-poisson"),
]


@pytest.mark.parametrize("make", CHECKED)
def test_check_model_passes(make):
    model = make()
    report = check_model(model)
    skipped = {name for name, _ in report.skipped}
    assert set(report.passed) | skipped == {rule.name for rule in MODEL_RULES}
    if model.locals_coupled:  # kernel GLM: no plate, so the plate rules do not apply
        assert skipped >= {"locals_in_plate", "globals_outside_plate", "per_datum_factorises"}
        assert "per_datum_sums_to_total" in skipped  # it checked that per_datum=True raises
    else:
        assert skipped <= {"validate_rejects_outside_support"}


@pytest.mark.parametrize("make", CHECKED)
def test_zoo_declarations(make):
    model = make()
    assert model.observed_sites == ("y",)
    assert model.plate_name == (None if isinstance(model, KernelGLM) else "data")


def test_family_nonlinearity_domain_is_checked_at_construction():
    with pytest.raises(ValueError, match=r"identity takes values in \(-inf, inf\).*domain \(-inf, 0\) of "
                       r"exponential\(\).*neg_smooth_relu"):
        ExpFamPCA(family=exponential(), nonlinearity=identity(), obs_dim=3, latent_dim=1)
    with pytest.raises(ValueError, match=r"relu takes values in \[0, inf\)"):
        ExpFamPCA(family=exponential(), nonlinearity=relu(), obs_dim=3, latent_dim=1)
    model = ExpFamPCA(family=exponential(), nonlinearity=neg_smooth_relu(1.0), obs_dim=3, latent_dim=1)
    sim = model.simulate(5, seed=0, dtype=torch.float64)
    assert math.isfinite(float(model.log_joint(sim.data, sim.truth)))
    with pytest.raises(ValueError, match="natural parameter may be any real"):
        KernelGLM(exponential(), SquaredExponential())
