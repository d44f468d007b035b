"""KernelGLM against kernel ridge regression, Newton/IRLS and the kGLM fixed point (SPEC §4)."""

from __future__ import annotations

import math

import numpy as np
import pyro.distributions as dist
import pytest
import torch

from deqppl.expfam import bernoulli, binomial, continuous_bernoulli, exponential, family, gaussian
from deqppl.expfam import ising, poisson
from deqppl.kernels import Linear, Matern52, SquaredExponential
from deqppl.models.kernel_glm import KernelGLM

# Float64 throughout; set inside a fixture and restored afterwards (docs/CONVENTIONS.md).
pytestmark = pytest.mark.usefixtures("float64")

from deqppl.inference import fit_map
from deqppl.optim import LBFGS


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _inputs(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.sort(6.0 * torch.rand(n, generator=g) - 3.0).values


def _data(model: KernelGLM, n: int = 40, seed: int = 0) -> dict[str, torch.Tensor]:
    x = _inputs(n, seed)
    # y drawn from the model itself at random inputs (simulate uses a grid)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        u = torch.randn(n) / math.sqrt(model.lam)
        y = model.family.distribution(model.cholesky(x) @ u).sample()
    return model.validate({"x": x, "y": y})


def _map(model: KernelGLM, data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # L-BFGS stops on its gradient rule (deqppl.optim.LBFGS; it reaches kernel ridge to 1e-10,
    # tests/inference/test_map.py); FIT_ATOL below is a loose bound kept for the other families.
    result = fit_map(model, data, optimizer=LBFGS(max_steps=500), progress=False)
    assert result.converged, result.criterion
    return result.values


def _map_error(model: KernelGLM, data: dict[str, torch.Tensor], u: torch.Tensor) -> float:
    r"""Bound on $\lVert f_{MAP}-Lu\rVert_2$ from the gradient $g$ of the log joint at $u$.

    The negative log joint is $\lambda$-strongly convex in $u$, so $\lVert u-u^*\rVert\le
    \lVert g\rVert/\lambda$ and $\lVert f-f^*\rVert\le\lVert L\rVert_2\lVert g\rVert/\lambda$.
    """
    u = u.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model.log_joint(data, {"u": u}), u)
    L = model.cholesky(data["x"])
    return float(torch.linalg.matrix_norm(L, ord=2) * g.norm() / model.lam)


# fit_map's float64 L-BFGS stops at max |grad| ~ 1e-11 (its gradient rule, see _map);
# ||L|| / lam ~ 20 here
FIT_ATOL = 1e-9


def _alpha(model: KernelGLM, values: dict[str, torch.Tensor], data: dict) -> torch.Tensor:
    # Representer weights alpha = (T(y) - A'(f)) / lam. Recovering them from u = L^T alpha
    # instead would amplify the optimiser's error by cond(L) ~ 1e4 (L's smallest pivot is
    # about sqrt(jitter)).
    z = model.fitted_mean(values, data["x"])
    return (model.family.T(data["y"]) - z) / model.lam


FAMILY_ROWS = [
    pytest.param(gaussian(), 0.3, id="gaussian"),
    pytest.param(gaussian(precision=4.0), 0.3, id="gaussian-prec4"),
    pytest.param(bernoulli(), 0.5, id="bernoulli"),
    pytest.param(binomial(3), 0.5, id="binomial3"),
    pytest.param(poisson(), 1.0, id="poisson"),
    pytest.param(ising(), 0.5, id="ising"),
    pytest.param(continuous_bernoulli(), 0.2, id="cont-bernoulli"),
]


def test_gaussian_equals_kernel_ridge_regression() -> None:
    lam = 0.3
    model = KernelGLM(gaussian(), SquaredExponential(lengthscale=0.7), lam=lam)
    data = _data(model)
    x, y = data["x"], data["y"]
    Kj = model.gram(x)
    eye = torch.eye(len(x))
    alpha = torch.linalg.solve(Kj + lam * eye, y)
    krr = Kj @ alpha
    # the model's MAP is KRR: the log joint is stationary at u = L^T alpha (f = L u = K_j alpha)
    u_krr = model.cholesky(x).T @ alpha
    assert _map_error(model, data, u_krr) < 1e-10
    # and fit_map finds it; precision 1, so the fitted mean of T(y) = y is f
    z = model.fitted_mean(_map(model, data), x)
    torch.testing.assert_close(z, krr, rtol=0, atol=FIT_ATOL)
    # the nugget's effect on the un-jittered KRR fit is within the documented j ||y|| / lam
    K = model.kernel(x)
    exact = K @ torch.linalg.solve(K + lam * eye, y)
    assert (krr - exact).norm() <= 1e-8 * y.norm() / lam


@pytest.mark.parametrize("precision", [1.0, 4.0], ids=["prec1", "prec4"])
def test_gaussian_prediction_matches_krr(precision: float) -> None:
    lam = 0.3
    model = KernelGLM(gaussian(precision), Matern52(lengthscale=1.2), lam=lam)
    data = _data(model, seed=1)
    x, y = data["x"], data["y"]
    f = model.natural(_map(model, data), x)
    x_new = torch.linspace(-3.5, 3.5, 17)
    Kj = model.gram(x)
    # KRR on T(y) = sqrt(precision) y; predicted mean of T(y) at x_new
    Ty = model.family.T(y)
    want = model.kernel(x_new, x) @ torch.linalg.solve(Kj + lam * torch.eye(len(x)), Ty)
    torch.testing.assert_close(model.predict(x, y, f, x_new), want, rtol=0, atol=FIT_ATOL)
    # at the training inputs prediction reproduces f up to the nugget: K alpha = f - j alpha
    alpha = _alpha(model, _map(model, data), data)
    got = model.predict_natural(x, y, f, x)
    torch.testing.assert_close(got, f - 1e-8 * alpha, rtol=0, atol=FIT_ATOL)


def _irls_bernoulli(K: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """Newton/IRLS for kernel logistic regression: (K V K + lam K) alpha = K V u (SPEC §4)."""
    alpha = torch.zeros_like(y)
    for _ in range(100):
        f = K @ alpha
        p = torch.sigmoid(f)
        v = p * (1 - p)
        u = f + (y - p) / v  # working response
        # K (V K + lam I) alpha = K V u; K is positive definite, so cancel it (better conditioned)
        new = torch.linalg.solve(v.unsqueeze(-1) * K + lam * torch.eye(len(y)), v * u)
        if (new - alpha).abs().max() <= 1e-15 * (1 + alpha.abs().max()):
            return new
        alpha = new
    raise AssertionError("IRLS reference did not converge")


def test_bernoulli_equals_irls() -> None:
    lam = 0.5
    model = KernelGLM(bernoulli(), SquaredExponential(lengthscale=0.8), lam=lam)
    data = _data(model, seed=2)
    x, y = data["x"], data["y"]
    assert 0 < y.sum() < len(y)  # both classes present
    alpha = _irls_bernoulli(model.gram(x), y, lam)
    assert _map_error(model, data, model.cholesky(x).T @ alpha) < 1e-10
    z = model.fitted_mean(_map(model, data), x)
    torch.testing.assert_close(z, torch.sigmoid(model.gram(x) @ alpha), rtol=0, atol=FIT_ATOL)


@pytest.mark.parametrize(("fam", "lam"), FAMILY_ROWS)
def test_map_satisfies_kglm_fixed_point(fam, lam: float) -> None:
    model = KernelGLM(fam, SquaredExponential(lengthscale=0.8), lam=lam)
    data = _data(model, n=30, seed=3)
    x, y = data["x"], data["y"]
    values = _map(model, data)
    f = model.natural(values, x)
    # Both relations hold exactly at the MAP; at the fit their residuals are L g / lam for the
    # log joint's gradient g, so they are bounded by _map_error of the fit.
    bound = _map_error(model, data, values["u"])
    # fit quality (measured 1e-7 to 1e-5): max |grad| ~ 1e-8, times ||L|| / lam ~ 20, sqrt(n) ~ 5
    assert bound < 1e-4
    # lam alpha = T(y) - A'(K_j alpha): with alpha := (T(y) - A'(f)) / lam, this is f = K_j alpha
    alpha = _alpha(model, values, data)
    assert (model.gram(x) @ alpha - f).norm() <= 1.001 * bound + 1e-12
    # z = sigma(-K z / lam + K T(y) / lam) with the closed-form DEQ weights
    Ty = fam.T(y)
    z = model.fitted_mean(values, x)
    W, U, b = model.deq_weights(x)
    eta = W @ z + U @ Ty + b  # = K_j alpha
    assert (eta - f).norm() <= 1.001 * bound + 1e-12
    torch.testing.assert_close(z, fam.mean(eta), rtol=0, atol=fam.curvature_bound * bound + 1e-12)
    torch.testing.assert_close(W, -model.gram(x) / lam, rtol=0, atol=0)


@pytest.mark.parametrize(("fam", "lam"), FAMILY_ROWS)
def test_log_joint_is_prior_plus_likelihood(fam, lam: float) -> None:
    model = KernelGLM(fam, SquaredExponential(), lam=lam)
    data = _data(model, n=12, seed=4)
    u = torch.randn(12, generator=torch.Generator().manual_seed(5))
    f = model.cholesky(data["x"]) @ u
    want = dist.Normal(0.0, lam**-0.5).log_prob(u).sum() + fam.log_prob(data["y"], f).sum()
    torch.testing.assert_close(model.log_joint(data, {"u": u}), want, rtol=1e-12, atol=0)


def test_simulate_seeded_with_truth() -> None:
    model = KernelGLM(poisson(), SquaredExponential(), lam=2.0)
    a, b = model.simulate(25, seed=7), model.simulate(25, seed=7)
    assert torch.equal(a.data["y"], b.data["y"]) and torch.equal(a.truth["u"], b.truth["u"])
    assert not torch.equal(a.data["y"], model.simulate(25, seed=8).data["y"])
    assert a.data["x"].shape == a.data["y"].shape == a.truth["u"].shape == (25,)
    assert set(a.truth) == set(model.local_sites)
    model.validate(a.data)  # simulated data pass validation
    c = model.simulate(25, seed=7, dtype=torch.float32)
    assert c.data["x"].dtype == c.data["y"].dtype == c.truth["u"].dtype == torch.float32


def test_sites_and_protocol() -> None:
    model = KernelGLM(bernoulli(), SquaredExponential(), lam=1.0)
    assert model.data_names == ("x", "y")
    assert model.local_sites == ("u",) and model.global_sites == ()
    data = _data(model, n=8)
    with pytest.raises(NotImplementedError, match="cannot be subsampled"):
        model(**data, subsample_size=4)
    assert model(data["x"]).shape == (8,)
    assert model(data["x"].float()).dtype == torch.float32  # follows the input's dtype


def test_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="natural parameter may be any real"):
        KernelGLM(exponential(), SquaredExponential())
    with pytest.raises(ValueError, match="lam must be positive and finite, got -1"):
        KernelGLM(gaussian(), SquaredExponential(), lam=-1.0)
    with pytest.raises(ValueError, match="jitter"):
        KernelGLM(gaussian(), SquaredExponential(), jitter=-1e-3)
    with pytest.raises(TypeError, match="kernel"):
        KernelGLM(gaussian(), "rbf")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="increase KernelGLM.jitter"):
        KernelGLM(gaussian(), Linear(), jitter=0.0).cholesky(torch.arange(4.0))  # rank 1


