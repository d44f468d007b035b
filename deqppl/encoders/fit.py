r"""Joint MAP of an encoder's globals through its fixed point (SPEC §2.4), for any encoder of
the protocol (:class:`~deqppl.encoders.AbstractMAPEncoder`: ``PEDEncoder``, ``DeepPEDEncoder``,
...). With $\theta$ the model's global sites (the encoder's parameters of the same names) the
objective is the negative log joint of the encoder's Pyro model at the MAP latents,

$$L(\theta)=-\log p(\theta)-\sum_s\log p(\text{data}_s, z_s^*\mid\theta),\qquad z_s^*=f(z_s^*;\text{data}_s,\theta),$$

taken from the model's trace (:func:`deqppl.inference.log_joint`), and is minimised by the
optimiser given as a settings object of :mod:`deqppl.optim` (profiled full-batch
:class:`~deqppl.optim.LBFGS`, or :class:`~deqppl.optim.Adam` on minibatches), through the one
optimiser driver that :func:`~deqppl.inference.fit_map` also uses. Because $z_s^*$ is a stationary point of the same objective, its implicit
dependence on $\theta$ contributes nothing to the gradient (envelope theorem), so each solve is
run without an adjoint and the gradient is that of $L$ at the detached $z^*$.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from deqppl.distributed import Shard, ShardLayout, check_agreement, fails_together, fingerprint
from deqppl.validation import ValidatedData, table_positions, validated
from deqppl.inference.log_joint import log_joint
from deqppl.optim import (
    LBFGS,
    AlternatingNewton,
    AbstractFitResult,
    AbstractOptimizer,
    AbstractStepper,
    Adam,
    FitConvergenceError,
    FitStatus,
    LBFGSStepper,
    Observation,
    StopRules,
    drive,
    lbfgs_rules,
)

__all__ = ["EncoderFitResult", "encoder_loss", "fit_encoder"]


@dataclass(frozen=True, kw_only=True, repr=False, eq=False)
class EncoderFitResult(AbstractFitResult):
    r"""Result of :func:`fit_encoder`: the fields of :class:`~deqppl.optim.AbstractFitResult` and

    Attributes
    ----------
    encoder
        The fitted encoder (the object passed in, trained in place).
    num_solves
        Fixed-point solves (Adam: one per minibatch and one full-data solve per epoch;
        L-BFGS: one per objective evaluation, plus a cold restart where a warm one failed;
        AlternatingNewton: latent half-steps).
    latents
        The training data's latents at the returned point, as the encoder's fixed-point
        tensor, where the fit computes them (AlternatingNewton: the joint MAP's latents);
        ``None`` otherwise (``encoder.solve(data)`` gives them).

    ``loss_trace`` is the full-data negative log joint $-\log p(y, z^*, W, B)$ at the start
    and after each step (an L-BFGS iteration or an Adam epoch); ``num_steps`` counts those
    steps.
    """

    encoder: nn.Module
    num_solves: int
    latents: torch.Tensor | None = None

    def __repr__(self) -> str:
        return f"EncoderFitResult(loss={float(self.loss_trace[-1]):.10g}, {self._summary()}, num_solves={self.num_solves})"


def encoder_loss(
    encoder: nn.Module,
    data: Mapping[str, torch.Tensor] | torch.Tensor,
    z: torch.Tensor,
    *,
    num_data: int | None = None,
) -> torch.Tensor:
    r"""Negative log joint of the encoder's model at its globals and the fixed point ``z``.

    With ``num_data`` $= N$ larger than the batch size $n$ the per-datum terms are scaled by
    $N/n$, so that for a uniformly drawn minibatch the loss is an unbiased estimate of the
    full-data negative log joint:

    $$-\log p(\theta)-\tfrac Nn\sum_{s\in\text{batch}}\log p(\text{data}_s,z_s\mid\theta).$$

    Both parts come from one trace of the Pyro model
    (:func:`~deqppl.inference.log_joint` with ``data_scale`` $= N/n$).

    Parameters
    ----------
    encoder
        An encoder of the protocol; its parameters named by the model's global sites are the
        globals (:meth:`~deqppl.encoders.AbstractMAPEncoder.site_parameters`).
    data
        Validated data of the batch (the model's data mapping, or the bare tensor of a model
        with one data name).
    z
        The fixed point for ``data``; pass it detached for the envelope gradient. It becomes
        the model's local sites by :meth:`~deqppl.encoders.AbstractMAPEncoder.to_sites`.
    num_data
        $N$, the number of rows the minibatch stands for; default ``n``. Coupled models
        (no data plate) have no minibatches.

    Returns
    -------
    Tensor
        Scalar, differentiable in the encoder's globals and ``z``.

    Examples
    --------
    >>> import torch
    >>> from deqppl.encoders import PEDEncoder
    >>> from deqppl.expfam import family
    >>> from deqppl.models import ExpFamPCA
    >>> model = ExpFamPCA(family=family("poisson"), obs_dim=4, latent_dim=2)
    >>> y = model.simulate(6, seed=0).data["y"].double()
    >>> enc = PEDEncoder(model).double()
    >>> z = enc.solve(y).value.detach()
    >>> values = {"W": enc.W.detach(), "B": enc.B.detach(), "z": z}
    >>> bool(torch.isclose(encoder_loss(enc, y, z), -model.log_joint({"y": y}, values)))
    True
    """
    model = encoder.model
    if not isinstance(data, Mapping):
        data = {model.data_names[0]: data}
    n = _num_rows(data)
    if num_data is None:
        num_data = n
    if num_data < n:
        raise ValueError(f"num_data={num_data} is smaller than the batch ({n} rows)")
    plate = getattr(model, "plate_name", "data")
    if plate is None and num_data != n:
        raise ValueError(f"{type(model).__name__}'s locals are coupled (no data plate): no minibatches")
    values = {**encoder.site_parameters(), **encoder.to_sites(z, data)}
    return -log_joint(model, data, values, data_scale=num_data / n, plate_name=plate or "data")


def _num_rows(data: Mapping[str, torch.Tensor]) -> int:
    return int(next(iter(data.values())).shape[0])


def _rows(data: Mapping[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[idx] for k, v in data.items()}


def _params(encoder: nn.Module) -> list[torch.Tensor]:
    # the encoder's own parametrisation of its globals (unconstrained leaves for AutoDEQ)
    return list(encoder.fit_parameters())


def _flat(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def _assign(params: list[torch.Tensor], x: torch.Tensor) -> None:
    with torch.no_grad():
        i = 0
        for p in params:
            k = p.numel()
            p.copy_(x[i : i + k].reshape(p.shape))
            i += k


def _assign_grads(params: list[torch.Tensor], flat: torch.Tensor) -> None:
    i = 0
    for p in params:
        k = p.numel()
        p.grad = flat[i : i + k].reshape(p.shape).clone()
        i += k


def _shard_loss(encoder: nn.Module, data: Mapping[str, torch.Tensor], z: torch.Tensor, *,
                data_scale: float, prior: bool) -> torch.Tensor:
    """This rank's part of the loss: its rows' terms times ``data_scale``, plus the prior if ``prior``.

    Summed over ranks (the prior on one of them) it is :func:`encoder_loss` of all rows; on one
    process (``prior=True``) it is :func:`encoder_loss` with ``num_data / n = data_scale``.
    """
    model = encoder.model
    values = {**encoder.site_parameters(), **encoder.to_sites(z, data)}
    plate = getattr(model, "plate_name", "data")
    return -log_joint(model, data, values, data_scale=data_scale, plate_name=plate or "data",
                      prior_scale=1.0 if prior else 0.0)


def _shard_rows(shard: Shard | None):
    """Inside it, validation errors name a shard's rows by their index among all ranks' rows."""
    if isinstance(shard, Shard):
        return table_positions(first_row=shard.start)
    return contextlib.nullcontext()


def _all_converged(sol, layout: ShardLayout) -> bool:
    """Whether every row of every rank's solve converged (one decision, the same on all ranks)."""
    if not layout.parallel:
        return bool(sol.converged.all())
    bad = layout.sum(lambda: (~sol.converged).sum().to(torch.float64).reshape(1),
                     like=torch.zeros(1, dtype=torch.float64, device=sol.converged.device),
                     where="fit_encoder: fixed-point solves")
    return float(bad[0]) == 0.0


def _layout(encoder, data, *, shard, optimizer, seed, warm_start, throw) -> ShardLayout:
    """The rows of the fit: this process's alone, or (``shard`` given) all ranks', checked to agree."""
    n = _num_rows(data)
    if shard is None:
        return ShardLayout.single(n)
    if getattr(encoder.model, "plate_name", "data") is None:
        raise TypeError(
            f"{type(encoder.model).__name__}'s locals are coupled (no data plate): its rows cannot "
            "be sharded; fit it in one process (shard=None)"
        )
    layout = ShardLayout.gather(shard, num_rows=n)
    first = next(iter(data.values()))
    check_agreement(fingerprint({
        "encoder": type(encoder), "model": encoder.model, "optimizer": optimizer, "seed": seed,
        "warm_start": warm_start, "throw": throw, "solver": getattr(encoder, "solver", None),
        "adjoint": getattr(encoder, "adjoint", None), "device type": first.device.type,
        **{f"data[{k!r}] schema": f"{v.dtype}, shape (rows, {', '.join(map(str, v.shape[1:]))})"
           for k, v in data.items()},
        **{f"initial {k}": v for k, v in encoder.site_parameters().items()},
    }), where="fit_encoder")
    return layout


@fails_together(agreed=(FitConvergenceError,))
def fit_encoder(
    encoder: nn.Module,
    data: torch.Tensor | Mapping[str, object],
    *,
    optimizer: AbstractOptimizer | None = None,
    seed: int = 0,
    progress: bool = True,
    warm_start: bool = True,
    callback: Callable[[int, float], None] | None = None,
    throw: bool = False,
    shard: Shard | None = None,
) -> EncoderFitResult:
    r"""Fit the globals of an encoder of the protocol by joint MAP through its fixed point.

    Minimises the full-data negative log joint of the encoder's Pyro model at the MAP latents
    (SPEC §2.4). With :class:`~deqppl.optim.AlternatingNewton` (the default of encoders
    whose model is a stack of GLM layers with convex half-steps: ``PEDEncoder`` and
    ``DeepPEDEncoder`` with $R$ = identity; see
    :meth:`~deqppl.encoders.AbstractMAPEncoder.default_fit_optimizer`) it runs the structured
    joint fit of SPEC §2.4.1 over globals and latents together
    (:mod:`deqppl.encoders.joint`). With :class:`~deqppl.optim.LBFGS` (the default of the
    other encoders) it minimises the *profiled*
    objective $P(W,B)=\min_z L(W,B,z)$ full-batch: every evaluation is one warm-started
    batched solve, and by the envelope theorem (Notes) the gradient of $L$ at the detached
    $z^*$ is the exact gradient of $P$. Eliminating the latents leaves a small,
    well-conditioned problem in $(W, B)$ only, which converges in far fewer gradient
    evaluations than a joint optimiser over $(W, B, z)$ (a variable-projection method). With
    :class:`~deqppl.optim.Adam` it takes steps on shuffled minibatches, each loss rescaled to
    an unbiased estimate of the full objective (:func:`encoder_loss`): the choice for data
    that do not fit in one batch. The model's Gaussian prior on $W, B$ is part of the loss,
    i.e. a coupled L2 term, not decoupled weight decay.

    Parameters
    ----------
    encoder
        An encoder of the protocol (:class:`~deqppl.encoders.AbstractMAPEncoder`, e.g.
        :class:`~deqppl.encoders.PEDEncoder`, :class:`~deqppl.encoders.DeepPEDEncoder`),
        trained in place; its dtype is the fit's. The optimiser moves the tensors of
        :meth:`~deqppl.encoders.AbstractMAPEncoder.fit_parameters` (the globals themselves, or
        :class:`~deqppl.encoders.AutoDEQ`'s unconstrained leaves).
    data
        The model's data mapping (e.g. ``{"y": y}``), or the bare tensor of a model with one
        data name; validated once, here, by the encoder's model (not again if it is a
        :class:`~deqppl.validation.ValidatedData` of that model).
    optimizer
        :class:`~deqppl.optim.AlternatingNewton`, :class:`~deqppl.optim.LBFGS` or
        :class:`~deqppl.optim.Adam` (minibatches, for data too large for one batch); ``None``
        asks the encoder (:meth:`~deqppl.encoders.AbstractMAPEncoder.default_fit_optimizer`:
        ``AlternatingNewton()`` for PED encoders with $R$ = identity, else ``LBFGS()``).
        L-BFGS's ``gtol=None`` means $\epsilon^{1/2}$ here (not $\epsilon^{2/3}$ as in
        ``fit_map``): the profiled gradient is exact only to the tolerance of the fixed-point
        solves (relative 1e-8 in float64).
    seed
        Seeds Adam's shuffling (a private :class:`torch.Generator`; global RNG untouched).
    progress
        Show a progress bar.
    warm_start
        Start each datapoint's solve from its last $z^*$ (a per-datapoint cache); cheaper than
        the encoder's initial guess once $(W, B)$ change slowly.
    callback
        Called as ``callback(step, loss)`` after each step with the full-data loss.
    throw
        Raise :class:`~deqppl.optim.FitConvergenceError` unless the fit converged.
    shard
        Fit data-parallel over the ``torch.distributed`` process group: ``data`` are this
        rank's rows, ``shard`` (:class:`~deqppl.distributed.Shard`) says which of all ranks'
        rows they are. Every rank calls ``fit_encoder`` with the same settings and encoder;
        losses and gradients are summed over ranks (:mod:`deqppl.distributed`), the prior of
        the globals counted once, so every rank takes the same steps and returns the same
        globals, equal to the single-process fit on all rows up to rounding. Adam draws its
        minibatches as global row indices with ``seed`` on every rank and each rank handles
        the rows it holds. AlternatingNewton: each rank's latent half-step is local to its
        rows (``latents`` are this rank's rows' latents); the global half-step's per-row
        gradient and Hessian sums, the objective, the Anderson inner products, the spectral
        start and the balancing step are summed over ranks. ``None`` (default): ``data`` are
        all the rows.

    Returns
    -------
    EncoderFitResult
        Always returned (also when not converged; a start at which the solve fails gives
        status ``NONFINITE`` and leaves the encoder unchanged).

    Raises
    ------
    TypeError
        ``encoder`` is not an encoder of the protocol, or ``optimizer`` is not an
        AlternatingNewton, LBFGS or Adam object, or Adam for a model with coupled locals (no
        minibatches), or AlternatingNewton for an encoder without a ``joint_structure``.
    ValueError
        Bad data (as the model's ``validate``: shape, support, non-finite); AlternatingNewton
        for a model whose half-steps it does not support (hard ReLU; a hierarchy with
        $R\ne$ identity), naming what to use instead.
    FitConvergenceError
        If ``throw`` and the fit did not converge.
    ConvergenceError
        If a fixed-point solve of the Adam fit fails and the encoder has ``throw=True``.
    deqppl.distributed.RankFailedError
        Data-parallel: on every rank, when any rank raised (its message is included).
    deqppl.distributed.DisagreementError
        Data-parallel: on every rank, before any work, when the ranks' settings, encoders,
        data schema or shards disagree.

    Notes
    -----
    *Gradient strategy (envelope theorem).* Write the objective as $L(\theta, z^*(\theta))$
    with $\theta = (W, B)$. Its total derivative is
    $\partial_\theta L + (\partial z^*/\partial\theta)^\top\partial_z L$, and
    $\partial_z L = 0$ at $z^*$ because $z^*$ is by construction a stationary point of the same
    objective (SPEC §2.2: the fixed point of eq. 6 is $\nabla_z F = 0$, and the minibatch
    scaling multiplies every per-datum term alike). So the implicit term vanishes at an exact
    fixed point, and each solve runs without autograd (equivalently with
    :class:`~deqppl.deq.NoAdjoint`): the gradient is $\partial_\theta L$ at the detached
    $z^*$, which costs one backward pass through the log joint and no adjoint solve. With the
    solver's tolerance $\epsilon$ on $z^*$ the error of this gradient is $O(\epsilon)$, the
    same order as an implicit adjoint's. The test suite checks it against the implicit-adjoint
    gradient and against finite differences of $L(\theta, z^*(\theta))$.

    Examples
    --------
    >>> import torch
    >>> from deqppl.encoders import PEDEncoder
    >>> from deqppl.expfam import family
    >>> from deqppl.models import ExpFamPCA
    >>> from deqppl.optim import Adam
    >>> model = ExpFamPCA(family=family("bernoulli"), obs_dim=6, latent_dim=2)
    >>> y = model.simulate(40, seed=0).data["y"].double()
    >>> enc = PEDEncoder(model).double()
    >>> fit = fit_encoder(enc, y, optimizer=Adam(num_epochs=5, batch_size=20), progress=False)
    >>> bool(fit.loss_trace[-1] < fit.loss_trace[0]), fit.num_steps
    (True, 5)
    """
    start = time.perf_counter()
    from deqppl.encoders.base import AbstractMAPEncoder

    if not isinstance(encoder, AbstractMAPEncoder):
        raise TypeError(
            f"fit_encoder fits encoders of the protocol (deqppl.encoders.AbstractMAPEncoder, e.g. "
            f"PEDEncoder, DeepPEDEncoder); got {type(encoder).__name__}"
        )
    optimizer = encoder.default_fit_optimizer() if optimizer is None else optimizer
    if not isinstance(optimizer, (LBFGS, Adam, AlternatingNewton)):
        raise TypeError(
            f"fit_encoder optimizes with deqppl.optim.AlternatingNewton(...), LBFGS(...) or "
            f"Adam(...); got {optimizer!r}"
        )
    if isinstance(optimizer, AlternatingNewton):
        encoder.joint_structure()  # raises, naming what to use instead, before any work
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    if isinstance(optimizer, Adam) and getattr(encoder.model, "plate_name", "data") is None:
        raise TypeError(
            f"Adam fits on minibatches of rows; {type(encoder.model).__name__}'s locals are coupled "
            "(no data plate): use LBFGS()"
        )
    # The one validation of the data by the model (none for data validated for it already);
    # the solves below receive validated rows in the encoder's dtype.
    with _shard_rows(shard):  # data-parallel: errors name the row of all ranks' rows
        data = encoder.check_data(data)
    layout = _layout(encoder, data, shard=shard, optimizer=optimizer, seed=seed, warm_start=warm_start, throw=throw)
    if isinstance(optimizer, AlternatingNewton):
        from deqppl.encoders.joint import fit_alternating

        return fit_alternating(encoder, data, optimizer, progress=progress, callback=callback,
                               throw=throw, start=start, layout=layout)
    params = _params(encoder)
    if not params:
        return _fit_without_globals(encoder, data, optimizer, start, throw=throw)
    dtype = params[0].dtype
    if isinstance(optimizer, LBFGS):
        if optimizer.gtol is None:
            optimizer_run = dataclasses.replace(optimizer, gtol=math.sqrt(torch.finfo(dtype).eps))
        else:
            optimizer_run = optimizer
        objective = _ProfiledObjective(encoder, data, warm_start=warm_start, layout=layout)
        stepper = LBFGSStepper(objective, _flat(params), optimizer_run)
        out = drive(
            stepper,
            lbfgs_rules(optimizer_run, dtype, stepper.x.numel()),
            max_steps=int(optimizer.max_steps),
            progress=progress,
            desc="fit_encoder (L-BFGS)",
            callback=callback,
        )
        _assign(params, stepper.x)
        grad_norm = float(stepper.g.norm())
        num_solves = objective.num_solves
    else:
        stepper = _AdamStepper(encoder, data, optimizer, seed=seed, warm_start=warm_start, layout=layout)
        out = drive(
            stepper,
            StopRules(rtol=float(optimizer.rtol), strict=True),
            max_steps=int(optimizer.num_epochs),
            progress=progress,
            desc="fit_encoder (Adam)",
            callback=callback,
            unit="epoch",
        )
        grad_norm = stepper.full_grad_norm()
        num_solves = stepper.num_solves
    if not math.isfinite(grad_norm):
        grad_norm = math.nan
    result = EncoderFitResult(
        encoder=encoder,
        loss_trace=torch.tensor(out.trace, dtype=torch.float64),
        num_steps=out.num_steps,
        num_grad_evals=out.num_evals,
        wall_time=time.perf_counter() - start,
        status=out.status,
        criterion=out.criterion,
        grad_norm=grad_norm,
        optimizer=optimizer,
        num_solves=num_solves,
    )
    if throw and not result.converged:
        raise FitConvergenceError(result, "fit_encoder")
    return result


def _fit_without_globals(encoder, data, optimizer, start: float, *, throw: bool) -> EncoderFitResult:
    # A model without global sites (a kernel GLM): there is nothing to fit, the fixed point
    # alone is the MAP. One solve gives the loss there; the fit has converged iff it did.
    with torch.no_grad():
        sol = encoder.solve(data, throw=False, validated=True)
        loss = float(encoder_loss(encoder, data, sol.value))
    ok = bool(sol.converged.all()) and math.isfinite(loss)
    result = EncoderFitResult(
        encoder=encoder,
        loss_trace=torch.tensor([loss], dtype=torch.float64),
        num_steps=0,
        num_grad_evals=0,
        wall_time=time.perf_counter() - start,
        status=FitStatus.CONVERGED if ok else FitStatus.NONFINITE,
        criterion=("no global sites: nothing to fit; the fixed point "
                   + ("converged" if ok else f"did not converge (status {sol.status.name})")),
        grad_norm=0.0,
        optimizer=optimizer,
        num_solves=1,
    )
    if throw and not result.converged:
        raise FitConvergenceError(result, "fit_encoder")
    return result


class _ProfiledObjective:
    r"""$\theta \mapsto (P, \nabla P)$ with $P = \min_z L$ (see :func:`fit_encoder`)."""

    def __init__(
        self, encoder: nn.Module, data: Mapping[str, torch.Tensor], *, warm_start: bool, layout: ShardLayout
    ) -> None:
        self.encoder = encoder
        self.y = data
        self.params = _params(encoder)
        self.warm_start = warm_start
        self.layout = layout
        self.z: torch.Tensor | None = None
        self.num_solves = 0

    def __call__(self, x: torch.Tensor) -> tuple[float, torch.Tensor]:
        _assign(self.params, x)
        enc, y = self.encoder, self.y
        nan = (math.nan, torch.full_like(x, math.nan))
        with torch.no_grad():
            self.num_solves += 1
            sol = enc.solve(y, z0=self.z if self.warm_start else None, throw=False, validated=True)
            if not _all_converged(sol, self.layout) and self.z is not None and self.warm_start:
                # a far trial point: retry from the initial guess
                self.num_solves += 1
                sol = enc.solve(y, throw=False, validated=True)
        if not _all_converged(sol, self.layout):
            # An unsolved fixed point has no profiled loss: the line search backs off.
            return nan
        z = sol.value.detach()
        fg = self.layout.sum(
            lambda: self._loss_grad(z), like=torch.zeros(1 + x.numel(), dtype=x.dtype, device=x.device),
            where="fit_encoder (L-BFGS): loss and gradient",
        )
        if not bool(torch.isfinite(fg[0])):
            return nan
        self.z = z
        return float(fg[0]), fg[1:]

    def _loss_grad(self, z: torch.Tensor) -> torch.Tensor:
        """This rank's ``[loss, gradient]`` (the prior on rank 0): summed over ranks, the full ones."""
        with torch.enable_grad():
            loss = _shard_loss(self.encoder, self.y, z, data_scale=1.0, prior=self.layout.rank == 0)
            if not bool(torch.isfinite(loss)):
                return torch.cat([loss.detach().reshape(1), torch.full_like(_flat(self.params), math.nan)])
            grads = torch.autograd.grad(loss, self.params)
        return torch.cat([loss.detach().reshape(1), *(g.reshape(-1) for g in grads)])


class _AdamStepper(AbstractStepper):
    """One epoch of minibatch Adam per step, then the full-data loss."""

    def __init__(self, encoder, data, settings: Adam, *, seed: int, warm_start: bool, layout: ShardLayout) -> None:
        self.encoder, self.y, self.settings = encoder, data, settings
        self.warm_start = warm_start
        self.layout = layout
        self.gen = torch.Generator().manual_seed(seed)
        self.adam = torch.optim.Adam(_params(encoder), lr=settings.lr, betas=settings.betas)
        self.num_solves = 0
        self.epoch = 0
        self.num_plateaus = 0
        self.loss = math.nan
        self.cache: torch.Tensor | None = None

    def _solve(self, rows: torch.Tensor, z0: torch.Tensor | None) -> torch.Tensor:
        self.num_solves += 1
        with torch.no_grad():
            return self.encoder.solve(rows, z0=z0, validated=True).value

    def _full(self) -> float:
        def part() -> torch.Tensor:
            z = self._solve(self.y, self.cache if self.warm_start else None)
            if self.warm_start or self.cache is None:
                self.cache = z
            with torch.no_grad():
                return _shard_loss(self.encoder, self.y, z, data_scale=1.0, prior=self.layout.rank == 0).reshape(1)

        flat = _flat(_params(self.encoder))
        like = torch.zeros(1, dtype=flat.dtype, device=flat.device)
        return float(self.layout.sum(part, like=like, where="fit_encoder (Adam): full-data loss")[0])

    def start(self) -> Observation:
        self.loss = self._full()
        return Observation(loss=self.loss, num_steps=0, num_evals=0)

    def step(self, budget: int) -> Observation:
        s, y, layout = self.settings, self.y, self.layout
        n = layout.num_total  # all ranks' rows: the batches are global row indices
        device = next(iter(y.values())).device
        lr = s.schedule.lr(s.lr, step=self.epoch, max_steps=s.num_epochs, num_plateaus=self.num_plateaus)
        for group in self.adam.param_groups:
            group["lr"] = lr
        evals = 0
        params = _params(self.encoder)
        like = torch.zeros_like(_flat(params))
        perm = torch.randperm(n, generator=self.gen).to(device)
        for batch in perm.split(s.batch_size):
            idx = layout.local(batch)  # this rank's rows of the global batch
            prior = layout.prior_rank(batch) == layout.rank
            grad = layout.sum(
                lambda: self._batch_grad(idx, data_scale=n / len(batch), prior=prior),
                like=like, where="fit_encoder (Adam): minibatch gradient",
            )
            if layout.parallel:
                _assign_grads(params, grad)
            self.adam.step()
            evals += 1
        self.epoch += 1
        new = self._full()
        if not new < self.loss:
            self.num_plateaus += 1
        self.loss = new
        return Observation(loss=new, num_evals=evals)

    def _batch_grad(self, idx: torch.Tensor, *, data_scale: float, prior: bool) -> torch.Tensor:
        """Backward pass of this rank's part of a minibatch loss; returns the flat gradient."""
        params = _params(self.encoder)
        self.adam.zero_grad()
        if len(idx):
            rows = _rows(self.y, idx)
            z = self._solve(rows, self.cache[idx] if self.warm_start else None)
            if self.warm_start:
                self.cache[idx] = z
            _shard_loss(self.encoder, rows, z, data_scale=data_scale, prior=prior).backward()
        return torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1) for p in params
        ])

    def full_grad_norm(self) -> float:
        """Norm of the full-data envelope gradient at the final (W, B) and cached z*."""
        if self.cache is None:
            return math.nan
        params = _params(self.encoder)

        def part() -> torch.Tensor:
            with torch.enable_grad():
                loss = _shard_loss(self.encoder, self.y, self.cache.detach(), data_scale=1.0,
                                   prior=self.layout.rank == 0)
                if not bool(torch.isfinite(loss)):
                    return torch.full((1 + sum(p.numel() for p in params),), math.nan, dtype=loss.dtype)
                grads = torch.autograd.grad(loss, params)
            return torch.cat([loss.detach().reshape(1), *(g.reshape(-1) for g in grads)])

        like = torch.zeros(1 + sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
        v = self.layout.sum(part, like=like, where="fit_encoder (Adam): final gradient")
        if not bool(torch.isfinite(v[0])):
            return math.nan
        return float(v[1:].norm())
