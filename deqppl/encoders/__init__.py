"""Learnable amortisers data -> z*(data) whose fixed points are MAP estimates.

Every encoder implements the encoder protocol :class:`AbstractMAPEncoder` (``deqppl.encoders.base``).
"""

from .base import AbstractMAPEncoder, LaplaceResult, default_adjoint, default_rtol, weighted_gram
from .deep import DeepPEDEncoder
from .ped import PEDEncoder, UniquenessReport, default_solver
from .starts import AbstractStart, LearnedStart, RidgeStart, ZeroStart, check_start, load_start

__all__ = [
    "AbstractMAPEncoder",
    "AbstractStart",
    "LearnedStart",
    "RidgeStart",
    "ZeroStart",
    "check_start",
    "load_start",
    "DeepPEDEncoder",
    "LaplaceResult",
    "PEDEncoder",
    "UniquenessReport",
    "default_adjoint",
    "default_rtol",
    "default_solver",
    "weighted_gram",
]

from .fit import EncoderFitResult, encoder_loss, fit_encoder  # noqa: E402
from .supervised import SupervisedFitResult, SupervisedPED, fit_supervised  # noqa: E402

__all__ += ["EncoderFitResult", "encoder_loss", "fit_encoder"]
__all__ += ["SupervisedFitResult", "SupervisedPED", "fit_supervised"]

from .auto import (  # noqa: E402
    AutoDEQ,
    CurvatureReport,
    NotAMinimumError,
    SafeguardedLBFGS,
    SafeguardedNewton,
)

__all__ += ["AutoDEQ", "CurvatureReport", "NotAMinimumError", "SafeguardedLBFGS", "SafeguardedNewton"]

from .kglm import (  # noqa: E402
    DEQWeights,
    HeadWeights,
    Informed,
    KernelGLMEncoder,
    KGLMFit,
    KGLMLayer,
    Naive,
    Random,
    solve_kglm,
)

__all__ += ["DEQWeights", "HeadWeights", "Informed", "KGLMFit", "KGLMLayer", "KernelGLMEncoder"]
__all__ += ["Naive", "Random", "solve_kglm"]
