"""Solving $z = f(z, \theta)$ and differentiating through it (SPEC 2.3, 7).

Imports torch only; usable on its own. One entry function, `fixed_point`, takes a solver object
(`FixedPointIteration`, `Anderson` -- the default --, `Broyden`, `Newton`, or any user subclass
of `AbstractSolver`) and an adjoint object (`ImplicitAdjoint` -- the default --,
`UnrolledAdjoint`, `OneStepAdjoint`, `NoAdjoint`) and returns a typed `Solution`. The implicit
adjoint owns a linear solver (`DirectLinearSolver`, `GMRES`, `FixedPointLinearSolver`) and works
with ``backward`` and with `torch.func` transforms (pass the parameters as ``args``).
`spectral_radius` and `jacobian_regularization` diagnose the map.

Writing a solver: subclass `AbstractSolver` (a frozen dataclass with ``rtol``, ``atol``,
``max_steps``) and implement ``init`` and ``step``; the driver `run_solver` owns convergence,
freezing, divergence, traces and counters (see `deqppl.deq.protocol`).
"""

from ._fixed_point import fixed_point
from ._solution import AdjointLog, ConvergenceError, ConvergenceWarning, Solution, Status
from .adjoints import AbstractAdjoint, ImplicitAdjoint, NoAdjoint, OneStepAdjoint, UnrolledAdjoint
from .diagnostics import jacobian_regularization, spectral_radius
from .linear import (
    GMRES,
    AbstractLinearSolver,
    DirectLinearSolver,
    FixedPointLinearSolver,
    LinearProblem,
)
from .protocol import (
    AbstractSolver,
    FixedPointProblem,
    Iterate,
    Linearization,
    backtracking_line_search,
    check_int,
    check_real,
    check_tolerances,
    run_solver,
)
from .solvers import Anderson, Broyden, FixedPointIteration, Newton

__all__ = [
    "fixed_point",
    "Solution",
    "Status",
    "AdjointLog",
    "ConvergenceError",
    "ConvergenceWarning",
    "AbstractSolver",
    "FixedPointProblem",
    "Iterate",
    "Linearization",
    "run_solver",
    "backtracking_line_search",
    "check_int",
    "check_real",
    "check_tolerances",
    "FixedPointIteration",
    "Anderson",
    "Broyden",
    "Newton",
    "AbstractAdjoint",
    "ImplicitAdjoint",
    "UnrolledAdjoint",
    "OneStepAdjoint",
    "NoAdjoint",
    "AbstractLinearSolver",
    "DirectLinearSolver",
    "GMRES",
    "FixedPointLinearSolver",
    "LinearProblem",
    "spectral_radius",
    "jacobian_regularization",
]
