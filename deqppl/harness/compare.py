r"""The comparison every capability adds rows to: DEQ vs SVI vs L-BFGS on one model.

:func:`compare` runs two stages per method and seed:

``"fit"``
    each method fits its own globals by joint MAP on the training rows
    (:meth:`~deqppl.harness.methods.AbstractMethod.fit_globals`);
``"heldout"``
    every method infers the latents of the held-out rows with the **same** globals held fixed
    (:meth:`~deqppl.harness.methods.AbstractMethod.infer_locals`), so that its latents, log
    joints and times are directly comparable. The shared globals are those of the fit with the
    highest training log joint (the best joint MAP found; ties go to the first method).

Metrics of the tidy :attr:`Comparison.table` (one row per model x method x seed x stage x metric):

* both stages: ``wall_time`` (s), ``num_steps``, ``num_grad_evals``, ``converged`` (0/1),
  ``log_joint``, ``log_joint_gap`` (best method's log joint minus this method's, $\ge 0$),
  ``time_ratio_vs_deq`` (this method's wall time over the first DEQ method's), and each
  method's float diagnostics (``spectral_radius``, ``spectral_radius_max``,
  ``fraction_converged`` for the DEQ);
* ``"fit"``: ``subspace_angle``, the largest principal angle (radians) between this method's
  $W$ and the reference method's (rotation invariant);
* ``"heldout"``: ``max_abs_dz`` (largest absolute difference of the latents from the
  reference method's), ``heldout_log_lik`` $=\sum_s\log p(y_s\mid z_s, W, B)$ from the
  observation site of the Pyro trace, ``amortization_gap``
  $=\sum_s\max_m\log p(y_s, z^{(m)}_s\mid W,B) - \log p(y, z\mid W, B)$ ($\ge 0$: the
  log joint lost to the best per-datapoint optimum over all methods), and with labels
  ``accuracy`` of a multinomial logistic regression trained on the training latents of the
  shared fit and evaluated on this method's held-out latents (plus a row for method ``"pca"``:
  the same classifier on plain-PCA scores).

The reference method (for ``max_abs_dz`` and ``subspace_angle``) is the one named ``"lbfgs"``
if present (a deterministic full-batch optimiser), else the first method.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch

from deqppl._progress import progress as _progress
from deqppl._validation import as_tensor
from deqppl.harness.downstream import fit_classifier, fit_pca
from deqppl.harness.methods import (
    AbstractMethod,
    DEQMethod,
    LBFGSMethod,
    StageResult,
    SVIMethod,
    method as _method,
)
from deqppl.harness.metrics import max_abs_dz, site_log_prob, subspace_angle
from deqppl.harness.store import RunStore, Unit
from deqppl.inference import log_joint

__all__ = ["COLUMNS", "Comparison", "compare", "describe_model"]

#: Columns of :attr:`Comparison.table`.
COLUMNS = ["model", "method", "seed", "stage", "metric", "value"]
STAGES = ("fit", "heldout")
#: Fraction of rows held out when ``heldout`` is not given.
HELDOUT_FRACTION = 0.2
_REFERENCE = "lbfgs"
# Metric order in the summary; method diagnostics (extras) follow, sorted.
_ORDER = (
    "log_joint",
    "log_joint_gap",
    "max_abs_dz",
    "heldout_log_lik",
    "amortization_gap",
    "accuracy",
    "converged",
    "wall_time",
    "time_ratio_vs_deq",
    "num_steps",
    "num_grad_evals",
    "spectral_radius",
)


@dataclass(frozen=True, kw_only=True, eq=False)
class Comparison:
    """Result of :func:`compare`.

    Attributes
    ----------
    table
        Tidy frame with columns :data:`COLUMNS`, one row per model x method x seed x stage x
        metric.
    summary
        Wide frame, one row per method (index ``"method"``; ``"pca"`` last when labels were
        given): the ``"heldout"`` metrics averaged over seeds, plus ``fit_wall_time``.
    latents
        Method name -> ``(n_heldout, latent_dim)`` held-out latents of the first seed.
    traces
        Method name -> 1-D trace (loss per step) of its ``"fit"`` stage, first seed.
    model_name
        Description of the model, e.g. ``ExpFamPCA(family=poisson(), ...)``.
    globals_source
        Seed -> name of the method whose globals were shared in the ``"heldout"`` stage.
    reference
        Name of the reference method for ``max_abs_dz`` and ``subspace_angle``.
    model
        The model compared (the reports condition its Pyro program on the latents).
    heldout_data
        The validated held-out data mapping (data name -> tensor) of the first seed.
    heldout_labels
        Integer labels of the held-out rows, or None.
    shared_globals
        Global site -> tensor shared in the ``"heldout"`` stage of the first seed.
    """

    table: pd.DataFrame
    summary: pd.DataFrame
    latents: dict[str, torch.Tensor]
    traces: dict[str, torch.Tensor]
    model_name: str
    globals_source: dict[int, str] = field(default_factory=dict)
    reference: str = ""
    model: object = None
    heldout_data: dict[str, torch.Tensor] = field(default_factory=dict)
    heldout_labels: torch.Tensor | None = None
    shared_globals: dict[str, torch.Tensor] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (
            f"Comparison(model_name={self.model_name!r}, methods={list(self.summary.index)}, "
            f"rows={len(self.table)}, globals_source={self.globals_source})"
        )


def _describe_value(value: object) -> str:
    describe = getattr(value, "describe", None)
    if callable(describe):
        return str(describe())
    name = getattr(value, "name", None)
    if isinstance(name, str) and not isinstance(value, str):
        return name
    return repr(value)


def describe_model(model: object) -> str:
    """A stable one-line description of a model (hyperparameters, no object addresses).

    Examples
    --------
    >>> from deqppl.expfam import family
    >>> from deqppl.models import ExpFamPCA
    >>> describe_model(ExpFamPCA(family=family("poisson"), obs_dim=5, latent_dim=2))
    'ExpFamPCA(family=poisson(), obs_dim=5, latent_dim=2, nonlinearity=identity, lam=1.0, param_scale=1.0)'
    """
    if dataclasses.is_dataclass(model) and not isinstance(model, type):
        inner = ", ".join(
            f"{f.name}={_describe_value(getattr(model, f.name))}" for f in dataclasses.fields(model)
        )
        return f"{type(model).__name__}({inner})"
    return type(model).__name__


def _hash(*parts: object) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            t = part.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes())
        else:
            h.update(repr(part).encode())
        h.update(b"\x00")
    return h.hexdigest()


def _resolve_methods(methods: Sequence[AbstractMethod | str] | None) -> list[AbstractMethod]:
    if methods is None:
        return [DEQMethod(), SVIMethod(), LBFGSMethod()]
    if isinstance(methods, (str, AbstractMethod)):
        methods = [methods]
    out = [_method(m) if isinstance(m, str) else m for m in methods]
    for m in out:
        if not isinstance(m, AbstractMethod):
            raise TypeError(
                f"methods must be AbstractMethod objects or names, got {type(m).__name__}"
            )
    names = [m.name for m in out]
    if not names:
        raise ValueError("methods is empty; pass at least one method")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"method names must be unique, got duplicates {dup}; set name=...")
    if "pca" in names:
        raise ValueError("the method name 'pca' is reserved for the plain-PCA baseline row")
    return out


def _check_labels(labels: object, n: int, what: str) -> torch.Tensor:
    t = torch.as_tensor(labels)
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{what} must have shape ({n},), got {tuple(t.shape)}")
    if t.is_floating_point() and not bool((t == t.round()).all()):
        raise ValueError(f"{what} must be integer class labels")
    return t.long()


def _split(model, y, heldout, labels, heldout_labels, seed):
    y = model.validate({"y": y})["y"]
    if heldout is None:
        if heldout_labels is not None:
            raise ValueError("heldout_labels needs heldout; without heldout, labels are split with y")
        n = y.shape[0]
        num_heldout = max(1, round(HELDOUT_FRACTION * n))
        if n - num_heldout < 1:
            raise ValueError(f"y has {n} rows; need at least 2 to hold out 20%")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        test, train = perm[:num_heldout], perm[num_heldout:]
        lab = None if labels is None else _check_labels(labels, n, "labels")
        return (
            y[train],
            y[test],
            None if lab is None else lab[train],
            None if lab is None else lab[test],
        )
    y_ho = model.validate({"y": as_tensor(heldout, "heldout", dtype=y.dtype)})["y"]
    if y_ho.shape[0] < 1:
        raise ValueError("heldout has no rows")
    if (labels is None) != (heldout_labels is None):
        raise ValueError("with heldout given, pass both labels and heldout_labels, or neither")
    if labels is None:
        return y, y_ho, None, None
    return (
        y,
        y_ho,
        _check_labels(labels, y.shape[0], "labels"),
        _check_labels(heldout_labels, y_ho.shape[0], "heldout_labels"),
    )


def _run_unit(store, unit, fingerprint, run) -> StageResult:
    if store is not None and unit in store:
        return store.load(unit, fingerprint=fingerprint)
    result = run()
    if store is not None:
        store.save(unit, result, fingerprint=fingerprint)
    return result


def _best(results: Mapping[str, StageResult]) -> str:
    finite = {k: r.log_joint for k, r in results.items() if math.isfinite(r.log_joint)}
    if not finite:
        raise RuntimeError(
            "every method's joint MAP fit has a non-finite log joint; check the data and the "
            f"methods' settings (statuses: { {k: r.status for k, r in results.items()} })"
        )
    return max(finite, key=finite.get)  # max keeps the first of ties


def _common_rows(results: Mapping[str, StageResult], deq_name: str | None) -> dict[str, dict[str, float]]:
    best = max((r.log_joint for r in results.values() if math.isfinite(r.log_joint)), default=math.nan)
    out = {}
    for name, r in results.items():
        metrics = {
            "wall_time": float(r.wall_time),
            "num_steps": float(r.num_steps),
            "num_grad_evals": float(r.num_grad_evals),
            "converged": float(bool(r.converged)),
            "log_joint": float(r.log_joint),
            "log_joint_gap": best - float(r.log_joint),
        }
        if deq_name is not None:
            metrics["time_ratio_vs_deq"] = float(r.wall_time) / max(results[deq_name].wall_time, 1e-300)
        metrics.update({k: float(v) for k, v in r.extra.items()})
        out[name] = metrics
    return out


def compare(
    model,
    y: torch.Tensor,
    *,
    methods: Sequence[AbstractMethod | str] | None = None,
    heldout: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    heldout_labels: torch.Tensor | None = None,
    seeds: Sequence[int] = (0,),
    store: RunStore | None = None,
    progress: bool = True,
) -> Comparison:
    """Compare MAP inference methods on ``model``: joint fits, then held-out latents.

    Parameters
    ----------
    model
        An :class:`~deqppl.models.ExpFamPCA`-like model (sites ``W``, ``B``, ``z``, ``y``).
    y
        Observations ``(N, obs_dim)``: the training rows, or all rows when ``heldout`` is None.
    methods
        Method objects (or registered names, see :data:`~deqppl.harness.methods.METHODS`);
        default ``[DEQMethod(), SVIMethod(), LBFGSMethod()]``. Names must be unique.
    heldout
        Held-out rows ``(M, obs_dim)``. Default: a random 20% of ``y``, drawn with the first
        seed (the same split for every seed).
    labels, heldout_labels
        Optional integer labels of the training and held-out rows; they add the ``accuracy``
        metric and the ``"pca"`` baseline row. Without ``heldout``, pass ``labels`` for all of
        ``y`` (they are split with it).
    seeds
        One repetition per seed (initialisations, minibatches, subsamples).
    store
        A :class:`~deqppl.harness.store.RunStore`: each finished unit (method, seed, stage) is
        saved at once, and units already in it are loaded instead of recomputed, so an
        interrupted comparison resumes where it stopped.
    progress
        Show progress bars.

    Returns
    -------
    Comparison

    Raises
    ------
    ValueError
        Unknown method names (the valid ones are listed), duplicate names, bad data or labels,
        or a store holding units of a different run.

    Examples
    --------
    >>> import torch
    >>> from deqppl.expfam import family
    >>> from deqppl.models import ExpFamPCA
    >>> model = ExpFamPCA(family=family("bernoulli"), obs_dim=6, latent_dim=1)
    >>> y = model.simulate(30, seed=0, dtype=torch.float64).data["y"]
    >>> result = compare(model, y, methods=[DEQMethod(num_epochs=20), LBFGSMethod()],
    ...                  progress=False)
    >>> list(result.summary.index), result.globals_source[0] in ("deq", "lbfgs")
    (['deq', 'lbfgs'], True)
    >>> bool(result.summary.loc["deq", "max_abs_dz"] < 1e-6)
    True
    """
    methods = _resolve_methods(methods)
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds is empty; pass at least one seed")
    y_train, y_ho, lab_train, lab_ho = _split(model, y, heldout, labels, heldout_labels, seeds[0])
    model_name = describe_model(model)
    data_key = _hash(model_name, y_train, y_ho)
    names = [m.name for m in methods]
    reference = _REFERENCE if _REFERENCE in names else names[0]
    deq_name = next((m.name for m in methods if isinstance(m, DEQMethod)), None)

    rows: list[tuple] = []
    latents: dict[str, torch.Tensor] = {}
    traces: dict[str, torch.Tensor] = {}
    sources: dict[int, str] = {}
    first_shared: dict[str, torch.Tensor] = {}
    for seed in _progress(seeds, enable=progress, desc="compare (seeds)"):
        fits: dict[str, StageResult] = {}
        for m in methods:
            fits[m.name] = _run_unit(
                store,
                Unit(model_name, m.name, seed, "fit"),
                _hash(data_key, repr(m), seed, "fit"),
                lambda m=m: m.fit_globals(model, y_train, seed=seed, progress=progress),
            )
        source = _best(fits)
        sources[seed] = source
        shared = {k: fits[source].values[k] for k in model.global_sites}
        globals_key = _hash(*(shared[k] for k in model.global_sites))
        held: dict[str, StageResult] = {}
        for m in methods:
            held[m.name] = _run_unit(
                store,
                Unit(model_name, m.name, seed, "heldout"),
                _hash(data_key, repr(m), seed, "heldout", globals_key),
                lambda m=m: m.infer_locals(model, y_ho, shared, seed=seed, progress=progress),
            )

        fit_metrics = _common_rows(fits, deq_name)
        ref_W = fits[reference].values["W"]
        for name, r in fits.items():
            fit_metrics[name]["subspace_angle"] = subspace_angle(r.values["W"], ref_W)

        held_metrics = _common_rows(held, deq_name)
        data = {"y": y_ho}
        per_datum = {}
        for name, r in held.items():
            values = {**shared, "z": r.values["z"]}
            with torch.no_grad():
                per_datum[name] = log_joint(model, data, values, per_datum=True)
            held_metrics[name]["heldout_log_lik"] = float(site_log_prob(model, data, values, "y").sum())
            held_metrics[name]["max_abs_dz"] = max_abs_dz(r.values["z"], held[reference].values["z"])
        stacked = torch.nan_to_num(torch.stack(list(per_datum.values())), nan=-math.inf)
        best_per_datum = float(stacked.max(0).values.sum())
        for name in held:
            held_metrics[name]["amortization_gap"] = best_per_datum - float(per_datum[name].sum())

        if lab_train is not None:
            clf = fit_classifier(fits[source].values["z"], lab_train)
            for name, r in held.items():
                z = r.values["z"]
                ok = bool(torch.isfinite(z).all())
                held_metrics[name]["accuracy"] = clf.accuracy(z, lab_ho) if ok else math.nan
            pca = fit_pca(y_train, model.latent_dim)
            pca_clf = fit_classifier(pca.transform(y_train), lab_train)
            held_metrics["pca"] = {"accuracy": pca_clf.accuracy(pca.transform(y_ho), lab_ho)}

        for stage, metrics in (("fit", fit_metrics), ("heldout", held_metrics)):
            for name, values in metrics.items():
                rows.extend((model_name, name, seed, stage, k, float(v)) for k, v in values.items())
        if seed == seeds[0]:
            latents = {name: r.values["z"] for name, r in held.items()}
            traces = {name: r.trace for name, r in fits.items()}
            first_shared = shared

    table = pd.DataFrame(rows, columns=COLUMNS)
    table["seed"] = table["seed"].astype("int64")
    table["value"] = table["value"].astype("float64")
    return Comparison(
        table=table,
        summary=_summary(table, names + (["pca"] if lab_train is not None else [])),
        latents=latents,
        traces=traces,
        model_name=model_name,
        globals_source=sources,
        reference=reference,
        model=model,
        heldout_data={"y": y_ho},
        heldout_labels=lab_ho,
        shared_globals=first_shared,
    )


def _summary(table: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    held = table[table["stage"] == "heldout"]
    wide = held.pivot_table(index="method", columns="metric", values="value", aggfunc="mean", dropna=False)
    fit_time = (
        table[(table["stage"] == "fit") & (table["metric"] == "wall_time")]
        .groupby("method")["value"]
        .mean()
    )
    wide["fit_wall_time"] = fit_time
    known = [c for c in _ORDER if c in wide.columns]
    rest = sorted(c for c in wide.columns if c not in known and c != "fit_wall_time")
    wide = wide.reindex(index=order, columns=known + rest + ["fit_wall_time"])
    wide.index.name = "method"
    wide.columns.name = None
    return wide
