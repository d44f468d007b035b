r"""MAP estimation of a Pyro model's latent sites by optimisation.

One entry function, :func:`fit_map`, with two methods that maximise the same log joint (taken
from the model's Pyro trace, :func:`deqppl.inference.log_joint`):

* ``"lbfgs"``: :class:`torch.optim.LBFGS` with a strong-Wolfe line search on the unconstrained
  values $u$ of the free sites ($\theta = \mathrm{biject\_to}(\mathrm{support})(u)$; the log
  joint is maximised in constrained space, without a Jacobian term, as ``AutoDelta`` does);
* ``"svi"``: Pyro's MAP guide :class:`~pyro.infer.autoguide.AutoDelta` trained on
  :class:`~pyro.infer.Trace_ELBO` (whose loss is exactly $-\log p$ for a Delta guide) with
  Adam and a plateau learning-rate decay, optionally on minibatches of the plate ``"data"``.

Holding some sites ``fixed`` gives the conditional MAP of the rest, e.g. $z^*(y; W, B)$, the
quantity a DEQ encoder amortises (SPEC §2.2).
"""

from __future__ import annotations

import enum
import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from torch.distributions import biject_to
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoDelta
from pyro.nn import PyroParam

from deqppl._progress import progress as _progress
from deqppl._validation import as_tensor, check_finite
from deqppl.inference.log_joint import latent_sites, log_joint

__all__ = ["METHODS", "MAPConvergenceError", "MAPResult", "MAPStatus", "fit_map"]

#: Valid values of ``fit_map(method=...)``.
METHODS = ("lbfgs", "svi")

# Sites not given in ``init`` start at unconstrained values uniform in (-_INIT_RADIUS,
# _INIT_RADIUS): random, so the W = z = 0 saddle of PCA-type models is avoided, and small, so
# that exp-link families (Poisson) start with moderate rates.
_INIT_RADIUS = 0.5
# SVI: the loss is averaged over windows of this many steps; the window means drive both the
# plateau decay (halve the learning rate when a window mean does not decrease) and the
# relative-change stopping rule. 25 steps smooth Adam's oscillation on the problems in tests/.
_WINDOW = 25
_DECAY = 0.5
_DEFAULT_MAX_STEPS = {"lbfgs": 500, "svi": 20_000}


class MAPStatus(enum.Enum):
    """Outcome of a MAP fit."""

    #: A stopping criterion was met (see ``MAPResult.criterion``).
    CONVERGED = "converged"
    #: ``max_steps`` steps were taken without meeting a criterion.
    MAX_STEPS = "max_steps"
    #: The log joint or its gradient became NaN/Inf.
    NONFINITE = "nonfinite"


@dataclass(frozen=True, kw_only=True, repr=False, eq=False)
class MAPResult:
    """Result of :func:`fit_map`.

    Attributes
    ----------
    values
        Site name -> MAP value (detached) for every latent site, fixed sites included.
    log_joint
        Scalar: the full-data log joint at ``values``.
    loss_trace
        ``(num_steps + 1,)`` loss ($-\\log p$, a minibatch estimate when subsampling) at each
        step's starting point and at the end.
    num_steps
        Optimiser steps taken (L-BFGS iterations or SVI updates).
    num_grad_evals
        Evaluations of the log joint with its gradient (line-search trials included).
    wall_time
        Seconds spent fitting.
    status
        A :class:`MAPStatus`.
    criterion
        What decided the stop, with the numbers.
    method
        ``"lbfgs"`` or ``"svi"``.
    """

    values: dict[str, torch.Tensor]
    log_joint: torch.Tensor
    loss_trace: torch.Tensor
    num_steps: int
    num_grad_evals: int
    wall_time: float
    status: MAPStatus
    criterion: str
    method: str

    @property
    def converged(self) -> bool:
        """True when ``status`` is ``CONVERGED``."""
        return self.status is MAPStatus.CONVERGED

    def __repr__(self) -> str:
        return (
            f"MAPResult(method={self.method}, status={self.status.name}, "
            f"log_joint={float(self.log_joint):.10g}, num_steps={self.num_steps}, "
            f"num_grad_evals={self.num_grad_evals}, wall_time={self.wall_time:.3g} s, "
            f"criterion={self.criterion!r}, sites={sorted(self.values)})"
        )


