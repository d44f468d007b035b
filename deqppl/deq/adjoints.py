"""How gradients flow through a fixed point $z^* = f(z^*, \\theta)$: adjoint objects.

An adjoint turns the detached solution of the forward solve into ``Solution.value``. In every
case the *forward value* is exactly the solver's $z^*$; only the gradient differs. No adjoint
propagates gradients to ``z0``.
"""

from __future__ import annotations

import abc
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ._core import _Problem, batched_jacobian
from ._solution import ConvergenceError, ConvergenceWarning, Solution, Status
from .solvers import AbstractSolver, Anderson, Newton, _check_int

__all__ = ["AbstractAdjoint", "ImplicitAdjoint", "UnrolledAdjoint", "OneStepAdjoint", "NoAdjoint"]

FlatMap = Callable[[torch.Tensor], torch.Tensor]


class AbstractAdjoint(abc.ABC):
    """Base of the adjoints; never instantiated."""

    @abc.abstractmethod
    def _attach(self, fn: FlatMap, z_star: torch.Tensor, jac: FlatMap | None) -> torch.Tensor:
        """Return ``z_star (B, n)`` attached to autograd; ``fn`` is ``f`` on flattened tensors."""


def _depends_on_other_leaves(out: torch.Tensor, leaf: torch.Tensor) -> bool:
    """Whether the autograd graph of ``out`` reaches a leaf requiring grad other than ``leaf``."""
    if out.grad_fn is None:
        return False
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None and variable is not leaf:
            return True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


