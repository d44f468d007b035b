"""Real comparisons on small data for the report tests (session-scoped: each runs once).

* ``digits_comparison``: DEQ vs SVI vs L-BFGS on 120 of the built-in digits as Binomial(16) PCA
  with 3 latent dimensions and labels (images, latent space by label, PCA projection).
* ``poisson_comparison``: simulated Poisson PCA, 5 coordinates, 2 latent dimensions, no labels
  (profile reconstructions, no latent-space figure).
* ``digits_models``: Gaussian vs Poisson vs Binomial(16) PCA with 1 and 2 latent dimensions.

Budgets are small so that the fits stop at their step limits: the reports must then say so.
"""

from __future__ import annotations

import pytest
import torch

from deqppl.data import load_digits
from deqppl.expfam import binomial, family
from deqppl.optim import LBFGS, SVI
from deqppl.harness import DEQMethod, LBFGSMethod, SVIMethod, compare, compare_models
from deqppl.models import ExpFamPCA

NUM_DIGITS = 120
NUM_HELDOUT = 24


def _digits_split():
    digits = load_digits()
    rows = torch.randperm(len(digits), generator=torch.Generator().manual_seed(0))[:NUM_DIGITS]
    held, train = rows[:NUM_HELDOUT], rows[NUM_HELDOUT:]
    return digits, train, held


@pytest.fixture(scope="session")
def digits_comparison():
    digits, train, held = _digits_split()
    model = ExpFamPCA(family=binomial(16), obs_dim=64, latent_dim=3)
    return compare(
        model,
        {"y": digits.y[train]},
        heldout={"y": digits.y[held]},
        labels=digits.labels[train],
        heldout_labels=digits.labels[held],
        methods=[DEQMethod(optimizer=LBFGS(max_steps=20)), SVIMethod(optimizer=SVI(max_steps=200)), LBFGSMethod(optimizer=LBFGS(max_steps=100))],
        progress=False,
    )


@pytest.fixture(scope="session")
def poisson_comparison():
    model = ExpFamPCA(family=family("poisson"), obs_dim=5, latent_dim=2)
    y = model.simulate(40, seed=0, dtype=torch.float64).data["y"]
    methods = [DEQMethod(optimizer=LBFGS(max_steps=20)), SVIMethod(optimizer=SVI(max_steps=300)), LBFGSMethod(optimizer=LBFGS(max_steps=100))]
    return compare(model, {"y": y}, methods=methods, progress=False)


@pytest.fixture(scope="session")
def digits_models():
    digits, train, held = _digits_split()
    y = digits.y.double()
    models = {
        f"{name}_l{l}": ExpFamPCA(family=fam, obs_dim=64, latent_dim=l)
        for name, fam in (("gaussian", family("gaussian")), ("poisson", family("poisson")),
                          ("binomial16", binomial(16)))
        for l in (1, 2)
    }
    return compare_models(
        models, {"y": y[train[:60]]}, {"y": y[held]}, num_draws=20, method=LBFGSMethod(optimizer=LBFGS(max_steps=50)), progress=False
    )


@pytest.fixture(scope="session")
def digits_report(digits_comparison, digits_models, tmp_path_factory):
    """Paths of the report of ``digits_comparison`` with ``digits_models`` (in a tmp folder)."""
    from deqppl.report import write_report

    out = tmp_path_factory.mktemp("digits-report")
    return write_report(
        digits_comparison, out, model_comparison=digits_models, title="Tiny <test> & report"
    )
