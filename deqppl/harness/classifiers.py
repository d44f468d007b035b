r"""Implicit classifiers in the harness: pcDEQ, monDEQ, unconstrained DEQ and explicit nets.

:func:`compare_classifiers` trains every method (a layer family of :mod:`deqppl.layers`) in
every architecture on one :class:`ImageSplit`, for every :class:`ClassifierStage` (its training
settings, seeds and initial-weight scale: the x10 stress test is a stage) and seed, and
returns the tidy table of the harness (:data:`~deqppl.harness.compare.COLUMNS`: ``model`` is
``"<split>-<architecture>"``, ``stage`` the stage's name) plus a summary over seeds.

Metrics of one run (glossary rows in :mod:`deqppl.report.glossary`):

* data fit: ``test_accuracy``, ``test_loss``, ``train_loss_first`` / ``train_loss_last``
  (mean training cross-entropy of the first and last epoch: a run that learns nothing keeps
  the first);
* time: ``time_per_epoch``, ``train_wall_time``;
* convergence: ``forward_steps`` / ``backward_steps`` (mean solver steps per forward and
  adjoint solve in training), ``test_forward_steps``, ``forward_failed`` (training samples
  whose forward solve failed), ``backward_failed`` (adjoint solves that failed),
  ``skipped_steps`` (optimiser steps skipped for a non-finite gradient),
  ``test_forward_failed``, ``epochs_run`` and ``unconverged`` (1 if the run had any failed
  solve, skipped step or stopped early);
* the certificate of every implicit layer on the test set after training, from the layer's
  own :meth:`~deqppl.layers.AbstractImplicitLayer.diagnose` (extension by class: each layer
  family reports what its theory certifies), the worst case over layers: for every implicit
  layer ``all_samples_converged``, ``fraction_converged``, ``rate_residual`` and
  ``rho_jacobian`` ($\rho(\partial f/\partial z)$ at $z^*$, power iteration); pcDEQ layers add
  the :class:`~deqppl.layers.Certificate` (``certified``, ``cone_ok``, ``activation_ok``,
  ``injection_ok``, ``min_weight``, ``g0_min``, ``rate_thompson``, ``rho_bound``,
  ``slope_max``); monDEQ layers ``monotonicity_margin``, ``measured_margin``, ``lipschitz``;
* ``num_parameters``.

Each finished run is a unit of a :class:`~deqppl.harness.store.RunStore` (a
:class:`~deqppl.harness.methods.StageResult` whose ``extra`` holds the metrics and ``trace``
the loss per epoch), so an interrupted comparison resumes where it stopped.
"""

from __future__ import annotations

import abc
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

from deqppl._progress import progress as _progress
from deqppl.harness.compare import COLUMNS, _hash
from deqppl.harness.methods import StageResult
from deqppl.harness.store import RunStore, Unit
from deqppl.layers import (AbstractLayerFamily, ClassifierFit, evaluate_classifier,
                           fit_classifier, implicit_layers, linear_classifier,
                           multi_conv_classifier, num_parameters, single_conv_classifier)
from deqppl.validation import check_seed

__all__ = [
    "AbstractArchitecture",
    "ClassifierComparison",
    "ClassifierMethod",
    "ClassifierStage",
    "ClassifierTraining",
    "ImageSplit",
    "LinearArchitecture",
    "MultiConvArchitecture",
    "SingleConvArchitecture",
    "compare_classifiers",
]

# A layer diagnostic where smaller is worse is reduced over the implicit layers of a network by
# min; every other one (rates, spectral radii, slopes, Lipschitz constants) by max.
_WORST_IS_MIN = frozenset({
    "certified", "cone_ok", "activation_ok", "injection_ok", "all_samples_converged",
    "fraction_converged", "min_weight", "g0_min", "monotonicity_margin", "measured_margin",
})
# Column order of the summary; further metrics follow, sorted.
_ORDER = (
    "test_accuracy", "num_parameters", "forward_steps", "backward_steps", "time_per_epoch",
    "unconverged_runs", "runs", "certified", "cone_ok", "activation_ok", "injection_ok",
    "rate_thompson", "rate_residual", "rho_jacobian", "rho_bound", "slope_max",
    "all_samples_converged", "monotonicity_margin", "measured_margin", "lipschitz",
)


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _positive_real(name: str, value: object, *, strict: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or (value <= 0 if strict else value < 0):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} 0, "
                         f"got {value!r}")


