"""principal_angles against scipy; log_joint's per-datum split and missing-site check."""

import numpy as np
import pytest
import scipy.linalg
import torch

from deqppl.expfam import family
from deqppl.inference import log_joint, principal_angles
from deqppl.models import ExpFamPCA


@pytest.mark.parametrize(("k", "m"), [(1, 1), (2, 2), (3, 2), (2, 4)], ids=str)
def test_principal_angles_match_scipy(k, m):
    g = torch.Generator().manual_seed(k * 10 + m)
    A = torch.randn(7, k, dtype=torch.float64, generator=g)
    B = torch.randn(7, m, dtype=torch.float64, generator=g)
    expected = scipy.linalg.subspace_angles(A.numpy(), B.numpy())
    np.testing.assert_allclose(principal_angles(A, B).numpy(), expected, rtol=1e-10, atol=1e-12)


def test_principal_angles_small_angles_accurate():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(7, 2, dtype=torch.float64, generator=g)
    B = A @ torch.randn(2, 2, dtype=torch.float64, generator=g)
    B = B + 1e-9 * torch.randn(7, 2, dtype=torch.float64, generator=g)
    expected = scipy.linalg.subspace_angles(A.numpy(), B.numpy())
    # arccos of the cosines would give ~1e-8 noise here; the sine branch keeps ~6 digits.
    np.testing.assert_allclose(principal_angles(A, B).numpy(), expected, rtol=1e-5)


def test_per_datum_plus_global_prior_is_total():
    model = ExpFamPCA(family=family("poisson"), obs_dim=4, latent_dim=2)
    sim = model.simulate(9, seed=0, dtype=torch.float64)
    rows = log_joint(model, sim.data, sim.truth, per_datum=True)
    assert rows.shape == (9,)
    W, B = sim.truth["W"], sim.truth["B"]
    prior = torch.distributions.Normal(0.0, model.param_scale)
    global_part = prior.log_prob(W).sum() + prior.log_prob(B).sum()
    torch.testing.assert_close(rows.sum() + global_part, log_joint(model, sim.data, sim.truth))
    # data_scale multiplies only the plate's terms: the minibatch estimate of a larger data set
    scaled = log_joint(model, sim.data, sim.truth, data_scale=3.5)
    torch.testing.assert_close(scaled, global_part + 3.5 * rows.sum())


def test_missing_site_is_an_error():
    model = ExpFamPCA(family=family("poisson"), obs_dim=4, latent_dim=2)
    sim = model.simulate(3, seed=0)
    with pytest.raises(ValueError, match=r"missing \['z'\]"):
        log_joint(model, sim.data, {"W": sim.truth["W"], "B": sim.truth["B"]})
