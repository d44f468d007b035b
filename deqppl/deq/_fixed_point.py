"""The entry point `fixed_point`."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from ._core import _Problem
from ._solution import ConvergenceError, Solution, Status
from .adjoints import AbstractAdjoint, ImplicitAdjoint
from .solvers import AbstractSolver, Anderson

__all__ = ["fixed_point"]


def _flat_map(f, shape: torch.Size, dtype: torch.dtype, device: torch.device):
    batch, n = shape[0], math.prod(shape[1:])

    def fn(z: torch.Tensor) -> torch.Tensor:
        out = f(z.reshape(shape))
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"f must return a torch.Tensor, got {type(out).__name__}")
        if out.shape != shape:
            raise ValueError(
                f"f must map a tensor of shape {tuple(shape)} to the same shape, "
                f"got output shape {tuple(out.shape)}")
        if out.dtype != dtype:
            raise TypeError(f"f must preserve the dtype: input {dtype}, output {out.dtype}")
        if out.device != device:
            raise ValueError(f"f must preserve the device: input {device}, output {out.device}")
        return out.reshape(batch, n)

    return fn


def _flat_jacobian(jacobian, shape: torch.Size, dtype: torch.dtype):
    batch, n = shape[0], math.prod(shape[1:])

    def jac(z: torch.Tensor) -> torch.Tensor:
        out = jacobian(z.reshape(shape))
        if not isinstance(out, torch.Tensor) or out.shape != (batch, n, n):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"jacobian must return a tensor of shape {(batch, n, n)} "
                             f"(batch, n, n) with n = prod(event shape), got {got}")
        if out.dtype != dtype:
            raise TypeError(f"jacobian must return dtype {dtype}, got {out.dtype}")
        return out

    return jac


def fixed_point(
    f: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    *,
    solver: AbstractSolver | None = None,
    adjoint: AbstractAdjoint | None = None,
    jacobian: Callable[[torch.Tensor], torch.Tensor] | None = None,
    throw: bool = True,
    trace: bool = False,
) -> Solution:
    """Solve $z = f(z)$ for a batch of independent problems and attach the result to autograd.

    Parameters
    ----------
    f
        Map from a tensor of shape ``(B, *event)`` to the same shape, dtype and device. Sample
        ``b`` of ``f(z)`` must depend only on ``z[b]``: the batch holds independent problems,
        each judged for convergence on its own. Parameters that ``f`` closes over may require
        grad; gradients reach them as ``adjoint`` prescribes.
    z0
        Starting point ``(B, *event)``, floating point. It is detached: no gradient reaches it.
    solver
        A solver object; ``None`` means ``Anderson()``, safeguarded so that it converges on the
        MAP maps of strongly convex objectives even where ``f`` is not a contraction.
    adjoint
        How gradients flow through the fixed point; ``None`` means ``ImplicitAdjoint()``.
    jacobian
        Optional ``z (B, *event) -> (B, n, n)``, the exact per-sample Jacobian of ``f`` with
        ``n = prod(event)``; `Newton` (forward, or as the adjoint's solver) uses it instead of
        ``n`` vector-Jacobian products.
    throw
        Raise `ConvergenceError` if any sample did not converge; ``False`` records it in
        ``Solution.converged`` and ``Solution.status`` instead.
    trace
        Record the largest residual over the batch after every step in ``Solution.trace``.

    Returns
    -------
    Solution
        ``value`` of shape ``(B, *event)``, per-sample ``residual`` $\\lVert f(z)-z\\rVert_2$
        (over the flattened event dimensions), ``rel_residual``, ``converged`` mask, ``status``,
        step and evaluation counts and wall time. A sample converges when
        $\\lVert f(z)-z\\rVert_2 \\le \\text{atol} + \\text{rtol}\\lVert f(z)\\rVert_2$.

    Raises
    ------
    ConvergenceError
        If ``throw`` and some sample did not converge (or became non-finite); the message names
        the number of failed samples, the worst residual and its sample, and what to try.
    ValueError
        If ``f`` changes the shape (or device) of its input, or ``z0`` has no batch dimension.
    TypeError
        If ``f`` changes the dtype, or ``z0`` is not floating point, or ``solver``/``adjoint`` are
        not solver/adjoint objects.

    Examples
    --------
    >>> import torch
    >>> from deqppl.deq import fixed_point
    >>> W = torch.tensor([[0.0, 0.5], [0.5, 0.0]], dtype=torch.float64)
    >>> u = torch.tensor([[1.0, -1.0], [0.5, 0.5]], dtype=torch.float64)
    >>> sol = fixed_point(lambda z: torch.tanh(z @ W + u), torch.zeros_like(u))
    >>> sol.status.name, sol.converged.tolist()
    ('CONVERGED', [True, True])
    >>> bool(torch.allclose(sol.value, torch.tanh(sol.value @ W + u), atol=1e-6))
    True
    """
    if not isinstance(z0, torch.Tensor):
        raise TypeError(f"z0 must be a torch.Tensor, got {type(z0).__name__}")
    if not z0.is_floating_point():
        raise TypeError(f"z0 must have a real floating-point dtype, got {z0.dtype}")
    if z0.ndim < 1:
        raise ValueError("z0 must have a leading batch dimension, shape (B, *event); got a scalar")
    solver = Anderson() if solver is None else solver
    adjoint = ImplicitAdjoint() if adjoint is None else adjoint
    if not isinstance(solver, AbstractSolver):
        raise TypeError(f"solver must be a solver object such as Anderson(), got {solver!r}")
    if not isinstance(adjoint, AbstractAdjoint):
        raise TypeError(f"adjoint must be an adjoint object such as ImplicitAdjoint(), "
                        f"got {adjoint!r}")

    shape = z0.shape
    batch, n = shape[0], math.prod(shape[1:])
    fn = _flat_map(f, shape, z0.dtype, z0.device)
    jac = None if jacobian is None else _flat_jacobian(jacobian, shape, z0.dtype)
    start = time.perf_counter()
    with torch.no_grad():
        raw = solver._solve(_Problem(fn, jac), z0.detach().reshape(batch, n),
                            record_trace=bool(trace))
    wall_time = time.perf_counter() - start

    converged = bool(raw.converged.all())
    value = raw.z
    if converged or not throw:
        value = adjoint._attach(fn, raw.z, jac)
    solution = Solution(
        value=value.reshape(shape), residual=raw.residual, rel_residual=raw.rel_residual,
        converged=raw.converged, status=raw.status, num_steps=raw.num_steps,
        num_fevals=raw.num_fevals, num_jac_evals=raw.num_jac_evals, wall_time=wall_time,
        trace=raw.trace, solver=solver.name)
    if throw and not converged:
        hint = solver._hint()
        if raw.status is Status.NONFINITE:
            hint = ("f produced non-finite values (inf or NaN) for some samples: check f for "
                    "overflow or invalid inputs, or try a damping < 1. " + hint)
        raise ConvergenceError(solution, hint=hint)
    return solution
