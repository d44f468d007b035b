"""The log joint of a Pyro model, derived from its trace (never re-typed)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from pyro import poutine

__all__ = ["log_joint", "latent_sites"]


def latent_sites(trace: poutine.Trace) -> list[str]:
    """Names of the unobserved sample sites of ``trace`` (subsample sites excluded)."""
    return [
        name
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not site["infer"].get("_do_not_trace")
        and type(site["fn"]).__name__ != "_Subsample"
    ]


def log_joint(
    model: Callable[..., object],
    data: Mapping[str, torch.Tensor],
    values: Mapping[str, torch.Tensor],
    *,
    per_datum: bool = False,
    data_scale: float = 1.0,
    plate_name: str = "data",
    prior_scale: float = 1.0,
) -> torch.Tensor:
    r"""$\log p(\text{data}, \text{values})$ of ``model``, from its Pyro trace.

    Computes ``poutine.trace(poutine.condition(model, values)).get_trace(**data).log_prob_sum()``;
    every latent site must be given in ``values``.

    Parameters
    ----------
    model
        A Pyro program taking ``data`` as keyword arguments.
    data
        Keyword arguments of the program (observations, covariates).
    values
        Site name -> value for every latent site.
    per_datum
        If true, return the ``(N,)`` per-row contributions of the sites inside the plate
        ``plate_name`` (local latents and observations) instead of the total. The total log
        joint is their sum plus the log prior of the global sites.
    data_scale
        Multiplies the terms of the sites inside the plate ``plate_name`` in the total: with
        ``N / n`` for a minibatch of ``n`` of ``N`` rows the total is an unbiased estimate of
        the full-data log joint (one trace, as SVI's subsampled plates do).
    plate_name
        The plate over data rows (a model's ``plate_name``, see :mod:`deqppl.protocols`).
    prior_scale
        Multiplies the terms of the sites outside the plate (the prior of the globals) in the
        total; ``0`` leaves them out (exactly, also where they are infinite). A data-parallel
        fit counts the prior on one rank and the rows of each shard on their rank
        (:mod:`deqppl.distributed`).

    Returns
    -------
    Tensor
        A scalar, or ``(N,)`` when ``per_datum``; differentiable in ``values``.

    Raises
    ------
    ValueError
        If a latent site is missing from ``values`` (it would otherwise be sampled silently).

    Examples
    --------
    >>> import pyro, pyro.distributions as dist, torch
    >>> def model(y):
    ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    ...     with pyro.plate("data", len(y)):
    ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
    >>> y = torch.tensor([0.0, 1.0])
    >>> log_joint(model, {"y": y}, {"mu": torch.tensor(0.0)})
    tensor(-3.2568)
    >>> log_joint(model, {"y": y}, {"mu": torch.tensor(0.0)}, per_datum=True)
    tensor([-0.9189, -1.4189])
    >>> log_joint(model, {"y": y}, {"mu": torch.tensor(0.0)}, prior_scale=0.0)  # the rows only
    tensor(-2.3379)
    """
    trace = poutine.trace(poutine.condition(model, data=dict(values))).get_trace(**data)
    missing = latent_sites(trace)
    if missing:
        raise ValueError(
            f"values must give every latent site; missing {missing} (given {sorted(values)})"
        )
    if not per_datum and data_scale == 1.0 and prior_scale == 1.0:
        return trace.log_prob_sum()
    trace.compute_log_prob()
    total = None
    outside = 0.0
    for site in trace.nodes.values():
        if site["type"] != "sample":
            continue
        frames = [f for f in site["cond_indep_stack"] if f.name == plate_name]
        if not frames:
            outside = outside + site["log_prob_sum"]
            continue
        lp = site["log_prob"]
        rows = lp.movedim(frames[0].dim, 0)
        rows = rows.reshape(rows.shape[0], -1).sum(1)
        total = rows if total is None else total + rows
    if total is None:
        raise ValueError(
            f"per_datum=True or data_scale needs a plate named {plate_name!r} in the model; "
            f"a model whose locals are coupled (no data plate) has only a total log joint"
        )
    if per_datum:
        return total
    rows_sum = data_scale * total.sum()
    if prior_scale == 0.0:
        return rows_sum
    return (outside if prior_scale == 1.0 else prior_scale * outside) + rows_sum