def _name(value: object, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True, eq=False)
class ImageSplit:
    """A fixed train/test split of labelled images ``(n, channels, height, width)``.

    Parameters
    ----------
    name
        Data set name; the table's ``model`` is ``"<name>-<architecture>"``.
    x_train, x_test
        Floating images of one dtype (the networks are built in it) and one image shape.
    y_train, y_test
        Integer class labels ``>= 0``, one per image.

    Examples
    --------
    >>> import torch
    >>> split = ImageSplit(name="toy", x_train=torch.rand(6, 1, 4, 4), y_train=torch.arange(6) % 2,
    ...                    x_test=torch.rand(2, 1, 4, 4), y_test=torch.tensor([0, 1]))
    >>> split.in_channels, split.image_size, split.num_classes
    (1, (4, 4), 2)
    >>> ImageSplit(name="toy", x_train=torch.rand(6, 16), y_train=torch.arange(6) % 2,
    ...            x_test=torch.rand(2, 16), y_test=torch.tensor([0, 1]))
    Traceback (most recent call last):
    ...
    ValueError: x_train must be images (n, channels, height, width), got shape (6, 16)
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def __post_init__(self) -> None:
        _name(self.name, "name")
        for what in ("x_train", "x_test"):
            x = getattr(self, what)
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                raise TypeError(f"{what} must be a floating-point torch.Tensor, got "
                                f"{getattr(x, 'dtype', type(x).__name__)}")
            if x.ndim != 4 or x.shape[0] < 1:
                raise ValueError(f"{what} must be images (n, channels, height, width), got "
                                 f"shape {tuple(x.shape)}")
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"{what} has non-finite entries")
        if self.x_test.shape[1:] != self.x_train.shape[1:]:
            raise ValueError(f"x_test images have shape {tuple(self.x_test.shape[1:])}, x_train "
                             f"images {tuple(self.x_train.shape[1:])}; they must agree")
        if self.x_test.dtype != self.x_train.dtype:
            raise TypeError(f"x_test is {self.x_test.dtype} but x_train is "
                            f"{self.x_train.dtype}; use one dtype")
        for what, x in (("y_train", self.x_train), ("y_test", self.x_test)):
            y = getattr(self, what)
            if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"{what} must be an integer torch.Tensor, got "
                                f"{getattr(y, 'dtype', type(y).__name__)}")
            if y.shape != (x.shape[0],):
                raise ValueError(f"{what} must have shape ({x.shape[0]},), got {tuple(y.shape)}")
            if bool((y < 0).any()):
                raise ValueError(f"{what} must be >= 0, got {int(y.min())}")

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.x_train.shape[2]), int(self.x_train.shape[3])

    @property
    def num_classes(self) -> int:
        return int(max(int(self.y_train.max()), int(self.y_test.max()))) + 1

    @property
    def dtype(self) -> torch.dtype:
        return self.x_train.dtype

    def fingerprint(self) -> str:
        """SHA-256 of the name and the four tensors (the run store's key)."""
        return _hash(self.name, self.x_train, self.y_train, self.x_test, self.y_test)


# ------------------------------------------------------------------------------------------
# architectures (the paper's, SPEC 5)
# ------------------------------------------------------------------------------------------
class AbstractArchitecture(abc.ABC):
    """How a classifier is built around a layer family; a frozen dataclass per architecture."""

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """Short name, part of the table's ``model``."""

    @abc.abstractmethod
    def build(self, family: AbstractLayerFamily, *, split: ImageSplit, seed: int) -> nn.Module:
        """The network for ``split``'s image size, channels, classes and dtype."""


@dataclass(frozen=True, kw_only=True)
class LinearArchitecture(AbstractArchitecture):
    """`deqppl.layers.linear_classifier`: one fully connected implicit layer of ``features``."""

    features: int = 80

    def __post_init__(self) -> None:
        _positive_int("features", self.features)

    @property
    def name(self) -> str:
        return "linear"

    def build(self, family, *, split, seed):
        return linear_classifier(family, image_size=split.image_size,
                                 in_channels=split.in_channels, features=self.features,
                                 num_classes=split.num_classes, seed=seed, dtype=split.dtype)


@dataclass(frozen=True, kw_only=True)
class SingleConvArchitecture(AbstractArchitecture):
    """`deqppl.layers.single_conv_classifier` (the paper's MNIST sizes by default)."""

    channels: int = 82
    pool: int = 8

    def __post_init__(self) -> None:
        _positive_int("channels", self.channels)
        _positive_int("pool", self.pool)

    @property
    def name(self) -> str:
        return "conv"

    def build(self, family, *, split, seed):
        return single_conv_classifier(family, image_size=split.image_size,
                                      in_channels=split.in_channels, channels=self.channels,
                                      pool=self.pool, num_classes=split.num_classes, seed=seed,
                                      dtype=split.dtype)


@dataclass(frozen=True, kw_only=True)
class MultiConvArchitecture(AbstractArchitecture):
    """`deqppl.layers.multi_conv_classifier` (the paper's MNIST widths by default)."""

    channels: tuple[int, ...] = (12, 24, 48)

    def __post_init__(self) -> None:
        if not isinstance(self.channels, tuple) or not self.channels:
            raise TypeError(f"channels must be a non-empty tuple of ints, got {self.channels!r}")
        for c in self.channels:
            _positive_int("every entry of channels", c)

    @property
    def name(self) -> str:
        return "multi-conv"

    def build(self, family, *, split, seed):
        return multi_conv_classifier(family, image_size=split.image_size,
                                     in_channels=split.in_channels, channels=self.channels,
                                     num_classes=split.num_classes, seed=seed, dtype=split.dtype)


# ------------------------------------------------------------------------------------------
# methods and stages
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class ClassifierMethod:
    """One row of a classifier comparison: a named layer family.

    Parameters
    ----------
    name
        Row name.
    family
        `deqppl.layers.PCDEQFamily`, `MonDEQFamily`, `DEQFamily`, `ExplicitFamily` or a new
        subclass of `deqppl.layers.AbstractLayerFamily`; its layers' ``diagnose`` supply the
        certificate columns.

    Examples
    --------
    >>> from deqppl.layers import PCDEQFamily
    >>> ClassifierMethod(name="pcdeq-1", family=PCDEQFamily()).name
    'pcdeq-1'
    """

    name: str
    family: AbstractLayerFamily

    def __post_init__(self) -> None:
        _name(self.name, "a classifier method's name")
        if not isinstance(self.family, AbstractLayerFamily):
            raise TypeError(f"family must be a layer family (PCDEQFamily(), MonDEQFamily(), "
                            f"DEQFamily(), ExplicitFamily()), got {self.family!r}")


@dataclass(frozen=True, kw_only=True)
class ClassifierTraining:
    """Settings of `deqppl.layers.fit_classifier` (AdamW, the paper's batch of 64).

    ``skip_nonfinite_steps`` (default True) lets a model whose solves fail on some samples keep
    training, its skipped steps counted, so that the table reports what happened instead of
    stopping at the first NaN gradient.
    """

    num_epochs: int = 6
    batch_size: int = 64
    lr: float = 1e-2
    weight_decay: float = 0.0
    skip_nonfinite_steps: bool = True

    def __post_init__(self) -> None:
        _positive_int("num_epochs", self.num_epochs)
        _positive_int("batch_size", self.batch_size)
        _positive_real("lr", self.lr)
        _positive_real("weight_decay", self.weight_decay, strict=False)
        if not isinstance(self.skip_nonfinite_steps, bool):
            raise TypeError(f"skip_nonfinite_steps must be a bool, got "
                            f"{self.skip_nonfinite_steps!r}")


@dataclass(frozen=True, kw_only=True)
class ClassifierStage:
    """One stage of a classifier comparison: training settings, seeds, initial-weight scale.

    Parameters
    ----------
    name
        The table's ``stage``.
    training
        `ClassifierTraining`.
    seeds
        One run per seed (initial weights and batch order).
    weight_scale
        Every layer's recurrent weight is multiplied by this before training, through the
        layer's ``scale_weight_`` (pcDEQ and unconstrained DEQ: the effective $W$, i.e. its
        weight-norm gain; monDEQ: $A$ and $B$; explicit: its weight): 10 is the stress test.

    Examples
    --------
    >>> ClassifierStage(name="stress_x10", weight_scale=10.0, seeds=(0, 1)).seeds
    (0, 1)
    """

    name: str = "test"
    training: ClassifierTraining = field(default_factory=ClassifierTraining)
    seeds: tuple[int, ...] = (0,)
    weight_scale: float = 1.0

    def __post_init__(self) -> None:
        _name(self.name, "a stage's name")
        if not isinstance(self.training, ClassifierTraining):
            raise TypeError(f"training must be a ClassifierTraining, got {self.training!r}")
        if not isinstance(self.seeds, tuple) or not self.seeds:
            raise TypeError(f"seeds must be a non-empty tuple of ints, got {self.seeds!r}")
        for k, s in enumerate(self.seeds):
            check_seed(s, f"seeds[{k}]")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}")
        _positive_real("weight_scale", self.weight_scale)


