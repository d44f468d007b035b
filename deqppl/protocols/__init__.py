r"""The public protocols: what a model must declare and provide, and the check that it does.

A *model* is a Pyro program plus declarations (``data_names``, ``observed_sites``,
``local_sites``, ``global_sites``, ``plate_name``) and three methods (``validate``,
``simulate``, ``log_joint``); see :class:`AbstractModel` for the defaults derived from the
program and :class:`PyroModel` to wrap a plain Pyro function. :func:`check_model` runs the
contract (:data:`MODEL_RULES`) on any model. The harness, the MAP fits and the encoders rely on
nothing else, and deqppl never imports the zoo (:mod:`deqppl.models` is built on this API).

The encoder protocol is :class:`deqppl.encoders.AbstractMAPEncoder`.

Examples
--------
>>> import pyro, pyro.distributions as dist
>>> from deqppl.protocols import PyroModel, check_model
>>> def program(y=None, *, num_data=None):
...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
...     with pyro.plate("data", len(y) if y is not None else num_data):
...         z = pyro.sample("z", dist.Normal(mu, 1.0))
...         return pyro.sample("y", dist.Normal(z, 0.5), obs=y)
>>> model = PyroModel(program, data_names=("y",), local_sites=("z",), global_sites=("mu",))
>>> report = check_model(model)
>>> report.skipped
(('validate_rejects_outside_support', "every observed site's support is the real line"),)
"""

from ._check import MODEL_RULES, ModelCheckReport, ModelRule, ProtocolError, check_model
from ._model import AbstractModel, PyroModel, Simulation, simulate_from
from ._programs import num_rows, param_prior

__all__ = [
    "AbstractModel",
    "MODEL_RULES",
    "ModelCheckReport",
    "ModelRule",
    "ProtocolError",
    "PyroModel",
    "Simulation",
    "check_model",
    "num_rows",
    "param_prior",
    "simulate_from",
]
