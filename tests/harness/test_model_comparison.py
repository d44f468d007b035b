"""Model comparison: InferenceData layout, PSIS-LOO, and pointwise log-likelihoods vs the log joint."""

import math

import numpy as np

import pytest
import torch

from deqppl.expfam import binomial, family
from deqppl.harness import compare_models
from deqppl.harness.model_comparison import pointwise_log_lik
from deqppl.inference import log_joint
from deqppl.models import ExpFamPCA

F64 = torch.float64


@pytest.fixture(scope="module")
def comparison():
    truth = ExpFamPCA(family=binomial(16), obs_dim=8, latent_dim=2, param_scale=0.5)
    y = truth.simulate(60, seed=0, dtype=F64).data["y"]
    models = {
        "binomial_l1": ExpFamPCA(family=binomial(16), obs_dim=8, latent_dim=1, param_scale=0.5),
        "binomial_l2": truth,
        "poisson_l2": ExpFamPCA(family=family("poisson"), obs_dim=8, latent_dim=2, param_scale=0.5),
    }
    return models, y, compare_models(models, {"y": y[:45]}, {"y": y[45:]}, num_draws=40, seed=0, progress=False)


def test_inference_data_groups_and_shapes(comparison):
    models, y, mc = comparison
    assert list(mc.table["model"]) == list(models)
    for name, model in models.items():
        idata = mc.idata[name]
        assert {"posterior", "log_likelihood"} <= set(idata.groups())
        assert idata.posterior["z"].shape == (1, 40, 15, model.latent_dim)
        assert idata.log_likelihood["y"].shape == (1, 40, 15)
        assert idata.posterior["z"].dims == ("chain", "draw", "obs", "latent")
    assert set(mc.loo.index) == set(models)
    assert mc.table[["heldout_log_lik", "elpd_loo", "heldout_log_marginal"]].notna().all().all()
    # elpd_loo leaves one draw set out; with the Laplace draws around each row's own optimum it
    # cannot exceed the in-sample log mean exp by more than the LOO correction's scale (p_loo).
    t = mc.table.set_index("model")
    assert (t["elpd_loo"] <= t["heldout_log_lik"] + 1e-9).all()


def test_heldout_log_lik_is_log_mean_exp_of_idata(comparison):
    _, _, mc = comparison
    for name, row in mc.table.set_index("model").iterrows():
        ll = torch.as_tensor(mc.idata[name].log_likelihood["y"].values[0])
        want = float((torch.logsumexp(ll, 0) - math.log(ll.shape[0])).sum())
        assert row["heldout_log_lik"] == pytest.approx(want, rel=1e-12)


def test_pointwise_log_lik_equals_log_joint_minus_priors():
    # Independent route: the model's total log joint minus the log priors of W, B and z.
    model = ExpFamPCA(family=family("poisson"), obs_dim=5, latent_dim=2, lam=2.0)
    sim = model.simulate(9, seed=4, dtype=F64)
    draws = sim.truth["z"] + 0.1 * torch.randn(3, 9, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    globals_ = {"W": sim.truth["W"], "B": sim.truth["B"]}
    got = pointwise_log_lik(model, model.validate(sim.data), globals_, draws)
    assert got.shape == (3, 9)
    def normal(loc, scale):  # float64 parameters (python floats would make them float32)
        return torch.distributions.Normal(torch.tensor(loc, dtype=F64), torch.tensor(scale, dtype=F64))

    prior_globals = normal(0.0, 1.0).log_prob(globals_["W"]).sum() + normal(0.0, 1.0).log_prob(globals_["B"]).sum()
    for s in range(3):
        total = log_joint(model, sim.data, {**globals_, "z": draws[s]})
        prior_z = normal(0.0, 2.0**-0.5).log_prob(draws[s]).sum()
        assert float(got[s].sum()) == pytest.approx(float(total - prior_globals - prior_z), rel=1e-12)


def test_bad_arguments_raise():
    model = ExpFamPCA(family=family("poisson"), obs_dim=3, latent_dim=1)
    y = model.simulate(6, seed=0, dtype=F64).data["y"]
    with pytest.raises(ValueError, match="models is empty"):
        compare_models({}, {"y": y}, {"y": y}, progress=False)
    with pytest.raises(ValueError, match="num_draws must be an integer >= 2, got 1"):
        compare_models({"m": model}, {"y": y}, {"y": y}, num_draws=1, progress=False)


def test_heldout_log_marginal_is_exact_for_gaussian_pca():
    # Gaussian PCA with R = id: the Laplace approximation is the exact posterior, so the
    # importance weights p(y|z)p(z)/q(z) are constant and the estimate equals the closed-form
    # marginal y ~ N(B, W W^T / lam + I) (scipy oracle) for every number of draws.
    from dataclasses import dataclass

    from scipy import stats

    from deqppl.harness import AbstractMethod, StageResult

    model = ExpFamPCA(family=family("gaussian"), obs_dim=4, latent_dim=2, lam=2.0)
    sim = model.simulate(12, seed=5, dtype=F64)
    truth = {"W": sim.truth["W"], "B": sim.truth["B"]}

    @dataclass(frozen=True, kw_only=True)
    class TrueGlobals(AbstractMethod):
        name: str = "truth"

        def fit_globals(self, model, data, *, seed, progress):
            return StageResult(values=dict(truth), log_joint=0.0, wall_time=0.0, num_steps=0,
                               num_grad_evals=0, status="given", converged=True)

    y = sim.data["y"]
    mc = compare_models({"g": model}, {"y": y}, {"y": y}, num_draws=5, method=TrueGlobals(), progress=False)
    W, B = truth["W"].numpy(), truth["B"].numpy()
    cov = W @ W.T / model.lam + np.eye(4)
    want = stats.multivariate_normal(B, cov).logpdf(y.numpy()).sum()
    assert float(mc.table.loc[0, "heldout_log_marginal"]) == pytest.approx(want, rel=1e-10)


def test_poisson_models_of_several_sizes_fit(float64):
    """Poisson PCA of several latent sizes compares end to end (exp link: L-BFGS trial points
    can overflow, which fit_map must treat as a line-search overshoot, not an error)."""
    sim = ExpFamPCA(family=family("poisson"), obs_dim=8, latent_dim=2).simulate(120, seed=0)
    y = sim.data["y"]
    models = {
        f"poisson_l{l}": ExpFamPCA(family=family("poisson"), obs_dim=8, latent_dim=l)
        for l in (1, 2, 3)
    }
    res = compare_models(models, {"y": y[:100]}, {"y": y[100:]}, num_draws=20, seed=0, progress=False)
    assert list(res.table["model"]) == list(models)
    assert np.isfinite(res.table["heldout_log_lik"].to_numpy()).all()
