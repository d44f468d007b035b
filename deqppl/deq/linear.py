"""Linear solvers for the implicit adjoint: $u = M u + g$ per sample, $M = J^\\top$ or $J$.

Implicit differentiation of $z^* = f(z^*, \\theta)$ needs, per sample, the solution of a linear
fixed-point problem: the adjoint $u = J^\\top u + g$ (reverse mode) or the tangent
$\\dot z = J\\dot z + \\partial_\\theta f\\,\\dot\\theta$ (forward mode), with $J = \\partial f/\\partial z$
at $z^*$. `ImplicitAdjoint` owns one of these objects:

* `DirectLinearSolver`: forms $M$ densely, ``(B, n, n)``, and solves $(I - M)u = g$ by a batched
  LU factorization; exact up to round-off, cost $O(n^3)$ and $n$ vector-Jacobian products: small
  $n$.
* `GMRES`: restarted GMRES (Saad & Schultz, 1986, SIAM J. Sci. Stat. Comput.), batched per
  sample, one product with $M$ per iteration: large $n$.
* `FixedPointLinearSolver`: any fixed-point solver of this package run on $u \\mapsto Mu + g$
  (``Anderson()``, ``Newton()`` -- which asks the problem for its exact, dense Jacobian $M$ and so
  solves it in one step --, or a user solver).

Tolerances: a linear solver whose ``rtol`` is ``None`` (the default) follows the forward solve,
$\\text{rtol} = \\max(\\text{rtol}_{\\text{forward}}, 64\\,\\varepsilon)$ with $\\varepsilon$ the machine
epsilon of the dtype, and ``atol = 0``: a purely relative rule, so that a small gradient is not
declared converged by an absolute tolerance. The residual is judged as in the forward solve,
$\\lVert Mu + g - u\\rVert_2 \\le \\text{atol} + \\text{rtol}\\,\\lVert Mu + g\\rVert_2$.
"""

from __future__ import annotations

import abc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._solution import Solution, Status
from .protocol import AbstractSolver, FixedPointProblem, check_int, check_tolerances, run_solver

__all__ = [
    "LinearProblem",
    "AbstractLinearSolver",
    "DirectLinearSolver",
    "GMRES",
    "FixedPointLinearSolver",
    "ROUNDOFF_FACTOR",
]

#: Floor of a followed backward ``rtol``, in units of the dtype's machine epsilon. The residual
#: $Mu + g - u$ of a converged solve is computed with a round-off of a few $\varepsilon$ times
#: $\lVert u\rVert$ (one matrix-vector product, sums over $n \le$ a few hundred terms); 64
#: leaves room for that and for $\lVert M\rVert$ of order 1-10: 1.4e-14 in float64, 7.6e-6 in
#: float32 (below the 1e-5 of ``benchmarks/bench_solvers.py``).
ROUNDOFF_FACTOR = 64


