r"""What the harness reads off a model's Pyro trace: which latent sites are local, whether they
live in the data plate, and per-datum log densities.

The harness never names a site: it takes the names from the model (``local_sites``,
``global_sites``, ``data_names``) and the structure from one trace of its Pyro program.

* A **plate model** keeps every local site inside its data plate (``model.plate_name``,
  default ``"data"``; ExpFamPCA's ``z``,
  the hierarchical ``z1..zL``): given the globals, the locals of different rows are
  independent, the conditional MAP decouples per row and held-out rows get latents of their
  own.
* A **coupled model** (``plate_name = None``, :mod:`deqppl.protocols`) has local sites
  outside any data plate (the kernel GLM's whitened
  function values ``u``, coupled through the kernel matrix): its locals are defined on the
  training inputs only, and held-out data are scored by the model's predictive hook.

Examples
--------
>>> import torch
>>> from deqppl.expfam import family
>>> from deqppl.models import ExpFamPCA
>>> model = ExpFamPCA(family=family("poisson"), obs_dim=3, latent_dim=2)
>>> data = model.validate(model.simulate(4, seed=0).data)
>>> layout = site_layout(model, data)
>>> layout.local_sites, layout.coupled, layout.observed_sites, layout.local_width
(('z',), False, ('y',), 2)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from torch.distributions import biject_to

from deqppl.inference import latent_sites

__all__ = [
    "PLATE",
    "SiteLayout",
    "data_dtype",
    "flatten_locals",
    "local_log_joint",
    "num_rows",
    "observed_log_lik",
    "plate_of",
    "per_datum_log_joint",
    "site_layout",
    "take_rows",
    "unflatten_locals",
]

#: Name of the data plate of a model that does not declare ``plate_name`` (docs/CONVENTIONS.md).
PLATE = "data"


def plate_of(model) -> str | None:
    """The model's data plate (``plate_name``; ``"data"`` when undeclared), None if coupled."""
    return getattr(model, "plate_name", PLATE)


@dataclass(frozen=True)
class SiteLayout:
    """The sites of a model as traced on one data set.

    Attributes
    ----------
    local_sites
        The model's local latent sites, in its declared order.
    global_sites
        The model's global latent sites.
    observed_sites
        Observed sample sites (the likelihood terms).
    plate
        The data plate's name (None for a coupled model).
    coupled
        True when the model's locals lie in no data plate (see the module notes).
    shapes
        Local site -> shape of its value on the traced data.
    local_width
        Plate model: the number of local coordinates per row (sum of the sites' event sizes).
        Coupled model: the total number of local coordinates.
    """

    local_sites: tuple[str, ...]
    global_sites: tuple[str, ...]
    observed_sites: tuple[str, ...]
    plate: str | None
    coupled: bool
    shapes: dict[str, tuple[int, ...]]
    local_width: int


def _zero_init(dtype: torch.dtype):
    # A value inside the support without sampling (flat priors cannot be sampled).
    def init(site: dict) -> torch.Tensor:
        fn = site["fn"]
        transform = biject_to(fn.support)
        return transform(torch.zeros(transform.inverse_shape(fn.shape()), dtype=dtype)).detach()

    return init


