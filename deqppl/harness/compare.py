r"""The comparison every capability adds rows to: DEQ vs SVI vs L-BFGS on any model.

:func:`compare` takes a model of the protocol and its data mapping and runs two stages per
method and seed:

``"fit"``
    each method fits every latent site by joint MAP on the training data
    (:meth:`~deqppl.harness.methods.AbstractMethod.fit_globals`);
``"heldout"``
    every method infers local latents with the **same** globals held fixed
    (:meth:`~deqppl.harness.methods.AbstractMethod.infer_locals`), so that its latents, log
    joints and times are directly comparable. The shared globals are those of the fit with the
    highest training log joint (the best joint MAP found; ties go to the first method).

    *Plate models* (locals in the plate ``"data"``: exponential-family PCA, hierarchical
    latents) infer the locals of the held-out rows, which are scored by their observation
    sites. *Coupled models* (locals outside a data plate: the kernel GLM's function values $u$
    at the training inputs, coupled through the kernel matrix) have no latents of their own at
    new inputs: the stage infers the locals of the **training** data under the shared globals
    (for the kernel GLM, which has no globals, the same problem as the fit, solved again by
    every method and timed), and the held-out data are scored by the model's predictive
    density at the new inputs, ``model.predictive_log_lik(train, values, heldout)``
    (:meth:`~deqppl.models.KernelGLM.predictive_log_lik`: the GP conditional mode of $f$ at the
    new inputs given $f = Lu$).

Metrics of the tidy :attr:`Comparison.table` (one row per model x method x seed x stage x
metric; the same columns for every model):

* both stages: ``wall_time`` (s), ``num_steps``, ``num_grad_evals``, ``converged`` (0/1),
  ``log_joint``, ``log_joint_gap`` (best method's log joint minus this method's, $\ge 0$),
  ``time_ratio_vs_deq`` (this method's wall time over the first DEQ method's), and each
  method's float diagnostics (``spectral_radius``, ``spectral_radius_max``,
  ``fraction_converged``, ``diagnostics_wall_time`` for the DEQ);
* ``"fit"``: the model's own comparison of each fit's globals with the best fit's, from its
  optional hook ``model.global_metrics(values, reference)`` (e.g. ExpFamPCA's
  ``subspace_angle``, the largest principal angle between the loadings, rotation invariant);
* ``"heldout"``:

  - ``certified_bound``: a certified bound on the distance of the method's locals to the
    conditional MAP, $\lVert\nabla F\rVert_2/\lambda_{\min}(\nabla^2F)$ of the negative log
    posterior $F$ of the locals given the shared globals, worst row
    (:func:`~deqppl.harness.accuracy.certified_bound`; ``inf`` where $F$ is not strongly
    convex at the point), and ``min_hessian_eig`` (its smallest $\lambda_{\min}$);
  - ``max_abs_dz``: the largest absolute difference of the locals (every local site) from the
    **reference**, the method with the smallest certified bound (the most accurate result;
    ties go to the first method; without any finite bound, the method with the highest
    log joint); with several local sites also ``max_abs_dz[site]`` per site;
  - ``heldout_log_lik``: $\sum\log p(\text{held-out observations}\mid\ldots)$ (plate: at the
    held-out latents; coupled: the predictive density);
  - ``amortization_gap``: plate models
    $\sum_s\max_m\log p(\text{data}_s, \text{locals}^{(m)}_s\mid\text{globals}) - \log p(\text{data},
    \text{locals}\mid\text{globals})$, the log joint lost to the best per-row optimum over all
    methods; coupled models the same with the whole data set as one row ($\ge 0$);
  - with labels (plate models), ``accuracy`` of a multinomial logistic regression trained on
    the training locals of the shared fit and evaluated on this method's held-out locals
    (plus a row for method ``"pca"``: the same classifier on plain-PCA scores of the data).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch

from deqppl._progress import progress as _progress
from deqppl.validation import check_seed
from deqppl.harness.accuracy import CertifiedBound, certified_bound
from deqppl.harness.downstream import fit_classifier, fit_pca
from deqppl.harness.methods import (
    AbstractMethod,
    DEQMethod,
    LBFGSMethod,
    StageResult,
    SVIMethod,
    method as _method,
)
from deqppl.harness.metrics import max_abs_dz
from deqppl.harness.sites import (
    SiteLayout,
    flatten_locals,
    local_log_joint,
    num_rows,
    observed_log_lik,
    per_datum_log_joint,
    site_layout,
    take_rows,
)
from deqppl.harness.store import RunStore, Unit
from deqppl.harness.validated import validated

__all__ = ["COLUMNS", "TIMING_METRICS", "Comparison", "compare", "describe_model"]

#: Columns of :attr:`Comparison.table`.
COLUMNS = ["model", "method", "seed", "stage", "metric", "value"]
#: Metrics that measure time: they legitimately differ between two runs of the same comparison.
TIMING_METRICS = ("wall_time", "time_ratio_vs_deq", "diagnostics_wall_time")
STAGES = ("fit", "heldout")
#: Fraction of rows held out when ``heldout`` is not given.
HELDOUT_FRACTION = 0.2
# Metric order in the summary; method diagnostics (extras) follow, sorted.
_ORDER = (
    "log_joint",
    "log_joint_gap",
    "certified_bound",
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
        Method name -> the ``"heldout"`` stage's locals of the first seed: for a model with one
        local site a ``(rows, coordinates)`` tensor (ExpFamPCA: ``z`` ``(n_heldout, l)``;
        KernelGLM: ``u`` as a column ``(n_train, 1)``, a coupled model's locals live on the
        training inputs), else the mapping {local site: value} (the hierarchy's ``z1..zL``).
    local_values
        Method name -> {local site: value} of the ``"heldout"`` stage, first seed (always the
        mapping).
    bounds
        Method name -> per-row certified bounds ``(n,)`` (``(1,)`` for a coupled model) of
        its ``"heldout"`` locals, first seed (:func:`~deqppl.harness.accuracy.certified_bound`).
    traces
        Method name -> 1-D trace (loss per step) of its ``"fit"`` stage, first seed.
    model_name
        Description of the model, e.g. ``ExpFamPCA(family=poisson(), ...)``.
    globals_source
        Seed -> name of the method whose globals were shared in the ``"heldout"`` stage.
    reference
        Name of the reference method of ``max_abs_dz`` (smallest certified bound), first seed.
    model
        The model compared (the reports condition its Pyro program on the latents).
    heldout_data
        The validated held-out data mapping (data name -> tensor).
    heldout_labels
        Integer labels of the held-out rows, or None.
    shared_globals
        Global site -> tensor shared in the ``"heldout"`` stage of the first seed.
    coupled
        Whether the model's locals are coupled (no data plate; see the module notes).
    train_data
        The validated training data mapping of the first seed (a coupled model's held-out
        predictions need it, e.g. the report's calibration panel).
    failures
        ``(seed, method, stage)`` -> the error of every unit whose method raised (its rows
        are in the table with ``converged`` 0 and NaN metrics; the other methods' rows are
        complete). Empty when every unit ran.
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
    local_values: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    bounds: dict[str, torch.Tensor] = field(default_factory=dict)
    coupled: bool = False
    train_data: dict[str, torch.Tensor] = field(default_factory=dict)
    failures: dict[tuple[int, str, str], str] = field(default_factory=dict)

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


def _check_data(data: object, what: str) -> Mapping:
    if not isinstance(data, Mapping):
        raise TypeError(
            f"{what} must be the model's data mapping {{name: tensor}}, e.g. {{'y': y}}; "
            f"got {type(data).__name__}"
        )
    return data


def _split(model, data, heldout, labels, heldout_labels, seed):
    data = validated(model, _check_data(data, "data"))
    n = num_rows(data)
    if heldout is None:
        if heldout_labels is not None:
            raise ValueError("heldout_labels needs heldout; without heldout, labels are split with the data")
        num_heldout = max(1, round(HELDOUT_FRACTION * n))
        if n - num_heldout < 1:
            raise ValueError(f"the data have {n} rows; need at least 2 to hold out 20%")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        test, train = perm[:num_heldout], perm[num_heldout:]
        lab = None if labels is None else _check_labels(labels, n, "labels")
        return (
            take_rows(data, train),
            take_rows(data, test),
            None if lab is None else lab[train],
            None if lab is None else lab[test],
        )
    try:
        held = validated(model, _check_data(heldout, "heldout"))
    except (TypeError, ValueError) as err:
        # the model names its data ("y"); the caller passed them as ``heldout``
        raise type(err)(f"heldout: {err}") from None
    m = num_rows(held, "heldout")
    if m < 1:
        raise ValueError("heldout has no rows")
    if (labels is None) != (heldout_labels is None):
        raise ValueError("with heldout given, pass both labels and heldout_labels, or neither")
    if labels is None:
        return data, held, None, None
    return (
        data,
        held,
        _check_labels(labels, n, "labels"),
        _check_labels(heldout_labels, m, "heldout_labels"),
    )


#: ``StageResult.status`` of a unit whose method raised; the error follows after ": ".
FAILED = "failed"


def _run_unit(store, unit, fingerprint, run) -> StageResult:
    if store is not None and unit in store:
        return store.load(unit, fingerprint=fingerprint)
    start = time.perf_counter()
    try:
        result = run()
    except Exception as err:  # noqa: BLE001 - a method's failure is a result, not the end of the run
        # Not stored: a re-run tries the unit again (the same inputs fail the same way, so a
        # resumed run still equals an uninterrupted one).
        message = " ".join(f"{type(err).__name__}: {err}".split())
        return StageResult(
            values={}, log_joint=math.nan, wall_time=time.perf_counter() - start, num_steps=0,
            num_grad_evals=0, status=f"{FAILED}: {message}", converged=False,
        )
    if store is not None:
        store.save(unit, result, fingerprint=fingerprint)
    return result


def _is_failed(result: StageResult) -> bool:
    return result.status.startswith(FAILED + ":")


def _fill_failed(results: dict[str, StageResult], stage: str, seed: int, failures: dict) -> None:
    """Give failed units NaN values shaped like a successful unit's, and note their errors.

    The metrics below then treat a failed method like a diverged one (NaN latents: no
    certificate, NaN accuracy), and its rows still appear in the table.
    """
    failed = [name for name, r in results.items() if _is_failed(r)]
    for name in failed:
        failures[(seed, name, stage)] = results[name].status.split(": ", 1)[1]
    ok = [r for r in results.values() if not _is_failed(r)]
    if failed and not ok:
        detail = "; ".join(f"{name}: {failures[(seed, name, stage)]}" for name in failed)
        raise RuntimeError(f"every method failed in the {stage!r} stage of seed {seed} ({detail})")
    for name in failed:
        shapes = {k: torch.full_like(v, math.nan) for k, v in ok[0].values.items()}
        results[name] = dataclasses.replace(results[name], values=shapes)


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


def _reference(bounds: Mapping[str, CertifiedBound], held: Mapping[str, StageResult]) -> str:
    worst = {name: b.worst for name, b in bounds.items()}
    finite = {name: w for name, w in worst.items() if math.isfinite(w)}
    if finite:
        return min(finite, key=finite.get)  # min keeps the first of ties
    return _best(held)


def _finite(values: Mapping[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in values.values())


def compare(
    model,
    data: Mapping[str, torch.Tensor],
    *,
    methods: Sequence[AbstractMethod | str] | None = None,
    heldout: Mapping[str, torch.Tensor] | None = None,
    labels: torch.Tensor | None = None,
    heldout_labels: torch.Tensor | None = None,
    seeds: Sequence[int] = (0,),
    store: RunStore | None = None,
    progress: bool = True,
) -> Comparison:
    """Compare MAP inference methods on ``model``: joint fits, then latents under shared globals.

    Parameters
    ----------
    model
        A model of the protocol: a Pyro program with ``data_names``, ``local_sites``,
        ``global_sites`` and ``validate`` (docs/CONVENTIONS.md), e.g.
        :class:`~deqppl.models.ExpFamPCA`, :class:`~deqppl.models.HierarchicalExpFamPCA`,
        :class:`~deqppl.models.KernelGLM`. Optional hooks: ``global_metrics(values,
        reference)`` (fit-stage metrics of the globals) and, for a coupled model,
        ``predictive_log_lik(data, values, heldout)`` (required to score held-out data).
    data
        The model's data mapping, e.g. ``{"y": y}`` or ``{"x": x, "y": y}``: the training data,
        or all data when ``heldout`` is None. Validated once here (by ``model.validate``) and
        passed inward validated.
    methods
        Method objects (or registered names, see :data:`~deqppl.harness.methods.METHODS`);
        default ``[DEQMethod(), SVIMethod(), LBFGSMethod()]``. Names must be unique.
    heldout
        Held-out data mapping, same names. Default: a random 20% of the rows of ``data``,
        drawn with the first seed (the same split for every seed).
    labels, heldout_labels
        Optional integer labels of the training and held-out rows (plate models); they add
        the ``accuracy`` metric and the ``"pca"`` baseline row. Without ``heldout``, pass
        ``labels`` for all rows (they are split with the data).
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
    TypeError
        ``data`` or ``heldout`` not a mapping.
    ValueError
        Unknown method names (the valid ones are listed), duplicate names, bad data or labels,
        labels for a coupled model, a coupled model without ``predictive_log_lik``, or a store
        holding units of a different run.

    Examples
    --------
    >>> import torch
    >>> from deqppl.expfam import family
    >>> from deqppl.models import ExpFamPCA
    >>> model = ExpFamPCA(family=family("bernoulli"), obs_dim=6, latent_dim=1)
    >>> data = model.simulate(30, seed=0, dtype=torch.float64).data
    >>> from deqppl.optim import LBFGS
    >>> result = compare(model, data, methods=[DEQMethod(optimizer=LBFGS(max_steps=20)), LBFGSMethod()],
    ...                  progress=False)
    >>> list(result.summary.index), result.globals_source[0] in ("deq", "lbfgs")
    (['deq', 'lbfgs'], True)
    >>> bool(result.summary.loc["deq", "certified_bound"] < 1e-6)
    True
    """
    methods = _resolve_methods(methods)
    seeds = [check_seed(s, f"seeds[{i}]") for i, s in enumerate(seeds)]
    if not seeds:
        raise ValueError("seeds is empty; pass at least one seed")
    train, test, lab_train, lab_ho = _split(model, data, heldout, labels, heldout_labels, seeds[0])
    layout = site_layout(model, train)
    if layout.coupled:
        if lab_train is not None:
            raise ValueError(
                f"labels need per-row latents; {type(model).__name__}'s locals "
                f"{list(layout.local_sites)} are coupled across rows (no data plate)"
            )
        if not callable(getattr(model, "predictive_log_lik", None)):
            raise ValueError(
                f"{type(model).__name__}'s locals are coupled across rows (no data plate), so "
                "held-out data can only be scored by its predictive density: give the model a "
                "method predictive_log_lik(data, values, heldout) -> (m,) log densities"
            )
    model_name = describe_model(model)
    data_key = _hash(model_name, *(train[k] for k in sorted(train)), *(test[k] for k in sorted(test)))
    names = [m.name for m in methods]
    deq_name = next((m.name for m in methods if isinstance(m, DEQMethod)), None)
    # Coupled locals live on the training inputs: the held-out stage infers those.
    infer_data = train if layout.coupled else test
    global_metrics = getattr(model, "global_metrics", None)

    rows: list[tuple] = []
    failures: dict[tuple[int, str, str], str] = {}
    first: dict[str, object] = {}
    sources: dict[int, str] = {}
    for seed in _progress(seeds, enable=progress, desc="compare (seeds)"):
        fits: dict[str, StageResult] = {}
        for m in methods:
            fits[m.name] = _run_unit(
                store,
                Unit(model_name, m.name, seed, "fit"),
                _hash(data_key, repr(m), seed, "fit"),
                lambda m=m: m.fit_globals(model, train, seed=seed, progress=progress),
            )
        _fill_failed(fits, "fit", seed, failures)
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
                lambda m=m: m.infer_locals(model, infer_data, shared, seed=seed, progress=progress),
            )
        _fill_failed(held, "heldout", seed, failures)

        fit_metrics = _common_rows(fits, deq_name)
        if callable(global_metrics):
            ref_globals = {k: fits[source].values[k] for k in model.global_sites}
            for name, r in fits.items():
                values = {k: r.values[k] for k in model.global_sites}
                if not _finite(values):  # a failed or diverged fit has nothing to compare
                    continue
                fit_metrics[name].update(
                    {k: float(v) for k, v in global_metrics(values, ref_globals).items()}
                )

        held_metrics = _common_rows(held, deq_name)
        locals_ = {name: {k: r.values[k] for k in layout.local_sites} for name, r in held.items()}
        bounds = {
            name: certified_bound(model, infer_data, shared, loc, layout) if _finite(loc) else None
            for name, loc in locals_.items()
        }
        bounds = {
            name: b if b is not None else _infinite_bound(layout, locals_[name])
            for name, b in bounds.items()
        }
        reference = _reference(bounds, held)
        per_datum = {}
        for name, loc in locals_.items():
            values = {**shared, **loc}
            metrics = held_metrics[name]
            metrics["certified_bound"] = bounds[name].worst
            metrics["min_hessian_eig"] = float(bounds[name].min_eig.min())
            metrics["max_abs_dz"] = max(
                max_abs_dz(loc[k], locals_[reference][k]) for k in layout.local_sites
            )
            if len(layout.local_sites) > 1:
                for k in layout.local_sites:
                    metrics[f"max_abs_dz[{k}]"] = max_abs_dz(loc[k], locals_[reference][k])
            if _is_failed(held[name]):
                # nothing to score (NaN parameters would be refused by the distributions)
                rows_ = 1 if layout.coupled else num_rows(test)
                per_datum[name] = torch.full((rows_,), math.nan, dtype=next(iter(test.values())).dtype)
                metrics["heldout_log_lik"] = math.nan
                continue
            if layout.coupled:
                lik = model.predictive_log_lik(train, values, test)
                per_datum[name] = torch.tensor([local_log_joint(model, infer_data, values)])
            else:
                lik = observed_log_lik(model, test, values)
                per_datum[name] = per_datum_log_joint(model, test, values)
            metrics["heldout_log_lik"] = float(lik.sum())
        stacked = torch.nan_to_num(torch.stack(list(per_datum.values())), nan=-math.inf)
        best_per_datum = float(stacked.max(0).values.sum())
        for name in held:
            held_metrics[name]["amortization_gap"] = best_per_datum - float(per_datum[name].sum())

        if lab_train is not None:
            train_locals = flatten_locals(layout, fits[source].values)
            clf = fit_classifier(train_locals, lab_train)
            for name, loc in locals_.items():
                z = flatten_locals(layout, loc)
                ok = bool(torch.isfinite(z).all())
                held_metrics[name]["accuracy"] = clf.accuracy(z, lab_ho) if ok else math.nan
            observed = torch.cat([train[k].reshape(train[k].shape[0], -1) for k in model.data_names], 1)
            observed_ho = torch.cat([test[k].reshape(test[k].shape[0], -1) for k in model.data_names], 1)
            num_components = min(layout.local_width, *observed.shape)
            pca = fit_pca(observed, num_components)
            pca_clf = fit_classifier(pca.transform(observed), lab_train)
            held_metrics["pca"] = {"accuracy": pca_clf.accuracy(pca.transform(observed_ho), lab_ho)}

        for stage, metrics in (("fit", fit_metrics), ("heldout", held_metrics)):
            for name, values in metrics.items():
                rows.extend((model_name, name, seed, stage, k, float(v)) for k, v in values.items())
        if seed == seeds[0]:
            first = {
                "latents": {
                    name: _latents(layout, loc)
                    for name, loc in locals_.items()
                },
                "local_values": locals_,
                "bounds": {name: b.bound for name, b in bounds.items()},
                "traces": {name: r.trace for name, r in fits.items()},
                "shared": shared,
                "reference": reference,
            }

    table = pd.DataFrame(rows, columns=COLUMNS)
    table["seed"] = table["seed"].astype("int64")
    table["value"] = table["value"].astype("float64")
    return Comparison(
        table=table,
        summary=_summary(table, names + (["pca"] if lab_train is not None else [])),
        latents=first["latents"],
        traces=first["traces"],
        model_name=model_name,
        globals_source=sources,
        reference=first["reference"],
        model=model,
        heldout_data=dict(test),
        heldout_labels=lab_ho,
        shared_globals=first["shared"],
        local_values=first["local_values"],
        bounds=first["bounds"],
        coupled=layout.coupled,
        train_data=dict(train),
        failures=failures,
    )


def _latents(layout: SiteLayout, locals_: Mapping[str, torch.Tensor]):
    # Comparison.latents: a (rows, coordinates) tensor for one local site, else the mapping.
    if len(layout.local_sites) > 1:
        return dict(locals_)
    flat = flatten_locals(layout, locals_)
    return flat[:, None] if layout.coupled else flat


def _infinite_bound(layout: SiteLayout, locals_: Mapping[str, torch.Tensor]) -> CertifiedBound:
    # Non-finite locals (a diverged method) have no certificate.
    flat = flatten_locals(layout, locals_)
    n = 1 if layout.coupled else flat.shape[0]
    inf = torch.full((n,), math.inf, dtype=flat.dtype)
    return CertifiedBound(bound=inf, grad_norm=inf.clone(), min_eig=torch.full_like(inf, math.nan))


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
