r"""MAP estimation of a Pyro model's latent sites by optimisation.

One entry function, :func:`fit_map`, maximising the log joint taken from the model's Pyro trace
(:func:`deqppl.inference.log_joint`) with the optimiser given as a settings object:

* :class:`~deqppl.optim.LBFGS` (default): full-batch L-BFGS on the unconstrained values $u$ of
  the free sites ($\theta = \mathrm{biject\_to}(\mathrm{support})(u)$; the log joint is
  maximised in constrained space, without a Jacobian term, as ``AutoDelta`` does), with a
  strong-Wolfe line search on the directional derivative, stopped by the gradient;
* :class:`~deqppl.optim.SVI`: Pyro's MAP guide :class:`~pyro.infer.autoguide.AutoDelta`
  trained on :class:`~pyro.infer.Trace_ELBO` (whose loss is exactly $-\log p$ for a Delta
  guide) with Adam and a learning-rate schedule, optionally on minibatches of the plate
  ``"data"``.

Both run through the one optimiser driver of :mod:`deqppl.optim`. Holding some sites ``fixed``
gives the conditional MAP of the rest, e.g. $z^*(y; W, B)$, the quantity a DEQ encoder
amortises (SPEC §2.2).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoDelta
from pyro.nn import PyroParam
from torch.distributions import biject_to

from deqppl.distributed import Shard, ShardLayout, check_agreement, fails_together, fingerprint
from deqppl.validation import as_tensor, check_finite, table_positions, validated
from deqppl.inference.log_joint import latent_sites, log_joint
from deqppl.optim import (
    LBFGS,
    SVI,
    AbstractFitResult,
    AbstractOptimizer,
    AbstractStepper,
    FitConvergenceError,
    FitStatus,
    LBFGSStepper,
    Observation,
    StopRules,
    drive,
    lbfgs_rules,
)

__all__ = ["MAPResult", "fit_map"]

# Sites not given in ``init`` start at unconstrained values uniform in (-_INIT_RADIUS,
# _INIT_RADIUS): random, so the W = z = 0 saddle of PCA-type models is avoided, and small, so
# that exp-link families (Poisson) start with moderate rates.
_INIT_RADIUS = 0.5


@dataclass(frozen=True, kw_only=True, repr=False, eq=False)
class MAPResult(AbstractFitResult):
    """Result of :func:`fit_map`: the fields of :class:`~deqppl.optim.AbstractFitResult` and

    Attributes
    ----------
    values
        Site name -> MAP value (detached) for every latent site, fixed sites included.
    log_joint
        Scalar: the full-data log joint at ``values`` (non-finite only with status
        ``NONFINITE``).

    ``loss_trace`` has ``num_steps + 1`` entries: $-\\log p$ (a minibatch estimate when
    subsampling) at the start and after each step.
    """

    values: dict[str, torch.Tensor]
    log_joint: torch.Tensor

    def __repr__(self) -> str:
        return (
            f"MAPResult(log_joint={float(self.log_joint):.10g}, {self._summary()}, "
            f"sites={sorted(self.values)})"
        )


# --------------------------------------------------------------------------------------------
# Set-up shared by both optimisers
# --------------------------------------------------------------------------------------------
def _uniform_init(dtype: torch.dtype, layout: ShardLayout | None = None) -> Callable[[dict], torch.Tensor]:
    def init(site: dict) -> torch.Tensor:
        fn = site["fn"]
        transform = biject_to(fn.support)
        shape = transform.inverse_shape(fn.shape())
        if layout is not None and layout.parallel and _in_data_plate(site):
            uniform = _shard_of_uniform(shape, layout, dtype)
        else:
            uniform = torch.rand(shape, dtype=dtype)
        u = (2.0 * uniform - 1.0) * _INIT_RADIUS
        return transform(u).detach()

    return init


def _in_data_plate(site: dict) -> bool:
    return any(f.name == "data" for f in site["cond_indep_stack"])


#: Uniforms drawn at a time while skipping the other ranks' rows (bounds the memory to 8 MiB).
_SKIP_CHUNK = 1 << 20


def _shard_of_uniform(shape: torch.Size, layout: ShardLayout, dtype: torch.dtype) -> torch.Tensor:
    """This shard's rows of ``torch.rand((num_total, *shape[1:]))``, drawn in bounded memory.

    Rows lead the local sites (CONVENTIONS), and torch's CPU generator draws uniforms one after
    another, so the rows ``[start, stop)`` are a contiguous stretch of the single-process draw:
    draw and discard the rows before and after it. Every rank then starts each local row where
    the single-process fit does, and the generator ends where it would.
    """
    per_row = math.prod(shape[1:])
    s = layout.mine

    def skip(count: int) -> None:
        while count > 0:
            k = min(count, _SKIP_CHUNK)
            torch.rand(k, dtype=dtype)
            count -= k

    skip(s.start * per_row)
    out = torch.rand(shape, dtype=dtype)
    skip((s.num_total - s.stop) * per_row)
    return out


@dataclass(frozen=True)
class _Problem:
    data: dict[str, torch.Tensor]
    fixed: dict[str, torch.Tensor]
    init: dict[str, torch.Tensor]  # free sites only
    supports: dict[str, object]
    event_dims: dict[str, int]
    local: frozenset[str]
    dtype: torch.dtype
    #: The rows: this process's alone, or every rank's of a data-parallel fit.
    layout: ShardLayout | None = None


def _prepare(
    model: Callable[..., object],
    data: Mapping[str, object],
    *,
    optimizer: AbstractOptimizer,
    fixed: Mapping[str, object] | None,
    init: Mapping[str, object] | None,
    seed: int,
    shard: Shard | None = None,
) -> _Problem:
    if not isinstance(optimizer, (LBFGS, SVI)):
        raise TypeError(
            f"fit_map optimizes with deqppl.optim.LBFGS(...) or deqppl.optim.SVI(...); got "
            f"{optimizer!r}" + (" (Adam fits encoders; for Adam on a model use SVI)"
                               if type(optimizer).__name__ == "Adam" else "")
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    # The one validation of the data (none if the caller passes data it validated for this
    # model, deqppl.validation.ValidatedData): everything below receives validated tensors.
    with (table_positions(first_row=shard.start) if isinstance(shard, Shard) else contextlib.nullcontext()):
        # data-parallel: errors name the row of all ranks' rows
        data = dict(validated(model, data))
    for name, value in data.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == 0:
            raise ValueError(
                f"data[{name!r}] has no rows (shape {tuple(value.shape)}); fit_map needs at "
                f"least one row of data"
            )
    floats = [v.dtype for v in data.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    dtype = floats[0] if floats else torch.get_default_dtype()
    layout = _layout(model, data, optimizer=optimizer, shard=shard)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        trace = poutine.trace(
            pyro.infer.autoguide.initialization.InitMessenger(_uniform_init(dtype, layout))(model)
        ).get_trace(**data)
    latent = latent_sites(trace)
    nodes = {name: trace.nodes[name] for name in latent}
    local = frozenset(
        name for name in latent if any(f.name == "data" for f in nodes[name]["cond_indep_stack"])
    )

    def checked(values: Mapping[str, object] | None, what: str) -> dict[str, torch.Tensor]:
        out = {}
        for name, value in (values or {}).items():
            if name not in nodes:
                raise ValueError(
                    f"{what} names unknown site {name!r}; the model's latent sites are: "
                    f"{', '.join(latent)}"
                )
            t = as_tensor(value, f"{what}[{name!r}]", dtype=dtype)
            check_finite(t, f"{what}[{name!r}]")
            want = tuple(nodes[name]["value"].shape)
            if tuple(t.shape) != want:
                raise ValueError(f"{what}[{name!r}] must have shape {want}, got {tuple(t.shape)}")
            out[name] = t.detach()
        return out

    fixed_t = checked(fixed, "fixed")
    init_t = checked(init, "init")
    overlap = sorted(set(fixed_t) & set(init_t))
    if overlap:
        raise ValueError(f"sites {overlap} are both fixed and given an init; pass them in one only")
    free = [name for name in latent if name not in fixed_t]
    if not free:
        raise ValueError("every latent site is fixed: nothing to fit")
    if isinstance(optimizer, SVI) and optimizer.subsample_size is not None:
        if not local:
            raise ValueError(
                f"SVI(subsample_size={optimizer.subsample_size}) needs local latent sites in a "
                f'plate named "data"; this model has none (latent sites: {", ".join(latent)})'
            )
        fixed_local = sorted(set(fixed_t) & local)
        if fixed_local:
            raise ValueError(f"cannot fix local sites {fixed_local} when subsampling")
        size = next(
            f.size for name in local for f in nodes[name]["cond_indep_stack"] if f.name == "data"
        )
        if optimizer.subsample_size > size:
            raise ValueError(
                f"SVI(subsample_size={optimizer.subsample_size}) exceeds the {size} rows of the "
                f"data; use subsample_size <= {size}, or None for full batches"
            )
    problem = _Problem(
        data=data,
        fixed=fixed_t,
        init={name: init_t.get(name, nodes[name]["value"].detach()) for name in free},
        supports={name: nodes[name]["fn"].support for name in free},
        event_dims={name: nodes[name]["fn"].event_dim for name in free},
        local=local,
        dtype=dtype,
        layout=layout,
    )
    if shard is not None:
        # Before any work: every rank fits the same model with the same settings from the same
        # globals, on data of one schema (local sites differ by their rows only).
        def site(name: str, value: torch.Tensor) -> object:
            return f"local, shape (rows, {', '.join(map(str, value.shape[1:]))})" if name in local else value

        check_agreement(fingerprint({
            "model": model, "optimizer": optimizer, "seed": seed, "local sites": sorted(local),
            **{f"data[{k!r}] schema": f"{v.dtype}, shape (rows, {', '.join(map(str, v.shape[1:]))})"
               for k, v in data.items() if isinstance(v, torch.Tensor)},
            **{f"fixed[{k!r}]": site(k, v) for k, v in fixed_t.items()},
            **{f"start[{k!r}]": site(k, v) for k, v in problem.init.items()},
        }), where="fit_map")
    return problem


def _layout(model, data: Mapping[str, object], *, optimizer, shard: Shard | None) -> ShardLayout:
    rows = {int(v.shape[0]) for v in data.values() if isinstance(v, torch.Tensor) and v.dim() >= 1}
    if shard is None:
        return ShardLayout.single(max(rows, default=1))
    if not isinstance(optimizer, SVI):
        raise TypeError(
            f"fit_map(shard=...) runs SVI(...) data-parallel; got {optimizer!r} (an L-BFGS over "
            "every rank's latents is not data-parallel: for the joint fit of the globals use "
            "deqppl.encoders.fit_encoder(..., shard=...), a profiled L-BFGS over the globals)"
        )
    if optimizer.subsample_size is not None:
        raise ValueError(
            f"fit_map(shard=...) runs full-batch SVI; got subsample_size={optimizer.subsample_size} "
            "(for data-parallel minibatches use deqppl.encoders.fit_encoder with Adam)"
        )
    if getattr(model, "plate_name", "data") != "data" or len(rows) != 1:
        raise TypeError(
            f"fit_map(shard=...) needs a model whose rows are its plate \"data\" (every data tensor "
            f"with the same number of rows); got plate_name={getattr(model, 'plate_name', 'data')!r}, "
            f"rows {sorted(rows)}"
        )
    return ShardLayout.gather(shard, num_rows=rows.pop())


class _LogJointObjective:
    r"""$u \mapsto (-\log p, -\nabla_u\log p)$ on the flat unconstrained values of the free sites.

    Receives *validated* data (:func:`fit_map` validates once at entry) and evaluates the
    trace with Pyro's and torch's argument validation off: the data were checked already,
    and a trial point whose natural parameter overflows gives a NaN loss (handled by the
    line search) instead of an exception.
    """

    def __init__(self, model, problem: _Problem) -> None:
        self.model = model
        self.problem = problem
        self.transforms = {name: biject_to(problem.supports[name]) for name in problem.init}
        self.shapes = {}
        self.count = 0
        parts = []
        for name, value in problem.init.items():
            u = self.transforms[name].inv(value).detach()
            self.shapes[name] = u.shape
            parts.append(u.reshape(-1))
        self.x0 = torch.cat(parts) if parts else torch.zeros(0, dtype=problem.dtype)
        # Data-parallel: the prior of the globals is counted on rank 0 only.
        layout = problem.layout
        self.prior_scale = 1.0 if layout is None or layout.rank == 0 else 0.0

    def local_mask(self) -> torch.Tensor:
        """Which coordinates of the flat point belong to local sites (one value per data row)."""
        parts = [torch.full((math.prod(shape),), name in self.problem.local, dtype=torch.bool)
                 for name, shape in self.shapes.items()]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)

    def num_coords(self) -> int:
        """Coordinates of the fit over all ranks (the globals once); a collective when parallel."""
        layout = self.problem.layout
        if layout is None or not layout.parallel:
            return self.x0.numel()
        is_local = self.local_mask()
        count = torch.tensor([float(is_local.sum())], dtype=torch.float64)
        total = layout.sum(lambda: count, like=count, where="fit_map: counting coordinates")
        return int(total[0]) + int((~is_local).sum())

    def unflatten(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for name, shape in self.shapes.items():
            k = math.prod(shape)
            out[name] = x[i : i + k].reshape(shape)
            i += k
        return out

    def values(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """All latent values (fixed ones included) at the flat unconstrained point ``x``."""
        free = {n: self.transforms[n](u) for n, u in self.unflatten(x).items()}
        return {**self.problem.fixed, **free}

    def __call__(self, x: torch.Tensor) -> tuple[float, torch.Tensor]:
        self.count += 1
        x = x.detach().requires_grad_(True)
        with torch.enable_grad(), pyro.validation_enabled(False):
            loss = -log_joint(self.model, self.problem.data, self.values(x), prior_scale=self.prior_scale)
            if not bool(torch.isfinite(loss)):
                return float(loss.detach()), torch.full_like(x, math.nan)
            (g,) = torch.autograd.grad(loss, x)
        return float(loss.detach()), g.detach()


# --------------------------------------------------------------------------------------------
# The entry function
# --------------------------------------------------------------------------------------------
@fails_together(agreed=(FitConvergenceError,))
def fit_map(
    model: Callable[..., object],
    data: Mapping[str, object],
    *,
    optimizer: AbstractOptimizer | None = None,
    fixed: Mapping[str, object] | None = None,
    init: Mapping[str, object] | None = None,
    seed: int = 0,
    progress: bool = True,
    throw: bool = False,
    shard: Shard | None = None,
) -> MAPResult:
    r"""Maximise the log joint of ``model`` over its latent sites.

    Parameters
    ----------
    model
        A Pyro program taking ``data`` as keyword arguments; zoo models also ``validate`` it.
    data
        Observations (and covariates), e.g. ``{"y": (N, d)}``; validated once, here, before
        any fitting. Their floating dtype is the dtype of the fit.
    optimizer
        :class:`~deqppl.optim.LBFGS` (default ``LBFGS()``: full batch, deterministic, stopped
        by the gradient) or :class:`~deqppl.optim.SVI` (AutoDelta + Adam, optional
        minibatches). Its fields hold every setting (step cap, tolerances, learning rate).
    fixed
        Site name -> value held fixed (by ``poutine.condition``); the rest is fitted, e.g.
        ``fixed={"W": W, "B": B}`` gives the conditional MAP of the local latents.
    init
        Site name -> initial value. Other free sites start at unconstrained values uniform in
        $(-0.5, 0.5)$ drawn with ``seed``.
    seed
        Seeds the initialisation and the minibatch draws (global RNG state is restored).
    progress
        Show a progress bar.
    throw
        Raise :class:`~deqppl.optim.FitConvergenceError` unless the fit converged.
    shard
        Run :class:`~deqppl.optim.SVI` (full batch) data-parallel over the
        ``torch.distributed`` process group: ``data`` are this rank's rows, ``shard``
        (:class:`~deqppl.distributed.Shard`) says which of all ranks' rows they are. Each rank
        holds its rows' locals; the loss and the gradients of the globals are summed over ranks
        (the prior counted once), so every rank takes the same steps. The local sites start
        where the single-process fit starts them (the rows of the same seeded draw), and the
        result equals the single-process fit up to rounding: ``values`` hold the same globals on
        every rank and this rank's rows of the locals, ``log_joint`` is that of all rows.

    Returns
    -------
    MAPResult
        Always returned, also when the fit did not converge or the log joint became
        non-finite (status ``NONFINITE``; ``values`` are then the last finite iterate).

    Raises
    ------
    TypeError
        ``optimizer`` is not an LBFGS or SVI object.
    ValueError
        ``fixed``/``init`` naming unknown sites (the valid ones are listed) or with wrong
        shapes, minibatches on a model without a ``"data"`` plate, bad data.
    FitConvergenceError
        If ``throw`` and the fit did not converge.
    deqppl.distributed.RankFailedError
        Data-parallel: on every rank, when any rank raised (its message is included).
    deqppl.distributed.DisagreementError
        Data-parallel: on every rank, before any work, when the ranks' settings, data schema,
        starting globals or shards disagree.

    Notes
    -----
    The stopping rules are those of the optimiser (:class:`~deqppl.optim.LBFGS`: the gradient
    in unconstrained space, $\max|g|\le\mathrm{gtol}\max(1,|f|/n)$; :class:`~deqppl.optim.SVI`:
    windowed loss and step changes), checked at the current iterate by the shared driver;
    ``criterion`` says which one fired. Without ``fixed``, the PCA-type models are invariant
    to rotations of the latent space, so only rotation-invariant quantities (log joint,
    subspaces) of a joint MAP are unique.

    Examples
    --------
    >>> import torch
    >>> from deqppl.expfam import family
    >>> from deqppl.models import ExpFamPCA
    >>> from deqppl.optim import LBFGS
    >>> model = ExpFamPCA(family=family("gaussian"), obs_dim=4, latent_dim=2)
    >>> sim = model.simulate(20, seed=0, dtype=torch.float64)
    >>> fit = fit_map(model, sim.data, optimizer=LBFGS(), fixed={"W": sim.truth["W"], "B": sim.truth["B"]},
    ...               progress=False)
    >>> fit.status.name, fit.values["z"].shape
    ('CONVERGED', torch.Size([20, 2]))
    """
    start = time.perf_counter()
    optimizer = LBFGS() if optimizer is None else optimizer
    problem = _prepare(model, data, optimizer=optimizer, fixed=fixed, init=init, seed=seed, shard=shard)
    objective = _LogJointObjective(model, problem)
    if isinstance(optimizer, LBFGS):
        stepper = LBFGSStepper(objective, objective.x0, optimizer)
        out = drive(
            stepper,
            lbfgs_rules(optimizer, problem.dtype, objective.x0.numel()),
            max_steps=int(optimizer.max_steps),
            progress=progress,
            desc="MAP (L-BFGS)",
        )
        x, loss, grad = stepper.x, stepper.f, stepper.g
        num_evals = out.num_evals
    else:
        out, x = _fit_svi(model, problem, objective, optimizer, seed, progress)
        # One full-batch evaluation at the returned point: its log joint and gradient norm.
        loss, grad = objective(x)
        num_evals = out.num_evals + 1
    stats = _GradStats.of(loss, grad, objective, problem)
    loss = stats.loss
    status, criterion = out.status, out.criterion
    if isinstance(optimizer, SVI) and status is FitStatus.CONVERGED and math.isfinite(loss):
        # SVI stops on loss and step changes. A loss that stopped changing while the full
        # gradient exceeds the loss per coordinate was not resolved by the dtype (counts of
        # 1e100: the Poisson log pmf cancels terms of 1e102 to a rounding of 1e86), which is
        # no optimum; the bound is loose enough never to flag a fit near an optimum.
        scale = max(1.0, abs(loss) / max(stats.num_coords, 1))
        gmax = stats.max
        if not gmax <= scale:
            status = FitStatus.STALLED
            criterion = (
                f"{criterion}, but the full-batch max |grad| = {gmax:.3g} exceeds "
                f"max(1, |loss|/n) = {scale:.3g}: the loss is not resolved at this precision"
            )
    finite = math.isfinite(loss) and stats.finite
    if not finite and status is not FitStatus.NONFINITE:
        status, criterion = FitStatus.NONFINITE, f"{criterion}; loss at the returned point {loss}"
    with torch.no_grad():
        values = {name: v.detach() for name, v in objective.values(x).items()}
    result = MAPResult(
        values=values,
        log_joint=torch.tensor(-loss, dtype=problem.dtype),
        loss_trace=torch.tensor(out.trace, dtype=problem.dtype),
        num_steps=out.num_steps,
        num_grad_evals=num_evals,
        wall_time=time.perf_counter() - start,
        status=status,
        criterion=criterion,
        grad_norm=stats.norm if finite else math.nan,
        optimizer=optimizer,
    )
    if throw and not result.converged:
        raise FitConvergenceError(result, "MAP")
    return result


@dataclass(frozen=True)
class _GradStats:
    """The loss and gradient summaries at the returned point, over every rank's coordinates."""

    loss: float
    max: float
    norm: float
    finite: bool
    num_coords: int

    @classmethod
    def of(cls, loss: float, grad: torch.Tensor, objective: _LogJointObjective, problem: _Problem) -> _GradStats:
        layout = problem.layout
        if layout is None or not layout.parallel:
            return cls(loss=loss, max=float(grad.abs().max()) if grad.numel() else 0.0,
                       norm=float(grad.norm()), finite=bool(torch.isfinite(grad).all()),
                       num_coords=objective.x0.numel())
        # The globals' gradient is summed over ranks; each rank's locals' gradient is its own.
        is_local = objective.local_mask()
        g = grad.clone()
        sums = torch.cat([
            torch.tensor([loss], dtype=g.dtype), g[~is_local],
            torch.tensor([float(g[is_local].pow(2).sum()), float(is_local.sum())], dtype=g.dtype),
        ])
        total = layout.sum(lambda: sums, like=sums, where="fit_map: final gradient")
        g_global = total[1:-2]
        g_local_max = g[is_local].abs().max() if bool(is_local.any()) else torch.zeros((), dtype=g.dtype)
        gmax = layout.max(torch.stack([g_local_max, g_global.abs().max() if g_global.numel() else g_local_max]).max().reshape(1))
        norm_sq = total[-2] + g_global.pow(2).sum()
        return cls(loss=float(total[0]), max=float(gmax[0]), norm=float(norm_sq.sqrt()),
                   finite=bool(torch.isfinite(total).all()) and bool(torch.isfinite(gmax).all()),
                   num_coords=int(total[-1]) + int(g_global.numel()))


