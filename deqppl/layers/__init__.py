"""Implicit layers that are not MAP amortisers: positive concave DEQs and their baselines.

- `PCDEQLinear`, `PCDEQConv2d`: positive concave DEQs (Gabor, Piotrowski & Cavalcante, 2024,
  ICML; SPEC 5) with a run-time `Certificate` (``layer.solve(x, certify=True)``).
- Activations (`Tanh`, `Softsign`, `ReLU6`, `Sigmoid`, `CustomActivation`), injections
  (`SoftplusInjection`, `ReLUInjection`) and cone parametrisations (`SoftplusCone`, `ExpCone`,
  `SquareCone`, `ProjectedCone`) as small frozen objects.
"""

from ._base import AbstractImplicitLayer, AdjointRecord, LayerSolution
from .activations import (AbstractActivation, AbstractInjection, CustomActivation,
                          IdentityInjection, ReLU, ReLU6, ReLUInjection, Sigmoid, Softsign,
                          SoftplusInjection, Tanh, check_concave_nondecreasing)
from .certificate import Certificate, certify, thompson_distance
from .cones import AbstractCone, ExpCone, ProjectedCone, SoftplusCone, SquareCone, check_nonnegative
from .pcdeq import PCDEQConv2d, PCDEQLinear, default_pcdeq_adjoint, default_pcdeq_solver
from .train import (ClassifierFit, EpochStats, Evaluation, FitStatus, evaluate_classifier,
                    fit_classifier, implicit_layers)

__all__ = [
    "AbstractImplicitLayer", "LayerSolution", "AdjointRecord",
    "PCDEQLinear", "PCDEQConv2d", "default_pcdeq_solver", "default_pcdeq_adjoint",
    "Certificate", "certify", "thompson_distance",
    "AbstractActivation", "Tanh", "Softsign", "ReLU6", "Sigmoid", "ReLU", "CustomActivation",
    "check_concave_nondecreasing",
    "AbstractInjection", "SoftplusInjection", "ReLUInjection", "IdentityInjection",
    "AbstractCone", "SoftplusCone", "ExpCone", "SquareCone", "ProjectedCone", "check_nonnegative",
    "fit_classifier", "evaluate_classifier", "ClassifierFit", "EpochStats", "Evaluation",
    "FitStatus", "implicit_layers",
]
