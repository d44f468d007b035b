"""Joint MAP of (W, B) through the PED fixed point: fit_encoder and encoder_loss."""

import math
import time

import pytest
import torch

from deqppl.deq import ImplicitAdjoint, Newton
from deqppl.encoders import PEDEncoder, encoder_loss, fit_encoder
from deqppl.expfam import family
from deqppl.inference import fit_map, principal_angles
from deqppl.models import ExpFamPCA
from deqppl.optim import LBFGS, SVI, Adam, FitConvergenceError, FitStatus


def _problem(name, *, num_data, obs_dim, latent_dim=2, param_scale=1.0, seed=1):
    model = ExpFamPCA(
        family=family(name), obs_dim=obs_dim, latent_dim=latent_dim, param_scale=param_scale
    )
    sim = model.simulate(num_data, seed=seed, dtype=torch.float64)
    return model, sim


# ------------------------------------------------------------------ the loss is the log joint
def test_loss_is_unbiased_minibatch_estimate_of_negative_log_joint(float64):
    model, sim = _problem("poisson", num_data=12, obs_dim=5)
    y = sim.data["y"]
    enc = PEDEncoder(model)
    z = enc.solve(y).value.detach()
    values = {"W": enc.W.detach(), "B": enc.B.detach(), "z": z}
    full = -model.log_joint({"y": y}, values)
    assert torch.isclose(encoder_loss(enc, y, z), full, rtol=1e-12, atol=0)
    # Averaging the N/n-scaled losses over a partition into equal batches gives the full loss
    # exactly (the prior appears once in each batch loss, and once in their mean).
    batches = torch.arange(12).split(4)
    mean = sum(encoder_loss(enc, y[i], z[i], num_data=12) for i in batches) / len(batches)
    assert torch.isclose(mean, full, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="smaller than the batch"):
        encoder_loss(enc, y, z, num_data=3)


# ------------------------------------------------------------------ envelope gradient (SPEC 2.4)
@pytest.mark.parametrize("name", ["bernoulli", "poisson"])
def test_envelope_gradient_equals_implicit_and_finite_differences(float64, name):
    model, sim = _problem(name, num_data=8, obs_dim=5, param_scale=0.5)
    y = sim.data["y"]
    implicit = ImplicitAdjoint(solver=Newton(rtol=1e-12, atol=0.0))
    enc = PEDEncoder(model, W=sim.truth["W"] + 0.3, B=sim.truth["B"], adjoint=implicit)

    # Envelope: z* detached, gradient of the loss at fixed z.
    with torch.no_grad():
        z = enc.solve(y).value
    (g_env_W, g_env_B) = torch.autograd.grad(encoder_loss(enc, y, z, num_data=20), [enc.W, enc.B])
    # Implicit: z*(W, B) differentiated through the fixed point by the adjoint.
    z_impl, _ = enc(y)
    (g_imp_W, g_imp_B) = torch.autograd.grad(
        encoder_loss(enc, y, z_impl, num_data=20), [enc.W, enc.B]
    )
    # The solver's rtol 1e-8 on z* bounds dL/dz, hence the dropped implicit term, at ~1e-8
    # relative to the gradient.
    assert torch.allclose(g_env_W, g_imp_W, rtol=1e-6, atol=1e-8)
    assert torch.allclose(g_env_B, g_imp_B, rtol=1e-6, atol=1e-8)

    # The equality is not vacuous: z* does depend on W (a loss that is not the MAP objective
    # gets a non-zero gradient through the fixed point).
    (g_z,) = torch.autograd.grad(enc(y)[0].sum(), enc.W)
    assert g_z.abs().max() > 1e-2

    # Independent oracle: central finite differences of the profile objective
    # W -> L(W, z*(W)) with z* re-solved at each perturbed W.
    def profile(W):
        e = PEDEncoder(model, W=W, B=enc.B.detach())
        with torch.no_grad():
            return float(encoder_loss(e, y, e.solve(y).value, num_data=20))

    h = 1e-5  # central differences: truncation O(h^2 L''') ~ 1e-9, round-off ~ eps L / h ~ 1e-9
    W0 = enc.W.detach()
    for i, j in [(0, 0), (2, 1), (4, 0)]:
        E = torch.zeros_like(W0)
        E[i, j] = h
        fd = (profile(W0 + E) - profile(W0 - E)) / (2 * h)
        assert math.isclose(fd, float(g_env_W[i, j]), rel_tol=1e-5, abs_tol=1e-6)


