r"""Exponential-family PCA (SPEC §2.1; Tsuchida & Ong, 2023, AISTATS).

$$\eta_s = W z_s + B,\qquad y_{si}\sim\mathrm{ExpFam}_A\big(v=R(\eta_{si})\big),\qquad
z_s\sim\mathcal N(0,\lambda^{-1}I),\qquad W_{ij}, B_i\sim\mathcal N(0, s^2).$$

The Pyro program in :meth:`ExpFamPCA.__call__` is the single source of this density; the log
joint, MAP fits and the PED encoders are derived from it or tested against it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch

from deqppl.expfam import ExpFamily, Likelihood, Nonlinearity, family, identity, nonlinearity
from deqppl.io.registry import register
from deqppl.protocols import AbstractModel, Simulation, num_rows, param_prior, simulate_from
from deqppl.validation import check_data_keys, check_int, check_real, check_shape

__all__ = ["ExpFamPCA"]


@register("ExpFamPCA")
@dataclass(frozen=True, kw_only=True)
class ExpFamPCA(AbstractModel):
    r"""Exponential-family PCA as a Pyro model.

    Parameters
    ----------
    family
        Observation family (a row of :data:`deqppl.expfam.FAMILIES`).
    obs_dim, latent_dim
        $d$ and $l$.
    nonlinearity
        Canonical nonlinearity $R$ (default identity: classical exponential-family PCA).
    lam
        Latent prior precision $\lambda$: $z_s\sim\mathcal N(0,\lambda^{-1}I)$.
    param_scale
        Prior standard deviation $s$ of every entry of $W$ and $B$. The default 1.0 keeps
        simulated natural parameters of order one (their variance is $s^2(l/\lambda+1)$) and
        makes the joint MAP well posed; ``None`` gives $W, B$ an improper flat prior (the
        paper's unregularised setting; :meth:`simulate` then draws them from
        $\mathcal N(0, 1)$).

    Raises
    ------
    ValueError
        Bad sizes or precisions, or a nonlinearity whose range leaves the family's
        natural-parameter domain (e.g. ``exponential()`` needs ``neg_smooth_relu``).

    Notes
    -----
    A model of the protocol (:class:`deqppl.protocols.AbstractModel`): sites: globals ``W``
    $(d, l)$ and ``B`` $(d,)$; local ``z`` $(N, l)$ inside the plate ``"data"``; observation
    ``y`` $(N, d)$. ``log_joint(data, values, *, per_datum=False)`` comes from the trace.

    Examples
    --------
    >>> from deqppl.expfam import family
    >>> model = ExpFamPCA(family=family("poisson"), obs_dim=5, latent_dim=2)
    >>> sim = model.simulate(10, seed=0)
    >>> sim.data["y"].shape, sim.truth["W"].shape
    (torch.Size([10, 5]), torch.Size([5, 2]))
    >>> bool(model.log_joint(sim.data, sim.truth).isfinite())
    True
    >>> from deqppl.expfam import exponential
    >>> ExpFamPCA(family=exponential(), obs_dim=5, latent_dim=2)
    Traceback (most recent call last):
    ...
    ValueError: nonlinearity identity takes values in (-inf, inf), which leaves the natural-parameter domain (-inf, 0) of exponential(); ...
    """

    family: ExpFamily
    obs_dim: int
    latent_dim: int
    nonlinearity: Nonlinearity = field(default_factory=identity)
    lam: float = 1.0
    param_scale: float | None = 1.0

    data_names = ("y",)
    local_sites = ("z",)
    global_sites = ("W", "B")

    def __post_init__(self) -> None:
        if not isinstance(self.family, ExpFamily):
            raise TypeError(f"family must be an ExpFamily, got {type(self.family).__name__}")
        for name in ("obs_dim", "latent_dim"):
            check_int(getattr(self, name), name, minimum=1)
        check_real(self.lam, "lam (latent prior precision)", minimum=0.0, exclusive_minimum=True)
        if self.param_scale is not None:
            check_real(self.param_scale, "param_scale", minimum=0.0, exclusive_minimum=True)
        # rejects a nonlinearity whose range leaves the family's natural-parameter domain
        # (and gaussian-only R with other families), before any fitting
        Likelihood(self.family, self.nonlinearity)

    def config(self) -> dict:
        """The hyperparameters as JSON (the saved-model protocol, :func:`deqppl.io.save`).

        Examples
        --------
        >>> from deqppl.expfam import binomial, smooth_relu
        >>> m = ExpFamPCA(family=binomial(16), obs_dim=3, latent_dim=2, nonlinearity=smooth_relu(0.5))
        >>> ExpFamPCA.from_config(m.config()) == m
        True
        """
        return {
            "family": self.family.config(),
            "nonlinearity": self.nonlinearity.config(),
            "obs_dim": self.obs_dim,
            "latent_dim": self.latent_dim,
            "lam": self.lam,
            "param_scale": self.param_scale,
        }

    @classmethod
    def from_config(cls, config: Mapping) -> ExpFamPCA:
        """The model of :meth:`config`."""
        return cls(
            family=family(**config["family"]),
            nonlinearity=nonlinearity(**config["nonlinearity"]),
            obs_dim=config["obs_dim"],
            latent_dim=config["latent_dim"],
            lam=config["lam"],
            param_scale=config["param_scale"],
        )

    @property
    def likelihood(self) -> Likelihood:
        """The observation model $y\\mid\\eta$ (family paired with the nonlinearity)."""
        return Likelihood(self.family, self.nonlinearity)

    def __call__(
        self,
        y: torch.Tensor | None = None,
        *,
        num_data: int | None = None,
        subsample_size: int | None = None,
    ) -> torch.Tensor:
        """The Pyro program; ``y=None`` samples observations (then ``num_data`` is required).

        Returns the observations of the (sub)sampled rows, shape ``(n, obs_dim)``.
        """
        n = num_rows(y, num_data)
        dtype = y.dtype if y is not None else torch.get_default_dtype()
        d, l = self.obs_dim, self.latent_dim
        W = pyro.sample("W", param_prior(self.param_scale, (d, l), dtype=dtype))
        B = pyro.sample("B", param_prior(self.param_scale, (d,), dtype=dtype))
        z_scale = torch.tensor(self.lam, dtype=dtype).rsqrt()
        with pyro.plate("data", n, subsample_size=subsample_size, dim=-1) as idx:
            z = pyro.sample("z", dist.Normal(0.0, z_scale).expand([len(idx), l]).to_event(1))
            obs = None if y is None else y.index_select(0, idx)
            eta = z @ W.T + B
            return pyro.sample("y", self.likelihood.distribution(eta).to_event(1), obs=obs)

    def validate(self, data: Mapping[str, object]) -> dict[str, torch.Tensor]:
        """Check ``{"y": (N, obs_dim)}`` (numeric, finite, in the family's support).

        Raises
        ------
        TypeError
            Non-numeric data or not a mapping.
        ValueError
            Wrong keys, wrong shape, NaN/Inf or values outside the support; the message names
            the value, its row and column and what is allowed.
        """
        check_data_keys(data, self.data_names, "ExpFamPCA")
        y = self.family.validate(data["y"], "y")
        check_shape(y, (None, self.obs_dim), "y")
        return {"y": y}

    def simulate(self, num_data: int, *, seed: int, dtype: torch.dtype | None = None) -> Simulation:
        r"""Draw $(W, B, z, y)$ from the model; see :func:`deqppl.protocols.simulate_from`.

        With the flat prior (``param_scale=None``) $W, B$ are drawn from $\mathcal N(0, 1)$.
        """
        fixed = None
        if self.param_scale is None:
            d, l = self.obs_dim, self.latent_dim
            fixed = {"W": lambda: torch.randn(d, l), "B": lambda: torch.randn(d)}
        return simulate_from(
            self,
            num_data=num_data,
            seed=seed,
            data_names=self.data_names,
            latent_names=self.global_sites + self.local_sites,
            fixed=fixed,
            dtype=dtype,
        )

    def global_metrics(
        self, values: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]
    ) -> dict[str, float]:
        """Compare two fits' globals where the joint MAP leaves a rotation undetermined.

        ``subspace_angle``: the largest principal angle (radians) between the column spaces of
        the loadings ``W`` of ``values`` and of ``reference`` (the harness's fit-stage hook).

        Examples
        --------
        >>> from deqppl.expfam import family
        >>> model = ExpFamPCA(family=family("poisson"), obs_dim=2, latent_dim=1)
        >>> W = torch.tensor([[1.0], [0.0]])
        >>> round(model.global_metrics({"W": W}, {"W": torch.tensor([[1.0], [1.0]])})["subspace_angle"], 4)
        0.7854
        """
        from deqppl.inference import principal_angles

        return {"subspace_angle": float(principal_angles(values["W"], reference["W"]).max())}
