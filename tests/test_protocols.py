"""The model protocol (deqppl.protocols): defaults derived from the program, and check_model.

Every rule of MODEL_RULES has a model here that breaks it (``BROKEN``), and check_model must
name that rule; user-defined models that follow the protocol pass.
"""

from __future__ import annotations

import ast
import math
import pathlib
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import pytest
import torch

from deqppl.encoders import AbstractMAPEncoder
from deqppl.inference import log_joint as trace_log_joint
from deqppl.protocols import (
    MODEL_RULES,
    AbstractModel,
    ProtocolError,
    PyroModel,
    Simulation,
    check_model,
    num_rows,
    simulate_from,
)
from deqppl.validation import as_tensor, check_finite


# ------------------------------------------------------------------------------------------
# User-defined models that follow the protocol
# ------------------------------------------------------------------------------------------
def poisson_means(y=None, *, num_data=None):
    """y_i ~ Poisson(exp(mu + z_i)), z_i ~ N(0, 1), mu ~ N(0, 1)."""
    n = num_rows(y, num_data)
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("rows", n):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        return pyro.sample("y", dist.Poisson((mu + z).exp()), obs=y)


def user_model() -> PyroModel:
    return PyroModel(poisson_means, data_names=("y",), local_sites=("z",), global_sites=("mu",),
                     plate_name="rows")


@dataclass(frozen=True)
class RandomEffectRegression(AbstractModel):
    """y_i ~ N(x_i^T beta + z_i, 1) with a random effect z_i per row: x is a covariate."""

    num_features: int = 2

    data_names = ("x", "y")
    observed_sites = ("y",)
    local_sites = ("z",)
    global_sites = ("beta",)

    def __call__(self, x, y=None):
        beta = pyro.sample("beta", dist.Normal(torch.zeros(self.num_features, dtype=x.dtype), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=x.dtype), 0.5))
            return pyro.sample("y", dist.Normal(x @ beta + z, 1.0), obs=y)

    def simulate(self, num_data, *, seed, dtype=None):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(num_data, self.num_features, generator=gen, dtype=dtype or torch.float64)
        return simulate_from(self, num_data=num_data, seed=seed, data_names=("y",),
                             latent_names=self.latent_sites, covariates={"x": x}, dtype=dtype)


def test_user_pyro_model_passes_and_defaults_work():
    model = user_model()
    report = check_model(model)
    assert set(report.passed) == {rule.name for rule in MODEL_RULES}
    sim = model.simulate(5, seed=1)
    # defaults: the log joint is the trace's, the per-datum terms are the plate's
    trace = pyro.poutine.trace(pyro.poutine.condition(poisson_means, sim.truth)).get_trace(**sim.data)
    torch.testing.assert_close(model.log_joint(sim.data, sim.truth), trace.log_prob_sum())
    mu, z, y = sim.truth["mu"], sim.truth["z"], sim.data["y"]
    per_row = dist.Normal(0.0, 1.0).log_prob(z) + dist.Poisson((mu + z).exp()).log_prob(y)  # by hand
    torch.testing.assert_close(model.log_joint(sim.data, sim.truth, per_datum=True), per_row)


def test_user_model_with_covariates_passes():
    report = check_model(RandomEffectRegression())
    # a Gaussian observation has the real line as support: nothing to reject there
    assert report.skipped == (("validate_rejects_outside_support", "every observed site's support is the real line"),)


def test_default_validate_checks_support_and_shape_from_the_program():
    model = user_model()
    with pytest.raises(ValueError, match=r"y has value -1.0 at position 2, outside the support"):
        model.validate({"y": [0.0, 1.0, -1.0]})
    with pytest.raises(ValueError, match=r"y must have shape \(3,\).*got \(3, 1\)"):
        model.validate({"y": [[0.0], [1.0], [2.0]]})
    with pytest.raises(ValueError, match="missing: \\['y'\\]"):
        model.validate({"w": [0.0]})
    out = model.validate({"y": [0, 1, 2]})  # integers become floats
    assert out["y"].dtype == torch.get_default_dtype()


def test_default_validate_does_not_touch_the_rng():
    state = torch.get_rng_state()
    user_model().validate({"y": [0.0, 1.0]})
    assert torch.equal(torch.get_rng_state(), state)


