"""The autograd Functions behind `fixed_point`: a solve and a linear solve, both composable.

``_FixedPoint.apply(spec, z0, *params)`` returns $z^*$ with $z^* = f(z^*, \\theta)$ for the flat
map ``spec.f(z (B, n), *params)``. Its rules (SPEC 7; Bai, Kolter & Koltun, 2019, NeurIPS):

* ``backward``: $u = J^\\top u + \\bar z$, then $\\bar\\theta = (\\partial_\\theta f)^\\top u$;
* ``jvp``: $\\dot z = J\\dot z + \\partial_\\theta f\\,\\dot\\theta$;
* ``vmap``: the vmapped dimension is folded into the solver's batch (samples are independent),
  and $f$ is vmapped over the parameters, so the data-dependent loops of the solvers never see a
  batched tensor.

The linear problems are themselves ``_LinearSolve.apply(spec, g, z, *params)``, a Function with
its own ``backward`` (the transposed problem), ``jvp`` and ``vmap``, so derivatives of any order
and any composition of `torch.func` transforms work. Every product with $J$ or $J^\\top$ is a
`torch.func.jvp` / `torch.func.vjp` of ``spec.f``; every solve runs on plain tensors without an
autograd graph.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._solution import AdjointLog, ConvergenceError, ConvergenceWarning, Solution, Status
from .linear import AbstractLinearSolver, LinearProblem
from .protocol import AbstractSolver, FixedPointProblem, jacobian_from_vjp, run_solver

FlatMap = Callable[..., torch.Tensor]


@dataclass
class _Record:
    """Where the forward solve leaves its `Solution` (the Function returns only $z^*$)."""

    solution: Solution | None = None


@dataclass(frozen=True, eq=False)
class _SolveSpec:
    f: FlatMap  # (z (B, n), *params) -> (B, n)
    jac: FlatMap | None  # (z, *params) -> (B, n, n), or None
    solver: AbstractSolver
    linear_solver: AbstractLinearSolver | None  # None: no gradient through the solve
    throw: bool  # forward failure raises
    adjoint_throw: bool  # linear-solve failure raises (else warns)
    trace: bool
    record: _Record
    log: AdjointLog | None
    hint: str
    fz0: torch.Tensor | None = None  # f(z0), already evaluated by the caller (plain tensors)
    rows_independent: bool = False  # f and jac accept rows=: the solve may compact rows
    # (z, *params) -> (f(z) (B, n), jacobian(keep=None) -> (k, n, n)), or None (see fixed_point)
    linearize: Callable | None = None


@dataclass(frozen=True, eq=False)
class _LinearSpec:
    f: FlatMap
    jac: FlatMap | None
    transpose: bool  # M = J^T (adjoint) or J (tangent)
    linear_solver: AbstractLinearSolver
    forward_solver: AbstractSolver
    throw: bool
    log: AdjointLog | None


def _jvp(fn, primals, tangents):
    """`torch.func.jvp`, without torch's own first-use warning.

    The first forward-mode call in a process makes torch script its jvp decompositions, which
    in torch 2.13 warns that ``torch.jit.script`` is deprecated: torch's internals, not ours.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated",
                                category=DeprecationWarning)
        return torch.func.jvp(fn, primals, tangents)


def _zeros_if_none(tangents, like):
    return tuple(torch.zeros_like(p) if t is None else t for t, p in zip(tangents, like))


def _matvec(spec, z, params):
    """``u -> M u`` for ``M = J`` or ``J^T`` at ``(z, params)``."""
    if spec.transpose:
        _, vjp_fn = torch.func.vjp(lambda zz: spec.f(zz, *params), z)
        return lambda u: vjp_fn(u)[0]
    return lambda u: _jvp(lambda zz: spec.f(zz, *params), (z,), (u,))[1]


def _jacobian(spec, z, params) -> torch.Tensor:
    if spec.jac is not None:
        return spec.jac(z, *params)
    _, vjp_fn = torch.func.vjp(lambda zz: spec.f(zz, *params), z)
    return jacobian_from_vjp(vjp_fn, z)


