r"""Joint MAP of a PED encoder's globals $(W, B)$ through the fixed point (SPEC §2.4).

The objective is the negative log joint of the encoder's Pyro model at the MAP latents,

$$L(W,B)=-\log p(W,B)-\sum_s\log p(y_s, z_s^*\mid W,B),\qquad z_s^*=f(z_s^*;y_s,W,B),$$

taken from the model's trace (:func:`deqppl.inference.log_joint`), and is minimised with Adam
on minibatches. Because $z_s^*$ is a stationary point of the same objective, its implicit
dependence on $(W, B)$ contributes nothing to the gradient (envelope theorem), so each solve is
run without an adjoint and the gradient is that of $L$ at the detached $z^*$.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from deqppl._progress import progress as _progress
from deqppl._validation import as_tensor
from deqppl.inference.log_joint import log_joint

__all__ = ["EncoderFitResult", "EncoderFitStatus", "encoder_loss", "fit_encoder"]

# The learning rate is multiplied by this whenever the full-data loss fails to decrease over
# an epoch (plateau decay, as fit_map's SVI): a constant Adam step keeps oscillating at a
# relative level of ~lr, which a relative-change criterion would never see settle.
_DECAY = 0.5
_OPTIMIZERS = ("adam", "lbfgs")


class EncoderFitStatus(enum.Enum):
    """Outcome of :func:`fit_encoder`."""

    #: The relative change of the full-data loss over an epoch fell below ``rtol``.
    CONVERGED = "converged"
    #: ``num_epochs`` epochs ran without meeting the criterion.
    MAX_EPOCHS = "max_epochs"
    #: The loss became NaN/Inf.
    NONFINITE = "nonfinite"


@dataclass(frozen=True, kw_only=True, repr=False, eq=False)
class EncoderFitResult:
    """Result of :func:`fit_encoder`.

    Attributes
    ----------
    encoder
        The fitted encoder (the object passed in, trained in place).
    loss_trace
        ``(num_epochs + 1,)`` full-data negative log joint $-\\log p(y, z^*, W, B)$ before
        training and after each epoch.
    num_epochs
        Epochs run.
    num_solves
        Fixed-point solves (one per minibatch and one full-data solve per epoch).
    wall_time
        Seconds spent fitting.
    status
        An :class:`EncoderFitStatus`.
    criterion
        What decided the stop, with the numbers.
    """

    encoder: nn.Module
    loss_trace: torch.Tensor
    num_epochs: int
    num_solves: int
    wall_time: float
    status: EncoderFitStatus
    criterion: str

    @property
    def converged(self) -> bool:
        """True when ``status`` is ``CONVERGED``."""
        return self.status is EncoderFitStatus.CONVERGED

    def __repr__(self) -> str:
        return (
            f"EncoderFitResult(status={self.status.name}, loss={float(self.loss_trace[-1]):.10g}, "
            f"num_epochs={self.num_epochs}, num_solves={self.num_solves}, "
            f"wall_time={self.wall_time:.3g} s, criterion={self.criterion!r})"
        )


def encoder_loss(
    encoder: nn.Module, y: torch.Tensor, z: torch.Tensor, *, num_data: int | None = None
) -> torch.Tensor:
    r"""Negative log joint of the encoder's model at $(W, B)$ and latents ``z``.

    With ``num_data`` $= N$ larger than the batch size $n$ the per-datum terms are scaled by
    $N/n$, so that for a uniformly drawn minibatch the loss is an unbiased estimate of the
    full-data negative log joint:

    $$-\log p(W,B)-\tfrac Nn\sum_{s\in\text{batch}}\log p(y_s,z_s\mid W,B).$$

    Both parts come from one trace of the Pyro model
    (:func:`~deqppl.inference.log_joint` with ``data_scale`` $= N/n$).

    Parameters
    ----------
    encoder
        A :class:`~deqppl.encoders.PEDEncoder`; its ``W`` and ``B`` are the model's globals.
    y
        Observations ``(n, obs_dim)``.
    z
        Latents ``(n, latent_dim)``; pass them detached for the envelope gradient.
    num_data
        $N$, the number of rows the minibatch stands for; default ``n``.

    Returns
    -------
    Tensor
        Scalar, differentiable in ``encoder.W``, ``encoder.B`` and ``z``.

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
    n = y.shape[0]
    if num_data is None:
        num_data = n
    if num_data < n:
        raise ValueError(f"num_data={num_data} is smaller than the batch ({n} rows)")
    values = {"W": encoder.W, "B": encoder.B, "z": z}
    data = {"y": y}
    return -log_joint(encoder.model, data, values, data_scale=num_data / n)


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def fit_encoder(
    encoder: nn.Module,
    y: torch.Tensor,
    *,
    num_epochs: int = 200,
    batch_size: int = 128,
    lr: float = 0.02,
    rtol: float | None = None,
    seed: int = 0,
    progress: bool = True,
    warm_start: bool = True,
    callback: Callable[[int, float], None] | None = None,
    optimizer: str = "adam",
) -> EncoderFitResult:
    r"""Fit the globals $(W, B)$ of a PED encoder by joint MAP through the fixed point.

    Minimises the full-data negative log joint of the encoder's Pyro model at the MAP latents
    (SPEC §2.4). With ``optimizer="adam"`` (default) it takes Adam steps on shuffled
    minibatches, each loss rescaled to an unbiased estimate of the full objective
    (:func:`encoder_loss`): the choice for data that do not fit in one batch. With
    ``optimizer="lbfgs"`` it minimises the *profiled* objective
    $P(W,B)=\min_z L(W,B,z)$ full-batch by L-BFGS with a strong-Wolfe line search: every
    evaluation is one warm-started batched solve, and by the envelope theorem (Notes) the
    gradient of $L$ at the detached $z^*$ is the exact gradient of $P$. Eliminating the
    latents leaves a small, well-conditioned problem in $(W, B)$ only, which converges in far
    fewer gradient evaluations than a joint optimiser over $(W, B, z)$ (a variable-projection
    method). The model's Gaussian prior on $W, B$ is part of the loss, i.e. a coupled L2 term,
    not decoupled weight decay.

    Parameters
    ----------
    encoder
        A :class:`~deqppl.encoders.PEDEncoder`, trained in place; its dtype is the fit's.
    y
        Observations ``(N, obs_dim)``, in the model family's support.
    num_epochs
        Maximum number of passes over the data (Adam) or of L-BFGS iterations.
    batch_size
        Rows per Adam step (the last batch of an epoch may be smaller); unused by L-BFGS.
    lr
        Adam's initial learning rate; halved whenever an epoch does not decrease the
        full-data loss. Unused by L-BFGS (its line search sets the step).
    rtol
        Stop when the full-data loss changes by less than ``rtol`` relative over an epoch
        (Adam; default 1e-6) or an iteration (L-BFGS; default ten machine epsilons, as
        :func:`~deqppl.inference.fit_map`). L-BFGS also stops when the largest gradient entry
        falls below the square root of machine epsilon times the loss scale.
    seed
        Seeds the shuffling (a private :class:`torch.Generator`; global RNG untouched).
    progress
        Show a progress bar over epochs.
    warm_start
        Start each datapoint's solve from its last $z^*$ (a per-datapoint cache); cheaper than
        the encoder's initial guess once $(W, B)$ change slowly.
    callback
        Called as ``callback(epoch, loss)`` after each epoch with the full-data loss.
    optimizer
        ``"adam"`` (minibatches) or ``"lbfgs"`` (full batch, profiled objective).

    Returns
    -------
    EncoderFitResult

    Raises
    ------
    ValueError
        Bad ``y`` (shape, support, non-finite) or non-positive settings.
    ConvergenceError
        If a fixed-point solve fails and the encoder has ``throw=True``.

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
    >>> model = ExpFamPCA(family=family("bernoulli"), obs_dim=6, latent_dim=2)
    >>> y = model.simulate(40, seed=0).data["y"].double()
    >>> enc = PEDEncoder(model).double()
    >>> fit = fit_encoder(enc, y, num_epochs=5, batch_size=20, progress=False)
    >>> bool(fit.loss_trace[-1] < fit.loss_trace[0]), fit.num_epochs
    (True, 5)
    """
    if optimizer not in _OPTIMIZERS:
        raise ValueError(
            f"unknown optimizer {optimizer!r}; valid optimizers are: {', '.join(_OPTIMIZERS)}"
        )
    num_epochs = _check_positive_int("num_epochs", num_epochs)
    batch_size = _check_positive_int("batch_size", batch_size)
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be positive and finite, got {lr}")
    if rtol is not None and not (rtol >= 0 and math.isfinite(rtol)):
        raise ValueError(f"rtol must be non-negative and finite, got {rtol}")
    for attr in ("W", "B", "model", "solve"):
        if not hasattr(encoder, attr):
            raise TypeError(f"fit_encoder needs a PEDEncoder-like encoder; {attr!r} is missing")
    y = as_tensor(y, "y")
    y = encoder.model.validate({"y": y})["y"].to(dtype=encoder.W.dtype, device=encoder.W.device)
    num_data = y.shape[0]
    if optimizer == "lbfgs":
        return _fit_lbfgs(
            encoder,
            y,
            max_steps=num_epochs,
            rtol=10 * torch.finfo(y.dtype).eps if rtol is None else rtol,
            progress=progress,
            callback=callback,
        )
    if rtol is None:
        rtol = 1e-6

    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([encoder.W, encoder.B], lr=lr)
    num_solves = 0

    def solve(rows: torch.Tensor, z0: torch.Tensor | None) -> torch.Tensor:
        nonlocal num_solves
        num_solves += 1
        with torch.no_grad():
            return encoder.solve(rows, z0=z0).value

    def full_loss(cache: torch.Tensor | None) -> tuple[float, torch.Tensor]:
        z = solve(y, cache)
        with torch.no_grad():
            return float(encoder_loss(encoder, y, z)), z

    loss, cache = full_loss(None)
    trace = [loss]
    status, criterion = EncoderFitStatus.MAX_EPOCHS, f"ran num_epochs={num_epochs} epochs"
    epochs = 0
    for epoch in _progress(range(num_epochs), enable=progress, desc="fit_encoder"):
        perm = torch.randperm(num_data, generator=gen).to(y.device)
        for idx in perm.split(batch_size):
            rows = y[idx]
            z = solve(rows, cache[idx] if warm_start else None)
            if warm_start:
                cache[idx] = z
            opt.zero_grad()
            encoder_loss(encoder, rows, z, num_data=num_data).backward()
            opt.step()
        epochs = epoch + 1
        new_loss, z_all = full_loss(cache if warm_start else None)
        if warm_start:
            cache = z_all
        trace.append(new_loss)
        if callback is not None:
            callback(epochs, new_loss)
        if not math.isfinite(new_loss):
            status, criterion = EncoderFitStatus.NONFINITE, f"full-data loss {new_loss} at epoch {epochs}"
            break
        change = abs(new_loss - loss) / max(abs(new_loss), 1e-300)
        if change < rtol:
            status = EncoderFitStatus.CONVERGED
            criterion = f"relative loss change {change:.3g} < rtol={rtol:g} at epoch {epochs}"
            break
        if new_loss >= loss:
            for group in opt.param_groups:
                group["lr"] *= _DECAY
        loss = new_loss
    return EncoderFitResult(
        encoder=encoder,
        loss_trace=torch.tensor(trace, dtype=torch.float64),
        num_epochs=epochs,
        num_solves=num_solves,
        wall_time=time.perf_counter() - start,
        status=status,
        criterion=criterion,
    )


