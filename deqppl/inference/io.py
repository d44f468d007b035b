"""Saving and loading :class:`~deqppl.inference.map.MAPResult` (tensors and plain metadata only)."""

from __future__ import annotations

import dataclasses
import os

import torch

from deqppl import optim
from deqppl.inference.map import MAPResult
from deqppl.optim import FitStatus

__all__ = ["load_map", "save_map"]

_FORMAT = "deqppl.MAPResult/2"
# The settings classes a saved result may name (optimisers and the schedules they hold).
_CLASSES = {
    cls.__name__: cls
    for cls in (
        optim.LBFGS, optim.SVI, optim.Adam, optim.PlateauDecay, optim.ExponentialDecay,
        optim.CosineDecay, optim.ConstantLR,
    )
}


def _encode(obj: object) -> object:
    if dataclasses.is_dataclass(obj) and type(obj).__name__ in _CLASSES:
        fields = {f.name: _encode(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        return {"class": type(obj).__name__, "fields": fields}
    if isinstance(obj, tuple):
        return {"tuple": [_encode(v) for v in obj]}
    return obj


def _decode(obj: object) -> object:
    if isinstance(obj, dict) and "class" in obj:
        fields = {k: _decode(v) for k, v in obj["fields"].items()}
        return _CLASSES[obj["class"]](**fields)
    if isinstance(obj, dict) and "tuple" in obj:
        return tuple(_decode(v) for v in obj["tuple"])
    return obj


def save_map(result: MAPResult, path: str | os.PathLike) -> None:
    """Write ``result`` with ``torch.save`` as a dict of tensors, strings and numbers.

    Examples
    --------
    >>> import tempfile, os, torch
    >>> from deqppl.expfam import family
    >>> from deqppl.models import ExpFamPCA
    >>> from deqppl.inference import fit_map
    >>> model = ExpFamPCA(family=family("bernoulli"), obs_dim=3, latent_dim=1)
    >>> fit = fit_map(model, model.simulate(5, seed=0).data, progress=False)
    >>> path = os.path.join(tempfile.mkdtemp(), "fit.pt")
    >>> save_map(fit, path)
    >>> load_map(path).status == fit.status
    True
    """
    torch.save(
        {
            "format": _FORMAT,
            "values": {k: v.detach().cpu() for k, v in result.values.items()},
            "log_joint": result.log_joint.detach().cpu(),
            "loss_trace": result.loss_trace.detach().cpu(),
            "num_steps": int(result.num_steps),
            "num_grad_evals": int(result.num_grad_evals),
            "wall_time": float(result.wall_time),
            "status": result.status.value,
            "criterion": str(result.criterion),
            "grad_norm": float(result.grad_norm),
            "optimizer": _encode(result.optimizer),
        },
        path,
    )


def load_map(path: str | os.PathLike) -> MAPResult:
    """Read a file written by :func:`save_map` with ``torch.load(..., weights_only=True)``.

    Raises
    ------
    ValueError
        If the file is not a saved ``MAPResult`` (of this format version).
    """
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise ValueError(
            f"{os.fspath(path)!r} is not a MAPResult written by save_map (format {_FORMAT})"
        )
    return MAPResult(
        values=dict(payload["values"]),
        log_joint=payload["log_joint"],
        loss_trace=payload["loss_trace"],
        num_steps=payload["num_steps"],
        num_grad_evals=payload["num_grad_evals"],
        wall_time=payload["wall_time"],
        status=FitStatus(payload["status"]),
        criterion=payload["criterion"],
        grad_norm=payload["grad_norm"],
        optimizer=_decode(payload["optimizer"]),
    )
