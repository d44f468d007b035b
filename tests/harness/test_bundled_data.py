"""The bundled kernel-GLM tables equal scikit-learn's copies, standardised as documented."""

import numpy as np
import pytest

from deqppl.data import load_breast_cancer, load_diabetes, load_xy_table


def _standardised(a):
    return (a - a.mean(0)) / a.std(0)


@pytest.mark.parametrize("name", ["diabetes", "breast_cancer"])
def test_bundled_tables_equal_sklearn(name):
    from sklearn import datasets

    if name == "diabetes":
        raw, ds = datasets.load_diabetes(scaled=False), load_diabetes()
        y_want = _standardised(raw.target.astype(np.float64))
    else:
        raw, ds = datasets.load_breast_cancer(), load_breast_cancer()
        y_want = raw.target.astype(np.float64)
    np.testing.assert_allclose(ds.x.numpy(), _standardised(raw.data.astype(np.float64)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(ds.y.numpy(), y_want, rtol=0, atol=1e-12)
    assert ds.x_columns == tuple(str(c) for c in raw.feature_names)
    # the stored means and scales give back the raw values
    # (rounding of the round trip: entries exactly 0 come back as ~1e-17, hence the atol)
    np.testing.assert_allclose((ds.x * ds.x_scale + ds.x_mean).numpy(), raw.data, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ds.y.numpy() * ds.y_scale + ds.y_mean, raw.target, rtol=1e-12)


def test_xy_table_checks_columns(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("a,b,y\n1,5,0\n2,5,1\n3,5,1\n")
    ds = load_xy_table(path, y_column="y")
    assert ds.x_columns == ("a", "b") and ds.y.tolist() == [0.0, 1.0, 1.0]
    # a constant column is only centred (its scale stays 1)
    assert ds.x[:, 1].tolist() == [0.0, 0.0, 0.0] and float(ds.x_scale[1]) == 1.0
    with pytest.raises(ValueError, match=r"columns \['z'\] not in the header"):
        load_xy_table(path, y_column="z")
    with pytest.raises(ValueError, match="also an input column"):
        load_xy_table(path, y_column="y", x_columns=["a", "y"])
