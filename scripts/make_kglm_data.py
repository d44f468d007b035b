"""Write the kernel-GLM data sets bundled in ``deqppl/data`` from scikit-learn's copies.

Run once (needs scikit-learn, a test-only dependency; the package itself never imports it)::

    .venv/bin/python scripts/make_kglm_data.py

* ``diabetes.npz``: the 442 patients of Efron et al. (2004), ten baseline variables and a
  quantitative measure of disease progression one year later (``sklearn.datasets.load_diabetes``
  with ``scaled=False``). Gaussian regression target.
* ``breast_cancer.npz``: the 569 tumours of the Wisconsin diagnostic breast cancer data
  (``sklearn.datasets.load_breast_cancer``), 30 features; target 1 = benign, 0 = malignant.
  Bernoulli target.

Every x column is standardised to mean 0 and standard deviation 1 (population sd, ddof = 0),
so that one lengthscale fits all columns; the diabetes target is standardised likewise (the
Gaussian family has unit observation precision). The means and scales are stored next to the
data (``x_mean``, ``x_scale``, ``y_mean``, ``y_scale``) so that raw values can be recovered.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn import datasets

OUT = Path(__file__).resolve().parents[1] / "deqppl" / "data"


def _standardise(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean = a.mean(axis=0)
    scale = a.std(axis=0)
    return (a - mean) / scale, mean, scale


def main() -> None:
    d = datasets.load_diabetes(scaled=False)
    x, x_mean, x_scale = _standardise(d.data.astype(np.float64))
    y, y_mean, y_scale = _standardise(d.target.astype(np.float64))
    np.savez_compressed(
        OUT / "diabetes.npz",
        x=x, y=y, x_mean=x_mean, x_scale=x_scale, y_mean=np.float64(y_mean),
        y_scale=np.float64(y_scale), x_columns=np.array(d.feature_names), y_column=np.array("progression"),
    )
    b = datasets.load_breast_cancer()
    x, x_mean, x_scale = _standardise(b.data.astype(np.float64))
    np.savez_compressed(
        OUT / "breast_cancer.npz",
        x=x, y=b.target.astype(np.float64), x_mean=x_mean, x_scale=x_scale,
        y_mean=np.float64(0.0), y_scale=np.float64(1.0),
        x_columns=np.array([str(c) for c in b.feature_names]), y_column=np.array("benign"),
    )


if __name__ == "__main__":
    main()
