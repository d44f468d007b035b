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

from deqppl.validation import as_tensor, check_finite, validated
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
def _uniform_init(dtype: torch.dtype) -> Callable[[dict], torch.Tensor]:
    def init(site: dict) -> torch.Tensor:
        fn = site["fn"]
        transform = biject_to(fn.support)
        shape = transform.inverse_shape(fn.shape())
        u = (2.0 * torch.rand(shape, dtype=dtype) - 1.0) * _INIT_RADIUS
        return transform(u).detach()

    return init


@dataclass(frozen=True)
class _Problem:
    data: dict[str, torch.Tensor]
    fixed: dict[str, torch.Tensor]
    init: dict[str, torch.Tensor]  # free sites only
    supports: dict[str, object]
    event_dims: dict[str, int]
    local: frozenset[str]
    dtype: torch.dtype


def _prepare(
    model: Callable[..., object],
    data: Mapping[str, object],
    *,
    optimizer: AbstractOptimizer,
    fixed: Mapping[str, object] | None,
    init: Mapping[str, object] | None,
    seed: int,
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
    data = dict(validated(model, data))
    for name, value in data.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == 0:
            raise ValueError(
                f"data[{name!r}] has no rows (shape {tuple(value.shape)}); fit_map needs at "
                f"least one row of data"
            )
    floats = [v.dtype for v in data.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    dtype = floats[0] if floats else torch.get_default_dtype()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        trace = poutine.trace(
            pyro.infer.autoguide.initialization.InitMessenger(_uniform_init(dtype))(model)
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
    return _Problem(
        data=data,
        fixed=fixed_t,
        init={name: init_t.get(name, nodes[name]["value"].detach()) for name in free},
        supports={name: nodes[name]["fn"].support for name in free},
        event_dims={name: nodes[name]["fn"].event_dim for name in free},
        local=local,
        dtype=dtype,
    )


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
            loss = -log_joint(self.model, self.problem.data, self.values(x))
            if not bool(torch.isfinite(loss)):
                return float(loss.detach()), torch.full_like(x, math.nan)
            (g,) = torch.autograd.grad(loss, x)
        return float(loss.detach()), g.detach()


# --------------------------------------------------------------------------------------------
# The entry function
# --------------------------------------------------------------------------------------------
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
    problem = _prepare(model, data, optimizer=optimizer, fixed=fixed, init=init, seed=seed)
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
    status, criterion = out.status, out.criterion
    if isinstance(optimizer, SVI) and status is FitStatus.CONVERGED and math.isfinite(loss):
        # SVI stops on loss and step changes. A loss that stopped changing while the full
        # gradient exceeds the loss per coordinate was not resolved by the dtype (counts of
        # 1e100: the Poisson log pmf cancels terms of 1e102 to a rounding of 1e86), which is
        # no optimum; the bound is loose enough never to flag a fit near an optimum.
        scale = max(1.0, abs(loss) / max(objective.x0.numel(), 1))
        gmax = float(grad.abs().max()) if grad.numel() else 0.0
        if not gmax <= scale:
            status = FitStatus.STALLED
            criterion = (
                f"{criterion}, but the full-batch max |grad| = {gmax:.3g} exceeds "
                f"max(1, |loss|/n) = {scale:.3g}: the loss is not resolved at this precision"
            )
    finite = math.isfinite(loss) and bool(torch.isfinite(grad).all())
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
        grad_norm=float(grad.norm()) if finite else math.nan,
        optimizer=optimizer,
    )
    if throw and not result.converged:
        raise FitConvergenceError(result, "MAP")
    return result


# --------------------------------------------------------------------------------------------
# SVI: AutoDelta + Trace_ELBO + Adam, one monitoring window per driver step
# --------------------------------------------------------------------------------------------
class _SVIStepper(AbstractStepper):
    def __init__(self, model, problem: _Problem, settings: SVI) -> None:
        self.settings = settings
        self.conditioned = poutine.condition(model, data=problem.fixed)
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
        if not bool(torch.isfinite(loss)):
            return float(loss.detach()), math.nan
        loss.backward()
        gmax = max(float(p.grad.abs().max()) for p in self.params if p.grad is not None)
        return float(loss.detach()), gmax

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
        return Observation(
            loss=mean, losses=tuple(losses), grad_max=gmax, step_max=step_max,
            num_steps=len(losses), num_evals=len(losses),
        )


def _fit_svi(model, problem: _Problem, objective: _LogJointObjective, settings: SVI, seed, progress):
    rtol, gtol, xtol = settings.resolved_tolerances(problem.dtype)
    rules = StopRules(
        # a minibatch gradient does not vanish at the optimum: the gradient rule is full-batch only
        gtol=gtol if settings.subsample_size is None else None,
        num_coords=objective.x0.numel(),
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