# --------------------------------------------------------------------------------------------
# SVI: AutoDelta + Trace_ELBO + Adam, one monitoring window per driver step
# --------------------------------------------------------------------------------------------
class _SVIStepper(AbstractStepper):
    def __init__(self, model, problem: _Problem, settings: SVI) -> None:
        self.settings = settings
        self.layout = problem.layout if problem.layout is not None and problem.layout.parallel else None
        self.conditioned = poutine.condition(model, data=problem.fixed)
        if self.layout is not None and self.layout.rank != 0:
            # Data-parallel: the prior of the globals is counted on rank 0 only.
            self.conditioned = _ScaleGlobals(0.0)(self.conditioned)
        self.kwargs = dict(problem.data)
        if settings.subsample_size is not None:
            self.kwargs["subsample_size"] = int(settings.subsample_size)
        self.elbo = Trace_ELBO()
        guide = AutoDelta(self.conditioned, init_loc_fn=_uniform_init(problem.dtype))
        guide._setup_prototype(**self.kwargs)
        # The prototype holds (periodically repeated) placeholders; install the full-size
        # initial values, identical to those L-BFGS starts from.
        for name, value in problem.init.items():
            setattr(
                guide, name,
                PyroParam(value.clone(), problem.supports[name], problem.event_dims[name]),
            )
        self.guide = guide
        self.names = list(problem.init)
        self.params = list(guide.parameters())
        # AutoDelta's parameter of site X is X_unconstrained; only the globals' gradients are
        # summed over ranks, each rank's locals are its own rows.
        self.global_params = [p for name, p in guide.named_parameters()
                              if name.removesuffix("_unconstrained") not in problem.local]
        self.adam = torch.optim.Adam(self.params, lr=settings.lr, betas=settings.betas)
        self.updates = 0
        self.num_plateaus = 0
        self.prev_mean: float | None = None

    def _flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def _evaluate(self) -> tuple[float, float]:
        self.adam.zero_grad()
        with pyro.validation_enabled(False):
            loss = self.elbo.differentiable_loss(self.conditioned, self.guide, **self.kwargs)
        if self.layout is not None:
            return self._evaluate_parallel(loss)
        if not bool(torch.isfinite(loss)):
            return float(loss.detach()), math.nan
        loss.backward()
        gmax = max(float(p.grad.abs().max()) for p in self.params if p.grad is not None)
        return float(loss.detach()), gmax

    def _evaluate_parallel(self, loss: torch.Tensor) -> tuple[float, float]:
        # Every rank reaches both collectives, whatever its loss: the decision to stop on a
        # non-finite loss is taken on the sum, the same on all ranks.
        if bool(torch.isfinite(loss)):
            loss.backward()
        flat = torch.cat([loss.detach().reshape(1), *(
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.global_params
        )])
        total = self.layout.sum(lambda: flat, like=flat, where="fit_map (SVI): loss and gradient")
        if not bool(torch.isfinite(total[0])):
            return float(total[0]), math.nan
        i = 1
        for p in self.global_params:
            k = p.numel()
            p.grad = total[i : i + k].reshape(p.shape).clone()
            i += k
        local = max(float(p.grad.abs().max()) for p in self.params if p.grad is not None)
        gmax = float(self.layout.max(torch.tensor([local], dtype=torch.float64))[0])
        return float(total[0]), gmax

    def start(self) -> Observation:
        loss, gmax = self._evaluate()
        return Observation(loss=loss, grad_max=gmax, num_steps=0)

    def step(self, budget: int) -> Observation:
        k = min(self.settings.window, budget)
        x_before = self._flat()
        losses, gmax = [], math.nan
        for _ in range(k):
            lr = self.settings.schedule.lr(
                self.settings.lr, step=self.updates, max_steps=self.settings.max_steps,
                num_plateaus=self.num_plateaus,
            )
            for group in self.adam.param_groups:
                group["lr"] = lr
            self.adam.step()
            self.updates += 1
            loss, gmax = self._evaluate()
            losses.append(loss)
            if not math.isfinite(loss):
                break
        mean = sum(losses) / len(losses)
        if self.prev_mean is not None and not mean < self.prev_mean:
            self.num_plateaus += 1
        self.prev_mean = mean
        step_max = float((self._flat() - x_before).abs().max()) if x_before.numel() else 0.0
        if self.layout is not None:
            step_max = float(self.layout.max(torch.tensor([step_max], dtype=torch.float64))[0])
        return Observation(
            loss=mean, losses=tuple(losses), grad_max=gmax, step_max=step_max,
            num_steps=len(losses), num_evals=len(losses),
        )


