"""The entry point `fixed_point`."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

from ._function import _ClosureGate, _FixedPoint, _LinearSpec, _Record, _SolveSpec
from ._solution import AdjointLog, Solution
from .adjoints import AbstractAdjoint, ImplicitAdjoint
from .protocol import AbstractSolver
from .solvers import Anderson

__all__ = ["fixed_point"]


def _functorch_level(t: torch.Tensor) -> int:
    """Level of the innermost torch.func transform wrapping ``t`` (-1: a plain tensor)."""
    # torch has no public API for this; without it the check below is skipped.
    get_level = getattr(torch._C._functorch, "maybe_get_level", None)
    return -1 if get_level is None else int(get_level(t))


def _in_functorch_transform() -> bool:
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    return peek is not None and peek() is not None


class _FlatMap:
    """``f`` on flattened ``(B, n)`` tensors with its tensor arguments passed positionally.

    The output of the first call is validated (shape, dtype, device); later calls are not.
    """

    def __init__(self, f, shape, dtype, device, leaves, treedef, tensor_pos, *,
                 is_jacobian: bool):
        self.f = f
        self.shape = tuple(shape)
        self.event = tuple(shape[1:])
        self.n = math.prod(shape[1:])
        self.dtype, self.device = dtype, device
        self.leaves, self.treedef, self.tensor_pos = list(leaves), treedef, tensor_pos
        self.is_jacobian = is_jacobian
        self.checked = False

    def _args(self, tensors):
        leaves = list(self.leaves)
        for pos, t in zip(self.tensor_pos, tensors):
            leaves[pos] = t
        return pytree.tree_unflatten(leaves, self.treedef)

    def __call__(self, z: torch.Tensor, *tensors: torch.Tensor,
                 rows: torch.Tensor | None = None) -> torch.Tensor:
        batch = z.shape[0]
        if rows is None:
            out = self.f(z.reshape(batch, *self.event), *self._args(tensors))
        else:
            out = self.f(z.reshape(batch, *self.event), *self._args(tensors), rows=rows)
        if not self.checked:
            self._check(out, batch)
            self.checked = True
        return out if self.is_jacobian else out.reshape(batch, self.n)

    def _check(self, out, batch):
        if not self.is_jacobian:
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"f must return a torch.Tensor, got {type(out).__name__}")
            if tuple(out.shape) != (batch, *self.event):
                raise ValueError(
                    f"f must map a tensor of shape {(batch, *self.event)} to the same shape, "
                    f"got output shape {tuple(out.shape)}")
            if out.dtype != self.dtype:
                raise TypeError(f"f must preserve the dtype: input {self.dtype}, "
                                f"output {out.dtype}")
            if out.device != self.device:
                raise ValueError(f"f must preserve the device: input {self.device}, "
                                 f"output {out.device}")
        else:
            want = (batch, self.n, self.n)
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"jacobian must return a tensor of shape {want} "
                                 f"(batch, n, n) with n = prod(event shape), got {got}")
            if out.dtype != self.dtype:
                raise TypeError(f"jacobian must return dtype {self.dtype}, got {out.dtype}")


class _FlatLinearize:
    """``linearize`` on flattened ``(B, n)`` tensors: ``f`` as `_FlatMap`, and the Jacobian
    function it returns checked like ``jacobian`` on its first call."""

    def __init__(self, linearize, f_flat: _FlatMap, jac_flat: _FlatMap):
        self.linearize = linearize
        self.f_flat = f_flat
        self.jac_flat = jac_flat
        self.checked = False  # the Jacobian function's output (the one of jac_flat is separate)

    def __call__(self, z: torch.Tensor, *tensors: torch.Tensor,
                 rows: torch.Tensor | None = None) -> tuple[torch.Tensor, Callable]:
        flat, batch = self.f_flat, z.shape[0]
        args = flat._args(tensors)
        zz = z.reshape(batch, *flat.event)
        out = self.linearize(zz, *args) if rows is None else self.linearize(zz, *args, rows=rows)
        if not (isinstance(out, tuple) and len(out) == 2 and callable(out[1])):
            raise TypeError("linearize must return a pair (f(z), jacobian) with jacobian(keep) "
                            "a function of the rows to keep (None: all)")
        fz, jacobian = out
        if not flat.checked:
            flat._check(fz, batch)
            flat.checked = True

        def jacobian_flat(keep: torch.Tensor | None = None) -> torch.Tensor:
            jac = jacobian(keep)
            if not self.checked:
                self.jac_flat._check(jac, batch if keep is None else keep.shape[0])
                self.checked = True
            return jac

        return fz.reshape(batch, flat.n), jacobian_flat


def fixed_point(
    f: Callable[..., torch.Tensor],
    z0: torch.Tensor,
    *,
    args: tuple[Any, ...] = (),
    solver: AbstractSolver | None = None,
    adjoint: AbstractAdjoint | None = None,
    jacobian: Callable[..., torch.Tensor] | None = None,
    throw: bool = True,
    trace: bool = False,
    rows_independent: bool = False,
    linearize: Callable[..., tuple[torch.Tensor, Callable]] | None = None,
) -> Solution:
    """Solve $z = f(z, \\theta)$ for a batch of independent problems, differentiably.

    Parameters
    ----------
    f
        ``f(z, *args)``: maps ``z`` of shape ``(B, *event)`` to the same shape, dtype and
        device. Sample ``b`` of the output must depend only on ``z[b]`` (the batch holds
        independent problems, each judged for convergence on its own), and on ``args``.
    z0
        Starting point ``(B, *event)``, floating point. It is detached: no gradient reaches it.
    args
        The parameters $\\theta$ of ``f``, passed explicitly: a tuple whose entries may be
        tensors, or (nested) lists, tuples and dicts of tensors (pytrees), e.g.
        ``args=(params_dict, x)``. Derivatives with respect to them follow ``adjoint`` in every
        autograd mode: ``backward``, `torch.func.grad`, `jacrev`, `jvp`, `jacfwd`, `vmap`, and
        compositions (Hessian-vector products). ``f`` may instead close over its parameters;
        then ordinary first-order autograd still works (the implicit adjoint finds the captured
        tensors through the graph of one evaluation of ``f``), but torch.func transforms need
        ``args`` and raise `TypeError` if ``f`` closes over a tensor they transform.
    solver
        An `AbstractSolver`; ``None`` means ``Anderson()``, safeguarded so that it converges on
        the MAP maps of strongly convex objectives even where ``f`` is not a contraction.
    adjoint
        How derivatives flow through the fixed point; ``None`` means ``ImplicitAdjoint()``.
    jacobian
        Optional ``jacobian(z, *args) -> (B, n, n)``, the exact per-sample Jacobian of ``f``
        with ``n = prod(event)``; `Newton` and `DirectLinearSolver` use it instead of ``n``
        vector-Jacobian products.
    throw
        Raise `ConvergenceError` if any sample did not converge; ``False`` records it in
        ``Solution.converged`` and ``Solution.status`` (and such samples get NaN derivatives
        from `ImplicitAdjoint`).
    trace
        Record the largest residual over the batch after every step in ``Solution.trace``.
    rows_independent
        Declare that ``f`` (and ``jacobian``) can be evaluated on a subset of the batch rows:
        called as ``f(z_k, *args, rows=rows)`` with ``rows`` a ``(k,)`` int64 tensor of batch
        indices (increasing) and ``z_k`` those rows of ``z``, they return those rows of the
        output. Without ``rows`` they are called on the whole batch as usual. Solvers with
        ``supports_row_compaction`` (all the built-in ones) then evaluate ``f`` only on the rows
        still iterating, so a batch no longer costs its slowest row times its size; the result
        is that of the full-batch solve (to rounding). Use it where each row's ``f`` depends on
        per-row data (e.g. an encoder over a data plate); under `torch.func.vmap` it is not used.
    linearize
        Optional ``linearize(z, *args) -> (f(z), jac)``, with ``jac(keep)`` the per-sample
        Jacobian at ``z`` ``(k, n, n)`` on the rows ``keep`` ``(k,)`` of ``z`` (``None``: all):
        $f$ together with what its Jacobian shares with it (``jacobian`` is still required, for
        Jacobians at points where $f$ was not linearized). `Newton` then forms the Jacobian at
        an accepted step from what the line search's evaluation kept. Called with ``rows=``
        like ``f`` when ``rows_independent``. Its Jacobian must agree with ``jacobian`` (it
        steers the steps only: the fixed point and the stopping rule are those of ``f``).

    Returns
    -------
    Solution
        ``value`` of shape ``(B, *event)``, per-sample ``residual`` $\\lVert f(z)-z\\rVert_2$
        (over the flattened event dimensions), ``rel_residual``, ``converged`` mask, ``status``,
        step and evaluation counts, wall time and ``adjoint_log``. A sample converges when
        $\\lVert f(z)-z\\rVert_2 \\le \\text{atol} + \\text{rtol}\\lVert f(z)\\rVert_2$. Under
        `torch.func.vmap` the per-sample fields are batched like ``value``; the counts and the
        status describe the one solve of all ``V * B`` samples that vmap folds into.

    Raises
    ------
    ConvergenceError
        If ``throw`` and some sample did not converge (or became non-finite); the message names
        the number of failed samples, the worst residual and its sample, and what to try.
    ValueError
        If ``f`` changes the shape (or device) of its input, or ``z0`` has no batch dimension.
    TypeError
        If ``f`` changes the dtype, or ``z0`` is not floating point, or ``solver``/``adjoint`` are
        not solver/adjoint objects, or ``f`` closes over a tensor a torch.func transform tracks.

    Examples
    --------
    >>> import torch
    >>> from deqppl.deq import fixed_point
    >>> W = torch.tensor([[0.0, 0.5], [0.5, 0.0]], dtype=torch.float64)
    >>> u = torch.tensor([[1.0, -1.0], [0.5, 0.5]], dtype=torch.float64)
    >>> sol = fixed_point(lambda z, W: torch.tanh(z @ W + u), torch.zeros_like(u), args=(W,))
    >>> sol.status.name, sol.converged.tolist()
    ('CONVERGED', [True, True])
    >>> bool(torch.allclose(sol.value, torch.tanh(sol.value @ W + u), atol=1e-6))
    True
    >>> def loss(W):
    ...     return fixed_point(lambda z, W: torch.tanh(z @ W + u), torch.zeros_like(u),
    ...                        args=(W,)).value.sum()
    >>> torch.func.jacrev(loss)(W).shape
    torch.Size([2, 2])

    Rows with their own data, declared independent: ``f`` is then evaluated only on the rows
    still iterating (here the first row converges in one step, the second keeps iterating),
    with the same result as the full-batch solve.

    >>> c = torch.tensor([[0.0], [3.0]], dtype=torch.float64)
    >>> def g(z, rows=None):
    ...     return torch.cos(z) * (c if rows is None else c[rows])
    >>> sol = fixed_point(g, torch.zeros(2, 1, dtype=torch.float64), rows_independent=True)
    >>> full = fixed_point(g, torch.zeros(2, 1, dtype=torch.float64))
    >>> bool(torch.equal(sol.value, full.value)), sol.num_row_fevals < full.num_row_fevals
    (True, True)
    """
    if not isinstance(z0, torch.Tensor):
        raise TypeError(f"z0 must be a torch.Tensor, got {type(z0).__name__}")
    if not z0.is_floating_point():
        raise TypeError(f"z0 must have a real floating-point dtype, got {z0.dtype}")
    if z0.ndim < 1:
        raise ValueError("z0 must have a leading batch dimension, shape (B, *event); got a scalar")
    if not isinstance(args, tuple):
        raise TypeError(f"args must be a tuple of f's extra arguments, got {type(args).__name__}")
    if not isinstance(rows_independent, bool):
        raise TypeError(f"rows_independent must be a bool, got {rows_independent!r}")
    solver = Anderson() if solver is None else solver
    adjoint = ImplicitAdjoint() if adjoint is None else adjoint
    if not isinstance(solver, AbstractSolver):
        raise TypeError(f"solver must be a solver object such as Anderson(), got {solver!r}")
    if not isinstance(adjoint, AbstractAdjoint):
        raise TypeError(f"adjoint must be an adjoint object such as ImplicitAdjoint(), "
                        f"got {adjoint!r}")

    shape = z0.shape
    batch, n = shape[0], math.prod(shape[1:])
    leaves, treedef = pytree.tree_flatten(args)
    tensor_pos = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    tensors = tuple(leaves[i] for i in tensor_pos)
    f_flat = _FlatMap(f, shape, z0.dtype, z0.device, leaves, treedef, tensor_pos, is_jacobian=False)
    jac_flat = None if jacobian is None else _FlatMap(
        jacobian, shape, z0.dtype, z0.device, leaves, treedef, tensor_pos, is_jacobian=True)
    if linearize is not None and jacobian is None:
        raise ValueError("fixed_point: linearize needs jacobian too (for Jacobians at points "
                         "where f was not linearized)")
    lin_flat = None if linearize is None else _FlatLinearize(linearize, f_flat, jac_flat)
    z0_flat = z0.detach().reshape(batch, n)

    implicit = isinstance(adjoint, ImplicitAdjoint)
    closure = False
    fz0 = None
    if (implicit and torch.is_grad_enabled()) or _in_functorch_transform():
        # One evaluation of f with the explicit arguments detached tells whether f closes over
        # tensors that autograd (or a torch.func transform) tracks.
        with torch.enable_grad():
            probe = f_flat(z0_flat, *(t.detach() for t in tensors))
        inner = max([_functorch_level(z0)] + [_functorch_level(t) for t in tensors])
        if _functorch_level(probe) > inner:
            raise TypeError(
                "f closes over a tensor that a torch.func transform (vmap, grad, jacrev, jvp, "
                "...) is tracking; pass every such tensor through fixed_point(f, z0, args=(...)) "
                "as an argument of f(z, *args), so that the implicit adjoint can see it.")
        closure = implicit and probe.requires_grad and torch.is_grad_enabled()
        if closure and _in_functorch_transform():
            raise TypeError(
                "inside a torch.func transform, f must not close over tensors that require "
                "grad; pass them through fixed_point(f, z0, args=(...)).")
        if not _in_functorch_transform():
            fz0 = probe.detach()  # the solve's first evaluation: not repeated

    record = _Record()
    log = AdjointLog() if implicit else None
    linear_solver = adjoint.linear_solver_for(n) if implicit else None
    spec = _SolveSpec(
        f=f_flat, jac=jac_flat, solver=solver,
        linear_solver=None if closure else linear_solver,
        throw=bool(throw), adjoint_throw=adjoint.throw if implicit else True,
        trace=bool(trace), record=record, log=log, hint=solver._hint(), fz0=fz0,
        rows_independent=rows_independent, linearize=lin_flat)
    z_star, residual, rel_residual, converged = _FixedPoint.apply(spec, z0_flat, *tensors)
    if closure:
        with torch.enable_grad():
            z_leaf = z_star.detach().requires_grad_(True)
            fz = f_flat(z_leaf, *tensors)
        gate = _LinearSpec(f=f_flat, jac=None if jac_flat is None else
                           (lambda z: jac_flat(z, *tensors)),
                           transpose=True, linear_solver=linear_solver, forward_solver=solver,
                           throw=adjoint.throw, log=log)
        value = _ClosureGate.apply(gate, record, fz, z_leaf, z_star)
    else:
        value = adjoint._attach(f_flat, z_star, tensors)
    raw = record.solution
    return Solution(
        value=value.reshape(shape),
        residual=residual, rel_residual=rel_residual, converged=converged,
        status=raw.status, num_steps=raw.num_steps, num_fevals=raw.num_fevals,
        num_jac_evals=raw.num_jac_evals, wall_time=raw.wall_time, trace=raw.trace,
        solver=raw.solver, solver_info=raw.solver_info, adjoint_log=log,
        num_row_fevals=raw.num_row_fevals, num_row_jac_evals=raw.num_row_jac_evals)