NAN = math.nan
BAD_DATA = [
    pytest.param(torch.zeros(4, 2, 2), torch.zeros(4), ValueError, "x must have shape", id="x-3d"),
    pytest.param(torch.zeros(4), torch.zeros(4, 1), ValueError, "y must have shape", id="y-2d"),
    pytest.param(torch.zeros(4), torch.zeros(3), ValueError, r"y must have shape \(4", id="y-len"),
    pytest.param(torch.zeros(4), [0.0, 1.0, 1.0, 2.0], ValueError, r"2\.0 at row 3", id="y-binary"),
    pytest.param(torch.zeros(4), [0.0, 0.5, 1.0, 1.0], ValueError, r"0\.5 at row 1", id="y-half"),
    pytest.param([0.0, NAN, 1.0, 2.0], torch.zeros(4), ValueError, "nan at position 1", id="x-nan"),
    pytest.param(torch.zeros(4), [0.0, 1.0, NAN, 1.0], ValueError, "nan at row 2", id="y-nan"),
    pytest.param(np.array(["a", "b"]), torch.zeros(2), TypeError, "must be numeric", id="x-str"),
]


@pytest.mark.parametrize(("x", "y", "error", "match"), BAD_DATA)
def test_validate_rejects(x, y, error, match) -> None:
    model = KernelGLM(bernoulli(), SquaredExponential())
    with pytest.raises(error, match=match):
        model.validate({"x": x, "y": y})
    with pytest.raises(ValueError, match="missing"):
        model.validate({"x": torch.zeros(2)})


def test_validate_casts_to_x_dtype() -> None:
    model = KernelGLM(family("poisson"), SquaredExponential())
    out = model.validate({"x": [[0.0, 1.0], [1.0, 2.0]], "y": [3, 0]})
    assert out["x"].shape == (2, 2) and out["y"].dtype == out["x"].dtype