class MAPConvergenceError(RuntimeError):
    """A MAP fit with ``throw=True`` did not converge; ``.result`` holds the last iterate."""

    def __init__(self, result: MAPResult) -> None:
        self.result = result
        hint = (
            "the log joint became non-finite: check the data's support and try a smaller lr "
            "or an init closer to the data"
            if result.status is MAPStatus.NONFINITE
            else "raise max_steps, loosen rtol/gtol/xtol, or (svi) change lr"
        )
        super().__init__(
            f"MAP by {result.method} stopped with status {result.status.name} after "
            f"{result.num_steps} steps ({result.criterion}); {hint}"
        )


# --------------------------------------------------------------------------------------------
# Set-up shared by both methods
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
    method: str,
    fixed: Mapping[str, object] | None,
    init: Mapping[str, object] | None,
    subsample_size: int | None,
    seed: int,
) -> _Problem:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods are: {', '.join(METHODS)}")
    validate = getattr(model, "validate", None)
    data = validate(data) if validate is not None else dict(data)
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
    if subsample_size is not None:
        if method != "svi":
            raise ValueError("subsample_size needs method='svi' (L-BFGS is full-batch)")
        fixed_local = sorted(set(fixed_t) & local)
        if fixed_local:
            raise ValueError(f"cannot fix local sites {fixed_local} when subsampling")
    return _Problem(
        data=data,
        fixed=fixed_t,
        init={name: init_t.get(name, nodes[name]["value"].detach()) for name in free},
        supports={name: nodes[name]["fn"].support for name in free},
        event_dims={name: nodes[name]["fn"].event_dim for name in free},
        local=local,
        dtype=dtype,
    )


def _default(value: float | None, dtype: torch.dtype, power: float) -> float:
    # Tolerances scale with the dtype's precision: eps**power.
    return float(torch.finfo(dtype).eps) ** power if value is None else float(value)


