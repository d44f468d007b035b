r"""The model protocol: what the harness, the optimisers and the encoders may rely on.

A model of the protocol is a Pyro program (``model(**data)``) plus declarations:

* ``data_names`` -- the keyword arguments of the program that carry data, e.g. ``("x", "y")``;
* ``observed_sites`` -- those data names that are observed sample sites (``y``; a covariate
  ``x`` is data but not a site);
* ``local_sites`` -- latent sites with one value per data row (``z``);
* ``global_sites`` -- latent sites shared by all rows (``W``, ``B``);
* ``plate_name`` -- the Pyro plate over data rows that holds the local sites and the
  observations, or ``None`` when the locals are *coupled* (no row is conditionally independent
  of the others given the globals, as in a kernel GLM); ``locals_coupled`` says the same.

and three methods, ``validate``, ``simulate`` and ``log_joint``. :class:`AbstractModel` derives
all three from the program; zoo models refine them (closed-form checks, known truth for
parameters with flat priors). :class:`PyroModel` wraps a plain Pyro function.

Conventions every model follows (checked by :func:`deqppl.protocols.check_model`):

* Data rows run along the first dimension of every data tensor and of every local site's
  value, and the plate ``plate_name`` has one entry per row.
* The program samples its observations when they are ``None``; it then needs the number of
  rows as the keyword argument ``num_data``.
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer.autoguide.initialization import InitMessenger
from torch.distributions import transform_to

from deqppl.validation import as_tensor, check_data_keys, check_finite, check_seed, position

__all__ = ["AbstractModel", "PyroModel", "Simulation", "simulate_from"]


@dataclass(frozen=True)
class Simulation:
    """Data drawn from a model together with the values that generated it.

    Attributes
    ----------
    data
        Keyword arguments of the model's Pyro program, keyed by ``model.data_names``, e.g.
        ``{"y": (N, d) tensor}``; pass them to ``fit_map(model, sim.data)``.
    truth
        Every latent site's simulated value, keyed by site name (``local_sites`` and
        ``global_sites``).
    """

    data: dict[str, torch.Tensor]
    truth: dict[str, torch.Tensor]


def _check_num_data(num_data: object) -> int:
    if isinstance(num_data, bool) or not isinstance(num_data, (int, float)) or (
        int(num_data) != num_data or num_data < 1
    ):
        raise ValueError(f"num_data must be a positive integer, got {num_data!r}")
    return int(num_data)


def simulate_from(
    program: Callable[..., object],
    *,
    num_data: int,
    seed: int,
    data_names: tuple[str, ...],
    latent_names: tuple[str, ...],
    covariates: Mapping[str, torch.Tensor] | None = None,
    fixed: Mapping[str, Callable[[], torch.Tensor]] | None = None,
    dtype: torch.dtype | None = None,
) -> Simulation:
    """Run ``program`` forward with its observations ``None`` and split the trace.

    Seeding uses ``torch.random.fork_rng``: the global torch RNG is seeded inside the context
    and restored on exit, so simulating never changes the caller's random stream (Pyro samples
    from torch's global generator, so a private ``torch.Generator`` cannot reach its sites).

    Parameters
    ----------
    program
        A Pyro program, called as ``program(num_data=num_data)`` when there are no
        ``covariates`` and as ``program(**covariates)`` otherwise (the covariates then fix the
        number of rows).
    num_data
        Number of rows $N$.
    seed
        Seed of the draw.
    data_names
        Observed sites returned as data (besides the covariates).
    latent_names
        Sites returned as truth.
    covariates
        Data that are not sample sites (e.g. inputs ``x``), passed to the program and
        returned with the data.
    fixed
        Site name -> thunk drawing a value (inside the seeded context) for sites the program
        cannot sample itself, e.g. parameters with an improper flat prior.
    dtype
        Floating dtype of the returned tensors (default: torch's default dtype); the draw
        itself happens in torch's default dtype.

    Raises
    ------
    ValueError
        If ``num_data`` is not a positive integer, or a site cannot be sampled (an improper
        prior not covered by ``fixed``).

    Examples
    --------
    >>> import pyro, pyro.distributions as dist
    >>> def program(y=None, *, num_data=None):
    ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    ...     with pyro.plate("data", num_data if y is None else len(y)):
    ...         return pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
    >>> sim = simulate_from(program, num_data=3, seed=0, data_names=("y",), latent_names=("mu",))
    >>> sim.data["y"].shape, sim.truth["mu"].shape
    (torch.Size([3]), torch.Size([]))
    """
    num_data = _check_num_data(num_data)
    seed = check_seed(seed)
    covariates = dict(covariates or {})
    kwargs = covariates if covariates else {"num_data": num_data}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        values = {name: draw() for name, draw in (fixed or {}).items()}
        try:
            trace = poutine.trace(poutine.condition(program, values)).get_trace(**kwargs)
        except NotImplementedError as err:
            raise ValueError(
                f"the program cannot sample all its sites ({err}); a site with an improper "
                f"(flat) prior needs a value: override simulate and pass it in `fixed`"
            ) from err
    dtype = dtype or torch.get_default_dtype()
    missing = [n for n in data_names + latent_names if n not in trace.nodes]
    if missing:
        raise ValueError(f"the program has no sites {missing} (sites: {list(trace.nodes)})")
    data = {name: t.to(dtype) for name, t in covariates.items()}
    data.update({name: trace.nodes[name]["value"].detach().to(dtype) for name in data_names})
    truth = {name: trace.nodes[name]["value"].detach().to(dtype) for name in latent_names}
    return Simulation(data=data, truth=truth)


def _feasible_point(dtype: torch.dtype) -> Callable[[dict], torch.Tensor]:
    """An init function putting every latent at the image of 0 under its support's transform.

    Unlike Pyro's ``init_to_feasible`` it also covers improper (flat) priors, which cannot be
    sampled: their zeros take the data's ``dtype``. Call it under ``fork_rng``: proper
    sites are sampled once for their shape and dtype.
    """

    def init(site: dict) -> torch.Tensor:
        fn = site["fn"]
        try:
            value = fn.sample().detach()
        except NotImplementedError:
            value = torch.zeros(fn.shape(), dtype=dtype)
        try:
            t = transform_to(fn.support)
            return t(torch.zeros_like(t.inv(value)))
        except NotImplementedError:  # a discrete support: keep the draw
            return value

    return init


def _base_constraint(c: constraints.Constraint) -> constraints.Constraint:
    while isinstance(c, constraints.independent):
        c = c.base_constraint
    return c


class AbstractModel(abc.ABC):
    r"""Base of every model of the protocol: declarations plus defaults derived from the program.

    A subclass writes its Pyro program in ``__call__`` and declares ``data_names``,
    ``local_sites`` and ``global_sites`` (class attributes, dataclass fields or properties);
    ``observed_sites`` defaults to ``data_names`` and ``plate_name`` to ``"data"``. The three
    methods below then work unchanged; override them to add model knowledge (support checks
    that need no trace, simulation of flat-prior parameters). Run
    :func:`deqppl.protocols.check_model` on the result.

    Attributes
    ----------
    data_names
        Names of the program's data keyword arguments.
    observed_sites
        Data names that are observed sample sites (default: all of ``data_names``).
    local_sites, global_sites
        Latent sites per data row and shared ones.
    plate_name
        The plate over data rows, or ``None`` if the locals are coupled.
    """

    data_names: tuple[str, ...]
    local_sites: tuple[str, ...]
    global_sites: tuple[str, ...]
    plate_name: ClassVar[str | None] = "data"

    @property
    def observed_sites(self) -> tuple[str, ...]:
        """The data names that are observed sample sites (default: every data name)."""
        return tuple(self.data_names)

    @property
    def locals_coupled(self) -> bool:
        """True when the locals live in no data plate (``plate_name is None``).

        A coupled model has a total log joint only, no per-datum form, and cannot be fitted
        on minibatches of rows.
        """
        return self.plate_name is None

    @property
    def latent_sites(self) -> tuple[str, ...]:
        """``global_sites + local_sites``: every site a MAP fit estimates."""
        return tuple(self.global_sites) + tuple(self.local_sites)

    def describe(self) -> str:
        """A short name for messages (the class name)."""
        return type(self).__name__

    @abc.abstractmethod
    def __call__(self, *args, **kwargs) -> object:
        """The Pyro program; data as keyword arguments, observations ``None`` to sample them."""

    # ------------------------------------------------------------------ defaults
    def validate(self, data: Mapping[str, object]) -> dict[str, torch.Tensor]:
        """Check ``data`` against the program and return it as tensors of one floating dtype.

        The default checks: exactly the keys ``data_names``; numeric and finite entries; with
        a data plate, the same number of rows in every tensor; and, by tracing the program
        once on the data (latents at a feasible point; the caller's RNG is untouched), that every observed
        site's value has the shape of its distribution and lies in its support.

        Parameters
        ----------
        data
            Mapping data name -> array-like.

        Returns
        -------
        dict
            Data name -> tensor, all of the promoted floating dtype of the inputs.

        Raises
        ------
        TypeError
            If ``data`` is not a mapping or an entry is not numeric.
        ValueError
            Wrong keys, NaN/Inf, mismatched rows, a shape the program does not expect, or a
            value outside an observed site's support; the message names the data and the
            position.
        """
        owner = self.describe()
        check_data_keys(data, tuple(self.data_names), owner)
        out = {name: as_tensor(data[name], name) for name in self.data_names}
        dtype = functools.reduce(torch.promote_types, [t.dtype for t in out.values()])
        out = {name: t.to(dtype) for name, t in out.items()}
        for name, t in out.items():
            check_finite(t, name)
        if self.plate_name is not None:
            rows = {name: (t.shape[0] if t.dim() else None) for name, t in out.items()}
            if None in rows.values() or len(set(rows.values())) != 1:
                raise ValueError(
                    f"{owner} data must have one row per datum along their first dimension, "
                    f"the same number in every tensor; got shapes "
                    f"{ {name: tuple(t.shape) for name, t in out.items()} }"
                )
        self._check_against_program(out)
        return out

    def _check_against_program(self, data: dict[str, torch.Tensor]) -> None:
        owner = self.describe()
        dtype = next(iter(data.values())).dtype
        try:
            # latents at a feasible point of their supports (flat priors allowed), drawn on a
            # forked RNG so that validating never moves the caller's random stream
            with torch.random.fork_rng(devices=[]):
                program = InitMessenger(_feasible_point(dtype))(self)
                trace = poutine.trace(program).get_trace(**data)
        except (RuntimeError, ValueError, IndexError, TypeError) as err:
            raise ValueError(
                f"{owner} data do not fit the program (shapes "
                f"{ {name: tuple(t.shape) for name, t in data.items()} }): {err}"
            ) from err
        for name in self.observed_sites:
            site = trace.nodes.get(name)
            if site is None or site["type"] != "sample" or not site["is_observed"]:
                continue  # check_model reports declarations that the program breaks
            value, fn = data[name], site["fn"]
            expected = tuple(fn.shape())
            if tuple(value.shape) != expected:
                raise ValueError(f"{name} must have shape {expected} for {owner}, got {tuple(value.shape)}")
            support = _base_constraint(fn.support)
            ok = support.check(value)
            if ok.shape == value.shape:
                bad = ~ok
                if bool(bad.any()):
                    idx = torch.nonzero(bad)[0].tolist()
                    raise ValueError(
                        f"{name} has value {value[tuple(idx)].item()!r} at {position(idx)}, "
                        f"outside the support {support} of site {name!r} of {owner}; "
                        f"{int(bad.sum())} entries are out of range"
                    )
            elif not bool(fn.support.check(value).all()):
                raise ValueError(f"{name} leaves the support {fn.support} of site {name!r} of {owner}")

    def simulate(self, num_data: int, *, seed: int, dtype: torch.dtype | None = None) -> Simulation:
        """Draw every site from the prior predictive: the program with observations ``None``.

        Calls ``self(num_data=num_data)`` under a seeded, caller-invisible RNG
        (:func:`simulate_from`) and returns the observed sites as data and the latent sites
        as truth.

        Raises
        ------
        NotImplementedError
            If the model has data that are not observed sites (covariates such as ``x``): the
            program cannot invent them; override ``simulate``.
        ValueError
            If ``num_data`` is not a positive integer or a site cannot be sampled (flat prior).
        """
        covariates = [n for n in self.data_names if n not in self.observed_sites]
        if covariates:
            raise NotImplementedError(
                f"{self.describe()} has covariates {covariates} (data that are not sample "
                f"sites), which the program cannot simulate; override simulate() to draw them"
            )
        return simulate_from(
            self,
            num_data=num_data,
            seed=seed,
            data_names=tuple(self.observed_sites),
            latent_names=self.latent_sites,
            dtype=dtype,
        )

    def log_joint(
        self,
        data: Mapping[str, object],
        values: Mapping[str, torch.Tensor],
        *,
        per_datum: bool = False,
    ) -> torch.Tensor:
        r"""$\log p(\text{data}, \text{values})$ from the Pyro trace, after :meth:`validate`.

        Parameters
        ----------
        data
            Mapping data name -> array-like; validated here (a public entry). Inner code that
            already holds validated data calls :func:`deqppl.inference.log_joint` directly.
        values
            Site name -> value for every latent site.
        per_datum
            Return the ``(N,)`` per-row terms of the sites in the plate ``plate_name``
            (locals and observations); the total is their sum plus the globals' log prior.

        Raises
        ------
        ValueError
            If a latent site is missing from ``values``, or ``per_datum`` is asked of a model
            whose locals are coupled.
        """
        from deqppl.inference.log_joint import log_joint  # deferred: inference may import us

        if per_datum and self.locals_coupled:
            raise ValueError(
                f"{self.describe()} declares its locals coupled (plate_name=None): its log joint "
                f"does not split into per-datum terms; use per_datum=False"
            )
        return log_joint(
            self,
            self.validate(data),
            values,
            per_datum=per_datum,
            plate_name=self.plate_name or "data",
        )


def _check_names(value: object, what: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (tuple, list)):
        raise TypeError(f"{what} must be a tuple of site names, got {value!r}")
    names = tuple(value)
    bad = [n for n in names if not isinstance(n, str) or not n]
    if bad:
        raise TypeError(f"{what} must hold non-empty strings, got {bad}")
    if len(set(names)) != len(names):
        raise ValueError(f"{what} has repeated names: {list(names)}")
    return names


@dataclass(frozen=True, eq=False)
class PyroModel(AbstractModel):
    r"""A user's Pyro program as a model of the protocol.

    Parameters
    ----------
    program
        The Pyro function. It takes the data as keyword arguments; with its observations
        ``None`` it samples them and then takes the number of rows as ``num_data``. Locals
        and observations sit in the plate ``plate_name`` over the first dimension of the data.
    data_names
        Its data keyword arguments, e.g. ``("y",)`` or ``("x", "y")``.
    local_sites, global_sites
        Its latent sites, per row and shared.
    observed_sites
        Data names that are observed sample sites; default every data name.
    plate_name
        The plate of the locals, or ``None`` if they are coupled.

    Examples
    --------
    A normal means model with one global mean and one local offset per row:

    >>> import pyro, pyro.distributions as dist, torch
    >>> def program(y=None, *, num_data=None):
    ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    ...     with pyro.plate("data", len(y) if y is not None else num_data):
    ...         z = pyro.sample("z", dist.Normal(mu, 1.0))
    ...         return pyro.sample("y", dist.Normal(z, 0.5), obs=y)
    >>> model = PyroModel(program, data_names=("y",), local_sites=("z",), global_sites=("mu",))
    >>> sim = model.simulate(4, seed=0)
    >>> sorted(sim.truth), sim.data["y"].shape
    (['mu', 'z'], torch.Size([4]))
    >>> model.log_joint(sim.data, sim.truth, per_datum=True).shape
    torch.Size([4])
    >>> model.validate({"y": [0.0, float("nan")]})
    Traceback (most recent call last):
    ...
    ValueError: y contains a non-finite value nan at position 1 ...
    """

    program: Callable[..., object]
    data_names: tuple[str, ...]
    local_sites: tuple[str, ...]
    global_sites: tuple[str, ...] = ()
    observed_sites: tuple[str, ...] | None = None  # type: ignore[assignment]
    plate_name: str | None = "data"  # type: ignore[misc]

    def __post_init__(self) -> None:
        if not callable(self.program):
            raise TypeError(f"program must be a callable Pyro program, got {self.program!r}")
        data = _check_names(self.data_names, "data_names")
        local = _check_names(self.local_sites, "local_sites")
        glob = _check_names(self.global_sites, "global_sites")
        observed = data if self.observed_sites is None else _check_names(self.observed_sites, "observed_sites")
        if not set(observed) <= set(data):
            raise ValueError(
                f"observed_sites {list(observed)} must be data names (data_names {list(data)})"
            )
        clash = (set(local) & set(glob)) | ((set(local) | set(glob)) & set(data))
        if clash:
            raise ValueError(f"a name cannot be both a latent site and data / local and global: {sorted(clash)}")
        if self.plate_name is not None and (not isinstance(self.plate_name, str) or not self.plate_name):
            raise TypeError(f"plate_name must be a plate's name or None, got {self.plate_name!r}")
        for name, value in (
            ("data_names", data), ("local_sites", local), ("global_sites", glob), ("observed_sites", observed)
        ):
            object.__setattr__(self, name, value)

    def describe(self) -> str:
        return f"PyroModel({getattr(self.program, '__name__', 'program')})"

    def __call__(self, *args, **kwargs) -> object:
        return self.program(*args, **kwargs)
