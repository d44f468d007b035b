"""Shared by the kGLM experiments: full-batch Adam through the implicit adjoint, a resumable store."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch

# a run whose test MSE exceeds this (or is not finite, or whose forward solve fails) diverged
DIVERGED_MSE = 1e6


def train(predict, params, y_train, t_train, y_test, t_test, *, num_epochs: int, lr: float) -> dict:
    """Adam on the MSE of ``predict(y) -> (prediction, Solution)``; every parameter trained.

    Returns ``{"test_mse": [...per epoch, epoch 0 = at initialisation], "diverged": bool,
    "diverged_at": epoch or None}``.
    """
    opt = torch.optim.Adam(params, lr=lr)
    history: list[float] = []

    def test_mse() -> float:
        with torch.no_grad():
            pred, sol = predict(y_test)
        if not bool(sol.converged.all()):
            return math.inf
        return float(((pred - t_test) ** 2).mean())

    for epoch in range(num_epochs + 1):
        mse = test_mse()
        history.append(mse)
        if not math.isfinite(mse) or mse > DIVERGED_MSE:
            return {"test_mse": history, "diverged": True, "diverged_at": epoch}
        if epoch == num_epochs:
            break
        opt.zero_grad()
        pred, sol = predict(y_train)
        if not bool(sol.converged.all()):
            return {"test_mse": history, "diverged": True, "diverged_at": epoch}
        loss = ((pred - t_train) ** 2).mean()
        loss.backward()
        if not all(torch.isfinite(p.grad).all() for p in params if p.grad is not None):
            return {"test_mse": history, "diverged": True, "diverged_at": epoch}
        opt.step()
    return {"test_mse": history, "diverged": False, "diverged_at": None}


def load(path: Path) -> dict | None:
    """A finished unit's result, or None."""
    return json.loads(path.read_text()) if path.exists() else None


def save(path: Path, result: dict) -> None:
    """Write one finished unit atomically (resumable runs skip it next time)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(result, fh)
    os.replace(tmp, path)
