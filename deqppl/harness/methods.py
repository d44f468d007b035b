r"""Inference methods as objects: the rows of a comparison.

Every method answers the same two questions about any model of the protocol (its Pyro
program, ``data_names``, ``local_sites``, ``global_sites``; docs/CONVENTIONS.md):

* ``fit_globals(model, data)``: the joint MAP of every latent site on the training data (the
  globals and the training data's locals);
* ``infer_locals(model, data, globals)``: the conditional MAP of the local sites of ``data``
  with the globals held fixed, the quantity a DEQ encoder amortises (SPEC §2.2).

``data`` is the model's data mapping (e.g. ``{"y": y}`` or ``{"x": x, "y": y}``), already
checked by ``model.validate``: the comparison validates once at its entry and passes the
validated tensors inward, so methods do not validate again. Both stages return a
:class:`StageResult` whose ``values`` are keyed by the model's site names.

A method is a small frozen dataclass whose fields are its settings; :data:`METHODS` maps names
to classes and :func:`method` looks a name up (the CLI edge). A new capability adds a class
and a row. :class:`DEQMethod` takes the encoder class it fits, so one class serves every
encoder of the protocol (``PEDEncoder``, ``DeepPEDEncoder``, a kernel-GLM DEQ).

Examples
--------
>>> method("lbfgs").optimizer.rtol  # default settings: L-BFGS stopped on the gradient only
0.0
>>> sorted(METHODS)
['deq', 'lbfgs', 'svi']
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from deqppl.deq import AbstractSolver
from deqppl.encoders import AbstractMAPEncoder, PEDEncoder, fit_encoder
from deqppl.harness.sites import data_dtype, local_log_joint, take_rows
from deqppl.inference import fit_map, log_joint
from deqppl.optim import LBFGS, SVI, Adam, AlternatingNewton

__all__ = [
    "AbstractMethod",
    "DEQMethod",
    "LBFGSMethod",
    "METHODS",
    "SVIMethod",
    "StageResult",
    "method",
]


@dataclass(frozen=True, kw_only=True, repr=False, eq=False)
class StageResult:
    """Outcome of one stage (``fit_globals`` or ``infer_locals``) of one method.

    Attributes
    ----------
    values
        Site name -> value: every latent site of the model (globals and the training data's
        locals) after ``fit_globals``; the local sites only after ``infer_locals``.
    log_joint
        ``fit_globals``: the full log joint of the training data and every latent site.
        ``infer_locals``: $\\log p(\\text{data}, \\text{locals}\\mid\\text{globals})$, the part
        that depends on the locals (the prior of the fixed globals is left out).
    wall_time
        Seconds spent inferring (post-fit diagnostics excluded; see ``extra``).
    num_steps
        Optimiser steps, solver iterations or training epochs (see the method).
    num_grad_evals
        Evaluations of the objective's gradient or of the fixed-point map (see the method).
    status
        The underlying solver's or optimiser's status name, e.g. ``"converged"``.
    converged
        Whether the stage met its stopping criterion (for every sample, where per sample).
    per_sample_converged
        ``(n,)`` bool mask for per-sample solvers (the DEQ's forward solve), else ``None``.
    trace
        1-D tensor: the loss per step (optimisers, encoder training) or the largest residual per
        solver step (the DEQ's forward solve), where recorded.
    extra
        Further float diagnostics, e.g. ``spectral_radius`` (median over a subsample of rows
        of the spectral radius of the layer Jacobian at $z^*$), ``spectral_radius_max`` and
        ``diagnostics_wall_time`` (seconds spent on them, not part of ``wall_time``).
    """

    values: dict[str, torch.Tensor]
    log_joint: float
    wall_time: float
    num_steps: int
    num_grad_evals: int
    status: str
    converged: bool
    per_sample_converged: torch.Tensor | None = None
    trace: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    extra: dict[str, float] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (
            f"StageResult(status={self.status}, converged={self.converged}, "
            f"log_joint={self.log_joint:.10g}, num_steps={self.num_steps}, "
            f"num_grad_evals={self.num_grad_evals}, wall_time={self.wall_time:.3g} s, "
            f"values={ {k: tuple(v.shape) for k, v in self.values.items()} }, extra={self.extra})"
        )


def _status_name(status: object) -> str:
    return str(status.value) if isinstance(status, enum.Enum) else str(status)


def _check_globals(model, globals_: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    missing = [name for name in model.global_sites if name not in globals_]
    if missing:
        raise ValueError(
            f"globals must give the model's global sites {list(model.global_sites)}; "
            f"missing {missing} (given {sorted(globals_)})"
        )
    return {name: globals_[name].detach() for name in model.global_sites}


class AbstractMethod:
    """Base of the comparison's methods; never instantiated.

    A concrete method is a frozen dataclass with a ``name`` field and the two stages
    ``fit_globals(model, data, *, seed, progress)`` and
    ``infer_locals(model, data, globals, *, seed, progress)``, each returning a
    :class:`StageResult`. ``data`` is validated (``model.validate``'s output) and is not
    validated again.
    """

    name: str

    def __new__(cls, *args, **kwargs):
        if cls is AbstractMethod:
            raise TypeError("AbstractMethod is abstract; use DEQMethod, SVIMethod or LBFGSMethod")
        return super().__new__(cls)

    def fit_globals(
        self, model, data: Mapping[str, torch.Tensor], *, seed: int, progress: bool
    ) -> StageResult:
        raise NotImplementedError

    def infer_locals(
        self,
        model,
        data: Mapping[str, torch.Tensor],
        globals: Mapping[str, torch.Tensor],
        *,
        seed: int,
        progress: bool,
    ) -> StageResult:
        raise NotImplementedError


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"a method's name must be a non-empty string, got {name!r}")


# --------------------------------------------------------------------------------------------
# DEQ: an encoder of the protocol (SPEC §2.2, §3), globals by joint MAP through the fixed point
# --------------------------------------------------------------------------------------------
def _sites(encoder, z: torch.Tensor, data) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in encoder.to_sites(z, data).items()}


@dataclass(frozen=True, kw_only=True)
class DEQMethod(AbstractMethod):
    """A DEQ encoder: the latents are the fixed point of its layer (SPEC eq. 6, §3).

    Parameters
    ----------
    name
        Row name in the comparison.
    encoder
        The encoder class to fit and solve, a subclass of the encoder protocol
        :class:`~deqppl.encoders.AbstractMAPEncoder`: :class:`~deqppl.encoders.PEDEncoder`
        (default, exponential-family PCA), :class:`~deqppl.encoders.DeepPEDEncoder`
        (hierarchical latents), or a new one: the method builds it as ``encoder(model,
        solver=..., throw=False, seed=...)`` for the joint fit (``seed`` seeds its initial
        globals) and ``encoder.from_values(model, globals, solver=..., throw=False)`` for new
        data; tests/harness/test_zoo.py adds a user's encoder this way.
    solver
        Forward solver of the fixed point; ``None`` is the encoder's default solver.
    optimizer
        How the joint fit (:func:`~deqppl.encoders.fit.fit_encoder`) optimises the globals;
        ``None`` (default) is the encoder's own default
        (:meth:`~deqppl.encoders.AbstractMAPEncoder.default_fit_optimizer`: the structured
        ``AlternatingNewton()`` for PED and deep PED encoders with R = identity, ``LBFGS()``
        otherwise). :class:`~deqppl.optim.LBFGS` minimises the profiled
        objective $\\min_z L(\\text{globals}, z)$ full-batch (each evaluation one solve);
        :class:`~deqppl.optim.Adam` takes minibatch steps for data too large for one batch;
        :class:`~deqppl.optim.AlternatingNewton` is the structured joint fit (encoders with a
        :meth:`~deqppl.encoders.AbstractMAPEncoder.joint_structure`).
    warm_start
        Start each solve of the fit from the latents of the previous one.
    num_spectral
        Rows (a seeded subsample) on which the spectral radius of the layer Jacobian at $z^*$
        is estimated; 0 skips it.

    Notes
    -----
    ``fit_globals``: ``num_steps`` counts epochs or L-BFGS iterations, ``num_grad_evals`` the
    fixed-point solves. Its ``wall_time`` is the fit alone; the final solve for the training
    latents, their log joint and the spectral radii are timed as ``diagnostics_wall_time``.
    ``infer_locals``: one forward solve from the encoder's initial guess; ``num_steps`` solver
    iterations, ``num_grad_evals`` evaluations of the layer.

    Examples
    --------
    >>> from deqppl.optim import LBFGS
    >>> DEQMethod(optimizer=LBFGS(max_steps=50)).optimizer.max_steps
    50
    >>> from deqppl.encoders import DeepPEDEncoder
    >>> DEQMethod(name="deep", encoder=DeepPEDEncoder).encoder.__name__
    'DeepPEDEncoder'
    """

    name: str = "deq"
    encoder: type = PEDEncoder
    solver: AbstractSolver | None = None
    # None: the encoder's default fit (fit_encoder's), so the harness's DEQ row is the fit a
    # user of fit_encoder gets.
    optimizer: LBFGS | Adam | AlternatingNewton | None = None
    warm_start: bool = True
    num_spectral: int = 256

    def __post_init__(self) -> None:
        _check_name(self.name)
        if not (isinstance(self.encoder, type) and issubclass(self.encoder, AbstractMAPEncoder)):
            raise TypeError(
                f"encoder must be a class of the encoder protocol (a subclass of "
                f"deqppl.encoders.AbstractMAPEncoder, e.g. PEDEncoder, DeepPEDEncoder), got {self.encoder!r}"
            )
        if self.optimizer is not None:
            _check_optimizer("DEQMethod", self.optimizer, (LBFGS, Adam, AlternatingNewton))
        if isinstance(self.num_spectral, bool) or not isinstance(self.num_spectral, int) or self.num_spectral < 0:
            raise ValueError(f"num_spectral must be a non-negative integer, got {self.num_spectral!r}")

    def _solve(self, encoder, data: Mapping[str, torch.Tensor]):
        with torch.no_grad():
            return encoder.solve(data, throw=False, validated=True)

    def _diagnostics(self, encoder, model, data, z: torch.Tensor, seed: int) -> dict[str, float]:
        if self.num_spectral == 0 or z.shape[0] == 0:
            return {}
        if getattr(model, "plate_name", "data") is None:
            rows_data, rows_z = data, z  # coupled locals: one problem, no rows to subsample
        else:
            gen = torch.Generator().manual_seed(seed)
            rows = torch.randperm(z.shape[0], generator=gen)[: self.num_spectral]
            rows_data, rows_z = take_rows(data, rows), z[rows]
        radius = encoder.spectral_radius(dict(rows_data), rows_z, validated=True)
        return {
            "spectral_radius": float(radius.median()),
            "spectral_radius_max": float(radius.max()),
        }

    def fit_globals(
        self, model, data: Mapping[str, torch.Tensor], *, seed: int, progress: bool
    ) -> StageResult:
        start = time.perf_counter()
        encoder = self.encoder(model, solver=self.solver, throw=False, seed=seed).to(data_dtype(data))
        fit = fit_encoder(
            encoder, data, optimizer=self.optimizer, seed=seed, progress=progress,
            warm_start=self.warm_start,
        )
        wall_time = time.perf_counter() - start
        # Diagnostics, timed apart: the training latents at the fitted globals, their log joint
        # and the spectral radii are not part of the fit's cost.
        start = time.perf_counter()
        sol = self._solve(encoder, data)
        values = {**encoder.values(), **_sites(encoder, sol.value, data)}
        with torch.no_grad():
            total = float(log_joint(model, data, values))
        extra = self._diagnostics(encoder, model, data, sol.value.detach(), seed)
        extra["fraction_converged"] = float(sol.converged.double().mean())
        extra["diagnostics_wall_time"] = time.perf_counter() - start
        return StageResult(
            values=values,
            log_joint=total,
            wall_time=wall_time,
            num_steps=int(fit.num_steps),
            num_grad_evals=int(fit.num_solves),
            status=_status_name(fit.status),
            converged=bool(fit.converged) and bool(sol.converged.all()),
            per_sample_converged=sol.converged.detach().clone(),
            trace=fit.loss_trace.detach().clone(),
            extra=extra,
        )

    def infer_locals(
        self,
        model,
        data: Mapping[str, torch.Tensor],
        globals: Mapping[str, torch.Tensor],
        *,
        seed: int,
        progress: bool,
    ) -> StageResult:
        start = time.perf_counter()
        encoder = self.encoder.from_values(model, _check_globals(model, globals), solver=self.solver, throw=False)
        sol = self._solve(encoder, data)
        wall_time = time.perf_counter() - start
        start = time.perf_counter()
        locals_ = _sites(encoder, sol.value, data)
        extra = self._diagnostics(encoder, model, data, sol.value.detach(), seed)
        extra["fraction_converged"] = float(sol.converged.double().mean())
        extra["diagnostics_wall_time"] = time.perf_counter() - start
        return StageResult(
            values=locals_,
            log_joint=local_log_joint(model, data, {**globals, **locals_}),
            wall_time=wall_time,
            num_steps=int(sol.num_steps),
            num_grad_evals=int(sol.num_fevals),
            status=_status_name(sol.status),
            converged=bool(sol.converged.all()),
            per_sample_converged=sol.converged.detach().clone(),
            trace=sol.trace.detach().clone() if sol.trace is not None else torch.zeros(0),
            extra=extra,
        )


# --------------------------------------------------------------------------------------------
# Optimisers on the Pyro log joint (deqppl.inference.fit_map)
# --------------------------------------------------------------------------------------------
def _from_map(model, data, fit, *, local: bool, wall_time: float) -> StageResult:
    if local:
        values = {name: fit.values[name] for name in model.local_sites}
        value = local_log_joint(model, data, fit.values)
    else:
        values = dict(fit.values)
        value = float(fit.log_joint)
    return StageResult(
        values=values,
        log_joint=value,
        wall_time=wall_time,
        num_steps=int(fit.num_steps),
        num_grad_evals=int(fit.num_grad_evals),
        status=_status_name(fit.status),
        converged=bool(fit.converged),
        per_sample_converged=None,
        trace=fit.loss_trace.detach().clone(),
        extra={},
    )


class _AbstractFitMapMethod(AbstractMethod):
    """Both stages by :func:`~deqppl.inference.fit_map`; subclasses say how (``_fit``)."""

    @abc.abstractmethod
    def _fit(self, model, data, fixed, seed, progress): ...

    def fit_globals(
        self, model, data: Mapping[str, torch.Tensor], *, seed: int, progress: bool
    ) -> StageResult:
        start = time.perf_counter()
        fit = self._fit(model, data, None, seed, progress)
        return _from_map(model, data, fit, local=False, wall_time=time.perf_counter() - start)

    def infer_locals(
        self,
        model,
        data: Mapping[str, torch.Tensor],
        globals: Mapping[str, torch.Tensor],
        *,
        seed: int,
        progress: bool,
    ) -> StageResult:
        start = time.perf_counter()
        fit = self._fit(model, data, _check_globals(model, globals), seed, progress)
        return _from_map(model, data, fit, local=True, wall_time=time.perf_counter() - start)


def _check_optimizer(owner: str, optimizer: object, allowed: tuple[type, ...]) -> None:
    if not isinstance(optimizer, allowed):
        names = " or ".join(f"deqppl.optim.{cls.__name__}(...)" for cls in allowed)
        raise TypeError(f"{owner}.optimizer must be {names}, got {optimizer!r}")


@dataclass(frozen=True, kw_only=True)
class SVIMethod(_AbstractFitMapMethod):
    """MAP by SVI with Pyro's ``AutoDelta`` guide and Adam (:func:`~deqppl.inference.fit_map`).

    Parameters
    ----------
    name
        Row name in the comparison.
    optimizer
        The :class:`~deqppl.optim.SVI` settings (default: the tuned defaults of
        ``docs/svi_tuning.md``). Its ``subsample_size`` applies to the joint fit only; the
        conditional fits of ``infer_locals`` are full batch.

    Notes
    -----
    ``num_steps`` counts Adam updates; ``num_grad_evals`` the (minibatch) ELBO gradients.

    Examples
    --------
    >>> from deqppl.optim import SVI
    >>> SVIMethod(optimizer=SVI(lr=0.1)).optimizer.lr
    0.1
    """

    name: str = "svi"
    optimizer: SVI = field(default_factory=SVI)

    def __post_init__(self) -> None:
        _check_name(self.name)
        _check_optimizer("SVIMethod", self.optimizer, (SVI,))

    def _fit(self, model, data, fixed, seed, progress):
        optimizer = self.optimizer
        if fixed is not None and optimizer.subsample_size is not None:
            optimizer = dataclasses.replace(optimizer, subsample_size=None)
        return fit_map(model, data, optimizer=optimizer, fixed=fixed, seed=seed, progress=progress)


@dataclass(frozen=True, kw_only=True)
class LBFGSMethod(_AbstractFitMapMethod):
    """MAP by full-batch L-BFGS stopped on the gradient (:func:`~deqppl.inference.fit_map`).

    Parameters
    ----------
    name
        Row name in the comparison.
    optimizer
        The :class:`~deqppl.optim.LBFGS` settings (default ``LBFGS()``).

    Notes
    -----
    ``num_steps`` counts L-BFGS iterations; ``num_grad_evals`` the log-joint gradients,
    line-search trials included.

    Examples
    --------
    >>> from deqppl.optim import LBFGS
    >>> LBFGSMethod(optimizer=LBFGS(max_steps=100)).optimizer.max_steps
    100
    """

    name: str = "lbfgs"
    optimizer: LBFGS = field(default_factory=LBFGS)

    def __post_init__(self) -> None:
        _check_name(self.name)
        _check_optimizer("LBFGSMethod", self.optimizer, (LBFGS,))

    def _fit(self, model, data, fixed, seed, progress):
        return fit_map(model, data, optimizer=self.optimizer, fixed=fixed, seed=seed, progress=progress)


#: Name -> method class; ``method(name)`` builds one with default settings.
METHODS: dict[str, type[AbstractMethod]] = {
    "deq": DEQMethod,
    "svi": SVIMethod,
    "lbfgs": LBFGSMethod,
}


def method(name: str) -> AbstractMethod:
    """The method registered as ``name``, with default settings (the CLI edge).

    Raises
    ------
    ValueError
        If ``name`` is unknown; the message lists the valid names.

    Examples
    --------
    >>> method("svi").name
    'svi'
    """
    try:
        cls = METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown method {name!r}; valid methods are: {', '.join(sorted(METHODS))}"
        ) from None
    return cls()