# ------------------------------------------------------------------ the fit itself
@pytest.mark.slow  # ~5 s alone, ~20 s on the loaded machine
def test_loss_decreases_and_converges(float64):
    model, sim = _problem("bernoulli", num_data=60, obs_dim=6)
    enc = PEDEncoder(model)
    seen = []
    fit = fit_encoder(
        enc, sim.data["y"], optimizer=Adam(num_epochs=400, batch_size=20, lr=0.05, rtol=1e-7),
        progress=False, callback=lambda epoch, loss: seen.append((epoch, loss)),
    )
    assert fit.converged and fit.status is FitStatus.CONVERGED, fit
    assert "rtol" in fit.criterion
    assert fit.loss_trace.shape == (fit.num_steps + 1,)
    assert [e for e, _ in seen] == list(range(1, fit.num_steps + 1))
    assert fit.loss_trace[-1] < fit.loss_trace[0]
    assert fit.num_solves == fit.num_steps * (3 + 1) + 1  # 3 batches + 1 full solve per epoch
    assert fit.num_grad_evals == fit.num_steps * 3  # one gradient per minibatch
    # The fitted globals are the model's: the conditional MAP of z given them (by L-BFGS on
    # the Pyro log joint) is the encoder's fixed point, and the log joint there is the loss.
    cond = fit_map(model, sim.data, optimizer=LBFGS(), fixed=enc.values(), progress=False)
    with torch.no_grad():
        z = enc.solve(sim.data["y"]).value
    assert torch.allclose(cond.values["z"], z, atol=1e-8)  # both to ~1e-10 (gradient rule, Newton)
    assert math.isclose(-float(cond.log_joint), float(fit.loss_trace[-1]), rel_tol=1e-9)
    # Near the joint MAP: L-BFGS on all of (W, B, z) started from the fit improves it little.
    joint = fit_map(model, sim.data, init={**enc.values(), "z": z}, progress=False)
    gap = float(fit.loss_trace[-1]) + float(joint.log_joint)
    assert 0 <= gap < 1e-3 * abs(float(joint.log_joint)), gap


def test_seeded_and_warm_start_agree(float64):
    model, sim = _problem("poisson", num_data=30, obs_dim=5, param_scale=0.5)
    runs = []
    for warm in (True, True, False):
        enc = PEDEncoder(model)
        runs.append(fit_encoder(enc, sim.data["y"], optimizer=Adam(num_epochs=3, batch_size=10),
                                seed=3, warm_start=warm, progress=False))
    assert torch.equal(runs[0].loss_trace, runs[1].loss_trace)
    # Warm and cold starts solve to the same fixed points (solver rtol 1e-8), so the
    # trajectories agree to that order.
    assert torch.allclose(runs[0].loss_trace, runs[2].loss_trace, rtol=1e-6)


def test_max_epochs_status_and_bad_input(float64):
    model, sim = _problem("bernoulli", num_data=10, obs_dim=4)
    enc = PEDEncoder(model)
    fit = fit_encoder(enc, sim.data["y"], optimizer=Adam(num_epochs=1, rtol=0.0), progress=False)
    assert fit.status is FitStatus.MAX_STEPS and not fit.converged
    with pytest.raises(FitConvergenceError, match="MAX_STEPS"):
        fit_encoder(enc, sim.data["y"], optimizer=Adam(num_epochs=1, rtol=0.0), progress=False,
                    throw=True)
    fit = fit_encoder(enc, sim.data["y"], optimizer=LBFGS(max_steps=1), progress=False)
    assert fit.status is FitStatus.MAX_STEPS and fit.num_steps == 1
    with pytest.raises(TypeError, match="LBFGS.*or.*Adam"):
        fit_encoder(enc, sim.data["y"], optimizer=SVI())
    with pytest.raises(TypeError, match="LBFGS.*or.*Adam"):
        fit_encoder(enc, sim.data["y"], optimizer="adam")
    with pytest.raises(ValueError):
        fit_encoder(enc, sim.data["y"] + 2.0)  # outside the Bernoulli support
    with pytest.raises(ValueError):
        fit_encoder(enc, sim.data["y"][:, :3])  # wrong obs_dim
    with pytest.raises(TypeError, match="PEDEncoder"):
        fit_encoder(torch.nn.Linear(2, 2), sim.data["y"])


# ------------------------------------------------------------------ recovery vs SVI joint MAP
@pytest.mark.slow
@pytest.mark.parametrize(
    "name, param_scale, seed",
    # Poisson with s = 0.5 keeps eta's standard deviation ~ s (l/lam + 1)^{1/2} ~ 0.9, so counts
    # stay moderate (max 20 for seed 0; seed 1 draws a loading that gives counts up to 431, on
    # which both Adam-based fits crawl along an ill-conditioned valley).
    [("bernoulli", 1.0, 1), ("poisson", 0.5, 0)],
)
def test_recovers_subspace_as_well_as_svi(float64, name, param_scale, seed):
    model, sim = _problem(name, num_data=300, obs_dim=20, param_scale=param_scale, seed=seed)
    enc = PEDEncoder(model)
    fit = fit_encoder(enc, sim.data["y"], optimizer=Adam(num_epochs=400, batch_size=100, lr=0.05,
                      rtol=1e-7), progress=False)
    start = time.perf_counter()
    svi = fit_map(model, sim.data, optimizer=SVI(), progress=False)
    svi_time = time.perf_counter() - start
    truth = sim.truth["W"]
    deq_angles = principal_angles(enc.W.detach(), truth)
    svi_angles = principal_angles(svi.values["W"], truth)
    print(
        f"\n{name}: principal angles DEQ {deq_angles.tolist()} SVI {svi_angles.tolist()}; "
        f"log joint DEQ {-float(fit.loss_trace[-1]):.4f} SVI {float(svi.log_joint):.4f}; "
        f"wall time DEQ {fit.wall_time:.2f} s SVI {svi_time:.2f} s "
        f"(ratio DEQ/SVI {fit.wall_time / svi_time:.2f})"
    )
    assert fit.converged and svi.converged
    # Both maximise the same log joint; the angles to the truth are dominated by the finite-N
    # estimation error (~0.2 rad here), so the DEQ may lose at most 0.02 rad to SVI.
    assert deq_angles.max() <= svi_angles.max() + 0.02
    # Adam on minibatches stops at relative change 1e-7 per epoch, a little short of SVI's
    # full-batch optimum (measured gap 0.3-0.5 nats of ~4000-8000): allow 1e-4 relative.
    assert -float(fit.loss_trace[-1]) >= float(svi.log_joint) - 1e-4 * abs(float(svi.log_joint))


