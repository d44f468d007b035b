"""Per-datum quantities of a comparison, all derived from the Pyro model's trace.

Examples
--------
>>> import torch
>>> from deqppl.expfam import family
>>> from deqppl.models import ExpFamPCA
>>> model = ExpFamPCA(family=family("poisson"), obs_dim=3, latent_dim=1)
>>> sim = model.simulate(4, seed=0, dtype=torch.float64)
>>> site_log_prob(model, sim.data, sim.truth, "y").shape
torch.Size([4])
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from pyro import poutine

from deqppl.inference import latent_sites, principal_angles

__all__ = ["log_mean_exp", "max_abs_dz", "site_log_prob", "subspace_angle"]


def site_log_prob(
    model, data: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor], site: str
) -> torch.Tensor:
    r"""Per-row log density ``(N,)`` of one sample site inside the plate ``"data"``.

    Taken from the trace of ``poutine.condition(model, values)``; for the observation site
    ``"y"`` of a PCA-type model this is $\log p(y_s \mid z_s, W, B)$.

    Raises
    ------
    ValueError
        If a latent site is missing from ``values``, or ``site`` is not a sample site in the
        plate ``"data"`` (the valid ones are listed).
    """
    with torch.no_grad():
        trace = poutine.trace(poutine.condition(model, data=dict(values))).get_trace(**data)
    missing = latent_sites(trace)
    if missing:
        raise ValueError(f"values must give every latent site; missing {missing}")
    in_plate = {
        name: node
        for name, node in trace.nodes.items()
        if node["type"] == "sample" and any(f.name == "data" for f in node["cond_indep_stack"])
    }
    if site not in in_plate:
        raise ValueError(
            f"site {site!r} is not a sample site in the plate 'data'; valid sites: {sorted(in_plate)}"
        )
    node = in_plate[site]
    frame = next(f for f in node["cond_indep_stack"] if f.name == "data")
    with torch.no_grad():
        lp = node["fn"].log_prob(node["value"])
    rows = lp.movedim(frame.dim, 0)
    return rows.reshape(rows.shape[0], -1).sum(1).detach()


def max_abs_dz(z: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest absolute entry of ``z - reference`` (both ``(n, l)``).

    Examples
    --------
    >>> max_abs_dz(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.5, 2.0]]))
    0.5
    """
    if z.shape != reference.shape:
        raise ValueError(f"latents have shape {tuple(z.shape)}, reference {tuple(reference.shape)}")
    if z.numel() == 0:
        return 0.0
    return float((z - reference).abs().max())


def subspace_angle(W: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest principal angle (radians) between the column spaces of two loadings ``(d, l)``.

    Invariant to the rotation of the latent space that leaves a PCA joint MAP undetermined.

    Examples
    --------
    >>> W = torch.tensor([[1.0], [0.0]])
    >>> round(subspace_angle(W, torch.tensor([[1.0], [1.0]])), 4)
    0.7854
    """
    return float(principal_angles(W, reference).max())


def log_mean_exp(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    r"""$\log\frac1S\sum_s e^{x_s}$ along ``dim``, computed stably.

    Examples
    --------
    >>> log_mean_exp(torch.log(torch.tensor([1.0, 3.0])))
    tensor(0.6931)
    """
    size = x.shape[dim]
    return torch.logsumexp(x, dim=dim) - torch.log(torch.tensor(float(size), dtype=x.dtype))
