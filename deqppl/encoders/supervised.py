r"""PED latents as the backbone of a supervised model, fine-tuned through the fixed point.

The downstream use of Tsuchida & Ong (2023, AISTATS, §5 and Figure 7): the MAP latents
$z^*(y; W, B)$ of an exponential-family PCA feed a small network, and the supervised loss is
differentiated through $z^*$ by the implicit function theorem. Unlike the unsupervised fit
(:func:`~deqppl.encoders.fit_encoder`), the supervised loss is not the objective whose
stationary point $z^*$ is, so the envelope shortcut does not apply and the implicit adjoint is
needed (SPEC §2.4).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from deqppl._progress import progress as _progress
from deqppl._validation import as_tensor, check_finite
from deqppl.deq import NoAdjoint

__all__ = ["SupervisedFitResult", "SupervisedPED", "fit_supervised"]

#: Hidden width of the default head (SPEC §2.6: Linear(l, 100)-ReLU-Linear(100, out)).
HIDDEN = 100


class SupervisedPED(nn.Module):
    r"""A supervised model ``head(z*(y))`` with a PED encoder as backbone.

    Parameters
    ----------
    encoder
        A :class:`~deqppl.encoders.PEDEncoder` (typically fitted by
        :func:`~deqppl.encoders.fit_encoder`), or any module mapping ``y (n, d)`` to
        ``(z (n, l), Solution)`` or to ``z``; it is a submodule, so its parameters are
        fine-tuned with the head through the encoder's adjoint (the PEDEncoder default is
        :class:`~deqppl.deq.ImplicitAdjoint` with an exact Newton adjoint solve, suited to
        small $l$).
    head
        Module from ``(n, l)`` latents to predictions; default
        ``Linear(l, 100)-ReLU-Linear(100, out_dim)`` in the encoder's dtype.
    out_dim
        Output width of the default head.
    seed
        Seeds the default head's initialisation (global RNG state restored).

    Examples
    --------
    >>> import torch
    >>> from deqppl.encoders import PEDEncoder
    >>> from deqppl.expfam import gaussian
    >>> from deqppl.models import ExpFamPCA
    >>> model = ExpFamPCA(family=gaussian(), obs_dim=5, latent_dim=2)
    >>> net = SupervisedPED(PEDEncoder(model).double())
    >>> y = torch.randn(3, 5, dtype=torch.float64)
    >>> net(y).shape
    torch.Size([3, 1])
    >>> net(y).sum().backward()  # through the fixed point into W
    >>> net.encoder.W.grad.shape
    torch.Size([5, 2])
    """

    def __init__(
        self, encoder: nn.Module, head: nn.Module | None = None, *, out_dim: int = 1, seed: int = 0
    ) -> None:
        super().__init__()
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be an nn.Module, got {type(encoder).__name__}")
        if isinstance(out_dim, bool) or not isinstance(out_dim, int) or out_dim < 1:
            raise ValueError(f"out_dim must be a positive integer, got {out_dim!r}")
        if isinstance(getattr(encoder, "adjoint", None), NoAdjoint):
            raise ValueError(
                "the encoder has adjoint=NoAdjoint(), so no gradient would reach its parameters;"
                " use ImplicitAdjoint (the PEDEncoder default) or fit with freeze_backbone=True"
            )
        self.encoder = encoder
        if head is None:
            params = list(encoder.parameters())
            dtype = params[0].dtype if params else torch.get_default_dtype()
            latent_dim = int(encoder.model.latent_dim)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                head = nn.Sequential(
                    nn.Linear(latent_dim, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, out_dim)
                ).to(dtype)
        elif not isinstance(head, nn.Module):
            raise TypeError(f"head must be an nn.Module, got {type(head).__name__}")
        self.head = head

    def latents(self, y: torch.Tensor) -> torch.Tensor:
        """Backbone features ``(n, l)``: the encoder's output (its latents $z^*$)."""
        out = self.encoder(y)
        return out[0] if isinstance(out, tuple) else out

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """Predictions ``head(z*(y))`` for observations ``y`` ``(n, obs_dim)``."""
        return self.head(self.latents(y))