def _fold(info, in_dims, tensors):
    """Move the vmapped dimension of every tensor to the front, expanding unbatched ones."""
    size = info.batch_size
    out = []
    for t, d in zip(tensors, in_dims):
        out.append(t.expand(size, *t.shape) if d is None else t.movedim(d, 0))
    return size, out


def _folded_map(f: FlatMap, size: int, batch: int, param_dims) -> FlatMap:
    """``f`` on ``(size * batch, n)`` tensors: each of the ``size`` copies with its parameters."""

    def folded(z, *params):
        zz = z.reshape(size, batch, *z.shape[1:])
        out = torch.func.vmap(f, in_dims=(0, *param_dims))(zz, *params)
        return out.reshape(size * batch, *out.shape[2:])

    return folded


def _report_linear(spec: _LinearSpec, sol: Solution) -> None:
    if spec.log is not None:
        spec.log.record("adjoint" if spec.transpose else "tangent", sol)
    if sol.status is Status.CONVERGED:
        return
    what = "implicit adjoint solve (backward pass)" if spec.transpose else \
        "implicit tangent solve (forward-mode pass)"
    problem = "u = J^T u + g" if spec.transpose else "zdot = J zdot + b"
    hint = (f"The linear problem {problem} converges only if the forward fixed point is stable "
            f"enough (spectral radius of J below 1 for plain iteration). "
            + spec.linear_solver._hint())
    if spec.throw:
        raise ConvergenceError(sol, hint=hint, context=what)
    warnings.warn(str(ConvergenceError(sol, hint=hint, context=what)), ConvergenceWarning,
                  stacklevel=3)


class _LinearSolve(torch.autograd.Function):
    """``u = M(z, params) u + g`` per sample, ``M = J^T`` or ``J`` of ``spec.f`` at ``z``."""

    @staticmethod
    def forward(spec: _LinearSpec, g, z, *params):
        with torch.no_grad():
            g, z = g.detach(), z.detach()
            params = tuple(p.detach() for p in params)
            transposed = spec.transpose

            def matrix():
                jac = _jacobian(spec, z, params)
                return jac.transpose(1, 2) if transposed else jac

            problem = LinearProblem(_matvec(spec, z, params), g, matrix=matrix,
                                    forward_solver=spec.forward_solver)
            sol = spec.linear_solver.solve(problem)
        _report_linear(spec, sol)
        return sol.value.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        spec, g, z, *params = inputs
        ctx.spec = spec
        ctx.save_for_backward(output, z, *params)
        ctx.save_for_forward(output, z, *params)

    @staticmethod
    def backward(ctx, grad_u):
        spec = ctx.spec
        u, z, *params = ctx.saved_tensors
        # w = (I - M^T)^{-1} grad_u: the transposed problem
        w = _LinearSolve.apply(dataclasses.replace(spec, transpose=not spec.transpose),
                               grad_u, z, *params)
        # d(M(x) u)/dx^T w for x = (z, params)
        _, vjp_fn = torch.func.vjp(lambda zz, *pp: _matvec(spec, zz, pp)(u), z, *params)
        grads = vjp_fn(w)
        return (None, w, *grads)

    @staticmethod
    def jvp(ctx, spec_t, g_t, z_t, *params_t):
        spec = ctx.spec
        u, z, *params = ctx.saved_tensors
        tangents = _zeros_if_none((z_t, *params_t), (z, *params))
        g_t = torch.zeros_like(u) if g_t is None else g_t
        _, m_dot_u = _jvp(lambda zz, *pp: _matvec(spec, zz, pp)(u),
                                    (z, *params), tangents)
        return _LinearSolve.apply(spec, g_t + m_dot_u, z, *params)

    @staticmethod
    def vmap(info, in_dims, spec, g, z, *params):
        size, (g, z) = _fold(info, in_dims[1:3], (g, z))
        batch = g.shape[1]
        param_dims = in_dims[3:]
        folded = dataclasses.replace(
            spec, f=_folded_map(spec.f, size, batch, param_dims),
            jac=None if spec.jac is None else _folded_map(spec.jac, size, batch, param_dims))
        u = _LinearSolve.apply(folded, g.reshape(size * batch, *g.shape[2:]),
                               z.reshape(size * batch, *z.shape[2:]), *params)
        return u.reshape(size, batch, *u.shape[1:]), 0


