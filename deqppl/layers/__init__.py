"""Implicit layers that are not MAP amortisers: positive concave DEQs and their baselines.

- `PCDEQLinear`, `PCDEQConv2d`: positive concave DEQs (Gabor, Piotrowski & Cavalcante, 2024,
  ICML; SPEC 5) with a run-time `Certificate` (``layer.solve(x, certify=True)``).
- Activations (`Tanh`, `Softsign`, `ReLU6`, `Sigmoid`, `CustomActivation`), injections
  (`SoftplusInjection`, `ReLUInjection`) and cone parametrisations (`SoftplusCone`, `ExpCone`,
  `SquareCone`, `ProjectedCone`) as small frozen objects.
- Baselines on the same DEQ core: `MonDEQLinear`, `MonDEQConv2d` (monotone-operator DEQs solved
  by `ForwardBackward` or `PeacemanRachford` splitting) and `DEQLinear`, `DEQConv2d`
  (unconstrained, Anderson).
- The paper's architectures for any image size and channel count (`linear_classifier`,
  `single_conv_classifier`, `multi_conv_classifier`) with any layer family (`PCDEQFamily`,
  `MonDEQFamily`, `DEQFamily`, `ExplicitFamily`).
- `fit_classifier` / `evaluate_classifier`: training with the cone invariant verified after
  every optimiser step, and solver cost and failures recorded.
"""

from ._base import AbstractImplicitLayer, LayerSolution
from .activations import (AbstractActivation, AbstractInjection, CustomActivation,
                          IdentityInjection, ReLU, ReLU6, ReLUInjection, Sigmoid, Softsign,
                          SoftplusInjection, Tanh, check_concave_nondecreasing)
from .certificate import Certificate, certify, thompson_distance
from .cones import AbstractCone, ExpCone, ProjectedCone, SoftplusCone, SquareCone, check_nonnegative
from .architectures import (AbstractLayerFamily, DEQFamily, ExplicitConv2d, ExplicitFamily,
                            ExplicitLinear, ImageInput, MonDEQFamily, PCDEQFamily,
                            linear_classifier, multi_conv_classifier, num_parameters,
                            single_conv_classifier)
from .mondeq import (AbstractSplitting, ForwardBackward, MonDEQConv2d, MonDEQLinear,
                     MonotoneOperator, PeacemanRachford)
from .unconstrained import DEQConv2d, DEQLinear, default_deq_adjoint, default_deq_solver
from .pcdeq import PCDEQConv2d, PCDEQLinear, default_pcdeq_adjoint, default_pcdeq_solver
from .train import (ClassifierFit, EpochStats, Evaluation, FitStatus, evaluate_classifier,
                    fit_classifier, implicit_layers)

__all__ = [
    "AbstractImplicitLayer", "LayerSolution",
    "PCDEQLinear", "PCDEQConv2d", "default_pcdeq_solver", "default_pcdeq_adjoint",
    "MonDEQLinear", "MonDEQConv2d", "AbstractSplitting", "ForwardBackward", "PeacemanRachford",
    "MonotoneOperator",
    "DEQLinear", "DEQConv2d", "default_deq_solver", "default_deq_adjoint",
    "linear_classifier", "single_conv_classifier", "multi_conv_classifier", "num_parameters",
    "AbstractLayerFamily", "PCDEQFamily", "MonDEQFamily", "DEQFamily", "ExplicitFamily",
    "ImageInput", "ExplicitLinear", "ExplicitConv2d",
    "Certificate", "certify", "thompson_distance",
    "AbstractActivation", "Tanh", "Softsign", "ReLU6", "Sigmoid", "ReLU", "CustomActivation",
    "check_concave_nondecreasing",
    "AbstractInjection", "SoftplusInjection", "ReLUInjection", "IdentityInjection",
    "AbstractCone", "SoftplusCone", "ExpCone", "SquareCone", "ProjectedCone", "check_nonnegative",
    "fit_classifier", "evaluate_classifier", "ClassifierFit", "EpochStats", "Evaluation",
    "FitStatus", "implicit_layers",
]
