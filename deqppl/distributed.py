"""Sums over the ranks of a ``torch.distributed`` process group — the one seam of data parallelism.

Every data-parallel fit in deqppl is the single-process fit with its sums over rows replaced by
sums over the rows of *all* ranks: each rank holds a shard of the rows (and their latents), computes
its partial sums (a loss, a gradient, the sufficient statistics of a Newton step) and
:func:`all_reduce_sum` adds them up. Without an initialised process group every function here is
the identity of the single-process case, so library code calls them unconditionally and
single-process behaviour is unchanged.

Besides the sum, this module holds what makes a data-parallel fit safe to launch:

* :class:`Shard` (the rows a rank holds) and :class:`ShardLayout` (every rank's shard, checked to
  tile the rows exactly once: the map from a global minibatch to this rank's rows);
* *fail together*: every collective of a fit first sums a vector of per-rank failure flags, so a
  rank that raises (a bad shard, a failed solve, any exception) makes every rank raise
  :class:`RankFailedError` naming it at the next collective, instead of the others waiting for it
  forever (:func:`fails_together`, :func:`checked_all_reduce_sum`);
* agreement checks (:func:`check_agreement`): ranks whose settings or data schema differ raise
  :class:`DisagreementError` before any work;
* :func:`init_process_group`: the process group of a ``torchrun`` launch with a timeout (gloo on
  CPU, NCCL on CUDA), so that a rank that dies without a word stops the others after ``timeout``.

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

import datetime
import functools
import hashlib
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "DisagreementError",
    "RankFailedError",
    "Shard",
    "ShardLayout",
    "all_reduce_max",
    "all_reduce_sum",
    "check_agreement",
    "checked_all_reduce_sum",
    "describe",
    "fails_together",
    "fingerprint",
    "init_process_group",
    "is_active",
    "rank",
    "world_size",
]

#: Default timeout of :func:`init_process_group` in seconds: how long a rank waits for a peer
#: that stopped answering (dead or hung) before raising. Ten minutes covers the slowest local step
#: of a fit measured here (a full-batch solve of 1e6 rows takes seconds) by two orders of magnitude.
DEFAULT_TIMEOUT_S = 600.0

_T = TypeVar("_T")


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


def _parallel() -> bool:
    return is_active() and world_size() > 1


def _comm_device(tensor: torch.Tensor | None = None) -> torch.device:
    # NCCL reduces CUDA tensors only; gloo takes CPU tensors (and CUDA ones by staging).
    if dist.get_backend() == "nccl":
        return tensor.device if tensor is not None and tensor.is_cuda else torch.device("cuda", torch.cuda.current_device())
    return tensor.device if tensor is not None else torch.device("cpu")


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
    if _parallel():
        _all_reduce(out, dist.ReduceOp.SUM)
    return out


def _all_reduce(out: torch.Tensor, op) -> None:
    # NCCL reduces CUDA tensors only: stage a CPU tensor through this rank's GPU (gloo reduces
    # CPU and CUDA tensors in place).
    device = _comm_device(out)
    if out.device == device:
        dist.all_reduce(out, op=op)
    else:
        staged = out.to(device)
        dist.all_reduce(staged, op=op)
        out.copy_(staged)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise maximum of ``tensor`` over all ranks, as a new tensor.

    For stopping rules on a maximum over all coordinates (e.g. $\\max|g|$ over every rank's
    latents), the one reduction of a fit that is not a sum.

    Examples
    --------
    >>> import torch
    >>> from deqppl.distributed import all_reduce_max
    >>> all_reduce_max(torch.tensor([3.0, -1.0]))
    tensor([ 3., -1.])
    """
    out = tensor.detach().clone()
    if _parallel():
        _all_reduce(out, dist.ReduceOp.MAX)
    return out


