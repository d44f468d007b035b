"""Saving and loading :class:`~deqppl.inference.map.MAPResult` (tensors and plain metadata only).

Files are read with ``torch.load(..., weights_only=True)``, which never runs code from the file.
Whatever that unpickler refuses, and any file whose content is not what :func:`save_map`
writes, raises :class:`CorruptFileError` (a ``ValueError``) naming the file; torch's own message
is not passed on, since it suggests ``weights_only=False``, which would run arbitrary code from
a file nobody vouches for. :func:`load_torch_file` is that safe reader, shared with the run store
(:mod:`deqppl.harness.store`).
"""

from __future__ import annotations

import dataclasses
import enum
import io
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from deqppl import optim
from deqppl.inference.map import MAPResult
from deqppl.optim import FitStatus

__all__ = ["CorruptFileError", "load_map", "load_torch_file", "save_map"]

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


def _decode(obj: object, path: Path) -> object:
    """Rebuild the settings objects; an unknown class or a refused setting means a bad file."""
    if isinstance(obj, dict) and "class" in obj:
        name, fields = obj.get("class"), obj.get("fields")
        if name not in _CLASSES or not isinstance(fields, dict):
            raise CorruptFileError(
                path, f"its optimizer names an unknown settings class {name!r} (known: {sorted(_CLASSES)})"
            )
        try:
            return _CLASSES[name](**{k: _decode(v, path) for k, v in fields.items()})
        except (TypeError, ValueError) as err:
            raise CorruptFileError(path, f"its optimizer settings are refused: {err}") from None
    if isinstance(obj, dict) and "tuple" in obj:
        return tuple(_decode(v, path) for v in obj["tuple"])
    return obj


class CorruptFileError(ValueError):
    """A file is damaged, altered or not a deqppl file; ``.path`` names it, ``.reason`` says why.

    A subclass of ``ValueError``, so callers that catch ``ValueError`` keep working.
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{os.fspath(path)!r} is not a readable deqppl file: {reason}")


def load_torch_file(path: str | os.PathLike) -> object:
    """Read ``path`` with ``torch.load(..., weights_only=True)`` onto the CPU.

    The bytes are read first, so genuine OS errors (a missing file, permissions, a directory)
    surface as themselves; any failure of the unpickler afterwards means the file is truncated,
    garbage or holds objects other than tensors, numbers, strings and containers.

    Raises
    ------
    FileNotFoundError, IsADirectoryError, PermissionError
        From reading the file.
    CorruptFileError
        (a ``ValueError``) naming the file if it is empty or cannot be unpickled safely.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.pt"
    >>> _ = p.write_bytes(b"PK\\x03\\x04 truncated")
    >>> load_torch_file(p)
    Traceback (most recent call last):
    ...
    deqppl.inference.io.CorruptFileError: '.../x.pt' is not a readable deqppl file: it cannot be read ...
    """
    path = Path(path)
    data = path.read_bytes()
    if not data:
        raise CorruptFileError(path, "the file is empty")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every unpickling failure means "not our file"
        raise CorruptFileError(
            path,
            f"it cannot be read as a torch file of tensors, numbers and strings "
            f"({type(err).__name__}; {len(data)} bytes: truncated, garbage or not a deqppl file)",
        ) from None


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_float_tensor(dim: int | None) -> Callable[[object], bool]:
    return lambda v: isinstance(v, torch.Tensor) and v.is_floating_point() and (
        dim is None or v.dim() == dim
    )


#: What each stored field must hold, checked on load (and the reader's wording of it).
_SCHEMA: dict[str, tuple[Callable[[object], bool], str]] = {
    "values": (
        lambda v: isinstance(v, dict)
        and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items()),
        "a dict of site name -> tensor",
    ),
    "log_joint": (_is_float_tensor(0), "a scalar floating tensor"),
    "loss_trace": (_is_float_tensor(1), "a 1-D floating tensor"),
    "num_steps": (_is_int, "a non-negative int"),
    "num_grad_evals": (_is_int, "a non-negative int"),
    "wall_time": (
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0,
        "a non-negative number",
    ),
    "status": (
        lambda v: isinstance(v, str) and v in {s.value for s in FitStatus},
        f"one of {[s.value for s in FitStatus]}",
    ),
    "criterion": (lambda v: isinstance(v, str), "a string"),
    "grad_norm": (
        lambda v: isinstance(v, float) and (math.isnan(v) or v >= 0), "a non-negative float or NaN"
    ),
    "optimizer": (
        lambda v: isinstance(v, dict) and "class" in v, "an encoded optimizer settings object"
    ),
}


def _plain(value: object) -> object:
    """A field as stored: tensors detached to the CPU, enums by value."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, enum.Enum):
        return value.value
    return value


