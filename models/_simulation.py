"""Simulated data with known truth, shared by every zoo model."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from pyro import poutine

__all__ = ["Simulation", "simulate_from"]


@dataclass(frozen=True)
class Simulation:
    """Data drawn from a zoo model together with the values that generated it.

    Attributes
    ----------
    data
        Keyword arguments of the model's Pyro program, e.g. ``{"y": (N, d) tensor}``; pass them
        to ``fit_map(model, sim.data)``.
    truth
        Every latent site's simulated value, keyed by site name.
    """

    data: dict[str, torch.Tensor]
    truth: dict[str, torch.Tensor]


def simulate_from(
    model: Callable[..., object],
    *,
    num_data: int,
    seed: int,
    data_names: tuple[str, ...],
    latent_names: tuple[str, ...],
    fixed: Mapping[str, Callable[[], torch.Tensor]] | None = None,
    dtype: torch.dtype | None = None,
) -> Simulation:
    """Run ``model`` forward with ``y=None`` and split its trace into data and truth.

    Seeding uses ``torch.random.fork_rng``: the global torch RNG is seeded inside the context
    and restored on exit, so simulating never changes the caller's random stream (Pyro samples
    from torch's global generator, so a private ``torch.Generator`` cannot reach its sites).

    Parameters
    ----------
    model
        A zoo model's Pyro program.
    num_data
        Number of rows $N$.
    seed
        Seed of the draw.
    data_names, latent_names
        Sites returned as data and as truth.
    fixed
        Site name -> thunk drawing a value (inside the seeded context) for sites the model
        cannot sample itself, e.g. parameters with an improper flat prior.
    dtype
        Floating dtype of the returned tensors (default: torch's default dtype); the draw
        itself happens in torch's default dtype.
    """
    if int(num_data) != num_data or num_data < 1:
        raise ValueError(f"num_data must be a positive integer, got {num_data!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        values = {name: draw() for name, draw in (fixed or {}).items()}
        trace = poutine.trace(poutine.condition(model, values)).get_trace(num_data=int(num_data))
    dtype = dtype or torch.get_default_dtype()
    data = {name: trace.nodes[name]["value"].detach().to(dtype) for name in data_names}
    truth = {name: trace.nodes[name]["value"].detach().to(dtype) for name in latent_names}
    return Simulation(data=data, truth=truth)