# --------------------------------------------------------------------------------------------
# Failing together
# --------------------------------------------------------------------------------------------
class RankFailedError(RuntimeError):
    """A rank of a data-parallel fit raised; raised on *every* rank, naming the ranks that failed.

    Attributes
    ----------
    ranks
        The ranks that raised.
    messages
        Rank -> ``"ExceptionType: message"`` of the exception it raised.
    """

    def __init__(self, ranks: Sequence[int], messages: Mapping[int, str], *, where: str) -> None:
        self.ranks = tuple(ranks)
        self.messages = dict(messages)
        if not self.ranks:
            super().__init__(where)
            return
        detail = "; ".join(f"rank {r}: {self.messages.get(r, '(no message)')}" for r in self.ranks)
        which = ", ".join(str(r) for r in self.ranks)
        super().__init__(
            f"{where}: rank{'s' if len(self.ranks) > 1 else ''} {which} of {world_size()} failed, so "
            f"every rank stops here ({detail})"
        )


class DisagreementError(ValueError):
    """Ranks of a data-parallel fit disagree on their settings, data schema or shards.

    Raised on every rank by the same collective decision, before any work.
    """


def _flag_round(failed: BaseException | None, where: str, *, context: str = "") -> None:
    """Sum every rank's failure flag; if any is set, raise :class:`RankFailedError` on all ranks."""
    flags = torch.zeros(world_size(), dtype=torch.float64, device=_comm_device())
    if failed is not None:
        flags[rank()] = 1.0
    try:
        dist.all_reduce(flags, op=dist.ReduceOp.SUM)
    except Exception as err:  # a peer died or timed out: nobody is left to tell
        raise RankFailedError(
            [], {}, where=f"{where}: lost contact with the other ranks ({type(err).__name__}: {err})"
        ) from (failed or err)
    ranks = [r for r in range(world_size()) if float(flags[r]) > 0]
    if not ranks:
        return
    mine = None if failed is None else f"{type(failed).__name__}: {failed}{context}"
    messages: list[str | None] = [None] * world_size()
    dist.all_gather_object(messages, mine)
    raise RankFailedError(ranks, {r: messages[r] for r in ranks}, where=where) from failed


def checked_all_reduce_sum(
    compute: Callable[[], torch.Tensor], *, like: torch.Tensor, where: str = "data-parallel fit"
) -> torch.Tensor:
    """``all_reduce_sum(compute())``, where an exception of ``compute`` on any rank stops all ranks.

    Every rank calls it at the same point of the fit. A rank whose ``compute`` raises takes part
    in the collective with a failure flag, and then every rank raises :class:`RankFailedError`
    naming it: no rank is left waiting for a partial sum that never comes. Without a process
    group (or with one rank) this is ``compute()`` and exceptions propagate unchanged.

    Parameters
    ----------
    compute
        Returns this rank's partial sum, the shape and dtype of ``like``.
    like
        A tensor of the shape, dtype and device every rank's partial sum has (used by a
        failing rank).
    where
        Names the step in the error.

    Returns
    -------
    torch.Tensor
        The sum over ranks (a detached tensor).

    Examples
    --------
    >>> import torch
    >>> from deqppl.distributed import checked_all_reduce_sum
    >>> checked_all_reduce_sum(lambda: torch.tensor([2.0]), like=torch.zeros(1))
    tensor([2.])
    """
    if not _parallel():
        return compute().detach()
    failed = None
    try:
        part = compute()
    except Exception as exc:
        failed, part = exc, torch.zeros_like(like)
    _flag_round(failed, where)
    return all_reduce_sum(part)


