"""A directory of finished units of work, so that an interrupted comparison resumes.

A unit is one (model, method, seed, stage). :class:`RunStore` writes each finished unit as
soon as it finishes: ``<unit>.json`` (the metrics, for people) and then ``<unit>.pt`` (everything,
``torch.save`` of tensors, numbers and strings only, read back with ``weights_only=True``),
each written to a temporary file and renamed into place, so a unit is either complete or
absent. The ``.pt`` file is the record; a unit counts as done once it exists.

Each record carries a fingerprint of what produced it (model, method settings, data, seed and,
for held-out units, the shared globals); loading a unit whose fingerprint differs raises rather
than silently mixing runs.

Examples
--------
>>> import tempfile, torch
>>> from deqppl.harness.methods import StageResult
>>> store = RunStore(tempfile.mkdtemp())
>>> unit = Unit(model="m", method="lbfgs", seed=0, stage="fit")
>>> result = StageResult(values={"z": torch.zeros(2, 1)}, log_joint=-1.0, wall_time=0.1,
...                      num_steps=3, num_grad_evals=4, status="converged", converged=True)
>>> store.save(unit, result, fingerprint="abc")
>>> unit in store, store.load(unit, fingerprint="abc").num_steps
(True, 3)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from deqppl.harness.methods import StageResult

__all__ = ["RunStore", "Unit"]

_FORMAT = "deqppl.harness.StageResult/1"


@dataclass(frozen=True)
class Unit:
    """One unit of work of a comparison: (model, method, seed, stage)."""

    model: str
    method: str
    seed: int
    stage: str


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_")[:80] or "_"


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class RunStore:
    """Finished units of a comparison, one record per unit, under ``path``.

    Parameters
    ----------
    path
        Directory (created on first write).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunStore({str(self.path)!r})"

    def _stem(self, unit: Unit) -> Path:
        # Model descriptions can be long and hold any character: a readable prefix plus a hash.
        digest = hashlib.sha256(unit.model.encode()).hexdigest()[:10]
        folder = f"{_slug(unit.model)[:40]}-{digest}"
        return self.path / folder / _slug(unit.method) / f"seed{int(unit.seed)}" / _slug(unit.stage)

    def __contains__(self, unit: Unit) -> bool:
        return self._stem(unit).with_suffix(".pt").exists()

    def units(self) -> list[Path]:
        """Paths of every record in the store."""
        return sorted(self.path.rglob("*.pt")) if self.path.exists() else []

    def save(self, unit: Unit, result: StageResult, *, fingerprint: str) -> None:
        """Write ``result`` for ``unit`` atomically (JSON metrics, then the ``.pt`` record)."""
        stem = self._stem(unit)
        metrics = {
            "unit": {"model": unit.model, "method": unit.method, "seed": int(unit.seed), "stage": unit.stage},
            "fingerprint": fingerprint,
            "log_joint": float(result.log_joint),
            "wall_time": float(result.wall_time),
            "num_steps": int(result.num_steps),
            "num_grad_evals": int(result.num_grad_evals),
            "status": str(result.status),
            "converged": bool(result.converged),
            "extra": {k: float(v) for k, v in result.extra.items()},
        }
        payload = {
            "format": _FORMAT,
            **metrics,
            "extra": dict(metrics["extra"]),
            "unit": dict(metrics["unit"]),
            "values": {k: v.detach().cpu().clone() for k, v in result.values.items()},
            "per_sample_converged": (
                None
                if result.per_sample_converged is None
                else result.per_sample_converged.detach().cpu().clone()
            ),
            "trace": result.trace.detach().cpu().clone(),
        }

        def write_json(tmp: str) -> None:
            Path(tmp).write_text(json.dumps(metrics, indent=2, allow_nan=True), encoding="utf-8")

        _atomic_write(stem.with_suffix(".json"), write_json)
        _atomic_write(stem.with_suffix(".pt"), lambda tmp: torch.save(payload, tmp))

    def load(self, unit: Unit, *, fingerprint: str | None = None) -> StageResult:
        """Read the record of ``unit``.

        Raises
        ------
        KeyError
            If the unit is not in the store.
        ValueError
            If the record is not a stored StageResult, or its fingerprint differs from
            ``fingerprint`` (the store holds a different run: use a fresh directory).
        """
        path = self._stem(unit).with_suffix(".pt")
        if not path.exists():
            raise KeyError(f"{unit} is not in {self!r}")
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
            raise ValueError(f"{str(path)!r} is not a unit written by RunStore")
        if fingerprint is not None and payload["fingerprint"] != fingerprint:
            raise ValueError(
                f"{str(path)!r} holds {unit} of a different run (other data, settings or shared "
                f"globals: fingerprint {payload['fingerprint'][:12]} != {fingerprint[:12]}); "
                f"use a fresh store directory or delete it"
            )
        return StageResult(
            values=dict(payload["values"]),
            log_joint=payload["log_joint"],
            wall_time=payload["wall_time"],
            num_steps=payload["num_steps"],
            num_grad_evals=payload["num_grad_evals"],
            status=payload["status"],
            converged=payload["converged"],
            per_sample_converged=payload["per_sample_converged"],
            trace=payload["trace"],
            extra=dict(payload["extra"]),
        )