class LinearProblem:
    """$u = M u + g$ for a batch of independent samples, as a linear solver sees it.

    Parameters
    ----------
    matvec
        ``u (B, n) -> M u (B, n)``, without autograd.
    rhs
        ``g``, ``(B, n)``.
    matrix
        ``() -> M (B, n, n)``, formed on demand (at most once: it is cached).
    forward_solver
        The solver of the forward problem, whose tolerance a linear solver may follow.

    Attributes
    ----------
    num_matvecs, num_matrices
        Products with $M$ and dense $M$ formed so far.
    """

    def __init__(self, matvec: Callable[[torch.Tensor], torch.Tensor], rhs: torch.Tensor, *,
                 matrix: Callable[[], torch.Tensor], forward_solver: AbstractSolver | None = None):
        self._matvec = matvec
        self.rhs = rhs
        self._matrix_fn = matrix
        self._matrix: torch.Tensor | None = None
        self.forward_solver = forward_solver
        self.num_matvecs = 0
        self.num_matrices = 0

    def matvec(self, u: torch.Tensor) -> torch.Tensor:
        """``M u``, ``(B, n)``."""
        self.num_matvecs += 1
        with torch.no_grad():
            return self._matvec(u)

    def matrix(self) -> torch.Tensor:
        """Dense ``M``, ``(B, n, n)`` (formed once)."""
        if self._matrix is None:
            self.num_matrices += 1
            with torch.no_grad():
                self._matrix = self._matrix_fn()
        return self._matrix

    def followed_rtol(self) -> float:
        """$\\max(\\text{rtol}_{\\text{forward}}, 64\\varepsilon)$ (``1e-6`` without a forward solver)."""
        eps = torch.finfo(self.rhs.dtype).eps
        forward = 1e-6 if self.forward_solver is None else float(self.forward_solver.rtol)
        return max(forward, ROUNDOFF_FACTOR * eps)

    def result(self, u: torch.Tensor, *, solver: str, num_steps: int, wall_time: float,
               rtol: float, atol: float, mu: torch.Tensor | None = None) -> Solution:
        """The `Solution` of a linear solve ending at ``u``, judged with one more product.

        A sample with ``g = 0`` has the exact solution ``u = 0``, whatever ``M`` (even a
        singular ``I - M``, as for a sample whose derivative is masked out), and gets it.
        """
        zero = (self.rhs == 0).all(1)
        if bool(zero.any()):
            u = torch.where(zero[:, None], torch.zeros_like(u), u)
            mu = None if mu is None else torch.where(zero[:, None], torch.zeros_like(mu), mu)
        fu = (self.matvec(u) if mu is None else mu) + self.rhs
        res = torch.linalg.vector_norm(fu - u, dim=1)
        fnorm = torch.linalg.vector_norm(fu, dim=1)
        finite = torch.isfinite(res) & torch.isfinite(fnorm) & torch.isfinite(u).all(1)
        converged = finite & (res <= atol + rtol * fnorm)
        if bool(converged.all()):
            status = Status.CONVERGED
        elif not bool(finite.all()):
            status = Status.NONFINITE
        else:
            status = Status.MAX_STEPS_REACHED
        tiny = torch.finfo(u.dtype).tiny
        return Solution(value=u, residual=res, rel_residual=res / (fnorm + tiny),
                        converged=converged, status=status, num_steps=num_steps,
                        num_fevals=self.num_matvecs, num_jac_evals=self.num_matrices,
                        wall_time=wall_time, trace=None, solver=solver)


class AbstractLinearSolver(abc.ABC):
    """Base of the adjoint's linear solvers; never instantiated.

    A concrete linear solver is a frozen dataclass implementing `solve`.
    """

    @abc.abstractmethod
    def solve(self, problem: LinearProblem, *, init: torch.Tensor | None = None) -> Solution:
        """Solve ``u = M u + g``; ``init`` is an optional ``(B, n)`` starting guess."""

    @property
    def name(self) -> str:
        """Name used in results and error messages."""
        return type(self).__name__

    def _hint(self) -> str:
        return "Try another linear_solver (DirectLinearSolver() for small dimensions)."


def _check_optional_tolerances(owner: str, rtol, atol) -> None:
    if rtol is None:
        check_tolerances(1e-6, atol, owner=owner)  # atol = 0 is fine with a followed rtol
    else:
        check_tolerances(rtol, atol, owner=owner)


@dataclass(frozen=True, kw_only=True)
class DirectLinearSolver(AbstractLinearSolver):
    """Dense batched solve of $(I - M)u = g$: exact up to round-off, for small dimensions.

    $M$ comes from the map's analytic ``jacobian`` when `fixed_point` was given one, else from
    ``n`` vector-Jacobian products (vectorized by `torch.func.vmap`). A singular system, or a
    solution whose residual misses the tolerance (an ill-conditioned $I - M$), is reported as
    not converged.

    Parameters
    ----------
    rtol, atol
        Tolerance of the residual check; ``rtol=None`` follows the forward solve.

    Examples
    --------
    >>> import torch
    >>> from deqppl.deq import DirectLinearSolver, ImplicitAdjoint, fixed_point
    >>> theta = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    >>> sol = fixed_point(lambda z, t: t * z + 1.0, torch.zeros(1, 1, dtype=torch.float64),
    ...                   args=(theta,),
    ...                   adjoint=ImplicitAdjoint(linear_solver=DirectLinearSolver()))
    >>> sol.value.sum().backward(); round(float(theta.grad), 10)  # 1 / (1 - theta)^2
    4.0
    """

    rtol: float | None = None
    atol: float = 0.0

    def __post_init__(self):
        _check_optional_tolerances(self.name, self.rtol, self.atol)

    def solve(self, problem, *, init=None):
        start = time.perf_counter()
        rtol = problem.followed_rtol() if self.rtol is None else self.rtol
        M = problem.matrix()
        n = M.shape[-1]
        eye = torch.eye(n, dtype=M.dtype, device=M.device)
        u, info = torch.linalg.solve_ex(eye - M, problem.rhs)
        u = torch.where((info == 0)[:, None], u, torch.full_like(u, math.nan))
        mu = (M @ u[:, :, None]).squeeze(-1)
        return problem.result(u, solver=self.name, num_steps=1, rtol=rtol, atol=self.atol,
                              wall_time=time.perf_counter() - start, mu=mu)


