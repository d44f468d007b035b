"""The kGLM DEQ (deqppl.encoders.kglm) against sklearn, an independent IRLS and fit_map (SPEC §4)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.kernel_ridge import KernelRidge

from deqppl.deq import FixedPointIteration
from deqppl.encoders import Informed, KernelGLMEncoder, KGLMLayer, Naive, Random, solve_kglm
from deqppl.encoders.kglm import check_kernel_matrix, kglm_weights, spectral_norm
from deqppl.expfam import bernoulli, exponential, gaussian, ising, poisson
from deqppl.inference import fit_map
from deqppl.kernels import Matern52, SquaredExponential
from deqppl.models.kernel_glm import KernelGLM
from deqppl.optim import LBFGS

sys.path.insert(0, str(Path(__file__).parent))
from kglm_reference import FAMILIES, irls  # noqa: E402

pytestmark = pytest.mark.usefixtures("float64")

FAMILY = {"gaussian": gaussian(), "bernoulli": bernoulli(), "poisson": poisson(), "ising": ising()}


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _problem(name: str, n: int = 60, seed: int = 0, m: int = 15):
    g = torch.Generator().manual_seed(seed)
    x = torch.sort(6 * torch.rand(n, generator=g) - 3).values
    x_new = torch.linspace(-3.5, 3.5, m)
    f = torch.sin(1.5 * x)
    if name == "gaussian":
        y = f + 0.3 * torch.randn(n, generator=g)
    elif name == "bernoulli":
        y = torch.bernoulli(torch.sigmoid(2 * f), generator=g)
    elif name == "poisson":
        y = torch.poisson(torch.exp(f + 0.5), generator=g)
    else:  # ising
        y = 2 * torch.bernoulli(torch.sigmoid(2 * f), generator=g) - 1
    return x, y, x_new


def _reference(name, K, y, lam, K_new):
    alpha, _ = irls(name, K.numpy(), y.numpy(), lam)
    _, dA, _ = FAMILIES[name]
    return torch.from_numpy(dA(K.numpy() @ alpha)), torch.from_numpy(dA(K_new.numpy() @ alpha))


# ---------------------------------------------------------------------------------------------
# oracles at informed initialisation, float64
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("s", [1.0, 0.05], ids=["s1", "s0.05"])
def test_gaussian_equals_sklearn_kernel_ridge(s: float) -> None:
    x, y, x_new = _problem("gaussian")
    kernel = Matern52(lengthscale=0.8)
    K, K_new = kernel(x), kernel(x_new, x)
    lam = s * spectral_norm(K)
    krr = KernelRidge(alpha=lam, kernel="precomputed").fit(K.numpy(), y.numpy())
    want_fit = torch.from_numpy(krr.predict(K.numpy()))
    want_new = torch.from_numpy(krr.predict(K_new.numpy()))
    fit = solve_kglm(gaussian(), K, y, lam=lam, K_new=K_new)
    torch.testing.assert_close(fit.mean, want_fit, rtol=0, atol=1e-8)
    torch.testing.assert_close(fit.prediction, want_new, rtol=0, atol=1e-8)
    # the same through the trainable layer at informed initialisation
    layer = KGLMLayer(gaussian(), x, init=Informed(kernel, s=s), x_new=x_new)
    z, sol = layer(y)
    torch.testing.assert_close(z[0], want_fit, rtol=0, atol=1e-8)
    pred, _ = layer.predict(y)
    torch.testing.assert_close(pred[0], want_new, rtol=0, atol=1e-8)
    assert sol.solver == "NewtonGMRES" and bool(sol.converged.all())


@pytest.mark.parametrize("name", ["bernoulli", "poisson", "ising"])
@pytest.mark.parametrize("s", [2.0, 0.1], ids=["s2", "s0.1"])
def test_family_equals_irls(name: str, s: float) -> None:
    x, y, x_new = _problem(name, seed=1)
    kernel = SquaredExponential(lengthscale=0.7)
    K, K_new = kernel(x), kernel(x_new, x)
    lam = s * spectral_norm(K)
    want_fit, want_new = _reference(name, K, y, lam, K_new)
    fit = solve_kglm(FAMILY[name], K, y, lam=lam, K_new=K_new)
    torch.testing.assert_close(fit.mean, want_fit, rtol=0, atol=1e-8)
    torch.testing.assert_close(fit.prediction, want_new, rtol=0, atol=1e-8)
    layer = KGLMLayer(FAMILY[name], x, init=Informed(kernel, s=s), x_new=x_new)
    pred, sol = layer.predict(y)
    torch.testing.assert_close(pred[0], want_new, rtol=0, atol=1e-8)
    assert bool(sol.converged.all())


def test_bernoulli_encoder_equals_irls_and_fit_map() -> None:
    x, y, x_new = _problem("bernoulli", n=50, seed=2)
    model = KernelGLM(bernoulli(), SquaredExponential(lengthscale=0.8), lam=0.5)
    data = model.validate({"x": x, "y": y})
    enc = KernelGLMEncoder(model)
    sites, sol = enc.sites(data)
    z = sol.value[0]
    Kj = model.gram(x)
    want, want_new = _reference("bernoulli", Kj, y, model.lam, model.kernel(x_new, x))
    torch.testing.assert_close(z, want, rtol=0, atol=1e-8)
    torch.testing.assert_close(enc.predict(data, x_new, z=sol.value), want_new, rtol=0, atol=1e-8)
    # the model's MAP by L-BFGS on the Pyro log joint (its gradient rule reaches ~1e-10 here,
    # tests/models/test_kernel_glm.py)
    result = fit_map(model, data, optimizer=LBFGS(max_steps=500), progress=False)
    assert result.converged
    torch.testing.assert_close(z, model.fitted_mean(result.values, x), rtol=0, atol=1e-8)
    # to_sites gives the whitened site of the same MAP
    torch.testing.assert_close(model.fitted_mean(sites, x), z, rtol=0, atol=1e-12)
    torch.testing.assert_close(sites["u"], result.values["u"], rtol=0, atol=1e-6)  # cond(L) ~ 1e4 amplifies L-BFGS's error
    assert sol.solver == "NewtonGMRES" and sol.num_steps < 20


def test_model_deq_weights_are_the_library_construction() -> None:
    model = KernelGLM(poisson(), SquaredExponential(), lam=0.7)
    x = torch.linspace(-1, 1, 9)
    w, w_lib = model.deq_weights(x), kglm_weights(model.gram(x), 0.7)
    assert all(torch.equal(a, b) for a, b in zip(w, w_lib, strict=True))


# ---------------------------------------------------------------------------------------------
# beyond the contraction condition
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gaussian", "ising"])
def test_default_converges_where_plain_iteration_does_not(name: str) -> None:
    x, y, _ = _problem(name, n=40, seed=3)
    K = SquaredExponential(lengthscale=0.7)(x)
    lam = 0.2 * spectral_norm(K)  # Lip(sigma) ||K|| / lam = 5 >= 1
    plain = solve_kglm(FAMILY[name], K, y, lam=lam, solver=FixedPointIteration(max_steps=300), throw=False)
    assert not plain.converged
    fit = solve_kglm(FAMILY[name], K, y, lam=lam)
    assert fit.converged and fit.solution.solver == "NewtonGMRES" and 1 <= fit.solution.num_steps <= 30
    want, _ = _reference(name, K, y, lam, K[:1])
    torch.testing.assert_close(fit.mean, want, rtol=0, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# initialisations and gradients
# ---------------------------------------------------------------------------------------------
def test_initialisations() -> None:
    x = torch.linspace(-2, 2, 12)
    x_new = torch.linspace(-1, 1, 5)
    naive = KGLMLayer(bernoulli(), x, init=Naive(s=2.0), x_new=x_new)
    same = KGLMLayer(bernoulli(), x, init=Informed(SquaredExponential(), s=2.0), x_new=x_new)
    assert all(torch.equal(a, b) for a, b in zip(naive.parameters(), same.parameters(), strict=True))
    K = SquaredExponential()(x)
    torch.testing.assert_close(naive.W.detach(), -K / (2 * spectral_norm(K)))
    torch.testing.assert_close(float(torch.linalg.matrix_norm(naive.U.detach(), ord=2)), 0.5)
    r1, r2 = (KGLMLayer(gaussian(), x, init=Random(), x_new=x_new, seed=s) for s in (0, 0))
    r3 = KGLMLayer(gaussian(), x, init=Random(), x_new=x_new, seed=1)
    assert torch.equal(r1.W, r2.W) and not torch.equal(r1.W, r3.W)
    bound = 1 / math.sqrt(12)
    assert float(r1.W.detach().abs().max()) <= bound and float(r1.b_head.detach().abs().max()) <= bound
    names = {n for n, p in r1.named_parameters() if p.requires_grad}
    assert names == {"W", "U", "b", "W_head", "U_head", "b_head"}


def test_implicit_gradient_matches_finite_differences() -> None:
    x, y, x_new = _problem("bernoulli", n=12, seed=4, m=4)
    layer = KGLMLayer(bernoulli(), x, init=Informed(SquaredExponential(), s=0.5), x_new=x_new)
    target = torch.rand(1, 4, generator=torch.Generator().manual_seed(0))

    def loss() -> torch.Tensor:
        pred, _ = layer.predict(y)
        return ((pred - target) ** 2).sum()

    loss().backward()
    direction = torch.randn(12, 12, generator=torch.Generator().manual_seed(1))
    analytic = float((layer.W.grad * direction).sum())
    h = 1e-6
    with torch.no_grad():
        layer.W += h * direction
        up = float(loss())
        layer.W -= 2 * h * direction
        down = float(loss())
        layer.W += h * direction
    # central difference: O(h^2) truncation plus solve error 1e-12 / h
    assert abs(analytic - (up - down) / (2 * h)) <= 1e-6 * max(1.0, abs(analytic))


# ---------------------------------------------------------------------------------------------
# bad input: clear errors before any solve
# ---------------------------------------------------------------------------------------------
def _K(n: int = 4) -> torch.Tensor:
    return SquaredExponential()(torch.linspace(0, 1, n))


BAD = [
    pytest.param(dict(K=_K() + torch.triu(torch.ones(4, 4), 1) * 1e-3), ValueError, r"K is not symmetric: K\[0, 1\]", id="asym"),
    pytest.param(dict(K=-_K()), ValueError, "not positive semi-definite beyond round-off", id="not-psd"),
    pytest.param(dict(K=torch.tensor([[1.0, math.nan], [math.nan, 1.0]]), y=torch.zeros(2)), ValueError, "K contains a non-finite value nan", id="nan"),
    pytest.param(dict(K=torch.zeros(4, 3)), ValueError, r"square \(n, n\)", id="not-square"),
    pytest.param(dict(lam=0.0), ValueError, "lam must be a positive finite number", id="lam0"),
    pytest.param(dict(lam=-1.0), ValueError, "lam must be a positive finite number", id="lam-neg"),
    pytest.param(dict(lam="big"), TypeError, "lam must be a positive number", id="lam-str"),
    pytest.param(dict(y=torch.tensor([0.0, 1.0, 0.5, 1.0])), ValueError, r"y has value 0.5 at row 2", id="label-support"),
    pytest.param(dict(y=torch.zeros(3)), ValueError, r"y must have shape \(4,\)", id="y-shape"),
    pytest.param(dict(K_new=torch.zeros(2, 3)), ValueError, r"K_new must have shape \(m, 4\)", id="Knew-shape"),
    pytest.param(dict(family=exponential()), ValueError, "natural parameter", id="family-domain"),
    pytest.param(dict(family="bernoulli"), TypeError, "ExpFamily", id="family-str"),
]


@pytest.mark.parametrize(("change", "error", "match"), BAD)
def test_bad_input(change, error, match, monkeypatch) -> None:
    args = dict(family=bernoulli(), K=_K(), y=torch.tensor([0.0, 1.0, 1.0, 0.0]), lam=1.0, K_new=None)
    args.update(change)
    # nothing is solved: fail if the solver is reached
    monkeypatch.setattr("deqppl.encoders.kglm.fixed_point", lambda *a, **k: pytest.fail("solved"))
    with pytest.raises(error, match=match):
        solve_kglm(args.pop("family"), args.pop("K"), args.pop("y"), **args)


def test_round_off_is_accepted() -> None:
    K = SquaredExponential(lengthscale=2.0)(torch.linspace(0, 1, 200))  # rank-deficient numerically
    assert float(torch.linalg.eigvalsh(K)[0]) < 0  # round-off below zero
    check_kernel_matrix(K)
    check_kernel_matrix(K.float())


def test_layer_bad_input() -> None:
    layer = KGLMLayer(bernoulli(), torch.linspace(0, 1, 5), init=Naive())
    with pytest.raises(ValueError, match=r"y must have shape \(B, 5\)"):
        layer(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="y has value 2.0"):
        layer(torch.tensor([0.0, 1.0, 2.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="no prediction head"):
        layer.predict(torch.zeros(5))
    with pytest.raises(TypeError, match="init must be"):
        KGLMLayer(bernoulli(), torch.zeros(5), init="informed")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="s must be a positive"):
        Informed(SquaredExponential(), s=0.0)


def test_training_through_the_implicit_adjoint_reduces_the_loss() -> None:
    # experiment (a)'s model and loop at a tiny size: every parameter trained by Adam
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
    from kglm_sequence import run_one

    r = run_one("informed", 0, num_train=8, num_test=8, num_epochs=3, lr=1e-2)
    assert not r["diverged"] and len(r["test_mse"]) == 4
    assert r["test_mse"][-1] < r["test_mse"][0]
