"""The structured joint fit (AlternatingNewton): its objective is the Pyro log joint, it reaches the
optimum of an independent joint L-BFGS on the same model for every family of the table and for the
hierarchical model, it never increases the objective, and bad settings fail before any work."""

import math

import pytest
import torch

from deqppl.encoders import DeepPEDEncoder, PEDEncoder, encoder_loss, fit_encoder
from deqppl.encoders.joint import _Problem, run_alternating
from deqppl.expfam import (
    bernoulli,
    binomial,
    continuous_bernoulli,
    exponential,
    gaussian,
    ising,
    neg_smooth_relu,
    poisson,
    relu,
    smooth_relu,
)
from deqppl.inference import fit_map
from deqppl.models import ExpFamPCA, HierarchicalExpFamPCA
from deqppl.optim import LBFGS, Adam, AlternatingNewton

F64 = torch.float64

# One row per family of the table (SPEC §1); the exponential family needs R with values < 0,
# and a prior scale 0.5: with s = 1, sd(eta) = 1.7 and R = -ReLU_1 puts some natural parameters
# within 1e-3 of 0 (means > 1e3), where A'' = 1/v^2 overflows along the way for either fit.
FAMILY_CASES = [
    pytest.param(gaussian(), None, id="gaussian"),
    pytest.param(gaussian(4.0), None, id="gaussian-precision4"),
    pytest.param(bernoulli(), None, id="bernoulli"),
    pytest.param(binomial(5), None, id="binomial5"),
    pytest.param(poisson(), None, id="poisson"),
    pytest.param(ising(), None, id="ising"),
    pytest.param(continuous_bernoulli(), None, id="continuous_bernoulli"),
    pytest.param(exponential(), (neg_smooth_relu(1.0), 0.5), id="exponential-neg_smooth_relu"),
]


def _model(fam, nl, *, d=6, l=2, lam=1.0):
    kw = {}
    if isinstance(nl, tuple):
        nl, kw["param_scale"] = nl
    if nl is not None:
        kw["nonlinearity"] = nl
    return ExpFamPCA(family=fam, obs_dim=d, latent_dim=l, lam=lam, **kw)


def _thetas(W, B):
    return [torch.cat([W, B[:, None]], 1)]


@pytest.mark.parametrize(("fam", "nl"), FAMILY_CASES)
def test_objective_is_the_pyro_log_joint(fam, nl):
    # Oracle: the Pyro model's log joint from its trace, constants included.
    model = _model(fam, nl)
    sim = model.simulate(15, seed=3, dtype=F64)
    y = sim.data["y"]
    enc = PEDEncoder(model).double()
    pb = _Problem(enc.joint_structure(), y, AlternatingNewton())
    values = {"W": 0.7 * sim.truth["W"], "B": sim.truth["B"] - 0.1, "z": sim.truth["z"] + 0.2}
    p = pb.evaluate(_thetas(values["W"], values["B"]), values["z"])
    ref = -float(model.log_joint(sim.data, values))
    assert p.loss == pytest.approx(ref, rel=1e-12, abs=1e-10)


def test_objective_is_the_pyro_log_joint_hierarchical():
    model = HierarchicalExpFamPCA(widths=(6, 3, 2), precisions=(2.0, 0.5, 1.5), param_scale=0.8)
    sim = model.simulate(12, seed=1, dtype=F64)
    enc = DeepPEDEncoder(model).double()
    pb = _Problem(enc.joint_structure(), sim.data["y"], AlternatingNewton())
    t = sim.truth
    thetas = [torch.cat([t["W1"], t["b1"][:, None]], 1), torch.cat([t["W2"], t["b2"][:, None]], 1)]
    zeta = torch.cat([t["z1"], t["z2"]], 1)
    p = pb.evaluate(thetas, zeta)
    assert p.loss == pytest.approx(-float(model.log_joint(sim.data, t)), rel=1e-12)


