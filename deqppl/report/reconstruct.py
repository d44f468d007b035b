r"""Reconstructions read from the model's own Pyro program: $E[y\mid\text{latents},\text{globals}]$.

Nothing here knows a model's formula: the program is conditioned on the globals and a method's
latents, traced, and the mean of each observed site's distribution is read from the trace. A new
model of the protocol (data names, local and global sites) is reconstructed with no edit here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pyro
import torch

__all__ = ["Reconstruction", "latent_matrix", "method_values", "observation_mean", "reconstruct"]


def latent_matrix(latents: object) -> np.ndarray:
    """One method's held-out latents as an ``(n, k)`` float64 array.

    ``latents`` is an ``(n, l)`` tensor, or a mapping latent site -> tensor whose leading
    dimension is the row (sites are flattened per row and concatenated in the mapping's order).

    Examples
    --------
    >>> latent_matrix({"z1": torch.zeros(4, 2), "z2": torch.ones(4, 3)}).shape
    (4, 5)
    """
    if isinstance(latents, Mapping):
        parts = [latent_matrix(v) for v in latents.values()]
        rows = {p.shape[0] for p in parts}
        if len(rows) != 1:
            raise ValueError(
                f"latent sites {list(latents)} have different numbers of rows {sorted(rows)}"
            )
        return np.concatenate(parts, axis=1)
    x = latents.detach().cpu().double().numpy() if isinstance(latents, torch.Tensor) else (
        np.asarray(latents, dtype=np.float64)
    )
    if x.ndim == 1:
        return x[:, None]
    return x.reshape(x.shape[0], -1)


def method_values(model: object, latents: object) -> dict[str, torch.Tensor]:
    """One method's held-out latents as a mapping latent site -> tensor.

    ``latents`` is that mapping already, or a tensor when the model has exactly one local site
    (``model.local_sites``).

    Raises
    ------
    ValueError
        A tensor for a model with several local sites, or a site the model does not declare.

    Examples
    --------
    >>> from deqppl.expfam import family
    >>> from deqppl.models import ExpFamPCA
    >>> model = ExpFamPCA(family=family("poisson"), obs_dim=4, latent_dim=2)
    >>> sorted(method_values(model, torch.zeros(3, 2)))
    ['z']
    """
    sites = tuple(getattr(model, "local_sites", ()))
    if isinstance(latents, Mapping):
        unknown = sorted(set(latents) - set(sites))
        if unknown:
            raise ValueError(f"latent sites {unknown} are not local sites of the model {list(sites)}")
        return dict(latents)
    if len(sites) != 1:
        raise ValueError(
            f"a latent tensor needs a model with one local site; this one has {list(sites)}: pass "
            "a mapping site -> tensor"
        )
    return {sites[0]: latents}


def observation_mean(
    model: object, data: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    r"""Mean of every observed site's distribution with the sites in ``values`` fixed.

    Runs ``poutine.trace(poutine.condition(model, data=values)).get_trace(**data)`` and returns
    ``fn.mean`` of each sample site that is observed and not in ``values``. The observed values
    are passed with the rest of the data because the distribution of an observed site does not
    depend on its value, and the model's own keyword arguments (its data names) then suffice to
    run it; no model-specific argument (a row count) is needed.

    Parameters
    ----------
    model
        A Pyro program called as ``model(**data)``.
    data
        Validated data (data name -> tensor).
    values
        Globals and latents, site -> tensor.

    Returns
    -------
    dict
        Observed site -> mean tensor (the shape of the observation).

    Raises
    ------
    ValueError
        If the traced program has no observed site left, or an observed site's distribution
        has no mean.

    Examples
    --------
    >>> from deqppl.expfam import family
    >>> from deqppl.models import ExpFamPCA
    >>> model = ExpFamPCA(family=family("poisson"), obs_dim=3, latent_dim=1)
    >>> y = torch.ones(2, 3, dtype=torch.float64)
    >>> values = {"W": torch.zeros(3, 1, dtype=torch.float64), "B": torch.zeros(3, dtype=torch.float64),
    ...           "z": torch.zeros(2, 1, dtype=torch.float64)}
    >>> observation_mean(model, {"y": y}, values)["y"]  # exp(0) = 1
    tensor([[1., 1., 1.],
            [1., 1., 1.]], dtype=torch.float64)
    """
    conditioned = pyro.poutine.condition(model, data=dict(values))
    with torch.no_grad():
        trace = pyro.poutine.trace(conditioned).get_trace(**data)
    means = {}
    for name, node in trace.nodes.items():
        if node["type"] != "sample" or not node["is_observed"] or name in values:
            continue
        try:
            means[name] = node["fn"].mean.detach()
        except NotImplementedError as err:
            raise ValueError(
                f"the observation site {name!r} has a distribution "
                f"({type(node['fn']).__name__}) without a mean"
            ) from err
    if not means:
        raise ValueError(
            f"the model has no observed site besides the conditioned {sorted(values)}; pass its "
            f"observations in data (got {sorted(data)})"
        )
    return means


@dataclass(frozen=True, kw_only=True, eq=False)
class Reconstruction:
    """Held-out observations and their means given each method's latents.

    Attributes
    ----------
    site
        The observation site (and data name) reconstructed.
    original
        ``(n, ...)`` observed held-out values of ``site``.
    means
        Method name -> mean of ``site`` given that method's latents and the shared globals.
    """

    site: str
    original: torch.Tensor
    means: dict[str, torch.Tensor]


def reconstruct(comparison) -> Reconstruction | None:
    """Each method's reconstruction of the held-out rows of ``comparison``, from the model.

    Conditions ``comparison.model`` on ``comparison.shared_globals`` and each method's
    held-out latents and reads the observation mean (:func:`observation_mean`); the
    reconstructed site is the first observed site that is also a data name.

    Returns
    -------
    Reconstruction or None
        None when the comparison does not carry its model, held-out data and shared globals,
        or when no method has finite latents (the report then names the failure instead).
    """
    model = getattr(comparison, "model", None)
    data = getattr(comparison, "heldout_data", None) or {}
    shared = getattr(comparison, "shared_globals", None) or {}
    if model is None or not data or not shared or not comparison.latents:
        return None
    means: dict[str, torch.Tensor] = {}
    site = None
    for name, latents in comparison.latents.items():
        if not bool(np.isfinite(latent_matrix(latents)).all()):
            continue  # a failed method has no reconstruction
        observed = observation_mean(model, data, {**shared, **method_values(model, latents)})
        if site is None:
            site = next((s for s in observed if s in data), None)
            if site is None:
                return None
        means[name] = observed[site]
    if site is None:
        return None
    return Reconstruction(site=site, original=data[site], means=means)
