"""deqppl: latent-variable models in Pyro, and deep equilibrium encoders whose fixed point is
their MAP estimate.

Subpackages: :mod:`deqppl.expfam` (families and nonlinearities), :mod:`deqppl.deq` (fixed
points and implicit gradients), :mod:`deqppl.inference` (MAP by SVI and L-BFGS),
:mod:`deqppl.encoders` (PED encoders), :mod:`deqppl.harness` (comparisons),
:mod:`deqppl.report` (tables, plots, ArviZ), :mod:`deqppl.models` (the zoo).
"""

__version__ = "0.1.0"
