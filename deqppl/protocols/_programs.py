r"""Small building blocks for writing Pyro programs of the protocol (used by the zoo)."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.distributions import constraints

__all__ = ["num_rows", "param_prior"]


def num_rows(observed: torch.Tensor | None, num_data: int | None) -> int:
    """Number of data rows of a program call: ``observed``'s first dimension, or ``num_data``.

    A program of the protocol samples its observations when they are ``None`` and then needs
    ``num_data``; when both are given they must agree.

    Raises
    ------
    ValueError
        If both are missing, or they disagree.

    Examples
    --------
    >>> import torch
    >>> num_rows(torch.zeros(3, 2), None), num_rows(None, 5)
    (3, 5)
    """
    if observed is None:
        if num_data is None:
            raise ValueError("pass num_data when the observations are None (the model then samples them)")
        return int(num_data)
    if num_data is not None and int(num_data) != observed.shape[0]:
        raise ValueError(
            f"num_data={num_data} disagrees with the observations, which have {observed.shape[0]} rows"
        )
    return int(observed.shape[0])


def param_prior(scale: float | None, shape: tuple[int, ...], *, dtype: torch.dtype) -> dist.Distribution:
    r"""Prior of a block of parameters: iid $\mathcal N(0, s^2)$ entries, or flat if ``scale`` is None.

    The block is one event of shape ``shape`` (``to_event``), so it sits outside any data plate.
    The flat prior is :class:`pyro.distributions.ImproperUniform` on the real line: its log
    density is 0 and it cannot be sampled (simulate such blocks through ``fixed``).

    Examples
    --------
    >>> import torch
    >>> param_prior(2.0, (3, 2), dtype=torch.float64).event_shape
    torch.Size([3, 2])
    >>> float(param_prior(None, (3,), dtype=torch.float64).log_prob(torch.ones(3)))
    0.0
    """
    if scale is None:
        return dist.ImproperUniform(constraints.real, (), shape)
    zero = torch.zeros((), dtype=dtype)
    return dist.Normal(zero, scale).expand(shape).to_event(len(shape))
