"""The report's calibration panel for models that predict new inputs (the kernel GLM)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.kernel_ridge import KernelRidge

from deqppl.expfam import bernoulli, gaussian
from deqppl.harness import LBFGSMethod, compare
from deqppl.kernels import SquaredExponential
from deqppl.models import KernelGLM
from deqppl.report import write_report
from deqppl.report.plots import calibration_frame


def _comparison(family, lam):
    model = KernelGLM(family, SquaredExponential(lengthscale=1.0), lam=lam)
    data = model.simulate(50, seed=3, dtype=torch.float64).data
    return model, compare(model, data, methods=[LBFGSMethod()], progress=False)


def test_bernoulli_predictive_mean_is_the_probability_of_the_log_lik():
    model, comparison = _comparison(bernoulli(), 1.0)
    values = comparison.local_values["lbfgs"]
    train, heldout = comparison.train_data, comparison.heldout_data
    p = model.predictive_mean(train, values, heldout)
    y = heldout["y"]
    # Bernoulli: log p(y | f*) = y log p + (1 - y) log(1 - p), an identity (round-off only).
    expected = y * torch.log(p) + (1 - y) * torch.log1p(-p)
    torch.testing.assert_close(model.predictive_log_lik(train, values, heldout), expected, rtol=1e-12, atol=1e-12)


def test_gaussian_predictive_mean_is_kernel_ridge():
    lam = 0.5
    model, comparison = _comparison(gaussian(), lam)
    train, heldout = comparison.train_data, comparison.heldout_data
    mean = model.predictive_mean(train, comparison.local_values["lbfgs"], heldout)
    K = model.gram(train["x"]).numpy()  # jitter included, as in the model's prior
    krr = KernelRidge(alpha=lam, kernel="precomputed").fit(K, train["y"].numpy())
    K_new = model.kernel(heldout["x"], train["x"]).numpy()
    # L-BFGS stops at the gradient rule (~1e-10 in u); the prediction inherits that error.
    np.testing.assert_allclose(mean.numpy(), krr.predict(K_new), atol=1e-7)


@pytest.mark.parametrize("family", [bernoulli(), gaussian()], ids=["bernoulli", "gaussian"])
def test_report_has_a_calibration_panel(family, tmp_path):
    _, comparison = _comparison(family, 1.0)
    paths = write_report(comparison, tmp_path / "report")
    assert "calibration" in paths
    page = (tmp_path / "report" / "report.html").read_text(encoding="utf-8")
    assert "Calibration of each method" in page or "at the held-out inputs against the observed" in page


def test_calibration_frame_bins_and_counts():
    y = np.array([0, 0, 1, 1, 1, 1])
    p = np.array([0.05, 0.15, 0.95, 0.85, 0.55, 0.45])
    frame = calibration_frame(y, {"m": p}, num_bins=2)
    assert frame["count"].tolist() == [3, 3]
    np.testing.assert_allclose(frame["observed_frequency"], [1 / 3, 1.0])
    np.testing.assert_allclose(frame["mean_predicted"], [(0.05 + 0.15 + 0.45) / 3, (0.95 + 0.85 + 0.55) / 3])
    with pytest.raises(ValueError, match="num_bins"):
        calibration_frame(y, {"m": p}, num_bins=0)
    with pytest.raises(ValueError, match="shape"):
        calibration_frame(y, {"m": p[:3]})
