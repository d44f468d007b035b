"""HierarchicalExpFamPCA specifics: construction checks and the layer conditionals."""

import pytest
import torch

from deqppl.expfam import smooth_relu
from deqppl.inference import log_joint
from deqppl.models import HierarchicalExpFamPCA


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="widths"):
        HierarchicalExpFamPCA(widths=(4,))
    with pytest.raises(ValueError, match="nonlinearities"):
        HierarchicalExpFamPCA(widths=(4, 2), nonlinearities=(smooth_relu(), smooth_relu()))
    with pytest.raises(ValueError, match="precisions"):
        HierarchicalExpFamPCA(widths=(4, 2), precisions=(1.0,))


def test_log_joint_equals_sum_of_gaussian_conditionals():
    # Independent check of SPEC §3: z^(l-1) | z^(l) ~ N(R(W z + b) / sqrt(lam), 1 / lam).
    R = smooth_relu(0.5)
    lams = (2.0, 0.5, 3.0)
    model = HierarchicalExpFamPCA(widths=(5, 3, 2), nonlinearities=(R, R), precisions=lams, param_scale=None)
    sim = model.simulate(6, seed=0, dtype=torch.float64)
    t = sim.truth
    N = torch.distributions.Normal
    expected = N(0.0, lams[2] ** -0.5).log_prob(t["z2"]).sum()
    mean1 = R.R(t["z2"] @ t["W2"].T + t["b2"]) / lams[1] ** 0.5
    expected = expected + N(mean1, lams[1] ** -0.5).log_prob(t["z1"]).sum()
    mean0 = R.R(t["z1"] @ t["W1"].T + t["b1"]) / lams[0] ** 0.5
    expected = expected + N(mean0, lams[0] ** -0.5).log_prob(sim.data["y"]).sum()
    torch.testing.assert_close(log_joint(model, sim.data, t), expected)
