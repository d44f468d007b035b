"""The exponential-family table (SPEC §1) from one table, against scipy, Pyro and autograd."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pyro
import pytest
import scipy.integrate
import scipy.stats as st
import torch

from deqppl.expfam import (
    FAMILIES,
    NONLINEARITIES,
    REAL_LINE,
    Interval,
    Ising,
    Likelihood,
    bernoulli,
    binomial,
    compatible_nonlinearities,
    continuous_bernoulli,
    exponential,
    family,
    gaussian,
    identity,
    ising,
    leaky_smooth_relu,
    log_cosh,
    neg_smooth_relu,
    nonlinearity,
    poisson,
    relu,
    sigmoid_gaussian,
    smooth_relu,
)

F64 = torch.float64


def _t(values) -> torch.Tensor:
    return torch.as_tensor(values, dtype=F64)


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


# ------------------------------------------------------------------------------------------
# THE table: (family, natural-parameter grid, scipy reference v -> frozen dist or None,
# support for numerical integration: a finite list of points or an interval for quad).
# Ising and the continuous Bernoulli have no scipy distribution; the normalisation and moment
# checks (summation / quadrature) cover them.
# ------------------------------------------------------------------------------------------
FAMILY_TABLE = [
    pytest.param(
        gaussian(precision=2.0),
        [-2.0, -0.3, 0.0, 1.5],
        lambda v: st.norm(loc=v / math.sqrt(2.0), scale=1 / math.sqrt(2.0)),
        (-math.inf, math.inf),
        id="gaussian",
    ),
    pytest.param(
        bernoulli(),
        [-3.0, -0.5, 0.0, 2.0],
        lambda v: st.bernoulli(_sigmoid(v)),
        [0, 1],
        id="bernoulli",
    ),
    pytest.param(
        binomial(5),
        [-2.0, 0.0, 0.4, 3.0],
        lambda v: st.binom(5, _sigmoid(v)),
        list(range(6)),
        id="binomial5",
    ),
    pytest.param(
        # the rate is at most e^2; the mass beyond 150 is below 1e-200
        poisson(),
        [-1.0, 0.0, 0.7, 2.0],
        lambda v: st.poisson(math.exp(v)),
        list(range(151)),
        id="poisson",
    ),
    pytest.param(ising(), [-1.5, 0.0, 0.2, 3.0], None, [-1, 1], id="ising"),
    pytest.param(
        continuous_bernoulli(),
        [-5.0, -0.5, -1e-4, 0.0, 0.3, 4.0],
        None,
        (0.0, 1.0),
        id="cont-bernoulli",
    ),
    pytest.param(
        exponential(),
        [-3.0, -1.0, -0.2],
        lambda v: st.expon(scale=-1.0 / v),
        (0.0, math.inf),
        id="exponential",
    ),
]
SCIPY_TABLE = [p for p in FAMILY_TABLE if p.values[2] is not None]
ROW = ("fam", "grid", "scipy_dist", "support")


def _samples(fam, grid, num: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(num, len(grid))`` draws from the row's Pyro distribution and the broadcast ``v``."""
    v = _t(grid)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        y = fam.distribution(v).sample((num,))
    return y, v.expand_as(y)


def test_table_covers_every_family() -> None:
    assert {p.values[0].name for p in FAMILY_TABLE} == set(FAMILIES)


@pytest.mark.parametrize(ROW, SCIPY_TABLE)
def test_log_prob_matches_scipy(fam, grid, scipy_dist, support) -> None:
    y, v = _samples(fam, grid)
    got = fam.log_prob(y, v).numpy()
    want = np.empty_like(got)
    for idx in np.ndindex(*got.shape):
        d = scipy_dist(float(v[idx]))
        logp = d.logpmf if isinstance(d.dist, st.rv_discrete) else d.logpdf
        want[idx] = logp(float(y[idx]))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(ROW, FAMILY_TABLE)
def test_log_prob_matches_pyro(fam, grid, scipy_dist, support) -> None:
    y, v = _samples(fam, grid)
    want = fam.distribution(v).log_prob(y)
    # 1e-10: Pyro's continuous Bernoulli uses a lower-order Taylor expansion for |v| < ~4e-3
    torch.testing.assert_close(fam.log_prob(y, v), want, rtol=1e-10, atol=1e-10)