def test_default_simulate_needs_an_override_for_covariates_and_flat_priors():
    def regression(x, y=None):
        beta = pyro.sample("beta", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            return pyro.sample("y", dist.Normal(beta * x, 1.0), obs=y)

    model = PyroModel(regression, data_names=("x", "y"), observed_sites=("y",), local_sites=(),
                      global_sites=("beta",))
    with pytest.raises(NotImplementedError, match=r"covariates \['x'\].*override simulate"):
        model.simulate(3, seed=0)

    def flat(y=None, *, num_data=None):
        mu = pyro.sample("mu", dist.ImproperUniform(dist.constraints.real, (), ()))
        with pyro.plate("data", num_rows(y, num_data)):
            return pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    flat_model = PyroModel(flat, data_names=("y",), local_sites=(), global_sites=("mu",))
    with pytest.raises(ValueError, match="improper"):
        flat_model.simulate(3, seed=0)
    flat_model.validate({"y": [0.0, 2.0]})  # the feasible-point trace needs no draw


def test_coupled_model_has_no_per_datum_log_joint():
    def coupled(y=None, *, num_data=None):
        n = num_rows(y, num_data)
        u = pyro.sample("u", dist.MultivariateNormal(torch.zeros(n), 0.5 * torch.eye(n) + 0.5))
        return pyro.sample("y", dist.Normal(u, 1.0).to_event(1), obs=y)

    model = PyroModel(coupled, data_names=("y",), local_sites=("u",), plate_name=None)
    assert model.locals_coupled
    report = check_model(model)
    assert {name for name, _ in report.skipped} >= {"locals_in_plate", "per_datum_factorises"}
    sim = model.simulate(4, seed=0)
    with pytest.raises(ValueError, match="coupled"):
        model.log_joint(sim.data, sim.truth, per_datum=True)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"data_names": "y"}, TypeError, "data_names must be a tuple"),
        ({"local_sites": ("z", "z")}, ValueError, "repeated"),
        ({"global_sites": ("z",)}, ValueError, "both a latent site and data / local and global"),
        ({"observed_sites": ("x",)}, ValueError, "must be data names"),
        ({"plate_name": ""}, TypeError, "plate_name"),
        ({"program": 3}, TypeError, "callable"),
    ],
)
def test_pyro_model_rejects_bad_declarations(kwargs, error, match):
    args = {"program": poisson_means, "data_names": ("y",), "local_sites": ("z",), "global_sites": ("mu",)}
    with pytest.raises(error, match=match):
        PyroModel(**{**args, **kwargs})


def test_check_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_data"):
        check_model(user_model(), num_data=1)
    with pytest.raises(ValueError, match="dtype"):
        check_model(user_model(), dtype=torch.int64)


# ------------------------------------------------------------------------------------------
# One model per rule that breaks it
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Base(AbstractModel):
    """The user model as an AbstractModel subclass; the broken variants below override a part."""

    data_names = ("y",)
    local_sites = ("z",)
    global_sites = ("mu",)

    def __call__(self, y=None, *, num_data=None):
        return poisson_means(y, num_data=num_data)

    plate_name = "rows"


class BadDeclarations(_Base):
    local_sites = "z"  # a string, not a tuple of names


class SimulateMissesASite(_Base):
    def simulate(self, num_data, *, seed, dtype=None):
        sim = super().simulate(num_data, seed=seed, dtype=dtype)
        return Simulation(data=sim.data, truth={"z": sim.truth["z"]})


class ValidateChangesData(_Base):
    def validate(self, data):
        return {"y": as_tensor(data["y"], "y") + 1.0}


class UndeclaredSite(_Base):
    def __call__(self, y=None, *, num_data=None):
        pyro.sample("s", dist.Normal(0.0, 1.0))
        return poisson_means(y, num_data=num_data)


class LocalOutsidePlate(_Base):
    def __call__(self, y=None, *, num_data=None):
        n = num_rows(y, num_data)
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        z = pyro.sample("z", dist.Normal(torch.zeros(n), 1.0).to_event(1))
        with pyro.plate("rows", n):
            return pyro.sample("y", dist.Poisson((mu + z).exp()), obs=y)


class GlobalInsidePlate(_Base):
    def __call__(self, y=None, *, num_data=None):
        n = num_rows(y, num_data)
        with pyro.plate("rows", n):
            mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            return pyro.sample("y", dist.Poisson((mu + z).exp()), obs=y)


class LogJointForgetsPrior(_Base):
    def log_joint(self, data, values, *, per_datum=False):
        total = super().log_joint(data, values, per_datum=per_datum)
        return total if per_datum else total - dist.Normal(0.0, 1.0).log_prob(values["mu"])


class LogJointDetached(_Base):
    def log_joint(self, data, values, *, per_datum=False):
        return super().log_joint(data, values, per_datum=per_datum).detach()


class PerDatumWrong(_Base):
    def log_joint(self, data, values, *, per_datum=False):
        total = super().log_joint(data, values, per_datum=per_datum)
        return 2.0 * total if per_datum else total


