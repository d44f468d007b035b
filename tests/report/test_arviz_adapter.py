"""The ArviZ adapter: InferenceData from torch draws, LOO, compare, netCDF round trip."""

import importlib.util

import numpy as np
import pytest
import torch

from deqppl.report import arviz_adapter as adapter

F64 = torch.float64


def _idata(shift=0.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(30, 12, 2, dtype=F64, generator=gen)
    ll = -2.0 + shift - 0.1 * z.pow(2).sum(-1)
    return adapter.to_inference_data(
        {"z": z}, {"y": ll}, dims={"z": ["obs", "latent"], "y": ["obs"]}, attrs={"model": "m"}
    ), z, ll


def test_groups_and_shapes():
    idata, z, ll = _idata()
    assert idata.posterior["z"].shape == (1, 30, 12, 2)
    np.testing.assert_array_equal(idata.log_likelihood["y"].values[0], ll.numpy())
    with pytest.raises(ValueError, match="same number of draws"):
        adapter.to_inference_data({"z": z}, {"y": ll[:5]})


def test_loo_matches_direct_psis_free_bound():
    idata, _, ll = _idata()
    elpd = adapter.loo(idata)
    assert elpd["n_data_points"] == 12 and elpd["n_samples"] == 30
    # LOO never exceeds the in-sample log mean exp (the weights down-weight high-likelihood draws)
    lme = float((torch.logsumexp(ll, 0) - np.log(30)).sum())
    assert float(elpd["elpd_loo"]) <= lme + 1e-9


def test_compare_ranks_better_model_first():
    a, _, _ = _idata(0.0, seed=0)
    b, _, _ = _idata(1.0, seed=1)
    ranking = adapter.compare({"a": a, "b": b})
    assert list(ranking.index) == ["b", "a"]
    with pytest.raises(ValueError, match="valid: loo, waic"):
        adapter.compare({"a": a, "b": b}, ic="bic")


@pytest.mark.skipif(
    importlib.util.find_spec("h5netcdf") is None and importlib.util.find_spec("netCDF4") is None,
    reason="no netCDF engine (h5netcdf or netCDF4) installed",
)
def test_netcdf_round_trip(tmp_path):
    idata, z, ll = _idata()
    path = adapter.save_netcdf(idata, tmp_path / "run.nc")
    back = adapter.load_netcdf(path)
    np.testing.assert_array_equal(back.posterior["z"].values, idata.posterior["z"].values)
    np.testing.assert_array_equal(back.log_likelihood["y"].values, idata.log_likelihood["y"].values)
    assert back.posterior.attrs["model"] == "m"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        adapter.load_netcdf(tmp_path / "missing.nc")