def data_dtype(data: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype of the data (the first floating tensor's), else torch's default."""
    floats = [v.dtype for v in data.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return floats[0] if floats else torch.get_default_dtype()


def _in_plate(node: dict, plate: str | None) -> bool:
    return plate is not None and any(f.name == plate for f in node["cond_indep_stack"])


def site_layout(model, data: Mapping[str, torch.Tensor]) -> SiteLayout:
    """Trace ``model`` once on validated ``data`` and describe its sites.

    Raises
    ------
    ValueError
        If the trace's latent sites differ from the model's declared ``local_sites`` plus
        ``global_sites``, or the locals' placement contradicts the declared ``plate_name``
        (the message lists both).
    """
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        init = pyro.infer.autoguide.initialization.InitMessenger(_zero_init(data_dtype(data)))
        trace = poutine.trace(init(model)).get_trace(**data)
    latent = latent_sites(trace)
    local, global_ = tuple(model.local_sites), tuple(model.global_sites)
    if sorted(latent) != sorted(local + global_):
        raise ValueError(
            f"{type(model).__name__} declares local sites {list(local)} and global sites "
            f"{list(global_)}, but its Pyro program has the latent sites {latent}"
        )
    observed = tuple(
        name
        for name, node in trace.nodes.items()
        if node["type"] == "sample" and node["is_observed"] and type(node["fn"]).__name__ != "_Subsample"
    )
    plate = plate_of(model)
    in_plate = [name for name in local if _in_plate(trace.nodes[name], plate if plate is not None else PLATE)]
    coupled = plate is None
    if (coupled and in_plate) or (not coupled and len(in_plate) != len(local)):
        raise ValueError(
            f"{type(model).__name__} declares plate_name={plate!r}, but its local sites "
            f"{list(local)} are {'inside' if coupled else 'not all inside'} that plate "
            f"(in it: {in_plate})"
        )
    shapes = {name: tuple(trace.nodes[name]["value"].shape) for name in local}
    if coupled:
        width = sum(int(torch.Size(s).numel()) for s in shapes.values())
    else:
        width = sum(int(torch.Size(s[1:]).numel()) for s in shapes.values())
    return SiteLayout(
        local_sites=local,
        global_sites=global_,
        observed_sites=observed,
        plate=plate,
        coupled=coupled,
        shapes=shapes,
        local_width=width,
    )


def num_rows(data: Mapping[str, torch.Tensor], what: str = "data") -> int:
    """The common number of rows (first dimension) of every tensor in ``data``.

    Raises
    ------
    ValueError
        If ``data`` is empty, holds a 0-d tensor, or the tensors disagree in their rows.
    """
    if not data:
        raise ValueError(f"{what} is empty; pass a mapping {{name: tensor}}")
    rows = {}
    for name, value in data.items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            raise ValueError(f"{what}[{name!r}] must be a tensor with a row dimension")
        rows[name] = int(value.shape[0])
    if len(set(rows.values())) != 1:
        raise ValueError(f"the tensors of {what} must have the same number of rows, got {rows}")
    return next(iter(rows.values()))


def take_rows(data: Mapping[str, torch.Tensor], rows: torch.Tensor) -> Mapping[str, torch.Tensor]:
    """Rows ``rows`` of every tensor of ``data``; rows of validated data stay validated (every
    check of the protocol's ``validate`` is per row or on shapes a row subset keeps)."""
    from deqppl.harness.validated import ValidatedData

    out = {name: value[rows] for name, value in data.items()}
    return ValidatedData(data.model, out) if isinstance(data, ValidatedData) else out


def flatten_locals(layout: SiteLayout, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
    r"""The local sites as one tensor: ``(n, local_width)`` for a plate model (each row's
    coordinates, sites in declared order), ``(local_width,)`` for a coupled model."""
    if layout.coupled:
        return torch.cat([values[s].reshape(-1) for s in layout.local_sites])
    n = values[layout.local_sites[0]].shape[0]
    return torch.cat([values[s].reshape(n, -1) for s in layout.local_sites], dim=1)


def unflatten_locals(layout: SiteLayout, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten_locals` (shapes of a plate model follow ``flat``'s rows)."""
    out, start = {}, 0
    for site in layout.local_sites:
        shape = layout.shapes[site]
        if layout.coupled:
            size = int(torch.Size(shape).numel())
            out[site] = flat[start : start + size].reshape(shape)
        else:
            size = int(torch.Size(shape[1:]).numel())
            out[site] = flat[:, start : start + size].reshape(flat.shape[0], *shape[1:])
        start += size
    return out


def _trace(model, data, values):
    with torch.no_grad():
        trace = poutine.trace(poutine.condition(model, data=dict(values))).get_trace(**data)
    missing = latent_sites(trace)
    if missing:
        raise ValueError(f"values must give every latent site; missing {missing}")
    return trace


def _rows(node: dict, plate: str) -> torch.Tensor:
    frame = next(f for f in node["cond_indep_stack"] if f.name == plate)
    lp = node["fn"].log_prob(node["value"])
    rows = lp.movedim(frame.dim, 0)
    return rows.reshape(rows.shape[0], -1).sum(1)


def observed_log_lik(
    model, data: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    r"""Per-row log-likelihood ``(n,)`` of a plate model: the observed sites' log densities.

    $\sum_{\text{observed }o}\log p(o_s\mid\text{latents}_s,\text{globals})$ from the trace of
    the model conditioned on ``values``.

    Raises
    ------
    ValueError
        If an observed site is not in the model's data plate.
    """
    plate = plate_of(model)
    trace = _trace(model, data, values)
    total = None
    with torch.no_grad():
        for name, node in trace.nodes.items():
            if node["type"] != "sample" or not node["is_observed"] or name in values:
                continue  # conditioned latents are "observed" in the trace too
            if type(node["fn"]).__name__ == "_Subsample":
                continue
            if not _in_plate(node, plate):
                raise ValueError(f"observed site {name!r} is not in the data plate {plate!r}")
            rows = _rows(node, plate)
            total = rows if total is None else total + rows
    if total is None:
        raise ValueError(f"{type(model).__name__} has no observed site")
    return total.detach()


def per_datum_log_joint(
    model, data: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    r"""$\log p(\text{data}_s, \text{locals}_s\mid\text{globals})$ per row ``(n,)`` (plate models)."""
    from deqppl.inference import log_joint

    with torch.no_grad():
        return log_joint(model, data, values, per_datum=True, plate_name=plate_of(model)).detach()


def local_log_joint(
    model, data: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor]
) -> float:
    r"""$\log p(\text{data}, \text{locals}\mid\text{globals})$: the log joint without the globals'
    prior, the part that depends on the locals (any model)."""
    trace = _trace(model, data, values)
    total = 0.0
    with torch.no_grad():
        for name, node in trace.nodes.items():
            if node["type"] != "sample" or name in model.global_sites:
                continue
            if type(node["fn"]).__name__ == "_Subsample":
                continue
            total += float(node["fn"].log_prob(node["value"]).sum())
    return total
