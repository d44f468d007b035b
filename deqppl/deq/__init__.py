"""Solving $z = f(z)$ and differentiating through it (SPEC 2.3, 7).

Imports torch only; usable on its own. One entry function, `fixed_point`, takes a solver object
(`FixedPointIteration`, `Anderson` -- the default --, `Broyden`, `Newton`) and an adjoint object
(`ImplicitAdjoint` -- the default --, `UnrolledAdjoint`, `OneStepAdjoint`, `NoAdjoint`) and returns
a typed `Solution`; `spectral_radius` and `jacobian_regularization` diagnose the map.
"""

from ._fixed_point import fixed_point
from ._solution import ConvergenceError, ConvergenceWarning, Solution, Status
from .adjoints import AbstractAdjoint, ImplicitAdjoint, NoAdjoint, OneStepAdjoint, UnrolledAdjoint
from .diagnostics import jacobian_regularization, spectral_radius
from .solvers import AbstractSolver, Anderson, Broyden, FixedPointIteration, Newton

__all__ = [
    "fixed_point",
    "Solution",
    "Status",
    "ConvergenceError",
    "ConvergenceWarning",
    "AbstractSolver",
    "FixedPointIteration",
    "Anderson",
    "Broyden",
    "Newton",
    "AbstractAdjoint",
    "ImplicitAdjoint",
    "UnrolledAdjoint",
    "OneStepAdjoint",
    "NoAdjoint",
    "spectral_radius",
    "jacobian_regularization",
]
