"""Optimiser settings objects, one status enum, one result shape and the one optimiser driver.

Settings say *how* to optimise and are passed to the fit functions:
``fit_map(model, data, optimizer=LBFGS())``, ``fit_map(..., optimizer=SVI(lr=0.05))``,
``fit_encoder(encoder, y, optimizer=Adam(num_epochs=30))``. Strings naming optimisers exist
only at the command line (:mod:`deqppl.cli`).

Examples
--------
>>> from deqppl.optim import LBFGS, SVI, ExponentialDecay
>>> LBFGS(max_steps=100).max_steps
100
>>> SVI(schedule=ExponentialDecay(final_factor=0.1)).schedule
ExponentialDecay(final_factor=0.1)
"""

from deqppl.optim._alternating import AlternatingNewton
from deqppl.optim._driver import AbstractStepper, DriverOutcome, Observation, StopRules, drive
from deqppl.optim._lbfgs import LBFGSStepper
from deqppl.optim._minimize import MinimizeResult, lbfgs_rules, minimize
from deqppl.optim._result import AbstractFitResult, FitConvergenceError, FitStatus
from deqppl.optim._settings import (
    LBFGS,
    SVI,
    AbstractOptimizer,
    AbstractSchedule,
    Adam,
    ConstantLR,
    CosineDecay,
    ExponentialDecay,
    PlateauDecay,
)

__all__ = [
    "LBFGS",
    "AlternatingNewton",
    "SVI",
    "AbstractFitResult",
    "AbstractOptimizer",
    "AbstractSchedule",
    "AbstractStepper",
    "Adam",
    "ConstantLR",
    "CosineDecay",
    "DriverOutcome",
    "ExponentialDecay",
    "FitConvergenceError",
    "FitStatus",
    "LBFGSStepper",
    "MinimizeResult",
    "Observation",
    "PlateauDecay",
    "StopRules",
    "drive",
    "lbfgs_rules",
    "minimize",
]
