"""The four equations, the predicted kernels and the mixture statistics (SPEC 6)."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import optimize

from deqppl.spectra import (ELU, AsymptoticsWarning, GaussianMixture, HardTanh, KernelCoefficients,
                            LeakyReLU, RandomDEQ, ReLU, Swish, Tanh, TheoryError, assemble_kernel,
                            data_statistics, predict_kernels, quadrature_moments,
                            solve_coefficients, two_class_mixture)

from .oracles import relu_limit_kernels

ACTIVATIONS = [pytest.param(ReLU(), id="relu"), pytest.param(Tanh(), id="tanh"),
               pytest.param(LeakyReLU(positive_slope=1.0, negative_slope=0.1), id="leaky"),
               pytest.param(HardTanh(gain=1.2, clip=0.8), id="hardtanh"),
               pytest.param(ELU(), id="elu"), pytest.param(Swish(), id="swish")]


def _norm(M):
    return float(torch.linalg.matrix_norm(M, 2))


def test_relu_alpha1_matches_spec():
    for tau0 in (0.5, 1.0, 1.3):
        c = solve_coefficients(RandomDEQ(activation=ReLU(), var_a=0.2, var_b=0.8), tau0)
        assert abs(c.alpha1 - 0.842105) <= 1e-6  # SPEC 6: 0.8 / (1 - 0.2/4) = 0.8421052...
        assert c.alpha1 == pytest.approx(0.8 / 0.95, rel=1e-14)


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_tau_solves_its_equation(act):
    deq = RandomDEQ(activation=act, var_a=0.3, var_b=0.7)
    tau0 = 1.1
    c = solve_coefficients(deq, tau0)

    def F(s):  # independent root finder (scipy brentq) on the same equation
        return s - 0.3 * quadrature_moments(act, math.sqrt(s)).var - 0.7 * tau0**2

    root = optimize.brentq(F, 1e-6, 50.0, xtol=1e-15, rtol=1e-15)
    assert c.tau**2 == pytest.approx(root, rel=1e-12)
    assert c.residual <= 1e-13


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_coefficients_from_the_equations(act):
    """Recompute every coefficient from SPEC 6's formulas with scipy-free plain arithmetic."""
    va, vb, tau0 = 0.25, 0.75, 0.9
    c = solve_coefficients(RandomDEQ(activation=act, var_a=va, var_b=vb), tau0)
    m = quadrature_moments(c.activation, c.tau)  # centred activation, by quadrature
    assert abs(m.mean) < 1e-13
    g1, g2, g4 = m.d1**2, m.d2**2, m.sq_d2
    a1 = vb / (1 - va * g1)
    a4 = vb / (1 - va * g4 / 2)
    a2 = va * g2 * a4**2 / (4 * (1 - va * g1))
    a3 = va * g2 * a1**2 / (2 * (1 - va * g1))
    assert (c.alpha1, c.alpha2, c.alpha3, c.alpha4) == pytest.approx((a1, a2, a3, a4), abs=1e-12)
    assert c.kappa2 == pytest.approx(m.var / (1 - va * m.d1_sq), rel=1e-12)
    assert c.ck.c1 == pytest.approx((a1 - vb) / va, rel=1e-12)
    assert c.ck.c0 == pytest.approx(m.var - c.ck.c1 * tau0**2, rel=1e-12, abs=1e-14)


def test_relu_closed_form_coefficients():
    va, vb, tau0 = 0.2, 0.8, 1.0
    c = solve_coefficients(RandomDEQ(activation=ReLU(), var_a=va, var_b=vb), tau0)
    var_unit = 0.5 - 1 / (2 * math.pi)  # Var relu(xi)
    tau2 = vb * tau0**2 / (1 - va * var_unit)  # ReLU is homogeneous: tau^2 solves a linear eq.
    assert c.tau**2 == pytest.approx(tau2, rel=1e-14)
    g2 = 1 / (2 * math.pi * tau2)
    a4 = vb / (1 - va * (1 - 1 / math.pi) / 2)
    assert c.alpha4 == pytest.approx(a4, rel=1e-13)
    assert c.alpha2 == pytest.approx(va * g2 * a4**2 / (4 * 0.95), rel=1e-12)
    assert c.alpha3 == pytest.approx(va * g2 * (vb / 0.95) ** 2 / (2 * 0.95), rel=1e-12)
    assert c.activation.shift == pytest.approx(math.sqrt(tau2 / (2 * math.pi)), rel=1e-14)


