"""MAP inference for deqppl's Pyro models: log joint from the trace, L-BFGS and SVI fits.

Optimisers are settings objects of :mod:`deqppl.optim` (``LBFGS``, ``SVI``); the status of
every fit is a :class:`~deqppl.optim.FitStatus`.
"""

from deqppl.inference.io import load_map, save_map
from deqppl.inference.log_joint import latent_sites, log_joint
from deqppl.inference.map import MAPResult, fit_map
from deqppl.inference.metrics import principal_angles
from deqppl.optim import LBFGS, SVI, FitConvergenceError, FitStatus

__all__ = [
    "LBFGS",
    "SVI",
    "FitConvergenceError",
    "FitStatus",
    "MAPResult",
    "fit_map",
    "latent_sites",
    "load_map",
    "log_joint",
    "principal_angles",
    "save_map",
]
