"""Implicit conjugate and tangent kernels of random DEQs and their shallow equivalents (SPEC 6).

Imports torch (and numpy) only. `RandomDEQ` + `solve_coefficients` solve the four equations;
`predict_kernels` gives $\\bar G$ and $\\bar\\Theta$ on the statistics of a `GaussianMixture`
sample (or of labelled data, `data_statistics`).
"""

from .activations import (ELU, AbstractActivation, Centred, HardTanh, LeakyReLU, ReLU, Swish,
                          Tanh, gaussian_moments, quadrature_moments)
from .gaussian import AbstractQuadrature, CompositeGaussLegendre, GaussHermite, GaussianMoments
from .mixture import (MIN_DIMENSION, AsymptoticsWarning, GaussianMixture, MixtureSample,
                      MixtureStatistics, data_statistics, two_class_mixture)
from .empirical import (DEFAULT_SOLVER, EmpiricalKernels, deq_features, deq_tangent_kernel,
                        draw_deq_weights, empirical_kernels)
from .explicit import (AbstractDesign, ExplicitCoefficients, ExplicitNetwork, MatchResult,
                       OneLayerHardTanh, TwoLayerLeakyReLU, explicit_coefficients, match_network,
                       unmatched_activations)
from .theory import (DEQCoefficients, KernelCoefficients, KernelPrediction, RandomDEQ,
                     SolveStatus, TheoryError, assemble_kernel, predict_kernels,
                     solve_coefficients)

__all__ = [
    "AbstractActivation", "ReLU", "LeakyReLU", "HardTanh", "Tanh", "ELU", "Swish", "Centred",
    "gaussian_moments", "quadrature_moments", "GaussianMoments", "AbstractQuadrature",
    "GaussHermite", "CompositeGaussLegendre",
    "GaussianMixture", "MixtureSample", "MixtureStatistics", "AsymptoticsWarning",
    "two_class_mixture", "data_statistics", "MIN_DIMENSION",
    "RandomDEQ", "KernelCoefficients", "DEQCoefficients", "KernelPrediction", "SolveStatus",
    "TheoryError", "solve_coefficients", "assemble_kernel", "predict_kernels",
    "EmpiricalKernels", "empirical_kernels", "deq_features", "deq_tangent_kernel",
    "draw_deq_weights", "DEFAULT_SOLVER",
    "ExplicitCoefficients", "explicit_coefficients", "ExplicitNetwork", "AbstractDesign",
    "TwoLayerLeakyReLU", "OneLayerHardTanh", "MatchResult", "match_network",
    "unmatched_activations",
]
