"""fit_encoder on any encoder of the protocol: the deep PED encoder's joint fit reaches the MAP."""

import pytest
import torch

from deqppl.encoders import DeepPEDEncoder, encoder_loss, fit_encoder
from deqppl.inference import fit_map
from deqppl.models import HierarchicalExpFamPCA
from deqppl.optim import LBFGS, Adam
from deqppl.validation import validated

F64 = torch.float64


def test_deep_encoder_joint_fit_equals_joint_lbfgs():
    # Oracle: joint L-BFGS over every site of the same Pyro model (globals and latents).
    model = HierarchicalExpFamPCA(widths=(5, 3, 2))
    data = validated(model, model.simulate(40, seed=0, dtype=F64).data)
    enc = DeepPEDEncoder(model, seed=0).double()
    fit = fit_encoder(enc, data, optimizer=LBFGS(max_steps=500), progress=False)
    joint = fit_map(model, data, optimizer=LBFGS(max_steps=2000), progress=False)
    assert fit.converged and joint.converged
    z = enc.solve(data, validated=True).value.detach()
    profiled = -float(encoder_loss(enc, data, z).detach())
    # the same optimum up to the rotation the priors leave (log joints are invariant): both
    # stop on gradients ~1e-8 of a loss ~1e2, so their log joints agree far below 1e-6
    assert profiled == pytest.approx(float(joint.log_joint), abs=1e-6)
    assert fit.loss_trace[-1] == pytest.approx(-profiled, rel=1e-12)


def test_deep_encoder_adam_decreases_the_loss():
    model = HierarchicalExpFamPCA(widths=(5, 3, 2))
    data = model.simulate(30, seed=1, dtype=F64).data
    enc = DeepPEDEncoder(model, seed=0).double()
    fit = fit_encoder(enc, data, optimizer=Adam(num_epochs=5, batch_size=10), progress=False)
    assert fit.num_steps == 5 and fit.loss_trace[-1] < fit.loss_trace[0]


def test_fit_encoder_rejects_non_protocol_encoders():
    model = HierarchicalExpFamPCA(widths=(5, 2))
    with pytest.raises(TypeError, match="encoders of the protocol"):
        fit_encoder(torch.nn.Linear(2, 2), model.simulate(5, seed=0).data, progress=False)