# ------------------------------------------------------------------------------------------
# the result
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True, eq=False)
class ClassifierComparison:
    """Result of :func:`compare_classifiers`.

    Attributes
    ----------
    table
        Tidy frame with the harness's columns :data:`~deqppl.harness.compare.COLUMNS`, one row
        per model x method x seed x stage x metric.
    summary
        Mean over seeds: index ``(model, stage, method)``, one column per metric, plus
        ``runs`` (seeds) and ``unconverged_runs`` (runs with any failed solve, skipped step or
        early stop).
    sd
        Standard deviation over seeds (``nan`` for one seed), same index and metric columns.
    traces
        ``(model, method, seed, stage)`` -> training loss per epoch.
    statuses
        ``(model, method, seed, stage)`` -> the fit's `deqppl.layers.FitStatus` value and its
        message (empty when it completed).
    """

    table: pd.DataFrame
    summary: pd.DataFrame
    sd: pd.DataFrame
    traces: dict[tuple[str, str, int, str], torch.Tensor] = field(default_factory=dict)
    statuses: dict[tuple[str, str, int, str], str] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"ClassifierComparison(runs={len(self.traces)}, rows={len(self.table)})"


# ------------------------------------------------------------------------------------------
# one run
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def _layer_inputs(model: nn.Module, x: torch.Tensor) -> list[tuple[nn.Module, torch.Tensor]]:
    """The input each implicit layer of ``model`` sees for ``x`` (eval mode), in module order."""
    layers = implicit_layers(model)
    seen: dict[int, torch.Tensor] = {}
    hooks = [layer.register_forward_pre_hook(
        lambda module, args: seen.__setitem__(id(module), args[0].detach())) for layer in layers]
    try:
        model.eval()
        model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return [(layer, seen[id(layer)]) for layer in layers]


