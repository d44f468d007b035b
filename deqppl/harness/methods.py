r"""Inference methods as objects: the rows of a comparison.

Every method answers the same two questions about an
:class:`~deqppl.models.ExpFamPCA`-like model (SPEC §2):

* ``fit_globals``: the joint MAP of the globals $(W, B)$ (and the training latents) on the
  training rows;
* ``infer_locals``: the conditional MAP $z^*(y; W, B)$ of the latents of new rows with the
  globals held fixed, the quantity a DEQ encoder amortises (SPEC §2.2).

Both return a :class:`StageResult`. A method is a small frozen dataclass whose fields are its
settings; :data:`METHODS` maps names to classes and :func:`method` looks a name up (the CLI
edge). A new capability adds a class and a row.

Examples
--------
>>> method("lbfgs")
LBFGSMethod(name='lbfgs', max_steps=None, rtol=None, gtol=None, xtol=None)
>>> sorted(METHODS)
['deq', 'lbfgs', 'svi']
"""

from __future__ import annotations

import abc
import enum
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from deqppl.deq import AbstractSolver, NoAdjoint, fixed_point
from deqppl.encoders import PEDEncoder
from deqppl.encoders.fit import fit_encoder
from deqppl.inference import fit_map, log_joint
from deqppl.optim import LBFGS, SVI, Adam

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
        Site name -> value: ``"W"``, ``"B"`` and ``"z"`` (``(n, latent_dim)``) after
        ``fit_globals``; ``"z"`` only after ``infer_locals``.
    log_joint
        ``fit_globals``: the full log joint $\\log p(y, z, W, B)$ of the training rows.
        ``infer_locals``: $\\log p(y, z \\mid W, B) = \\sum_s \\log p(y_s, z_s\\mid W, B)$, the
        part that depends on the latents (the prior of the fixed globals is left out).
    wall_time
        Seconds spent.
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
        solver step (the DEQ's forward solve).
    extra
        Further float diagnostics, e.g. ``spectral_radius`` (median over a subsample of rows
        of the spectral radius of the layer Jacobian at $z^*$) and ``spectral_radius_max``.
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


def _local_log_joint(model, y: torch.Tensor, values: Mapping[str, torch.Tensor]) -> float:
    with torch.no_grad():
        return float(log_joint(model, {"y": y}, values, per_datum=True).sum())


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
    ``fit_globals(model, y, *, seed, progress)`` and
    ``infer_locals(model, y, globals, *, seed, progress)``, each returning a
    :class:`StageResult`.
    """

    name: str

    def __new__(cls, *args, **kwargs):
        if cls is AbstractMethod:
            raise TypeError("AbstractMethod is abstract; use DEQMethod, SVIMethod or LBFGSMethod")
        return super().__new__(cls)

    def fit_globals(self, model, y: torch.Tensor, *, seed: int, progress: bool) -> StageResult:
        raise NotImplementedError

    def infer_locals(
        self,
        model,
        y: torch.Tensor,
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
# DEQ: PED encoder (SPEC §2.2), globals by joint MAP through the fixed point (SPEC §2.4)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class DEQMethod(AbstractMethod):
    """The PED encoder: the latents are the fixed point of its layer (SPEC eq. 6).

    Parameters
    ----------
    name
        Row name in the comparison.
    solver
        Forward solver of the fixed point; ``None`` is
        :func:`~deqppl.encoders.default_solver` (Newton with the exact Jacobian for
        ``latent_dim <= 64``, relative residual 1e-8 in float64).
    optimizer, num_epochs, batch_size, lr, rtol, warm_start
        Settings of :func:`~deqppl.encoders.fit.fit_encoder`. The default ``"lbfgs"``
        minimises the profiled objective $\\min_z L(W, B, z)$ full-batch (each evaluation one
        warm-started solve; it reached the joint L-BFGS optimum's log joint to all printed
        digits on simulated Bernoulli and Poisson PCA, where Adam on minibatches stopped
        ~1% short); ``"adam"`` takes minibatch steps for data too large for one batch.
        ``num_epochs`` caps the L-BFGS iterations or Adam epochs.
    num_spectral
        Rows (a seeded subsample) on which the spectral radius of the layer Jacobian at $z^*$
        is estimated; 0 skips it.

    Notes
    -----
    ``fit_globals``: ``num_steps`` counts epochs, ``num_grad_evals`` the fixed-point solves
    (one per minibatch, each followed by one gradient of the minibatch objective, and one
    full-data solve per epoch). ``infer_locals``: one forward solve from the encoder's
    initial guess; ``num_steps`` solver iterations, ``num_grad_evals`` evaluations of the
    layer (the map whose root is $\\nabla_z F = 0$).

    Examples
    --------
    >>> DEQMethod(num_epochs=50).num_epochs
    50
    """

    name: str = "deq"
    solver: AbstractSolver | None = None
    optimizer: str = "lbfgs"
    num_epochs: int = 500
    batch_size: int = 128
    lr: float = 0.02
    rtol: float | None = None
    warm_start: bool = True
    num_spectral: int = 256

    def __post_init__(self) -> None:
        _check_name(self.name)
        for attr in ("num_epochs", "batch_size"):
            value = getattr(self, attr)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{attr} must be a positive integer, got {value!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive and finite, got {self.lr}")
        if self.rtol is not None and not (self.rtol >= 0 and math.isfinite(self.rtol)):
            raise ValueError(f"rtol must be non-negative and finite, got {self.rtol}")
        if self.optimizer not in ("lbfgs", "adam"):
            raise ValueError(f"optimizer must be 'lbfgs' or 'adam', got {self.optimizer!r}")
        if isinstance(self.num_spectral, bool) or not isinstance(self.num_spectral, int) or self.num_spectral < 0:
            raise ValueError(f"num_spectral must be a non-negative integer, got {self.num_spectral!r}")

    def _solve(self, encoder: PEDEncoder, y: torch.Tensor):
        y = encoder._check_y(y)
        solver = self.solver or encoder.default_solver(y.dtype)
        with torch.no_grad():
            return fixed_point(
                lambda z: encoder.layer(z, y),
                encoder.initial_guess(y),
                solver=solver,
                adjoint=NoAdjoint(),
                jacobian=lambda z: encoder.layer_jacobian(z, y),
                throw=False,
                trace=True,
            )

    def _spectral(self, encoder: PEDEncoder, y: torch.Tensor, z: torch.Tensor, seed: int) -> dict[str, float]:
        if self.num_spectral == 0 or y.shape[0] == 0:
            return {}
        gen = torch.Generator().manual_seed(seed)
        rows = torch.randperm(y.shape[0], generator=gen)[: self.num_spectral]
        radius = encoder.spectral_radius(y[rows], z[rows])
        return {
            "spectral_radius": float(radius.median()),
            "spectral_radius_max": float(radius.max()),
        }

    def fit_globals(self, model, y: torch.Tensor, *, seed: int, progress: bool) -> StageResult:
        start = time.perf_counter()
        encoder = PEDEncoder(model, solver=self.solver, throw=False, seed=seed).to(y.dtype)
        fit = fit_encoder(
            encoder,
            y,
            optimizer=(
                LBFGS(max_steps=self.num_epochs, rtol=0.0 if self.rtol is None else self.rtol)
                if self.optimizer == "lbfgs"
                else Adam(num_epochs=self.num_epochs, batch_size=self.batch_size, lr=self.lr,
                          rtol=Adam().rtol if self.rtol is None else self.rtol)
            ),
            seed=seed,
            progress=progress,
            warm_start=self.warm_start,
        )
        sol = self._solve(encoder, y)
        values = {**encoder.values(), "z": sol.value.detach()}
        with torch.no_grad():
            total = float(log_joint(model, {"y": y}, values))
        extra = self._spectral(encoder, y, values["z"], seed)
        extra["fraction_converged"] = float(sol.converged.double().mean())
        return StageResult(
            values=values,
            log_joint=total,
            wall_time=time.perf_counter() - start,
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
        y: torch.Tensor,
        globals: Mapping[str, torch.Tensor],
        *,
        seed: int,
        progress: bool,
    ) -> StageResult:
        start = time.perf_counter()
        encoder = PEDEncoder.from_values(model, _check_globals(model, globals), solver=self.solver, throw=False)
        sol = self._solve(encoder, y)
        wall_time = time.perf_counter() - start  # diagnostics below are not part of the cost
        z = sol.value.detach()
        extra = self._spectral(encoder, y, z, seed)
        extra["fraction_converged"] = float(sol.converged.double().mean())
        return StageResult(
            values={"z": z},
            log_joint=_local_log_joint(model, y, {**globals, "z": z}),
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
def _from_map(model, y, fit, *, local: bool, wall_time: float) -> StageResult:
    if local:
        values = {"z": fit.values["z"]}
        value = _local_log_joint(model, y, fit.values)
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
    def _fit(self, model, y, fixed, seed, progress): ...

    def fit_globals(self, model, y: torch.Tensor, *, seed: int, progress: bool) -> StageResult:
        start = time.perf_counter()
        fit = self._fit(model, y, None, seed, progress)
        return _from_map(model, y, fit, local=False, wall_time=time.perf_counter() - start)

    def infer_locals(
        self,
        model,
        y: torch.Tensor,
        globals: Mapping[str, torch.Tensor],
        *,
        seed: int,
        progress: bool,
    ) -> StageResult:
        start = time.perf_counter()
        fit = self._fit(model, y, _check_globals(model, globals), seed, progress)
        return _from_map(model, y, fit, local=True, wall_time=time.perf_counter() - start)


@dataclass(frozen=True, kw_only=True)
class SVIMethod(_AbstractFitMapMethod):
    """MAP by SVI with Pyro's ``AutoDelta`` guide and Adam (:func:`~deqppl.inference.fit_map`).

    Parameters
    ----------
    name
        Row name in the comparison.
    lr, max_steps, subsample_size, rtol, gtol, xtol
        Settings of :class:`~deqppl.optim.SVI` for ``fit_map``; ``None`` means its default
        (20 000 steps, full batch, dtype-aware tolerances).

    Notes
    -----
    ``num_steps`` counts Adam updates; ``num_grad_evals`` the (minibatch) ELBO gradients.

    Examples
    --------
    >>> SVIMethod(lr=0.1).lr
    0.1
    """

    name: str = "svi"
    lr: float = SVI().lr  # the tuned default of deqppl.optim.SVI (docs/svi_tuning.md)
    max_steps: int | None = None
    subsample_size: int | None = None
    rtol: float | None = None
    gtol: float | None = None
    xtol: float | None = None

    def __post_init__(self) -> None:
        _check_name(self.name)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive and finite, got {self.lr}")

    def _fit(self, model, y, fixed, seed, progress):
        return fit_map(
            model,
            {"y": y},
            optimizer=SVI(
                lr=self.lr,
                max_steps=SVI().max_steps if self.max_steps is None else self.max_steps,
                subsample_size=self.subsample_size if fixed is None else None,
                rtol=self.rtol,
                gtol=self.gtol,
                xtol=self.xtol,
            ),
            fixed=fixed,
            seed=seed,
            progress=progress,
        )


@dataclass(frozen=True, kw_only=True)
class LBFGSMethod(_AbstractFitMapMethod):
    """MAP by full-batch L-BFGS with a strong-Wolfe line search (:func:`~deqppl.inference.fit_map`).

    Parameters
    ----------
    name
        Row name in the comparison.
    max_steps, rtol, gtol, xtol
        Settings of :class:`~deqppl.optim.LBFGS` for ``fit_map``; ``None`` means its default
        (5000 iterations, gradient rule with dtype-aware ``gtol``, no loss-change rule).

    Notes
    -----
    ``num_steps`` counts L-BFGS iterations; ``num_grad_evals`` the log-joint gradients,
    line-search trials included.

    Examples
    --------
    >>> LBFGSMethod(max_steps=100).max_steps
    100
    """

    name: str = "lbfgs"
    max_steps: int | None = None
    rtol: float | None = None
    gtol: float | None = None
    xtol: float | None = None

    def __post_init__(self) -> None:
        _check_name(self.name)

    def _fit(self, model, y, fixed, seed, progress):
        return fit_map(
            model,
            {"y": y},
            optimizer=LBFGS(
                max_steps=LBFGS().max_steps if self.max_steps is None else self.max_steps,
                rtol=0.0 if self.rtol is None else self.rtol,
                gtol=self.gtol,
                xtol=self.xtol,
            ),
            fixed=fixed,
            seed=seed,
            progress=progress,
        )


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