@dataclass(frozen=True, kw_only=True)
class FixedPointLinearSolver(AbstractLinearSolver):
    """Any fixed-point solver of this package on $u \\mapsto M u + g$.

    The problem offers the solver the exact Jacobian $M$ (formed densely on demand), so
    `Newton` solves it in one step; `Anderson` and `Broyden` need one product with $M$ per step.

    Parameters
    ----------
    solver
        The solver; ``None`` means ``Anderson(rtol=<followed>, atol=0, max_steps=<forward's, at
        least 200>)``. A solver given here keeps its own tolerance.
    """

    solver: AbstractSolver | None = None

    def __post_init__(self):
        if self.solver is not None and not isinstance(self.solver, AbstractSolver):
            raise TypeError(f"FixedPointLinearSolver.solver must be an AbstractSolver such as "
                            f"Anderson(), got {type(self.solver).__name__}")

    @property
    def name(self) -> str:
        inner = "Anderson" if self.solver is None else self.solver.name
        return f"FixedPointLinearSolver({inner})"

    def _solver_for(self, problem: LinearProblem) -> AbstractSolver:
        if self.solver is not None:
            return self.solver
        from .solvers import Anderson

        forward_steps = 0 if problem.forward_solver is None else problem.forward_solver.max_steps
        return Anderson(rtol=problem.followed_rtol(), atol=0.0,
                        max_steps=max(200, forward_steps))

    def _hint(self) -> str:
        return ("A fixed-point solver needs u -> M u + g to be tamed by its safeguards; try "
                "GMRES() or DirectLinearSolver().")

    def solve(self, problem, *, init=None):
        solver = self._solver_for(problem)
        rhs = problem.rhs
        fp = FixedPointProblem(lambda u: problem.matvec(u) + rhs, lambda u: problem.matrix())
        sol = run_solver(solver, fp, rhs if init is None else init)
        return Solution(value=sol.value, residual=sol.residual, rel_residual=sol.rel_residual,
                        converged=sol.converged, status=sol.status, num_steps=sol.num_steps,
                        num_fevals=problem.num_matvecs, num_jac_evals=problem.num_matrices,
                        wall_time=sol.wall_time, trace=None, solver=self.name)


