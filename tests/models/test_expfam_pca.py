"""ExpFamPCA specifics: support checks, RNG hygiene, subsampled program, flat prior."""

import pytest
import pyro
import torch

from deqppl.expfam import family, relu
from deqppl.models import ExpFamPCA


@pytest.mark.parametrize(
    ("name", "bad", "allowed"),
    [("bernoulli", 2.0, "0 or 1"), ("poisson", 1.5, "non-negative integer"), ("poisson", -1.0, "non-negative")],
)
def test_out_of_support_names_value_row_column(name, bad, allowed):
    model = ExpFamPCA(family=family(name), obs_dim=3, latent_dim=1)
    y = model.simulate(4, seed=0).data["y"]
    y[3, 2] = bad
    with pytest.raises(ValueError, match=rf"value {bad}.*row 3, column 2.*{allowed}"):
        model.validate({"y": y})


def test_simulate_does_not_touch_global_rng():
    model = ExpFamPCA(family=family("poisson"), obs_dim=3, latent_dim=1)
    state = torch.get_rng_state()
    model.simulate(5, seed=1)
    assert torch.equal(torch.get_rng_state(), state)


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="latent_dim"):
        ExpFamPCA(family=family("gaussian"), obs_dim=3, latent_dim=0)
    with pytest.raises(ValueError, match="lam"):
        ExpFamPCA(family=family("gaussian"), obs_dim=3, latent_dim=1, lam=-1.0)


def test_subsampled_program_scales_observations():
    model = ExpFamPCA(family=family("bernoulli"), obs_dim=3, latent_dim=1, nonlinearity=relu())
    sim = model.simulate(10, seed=0)
    trace = pyro.poutine.trace(model).get_trace(sim.data["y"], subsample_size=4)
    assert trace.nodes["z"]["value"].shape == (4, 1)
    assert trace.nodes["y"]["scale"] == pytest.approx(10 / 4)


def test_flat_prior_simulates_and_has_zero_prior():
    model = ExpFamPCA(family=family("gaussian"), obs_dim=3, latent_dim=1, param_scale=None)
    sim = model.simulate(5, seed=0, dtype=torch.float64)
    trace = pyro.poutine.trace(pyro.poutine.condition(model, sim.truth)).get_trace(**sim.data)
    trace.compute_log_prob()
    assert float(trace.nodes["W"]["log_prob_sum"]) == 0.0
    with pytest.raises(ValueError, match="num_data"):
        model()
