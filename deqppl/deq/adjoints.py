"""How gradients flow through a fixed point $z^* = f(z^*, \\theta)$: adjoint objects.

An adjoint turns the detached solution of the forward solve into ``Solution.value``. In every
case the *forward value* is exactly the solver's $z^*$; only the derivatives differ. No adjoint
propagates derivatives to ``z0``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from .linear import AbstractLinearSolver, DirectLinearSolver, FixedPointLinearSolver, GMRES
from .protocol import AbstractSolver, check_int

__all__ = ["AbstractAdjoint", "ImplicitAdjoint", "UnrolledAdjoint", "OneStepAdjoint", "NoAdjoint",
           "DIRECT_MAX_DIM"]

#: Flattened event dimensions up to which the default `ImplicitAdjoint` solves its linear
#: problems densely (`DirectLinearSolver`): forming $J$ costs $n$ vector-Jacobian products
#: (vectorized) and the LU $O(n^3)$, against the ~20-60 products of an iterative solve; above a
#: few dozen the iterative `GMRES` wins (benchmarks/bench_solvers.py, $n = 256$).
DIRECT_MAX_DIM = 32


def _reattach(z_star: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    # Forward value exactly z_star, derivatives those of `out`.
    return z_star + (out - out.detach())


class AbstractAdjoint(abc.ABC):
    """Base of the adjoints; never instantiated."""

    def _attach(self, f, z_star: torch.Tensor, params: tuple) -> torch.Tensor:
        """``z_star (B, n)`` attached to autograd; ``f(z, *params)`` is the flat map.

        The default (for adjoints without an implicit rule) is ``z_star`` itself: the solve
        passes no derivative.
        """
        return z_star


@dataclass(frozen=True, kw_only=True)
class ImplicitAdjoint(AbstractAdjoint):
    """Implicit differentiation (implicit function theorem), in every autograd mode.

    For $z^* = f(z^*, \\theta)$ with $J = \\partial f/\\partial z$ at $z^*$ (SPEC 7; Bai, Kolter &
    Koltun, 2019, NeurIPS):

    * reverse mode (``backward``, `torch.func.grad`, `torch.func.jacrev`, `torch.func.vjp`)
      solves the adjoint $u = J^\\top u + \\bar z$ and returns $\\bar\\theta = u^\\top\\partial_\\theta f$;
    * forward mode (`torch.func.jvp`, `torch.func.jacfwd`) solves the tangent
      $\\dot z = J\\dot z + \\partial_\\theta f\\,\\dot\\theta$;
    * `torch.func.vmap` folds the mapped dimension into the solver's batch;

    all with ``linear_solver``, and composably (Hessian-vector products, Jacobians of
    per-sample gradients), for parameters passed explicitly, ``fixed_point(f, z0,
    args=(theta, ...))``. For tensors that ``f`` *closes over*, ordinary first-order autograd
    (``.backward()``, `torch.autograd.grad`) works as before; torch.func transforms need
    ``args``.

    A failed linear solve never returns silently wrong derivatives: it raises `ConvergenceError`
    (``throw=True``) or issues a `ConvergenceWarning`. Samples whose *forward* solve did not
    converge (possible with ``fixed_point(..., throw=False)``) get NaN derivatives. Every linear
    solve, with its achieved residual, is recorded in ``Solution.adjoint_log``.

    Parameters
    ----------
    linear_solver
        An `AbstractLinearSolver`. ``None`` (the default) means `DirectLinearSolver` for
        flattened event dimensions up to `DIRECT_MAX_DIM` and `GMRES` above; both follow the
        forward solve's tolerance (see `deqppl.deq.linear`).
    solver
        Shorthand for ``linear_solver=FixedPointLinearSolver(solver=solver)``: a fixed-point
        solver for the linear problems, e.g. ``Newton(rtol=1e-10)``, which asks for the dense
        $J$ and solves them exactly in one step. Give at most one of the two.
    throw
        Raise (``True``) or warn (``False``) when a linear solve does not converge.

    Examples
    --------
    >>> import torch
    >>> from deqppl.deq import fixed_point
    >>> theta = torch.tensor(0.5, dtype=torch.float64)
    >>> def z_star(theta):  # z* = 1 / (1 - theta)
    ...     return fixed_point(lambda z, t: t * z + 1.0, torch.zeros(1, 1, dtype=torch.float64),
    ...                        args=(theta,)).value.sum()
    >>> round(float(torch.func.grad(z_star)(theta)), 8)  # 1 / (1 - theta)^2
    4.0
    >>> round(float(torch.func.grad(torch.func.grad(z_star))(theta)), 6)  # 2 / (1 - theta)^3
    16.0
    """

    linear_solver: AbstractLinearSolver | None = None
    solver: AbstractSolver | None = None
    throw: bool = True

    def __post_init__(self):
        if self.solver is not None and not isinstance(self.solver, AbstractSolver):
            raise TypeError(f"ImplicitAdjoint.solver must be an AbstractSolver such as "
                            f"Anderson(), got {type(self.solver).__name__}")
        if self.linear_solver is not None and not isinstance(self.linear_solver,
                                                             AbstractLinearSolver):
            raise TypeError(f"ImplicitAdjoint.linear_solver must be an AbstractLinearSolver "
                            f"such as GMRES() or DirectLinearSolver(), got "
                            f"{type(self.linear_solver).__name__}")
        if self.solver is not None and self.linear_solver is not None:
            raise ValueError("give ImplicitAdjoint at most one of solver= and linear_solver= "
                             "(solver=S is shorthand for "
                             "linear_solver=FixedPointLinearSolver(solver=S))")
        if not isinstance(self.throw, bool):
            raise TypeError(f"ImplicitAdjoint.throw must be a bool, got {self.throw!r}")

    def linear_solver_for(self, n: int) -> AbstractLinearSolver:
        """The linear solver used for flattened event dimension ``n``."""
        if self.linear_solver is not None:
            return self.linear_solver
        if self.solver is not None:
            return FixedPointLinearSolver(solver=self.solver)
        return DirectLinearSolver() if n <= DIRECT_MAX_DIM else GMRES()


@dataclass(frozen=True, kw_only=True)
class UnrolledAdjoint(AbstractAdjoint):
    """Backpropagation through ``num_steps`` applications of ``f`` from the detached $z^*$.

    With $z_0 = z^*$ detached and $z_{k+1} = f(z_k)$, the gradient is that of $z_K$, i.e. the
    Neumann series $\\sum_{k<K} J^k\\,\\partial f/\\partial\\theta$ truncated after $K$ terms. It equals
    the implicit gradient up to $O(\\rho(J)^K)$ when $f$ is a contraction near $z^*$ and is
    meaningless otherwise. Memory grows linearly with ``num_steps``; supports double backward
    and torch.func transforms.

    Parameters
    ----------
    num_steps
        Number $K \\ge 1$ of unrolled applications of ``f``.
    """

    num_steps: int = 20

    def __post_init__(self):
        check_int("num_steps", self.num_steps, minimum=1)

    def _attach(self, f, z_star, params):
        if not torch.is_grad_enabled():
            return z_star
        z = z_star.detach()
        for _ in range(self.num_steps):
            z = f(z, *params)
        return _reattach(z_star, z)


@dataclass(frozen=True, kw_only=True)
class OneStepAdjoint(AbstractAdjoint):
    """Jacobian-free gradient: that of one application of ``f`` at the detached $z^*$.

    The gradient is $\\partial f(z^*,\\theta)/\\partial\\theta$, i.e. the implicit gradient with
    $(I - J)^{-1}$ replaced by $I$ (Fung et al., 2022, AAAI). Cheap and exact when $J = 0$ at
    $z^*$; a descent direction under conditions given there.
    """

    def _attach(self, f, z_star, params):
        return UnrolledAdjoint(num_steps=1)._attach(f, z_star, params)


@dataclass(frozen=True, kw_only=True)
class NoAdjoint(AbstractAdjoint):
    """No gradient: ``Solution.value`` is detached.

    Use it when only $z^*$ is needed, or, by the envelope theorem, when the loss is the
    objective whose stationary point $z^*$ is (SPEC 2.4).
    """

    def _attach(self, f, z_star, params):
        return z_star.detach()
