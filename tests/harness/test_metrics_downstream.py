"""Per-datum metrics and downstream baselines against independent oracles (scipy, scikit-learn)."""

import numpy as np
import pytest
import torch
from scipy import stats

from deqppl.expfam import binomial, family
from deqppl.harness.downstream import fit_classifier, fit_pca
from deqppl.harness.metrics import log_mean_exp, site_log_prob, subspace_angle
from deqppl.models import ExpFamPCA

F64 = torch.float64


def test_observation_site_log_prob_matches_scipy():
    model = ExpFamPCA(family=binomial(16), obs_dim=5, latent_dim=2)
    sim = model.simulate(7, seed=3, dtype=F64)
    W, B, z, y = sim.truth["W"], sim.truth["B"], sim.truth["z"], sim.data["y"]
    got = site_log_prob(model, sim.data, sim.truth, "y")
    p = 1 / (1 + np.exp(-(z @ W.T + B).numpy()))
    want = stats.binom.logpmf(y.numpy(), 16, p).sum(1)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
    # the latent site: N(0, 1/lam) per coordinate
    got_z = site_log_prob(model, sim.data, sim.truth, "z")
    np.testing.assert_allclose(got_z.numpy(), stats.norm.logpdf(z.numpy()).sum(1), rtol=1e-12)
    with pytest.raises(ValueError, match=r"valid sites: \['y', 'z'\]"):
        site_log_prob(model, sim.data, sim.truth, "W")


def test_log_mean_exp_is_stable():
    x = torch.tensor([1000.0, 1000.0 + np.log(3.0)], dtype=F64)
    assert float(log_mean_exp(x)) == pytest.approx(1000.0 + np.log(2.0), rel=1e-15)


def test_subspace_angle_ignores_rotation():
    W = torch.randn(6, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    R = torch.linalg.qr(torch.randn(2, 2, dtype=F64, generator=torch.Generator().manual_seed(1))).Q
    assert subspace_angle(W @ R, W) < 1e-7


def test_classifier_matches_sklearn():
    from sklearn.linear_model import LogisticRegression

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(120, 3, dtype=F64, generator=gen) * torch.tensor([1.0, 5.0, 0.2], dtype=F64)
    logits = x @ torch.tensor([[1.0, 0.2, 0.0], [-1.0, 0.1, 2.0], [0.0, -0.3, -3.0]], dtype=F64).T
    labels = logits.argmax(1)
    noise = torch.rand(120, generator=gen) < 0.2  # 20% label noise: classes overlap
    labels = torch.where(noise, torch.randint(0, 3, (120,), generator=gen), labels)
    alpha = 1e-2
    clf = fit_classifier(x, labels, alpha=alpha)
    assert clf.converged
    xs = ((x - clf.mean) / clf.scale).numpy()
    ref = LogisticRegression(C=1 / (len(x) * alpha), tol=1e-12, max_iter=10_000).fit(xs, labels.numpy())
    ours = torch.softmax(clf.logits(x), 1).numpy()
    # Both solve the same strictly convex problem to gradient ~1e-9; probabilities agree to the
    # solvers' tolerances.
    np.testing.assert_allclose(ours, ref.predict_proba(xs), atol=1e-5)
    assert clf.accuracy(x, labels) == pytest.approx(ref.score(xs, labels.numpy()))


def test_pca_matches_sklearn():
    from sklearn.decomposition import PCA

    y = torch.randn(50, 6, dtype=F64, generator=torch.Generator().manual_seed(0)) @ torch.diag(
        torch.arange(1, 7, dtype=F64)
    )
    ours = fit_pca(y, 2).transform(y).numpy()
    ref = PCA(2).fit_transform(y.numpy())
    np.testing.assert_allclose(np.abs(ours), np.abs(ref), atol=1e-10)  # up to column signs
