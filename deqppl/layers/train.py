"""Training and evaluating classifiers that contain implicit layers, with the cone invariant
verified after every optimiser step and every solve's cost and failures recorded."""

from __future__ import annotations

import enum
import math
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._progress import progress as progress_bar
from .._validation import check_finite
from ..deq import ConvergenceError, ConvergenceWarning
from ._base import AbstractImplicitLayer
from .architectures import ImageInput

__all__ = ["FitStatus", "EpochStats", "ClassifierFit", "Evaluation", "fit_classifier",
           "evaluate_classifier", "implicit_layers"]


class FitStatus(enum.Enum):
    """Outcome of `fit_classifier`."""

    #: Every epoch ran; the loss stayed finite.
    COMPLETED = "completed"
    #: The loss or a gradient became non-finite; training stopped at that step.
    NONFINITE = "nonfinite"
    #: A solve raised `deqppl.deq.ConvergenceError` (a layer built with ``throw=True``).
    SOLVER_FAILED = "solver_failed"


@dataclass(frozen=True, kw_only=True)
class EpochStats:
    """One training epoch.

    Attributes
    ----------
    loss
        Mean training cross-entropy over the epoch's batches.
    accuracy
        Training accuracy over the epoch (on the fly, before each step).
    wall_time
        Seconds for the epoch.
    forward_steps, backward_steps
        Mean solver steps per forward solve and per adjoint solve (over implicit layers and
        batches; ``nan`` for a model without implicit layers).
    forward_failed
        Samples whose forward solve did not converge, summed over batches and layers.
    backward_failed
        Adjoint solves that did not converge for every sample.
    skipped_steps
        Optimiser steps skipped because a gradient was non-finite (``skip_nonfinite_steps``).
    min_weight
        Smallest effective cone weight after the epoch's last step (``nan`` without cones).
    """

    epoch: int
    loss: float
    accuracy: float
    wall_time: float
    forward_steps: float
    backward_steps: float
    forward_failed: int
    backward_failed: int
    skipped_steps: int
    min_weight: float


@dataclass(frozen=True, kw_only=True, eq=False)
class ClassifierFit:
    """Result of `fit_classifier`: per-epoch statistics and the outcome."""

    epochs: tuple[EpochStats, ...]
    status: FitStatus
    message: str
    num_parameters: int

    @property
    def forward_failed(self) -> int:
        return sum(e.forward_failed for e in self.epochs)

    @property
    def backward_failed(self) -> int:
        return sum(e.backward_failed for e in self.epochs)

    @property
    def skipped_steps(self) -> int:
        return sum(e.skipped_steps for e in self.epochs)

    def mean(self, name: str) -> float:
        """Mean of an `EpochStats` field over epochs (``nan`` if none)."""
        values = [getattr(e, name) for e in self.epochs]
        values = [v for v in values if not math.isnan(v)]
        return sum(values) / len(values) if values else math.nan


@dataclass(frozen=True, kw_only=True)
class Evaluation:
    """Result of `evaluate_classifier`."""

    accuracy: float
    loss: float
    forward_steps: float
    forward_failed: int
    num_samples: int


def implicit_layers(model: nn.Module) -> list[AbstractImplicitLayer]:
    """The implicit layers inside ``model`` (itself included), in module order."""
    return [m for m in model.modules() if isinstance(m, AbstractImplicitLayer)]


def _check_data(model, x, labels, num_classes_name="labels"):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point torch.Tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be an integer torch.Tensor, got "
                        f"{getattr(labels, 'dtype', type(labels).__name__)}")
    if labels.ndim != 1 or labels.shape[0] != x.shape[0]:
        raise ValueError(f"labels must have shape ({x.shape[0]},) to match x, got "
                         f"{tuple(labels.shape)}")
    if x.shape[0] == 0:
        raise ValueError("x is empty; at least one sample is needed")
    if bool((labels < 0).any()):
        raise ValueError(f"labels must be >= 0, got {int(labels.min())}")
    check_finite(x, "x")
    # models built by deqppl.layers.architectures check the image shape up front
    for module in model.modules():
        if isinstance(module, ImageInput):
            module.check(x)


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_real(name, value, minimum, strict):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (value <= minimum if strict else value < minimum):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {minimum}, "
                         f"got {value!r}")