@pytest.mark.parametrize(("fam", "nl"), FAMILY_CASES)
def test_same_optimum_as_joint_lbfgs(fam, nl):
    # Oracle: fit_map's joint L-BFGS over (W, B, z) of the same Pyro model, from its own start.
    model = _model(fam, nl)
    sim = model.simulate(40, seed=0, dtype=F64)
    enc = PEDEncoder(model, seed=1).double()
    fit = fit_encoder(enc, sim.data, optimizer=AlternatingNewton(), progress=False)
    joint = fit_map(model, sim.data, optimizer=LBFGS(max_steps=5000), progress=False)
    assert fit.converged, fit.criterion
    assert joint.converged, joint.criterion
    ours = -float(fit.loss_trace[-1])
    assert ours == pytest.approx(float(joint.log_joint), rel=1e-9)
    # the returned globals carry the optimum: the profiled log joint at them is the same
    z = enc.solve(sim.data).value.detach()
    assert -float(encoder_loss(enc, sim.data, z).detach()) == pytest.approx(float(joint.log_joint), rel=1e-9)
    # and the objective never increased
    assert bool((fit.loss_trace.diff() <= 1e-12 * fit.loss_trace.abs()[1:]).all())


@pytest.mark.slow  # ~6 s: the joint L-BFGS oracle over 4 globals and 2 latent layers
def test_same_optimum_as_joint_lbfgs_hierarchical():
    model = HierarchicalExpFamPCA(widths=(6, 3, 2), precisions=(2.0, 0.5, 1.5))
    sim = model.simulate(40, seed=0, dtype=F64)
    enc = DeepPEDEncoder(model, seed=0).double()
    fit = fit_encoder(enc, sim.data, progress=False)  # the default for identity R
    assert isinstance(fit.optimizer, AlternatingNewton)
    joint = fit_map(model, sim.data, optimizer=LBFGS(max_steps=5000), progress=False)
    assert fit.converged and joint.converged
    assert -float(fit.loss_trace[-1]) == pytest.approx(float(joint.log_joint), rel=1e-9)


def test_smooth_relu_fisher_steps_reach_the_lbfgs_optimum():
    # A non-identity R: Fisher-scoring half-steps with step halving (the observed curvature
    # can be negative). Both start from the same point (the true globals, latents at zero:
    # the encoder's initial guess for R != identity), so both find the same local MAP.
    model = _model(gaussian(), smooth_relu(0.5))
    sim = model.simulate(40, seed=2, dtype=F64)
    W, B = sim.truth["W"], sim.truth["B"]
    enc = PEDEncoder(model, W=W, B=B).double()
    fit = fit_encoder(enc, sim.data, optimizer=AlternatingNewton(), progress=False)
    init = {"W": W, "B": B, "z": torch.zeros(40, 2, dtype=F64)}
    joint = fit_map(model, sim.data, optimizer=LBFGS(max_steps=5000), init=init, progress=False)
    assert fit.converged and joint.converged
    assert -float(fit.loss_trace[-1]) == pytest.approx(float(joint.log_joint), rel=1e-9)


def test_safeguard_rejects_extrapolations_and_the_objective_never_increases():
    # A Poisson start far from the optimum (B = 0 for counts of mean ~e^2): Anderson's
    # extrapolations overshoot early and must be rejected; the trace is still monotone.
    model = _model(poisson(), None, d=20, l=3)
    sim = model.simulate(200, seed=5, dtype=F64)
    y = sim.data["y"]
    enc = PEDEncoder(model, seed=2).double()
    th = _thetas(enc.W.detach(), enc.B.detach())
    run = run_alternating(enc.joint_structure(), y, th, enc.initial_guess(y),
                          AlternatingNewton(memory=5), progress=False)
    trace = torch.tensor(run.out.trace)
    assert run.out.status.name == "CONVERGED"
    assert run.stepper.num_rejected >= 1 and run.stepper.num_accepted >= 1
    # rounding of a sum of N d terms is the only allowed "increase"
    assert bool((trace.diff() <= 1e-13 * trace.abs()[1:]).all())