def save_map(result: MAPResult, path: str | os.PathLike) -> None:
    """Write ``result`` with ``torch.save`` as a dict of tensors, strings and numbers.

    Raises
    ------
    TypeError
        If ``result`` is not a :class:`MAPResult`.

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
    >>> back = load_map(path)
    >>> back.status == fit.status, back.optimizer == fit.optimizer, type(back.log_joint).__name__
    (True, True, 'Tensor')
    """
    if not isinstance(result, MAPResult):
        raise TypeError(f"save_map needs a MAPResult (from fit_map), got {type(result).__name__}")
    payload = {name: _plain(getattr(result, name)) for name in _SCHEMA if name != "optimizer"}
    # the scalar fields as Python numbers of their declared type
    payload["num_steps"] = int(result.num_steps)
    payload["num_grad_evals"] = int(result.num_grad_evals)
    payload["wall_time"] = float(result.wall_time)
    payload["criterion"] = str(result.criterion)
    payload["grad_norm"] = float(result.grad_norm)
    payload["optimizer"] = _encode(result.optimizer)
    bad = [name for name, (ok, _) in _SCHEMA.items() if not ok(payload[name])]
    if bad:
        name = bad[0]
        raise TypeError(
            f"cannot save this MAPResult: field {name!r} is a {type(payload[name]).__name__}, "
            f"not {_SCHEMA[name][1]}"
        )
    torch.save({"format": _FORMAT, **payload}, path)


def load_map(path: str | os.PathLike) -> MAPResult:
    """Read a file written by :func:`save_map` with ``torch.load(..., weights_only=True)``.

    Every field is checked to hold what :func:`save_map` writes (tensors where the result has
    tensors, ints for counts, a known status), so a foreign or edited file cannot come back
    as a result with strings in place of tensors.

    Raises
    ------
    CorruptFileError
        (a ``ValueError``) naming the file if it is empty, truncated, garbage, not a saved
        ``MAPResult``, or holds a field of the wrong type.
    FileNotFoundError
        If ``path`` does not exist.
    """
    payload = load_torch_file(path)
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CorruptFileError(
            path, f"it is not a MAPResult written by save_map (format {found!r}, expected {_FORMAT!r})"
        )
    for name, (ok, allowed) in _SCHEMA.items():
        if name not in payload:
            raise CorruptFileError(path, f"this MAPResult file lacks the field {name!r}")
        if not ok(payload[name]):
            raise CorruptFileError(
                path,
                f"field {name!r} of this MAPResult file is a {type(payload[name]).__name__} "
                f"({payload[name]!r:.60}), not {allowed}",
            )
    return MAPResult(
        values=dict(payload["values"]),
        log_joint=payload["log_joint"],
        loss_trace=payload["loss_trace"],
        num_steps=payload["num_steps"],
        num_grad_evals=payload["num_grad_evals"],
        wall_time=float(payload["wall_time"]),
        status=FitStatus(payload["status"]),
        criterion=payload["criterion"],
        grad_norm=payload["grad_norm"],
        optimizer=_decode(payload["optimizer"], Path(path)),
    )
