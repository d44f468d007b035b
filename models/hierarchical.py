r"""Hierarchical Gaussian latents with canonical nonlinearities (SPEC §3; Tsuchida & Ong, 2023, eq. 10).

$y = z^{(0)}$; for $l = L, \dots, 1$:
$z^{(l-1)}\mid z^{(l)}$ is Gaussian with precision $\lambda^{(l-1)}$ and natural parameter
$R^{(l)}(W^{(l)}z^{(l)} + b^{(l)})$ (the ``gaussian(precision)`` row of the family table, so its
mean is $R^{(l)}(\cdot)/\sqrt{\lambda^{(l-1)}}$); top prior $z^{(L)}\sim\mathcal N(0, 1/\lambda^{(L)})$;
$W^{(l)}\in\mathbb R^{d_{l-1}\times d_l}$ and $b^{(l)}\in\mathbb R^{d_{l-1}}$ have iid
$\mathcal N(0, s^2)$ entries (or a flat prior).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch

from deqppl.expfam import Likelihood, Nonlinearity, gaussian, identity, nonlinearity
from deqppl.io.registry import register
from deqppl.protocols import AbstractModel, Simulation, num_rows, param_prior, simulate_from
from deqppl.validation import check_data_keys, check_real, check_shape

__all__ = ["HierarchicalExpFamPCA"]


@register("HierarchicalExpFamPCA")
@dataclass(frozen=True, kw_only=True)
class HierarchicalExpFamPCA(AbstractModel):
    r"""$L$ layers of Gaussian latents linked by canonical nonlinearities.

    Parameters
    ----------
    widths
        $(d_0, d_1, \dots, d_L)$: observation width then latent widths, $L \ge 1$.
    nonlinearities
        $(R^{(1)}, \dots, R^{(L)})$; default identity for every layer.
    precisions
        $(\lambda^{(0)}, \dots, \lambda^{(L)})$: observation precision, intermediate
        conditional precisions and the top prior precision; default all 1.
    param_scale
        Prior sd $s$ of the entries of every $W^{(l)}$, $b^{(l)}$ (default 1.0, as
        :class:`ExpFamPCA`); ``None`` for a flat prior (simulation then draws $\mathcal N(0,1)$).

    Notes
    -----
    A model of the protocol (:class:`deqppl.protocols.AbstractModel`). Sites: globals ``W1..WL`` $(d_{l-1}, d_l)$, ``b1..bL`` $(d_{l-1},)$; locals ``z1..zL``
    $(N, d_l)$ in the plate ``"data"``; observation ``y`` $(N, d_0)$.

    Examples
    --------
    >>> model = HierarchicalExpFamPCA(widths=(6, 3, 2))
    >>> model.local_sites, model.global_sites
    (('z1', 'z2'), ('W1', 'W2', 'b1', 'b2'))
    >>> sim = model.simulate(4, seed=0)
    >>> sim.data["y"].shape, sim.truth["z2"].shape
    (torch.Size([4, 6]), torch.Size([4, 2]))
    """

    widths: tuple[int, ...]
    nonlinearities: tuple[Nonlinearity, ...] | None = None
    precisions: tuple[float, ...] | None = None
    param_scale: float | None = 1.0

    data_names = ("y",)

    def __post_init__(self) -> None:
        widths = tuple(self.widths)
        if len(widths) < 2 or any(isinstance(w, bool) or int(w) != w or w < 1 for w in widths):
            raise ValueError(
                f"widths must be (d_0, d_1, ..., d_L) with L >= 1 positive integers, got {self.widths!r}"
            )
        object.__setattr__(self, "widths", tuple(int(w) for w in widths))
        depth = len(widths) - 1
        nls = self.nonlinearities
        nls = tuple(identity() for _ in range(depth)) if nls is None else tuple(nls)
        if len(nls) != depth or not all(isinstance(r, Nonlinearity) for r in nls):
            raise ValueError(f"nonlinearities must be {depth} Nonlinearity objects (one per layer), got {nls!r}")
        object.__setattr__(self, "nonlinearities", nls)
        precs = (1.0,) * (depth + 1) if self.precisions is None else tuple(self.precisions)
        if len(precs) != depth + 1 or not all(
            not isinstance(p, bool) and isinstance(p, numbers.Real) and p > 0 and math.isfinite(p)
            for p in precs
        ):
            raise ValueError(
                f"precisions must be {depth + 1} positive finite numbers (lambda^(0)..lambda^(L)), got {precs!r}"
            )
        object.__setattr__(self, "precisions", tuple(float(p) for p in precs))
        if self.param_scale is not None:
            check_real(self.param_scale, "param_scale", minimum=0.0, exclusive_minimum=True)
        for layer in range(1, depth + 1):
            self.likelihood(layer)  # each R^(l) must map into the Gaussian's natural parameters

    def config(self) -> dict:
        """The hyperparameters as JSON (the saved-model protocol, :func:`deqppl.io.save`).

        Examples
        --------
        >>> m = HierarchicalExpFamPCA(widths=(6, 3, 2), precisions=(2.0, 1.0, 0.5))
        >>> HierarchicalExpFamPCA.from_config(m.config()) == m
        True
        """
        return {
            "widths": list(self.widths),
            "nonlinearities": [r.config() for r in self.nonlinearities],
            "precisions": list(self.precisions),
            "param_scale": self.param_scale,
        }

    @classmethod
    def from_config(cls, config: Mapping) -> HierarchicalExpFamPCA:
        """The model of :meth:`config`."""
        return cls(
            widths=tuple(config["widths"]),
            nonlinearities=tuple(nonlinearity(**r) for r in config["nonlinearities"]),
            precisions=tuple(config["precisions"]),
            param_scale=config["param_scale"],
        )

    @property
    def depth(self) -> int:
        """Number of latent layers $L$."""
        return len(self.widths) - 1

    @property
    def local_sites(self) -> tuple[str, ...]:
        """``("z1", ..., "zL")``, bottom layer first."""
        return tuple(f"z{l}" for l in range(1, self.depth + 1))

    @property
    def global_sites(self) -> tuple[str, ...]:
        """``("W1", ..., "WL", "b1", ..., "bL")``."""
        layers = range(1, self.depth + 1)
        return tuple(f"W{l}" for l in layers) + tuple(f"b{l}" for l in layers)

    def likelihood(self, layer: int) -> Likelihood:
        """The conditional of $z^{(l-1)}$ given the pre-activation of layer ``layer`` $= l$."""
        return Likelihood(gaussian(self.precisions[layer - 1]), self.nonlinearities[layer - 1])

    def __call__(
        self,
        y: torch.Tensor | None = None,
        *,
        num_data: int | None = None,
        subsample_size: int | None = None,
    ) -> torch.Tensor:
        """The Pyro program; ``y=None`` samples observations (then ``num_data`` is required)."""
        n = num_rows(y, num_data)
        dtype = y.dtype if y is not None else torch.get_default_dtype()
        d, L = self.widths, self.depth
        W = {l: pyro.sample(f"W{l}", param_prior(self.param_scale, (d[l - 1], d[l]), dtype=dtype)) for l in range(1, L + 1)}
        b = {l: pyro.sample(f"b{l}", param_prior(self.param_scale, (d[l - 1],), dtype=dtype)) for l in range(1, L + 1)}
        top_scale = torch.tensor(self.precisions[L], dtype=dtype).rsqrt()
        with pyro.plate("data", n, subsample_size=subsample_size, dim=-1) as idx:
            z = pyro.sample(f"z{L}", dist.Normal(0.0, top_scale).expand([len(idx), d[L]]).to_event(1))
            for l in range(L, 0, -1):
                eta = z @ W[l].T + b[l]
                conditional = self.likelihood(l).distribution(eta).to_event(1)
                if l > 1:
                    z = pyro.sample(f"z{l - 1}", conditional)
                else:
                    obs = None if y is None else y.index_select(0, idx)
                    z = pyro.sample("y", conditional, obs=obs)
            return z

    def validate(self, data: Mapping[str, object]) -> dict[str, torch.Tensor]:
        """Check ``{"y": (N, d_0)}`` (numeric, finite); raises naming the row and column."""
        check_data_keys(data, self.data_names, "HierarchicalExpFamPCA")
        y = gaussian().validate(data["y"], "y")
        check_shape(y, (None, self.widths[0]), "y")
        return {"y": y}

    def simulate(self, num_data: int, *, seed: int, dtype: torch.dtype | None = None) -> Simulation:
        """Draw every site from the model; see :func:`deqppl.protocols.simulate_from`."""
        fixed = None
        if self.param_scale is None:
            d = self.widths
            fixed = {}
            for l in range(1, self.depth + 1):
                fixed[f"W{l}"] = lambda l=l: torch.randn(d[l - 1], d[l])
                fixed[f"b{l}"] = lambda l=l: torch.randn(d[l - 1])
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
        """``subspace_angle``: the largest principal angle (radians) between two fits' ``W1``.

        The column space of the observed layer's loadings is invariant to the rotations of
        $z^{(1)}$ that leave an identity-nonlinearity hierarchy's joint MAP undetermined (the
        harness's fit-stage hook).
        """
        from deqppl.inference import principal_angles

        return {"subspace_angle": float(principal_angles(values["W1"], reference["W1"]).max())}