def _checked_gather(obj: object, where: str) -> list[object]:
    _flag_round(None, where)
    out: list[object] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def fails_together(fn: Callable[..., _T] | None = None, *, agreed: tuple[type[BaseException], ...] = ()):
    """Decorate a fit so that, run data-parallel (keyword ``shard`` given), its ranks fail together.

    An exception on one rank (bad data on its shard, a solve that raises, ...) is announced to
    the others at their next collective, and every rank raises :class:`RankFailedError` naming
    the failing rank(s). On success all ranks leave the call together (a final flag round), so
    no rank can fail later inside the call while the others have moved on. Without ``shard``
    or a process group of more than one rank the call is unchanged.

    ``agreed`` lists exception types that every rank raises at the same point by the same
    decision on summed values (e.g. :class:`~deqppl.optim.FitConvergenceError` of
    ``throw=True``); they propagate as they are, like :class:`RankFailedError` and
    :class:`DisagreementError`. Use as ``@fails_together`` or ``@fails_together(agreed=...)``.

    Examples
    --------
    >>> from deqppl.distributed import fails_together
    >>> @fails_together
    ... def fit(x, *, shard=None):
    ...     return 2 * x
    >>> fit(3)
    6
    """

    if fn is None:
        return functools.partial(fails_together, agreed=agreed)
    passthrough = (RankFailedError, DisagreementError, *agreed)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if kwargs.get("shard") is None or not _parallel():
            return fn(*args, **kwargs)
        where = fn.__name__
        try:
            out = fn(*args, **kwargs)
        except passthrough:
            raise  # every rank raises these at the same point
        except Exception as exc:
            shard = kwargs["shard"]
            context = (
                f" [rank {rank()} holds rows {shard.start}..{shard.stop - 1} of {shard.num_total}]"
                if isinstance(shard, Shard) else ""
            )
            _flag_round(exc, where, context=context)
            raise  # unreachable: the flag round raises RankFailedError
        _flag_round(None, where)
        return out

    return wrapper