class _ScaleGlobals(poutine.messenger.Messenger):
    """Multiply the log density of the sample sites outside the plate ``"data"`` by ``scale``."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def _process_message(self, msg: dict) -> None:
        if msg["type"] == "sample" and not _in_data_plate(msg):
            msg["scale"] = self.scale * msg["scale"]


def _fit_svi(model, problem: _Problem, objective: _LogJointObjective, settings: SVI, seed, progress):
    rtol, gtol, xtol = settings.resolved_tolerances(problem.dtype)
    rules = StopRules(
        # a minibatch gradient does not vanish at the optimum: the gradient rule is full-batch only
        gtol=gtol if settings.subsample_size is None else None,
        num_coords=objective.num_coords(),
        rtol=rtol,
        xtol=xtol,
    )
    # Module-local parameters and a scoped param store: no global residue between fits.
    with (
        pyro.settings.context(module_local_params=True),
        pyro.get_param_store().scope(),
        torch.random.fork_rng(devices=[]),
    ):
        torch.manual_seed(seed)
        stepper = _SVIStepper(model, problem, settings)
        out = drive(
            stepper, rules, max_steps=int(settings.max_steps), progress=progress,
            desc="MAP (SVI)", unit="update",
        )
        with torch.no_grad():
            parts = []
            for name in problem.init:
                value = getattr(stepper.guide, name).detach()
                parts.append(objective.transforms[name].inv(value).reshape(-1))
    return out, torch.cat(parts)
