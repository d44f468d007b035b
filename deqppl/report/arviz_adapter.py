"""The one place deqppl calls ArviZ: InferenceData from torch draws, LOO, comparison, netCDF.

ArviZ 0.23 warns at import time about its coming 1.0 refactor (a ``FutureWarning``), and its
``compare`` calls ``DataFrame.sort_values(inplace=True)``, deprecated by pandas 3
(``Pandas4Warning``). Neither concerns deqppl's use, so both are silenced here, only around the
ArviZ calls that raise them.

Examples
--------
>>> import torch
>>> draws = {"z": torch.zeros(4, 3, 2)}
>>> loglik = {"y": torch.full((4, 3), -1.0)}
>>> idata = to_inference_data(draws, loglik, dims={"z": ["obs", "latent"], "y": ["obs"]})
>>> sorted(idata.groups()), dict(idata.posterior.sizes)["draw"]
(['log_likelihood', 'posterior'], 4)
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from collections.abc import Mapping, Sequence

import pandas as pd
import torch

__all__ = ["compare", "load_netcdf", "loo", "save_netcdf", "to_inference_data"]

#: netCDF engines ArviZ can write with, in order of preference.
NETCDF_ENGINES = ("h5netcdf", "netcdf4")
_ENGINE_MODULES = {"h5netcdf": "h5netcdf", "netcdf4": "netCDF4"}


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"arviz(\.|$)")
        warnings.filterwarnings("ignore", message=r"The inplace keyword", category=Warning)
        yield


def _arviz():
    with _quiet():
        import arviz

    return arviz


def _numpy(t: object):
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().numpy()
    return t


def to_inference_data(
    posterior: Mapping[str, torch.Tensor],
    log_likelihood: Mapping[str, torch.Tensor],
    *,
    dims: Mapping[str, Sequence[str]] | None = None,
    coords: Mapping[str, Sequence] | None = None,
    attrs: Mapping[str, object] | None = None,
):
    """An ArviZ ``InferenceData`` with ``posterior`` and ``log_likelihood`` groups (one chain).

    Parameters
    ----------
    posterior
        Variable name -> draws ``(num_draws, *shape)``.
    log_likelihood
        Observed-site name -> pointwise log-likelihood draws ``(num_draws, *obs_shape)``.
    dims, coords
        ArviZ dimension names per variable (without chain/draw) and their coordinates.
    attrs
        Attributes stored on the groups (numbers and strings).

    Raises
    ------
    ValueError
        If the variables disagree on the number of draws.
    """
    groups = {"posterior": posterior, "log_likelihood": log_likelihood}
    sizes = {f"{g}.{k}": int(v.shape[0]) for g, vs in groups.items() for k, v in vs.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"every variable needs the same number of draws (dim 0), got {sizes}")
    az = _arviz()
    with _quiet():
        idata = az.from_dict(
            posterior={k: _numpy(v)[None] for k, v in posterior.items()},
            log_likelihood={k: _numpy(v)[None] for k, v in log_likelihood.items()},
            dims={k: list(v) for k, v in (dims or {}).items()},
            coords={k: list(v) for k, v in (coords or {}).items()},
        )
    for group in idata.groups():  # from_dict's attrs= does not reach the groups in 0.23
        idata[group].attrs.update(dict(attrs or {}))
    return idata


def loo(idata, *, pointwise: bool = True):
    """PSIS-LOO of ``idata`` (``arviz.loo``): an ``ELPDData`` with ``elpd_loo``, ``se``, ``p_loo``.

    ArviZ's warning about large Pareto $\\hat k$ is not raised: the same information is in the
    result's ``warning`` flag and ``pareto_k`` values (with ``pointwise=True``).
    """
    az = _arviz()
    with _quiet(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Estimated shape parameter of Pareto", category=UserWarning)
        return az.loo(idata, pointwise=pointwise)


def compare(idata: Mapping[str, object], *, ic: str = "loo") -> pd.DataFrame:
    """Rank models by expected log predictive density (``arviz.compare``), best first.

    Raises
    ------
    ValueError
        If ``ic`` is not ``"loo"`` or ``"waic"``, or fewer than two models are given.
    """
    if ic not in ("loo", "waic"):
        raise ValueError(f"unknown information criterion {ic!r}; valid: loo, waic")
    if len(idata) < 2:
        raise ValueError(f"compare needs at least two models, got {list(idata)}")
    az = _arviz()
    with _quiet(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Estimated shape parameter of Pareto", category=UserWarning)
        warnings.filterwarnings("ignore", message=r"For one or more samples the posterior variance", category=UserWarning)
        return az.compare(dict(idata), ic=ic)


def _engine() -> str:
    for engine in NETCDF_ENGINES:
        if importlib.util.find_spec(_ENGINE_MODULES[engine]) is not None:
            return engine
    raise ImportError(
        f"writing netCDF needs one of the packages {[_ENGINE_MODULES[e] for e in NETCDF_ENGINES]}; "
        f"install h5netcdf (pip install h5netcdf)"
    )


def save_netcdf(idata, path: str | os.PathLike) -> str:
    """Write ``idata`` to a netCDF file with the first available engine; returns the path."""
    with _quiet():
        return idata.to_netcdf(os.fspath(path), engine=_engine())


def load_netcdf(path: str | os.PathLike):
    """Read an ``InferenceData`` written by :func:`save_netcdf`.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"netCDF file {os.fspath(path)!r} does not exist")
    az = _arviz()
    with _quiet():
        idata = az.from_netcdf(os.fspath(path), engine=_engine())
        idata.load()  # read everything now, so the file is not held open
    return idata