@pytest.mark.parametrize("act", [Tanh(), HardTanh(gain=1.5, clip=0.7)], ids=["tanh", "hardtanh"])
def test_odd_activations_give_zero_alpha2_alpha3(act):
    c = solve_coefficients(RandomDEQ(activation=act), 1.0)
    assert abs(c.alpha2) < 1e-14 and abs(c.alpha3) < 1e-14
    assert c.activation.shift == pytest.approx(0.0, abs=1e-15)


def test_assemble_kernel_structure():
    mix = two_class_mixture(96)
    stats = mix.statistics(mix.sample(80, seed=3))
    p = stats.dim
    K2 = assemble_kernel(KernelCoefficients(c1=0.0, c2=1.0, c3=0.0, c0=0.0), stats)
    a = stats.labels
    r = stats.psi + stats.t[a] / math.sqrt(p)  # c2 term is (psi_i + t_a/sqrt p)(psi_j + t_b/sqrt p)
    assert torch.allclose(K2, r[:, None] * r[None, :], atol=1e-14)
    K3 = assemble_kernel(KernelCoefficients(c1=0.0, c2=0.0, c3=1.0, c0=0.0), stats)
    assert torch.allclose(K3, stats.S[a][:, a] / p, atol=1e-14)
    # S: class means of p (x_i.x_j)^2 over pairs i != j, by a double loop
    g2 = (stats.x @ stats.x.T) ** 2
    for i in range(2):
        for j in range(2):
            vals = [float(g2[k, l]) for k in range(80) for l in range(80)
                    if k != l and a[k] == i and a[l] == j]
            assert float(stats.S[i, j]) == pytest.approx(p * sum(vals) / len(vals), rel=1e-12)
    K0 = assemble_kernel(KernelCoefficients(c1=0.0, c2=0.0, c3=0.0, c0=2.0), stats)
    assert torch.equal(K0, 2.0 * torch.eye(80, dtype=torch.float64))


def test_mixture_statistics_of_spec():
    p = 256
    mix = two_class_mixture(p)
    sample = mix.sample(205, seed=0)
    stats = mix.statistics(sample)
    assert sample.labels.bincount().tolist() == [103, 102]
    # C_a = (1 + 8a/sqrt p) I: C° = (1 + 4 (102/205) ... ) I exactly from the counts
    share = 102 / 205
    assert float(stats.t[0]) == pytest.approx(-8 * share, rel=1e-12)
    assert float(stats.t[1]) == pytest.approx(8 * (1 - share), rel=1e-12)
    d = torch.tensor([-8 * share, 8 * (1 - share)], dtype=torch.float64) / math.sqrt(p)
    assert torch.allclose(stats.T, d[:, None] * d[None, :], rtol=1e-12)
    noise = sample.noise
    assert torch.allclose(stats.psi, (noise**2).sum(1) - (1 + 8 * sample.labels / math.sqrt(p)))
    assert stats.tau0 == pytest.approx(math.sqrt(float((sample.x**2).sum()) / 205), rel=1e-14)
    # psi_i has mean 0 and variance 2 tr(C_a^2)/p^2 ~ 2/p
    assert abs(float(stats.psi.mean())) < 4 * math.sqrt(2 / p / 205)


def test_data_statistics_estimate_the_mixture():
    mix = two_class_mixture(128)
    sample = mix.sample(4000, seed=1)
    est, true = data_statistics(sample.x, sample.labels), mix.statistics(sample)
    # t_a is a trace over 128 estimated variances from 2000 points: standard error ~ 0.04
    assert torch.allclose(est.t, true.t, atol=0.2)
    assert est.tau0 == true.tau0