def test_balancing_keeps_eta_and_lowers_the_prior():
    model = _model(poisson(), None, d=8, l=3)
    sim = model.simulate(30, seed=0, dtype=F64)
    y = sim.data["y"]
    pb = _Problem(PEDEncoder(model).double().joint_structure(), y, AlternatingNewton())
    W, B, z = 3.0 * sim.truth["W"], sim.truth["B"], sim.truth["z"] / 3.0 + 0.5
    th = _thetas(W, B)
    before = pb.evaluate(th, z)
    th2, z2 = pb.balance(th, z)
    after = pb.evaluate(th2, z2)
    eta = z @ W.T + B
    assert torch.allclose(z2 @ th2[0][:, :-1].T + th2[0][:, -1], eta, rtol=0, atol=1e-12)
    assert after.loss < before.loss
    # stationarity of the linear part (lam Z'Z = W'W / s^2, s = 1, lam = 1): an oracle for the
    # closed form, independent of how it was derived
    W2 = th2[0][:, :-1]
    assert torch.allclose(z2.T @ z2, W2.T @ W2, rtol=1e-10, atol=1e-10)


def test_default_optimizer_dispatch():
    y = _model(poisson(), None).simulate(10, seed=0, dtype=F64).data["y"]
    assert isinstance(PEDEncoder(_model(poisson(), None)).default_fit_optimizer(), AlternatingNewton)
    assert isinstance(PEDEncoder(_model(gaussian(), smooth_relu(0.5))).default_fit_optimizer(), LBFGS)
    deep = DeepPEDEncoder(HierarchicalExpFamPCA(widths=(5, 3, 2), nonlinearities=(smooth_relu(), smooth_relu())))
    assert isinstance(deep.default_fit_optimizer(), LBFGS)
    assert isinstance(DeepPEDEncoder(HierarchicalExpFamPCA(widths=(5, 2))).default_fit_optimizer(), AlternatingNewton)
    fit = fit_encoder(PEDEncoder(_model(poisson(), None)).double(), y, progress=False)
    assert isinstance(fit.optimizer, AlternatingNewton)
    assert fit.num_solves == fit.num_steps


def test_unsupported_models_fail_before_any_work():
    y = torch.ones(10, 6, dtype=F64)
    with pytest.raises(ValueError, match="hard ReLU"):
        fit_encoder(PEDEncoder(_model(gaussian(), relu())).double(), y,
                    optimizer=AlternatingNewton(), progress=False)
    deep = DeepPEDEncoder(HierarchicalExpFamPCA(widths=(6, 3, 2), nonlinearities=(smooth_relu(), smooth_relu())))
    with pytest.raises(ValueError, match="LBFGS"):
        fit_encoder(deep.double(), y, optimizer=AlternatingNewton(), progress=False)
    flat = ExpFamPCA(family=poisson(), obs_dim=6, latent_dim=2, param_scale=None)
    assert isinstance(PEDEncoder(flat).default_fit_optimizer(), LBFGS)
    with pytest.raises(ValueError, match="joint MAP does not exist"):
        fit_encoder(PEDEncoder(flat).double(), y, optimizer=AlternatingNewton(), progress=False)


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("max_steps", -1, "an integer >= 0"),
        ("max_steps", 2.5, "an integer >= 0"),
        ("dtol", -1e-3, r"a finite number in \[0, inf\) or None"),
        ("dtol", math.nan, r"a finite number in \[0, inf\) or None"),
        ("memory", -1, "an integer >= 0"),
        ("regularization", -1.0, r"a finite number in \[0, inf\)"),
        ("max_backtracks", True, "an integer >= 0"),
    ],
)
def test_bad_settings_raise(field, value, allowed):
    with pytest.raises(ValueError, match=rf"AlternatingNewton\.{field} = .* is not allowed; {field} must be {allowed}"):
        AlternatingNewton(**{field: value})


def test_adam_and_lbfgs_remain_available():
    model = _model(bernoulli(), None)
    y = model.simulate(30, seed=0, dtype=F64).data["y"]
    fit = fit_encoder(PEDEncoder(model).double(), y, optimizer=LBFGS(max_steps=3), progress=False)
    assert isinstance(fit.optimizer, LBFGS)
    fit = fit_encoder(PEDEncoder(model).double(), y, optimizer=Adam(num_epochs=1), progress=False)
    assert isinstance(fit.optimizer, Adam)