class RowsCoupledThroughThePlate(_Base):
    def __call__(self, y=None, *, num_data=None):
        n = num_rows(y, num_data)
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("rows", n):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            # each rate depends on the mean of every row's latent: a plate that lies
            return pyro.sample("y", dist.Poisson((mu + z + z.mean()).exp()), obs=y)


class ValidateAcceptsNaN(_Base):
    def validate(self, data):
        return {"y": as_tensor(data["y"], "y")}


def _validate_keys_finite(data):
    y = as_tensor(data["y"], "y")
    check_finite(y, "y")
    return y


class ValidateIgnoresShape(_Base):
    def validate(self, data):
        return {"y": _validate_keys_finite(data)}


class ValidateIgnoresKeys(_Base):
    def validate(self, data):
        y = _validate_keys_finite(data)
        if y.dim() != 1:
            raise ValueError(f"y must have shape (N,), got {tuple(y.shape)}")
        return {"y": y}


class ValidateWrongErrorType(ValidateIgnoresKeys):
    def validate(self, data):
        if not isinstance(data, dict) or set(data) != {"y"}:
            raise (TypeError if not isinstance(data, dict) else ValueError)(f"data must have the key y, got {data!r}")
        try:
            return super().validate(data)
        except TypeError as err:
            raise ValueError(str(err)) from err


class ValidateIgnoresSupport(_Base):
    def validate(self, data):
        if not isinstance(data, dict) or set(data) != {"y"}:
            raise (TypeError if not isinstance(data, dict) else ValueError)(f"data must have the key y, got {data!r}")
        y = ValidateIgnoresKeys.validate(self, data)["y"]
        return {"y": y}


class CoupledButSplits(_Base):
    plate_name = None

    def log_joint(self, data, values, *, per_datum=False):
        return trace_log_joint(self, self.validate(data), values, per_datum=per_datum, plate_name="rows")


BROKEN = [
    pytest.param(BadDeclarations, "declarations", None, "tuple of non-empty strings", id="declarations"),
    pytest.param(SimulateMissesASite, "simulate", None, "every latent site", id="simulate"),
    pytest.param(ValidateChangesData, "validate_accepts_simulated", "y", "changed the values", id="validate-changes"),
    pytest.param(UndeclaredSite, "sites_in_trace", "s", "not declared", id="sites-in-trace"),
    pytest.param(LocalOutsidePlate, "locals_in_plate", "z", "outside the plate 'rows'", id="local-outside-plate"),
    pytest.param(GlobalInsidePlate, "globals_outside_plate", "mu", "inside the data plate", id="global-inside-plate"),
    pytest.param(LogJointForgetsPrior, "log_joint_equals_trace", None, "trace gives", id="log-joint-trace"),
    pytest.param(LogJointDetached, "log_joint_differentiable", None, "differentiabl", id="log-joint-grad"),
    pytest.param(PerDatumWrong, "per_datum_sums_to_total", None, "not the total", id="per-datum-sum"),
    pytest.param(CoupledButSplits, "per_datum_sums_to_total", None, "must raise ValueError", id="coupled-splits"),
    pytest.param(RowsCoupledThroughThePlate, "per_datum_factorises", None, "not conditionally independent",
                 id="per-datum-factorises"),
    pytest.param(ValidateAcceptsNaN, "validate_rejects_nan", "y", "accepted a NaN", id="nan"),
    pytest.param(ValidateIgnoresShape, "validate_rejects_wrong_shape", "y", "extra trailing", id="shape"),
    pytest.param(ValidateIgnoresKeys, "validate_rejects_wrong_keys", "y", "must raise ValueError", id="keys"),
    pytest.param(ValidateWrongErrorType, "validate_rejects_non_numeric", "y", "must raise TypeError", id="non-numeric"),
    pytest.param(ValidateIgnoresSupport, "validate_rejects_outside_support", "y", "outside the support",
                 id="support"),
]


def test_every_rule_has_a_breaking_model():
    assert {p.values[1] for p in BROKEN} == {rule.name for rule in MODEL_RULES}


@pytest.mark.parametrize(("cls", "rule", "site", "match"), BROKEN)
def test_check_model_names_the_broken_rule(cls, rule, site, match):
    with pytest.raises(ProtocolError, match=match) as info:
        check_model(cls())
    err = info.value
    assert err.rule == rule and err.site == site
    assert str(err).startswith(f"{cls.__name__} breaks the model protocol, rule {rule!r}")
    if site is not None:
        assert f"at site {site!r}" in str(err)


def test_the_base_of_the_broken_models_passes():
    # each breaking model differs from this one in one part only
    assert len(check_model(_Base()).passed) == len(MODEL_RULES)