@pytest.mark.parametrize("p", [256, 512])
def test_relu_prediction_matches_the_infinite_width_kernel(p):
    """Gbar vs the exact infinite-width implicit kernel (no sampling noise): the theory's own
    error, which must be small and shrink with p."""
    mix = two_class_mixture(p)
    stats = mix.statistics(mix.sample(int(0.8 * p), seed=0))
    pred = predict_kernels(RandomDEQ(activation=ReLU()), stats)
    G, Theta = relu_limit_kernels(stats.gram, 0.2, pred.coefficients.activation.shift)
    # measured 0.023 / 0.015 (CK) and 0.025 / 0.016 (NTK) at p = 256 / 512; bounds leave a margin
    bound = {256: 0.035, 512: 0.025}[p]
    assert _norm(G - pred.ck) / _norm(pred.ck) <= bound
    assert _norm(Theta - pred.ntk) / _norm(pred.ntk) <= bound


def test_relu_prediction_error_falls_with_p_and_S_helps():
    errors, errors_t0, errors_spec = [], [], []
    for p in (128, 256, 512):
        mix = two_class_mixture(p)
        stats = mix.statistics(mix.sample(int(0.8 * p), seed=0))
        pred = predict_kernels(RandomDEQ(activation=ReLU()), stats)
        G, _ = relu_limit_kernels(stats.gram, 0.2, pred.coefficients.activation.shift)
        errors.append(_norm(G - pred.ck) / _norm(pred.ck))
        c3, a = pred.coefficients.ck.c3, stats.labels
        t0 = pred.ck - c3 * (stats.S - stats.T - stats.T0)[a][:, a] / p  # T + T0 in place of S
        spec = t0 - c3 * stats.T0 / p  # SPEC 6's formula, T alone
        errors_t0.append(_norm(G - t0) / _norm(t0))
        errors_spec.append(_norm(G - spec) / _norm(spec))
    for e in (errors, errors_t0, errors_spec):
        assert e[0] > e[1] > e[2]
    assert all(a < b < c for a, b, c in zip(errors, errors_t0, errors_spec))


def test_bad_input():
    with pytest.raises(ValueError, match="var_a \\+ var_b must equal 1"):
        RandomDEQ(activation=ReLU(), var_a=0.2, var_b=0.7)
    with pytest.raises(ValueError, match="var_a must be > 0"):
        RandomDEQ(activation=ReLU(), var_a=-0.2, var_b=1.2)
    with pytest.raises(TypeError, match="activation"):
        RandomDEQ(activation=torch.relu)
    with pytest.raises(ValueError, match="tau0"):
        solve_coefficients(RandomDEQ(activation=ReLU()), 0.0)
    # slope 3: tau^2 <- 0.2 * 9 tau^2 + ... has no fixed point
    with pytest.raises(TheoryError, match="no tau_"):
        solve_coefficients(RandomDEQ(activation=LeakyReLU(positive_slope=3.0,
                                                          negative_slope=3.0)), 1.0)
    with pytest.raises(ValueError, match="class 1 has 1 point"):
        data_statistics(torch.randn(5, 70, dtype=torch.float64), torch.tensor([0, 0, 0, 0, 1]))
    with pytest.raises(ValueError, match="class 1 only 1 point"):
        GaussianMixture(means=torch.zeros(2, 70, dtype=torch.float64),
                        covariances=torch.eye(70, dtype=torch.float64).expand(2, 70, 70).clone(),
                        proportions=torch.tensor([0.9, 0.1], dtype=torch.float64)).sample(
                            12, seed=0)
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixture(means=torch.zeros(1, 3, dtype=torch.float64),
                        covariances=-torch.eye(3, dtype=torch.float64)[None])


def test_small_sizes_warn():
    mix = two_class_mixture(32)
    with pytest.warns(AsymptoticsWarning, match="p = 32"):
        mix.statistics(mix.sample(100, seed=0))
    big = two_class_mixture(100)
    with pytest.warns(AsymptoticsWarning, match="n = 20"):
        big.statistics(big.sample(20, seed=0))


def test_spectra_never_imports_pyro():
    import subprocess
    import sys

    code = ("import sys, deqppl.spectra, deqppl.spectra.empirical; "
            "sys.exit(any(m.split('.')[0] == 'pyro' for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