def _reattach(z_star: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    # Forward value exactly z_star, gradient that of `out`.
    return z_star + (out - out.detach())


@dataclass(frozen=True, kw_only=True)
class ImplicitAdjoint(AbstractAdjoint):
    """Implicit differentiation (implicit function theorem).

    After the no-grad forward solve, ``f`` is evaluated once more at $z^*$ with autograd on, and
    a hook on that evaluation replaces the incoming gradient $g = \\partial\\ell/\\partial z^*$ by
    the solution of the adjoint fixed-point problem $u = J^\\top u + g$, $J = \\partial f/\\partial z$
    at $z^*$, so that $\\partial\\ell/\\partial\\theta = u^\\top\\partial f/\\partial\\theta$ (SPEC 7;
    Bai, Kolter & Koltun, 2019, NeurIPS). $J^\\top u$ are vector-Jacobian products of the retained
    graph. The adjoint problem is solved by this object's own ``solver`` (started from $u = g$);
    with `Newton` the $n\\times n$ system $(I - J^\\top)u = g$ is formed and solved exactly.

    A failed adjoint solve never returns silently wrong gradients: it raises `ConvergenceError`
    during ``backward()`` (``throw=True``) or issues a `ConvergenceWarning`.

    Double backward (``create_graph=True``) is not supported and raises; use `UnrolledAdjoint`
    for higher-order derivatives.

    Parameters
    ----------
    solver
        Solver for the adjoint problem. The default ``Anderson(atol=0.0)`` uses a purely relative
        tolerance so small gradients are not declared converged by ``atol`` alone.
    throw
        Raise (``True``) or warn (``False``) when the adjoint solve does not converge.

    Examples
    --------
    >>> import torch
    >>> from deqppl.deq import fixed_point
    >>> theta = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    >>> sol = fixed_point(lambda z: theta * z + 1.0, torch.zeros(1, 1, dtype=torch.float64))
    >>> sol.value.sum().backward()  # z* = 1 / (1 - theta), dz*/dtheta = 1 / (1 - theta)^2
    >>> round(float(theta.grad), 5)
    4.0
    """

    solver: AbstractSolver = field(default_factory=lambda: Anderson(atol=0.0))
    throw: bool = True

    def __post_init__(self):
        if not isinstance(self.solver, AbstractSolver):
            raise TypeError(f"solver must be an AbstractSolver, got {type(self.solver).__name__}")
        if not isinstance(self.throw, bool):
            raise TypeError(f"throw must be a bool, got {self.throw!r}")

    def _attach(self, fn, z_star, jac):
        if not torch.is_grad_enabled():
            return z_star
        with torch.enable_grad():
            z_leaf = z_star.detach().requires_grad_(True)
            fz = fn(z_leaf)
        if not _depends_on_other_leaves(fz, z_leaf):
            return z_star  # no parameter of f requires grad: nothing to differentiate
        solver, throw = self.solver, self.throw

        def backward_hook(grad: torch.Tensor) -> torch.Tensor:
            if torch.is_grad_enabled():
                raise RuntimeError(
                    "ImplicitAdjoint does not support double backward (create_graph=True); "
                    "use UnrolledAdjoint for higher-order derivatives.")
            if grad is None:  # an undefined (zero) incoming gradient stays undefined
                return None
            grad = grad.detach()

            def adjoint_map(u: torch.Tensor) -> torch.Tensor:
                (vjp,) = torch.autograd.grad(fz, z_leaf, u, retain_graph=True, allow_unused=True)
                return grad if vjp is None else vjp + grad

            adjoint_jac = None
            if isinstance(solver, Newton):
                if jac is not None:
                    with torch.no_grad():
                        jac_t = jac(z_star).transpose(1, 2)
                else:
                    jac_t = batched_jacobian(fz, z_leaf).transpose(1, 2)
                adjoint_jac = lambda u: jac_t  # noqa: E731 - the adjoint map is linear
            raw = solver._solve(_Problem(adjoint_map, adjoint_jac), grad, record_trace=False)
            if raw.status is not Status.CONVERGED:
                solution = Solution(
                    value=raw.z, residual=raw.residual, rel_residual=raw.rel_residual,
                    converged=raw.converged, status=raw.status, num_steps=raw.num_steps,
                    num_fevals=raw.num_fevals, num_jac_evals=raw.num_jac_evals, wall_time=0.0,
                    trace=None, solver=solver.name)
                hint = ("The adjoint problem u = J^T u + g converges only if the forward fixed "
                        "point is stable enough; " + solver._hint())
                if throw:
                    raise ConvergenceError(solution, hint=hint,
                                           context="implicit adjoint solve (backward pass)")
                warnings.warn(str(ConvergenceError(
                    solution, hint=hint, context="implicit adjoint solve (backward pass)")),
                    ConvergenceWarning, stacklevel=2)
            return raw.z

        # The hook sits on an alias of f(z*): the vector-Jacobian products inside it start from
        # `fz` itself and so must not re-enter the hook.
        carrier = fz.view_as(fz)
        carrier.register_hook(backward_hook)
        return _reattach(z_star, carrier)


@dataclass(frozen=True, kw_only=True)
class UnrolledAdjoint(AbstractAdjoint):
    """Backpropagation through ``num_steps`` applications of ``f`` from the detached $z^*$.

    With $z_0 = z^*$ detached and $z_{k+1} = f(z_k)$, the gradient is that of $z_K$, i.e. the
    Neumann series $\\sum_{k<K} J^k\\,\\partial f/\\partial\\theta$ truncated after $K$ terms. It equals
    the implicit gradient up to $O(\\rho(J)^K)$ when $f$ is a contraction near $z^*$ and is
    meaningless otherwise. Memory grows linearly with ``num_steps``; supports double backward.

    Parameters
    ----------
    num_steps
        Number $K \\ge 1$ of unrolled applications of ``f``.
    """

    num_steps: int = 20

    def __post_init__(self):
        _check_int("num_steps", self.num_steps, minimum=1)

    def _attach(self, fn, z_star, jac):
        if not torch.is_grad_enabled():
            return z_star
        z = z_star.detach()
        for _ in range(self.num_steps):
            z = fn(z)
        return _reattach(z_star, z) if z.requires_grad else z_star


@dataclass(frozen=True, kw_only=True)
class OneStepAdjoint(AbstractAdjoint):
    """Jacobian-free gradient: that of one application of ``f`` at the detached $z^*$.

    The gradient is $\\partial f(z^*,\\theta)/\\partial\\theta$, i.e. the implicit gradient with
    $(I - J)^{-1}$ replaced by $I$ (Fung et al., 2022, AAAI). Cheap and exact when $J = 0$ at
    $z^*$; a descent direction under conditions given there.
    """

    def _attach(self, fn, z_star, jac):
        return UnrolledAdjoint(num_steps=1)._attach(fn, z_star, jac)


@dataclass(frozen=True, kw_only=True)
class NoAdjoint(AbstractAdjoint):
    """No gradient: ``Solution.value`` is detached.

    Use it when only $z^*$ is needed, or, by the envelope theorem, when the loss is the
    objective whose stationary point $z^*$ is (SPEC 2.4).
    """

    def _attach(self, fn, z_star, jac):
        return z_star.detach()
