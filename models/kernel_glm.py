r"""Kernel generalised linear model: RKHS-regularised exponential-family regression (SPEC §4).

$$\hat f=\arg\min_f\ \sum_i\big[A(f(x_i))-T(y_i)f(x_i)\big]
+\tfrac\lambda2\lVert f\rVert^2_{\mathcal H}$$
is the MAP of $f$ under the Gaussian-process prior $f\sim\mathcal N(0,K/\lambda)$ at the training
inputs. The Pyro program whitens that prior: $u\sim\mathcal N(0,I/\lambda)$ and $f=Lu$ with
$LL^\top=K_j=K+jI$ (a small nugget $j$, see :class:`KernelGLM`). At the MAP,
$u^*=L^\top(T(y)-z)/\lambda$ with the fitted mean $z=A'(f^*)$, so $f^*=K_j\alpha$ with the
representer weights $\lambda\alpha=T(y)-A'(K_j\alpha)$, and $z$ is the fixed point of the DEQ
$z=A'(-K_jz/\lambda+K_jT(y)/\lambda)$ (Tsuchida et al., 2022, ICLR). The Gaussian family
gives kernel ridge regression, $f^*=K_j(K_j+\lambda I)^{-1}T(y)$; Bernoulli gives kernel
logistic regression.

Examples
--------
>>> import torch
>>> from deqppl.expfam import gaussian
>>> from deqppl.kernels import SquaredExponential
>>> from deqppl.models.kernel_glm import KernelGLM
>>> model = KernelGLM(gaussian(), SquaredExponential(lengthscale=0.5), lam=0.1)
>>> sim = model.simulate(20, seed=0)
>>> sorted(sim.data), sorted(sim.truth)
(['x', 'y'], ['u'])
>>> data = model.validate(sim.data)
>>> model.deq_weights(data["x"]).W.shape
torch.Size([20, 20])
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import pyro
import pyro.distributions as dist
import torch

from deqppl.encoders.kglm import DEQWeights, kglm_weights
from deqppl.expfam import ExpFamily
from deqppl.kernels import AbstractKernel
from deqppl.protocols import AbstractModel, Simulation, simulate_from
from deqppl.validation import as_tensor, check_data_keys, check_finite, check_real

__all__ = ["DEQWeights", "KernelGLM"]

# Nugget added to K's diagonal when ``jitter=None``. Rounding leaves eigenvalues of a dense
# squared-exponential K (unit variance, 50-400 grid points) down to about -3e-14 in float64 and
# -2e-5 in float32 (measured), so Cholesky succeeds with these margins; float64's 1e-8 is
# GPyTorch's double-precision default.
_DEFAULT_JITTER = {torch.float64: 1e-8, torch.float32: 1e-4}


@dataclass(frozen=True)
class KernelGLM(AbstractModel):
    r"""Kernel GLM $y_i\sim\mathrm{ExpFam}_A(v=f(x_i))$, $f\sim\mathcal N(0,K/\lambda)$ (SPEC §4).

    Parameters
    ----------
    family
        Exponential family of $y$ with its canonical link ($v=f$). Its natural parameter must
        be allowed to take any real value (not :func:`deqppl.expfam.exponential`).
    kernel
        Positive-definite kernel $k$ (e.g. :class:`deqppl.kernels.SquaredExponential`).
    lam
        RKHS penalty $\lambda>0$, the prior precision of the whitened latent $u$.
    jitter
        Nugget $j\ge0$ added to $K$'s diagonal before the Cholesky factorisation, in the
        kernel's units; the model is exactly the kGLM with kernel $k+j\,\delta$. ``None``:
        ``1e-8`` in float64 and ``1e-4`` in float32. Its effect on the Gaussian fit
        $K(K+\lambda I)^{-1}y$ is at most $j\lVert y\rVert/\lambda$ (the derivative of
        $k/(k+\lambda)$ in each eigenvalue $k$ is at most $1/\lambda$).

    Notes
    -----
    A model of the protocol (:class:`deqppl.protocols.AbstractModel`) with coupled locals
    (``plate_name = None``). Sites: latent ``u`` (shape ``(n,)``, the whitened function values), deterministic ``f``
    $=Lu$ and observed ``y``. The coordinates of $f$ are coupled through $L$, so there is no
    ``"data"`` plate (a plate would assert a conditional independence that does not hold) and
    no minibatch subsampling. Each call factorises $K_j$: $O(n^3)$.
    """

    family: ExpFamily
    kernel: AbstractKernel
    lam: float = 1.0
    jitter: float | None = None

    data_names: ClassVar[tuple[str, ...]] = ("x", "y")
    observed_sites: ClassVar[tuple[str, ...]] = ("y",)  # x is a covariate, not a sample site
    local_sites: ClassVar[tuple[str, ...]] = ("u",)
    global_sites: ClassVar[tuple[str, ...]] = ()
    #: No data plate: every coordinate of f = L u depends on all of u (locals coupled).
    plate_name: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        if not isinstance(self.family, ExpFamily):
            raise TypeError(f"family must be an ExpFamily, got {self.family!r}")
        if not isinstance(self.kernel, AbstractKernel):
            raise TypeError(f"kernel must be a deqppl.kernels kernel, got {self.kernel!r}")
        check_real(self.lam, "lam", minimum=0.0, exclusive_minimum=True)
        if self.jitter is not None:
            check_real(self.jitter, "jitter", minimum=0.0)
        if not self.family.domain.is_real_line:  # f = L u ranges over every real number
            raise ValueError(
                f"KernelGLM needs a family whose natural parameter may be any real number; "
                f"{self.family.describe()} needs {self.family.domain_text}"
            )

    # ---------------------------------------------------------------------------------------
    # The Pyro program
    # ---------------------------------------------------------------------------------------
    def __call__(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        subsample_size: int | None = None,
    ) -> torch.Tensor:
        """Pyro program; ``y=None`` samples the observations. Returns ``f`` of shape ``(n,)``.

        Raises
        ------
        NotImplementedError
            If ``subsample_size`` is given: all coordinates of ``f`` depend on all of ``u``.
        """
        if subsample_size is not None:
            raise NotImplementedError(
                "KernelGLM couples every data point through the kernel matrix, so it cannot be "
                "subsampled; fit it full-batch (subsample_size=None)"
            )
        L = self.cholesky(x)
        zeros = torch.zeros(L.shape[0], dtype=L.dtype, device=L.device)
        u = pyro.sample("u", dist.Normal(zeros, self.lam**-0.5).to_event(1))
        f = pyro.deterministic("f", L @ u, event_dim=1)
        pyro.sample("y", self.family.distribution(f).to_event(1), obs=y)
        return f

    # ---------------------------------------------------------------------------------------
    # Protocol shared by the zoo (docs/CONVENTIONS.md)
    # ---------------------------------------------------------------------------------------
    def validate(self, data: Mapping[str, object]) -> dict[str, torch.Tensor]:
        """Check ``{"x": (n,) or (n, p), "y": (n,)}``; return them as tensors of x's dtype.

        Raises
        ------
        TypeError
            If ``x`` or ``y`` is not numeric.
        ValueError
            If a name is missing, a shape is wrong, a value is NaN/Inf, or ``y`` leaves the
            family's support (the message names the row).

        Examples
        --------
        >>> from deqppl.expfam import bernoulli
        >>> from deqppl.kernels import Matern32
        >>> KernelGLM(bernoulli(), Matern32()).validate({"x": [0.0, 1.0], "y": [1, 2]})
        Traceback (most recent call last):
        ...
        ValueError: y has value 2.0 at row 1, column 0, outside the allowed values ...
        """
        check_data_keys(data, self.data_names, "KernelGLM")
        x = as_tensor(data["x"], "x")
        if x.dim() not in (1, 2) or x.shape[0] == 0:
            raise ValueError(f"x must have shape (n,) or (n, p) with n >= 1, got {tuple(x.shape)}")
        check_finite(x, "x")
        y = as_tensor(data["y"], "y", dtype=x.dtype, device=x.device)
        if y.shape != (x.shape[0],):
            raise ValueError(f"y must have shape ({x.shape[0]},) to match x, got {tuple(y.shape)}")
        # as a column, so that error messages name the row of the bad observation
        y = self.family.validate(y.unsqueeze(-1), "y").squeeze(-1)
        return {"x": x, "y": y}

    def simulate(self, num_data: int, *, seed: int, dtype: torch.dtype | None = None) -> Simulation:
        """Draw $u$ (so $f=Lu$) from the prior and $y$ from the family on a grid of inputs.

        Inputs are 1-D, ``linspace(-3, 3, num_data)``; ``truth`` holds ``u`` (recover $f$
        with :meth:`natural`). The draw happens in ``dtype`` (default: torch's default dtype),
        since the jitter default depends on it.
        """
        if int(num_data) != num_data or num_data < 1:
            raise ValueError(f"num_data must be a positive integer, got {num_data!r}")
        dtype = dtype or torch.get_default_dtype()
        x = torch.linspace(-3.0, 3.0, int(num_data), dtype=dtype)
        return simulate_from(
            self,
            num_data=int(num_data),
            seed=seed,
            data_names=self.observed_sites,
            latent_names=self.local_sites,
            covariates={"x": x},
            dtype=dtype,
        )

    # ---------------------------------------------------------------------------------------
    # kGLM helpers (SPEC §4)
    # ---------------------------------------------------------------------------------------
    def gram(self, x: torch.Tensor) -> torch.Tensor:
        """The jittered kernel matrix $K_j=K+jI$ of shape ``(n, n)`` used by the model."""
        # named x (the model's data name), not x1 (the kernel's argument); O(n p) next to K's O(n^2 p)
        K = self.kernel(_check_inputs(x, "x"))
        jitter = _DEFAULT_JITTER.get(K.dtype, 1e-4) if self.jitter is None else self.jitter
        return K + jitter * torch.eye(K.shape[0], dtype=K.dtype, device=K.device)

    def cholesky(self, x: torch.Tensor) -> torch.Tensor:
        """Lower Cholesky factor $L$ of $K_j$; raises ``ValueError`` if it does not exist."""
        L, info = torch.linalg.cholesky_ex(self.gram(x))
        if int(info) != 0:
            raise ValueError(
                f"the kernel matrix plus jitter is not positive definite (Cholesky failed at "
                f"column {int(info) - 1}); increase KernelGLM.jitter (now {self.jitter}, None "
                f"means 1e-8 in float64 and 1e-4 in float32) or use float64"
            )
        return L

    def natural(self, values: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Natural parameters $f=Lu$ at the training inputs from ``values["u"]``, shape ``(n,)``."""
        return self.cholesky(x) @ values["u"]

    def fitted_mean(self, values: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Fitted means $z=A'(f)$ of $T(y)$ at the training inputs, shape ``(n,)``."""
        return self.family.mean(self.natural(values, x))

    def predict_natural(
        self, x_train: torch.Tensor, y_train: torch.Tensor, f: torch.Tensor, x_new: torch.Tensor
    ) -> torch.Tensor:
        r"""$\eta^*=K_*(T(y)-A'(f))/\lambda$ at ``x_new``, shape ``(m,)``.

        Parameters
        ----------
        x_train, y_train
            Training data, shapes ``(n,)`` or ``(n, p)`` and ``(n,)``.
        f
            Natural parameters at the training inputs at the MAP (:meth:`natural`), ``(n,)``.
        x_new
            New inputs, shape ``(m,)`` or ``(m, p)``.
        """
        x_train, x_new = (_check_inputs(x, name) for x, name in ((x_train, "x_train"), (x_new, "x_new")))
        alpha = (self.family.T(y_train) - self.family.mean(f)) / self.lam
        return self.kernel(x_new, x_train) @ alpha

    def predict(
        self, x_train: torch.Tensor, y_train: torch.Tensor, f: torch.Tensor, x_new: torch.Tensor
    ) -> torch.Tensor:
        r"""Predicted means $\sigma(\eta^*)=A'(\eta^*)$ of $T(y)$ at ``x_new``, shape ``(m,)``.

        See :meth:`predict_natural` for the parameters.
        """
        return self.family.mean(self.predict_natural(x_train, y_train, f, x_new))

    def deq_weights(self, x: torch.Tensor) -> DEQWeights:
        r"""Closed-form DEQ weights $W=-K_j/\lambda$, $U=K_j/\lambda$, $b=0$.

        With these, $z=A'(Wz+U\,T(y)+b)$ has the fitted means of this model as its fixed
        point ($K_j$ includes the jitter so that the equality is exact). The construction is
        the library's :func:`deqppl.encoders.kglm.kglm_weights`.
        """
        return kglm_weights(self.gram(x), self.lam)

    def predictive_log_lik(
        self,
        data: Mapping[str, torch.Tensor],
        values: Mapping[str, torch.Tensor],
        heldout: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        r"""$\log p(y^*_a\mid f^*_a)$ at new inputs, per point ``(m,)`` (the harness's held-out score).

        $f^* = K_*K_j^{-1}f = K_*L^{-\top}u$ is the mode of the Gaussian-process conditional of
        $f$ at the new inputs given $f = Lu$ at the training inputs (no nugget between distinct
        points); at the MAP it equals :meth:`predict_natural`'s $K_*(T(y)-A'(f))/\lambda$.

        Parameters
        ----------
        data
            Validated training data ``{"x", "y"}``.
        values
            ``{"u": (n,)}`` at the training inputs.
        heldout
            Validated new data ``{"x": (m,) or (m, p), "y": (m,)}``.

        Examples
        --------
        >>> from deqppl.expfam import gaussian
        >>> from deqppl.kernels import SquaredExponential
        >>> model = KernelGLM(gaussian(), SquaredExponential(), lam=1.0)
        >>> sim = model.simulate(10, seed=0, dtype=torch.float64)
        >>> new = {"x": torch.tensor([0.5], dtype=torch.float64), "y": torch.tensor([0.0], dtype=torch.float64)}
        >>> model.predictive_log_lik(sim.data, sim.truth, new).shape
        torch.Size([1])
        """
        f_new = self._natural_at(data, values, heldout["x"])
        with torch.no_grad():
            return self.family.distribution(f_new).log_prob(heldout["y"]).detach()

    def predictive_mean(
        self,
        data: Mapping[str, torch.Tensor],
        values: Mapping[str, torch.Tensor],
        heldout: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        r"""Predicted means $E[y^*_a\mid f^*_a]$ at new inputs, ``(m,)`` (the report's calibration).

        The same $f^*$ as :meth:`predictive_log_lik`; for Bernoulli the predicted probability,
        for Poisson the rate.
        Parameters as :meth:`predictive_log_lik` (``heldout`` needs only ``"x"``).

        Examples
        --------
        >>> from deqppl.expfam import bernoulli
        >>> from deqppl.kernels import SquaredExponential
        >>> model = KernelGLM(bernoulli(), SquaredExponential(), lam=1.0)
        >>> sim = model.simulate(10, seed=0, dtype=torch.float64)
        >>> p = model.predictive_mean(sim.data, sim.truth, {"x": sim.data["x"][:3]})
        >>> bool(((p > 0) & (p < 1)).all())
        True
        """
        with torch.no_grad():
            # The mean of y itself, from the family's distribution (one source of truth).
            return self.family.distribution(self._natural_at(data, values, heldout["x"])).mean.detach()

    def _natural_at(
        self, data: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor], x_new: torch.Tensor
    ) -> torch.Tensor:
        # f* = K_* L^{-T} u: the Gaussian-process conditional mode at x_new given f = L u.
        x = data["x"]
        L = self.cholesky(x)
        weights = torch.linalg.solve_triangular(L.T, values["u"][:, None], upper=True)[:, 0]
        return self.kernel(x_new, x) @ weights

def _check_inputs(x: object, name: str) -> torch.Tensor:
    """Inputs as a finite ``(n,)`` or ``(n, p)`` tensor, errors naming them by ``name``."""
    t = as_tensor(x, name)
    if t.dim() not in (1, 2):
        raise ValueError(f"{name} must have shape (n,) or (n, p), got {tuple(t.shape)}")
    check_finite(t, name)
    return t