# --------------------------------------------------------------------------------------------
# The entry function
# --------------------------------------------------------------------------------------------
def fit_map(
    model: Callable[..., object],
    data: Mapping[str, object],
    *,
    method: str = "lbfgs",
    fixed: Mapping[str, object] | None = None,
    init: Mapping[str, object] | None = None,
    rtol: float | None = None,
    gtol: float | None = None,
    xtol: float | None = None,
    max_steps: int | None = None,
    subsample_size: int | None = None,
    lr: float = 0.05,
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
        Observations, e.g. ``{"y": (N, d)}``; validated before any fitting. Their floating
        dtype is the dtype of the fit.
    method
        ``"lbfgs"`` (full batch, deterministic) or ``"svi"`` (AutoDelta + Adam).
    fixed
        Site name -> value held fixed (by ``poutine.condition``); the rest is fitted, e.g.
        ``fixed={"W": W, "B": B}`` gives the conditional MAP of the local latents.
    init
        Site name -> initial value. Other free sites start at unconstrained values uniform in
        $(-0.5, 0.5)$ drawn with ``seed``.
    rtol
        Relative change of the loss: between L-BFGS iterations, or between the means of
        consecutive 25-step windows for SVI. Default $10\epsilon$ of the dtype
        ($2.2\times10^{-15}$ in float64, $1.2\times10^{-6}$ in float32): the loss stopped
        changing at working precision. 0 stops only on a bit-identical loss; a negative value
        disables the rule (likewise for gtol and xtol).
    gtol
        Largest absolute entry of the gradient of the loss in unconstrained space. Default
        $\epsilon^{1/2}$ ($1.5\times10^{-8}$ in float64, $3.5\times10^{-4}$ in float32).
    xtol
        Largest absolute change of the unconstrained values over one step (L-BFGS) or one
        25-step window (SVI). Default $\epsilon^{1/2}$. With subsampling this is the rule that
        normally stops SVI, since minibatch losses and gradients stay noisy.
    max_steps
        Cap on steps (default 500 L-BFGS iterations, 20 000 SVI updates); reaching it gives
        status ``MAX_STEPS``.
    subsample_size
        SVI only: rows of the plate ``"data"`` per step (minibatch SVI, losses rescaled by
        Pyro's plate).
    lr
        SVI only: Adam's initial learning rate. It is halved whenever the mean loss of a
        25-step window fails to decrease (plateau decay), so Adam's oscillation shrinks and the
        fit reaches a tight optimum.
    seed
        Seeds the initialisation and the minibatch draws (global RNG state is restored).
    progress
        Show a progress bar.
    throw
        Raise :class:`MAPConvergenceError` unless the fit converged.

    Returns
    -------
    MAPResult

    Raises
    ------
    ValueError
        Unknown ``method`` (the valid ones are listed), ``fixed``/``init`` naming unknown sites
        (the valid ones are listed) or with wrong shapes, bad data.
    MAPConvergenceError
        If ``throw`` and the fit did not converge.

    Notes
    -----
    Both methods stop at the first criterion met, checked at the current iterate: gradient
    (``gtol``), relative loss change (``rtol``), step size (``xtol``). Without ``fixed``, the
    PCA-type models are invariant to rotations of the latent space, so only rotation-invariant
    quantities (log joint, subspaces) of a joint MAP are unique.

    Examples
    --------
    >>> import torch
    >>> from deqppl.expfam import family
    >>> from deqppl.models import ExpFamPCA
    >>> model = ExpFamPCA(family=family("gaussian"), obs_dim=4, latent_dim=2)
    >>> sim = model.simulate(20, seed=0, dtype=torch.float64)
    >>> fit = fit_map(model, sim.data, fixed={"W": sim.truth["W"], "B": sim.truth["B"]},
    ...               progress=False)
    >>> fit.status.name, fit.values["z"].shape
    ('CONVERGED', torch.Size([20, 2]))
    """
    start = time.perf_counter()
    problem = _prepare(
        model, data, method=method, fixed=fixed, init=init, subsample_size=subsample_size, seed=seed
    )
    steps = _DEFAULT_MAX_STEPS[method] if max_steps is None else int(max_steps)
    if steps < 0:
        raise ValueError(f"max_steps must be non-negative, got {max_steps}")
    tols = (
        10.0 * float(torch.finfo(problem.dtype).eps) if rtol is None else float(rtol),
        _default(gtol, problem.dtype, 0.5),
        _default(xtol, problem.dtype, 0.5),
    )
    runner = _fit_lbfgs if method == "lbfgs" else _fit_svi
    free, trace, num_steps, num_evals, status, criterion = runner(
        model, problem, tols, steps, subsample_size, lr, seed, progress
    )
    values = {**problem.fixed, **free}
    with torch.no_grad():
        final = log_joint(model, problem.data, values)
    if status is MAPStatus.CONVERGED and not bool(torch.isfinite(final)):
        status, criterion = MAPStatus.NONFINITE, f"final log joint is {float(final)}"
    result = MAPResult(
        values=values,
        log_joint=final.detach(),
        loss_trace=torch.tensor(trace, dtype=problem.dtype),
        num_steps=num_steps,
        num_grad_evals=num_evals,
        wall_time=time.perf_counter() - start,
        status=status,
        criterion=criterion,
        method=method,
    )
    if throw and not result.converged:
        raise MAPConvergenceError(result)
    return result


def _stop_rule(
    loss: float, prev: float | None, gmax: float, dx: float | None, tols: tuple[float, float, float]
) -> tuple[MAPStatus, str] | None:
    rtol, gtol, xtol = tols
    if not (math.isfinite(loss) and math.isfinite(gmax)):
        return MAPStatus.NONFINITE, f"loss {loss}, max |grad| {gmax}"
    if gmax <= gtol:
        return MAPStatus.CONVERGED, f"max |grad| = {gmax:.3g} <= gtol = {gtol:.3g}"
    if prev is not None:
        rel = abs(loss - prev) / max(abs(loss), torch.finfo(torch.float64).tiny)
        if rel <= rtol:
            return MAPStatus.CONVERGED, f"relative loss change {rel:.3g} <= rtol = {rtol:.3g}"
    if dx is not None and dx <= xtol:
        return MAPStatus.CONVERGED, f"max |step| = {dx:.3g} <= xtol = {xtol:.3g}"
    return None


def _fit_lbfgs(model, problem: _Problem, tols, max_steps, subsample_size, lr, seed, progress):
    transforms = {name: biject_to(problem.supports[name]) for name in problem.init}
    u = {
        name: transforms[name].inv(value).detach().clone().requires_grad_(True)
        for name, value in problem.init.items()
    }
    params = list(u.values())
    optimizer = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=1,  # one quasi-Newton iteration per .step(): our loop decides when to stop
        # torch's default max_eval = max_iter * 5 // 4 = 1 would leave the line search no
        # trial points beyond the first; 25 is the default max_ls of its strong-Wolfe search.
        max_eval=26,
        history_size=20,
        tolerance_grad=0.0,
        tolerance_change=0.0,
        line_search_fn="strong_wolfe",
    )
    cache: dict[str, object] = {}
    count = [0]

    def closure() -> torch.Tensor:
        # LBFGS re-evaluates the point it starts each .step() from, which our loop has just
        # evaluated; the cache avoids paying (and counting) that evaluation twice.
        key = torch.cat([p.detach().reshape(-1) for p in params])
        if "key" in cache and torch.equal(cache["key"], key):
            for p, g in zip(params, cache["grads"], strict=True):
                p.grad = g.clone()
            return cache["loss"]
        optimizer.zero_grad()
        values = {**problem.fixed, **{n: transforms[n](u[n]) for n in u}}
        with warnings.catch_warnings():
            # A trial point of the line search may overflow (e.g. exp of a huge Poisson
            # natural parameter); Pyro warns about the NaN, which is handled just below.
            warnings.filterwarnings("ignore", message="Encountered NaN", category=UserWarning)
            try:
                loss = -log_joint(model, problem.data, values)
            except ValueError:
                # Pyro's argument validation rejects a trial point whose natural parameter
                # overflowed (e.g. a Poisson rate of NaN); past the first evaluation that is a
                # line-search overshoot, handled like a non-finite loss below.
                if count[0] == 0:
                    raise
                loss = None
        if loss is not None:
            loss.backward()
        count[0] += 1
        grads = [
            torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params
        ]
        if loss is None:
            loss = torch.tensor(math.nan, dtype=problem.dtype)
        if not (bool(torch.isfinite(loss)) and all(bool(torch.isfinite(g).all()) for g in grads)):
            # Torch's strong-Wolfe search cannot bracket with NaN/Inf (its cubic interpolation
            # turns them into NaN steps). A large finite loss with a zero gradient makes it
            # treat the trial point as "too far" and backtrack; max**0.3 (1e92 in float64) keeps the
            # interpolation's squared differences finite.
            loss = torch.tensor(torch.finfo(problem.dtype).max ** 0.3, dtype=problem.dtype)
            grads = [torch.zeros_like(g) for g in grads]
            cache["bad"] = True
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        cache.update(key=key, grads=grads, loss=loss.detach())
        return loss.detach()

    def evaluate() -> tuple[float, float, torch.Tensor]:
        loss = float(closure())
        gmax = max(float(p.grad.abs().max()) if p.numel() else 0.0 for p in params)
        return loss, gmax, cache["key"]

    loss, gmax, x = evaluate()
    trace = [loss]
    prev = dx = None
    status, criterion, num_steps = MAPStatus.MAX_STEPS, "", 0
    bar = iter(_progress(range(max_steps), enable=progress, desc="MAP (L-BFGS)", total=max_steps))
    while True:
        stop = _stop_rule(loss, prev, gmax, dx, tols)
        if stop is not None:
            status, criterion = stop
            break
        if num_steps >= max_steps:
            criterion = f"max_steps = {max_steps} reached; max |grad| = {gmax:.3g}"
            break
        next(bar, None)
        optimizer.step(closure)
        num_steps += 1
        prev = loss
        loss, gmax, x_new = evaluate()
        dx = float((x_new - x).abs().max()) if x.numel() else 0.0
        x = x_new
        trace.append(loss)
    free = {n: transforms[n](u[n]).detach() for n in u}
    return free, trace, num_steps, count[0], status, criterion


def _fit_svi(model, problem: _Problem, tols, max_steps, subsample_size, lr, seed, progress):
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be positive and finite, got {lr}")
    conditioned = poutine.condition(model, data=problem.fixed)
    kwargs = dict(problem.data)
    if subsample_size is not None:
        kwargs["subsample_size"] = int(subsample_size)
    rtol, gtol, xtol = tols
    elbo = Trace_ELBO()
    # Module-local parameters and a scoped param store: no global residue between fits.
    with (
        pyro.settings.context(module_local_params=True),
        pyro.get_param_store().scope(),
        torch.random.fork_rng(devices=[]),
    ):
        torch.manual_seed(seed)
        guide = AutoDelta(conditioned, init_loc_fn=_uniform_init(problem.dtype))
        guide._setup_prototype(**kwargs)
        # The prototype holds (periodically repeated) placeholders; install the full-size
        # initial values, identical to those L-BFGS starts from.
        for name, value in problem.init.items():
            setattr(guide, name, PyroParam(value.clone(), problem.supports[name], problem.event_dims[name]))
        params = list(guide.parameters())
        optimizer = torch.optim.Adam(params, lr=lr)

        def flat() -> torch.Tensor:
            return torch.cat([p.detach().reshape(-1) for p in params])

        trace: list[float] = []
        window: list[float] = []
        prev_mean = None
        x_window = flat()
        status, criterion, num_steps = MAPStatus.MAX_STEPS, "", 0
        bar = iter(_progress(range(max_steps), enable=progress, desc="MAP (SVI)", total=max_steps))
        while True:
            optimizer.zero_grad()
            loss_t = elbo.differentiable_loss(conditioned, guide, **kwargs)
            loss_t.backward()
            loss = float(loss_t.detach())
            gmax = max(float(p.grad.abs().max()) for p in params if p.grad is not None)
            trace.append(loss)
            window.append(loss)
            mean = dx = None
            if len(window) == _WINDOW:
                mean = sum(window) / _WINDOW
                x_now = flat()
                dx = float((x_now - x_window).abs().max())
                x_window = x_now
            # The windowed rules compare window means; between windows only gtol can fire.
            stop = _stop_rule(
                mean if mean is not None else loss,
                prev_mean if mean is not None else None,
                gmax,
                dx,
                tols,
            )
            if stop is not None:
                status, criterion = stop
                break
            if num_steps >= max_steps:
                criterion = f"max_steps = {max_steps} reached; max |grad| = {gmax:.3g}"
                break
            if mean is not None:
                if prev_mean is not None and mean >= prev_mean:
                    for group in optimizer.param_groups:
                        group["lr"] *= _DECAY
                prev_mean = mean
                window = []
            next(bar, None)
            optimizer.step()
            num_steps += 1
        with torch.no_grad():
            free = {name: getattr(guide, name).detach().clone() for name in problem.init}
    return free, trace, num_steps, num_steps + 1, status, criterion