def _moments(fam, v: float, support) -> tuple[float, float, float]:
    """Total mass, E[T] and Var[T] by summation over the support or by quadrature."""

    def density(y: float) -> float:
        return math.exp(fam.log_prob(_t(y), _t(v)).item())

    def T(y: float) -> float:
        return fam.T(_t(y)).item()

    if isinstance(support, list):
        p = [density(y) for y in support]
        mass = sum(p)
        mean = sum(pi * T(y) for pi, y in zip(p, support, strict=True))
        var = sum(pi * (T(y) - mean) ** 2 for pi, y in zip(p, support, strict=True))
        return mass, mean, var
    lo, hi = support
    kw = {"epsabs": 1e-13, "epsrel": 1e-12, "limit": 200}
    mass = scipy.integrate.quad(density, lo, hi, **kw)[0]
    mean = scipy.integrate.quad(lambda y: T(y) * density(y), lo, hi, **kw)[0]
    var = scipy.integrate.quad(lambda y: (T(y) - mean) ** 2 * density(y), lo, hi, **kw)[0]
    return mass, mean, var


@pytest.mark.parametrize(ROW, FAMILY_TABLE)
def test_normalised_with_mean_dA_and_variance_d2A(fam, grid, scipy_dist, support) -> None:
    for v in grid:
        mass, mean, var = _moments(fam, v, support)
        # 1e-9: quadrature tolerance (epsrel 1e-12) and summation round-off, with margin
        assert mass == pytest.approx(1.0, abs=1e-9)
        assert mean == pytest.approx(fam.dA(_t(v)).item(), rel=1e-9, abs=1e-9)
        assert var == pytest.approx(fam.d2A(_t(v)).item(), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize(ROW, FAMILY_TABLE)
def test_autograd_of_A_gives_dA_and_d2A(fam, grid, scipy_dist, support) -> None:
    v = _t(grid).requires_grad_(True)
    (dA,) = torch.autograd.grad(fam.A(v).sum(), v, create_graph=True)
    (d2A,) = torch.autograd.grad(dA.sum(), v)
    torch.testing.assert_close(dA, fam.dA(v), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(d2A, fam.d2A(v), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(ROW, FAMILY_TABLE)
def test_pyro_mean_and_variance_of_T(fam, grid, scipy_dist, support) -> None:
    # T is linear in every row, T(y) = c y: E[T] = c E[y] and Var[T] = c^2 Var[y]
    # (Gaussian: c = sqrt(precision)).
    assert fam.T(_t(0.0)).item() == 0.0
    c = fam.T(_t(1.0)).item()
    v = _t(grid)
    d = fam.distribution(v)
    # 1e-10: torch's continuous Bernoulli switches to a Taylor expansion near v = 0
    torch.testing.assert_close(c * d.mean, fam.mean(v), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(c**2 * d.variance, fam.variance(v), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(ROW, FAMILY_TABLE)
def test_link_inverts_mean(fam, grid, scipy_dist, support) -> None:
    v = _t(grid)
    # 1e-10: the continuous Bernoulli's link is found by bisection plus Newton polish
    torch.testing.assert_close(fam.link(fam.mean(v)), v, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------
BAD_VALUES = [
    pytest.param(poisson(), 3.0, -1.0, id="poisson-negative"),
    pytest.param(poisson(), 3.0, 1.5, id="poisson-fractional"),
    pytest.param(bernoulli(), 1.0, 2.0, id="bernoulli-2"),
    pytest.param(bernoulli(), 1.0, 0.5, id="bernoulli-half"),
    pytest.param(binomial(5), 5.0, 6.0, id="binomial-above-t"),
    pytest.param(binomial(5), 5.0, 2.5, id="binomial-fractional"),
    pytest.param(ising(), 1.0, 0.0, id="ising-0"),
    pytest.param(continuous_bernoulli(), 0.3, 1.5, id="cont-bernoulli-1.5"),
    pytest.param(exponential(), 1.0, -0.5, id="exponential-negative"),
]


@pytest.mark.parametrize(("fam", "good", "bad"), BAD_VALUES)
def test_validate_rejects_out_of_support(fam, good: float, bad: float) -> None:
    y = torch.full((3, 4), good, dtype=F64)
    assert torch.equal(fam.validate(y), y)
    y[1, 2] = bad
    with pytest.raises(ValueError, match=rf"{bad!r} at row 1, column 2.*{fam.name}"):
        fam.validate(y)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(ROW, FAMILY_TABLE)
def test_validate_rejects_non_finite(fam, grid, scipy_dist, support, bad: float) -> None:
    y, _ = _samples(fam, grid, num=3)
    y[2, 1] = bad
    with pytest.raises(ValueError, match="non-finite value .* at row 2, column 1"):
        fam.validate(y)


@pytest.mark.parametrize(ROW, FAMILY_TABLE)
def test_validate_rejects_non_numeric(fam, grid, scipy_dist, support) -> None:
    for y in (np.array(["0", "1"]), [["a", "b"]], "1"):
        with pytest.raises(TypeError, match="must be numeric"):
            fam.validate(y)


def test_validate_accepts_integer_and_keeps_float_dtype() -> None:
    assert poisson().validate([[0, 3], [2, 1]]).dtype == torch.get_default_dtype()
    y32 = torch.tensor([0.0, 1.0], dtype=torch.float32)
    assert bernoulli().validate(y32).dtype == torch.float32


# ------------------------------------------------------------------------------------------
# Continuous Bernoulli near v = 0
# ------------------------------------------------------------------------------------------
def _cb_reference(v: float, terms: int = 40) -> tuple[float, float, float]:
    r"""$A$, $A'$, $A''$ from the exact rational series $S(v)=(e^v-1)/v=\sum v^k/(k+1)!$.

    $A=\log S$, $A'=S'/S$, $A''=(S''S-S'^2)/S^2$ in exact arithmetic on the float $v$; only
    the final rounding (and one ``log1p``) is inexact. Truncation: $|v|^{40}/41! < 10^{-49}$
    for $|v|\le 1$.
    """
    q, fact = Fraction(v), 1
    S = S1 = S2 = Fraction(0)
    for k in range(terms):
        fact *= k + 1
        S += q**k / fact
        if k >= 1:
            S1 += k * q ** (k - 1) / fact
        if k >= 2:
            S2 += k * (k - 1) * q ** (k - 2) / fact
    return math.log1p(float(S - 1)), float(S1 / S), float((S2 * S - S1**2) / S**2)


# 0, tiny, the old series threshold 1e-3, either side of the current threshold 0.1, moderate
CB_POINTS = [0.0, 1e-8, -1e-4, 1e-4, -1e-3, 1e-3, 0.1 * (1 - 1e-12), 0.1 * (1 + 1e-12), -0.1]
CB_POINTS += [0.5, -1.0]


@pytest.mark.parametrize("v", CB_POINTS)
def test_continuous_bernoulli_accurate_near_zero(v: float) -> None:
    fam = continuous_bernoulli()
    t = _t([v])
    want = _cb_reference(v)
    got = (fam.A(t).item(), fam.dA(t).item(), fam.d2A(t).item())
    # 3e-13 relative: the closed forms lose ~12 eps / v^2 in A'' just above the series
    # threshold (measured 1.4e-13 at |v| = 0.1); the series below it is exact to round-off.
    # (Before the threshold moved from 1e-3 to 0.1 the error at |v| = 1e-3 was 3e-9.)
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, rel=3e-13, abs=1e-300)


def test_continuous_bernoulli_smooth_through_zero() -> None:
    fam = continuous_bernoulli()
    # dense sweep across both series/closed-form switches: autograd of A agrees with dA,
    # autograd of dA with d2A, and the second differences stay at round-off (no jumps)
    v = torch.linspace(-0.3, 0.3, 6001, dtype=F64).requires_grad_(True)
    (dA,) = torch.autograd.grad(fam.A(v).sum(), v, create_graph=True)
    (d2A,) = torch.autograd.grad(fam.dA(v).sum(), v)
    torch.testing.assert_close(dA, fam.dA(v), rtol=1e-13, atol=0)
    torch.testing.assert_close(d2A, fam.d2A(v), rtol=1e-12, atol=0)
    h = 1e-4  # grid step
    second = (fam.dA(v[2:]) - 2 * fam.dA(v[1:-1]) + fam.dA(v[:-2])).detach() / h**2
    # A''' is bounded by 1/30 on [-0.3, 0.3] (A''' = -v/120 + ...), round-off 4 eps / h^2
    assert second.abs().max() < 0.02 + 4 * 2.3e-16 / h**2
    # and agrees with torch's ContinuousBernoulli, which guards v -> 0 differently
    y = torch.tensor([0.0, 0.25, 1.0], dtype=F64)
    for vv in (-1e-4, 0.0, 1e-3, 0.1):
        vt = _t(vv)
        torch.testing.assert_close(
            fam.log_prob(y, vt),
            torch.distributions.ContinuousBernoulli(logits=vt).log_prob(y),
            rtol=1e-12,
            atol=1e-12,
        )


# ------------------------------------------------------------------------------------------
# Canonical nonlinearities
# ------------------------------------------------------------------------------------------
NONLINEARITY_TABLE = [
    pytest.param(identity(), id="identity"),
    pytest.param(relu(), id="relu"),
    pytest.param(smooth_relu(0.5), id="smooth_relu"),
    pytest.param(smooth_relu(-2.0), id="smooth_relu-negtau"),
    pytest.param(leaky_smooth_relu(0.3, slope=0.2), id="leaky_smooth_relu"),
    pytest.param(neg_smooth_relu(0.7), id="neg_smooth_relu"),
    pytest.param(log_cosh(), id="log_cosh"),
    pytest.param(sigmoid_gaussian(), id="sigmoid_gaussian"),
]
# away from the ReLU kink at 0
ETA = [-25.0, -2.5, -0.7, -0.1, 0.2, 0.9, 3.0, 25.0]


def test_nonlinearity_table_covers_registry() -> None:
    names = {p.values[0].name.split("(")[0] for p in NONLINEARITY_TABLE}
    assert names == set(NONLINEARITIES) - {"sigmoid_gaussian"} | {"from_activation"}


@pytest.mark.parametrize("nl", NONLINEARITY_TABLE)
def test_rho_and_drho_are_derivatives(nl) -> None:
    eta = _t(ETA).requires_grad_(True)

    def derivative(out: torch.Tensor) -> torch.Tensor:  # constant rho has no graph
        return torch.autograd.grad(out.sum(), eta)[0] if out.requires_grad else 0 * eta

    # rtol 1e-10: sigmoid_gaussian's R uses F.softplus, which returns x itself for x > 20
    # (relative error e^{-x} ~ 1e-11 in R' at eta = 25)
    torch.testing.assert_close(nl.rho(eta), derivative(nl.R(eta)), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(nl.drho(eta), derivative(nl.rho(eta)), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("tau", [0.01, 1.0, -3.0])
def test_smooth_relu_within_bound_of_relu(tau: float) -> None:
    eta = torch.linspace(-10, 10, 20001, dtype=F64)
    gap = (smooth_relu(tau).R(eta) - torch.relu(eta)).abs()
    assert gap.max() <= abs(tau) * math.sqrt(2 / math.pi)
    # the gap is largest at the kink: |tau| phi(0)
    assert gap.max() == pytest.approx(abs(tau) / math.sqrt(2 * math.pi), rel=1e-12)


def _lik_table():
    for fp in FAMILY_TABLE:
        fam = fp.values[0]
        for nlp in NONLINEARITY_TABLE:
            nl = nlp.values[0]
            if nl.gaussian_only and fam.name != "gaussian":
                continue  # rejected, see test_gaussian_only_rejected
            if not fam.domain.contains(nl.range):
                continue  # rejected, see test_likelihood_requires_range_in_domain
            yield pytest.param(Likelihood(fam, nl), id=f"{fp.id}-{nlp.id}")


LIKELIHOOD_TABLE = list(_lik_table())


@pytest.mark.parametrize("lik", LIKELIHOOD_TABLE)
def test_likelihood_derivatives_by_autograd(lik: Likelihood) -> None:
    # moderate eta keeps A(R(eta)) finite for Poisson with log_cosh (R ~ 2 eta)
    eta = _t([-2.5, -0.7, -0.1, 0.2, 0.9, 3.0]).requires_grad_(True)
    fam = lik.family
    (sigma,) = torch.autograd.grad(fam.A(lik.natural(eta)).sum(), eta, create_graph=True)
    (dsigma,) = torch.autograd.grad(sigma.sum(), eta)
    torch.testing.assert_close(lik.activation(eta), sigma, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(lik.activation_grad(eta), dsigma, rtol=1e-11, atol=1e-13)
    # curvature = -d^2/d eta^2 log p(y | R(eta)) at y drawn from the model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        y = lik.distribution(eta.detach()).sample()
    (g,) = torch.autograd.grad(lik.log_prob(y, eta).sum(), eta, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), eta)
    torch.testing.assert_close(lik.curvature(y, eta), -h, rtol=1e-11, atol=1e-13)
    # drive = d/d eta log p(y | R(eta)), the term the PED layer multiplies by W^T / lam
    torch.testing.assert_close(lik.drive(y, eta), g, rtol=1e-11, atol=1e-13)
    # and log_prob is the Pyro distribution's
    want = lik.distribution(eta).log_prob(y)
    torch.testing.assert_close(lik.log_prob(y, eta), want, rtol=1e-10, atol=1e-10)


def test_sigmoid_gaussian_activation_is_sigmoid() -> None:
    eta = torch.linspace(-30, 30, 601, dtype=F64)
    for precision in (1.0, 3.0):  # A = v^2/2 whatever the precision
        lik = Likelihood(gaussian(precision), sigmoid_gaussian())
        torch.testing.assert_close(lik.activation(eta), torch.sigmoid(eta), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("fam", [bernoulli(), poisson(), ising()], ids=lambda f: f.name)
def test_gaussian_only_rejected(fam) -> None:
    with pytest.raises(ValueError, match="gaussian family only"):
        Likelihood(fam, sigmoid_gaussian())


# ------------------------------------------------------------------------------------------
# Family x nonlinearity compatibility: the range of R must lie in the natural-parameter domain
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nl", NONLINEARITY_TABLE)
def test_range_holds_every_value_of_R(nl) -> None:
    # [-8, 8] keeps ReLU_tau(eta) (tau >= 0.3) clear of underflow to exactly 0 in float64
    eta = torch.linspace(-8.0, 8.0, 16001, dtype=F64)
    v = nl.R(eta)
    outside = ~nl.range.contains_values(v)
    assert not bool(outside.any()), f"{nl.name}: R = {v[outside][:3]} outside {nl.range.describe()}"


def test_ranges_are_tight_where_bounded() -> None:
    # the stated end points are limits of R, not loose bounds: e.g. log_cosh -> -log 2
    far = _t([-60.0, 60.0])
    assert float(log_cosh().R(far[:1])) == pytest.approx(-math.log(2.0), rel=1e-12)
    assert log_cosh().range.lower == pytest.approx(-math.log(2.0), rel=1e-15)
    assert float(neg_smooth_relu(0.5).R(far[1:])) < -50 and neg_smooth_relu(0.5).range.upper == 0.0
    assert float(smooth_relu(0.5).R(_t([-8.0]))) < 1e-12 and smooth_relu(0.5).range.lower == 0.0
    assert float(leaky_smooth_relu(0.5, slope=0.1).R(_t([-1e3]))) < -50
    assert leaky_smooth_relu(0.5, slope=0.1).range == REAL_LINE
    assert leaky_smooth_relu(0.5, slope=0.0).range == Interval(lower=0.0)


FAMILY_ROWS = [pytest.param(p.values[0], id=p.id) for p in FAMILY_TABLE]


@pytest.mark.parametrize("fam", FAMILY_ROWS)
def test_domain_is_where_the_pyro_distribution_exists(fam) -> None:
    # Independent oracle: Pyro's own parameter constraints. Inside the domain the distribution
    # builds with validate_args; just outside a restricted domain it is rejected.
    dom = fam.domain
    inside = [v for v in (-3.0, -0.5, 0.5, 3.0) if bool(dom.contains_values(_t(v)))]
    assert inside, "every family row has natural parameters on both sides of 0 or one side"
    for v in inside:
        with pyro.validation_enabled(True):
            fam.distribution(_t(v))
        assert bool(torch.isfinite(fam.A(_t(v))))
    if not dom.is_real_line:
        beyond = dom.upper + 0.5 if math.isfinite(dom.upper) else dom.lower - 0.5
        with pytest.raises(ValueError):
            with pyro.validation_enabled(True):
                fam.distribution(_t(beyond))


@pytest.mark.parametrize("nl", NONLINEARITY_TABLE)
@pytest.mark.parametrize("fam", FAMILY_ROWS)
def test_likelihood_requires_range_in_domain(fam, nl) -> None:
    if nl.gaussian_only and fam.name != "gaussian":
        return  # test_gaussian_only_rejected
    if fam.domain.contains(nl.range):
        Likelihood(fam, nl)
        return
    with pytest.raises(ValueError) as info:
        Likelihood(fam, nl)
    message = str(info.value)
    for part in (nl.name, fam.describe(), nl.range.describe(), fam.domain.describe()):
        assert part in message
    assert all(name in message for name in compatible_nonlinearities(fam))


def test_exponential_needs_a_negative_nonlinearity() -> None:
    with pytest.raises(ValueError, match=r"identity takes values in \(-inf, inf\).*exponential\(\)"
                       r".*\(-inf, 0\).*neg_smooth_relu"):
        Likelihood(exponential(), identity())
    with pytest.raises(ValueError, match=r"relu takes values in \[0, inf\)"):
        Likelihood(exponential(), relu())
    Likelihood(exponential(), neg_smooth_relu(0.5))
    assert compatible_nonlinearities(exponential()) == ["neg_smooth_relu"]
    assert set(compatible_nonlinearities(poisson())) == set(NONLINEARITIES) - {"sigmoid_gaussian"}


def test_user_nonlinearity_defaults_to_the_real_line() -> None:
    from deqppl.expfam import Nonlinearity

    tanh = Nonlinearity("tanh", torch.tanh, lambda e: 1 - torch.tanh(e) ** 2, lambda e: 0 * e)
    assert tanh.range == REAL_LINE
    Likelihood(poisson(), tanh)
    with pytest.raises(ValueError, match="tanh takes values in"):
        Likelihood(exponential(), tanh)
    bounded = Nonlinearity(
        "-1-softplus", lambda e: -1 - torch.nn.functional.softplus(e), torch.sigmoid,
        torch.sigmoid, range=Interval(upper=-1.0),
    )
    Likelihood(exponential(), bounded)


@pytest.mark.parametrize(
    ("outer", "inner", "contains"),
    [
        (Interval(upper=0.0), Interval(upper=0.0), True),
        (Interval(upper=0.0), Interval(upper=0.0, lower=-1.0, upper_closed=False), True),
        (Interval(upper=0.0), Interval(lower=-1.0, upper=0.0, lower_closed=True, upper_closed=True), False),
        (Interval(lower=0.0, lower_closed=True), Interval(lower=0.0), True),
        (Interval(lower=0.0), Interval(lower=0.0, lower_closed=True), False),
        (REAL_LINE, Interval(lower=-1.0, upper=2.0, lower_closed=True, upper_closed=True), True),
        (Interval(lower=-1.0, upper=1.0), REAL_LINE, False),
    ],
)
def test_interval_containment(outer, inner, contains) -> None:
    assert outer.contains(inner) is contains


def test_interval_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="lower <= upper"):
        Interval(lower=1.0, upper=0.0)
    with pytest.raises(ValueError, match="infinite end point"):
        Interval(lower_closed=True)
    with pytest.raises(ValueError, match="closed at both ends"):
        Interval(lower=0.0, upper=0.0)


def test_unknown_names_list_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown family 'gauss'") as info:
        family("gauss")
    assert all(name in str(info.value) for name in FAMILIES)
    with pytest.raises(ValueError, match="unknown nonlinearity 'tanh'") as info:
        nonlinearity("tanh")
    assert all(name in str(info.value) for name in NONLINEARITIES)
    assert family("binomial", total_count=3) == binomial(3)
    assert nonlinearity("smooth_relu", tau=0.5) == smooth_relu(0.5)


@pytest.mark.parametrize(
    "make",
    [
        lambda: gaussian(-1.0),
        lambda: binomial(2.5),
        lambda: smooth_relu(0.0),
        lambda: leaky_smooth_relu(slope=2.0),
    ],
    ids=["gaussian-precision", "binomial-count", "tau-zero", "slope"],
)
def test_invalid_parameters_rejected(make) -> None:
    with pytest.raises(ValueError):
        make()


# ------------------------------------------------------------------------------------------
# The Ising distribution
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("v", [-1.2, 0.0, 0.4, 2.0])
def test_ising_samples(v: float) -> None:
    n = 20_000
    d = Ising(_t(v))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        y = d.sample((n,))
    assert set(y.unique().tolist()) <= {-1.0, 1.0}
    se = math.sqrt((1 - math.tanh(v) ** 2) / n)  # Var[y] = 1 - tanh^2 v
    # 5 standard errors: a false failure rate of 6e-7 per case (and the seed is fixed)
    assert abs(y.mean().item() - math.tanh(v)) <= 5 * se + 1e-12
    # normalised over {-1, +1}, and the log-density agrees with the family row
    support = d.enumerate_support()
    torch.testing.assert_close(d.log_prob(support).exp().sum(), _t(1.0))
    torch.testing.assert_close(d.log_prob(support), ising().log_prob(support, _t(v)))


@pytest.mark.parametrize(ROW, FAMILY_TABLE)
def test_d2A_of_mean_is_d2A(fam, grid, scipy_dist, support) -> None:
    """``d2A_of_mean(dA(v)) == d2A(v)`` (the curvature a layer forms from its mean)."""
    if fam.d2A_of_mean is None:
        # no closed form (continuous Bernoulli): its likelihoods must not claim the fused path
        lik = Likelihood(fam, identity())
        assert not lik.curvature_is_mean_function
        with pytest.raises(ValueError, match="not a function of the mean"):
            lik.curvature_from_mean(fam.dA(_t(grid)))
        return
    v = _t(grid)
    # absolute 1e-14 * max(1, A''): the mean form cancels near the ends of the mean's range
    # (Bernoulli 1 - m), accurate to an absolute rounding error there (ExpFamily.d2A_of_mean)
    scale = float(fam.d2A(v).abs().max().clamp_min(1.0))
    torch.testing.assert_close(fam.d2A_of_mean(fam.dA(v)), fam.d2A(v), rtol=1e-12, atol=1e-14 * scale)


@pytest.mark.parametrize("lik", LIKELIHOOD_TABLE)
def test_curvature_from_mean_is_curvature(lik: Likelihood) -> None:
    eta = _t([-2.5, -0.7, -0.1, 0.2, 0.9, 3.0])
    if not lik.curvature_is_mean_function:
        with pytest.raises(ValueError, match="not a function of the mean"):
            lik.curvature_from_mean(lik.activation(eta))
        return
    y = lik.distribution(eta).mean  # curvature_is_mean_function: no y dependence
    torch.testing.assert_close(lik.curvature_from_mean(lik.activation(eta)), lik.curvature(y, eta),
                               rtol=1e-12, atol=1e-14)


def test_validate_checks_every_block_and_survives_overflowing_sums() -> None:
    """The blocked fast path of ExpFamily.validate: a bad entry in a late block is still named,
    and finite data whose sum overflows is still accepted (by the exact whole-tensor checks)."""
    y = torch.zeros(300_000, dtype=F64)  # several blocks of deqppl.validation.BLOCK_ENTRIES
    y[-1] = float("nan")
    with pytest.raises(ValueError, match="non-finite value nan at"):
        gaussian().validate(y)
    y[-1] = 0.5
    with pytest.raises(ValueError, match="outside the allowed"):
        poisson().validate(y)
    big = torch.full((4,), 1e308, dtype=F64)  # sum = inf, every entry finite
    assert gaussian().validate(big) is big
