"""Failures are loud and say what to try; invalid settings are rejected at construction."""

from __future__ import annotations

import pytest
import torch
from deq_problems import DTYPE

from deqppl.deq import (
    GMRES,
    Anderson,
    Broyden,
    ConvergenceError,
    DirectLinearSolver,
    FixedPointIteration,
    ImplicitAdjoint,
    Newton,
    Status,
    UnrolledAdjoint,
    fixed_point,
)

ALL_SOLVERS = [FixedPointIteration(), Anderson(), Broyden(), Newton()]
IDS = ["plain", "anderson", "broyden", "newton"]


@pytest.mark.parametrize("solver", ALL_SOLVERS, ids=IDS)
def test_f_changing_shape_is_rejected(solver):
    with pytest.raises(ValueError, match=r"shape \(3, 2\).*\(3, 1\)"):
        fixed_point(lambda z: z[:, :1], torch.zeros(3, 2, dtype=DTYPE), solver=solver)


@pytest.mark.parametrize("solver", ALL_SOLVERS, ids=IDS)
def test_f_changing_dtype_is_rejected(solver):
    with pytest.raises(TypeError, match="float64.*float32"):
        fixed_point(lambda z: z.float(), torch.zeros(3, 2, dtype=DTYPE), solver=solver)


def test_bad_z0_and_bad_options():
    with pytest.raises(TypeError, match="floating"):
        fixed_point(torch.cos, torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="batch"):
        fixed_point(torch.cos, torch.tensor(0.0))
    with pytest.raises(TypeError, match="solver"):
        fixed_point(torch.cos, torch.zeros(3, 2), solver="anderson")
    with pytest.raises(TypeError, match="adjoint"):
        fixed_point(torch.cos, torch.zeros(3, 2), adjoint="implicit")
    with pytest.raises(ValueError, match="jacobian"):
        fixed_point(torch.cos, torch.zeros(3, 2), solver=Newton(),
                    jacobian=lambda z: torch.zeros(3, 2))


@pytest.mark.parametrize("solver", ALL_SOLVERS, ids=IDS)
def test_nonfinite_iterates(solver):
    """Sample 1 leaves the domain of log (NaN); the others converge to the fixed point of 0.5 z."""
    bad = torch.tensor([False, True, False])[:, None]

    def f(z):
        return torch.where(bad, torch.log(z - 10.0), 0.5 * z)

    z0 = torch.ones(3, 2, dtype=DTYPE)
    sol = fixed_point(f, z0, solver=solver, throw=False)
    assert sol.status is Status.NONFINITE
    assert sol.converged.tolist() == [True, False, True]
    assert torch.isfinite(sol.value).all()
    with pytest.raises(ConvergenceError, match=r"1 of 3 samples.*worst residual.*non-finite"):
        fixed_point(f, z0, solver=solver)


def test_overflow_is_nonfinite():
    sol = fixed_point(lambda z: z * z + 1.0, torch.full((2, 1), 2.0, dtype=DTYPE),
                      solver=FixedPointIteration(), throw=False)
    assert sol.status in (Status.NONFINITE, Status.DIVERGED) and not sol.converged.any()


INVALID = {
    "negative_memory": lambda: Anderson(memory=-1),
    "zero_memory": lambda: Anderson(memory=0),
    "float_memory": lambda: Anderson(memory=2.5),
    "zero_damping": lambda: Anderson(damping=0.0),
    "damping_above_one": lambda: FixedPointIteration(damping=1.5),
    "negative_damping": lambda: FixedPointIteration(damping=-0.1),
    "negative_ridge": lambda: Anderson(ridge=-1e-4),
    "zero_restart": lambda: Anderson(restart=0),
    "safeguard_below_one": lambda: Anderson(safeguard=0.5),
    "nan_rtol": lambda: Anderson(rtol=float("nan")),
    "negative_rtol": lambda: Broyden(rtol=-1.0),
    "zero_tolerances": lambda: Newton(rtol=0.0, atol=0.0),
    "zero_max_steps": lambda: FixedPointIteration(max_steps=0),
    "bool_max_steps": lambda: Anderson(max_steps=True),
    "broyden_zero_memory": lambda: Broyden(memory=0),
    "newton_zero_backtracks": lambda: Newton(max_backtracks=0),
    "newton_line_search_not_bool": lambda: Newton(line_search=1),
    "unrolled_zero_steps": lambda: UnrolledAdjoint(num_steps=0),
}


@pytest.mark.parametrize("make", list(INVALID.values()), ids=list(INVALID))
def test_invalid_settings_rejected_at_construction(make):
    with pytest.raises(ValueError):
        make()


def test_adjoint_solver_must_be_a_solver():
    with pytest.raises(TypeError, match="AbstractSolver"):
        ImplicitAdjoint(solver="anderson")


BAD_TOLERANCES = [
    ("rtol", float("inf"), r"rtol must be a finite number in \[0, 1\)"),
    ("rtol", 1.0, r"rtol must be a finite number in \[0, 1\)"),
    ("rtol", 5.0, r"rtol must be a finite number in \[0, 1\)"),
    ("rtol", -1e-6, r"rtol must be a finite number in \[0, 1\)"),
    ("rtol", float("nan"), r"rtol must be a finite number in \[0, 1\)"),
    ("atol", 1e300, r"atol must be a finite number in \[0, 1e\+100\]"),
    ("atol", float("inf"), r"atol must be a finite number in \[0, 1e\+100\]"),
    ("atol", float("nan"), r"atol must be a finite number in \[0, 1e\+100\]"),
    ("atol", -1.0, r"atol must be a finite number in \[0, 1e\+100\]"),
]
SOLVER_CLASSES = [FixedPointIteration, Anderson, Broyden, Newton]


@pytest.mark.parametrize("cls", SOLVER_CLASSES, ids=[c.__name__ for c in SOLVER_CLASSES])
@pytest.mark.parametrize("field,value,message", BAD_TOLERANCES,
                         ids=[f"{f}={v}" for f, v, _ in BAD_TOLERANCES])
def test_meaningless_tolerances_are_refused(cls, field, value, message):
    """Issue 12: Anderson(rtol=inf) and FixedPointIteration(atol=1e300) accepted any residual."""
    with pytest.raises(ValueError, match=f"{cls.__name__} {message}.*got"):
        cls(**{field: value})


@pytest.mark.parametrize("cls", [GMRES, DirectLinearSolver], ids=["gmres", "direct"])
@pytest.mark.parametrize("field,value,message", BAD_TOLERANCES,
                         ids=[f"{f}={v}" for f, v, _ in BAD_TOLERANCES])
def test_meaningless_linear_solver_tolerances_are_refused(cls, field, value, message):
    with pytest.raises(ValueError, match=message):
        cls(**{field: value})


def test_largest_meaningful_tolerances_are_accepted():
    Anderson(rtol=0.999, atol=1e100)
    GMRES(rtol=None, atol=0.0)
    with pytest.raises(ValueError, match="restart"):
        GMRES(restart=0)
