"""Learnable amortisers y -> z*(y) whose fixed points are MAP estimates."""

from .deep import DeepPEDEncoder
from .ped import LaplaceResult, PEDEncoder, UniquenessReport, default_adjoint, default_solver

__all__ = [
    "DeepPEDEncoder",
    "LaplaceResult",
    "PEDEncoder",
    "UniquenessReport",
    "default_adjoint",
    "default_solver",
]

from .fit import EncoderFitResult, encoder_loss, fit_encoder  # noqa: E402
from .supervised import SupervisedFitResult, SupervisedPED, fit_supervised  # noqa: E402

__all__ += ["EncoderFitResult", "encoder_loss", "fit_encoder"]
__all__ += ["SupervisedFitResult", "SupervisedPED", "fit_supervised"]
