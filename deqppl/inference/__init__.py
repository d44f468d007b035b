"""MAP inference for deqppl's Pyro models: log joint from the trace, L-BFGS and SVI fits."""

from deqppl.inference.io import load_map, save_map
from deqppl.inference.log_joint import latent_sites, log_joint
from deqppl.inference.map import METHODS, MAPConvergenceError, MAPResult, MAPStatus, fit_map
from deqppl.inference.metrics import principal_angles

__all__ = [
    "METHODS",
    "MAPConvergenceError",
    "MAPResult",
    "MAPStatus",
    "fit_map",
    "latent_sites",
    "load_map",
    "log_joint",
    "principal_angles",
    "save_map",
]
