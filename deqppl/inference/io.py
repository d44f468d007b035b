"""Saving and loading :class:`~deqppl.inference.map.MAPResult` (tensors and plain metadata only)."""

from __future__ import annotations

import os

import torch

from deqppl.inference.map import MAPResult, MAPStatus

__all__ = ["load_map", "save_map"]

_FORMAT = "deqppl.MAPResult/1"


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
            "method": str(result.method),
        },
        path,
    )


def load_map(path: str | os.PathLike) -> MAPResult:
    """Read a file written by :func:`save_map` with ``torch.load(..., weights_only=True)``.

    Raises
    ------
    ValueError
        If the file is not a saved ``MAPResult``.
    """
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a MAPResult written by save_map")
    return MAPResult(
        values=dict(payload["values"]),
        log_joint=payload["log_joint"],
        loss_trace=payload["loss_trace"],
        num_steps=payload["num_steps"],
        num_grad_evals=payload["num_grad_evals"],
        wall_time=payload["wall_time"],
        status=MAPStatus(payload["status"]),
        criterion=payload["criterion"],
        method=payload["method"],
    )