def test_check_model_leaves_the_rng_alone():
    state = torch.get_rng_state()
    check_model(_Base())
    assert torch.equal(torch.get_rng_state(), state)


# ------------------------------------------------------------------------------------------
# The zoo is built from deqppl's public API only
# ------------------------------------------------------------------------------------------
def test_zoo_imports_only_public_deqppl_modules():
    root = pathlib.Path(__file__).resolve().parents[1] / "models"
    offenders = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level > 0:  # within the zoo: only the package's own __init__ re-exports
                    if path.name != "__init__.py":
                        offenders.append(f"{path.name}: from {'.' * node.level}{module} import ...")
                    continue
                names = [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                module, names = "", [a.name for a in node.names]
            else:
                continue
            parts = module.split(".") + [n for n in names if module.startswith("deqppl")]
            if module.startswith("deqppl") and any(p.startswith("_") for p in parts):
                offenders.append(f"{path.name}: from {module} import {names}")
    assert not offenders, offenders


def test_log_joint_needs_every_latent():
    model = user_model()
    sim = model.simulate(3, seed=0)
    with pytest.raises(ValueError, match=r"missing \['z'\]"):
        model.log_joint(sim.data, {"mu": sim.truth["mu"]})
    assert math.isfinite(float(model.log_joint(sim.data, sim.truth)))


# ------------------------------------------------------------------------------------------
# The encoder protocol: a user's encoder needs only the abstract methods
# ------------------------------------------------------------------------------------------
NOISE = 0.5


def normal_means(y=None, *, num_data=None):
    """y_i ~ N(z_i, NOISE^2), z_i ~ N(mu, 1), mu ~ N(0, 1)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", num_rows(y, num_data)):
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        return pyro.sample("y", dist.Normal(z, NOISE), obs=y)


class MeansEncoder(AbstractMAPEncoder):
    """Damped gradient steps on F(z) = (z - mu)^2 / 2 + (y - z)^2 / (2 NOISE^2)."""

    def __init__(self, model, **options):
        super().__init__(model, **options)
        self.mu = torch.nn.Parameter(torch.tensor(0.0))

    def layer(self, z, data):
        y = data["y"][:, None]
        grad = (z - self.mu) + (z - y) / NOISE**2
        return z - 0.5 * grad / (1 + NOISE**-2)  # half the Newton step: a contraction of rate 1/2

    def latent_shape(self, data):
        return (data["y"].shape[0], 1)

    def initial_guess(self, data):
        return data["y"].new_zeros(data["y"].shape[0], 1)

    def to_sites(self, z, data):
        return {"z": z[:, 0]}


def test_a_user_encoder_gets_solve_laplace_and_values_from_the_protocol():
    model = PyroModel(normal_means, data_names=("y",), local_sites=("z",), global_sites=("mu",))
    check_model(model)
    sim = model.simulate(7, seed=3, dtype=torch.float64)
    enc = MeansEncoder.from_values(model, {"mu": sim.truth["mu"]})
    assert enc.mu.dtype == torch.float64 and enc.values().keys() == {"mu"}
    sites, sol = enc.sites(sim.data["y"])  # bare tensor: the model has one data name
    precision = 1.0 + NOISE**-2
    closed = (sim.truth["mu"] + sim.data["y"] / NOISE**2) / precision  # conjugate normal MAP
    # a contraction of rate 1/2 stops within residual / (1 - 1/2) <= 2e-8 |z| of its fixed point
    torch.testing.assert_close(sites["z"], closed, rtol=1e-7, atol=1e-7)
    assert bool(sol.converged.all())
    lap = enc.laplace(sim.data)  # Hessian by autograd of the Pyro log joint (the default)
    torch.testing.assert_close(lap.precision, torch.full((7, 1, 1), precision, dtype=torch.float64))
    # the spectral radius of the damped map is exactly 1/2
    torch.testing.assert_close(enc.spectral_radius(sim.data), torch.full((7,), 0.5, dtype=torch.float64))
    # gradients reach the global through the fixed point: dz*/dmu = 1 / precision per row
    z, _ = enc(sim.data)
    z.sum().backward()
    torch.testing.assert_close(enc.mu.grad, torch.tensor(7 / precision, dtype=torch.float64))


def test_encoder_protocol_rejects_a_bare_tensor_for_several_data_names():
    model = RandomEffectRegression()

    class Dummy(MeansEncoder):
        pass

    enc = Dummy.__new__(Dummy)
    AbstractMAPEncoder.__init__(enc, model)
    with pytest.raises(TypeError, match=r"data \['x', 'y'\]: pass a mapping"):
        enc.check_data(torch.zeros(3))
