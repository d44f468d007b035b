"""Gaussian moments: closed forms vs two quadratures vs scipy's adaptive quadrature."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import integrate, special

from deqppl.spectra import (ELU, AbstractActivation, Centred, CompositeGaussLegendre, GaussHermite, HardTanh,
                            LeakyReLU, ReLU, Swish, Tanh, gaussian_moments, quadrature_moments)

CLOSED = [
    pytest.param(ReLU(), id="relu"),
    pytest.param(LeakyReLU(positive_slope=1.0, negative_slope=0.01), id="leaky"),
    pytest.param(LeakyReLU(positive_slope=-0.4, negative_slope=1.3), id="leaky-reversed"),
    pytest.param(HardTanh(gain=1.0, clip=1.0), id="hardtanh"),
    pytest.param(HardTanh(gain=-1.7, clip=0.35), id="hardtanh-narrow"),
    pytest.param(Centred(base=ReLU(), shift=0.3), id="centred-relu"),
    pytest.param(Centred(base=HardTanh(gain=2.0, clip=0.5), shift=-0.1), id="centred-hardtanh"),
]
SMOOTH = [pytest.param(Tanh(), id="tanh"), pytest.param(Swish(), id="swish"),
          pytest.param(Swish(beta=2.0), id="swish2")]
ALL_QUAD = SMOOTH + [pytest.param(ELU(), id="elu"), pytest.param(ELU(alpha=0.5), id="elu-0.5")]
SCALES = [0.3, 1.0, 2.5]


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("act", CLOSED)
def test_closed_form_matches_quadrature(act, scale):
    exact = act.closed_form(scale)
    quad = quadrature_moments(act, scale)
    assert exact.exact and not quad.exact
    for a, b in zip(exact.as_tuple(), quad.as_tuple()):
        assert abs(a - b) <= 1e-10  # the claim: closed forms and quadrature agree to 1e-10


def _scipy(act, scale, weight):
    """Adaptive quadrature of E[weight(xi) * act(scale xi)] split at the kinks."""
    pdf = lambda x: math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)  # noqa: E731
    f = lambda x: float(act(torch.tensor(scale * x, dtype=torch.float64)))  # noqa: E731
    points = sorted(k / scale for k in act.kinks if abs(k / scale) < 30)
    edges = [-30.0, *points, 30.0]
    return sum(integrate.quad(lambda x: weight(x, f(x)) * pdf(x), lo, hi, epsabs=1e-14,
                              epsrel=1e-13, limit=200)[0] for lo, hi in zip(edges[:-1], edges[1:]))


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("act", ALL_QUAD)
def test_quadrature_matches_scipy(act, scale):
    quad = quadrature_moments(act, scale)
    assert abs(quad.mean - _scipy(act, scale, lambda x, y: y)) <= 1e-10
    assert abs(quad.second - _scipy(act, scale, lambda x, y: y * y)) <= 1e-10
    # Stein's lemma for d1, checked against E phi'(tau xi) integrated directly
    direct_d1 = _scipy_derivative(act, scale)
    assert abs(quad.d1 - direct_d1) <= 1e-9  # derivative by central differences: h^2 ~ 1e-10


def _scipy_derivative(act, scale):
    h = 1e-5
    pdf = lambda x: math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)  # noqa: E731

    def d(x):
        t = torch.tensor([scale * x - h, scale * x + h], dtype=torch.float64)
        y = act(t)
        return float(y[1] - y[0]) / (2 * h)

    points = sorted(k / scale for k in act.kinks)
    edges = [-30.0, *points, 30.0]
    return sum(integrate.quad(lambda x: d(x) * pdf(x), lo, hi, epsabs=1e-13, limit=200)[0]
               for lo, hi in zip(edges[:-1], edges[1:]))


@pytest.mark.parametrize("scale", [0.3, 1.0, 1.5])
@pytest.mark.parametrize("act", SMOOTH)
def test_gauss_hermite_matches_composite(act, scale):
    gh = quadrature_moments(act, scale, quadrature=GaussHermite())
    gl = quadrature_moments(act, scale, quadrature=CompositeGaussLegendre())
    for a, b in zip(gh.as_tuple(), gl.as_tuple()):
        assert abs(a - b) <= 1e-10


def test_known_values():
    relu = ReLU().closed_form(1.0)
    assert relu.g1 == 0.25
    assert relu.g2 == pytest.approx(1 / (2 * math.pi), rel=1e-15)
    assert relu.var == pytest.approx(0.5 - 1 / (2 * math.pi), rel=1e-15)
    centred = Centred.at(ReLU(), 1.0)
    assert gaussian_moments(centred, 1.0).g4 == pytest.approx(1 - 1 / math.pi, rel=1e-14)
    # tanh: E tanh'(xi) against scipy's special functions is not closed form; use oddness
    tanh = quadrature_moments(Tanh(), 0.8)
    assert abs(tanh.mean) < 1e-15 and abs(tanh.d2) < 1e-15 and abs(tanh.sq_d2) > 0.1
    hard = HardTanh(gain=1.0, clip=1.0).closed_form(1.0)
    assert hard.d1 == pytest.approx(special.erf(1 / math.sqrt(2)), rel=1e-15)


def test_odd_activations_have_zero_second_derivative_mean():
    for act in (Tanh(), HardTanh(gain=0.7, clip=2.0), LeakyReLU(positive_slope=0.3,
                                                                 negative_slope=0.3)):
        assert act.odd
        assert abs(quadrature_moments(act, 1.3).d2) < 1e-14


def test_bad_input():
    with pytest.raises(ValueError, match="scale"):
        quadrature_moments(ReLU(), 0.0)
    with pytest.raises(ValueError, match="scale"):
        gaussian_moments(ReLU(), -1.0)
    with pytest.raises(TypeError, match="activation"):
        quadrature_moments(torch.tanh, 1.0)
    with pytest.raises(ValueError, match="clip"):
        HardTanh(gain=1.0, clip=0.0)
    with pytest.raises(TypeError, match="positive_slope"):
        LeakyReLU(positive_slope=float("nan"))
    with pytest.raises(ValueError, match="kinks"):
        quadrature_moments(ReLU(), 1.0, quadrature=GaussHermite())
    with pytest.raises(ValueError, match="num_nodes"):
        GaussHermite(num_nodes=500)
    with pytest.raises(ValueError, match="panel_width"):
        CompositeGaussLegendre(panel_width=0.0)


class _Explodes(AbstractActivation):
    """An activation whose Gaussian moments overflow (exp(exp(t)))."""

    def __call__(self, t):
        return torch.exp(torch.exp(t))


def test_non_finite_quadrature_is_an_error():
    with pytest.raises(ValueError, match="not finite"):
        quadrature_moments(_Explodes(), 2.0)
