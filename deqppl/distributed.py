"""Sums over the ranks of a ``torch.distributed`` process group — the one seam of data parallelism.

Every data-parallel fit in deqppl is the single-process fit with its sums over rows replaced by
sums over the rows of *all* ranks: each rank holds a shard of the rows (and their latents), computes
its partial sums (a loss, a gradient, the sufficient statistics of a Newton step) and
:func:`all_reduce_sum` adds them up. Without an initialised process group every function here is
the identity of the single-process case, so library code calls them unconditionally and
single-process behaviour is unchanged.

Examples
--------
>>> import torch
>>> from deqppl import distributed
>>> distributed.world_size(), distributed.rank()
(1, 0)
>>> distributed.all_reduce_sum(torch.tensor([1.0, 2.0]))
tensor([1., 2.])
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_reduce_sum", "is_active", "rank", "world_size"]


def is_active() -> bool:
    """Whether a ``torch.distributed`` process group is initialised in this process.

    Examples
    --------
    >>> from deqppl.distributed import is_active
    >>> is_active()
    False
    """
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """The number of ranks of the default process group (1 without one).

    Examples
    --------
    >>> from deqppl.distributed import world_size
    >>> world_size()
    1
    """
    return dist.get_world_size() if is_active() else 1


def rank() -> int:
    """This process's rank in the default process group (0 without one).

    Examples
    --------
    >>> from deqppl.distributed import rank
    >>> rank()
    0
    """
    return dist.get_rank() if is_active() else 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over all ranks, as a new tensor (``tensor`` itself is not modified).

    Parameters
    ----------
    tensor
        This rank's partial sum. Every rank must pass the same shape and dtype.

    Returns
    -------
    torch.Tensor
        The sum over ranks; a detached copy of ``tensor`` without a process group.

    Examples
    --------
    >>> import torch
    >>> from deqppl.distributed import all_reduce_sum
    >>> all_reduce_sum(torch.ones(2, dtype=torch.float64))
    tensor([1., 1.], dtype=torch.float64)
    """
    out = tensor.detach().clone()
    if is_active() and world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out