def _enforce_cones(model: nn.Module) -> float:
    """Project every cone-constrained layer and verify the invariant; the smallest weight."""
    low = math.inf
    for module in model.modules():
        if hasattr(module, "check_cone") and hasattr(module, "project_"):
            module.project_()
            module.check_cone()  # raises RuntimeError if an effective weight is negative
            low = min(low, module.min_weight())
    return low if low < math.inf else math.nan


def fit_classifier(
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_epochs: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    skip_nonfinite_steps: bool = False,
    progress: bool = False,
) -> ClassifierFit:
    """Train ``model`` (logits ``(B, K)``) by AdamW on the cross-entropy of ``labels``.

    After **every** optimiser step each cone-constrained layer is projected (a no-op unless it
    uses `ProjectedCone`) and its invariant, every effective weight $\\ge 0$, is verified; a
    violation raises ``RuntimeError``. Forward and adjoint solver steps and failures of every
    implicit layer are recorded per epoch; adjoint failures reported as
    `deqppl.deq.ConvergenceWarning` (layers with ``ImplicitAdjoint(throw=False)``) are counted,
    not shown. A non-finite loss stops training with status ``NONFINITE``; a
    `deqppl.deq.ConvergenceError` (layers with ``throw=True``) stops it with ``SOLVER_FAILED``.

    Parameters
    ----------
    model
        Module mapping ``x`` to logits.
    x
        Inputs ``(n, ...)``, the model's dtype.
    labels
        Integer classes ``(n,)``.
    num_epochs, batch_size, lr, weight_decay
        AdamW settings (Loshchilov & Hutter, 2019, ICLR), as in the paper's protocol.
    seed
        Seed of the batch order.
    skip_nonfinite_steps
        Skip (and count) an optimiser step whose gradient is non-finite instead of stopping.
        The DEQ core gives NaN derivatives for samples whose forward solve did not converge,
        so this lets a model that fails on some samples keep training, with the loss recorded.
    progress
        Show a progress bar over epochs.

    Returns
    -------
    ClassifierFit

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from deqppl.layers import PCDEQLinear
    >>> x = torch.randn(32, 4, dtype=torch.float64)
    >>> labels = (x[:, 0] > 0).long()
    >>> net = nn.Sequential(PCDEQLinear(4, 8, dtype=torch.float64), nn.Linear(8, 2).double())
    >>> fit = fit_classifier(net, x, labels, num_epochs=2, batch_size=16, lr=1e-2)
    >>> fit.status.name, len(fit.epochs), fit.epochs[-1].min_weight >= 0
    ('COMPLETED', 2, True)
    """
    _check_data(model, x, labels)
    _check_int("num_epochs", num_epochs, 1)
    _check_int("batch_size", batch_size, 1)
    _check_real("lr", lr, 0.0, strict=True)
    _check_real("weight_decay", weight_decay, 0.0, strict=False)
    if not isinstance(skip_nonfinite_steps, bool):
        raise TypeError(f"skip_nonfinite_steps must be a bool, got {skip_nonfinite_steps!r}")
    layers = implicit_layers(model)
    _enforce_cones(model)  # verified before training starts too
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    epochs: list[EpochStats] = []
    status, message = FitStatus.COMPLETED, ""
    model.train()
    for epoch in progress_bar(range(num_epochs), enable=progress, desc="epochs"):
        start = time.perf_counter()
        order = torch.randperm(n, generator=generator)
        losses, correct = [], 0
        f_steps, f_failed, b_failed, skipped = [], 0, 0, 0
        b_steps: list[int] = []  # steps of every adjoint linear solve (from Solution.adjoint_log)
        min_weight = math.nan
        stop = False
        for begin in range(0, n, batch_size):
            idx = order[begin:begin + batch_size]
            optimizer.zero_grad(set_to_none=True)
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", ConvergenceWarning)
                    logits = model(x[idx])
                    for layer in layers:
                        sol = layer.last_solution.solution
                        f_steps.append(sol.num_steps)
                        f_failed += sol.num_failed
                    loss = F.cross_entropy(logits, labels[idx])
                    if not bool(torch.isfinite(loss.detach())):
                        status, message = FitStatus.NONFINITE, (
                            f"the loss became {float(loss.detach())} at epoch {epoch}, batch "
                            f"{begin // batch_size}")
                        stop = True
                        break
                    loss.backward()
                del caught  # adjoint failures are counted from the adjoint logs instead
                for layer in layers:
                    for solve in layer.last_solution.backward_solves():
                        b_steps.append(solve.num_steps)
                        b_failed += int(not bool(solve.converged.all()))
            except ConvergenceError as err:
                status, message = FitStatus.SOLVER_FAILED, str(err)
                stop = True
                break
            grads_ok = all(p.grad is None or bool(torch.isfinite(p.grad).all())
                           for p in model.parameters())
            if not grads_ok and skip_nonfinite_steps:
                skipped += 1
                losses.append(float(loss.detach()))
                correct += int((logits.argmax(1) == labels[idx]).sum())
                continue
            if not grads_ok:
                status, message = FitStatus.NONFINITE, (
                    f"a gradient became non-finite at epoch {epoch}, batch {begin // batch_size}"
                    f" (the DEQ core gives NaN derivatives for samples whose forward solve did "
                    f"not converge; skip_nonfinite_steps=True skips such steps)")
                stop = True
                break
            optimizer.step()
            min_weight = _enforce_cones(model)
            losses.append(float(loss.detach()))
            correct += int((logits.argmax(1) == labels[idx]).sum())
        epochs.append(EpochStats(
            epoch=epoch, loss=sum(losses) / len(losses) if losses else math.nan,
            accuracy=correct / n, wall_time=time.perf_counter() - start,
            forward_steps=sum(f_steps) / len(f_steps) if f_steps else math.nan,
            backward_steps=sum(b_steps) / len(b_steps) if b_steps else math.nan,
            forward_failed=f_failed, backward_failed=b_failed, skipped_steps=skipped,
            min_weight=min_weight))
        if stop:
            break
    model.eval()
    num_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ClassifierFit(epochs=tuple(epochs), status=status, message=message,
                         num_parameters=num_parameters)


@torch.no_grad()
def evaluate_classifier(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, *,
                        batch_size: int = 256) -> Evaluation:
    """Accuracy, loss, mean forward steps and forward failures of ``model`` on ``(x, labels)``.

    Solves run with ``throw=False`` semantics only if the layers were built so; a layer with
    ``throw=True`` raises `deqppl.deq.ConvergenceError` on a failed sample.
    """
    _check_data(model, x, labels)
    _check_int("batch_size", batch_size, 1)
    layers = implicit_layers(model)
    model.eval()
    correct, total_loss, steps, failed = 0, 0.0, [], 0
    for begin in range(0, x.shape[0], batch_size):
        xb, yb = x[begin:begin + batch_size], labels[begin:begin + batch_size]
        logits = model(xb)
        for layer in layers:
            steps.append(layer.last_solution.solution.num_steps)
            failed += layer.last_solution.solution.num_failed
        total_loss += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    n = x.shape[0]
    return Evaluation(accuracy=correct / n, loss=total_loss / n,
                      forward_steps=sum(steps) / len(steps) if steps else math.nan,
                      forward_failed=failed, num_samples=n)