@pytest.mark.parametrize(
    "name, param_scale, seed", [("bernoulli", 1.0, 1), ("poisson", 0.5, 0)]
)
def test_profiled_lbfgs_reaches_joint_map(float64, name, param_scale, seed):
    """Full-batch L-BFGS on min_z L(W, B, z) reaches the optimum of a joint optimiser."""
    model, sim = _problem(name, num_data=300, obs_dim=20, param_scale=param_scale, seed=seed)
    enc = PEDEncoder(model)
    fit = fit_encoder(enc, sim.data["y"], optimizer=LBFGS(max_steps=500), progress=False)
    start = time.perf_counter()
    joint = fit_map(model, sim.data, optimizer=LBFGS(), progress=False)
    joint_time = time.perf_counter() - start
    start = time.perf_counter()
    svi = fit_map(model, sim.data, optimizer=SVI(), progress=False)
    svi_time = time.perf_counter() - start
    truth = sim.truth["W"]
    deq_angles = principal_angles(enc.W.detach(), truth)
    svi_angles = principal_angles(svi.values["W"], truth)
    deq_lj = -float(fit.loss_trace[-1])
    print(
        f"\n{name} (profiled L-BFGS): {fit.criterion}; log joint DEQ {deq_lj:.6f} "
        f"joint L-BFGS {float(joint.log_joint):.6f} SVI {float(svi.log_joint):.6f}; angles DEQ "
        f"{deq_angles.tolist()} SVI {svi_angles.tolist()}; time DEQ {fit.wall_time:.2f} s, "
        f"L-BFGS {joint_time:.2f} s, SVI {svi_time:.2f} s"
    )
    assert fit.converged and joint.converged
    # The same objective's optimum (PCA's rotation symmetry leaves the log joint unchanged):
    # both stop on the gradient (the profiled one at eps^(1/2), the solves' accuracy), so
    # agreement to 1e-9 relative leaves a wide margin over their stopping error and fails
    # any early stop.
    assert deq_lj == pytest.approx(float(joint.log_joint), rel=1e-9)
    assert deq_lj >= float(svi.log_joint) - 1e-9 * abs(float(svi.log_joint))
    # finite-N estimation error dominates the angles (~0.2 rad); the DEQ may not lose to SVI
    assert deq_angles.max() <= svi_angles.max() + 1e-3
    # the fitted globals are the Pyro model's: fit_map with them fixed gives the DEQ latents
    cond = fit_map(model, sim.data, optimizer=LBFGS(), fixed=enc.values(), progress=False)
    z = enc(sim.data["y"])[0].detach()
    # both are conditional MAPs to ~1e-10 (L-BFGS gradient rule; Newton rtol 1e-8, quadratic)
    assert torch.allclose(cond.values["z"], z, atol=1e-8)


def test_data_are_validated_once_and_mapping_accepted(float64, monkeypatch):
    model, sim = _problem("bernoulli", num_data=20, obs_dim=5, param_scale=1.0, seed=0)
    calls = []
    original = ExpFamPCA.validate

    def counting(self, data):
        calls.append(1)
        return original(self, data)

    monkeypatch.setattr(ExpFamPCA, "validate", counting)
    fit = fit_encoder(PEDEncoder(model), sim.data, optimizer=LBFGS(max_steps=5), progress=False)
    assert fit.num_solves > 1 and len(calls) == 1


def test_failed_start_is_returned_nonfinite(float64):
    model, sim = _problem("poisson", num_data=20, obs_dim=5, param_scale=0.5, seed=0)
    from deqppl.deq import Newton

    # a solver allowed one step cannot solve the fixed point at the start
    enc = PEDEncoder(model, solver=Newton(max_steps=1, rtol=1e-14, atol=0.0), throw=False)
    W0 = enc.W.detach().clone()
    # (the profiled fit solves the fixed point at every evaluation; the structured default
    # AlternatingNewton takes its own latent half-steps and never calls the solver)
    fit = fit_encoder(enc, sim.data["y"], optimizer=LBFGS(), progress=False)
    assert fit.status is FitStatus.NONFINITE and fit.num_steps == 0, fit
    assert torch.equal(enc.W.detach(), W0)