@dataclass(frozen=True, kw_only=True, repr=False, eq=False)
class SupervisedFitResult:
    """Result of :func:`fit_supervised`.

    Attributes
    ----------
    model
        The fitted model (trained in place).
    loss_trace
        ``(num_epochs,)`` mean squared error over each epoch's minibatches.
    num_epochs
        Epochs run.
    wall_time
        Seconds spent fitting.
    """

    model: nn.Module
    loss_trace: torch.Tensor
    num_epochs: int
    wall_time: float

    def __repr__(self) -> str:
        return (
            f"SupervisedFitResult(num_epochs={self.num_epochs}, "
            f"final_loss={float(self.loss_trace[-1]):.6g}, wall_time={self.wall_time:.3g} s)"
        )


def fit_supervised(
    model: nn.Module,
    y: torch.Tensor,
    target: torch.Tensor,
    *,
    num_epochs: int = 30,
    batch_size: int = 500,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
    freeze_backbone: bool = False,
) -> SupervisedFitResult:
    r"""Train ``model`` (e.g. :class:`SupervisedPED`) by Adam on the mean squared error.

    Parameters
    ----------
    model
        Module mapping ``y (n, d)`` to predictions ``(n, k)``; with an ``encoder`` attribute
        and ``freeze_backbone`` only its ``head`` is trained.
    y
        Inputs ``(N, d)``.
    target
        Targets ``(N,)`` or ``(N, k)``.
    num_epochs, batch_size, lr
        Epochs, rows per Adam step, Adam's learning rate (SPEC §2.6 uses 30, 500 and 1e-3).
    seed
        Seeds the shuffling (private :class:`torch.Generator`).
    progress
        Show a progress bar over epochs.
    freeze_backbone
        Train the head only, on latents computed once (a frozen feature extractor).

    Returns
    -------
    SupervisedFitResult

    Raises
    ------
    ValueError
        Mismatched rows, non-finite values or non-positive settings.

    Examples
    --------
    >>> import torch
    >>> from deqppl.encoders import PEDEncoder
    >>> from deqppl.expfam import gaussian
    >>> from deqppl.models import ExpFamPCA
    >>> model = ExpFamPCA(family=gaussian(), obs_dim=5, latent_dim=2)
    >>> net = SupervisedPED(PEDEncoder(model).double())
    >>> y = torch.randn(20, 5, dtype=torch.float64)
    >>> fit = fit_supervised(net, y, y[:, 0], num_epochs=3, batch_size=10, progress=False)
    >>> fit.loss_trace.shape
    torch.Size([3])
    """
    for name, value in (("num_epochs", num_epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be positive and finite, got {lr}")
    params = list(model.parameters())
    dtype = params[0].dtype if params else torch.get_default_dtype()
    y = as_tensor(y, "y", dtype=dtype)
    target = as_tensor(target, "target", dtype=dtype)
    check_finite(y, "y")
    check_finite(target, "target")
    if y.ndim != 2:
        raise ValueError(f"y must have shape (N, d), got {tuple(y.shape)}")
    if target.ndim == 1:
        target = target[:, None]
    if target.ndim != 2 or target.shape[0] != y.shape[0]:
        raise ValueError(
            f"target must have shape (N,) or (N, k) with N = {y.shape[0]} rows of y, "
            f"got {tuple(target.shape)}"
        )
    if freeze_backbone:
        if not (hasattr(model, "latents") and hasattr(model, "head")):
            raise TypeError("freeze_backbone needs a model with latents() and head (SupervisedPED)")
        with torch.no_grad():
            inputs = model.latents(y)
        forward, trained = model.head, list(model.head.parameters())
    else:
        inputs, forward, trained = y, model, params

    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(trained, lr=lr)
    trace = []
    for _ in _progress(range(num_epochs), enable=progress, desc="fit_supervised"):
        perm = torch.randperm(y.shape[0], generator=gen).to(y.device)
        total = 0.0
        for idx in perm.split(batch_size):
            opt.zero_grad()
            loss = torch.mean((forward(inputs[idx]) - target[idx]) ** 2)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        trace.append(total / y.shape[0])
    return SupervisedFitResult(
        model=model,
        loss_trace=torch.tensor(trace, dtype=torch.float64),
        num_epochs=num_epochs,
        wall_time=time.perf_counter() - start,
    )