def _diagnostics(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    out: dict[str, float] = {}
    for layer, inputs in _layer_inputs(model, x):
        for name, value in layer.diagnose(inputs).items():
            value = float(value)
            if name not in out:
                out[name] = value
            else:
                reduce = min if name in _WORST_IS_MIN else max
                out[name] = reduce(out[name], value)
    return out


def _run(method: ClassifierMethod, arch: AbstractArchitecture, stage: ClassifierStage,
         seed: int, split: ImageSplit) -> StageResult:
    with torch.random.fork_rng(devices=[]):
        # the builders draw from their own seeded generators; this only makes anything else
        # that might use the global one reproducible, without leaving a trace outside
        torch.manual_seed(seed)
        model = arch.build(method.family, split=split, seed=seed)
        if stage.weight_scale != 1.0:
            for module in model.modules():
                scale = getattr(module, "scale_weight_", None)
                if module is not model and callable(scale):
                    scale(stage.weight_scale)
        t = stage.training
        start = time.perf_counter()
        fit: ClassifierFit = fit_classifier(
            model, split.x_train, split.y_train, num_epochs=t.num_epochs,
            batch_size=t.batch_size, lr=t.lr, weight_decay=t.weight_decay, seed=seed,
            skip_nonfinite_steps=t.skip_nonfinite_steps)
        train_time = time.perf_counter() - start
        losses = [e.loss for e in fit.epochs]
        metrics = {
            "num_parameters": float(num_parameters(model)),
            "epochs_run": float(len(fit.epochs)),
            "time_per_epoch": fit.mean("wall_time"),
            "train_wall_time": train_time,
            "forward_steps": fit.mean("forward_steps"),
            "backward_steps": fit.mean("backward_steps"),
            "forward_failed": float(fit.forward_failed),
            "backward_failed": float(fit.backward_failed),
            "skipped_steps": float(fit.skipped_steps),
            "train_loss_first": losses[0] if losses else math.nan,
            "train_loss_last": losses[-1] if losses else math.nan,
        }
        completed = fit.status.name == "COMPLETED"
        if completed:
            ev = evaluate_classifier(model, split.x_test, split.y_test)
            metrics.update(test_accuracy=ev.accuracy, test_loss=ev.loss,
                           test_forward_steps=ev.forward_steps,
                           test_forward_failed=float(ev.forward_failed))
            metrics.update(_diagnostics(model, split.x_test))
        else:
            metrics.update(test_accuracy=math.nan, test_loss=math.nan,
                           test_forward_steps=math.nan, test_forward_failed=math.nan)
        unconverged = (not completed or fit.forward_failed > 0 or fit.backward_failed > 0
                       or fit.skipped_steps > 0 or metrics["test_forward_failed"] > 0)
        metrics["unconverged"] = float(unconverged)
    return StageResult(
        values={}, log_joint=math.nan, wall_time=train_time, num_steps=len(fit.epochs),
        num_grad_evals=0,
        status=fit.status.value + (f": {fit.message}" if fit.message else ""),
        converged=not unconverged,
        trace=torch.tensor(losses, dtype=torch.float64), extra=metrics)


def _check_list(values: object, kind: type, what: str, example: str) -> list:
    if isinstance(values, kind):
        values = [values]
    if not isinstance(values, Sequence) or isinstance(values, str) or not values:
        raise TypeError(f"{what} must be a non-empty sequence of {kind.__name__} objects, e.g. "
                        f"{example}; got {values!r}")
    for v in values:
        if not isinstance(v, kind):
            raise TypeError(f"every entry of {what} must be a {kind.__name__}, got {v!r}")
    names = [v.name for v in values]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{what} names must be unique, got duplicates {dup}")
    return list(values)


def compare_classifiers(
    methods: Sequence[ClassifierMethod],
    split: ImageSplit,
    *,
    architectures: Sequence[AbstractArchitecture] = (LinearArchitecture(),),
    stages: Sequence[ClassifierStage] = (ClassifierStage(),),
    store: RunStore | None = None,
    progress: bool = True,
) -> ClassifierComparison:
    """Train and test every method in every architecture, stage and seed on ``split``.

    Parameters
    ----------
    methods
        `ClassifierMethod` objects with unique names.
    split
        The `ImageSplit` (the networks use its dtype).
    architectures
        `LinearArchitecture`, `SingleConvArchitecture`, `MultiConvArchitecture` (unique names).
    stages
        `ClassifierStage` objects (unique names), e.g. the plain protocol and the x10 stress.
    store
        A `deqppl.harness.RunStore`: each finished run is saved at once and runs already in
        it are loaded, so an interrupted comparison resumes (a store holding runs of other
        data or settings is refused).
    progress
        Show a progress bar over runs.

    Returns
    -------
    ClassifierComparison

    Examples
    --------
    >>> import torch
    >>> from deqppl.layers import PCDEQFamily, DEQFamily
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.rand(40, 1, 3, 3, generator=g, dtype=torch.float64)
    >>> y = (x.mean((1, 2, 3)) > 0.5).long()
    >>> split = ImageSplit(name="toy", x_train=x[:30], y_train=y[:30], x_test=x[30:], y_test=y[30:])
    >>> result = compare_classifiers(
    ...     [ClassifierMethod(name="pcdeq", family=PCDEQFamily()),
    ...      ClassifierMethod(name="deq", family=DEQFamily())], split,
    ...     architectures=[LinearArchitecture(features=8)],
    ...     stages=[ClassifierStage(training=ClassifierTraining(num_epochs=1, batch_size=10))],
    ...     progress=False)
    >>> row = result.summary.loc[("toy-linear", "test", "pcdeq")]
    >>> float(row["certified"]), float(row["unconverged_runs"]), float(row["test_accuracy"]) > 0
    (1.0, 0.0, True)
    >>> bool(pd.isna(result.summary.loc[("toy-linear", "test", "deq"), "certified"]))
    True
    """
    methods = _check_list(methods, ClassifierMethod, "methods",
                          "[ClassifierMethod(name='pcdeq', family=PCDEQFamily())]")
    if not isinstance(split, ImageSplit):
        raise TypeError(f"split must be an ImageSplit, got {type(split).__name__}")
    architectures = _check_list(architectures, AbstractArchitecture, "architectures",
                                "[LinearArchitecture()]")
    stages = _check_list(stages, ClassifierStage, "stages", "[ClassifierStage()]")
    if store is not None and not isinstance(store, RunStore):
        raise TypeError(f"store must be a RunStore or None, got {type(store).__name__}")
    data_key = split.fingerprint()
    units = [(arch, stage, method, seed) for stage in stages for arch in architectures
             for method in methods for seed in stage.seeds]
    rows: list[tuple] = []
    traces: dict[tuple[str, str, int, str], torch.Tensor] = {}
    statuses: dict[tuple[str, str, int, str], str] = {}
    for arch, stage, method, seed in _progress(units, enable=progress, desc="classifiers"):
        model_name = f"{split.name}-{arch.name}"
        unit = Unit(model_name, method.name, seed, stage.name)
        fingerprint = _hash(data_key, repr(method), repr(arch), repr(stage), seed)
        if store is not None and unit in store:
            result = store.load(unit, fingerprint=fingerprint)
        else:
            result = _run(method, arch, stage, seed, split)
            if store is not None:
                store.save(unit, result, fingerprint=fingerprint)
        key = (model_name, method.name, seed, stage.name)
        traces[key] = result.trace
        statuses[key] = result.status
        rows.extend((model_name, method.name, seed, stage.name, k, float(v))
                    for k, v in result.extra.items())
    table = pd.DataFrame(rows, columns=COLUMNS)
    table["seed"] = table["seed"].astype("int64")
    table["value"] = table["value"].astype("float64")
    order = [(f"{split.name}-{a.name}", s.name, m.name) for s in stages for a in architectures
             for m in methods]
    summary, sd = _summaries(table, order)
    return ClassifierComparison(table=table, summary=summary, sd=sd, traces=traces,
                                statuses=statuses)


def _summaries(table: pd.DataFrame, order: list[tuple[str, str, str]]):
    index = pd.MultiIndex.from_tuples(order, names=["model", "stage", "method"])
    keys = ["model", "stage", "method"]
    mean = table.pivot_table(index=keys, columns="metric", values="value", aggfunc="mean",
                             dropna=False)
    sd = table.pivot_table(index=keys, columns="metric", values="value", aggfunc="std",
                           dropna=False)
    runs = table.groupby(keys)["seed"].nunique()
    bad = table[table["metric"] == "unconverged"].groupby(keys)["value"].sum()
    mean["runs"] = runs.astype("float64")
    mean["unconverged_runs"] = bad
    known = [c for c in _ORDER if c in mean.columns]
    columns = known + sorted(c for c in mean.columns if c not in known)
    mean = mean.reindex(index=index, columns=columns)
    sd = sd.reindex(index=index, columns=[c for c in columns if c in sd.columns])
    for frame in (mean, sd):
        frame.columns.name = None
    return mean, sd