@dataclass(frozen=True, kw_only=True)
class GMRES(AbstractLinearSolver):
    """Restarted GMRES on $(I - M)u = g$, batched per sample.

    Each iteration is one product with $M$ (one vector-Jacobian product for the adjoint) and an
    orthogonalization against the Krylov basis, done twice (classical Gram-Schmidt with
    reorthogonalization, numerically as good as modified Gram-Schmidt; Giraud et al., 2005,
    Numer. Math.). The per-sample residual is estimated by the small Hessenberg least-squares
    problem and checked exactly at every restart; samples that have converged are no longer
    updated. Among methods that use one
    product per iteration and a fixed memory, GMRES minimizes the residual over the Krylov space,
    so it needs no more products than Anderson with the same memory on a linear problem (Walker
    & Ni, 2011, SIAM J. Numer. Anal.).

    Parameters
    ----------
    rtol, atol
        Stopping rule $\\lVert Mu+g-u\\rVert \\le \\text{atol} + \\text{rtol}\\lVert Mu+g\\rVert$;
        ``rtol=None`` follows the forward solve.
    restart
        Krylov dimension before a restart, $\\ge 1$.
    max_steps
        Largest total number of iterations (products with $M$); ``None`` means the forward
        solver's ``max_steps``, at least 200.

    Examples
    --------
    >>> import torch
    >>> from deqppl.deq import GMRES, ImplicitAdjoint, fixed_point
    >>> W = torch.tensor([[0.0, 0.5], [0.5, 0.0]], dtype=torch.float64, requires_grad=True)
    >>> u = torch.ones(3, 2, dtype=torch.float64)
    >>> sol = fixed_point(lambda z, W: torch.tanh(z @ W + u), torch.zeros_like(u), args=(W,),
    ...                   adjoint=ImplicitAdjoint(linear_solver=GMRES()))
    >>> sol.value.sum().backward()
    >>> sol.adjoint_log.last.status.name, sol.adjoint_log.last.solver
    ('CONVERGED', 'GMRES')
    """

    rtol: float | None = None
    atol: float = 0.0
    restart: int = 30
    max_steps: int | None = None

    def __post_init__(self):
        _check_optional_tolerances(self.name, self.rtol, self.atol)
        check_int("restart", self.restart, minimum=1)
        if self.max_steps is not None:
            check_int("max_steps", self.max_steps, minimum=1)

    def _hint(self) -> str:
        return ("Try a larger max_steps or restart, or DirectLinearSolver() for small "
                "dimensions; I - J may be (nearly) singular at the fixed point.")

    def solve(self, problem, *, init=None):
        start = time.perf_counter()
        g = problem.rhs
        rtol = problem.followed_rtol() if self.rtol is None else self.rtol
        atol = self.atol
        if self.max_steps is not None:
            max_steps = self.max_steps
        else:
            forward = 0 if problem.forward_solver is None else problem.forward_solver.max_steps
            max_steps = max(200, forward)
        batch, n = g.shape
        k_max = min(self.restart, n)
        tiny = torch.finfo(g.dtype).tiny
        u = torch.zeros_like(g) if init is None else init.clone()
        mu = problem.matvec(u) if init is not None else torch.zeros_like(g)
        steps = 0
        while True:
            fu = mu + g
            r = fu - u  # residual of u = M u + g, i.e. g - (I - M) u
            res = torch.linalg.vector_norm(r, dim=1)
            tol = atol + rtol * torch.linalg.vector_norm(fu, dim=1)
            active = torch.isfinite(res) & (res > tol)
            if steps >= max_steps or not bool(active.any()):
                break
            beta = res
            V = g.new_zeros(batch, k_max + 1, n)
            H = g.new_zeros(batch, k_max + 1, k_max)
            e1 = g.new_zeros(batch, k_max + 1)
            e1[:, 0] = beta
            V[:, 0] = r / torch.where(beta > 0, beta, torch.ones_like(beta))[:, None]
            # Inner stopping test on the least-squares residual: a little below the tolerance,
            # so that the exact check at the restart rarely asks for another cycle.
            inner_tol = 0.5 * tol
            y = g.new_zeros(batch, 0)
            k = 0
            for j in range(k_max):
                w = V[:, j] - problem.matvec(V[:, j])  # (I - M) v_j
                steps += 1
                basis = V[:, : j + 1]
                h = (basis @ w[:, :, None]).squeeze(-1)
                w = w - (h[:, :, None] * basis).sum(1)
                h2 = (basis @ w[:, :, None]).squeeze(-1)  # reorthogonalize (CGS2)
                w = w - (h2[:, :, None] * basis).sum(1)
                hn = torch.linalg.vector_norm(w, dim=1)
                V[:, j + 1] = w / torch.where(hn > tiny, hn, torch.ones_like(hn))[:, None]
                H[:, : j + 1, j] = h + h2
                H[:, j + 1, j] = hn
                k = j + 1
                # min_y ||beta e1 - H_bar y|| on the (j + 2) x (j + 1) Hessenberg matrix: one
                # small batched least-squares solve (cheaper here than j Givens rotations
                # applied one by one from Python)
                Hk = H[:, : k + 1, :k]
                y = torch.linalg.lstsq(Hk, e1[:, : k + 1, None]).solution.squeeze(-1)
                est = torch.linalg.vector_norm(
                    e1[:, : k + 1] - (Hk @ y[:, :, None]).squeeze(-1), dim=1)
                if steps >= max_steps or not bool((active & (est > inner_tol)).any()):
                    break
            ok = torch.isfinite(y).all(1)
            du = (y[:, :, None] * V[:, :k]).sum(1)
            update = active & ok & torch.isfinite(du).all(1)
            u = torch.where(update[:, None], u + du, u)
            mu = problem.matvec(u)
        return problem.result(u, solver=self.name, num_steps=steps, rtol=rtol, atol=atol,
                              wall_time=time.perf_counter() - start, mu=mu)