def _fit_lbfgs(
    encoder: nn.Module,
    y: torch.Tensor,
    *,
    max_steps: int,
    rtol: float,
    progress: bool,
    callback: Callable[[int, float], None] | None,
) -> EncoderFitResult:
    """Full-batch L-BFGS on the profiled objective min_z L(W, B, z) (see fit_encoder)."""
    start = time.perf_counter()
    params = [encoder.W, encoder.B]
    opt = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=1,
        # as fit_map: leave the strong-Wolfe search its default 25 trial points per step
        max_eval=26,
        history_size=20,
        tolerance_grad=0.0,
        tolerance_change=0.0,
        line_search_fn="strong_wolfe",
    )
    state: dict[str, object] = {"z": None, "solves": 0}
    # A trial point whose solve fails or overflows gets this loss and a zero gradient, so the
    # line search backtracks (as in fit_map; max**0.3 keeps its cubic interpolation finite).
    big = torch.finfo(y.dtype).max ** 0.3

    def closure() -> torch.Tensor:
        opt.zero_grad()
        state["solves"] += 1
        with torch.no_grad():
            sol = encoder.solve(y, z0=state["z"], throw=False)
        if not bool(sol.converged.all()) and state["z"] is not None:
            with torch.no_grad():  # a far trial point: retry from the initial guess
                sol = encoder.solve(y, throw=False)
        z = sol.value.detach()
        loss = encoder_loss(encoder, y, z)
        ok = bool(sol.converged.all()) and bool(torch.isfinite(loss))
        if ok:
            loss.backward()
            ok = all(bool(torch.isfinite(p.grad).all()) for p in params)
        if not ok:
            for p in params:
                p.grad = torch.zeros_like(p)
            return torch.tensor(big, dtype=y.dtype)
        state["z"] = z
        state["loss"] = float(loss.detach())
        return loss.detach()

    loss = float(closure())
    if loss >= big:
        raise ValueError(
            "the fixed-point solve did not converge at the initial W, B; "
            "initialise the encoder closer to the data (e.g. from a fit_map result)"
        )
    trace = [loss]
    status, criterion = EncoderFitStatus.MAX_EPOCHS, f"ran max_steps={max_steps} L-BFGS steps"
    gtol = math.sqrt(torch.finfo(y.dtype).eps)
    steps = 0
    for step in _progress(range(max_steps), enable=progress, desc="fit_encoder (L-BFGS)"):
        opt.step(closure)
        steps = step + 1
        # the last closure evaluation of the line search is at the accepted point
        new_loss = float(closure())
        trace.append(new_loss)
        if callback is not None:
            callback(steps, new_loss)
        if not math.isfinite(new_loss) or new_loss >= big:
            status = EncoderFitStatus.NONFINITE
            criterion = f"profiled loss non-finite or solve failed at step {steps}"
            break
        gmax = max(float(p.grad.abs().max()) for p in params)
        change = abs(new_loss - loss) / max(abs(new_loss), 1e-300)
        if change <= rtol:
            status = EncoderFitStatus.CONVERGED
            criterion = f"relative loss change {change:.3g} <= rtol={rtol:.3g} at step {steps}"
            break
        if gmax <= gtol * max(1.0, abs(new_loss) / y.numel()):
            status = EncoderFitStatus.CONVERGED
            criterion = f"max |gradient| {gmax:.3g} <= {gtol:.3g} (x loss scale) at step {steps}"
            break
        loss = new_loss
    return EncoderFitResult(
        encoder=encoder,
        loss_trace=torch.tensor(trace, dtype=torch.float64),
        num_epochs=steps,
        num_solves=int(state["solves"]),
        wall_time=time.perf_counter() - start,
        status=status,
        criterion=criterion,
    )