# --------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    """The rows ``[start, start + num_rows)`` of ``num_total`` that this rank holds.

    Parameters
    ----------
    start
        The global index of this rank's first row.
    num_rows
        Rows held here, $\\ge 1$.
    num_total
        Rows over all ranks.

    Examples
    --------
    >>> from deqppl.distributed import Shard
    >>> Shard.even(10, rank=1, world_size=3)
    Shard(start=4, num_rows=3, num_total=10)
    >>> Shard(start=8, num_rows=3, num_total=10)
    Traceback (most recent call last):
    ...
    ValueError: Shard(start=8, num_rows=3) ends at row 11, past num_total=10
    """

    start: int
    num_rows: int
    num_total: int

    def __post_init__(self) -> None:
        for name in ("start", "num_rows", "num_total"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"Shard.{name} must be an integer, got {value!r}")
        if self.start < 0 or self.num_rows < 1:
            raise ValueError(
                f"Shard needs start >= 0 and num_rows >= 1 (every rank holds a row), got "
                f"start={self.start}, num_rows={self.num_rows}"
            )
        if self.stop > self.num_total:
            raise ValueError(
                f"Shard(start={self.start}, num_rows={self.num_rows}) ends at row {self.stop}, "
                f"past num_total={self.num_total}"
            )

    @property
    def stop(self) -> int:
        """One past the global index of the last row held here."""
        return self.start + self.num_rows

    @classmethod
    def even(cls, num_total: int, *, rank: int | None = None, world_size: int | None = None) -> Shard:
        """Rank ``rank``'s block of ``num_total`` rows split into ``world_size`` contiguous blocks.

        The first ``num_total % world_size`` blocks have one row more. ``rank`` and
        ``world_size`` default to this process's.
        """
        r = _rank() if rank is None else rank
        w = _world_size() if world_size is None else world_size
        if not (isinstance(w, int) and w >= 1 and isinstance(r, int) and 0 <= r < w):
            raise ValueError(f"Shard.even needs 0 <= rank < world_size, got rank={r!r}, world_size={w!r}")
        if isinstance(num_total, bool) or not isinstance(num_total, int) or num_total < w:
            raise ValueError(
                f"Shard.even needs an integer num_total >= world_size={w} (one row per rank), got {num_total!r}"
            )
        base, extra = divmod(num_total, w)
        start = r * base + min(r, extra)
        return cls(start=start, num_rows=base + (1 if r < extra else 0), num_total=num_total)


_rank, _world_size = rank, world_size


@dataclass(frozen=True)
class ShardLayout:
    """Every rank's :class:`Shard`, checked to tile ``[0, num_total)`` exactly once.

    Built by :meth:`gather` (a collective: each rank passes its own shard) or :meth:`single`
    (one process holding every row). ``local`` maps global row indices (a minibatch drawn
    identically on every rank) to the positions of those this rank holds.

    Examples
    --------
    >>> import torch
    >>> from deqppl.distributed import Shard, ShardLayout
    >>> layout = ShardLayout(shards=(Shard(0, 3, 5), Shard(3, 2, 5)), rank=1)
    >>> layout.local(torch.tensor([4, 0, 3]))
    tensor([1, 0])
    >>> layout.prior_rank(torch.tensor([4, 3])), layout.prior_rank(torch.tensor([4, 0]))
    (1, 0)
    """

    shards: tuple[Shard, ...]
    rank: int

    def __post_init__(self) -> None:
        total = {s.num_total for s in self.shards}
        if len(total) != 1:
            raise DisagreementError(
                "ranks disagree on the number of rows: "
                + ", ".join(f"rank {r}: num_total={s.num_total}" for r, s in enumerate(self.shards))
            )
        (n,) = total
        covered = 0
        for r, s in sorted(enumerate(self.shards), key=lambda rs: rs[1].start):
            if s.start != covered:
                raise DisagreementError(
                    f"the ranks' shards do not tile the {n} rows exactly once: rank {r} starts at row "
                    f"{s.start}, expected {covered} (shards: "
                    + ", ".join(f"rank {q}: [{t.start}, {t.stop})" for q, t in enumerate(self.shards))
                    + ")"
                )
            covered = s.stop
        if covered != n:
            raise DisagreementError(f"the ranks' shards cover rows [0, {covered}) of num_total={n}")

    @classmethod
    def single(cls, num_rows: int) -> ShardLayout:
        """One process holding all ``num_rows`` rows (the single-process fit)."""
        return cls(shards=(Shard(0, num_rows, num_rows),), rank=0)

    @classmethod
    def gather(cls, shard: Shard, *, num_rows: int) -> ShardLayout:
        """Collect every rank's ``shard`` (a collective) and check it.

        ``num_rows`` is the number of rows of this rank's data, which must equal
        ``shard.num_rows``.
        """
        if not isinstance(shard, Shard):
            raise TypeError(f"shard must be a deqppl.distributed.Shard, got {shard!r}")
        if num_rows != shard.num_rows:
            raise ValueError(
                f"rank {rank()}: the data have {num_rows} rows but the shard says "
                f"num_rows={shard.num_rows} ({shard})"
            )
        if not _parallel():
            return cls(shards=(shard,), rank=0)
        got = _checked_gather((shard.start, shard.num_rows, shard.num_total), "gathering the shards")
        return cls(shards=tuple(Shard(*g) for g in got), rank=rank())

    @property
    def mine(self) -> Shard:
        """This rank's shard."""
        return self.shards[self.rank]

    @property
    def num_total(self) -> int:
        """Rows over all ranks."""
        return self.mine.num_total

    @property
    def parallel(self) -> bool:
        """Whether more than one rank holds rows."""
        return len(self.shards) > 1

    def holds(self, rows: torch.Tensor) -> torch.Tensor:
        """Mask of the global row indices ``rows`` that this rank holds."""
        s = self.mine
        return (rows >= s.start) & (rows < s.stop)

    def local(self, rows: torch.Tensor) -> torch.Tensor:
        """Positions in this rank's shard of the global ``rows`` it holds (their order kept)."""
        if not self.parallel:
            return rows
        return rows[self.holds(rows)] - self.mine.start

    def prior_rank(self, rows: torch.Tensor) -> int:
        """The lowest rank holding one of ``rows``: the one rank that adds the prior of the globals."""
        if not self.parallel:
            return 0
        # Shards tile the rows, so the lowest rank holding a row of the batch is the owner of
        # the smallest start among the shards the batch touches.
        return min(r for r, s in enumerate(self.shards) if bool(((rows >= s.start) & (rows < s.stop)).any()))

    def sum(self, compute: Callable[[], torch.Tensor], *, like: torch.Tensor, where: str) -> torch.Tensor:
        """:func:`checked_all_reduce_sum` for a parallel layout, ``compute()`` otherwise."""
        if not self.parallel:
            return compute()
        return checked_all_reduce_sum(compute, like=like, where=where)

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        """:func:`all_reduce_max` for a parallel layout (after a flag round), ``tensor`` otherwise."""
        if not self.parallel:
            return tensor
        _flag_round(None, "data-parallel fit: maximum over ranks")
        return all_reduce_max(tensor)


