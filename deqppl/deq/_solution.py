"""Typed results of a fixed-point solve: `Status`, `Solution`, `ConvergenceError`."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

__all__ = ["Status", "Solution", "AdjointLog", "ConvergenceError", "ConvergenceWarning"]


class Status(enum.Enum):
    """Outcome of a fixed-point solve, for the batch as a whole.

    The per-sample outcome is `Solution.converged`; the status summarizes it, reporting the most
    serious failure present in the batch (``NONFINITE`` > ``DIVERGED`` > ``MAX_STEPS_REACHED``).
    """

    #: Every sample met ``residual <= atol + rtol * ||f(z)||``.
    CONVERGED = "converged"
    #: Some sample did not converge within ``max_steps``, but its residual decreased.
    MAX_STEPS_REACHED = "max_steps_reached"
    #: Some sample ended with a residual larger than at its starting point.
    DIVERGED = "diverged"
    #: Some sample produced a non-finite iterate or a non-finite ``f(z)``.
    NONFINITE = "nonfinite"
    #: The solver gave up on some sample before ``max_steps`` (its ``terminate`` said it could
    #: make no progress there); its residual did not grow.
    STAGNATED = "stagnated"


@dataclass(frozen=True, kw_only=True, repr=False, eq=False)
class Solution:
    """Result of `fixed_point`.

    Attributes
    ----------
    value
        The fixed point, shape ``(B, *event)`` like ``z0``, attached to autograd as the adjoint
        prescribes. For a sample that did not converge it is the iterate with the smallest residual
        seen (flagged by ``converged``), never silently passed off as converged.
    residual
        ``(B,)`` absolute residual $\\lVert f(z) - z\\rVert_2$ at ``value`` (Euclidean norm over the
        flattened event dimensions).
    rel_residual
        ``(B,)`` relative residual $\\lVert f(z)-z\\rVert_2 / (\\lVert f(z)\\rVert_2 + \\text{tiny})$.
    converged
        ``(B,)`` bool mask, ``residual <= atol + rtol * ||f(z)||`` per sample.
    status
        A `Status` for the whole batch.
    num_steps
        Solver iterations taken.
    num_fevals
        Batched evaluations of ``f`` (line-search trials included), each on the whole batch,
        or, with rows declared independent, on the rows still iterating.
    num_jac_evals
        Per-sample Jacobians formed (``Newton`` only; each costs ``n`` vector-Jacobian products
        when formed by autograd).
    wall_time
        Seconds spent in the forward solve.
    num_row_fevals, num_row_jac_evals
        Rows of the batch evaluated by ``f``, and per-row Jacobians formed, in total: equal to
        ``B`` times ``num_fevals`` (``num_jac_evals``) unless the rows were declared independent
        (``fixed_point(..., rows_independent=True)``), when only the rows still iterating are
        evaluated. ``None`` where a result does not count them.
    trace
        ``(num_steps + 1,)`` largest residual over the batch after each step, or ``None`` unless
        ``fixed_point(..., trace=True)``.
    solver
        Name of the solver that produced the result.
    solver_info
        What the solver's ``postprocess`` returned (e.g. its history), or ``None``.
    adjoint_log
        For `fixed_point` with `ImplicitAdjoint`: an `AdjointLog` that records every linear
        solve of a backward (or forward-mode) pass through this fixed point, with its achieved
        residual, once that pass has run; ``None`` otherwise.
    """

    value: torch.Tensor
    residual: torch.Tensor
    rel_residual: torch.Tensor
    converged: torch.Tensor
    status: Status
    num_steps: int
    num_fevals: int
    num_jac_evals: int
    wall_time: float
    trace: torch.Tensor | None
    solver: str
    solver_info: object = None
    adjoint_log: AdjointLog | None = None
    num_row_fevals: int | None = None
    num_row_jac_evals: int | None = None

    @property
    def num_failed(self) -> int:
        """Number of samples that did not converge."""
        return int((~self.converged).sum())

    def worst(self) -> tuple[int, float, float]:
        """Index, absolute and relative residual of the worst sample.

        The worst sample is the one with the largest relative residual among the samples that
        did not converge (among all samples when every one converged); non-finite residuals
        count as the largest. Returns ``(-1, 0.0, 0.0)`` for an empty batch.
        """
        if self.residual.numel() == 0:
            return -1, 0.0, 0.0
        rel = torch.nan_to_num(self.rel_residual, nan=float("inf"))
        failed = ~self.converged
        if bool(failed.any()):
            rel = torch.where(failed, rel, torch.full_like(rel, -float("inf")))
        idx = int(torch.argmax(rel))
        return idx, float(self.residual[idx]), float(self.rel_residual[idx])

    def __repr__(self) -> str:
        batch = self.converged.numel()
        idx, res, rel = self.worst()
        return (
            f"Solution(status={self.status.name}, solver={self.solver}, "
            f"converged={batch - self.num_failed}/{batch}, "
            f"worst_residual={res:.3g} (relative {rel:.3g}, sample {idx}), "
            f"num_steps={self.num_steps}, num_fevals={self.num_fevals}, "
            f"num_jac_evals={self.num_jac_evals}, wall_time={self.wall_time * 1e3:.3g} ms, "
            f"shape={tuple(self.value.shape)}, dtype={self.value.dtype})"
        )


class AdjointLog:
    """The linear solves run by an implicit adjoint for one `fixed_point` call.

    Filled during ``backward()`` (adjoint solves $u = J^\\top u + g$) and forward-mode passes
    (tangent solves $\\dot z = J\\dot z + \\partial_\\theta f\\,\\dot\\theta$); read it afterwards.

    Attributes
    ----------
    results
        One `Solution` per linear solve, in the order run: ``value`` is the solution ``(B, n)``
        (for a solve batched by `torch.func.vmap`, ``B`` counts every vmapped copy), with its
        per-sample ``residual`` $\\lVert Mu + g - u\\rVert$, ``rel_residual``, ``converged``,
        ``status`` and ``solver`` (the linear solver's name).
    kinds
        ``"adjoint"`` or ``"tangent"`` for each entry of ``results``.
    """

    def __init__(self):
        self.results: list[Solution] = []
        self.kinds: list[str] = []

    def record(self, kind: str, result: Solution) -> None:
        self.results.append(result)
        self.kinds.append(kind)

    @property
    def last(self) -> Solution | None:
        """The most recent linear solve, or ``None`` before any backward pass."""
        return self.results[-1] if self.results else None

    @property
    def max_rel_residual(self) -> float:
        """Largest relative residual over every recorded solve (``0.0`` if none)."""
        if not self.results:
            return 0.0
        return max(float(r.rel_residual.max()) if r.rel_residual.numel() else 0.0
                   for r in self.results)

    def __repr__(self) -> str:
        return (f"AdjointLog({len(self.results)} solves, "
                f"max_rel_residual={self.max_rel_residual:.3g})")


class ConvergenceWarning(RuntimeWarning):
    """Issued when an adjoint solve fails and its adjoint was built with ``throw=False``."""


class ConvergenceError(RuntimeError):
    """A fixed-point solve (forward or adjoint) did not converge for every sample.

    Attributes
    ----------
    solution
        The `Solution` of the failed solve, for inspection.
    """

    def __init__(self, solution: Solution, *, hint: str = "", context: str = "fixed-point solve"):
        self.solution = solution
        batch = solution.converged.numel()
        idx, res, rel = solution.worst()
        message = (
            f"{context} with {solution.solver} failed for {solution.num_failed} of {batch} "
            f"samples (status {solution.status.name} after {solution.num_steps} steps, "
            f"{solution.num_fevals} evaluations of f): worst residual ||f(z) - z|| = {res:.3g} "
            f"(relative {rel:.3g}) at sample {idx}."
        )
        if hint:
            message += " " + hint
        super().__init__(message)