def _mask_unconverged(converged: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """NaN in the rows of samples whose forward solve did not converge: no number for them."""
    return torch.where(converged[:, None], x, torch.full_like(x, float("nan")))


def _zero_unconverged(converged: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.where(converged[:, None], x, torch.zeros_like(x))


class _FixedPoint(torch.autograd.Function):
    """$z^* = f(z^*, \\theta)$ from ``z0``; implicit derivatives if ``spec.linear_solver``.

    Returns ``(z*, residual, rel_residual, converged)``; only ``z*`` is differentiable. The
    per-sample diagnostics are outputs (not only on ``spec.record``) so that under `vmap` they
    are batched like ``z*``, and the derivative rules can mask the samples that failed.
    """

    @staticmethod
    def forward(spec: _SolveSpec, z0, *params):
        with torch.no_grad():
            params = tuple(p.detach() for p in params)
            jac = None if spec.jac is None else (lambda z: spec.jac(z, *params))
            lin = None if spec.linearize is None else (lambda z: spec.linearize(z, *params))
            subset = None
            if spec.rows_independent:
                def subset(rows):
                    return ((lambda z: spec.f(z, *params, rows=rows)),
                            None if spec.jac is None else
                            (lambda z: spec.jac(z, *params, rows=rows)),
                            None if spec.linearize is None else
                            (lambda z: spec.linearize(z, *params, rows=rows)))
            problem = FixedPointProblem(lambda z: spec.f(z, *params), jac, subset=subset,
                                        linearize=lin)
            sol = run_solver(spec.solver, problem, z0.detach(), trace=spec.trace,
                             fz0=spec.fz0)
        spec.record.solution = sol
        if spec.throw and not bool(sol.converged.all()):
            hint = spec.hint
            if sol.status is Status.NONFINITE:
                hint = ("f produced non-finite values (inf or NaN) for some samples: check f for "
                        "overflow or invalid inputs, or try a damping < 1. " + hint)
            raise ConvergenceError(sol, hint=hint)
        return sol.value.clone(), sol.residual.clone(), sol.rel_residual.clone(), \
            sol.converged.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        spec, z0, *params = inputs
        z, residual, rel_residual, converged = output
        ctx.mark_non_differentiable(residual, rel_residual, converged)
        ctx.spec = spec
        ctx.save_for_backward(z, converged, *params)
        ctx.save_for_forward(z, converged, *params)

    @staticmethod
    def _linear_spec(spec: _SolveSpec, transpose: bool) -> _LinearSpec:
        return _LinearSpec(f=spec.f, jac=spec.jac, transpose=transpose,
                           linear_solver=spec.linear_solver, forward_solver=spec.solver,
                           throw=spec.adjoint_throw, log=spec.log)

    @staticmethod
    def backward(ctx, grad_z, *unused):
        spec = ctx.spec
        z, converged, *params = ctx.saved_tensors
        if spec.linear_solver is None or grad_z is None or not params:
            return (None, None, *(None for _ in params))
        # A sample without a fixed point has no derivative. Its adjoint problem is replaced by
        # a zero one (which cannot fail), and every parameter gradient that an incoming
        # gradient on such a sample would have entered is NaN: no number for it. (Gradients of
        # losses that do not involve the failed samples, e.g. other rows of a Jacobian, stay.)
        rhs = _zero_unconverged(converged, grad_z)
        u = _LinearSolve.apply(_FixedPoint._linear_spec(spec, True), rhs, z, *params)
        poisoned = (~converged & (grad_z != 0).any(1)).any()
        _, vjp_fn = torch.func.vjp(lambda *pp: spec.f(z, *pp), *params)
        grads = tuple(torch.where(poisoned, torch.full_like(g, float("nan")), g)
                      for g in vjp_fn(u))
        return (None, None, *grads)

    @staticmethod
    def jvp(ctx, spec_t, z0_t, *params_t):
        spec = ctx.spec
        z, converged, *params = ctx.saved_tensors
        if spec.linear_solver is None or not params:
            return torch.zeros_like(z), None, None, None
        tangents = _zeros_if_none(params_t, params)
        _, b = _jvp(lambda *pp: spec.f(z, *pp), tuple(params), tangents)
        b = _zero_unconverged(converged, b)
        z_dot = _LinearSolve.apply(_FixedPoint._linear_spec(spec, False), b, z, *params)
        return _mask_unconverged(converged, z_dot), None, None, None

    @staticmethod
    def vmap(info, in_dims, spec, z0, *params):
        size, (z0,) = _fold(info, in_dims[1:2], (z0,))
        batch = z0.shape[1]
        param_dims = in_dims[2:]
        folded = dataclasses.replace(
            spec, f=_folded_map(spec.f, size, batch, param_dims),
            jac=None if spec.jac is None else _folded_map(spec.jac, size, batch, param_dims),
            fz0=None, rows_independent=False, linearize=None)
        outputs = _FixedPoint.apply(folded, z0.reshape(size * batch, *z0.shape[2:]), *params)
        return (tuple(t.reshape(size, batch, *t.shape[1:]) for t in outputs), (0, 0, 0, 0))


class _ClosureGate(torch.autograd.Function):
    """Identity on $z^*$ whose backward turns $\\bar z$ into $u = J^\\top u + \\bar z$.

    For maps that close over tensors requiring grad (plain autograd only): ``fz`` is
    $f(z^*)$ evaluated with a graph from a local leaf ``z_leaf``; the gradient $u$ handed to
    ``fz`` then flows through that graph to every captured tensor, exactly once, like any other
    autograd edge.
    """

    @staticmethod
    def forward(ctx, spec: _LinearSpec, record: _Record, fz, z_leaf, z_star):
        ctx.spec, ctx.record = spec, record
        ctx.fz, ctx.z_leaf = fz, z_leaf
        return z_star.detach().clone()

    @staticmethod
    def backward(ctx, grad_z):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "ImplicitAdjoint does not support double backward (create_graph=True) for a map "
                "that closes over its parameters; pass them through fixed_point(..., args=...) "
                "for higher-order derivatives, or use UnrolledAdjoint.")
        spec, fz, z_leaf = ctx.spec, ctx.fz, ctx.z_leaf

        def matvec(u):
            (vjp,) = torch.autograd.grad(fz, z_leaf, u, retain_graph=True, allow_unused=True)
            return torch.zeros_like(u) if vjp is None else vjp

        def matrix():
            if spec.jac is not None:
                return spec.jac(z_leaf.detach()).transpose(1, 2)
            return _graph_jacobian(fz, z_leaf).transpose(1, 2)

        converged = ctx.record.solution.converged
        rhs = _zero_unconverged(converged, grad_z.detach())
        problem = LinearProblem(matvec, rhs, matrix=matrix, forward_solver=spec.forward_solver)
        sol = spec.linear_solver.solve(problem)
        _report_linear(spec, sol)
        u = _mask_unconverged(converged, sol.value)
        return None, None, u, None, None


def _graph_jacobian(fz: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-sample Jacobian ``(B, n, n)`` of ``fz (B, n)`` in a retained graph from ``z (B, n)``."""
    batch, n = z.shape
    basis = torch.eye(n, dtype=z.dtype, device=z.device).unsqueeze(1).expand(n, batch, n)
    try:
        with warnings.catch_warnings():
            # vmap may warn about a slow fallback for some operations; the result is exact.
            warnings.simplefilter("ignore", UserWarning)
            (rows,) = torch.autograd.grad(fz, z, basis, retain_graph=True,
                                          is_grads_batched=True, allow_unused=True)
    except RuntimeError:
        rows = torch.stack([torch.autograd.grad(fz, z, basis[i], retain_graph=True,
                                                allow_unused=True)[0] for i in range(n)])
    if rows is None:
        return z.new_zeros(batch, n, n)
    return rows.transpose(0, 1)