# --------------------------------------------------------------------------------------------
# Agreement
# --------------------------------------------------------------------------------------------
def describe(obj: object) -> str:
    """A description of ``obj`` that is equal on two ranks iff they hold equal settings.

    Dataclasses (settings objects, zoo models) by their ``repr``; functions by module and
    qualified name (their ``repr`` holds a memory address); tensors by dtype, shape and a hash
    of their values.

    Examples
    --------
    >>> from deqppl.distributed import describe
    >>> from deqppl.optim import Adam
    >>> describe(Adam(lr=0.1)) == describe(Adam(lr=0.1)), describe(Adam(lr=0.1)) == describe(Adam())
    (True, False)
    """
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        digest = hashlib.sha256(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
        return f"tensor({t.dtype}, {tuple(t.shape)}, sha256={digest.hexdigest()[:16]})"
    if callable(obj) and hasattr(obj, "__qualname__") and not hasattr(obj, "__dataclass_fields__"):
        return f"{getattr(obj, '__module__', '?')}.{obj.__qualname__}"
    # Functions held by settings objects print with their address, which differs between processes.
    return _ADDRESS.sub("", repr(obj))


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def fingerprint(items: Mapping[str, object]) -> dict[str, str]:
    """``{name: describe(value)}``: what :func:`check_agreement` compares."""
    return {k: describe(v) for k, v in items.items()}


def check_agreement(items: Mapping[str, str], *, where: str) -> None:
    """Raise :class:`DisagreementError` on every rank unless all ranks pass equal ``items``.

    A collective (every rank calls it at the same point, before any work). ``items`` maps a
    setting's name to its description (:func:`fingerprint`); the error names each setting that
    differs and its value on every rank. Without a process group it does nothing.

    Examples
    --------
    >>> from deqppl.distributed import check_agreement, fingerprint
    >>> check_agreement(fingerprint({"seed": 0}), where="fit")
    """
    if not _parallel():
        return
    got = _checked_gather(dict(items), f"{where}: comparing the ranks' settings")
    keys = sorted(set().union(*got))
    differ = [k for k in keys if len({g.get(k) for g in got}) > 1]
    if differ:
        lines = "; ".join(
            f"{k}: " + ", ".join(f"rank {r} {g.get(k, '(missing)')}" for r, g in enumerate(got))
            for k in differ
        )
        raise DisagreementError(
            f"{where}: the ranks disagree on {', '.join(differ)} - every rank must run the same "
            f"settings on data of the same schema ({lines})"
        )


# --------------------------------------------------------------------------------------------
# Launch
# --------------------------------------------------------------------------------------------
def init_process_group(*, device: torch.device | str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Join the process group of a ``torchrun`` launch (environment ``RANK``/``WORLD_SIZE``/...).

    Gloo for ``device`` on the CPU, NCCL for CUDA (each rank then uses GPU ``LOCAL_RANK``).
    ``timeout_s`` bounds every wait for a peer, in the set-up and in every collective: a rank
    that dies or hangs makes the others raise after it, never wait forever. Without the
    ``torchrun`` environment (a plain single process) nothing is initialised.

    Returns
    -------
    bool
        Whether a process group of more than one rank is active afterwards.

    Examples
    --------
    >>> from deqppl.distributed import init_process_group
    >>> init_process_group()  # no torchrun environment here
    False
    """
    if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    device = torch.device(device)
    if is_active():
        return _parallel()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=float(timeout_s)))
    return _parallel()
