r"""Reconstructions read from the model's own Pyro program: $E[y\mid\text{latents},\text{globals}]$.

Nothing here knows a model's formula: the program is conditioned on the globals and a method's
latents, traced, and the mean of each observed site's distribution is read from the trace. A new
model of the protocol (data names, local and global sites) is reconstructed with no edit here.
"""

from __future__ import annotations

from collections.abc import Mapping

import pyro
import torch

__all__ = ["method_values", "observation_mean"]


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
