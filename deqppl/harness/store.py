"""A directory of finished units of work, so that an interrupted comparison resumes.

A unit is one (model, method, seed, stage). :class:`RunStore` writes each finished unit as
soon as it finishes: ``<unit>.json`` (the metrics, for people) and then ``<unit>.pt`` (everything,
``torch.save`` of tensors, numbers and strings only, read back with ``weights_only=True``),
each written to a temporary file and renamed into place, so a unit is either complete or
absent. The ``.pt`` file is the record; a unit counts as done once a record that passes
verification exists.

Each record carries a fingerprint of what produced it (model, method settings, data, seed and,
for held-out units, the shared globals); loading a unit whose fingerprint differs raises rather
than silently mixing runs. Each record also carries a SHA-256 checksum of its own content
(:func:`content_checksum`), verified on every read.

A record that cannot be read back as it was written (truncated, emptied, garbage, a file that is
not a deqppl record, or content altered after writing) is *corrupt*: ``unit in store`` moves it
aside to ``<unit>.pt.corrupt-N`` (its ``.json`` sidecar too), logs a warning naming it, notes it
in :attr:`RunStore.quarantined`, and answers ``False``, so the comparison redoes the unit and a
re-run resumes by itself. :meth:`RunStore.load` raises :class:`CorruptFileError` (a
``ValueError``) naming the file. The run's settings file (``run.json`` of the command line) is
read by :func:`load_settings`, which names a damaged file the same way.

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
>>> _ = store.record_path(unit).write_bytes(b"garbage")  # a damaged record is moved aside
>>> unit in store, [p.name for p in store.quarantined]
(False, ['fit.pt.corrupt-1'])
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import logging
import os
import re
import struct
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from deqppl.harness.methods import StageResult
from deqppl.inference.io import CorruptFileError, load_torch_file

__all__ = [
    "CorruptFileError",
    "RunStore",
    "Unit",
    "content_checksum",
    "load_settings",
    "quarantine",
    "save_settings",
]

_log = logging.getLogger(__name__)

# /2 added the content checksum; a /1 record (no checksum) is not trusted and is redone.
_FORMAT = "deqppl.harness.StageResult/2"


@dataclass(frozen=True)
class Unit:
    """One unit of work of a comparison: (model, method, seed, stage)."""

    model: str
    method: str
    seed: int
    stage: str


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_")[:80] or "_"


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
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


# ------------------------------------------------------------------------------------------
# content checksum
# ------------------------------------------------------------------------------------------
def _feed(h: "hashlib._Hash", value: object) -> None:
    """Feed ``value`` to ``h`` with a type tag, so that distinct contents hash differently."""
    if value is None:
        h.update(b"N")
    elif isinstance(value, bool):  # before int: bool is an int subclass
        h.update(b"T" if value else b"F")
    elif isinstance(value, int):
        h.update(b"i" + str(value).encode() + b";")
    elif isinstance(value, float):
        h.update(b"f" + struct.pack("<d", value))
    elif isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        h.update(b"s" + str(len(data)).encode() + b":" + data)
    elif isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(b"t" + str(t.dtype).encode() + b"|" + repr(tuple(t.shape)).encode() + b"|")
        # viewing as bytes covers every dtype (bool and bfloat16 have no numpy equivalent)
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, Mapping):
        h.update(b"d" + str(len(value)).encode() + b"{")
        for key in sorted(value, key=str):
            _feed(h, str(key))
            _feed(h, value[key])
        h.update(b"}")
    elif isinstance(value, (list, tuple)):
        h.update(b"l" + str(len(value)).encode() + b"[")
        for item in value:
            _feed(h, item)
        h.update(b"]")
    else:
        raise TypeError(f"cannot checksum a {type(value).__name__}: {value!r}")


def content_checksum(content: Mapping[str, object]) -> str:
    """SHA-256 hex digest of a record's content (tensors by dtype, shape and bytes).

    Keys are taken in sorted order, so the digest does not depend on insertion order; a
    ``"checksum"`` key is left out (it holds the digest itself).

    Examples
    --------
    >>> import torch
    >>> a = content_checksum({"x": torch.ones(2), "n": 3})
    >>> a == content_checksum({"n": 3, "x": torch.ones(2)})
    True
    >>> a == content_checksum({"x": torch.tensor([1.0, 1.0 + 1e-7]), "n": 3})
    False
    """
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in content.items() if k != "checksum"})
    return h.hexdigest()


# ------------------------------------------------------------------------------------------
# moving damaged files aside
# ------------------------------------------------------------------------------------------
def quarantine(path: str | os.PathLike) -> Path:
    """Rename ``path`` to ``<path>.corrupt-N`` (the first free ``N >= 1``); return the new path.

    Nothing is deleted: the damaged file stays for inspection, out of the store's way.
    """
    path = Path(path)
    n = 1
    while True:
        target = path.with_name(f"{path.name}.corrupt-{n}")
        if not target.exists():
            os.replace(path, target)
            return target
        n += 1


# ------------------------------------------------------------------------------------------
# the record schema: what each StageResult field must hold when read back
# ------------------------------------------------------------------------------------------
def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_tensor_dict(v: object) -> bool:
    return isinstance(v, dict) and all(
        isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items()
    )


_SCHEMA: dict[str, tuple[Callable[[object], bool], str]] = {
    "values": (_is_tensor_dict, "a dict of site name -> tensor"),
    "log_joint": (_is_number, "a number"),
    "wall_time": (_is_number, "a number"),
    "num_steps": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an int"),
    "num_grad_evals": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an int"),
    "status": (lambda v: isinstance(v, str), "a string"),
    "converged": (lambda v: isinstance(v, bool), "a bool"),
    "per_sample_converged": (lambda v: v is None or isinstance(v, torch.Tensor), "a tensor or None"),
    "trace": (lambda v: isinstance(v, torch.Tensor), "a tensor"),
    "extra": (
        lambda v: isinstance(v, dict) and all(isinstance(k, str) and _is_number(x) for k, x in v.items()),
        "a dict of name -> number",
    ),
}


def _plain(value: object) -> object:
    """A StageResult field as stored: tensors detached and cloned to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, enum.Enum):
        return str(value.value)
    return value


class RunStore:
    """Finished units of a comparison, one verified record per unit, under ``path``.

    Parameters
    ----------
    path
        Directory (created on first write).

    Attributes
    ----------
    quarantined
        Paths (``*.corrupt-N``) of the records this object found damaged and moved aside, in
        the order found; the command line reports them.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.quarantined: list[Path] = []

    def __repr__(self) -> str:
        return f"RunStore({str(self.path)!r})"

    def _stem(self, unit: Unit) -> Path:
        # Model descriptions can be long and hold any character: a readable prefix plus a hash.
        digest = hashlib.sha256(unit.model.encode()).hexdigest()[:10]
        folder = f"{_slug(unit.model)[:40]}-{digest}"
        return self.path / folder / _slug(unit.method) / f"seed{int(unit.seed)}" / _slug(unit.stage)

    def record_path(self, unit: Unit) -> Path:
        """Path of the ``.pt`` record of ``unit`` (it may not exist)."""
        return self._stem(unit).with_suffix(".pt")

    def __contains__(self, unit: Unit) -> bool:
        """Whether a verified record of ``unit`` exists; a corrupt one is moved aside first."""
        path = self.record_path(unit)
        if not path.exists():
            return False
        try:
            self._read(path)
        except CorruptFileError as err:
            self._quarantine(path, err)
            return False
        return True

    def units(self) -> list[Path]:
        """Paths of every record in the store (damaged ones moved aside are not listed)."""
        return sorted(self.path.rglob("*.pt")) if self.path.exists() else []

    def save(self, unit: Unit, result: StageResult, *, fingerprint: str) -> None:
        """Write ``result`` for ``unit`` atomically (JSON metrics, then the ``.pt`` record)."""
        stem = self._stem(unit)
        unit_dict = {"model": unit.model, "method": unit.method, "seed": int(unit.seed), "stage": unit.stage}
        metrics = {
            "unit": unit_dict,
            "fingerprint": fingerprint,
            "log_joint": float(result.log_joint),
            "wall_time": float(result.wall_time),
            "num_steps": int(result.num_steps),
            "num_grad_evals": int(result.num_grad_evals),
            "status": str(result.status),
            "converged": bool(result.converged),
            "extra": {k: float(v) for k, v in result.extra.items()},
        }
        fields = {f.name: _plain(getattr(result, f.name)) for f in dataclasses.fields(StageResult)}
        # the typed fields as the metrics hold them (floats stay floats, ints ints)
        fields.update({k: metrics[k] for k in _SCHEMA if k in metrics})
        payload = {
            "format": _FORMAT,
            "unit": dict(unit_dict),
            "fingerprint": fingerprint,
            "result": fields,
        }
        payload["checksum"] = content_checksum(payload)

        def write_json(tmp: str) -> None:
            Path(tmp).write_text(json.dumps(metrics, indent=2, allow_nan=True), encoding="utf-8")

        _atomic_write(stem.with_suffix(".json"), write_json)
        _atomic_write(stem.with_suffix(".pt"), lambda tmp: torch.save(payload, tmp))

    def load(self, unit: Unit, *, fingerprint: str | None = None) -> StageResult:
        """Read and verify the record of ``unit``.

        Raises
        ------
        KeyError
            If the unit is not in the store.
        CorruptFileError
            (a ``ValueError``) naming the file, if the record is damaged, altered or not a
            record written by :meth:`save`; ``unit in store`` moves such a file aside.
        ValueError
            If its fingerprint differs from ``fingerprint`` (the store holds a different run:
            use a fresh store directory).
        """
        path = self.record_path(unit)
        if not path.exists():
            raise KeyError(f"{unit} is not in {self!r}")
        payload = self._read(path)
        if fingerprint is not None and payload["fingerprint"] != fingerprint:
            raise ValueError(
                f"{str(path)!r} holds {unit} of a different run (other data, settings or shared "
                f"globals: fingerprint {payload['fingerprint'][:12]} != {fingerprint[:12]}); "
                f"use a fresh store directory or delete it"
            )
        result = payload["result"]
        known = {f.name for f in dataclasses.fields(StageResult)}
        return StageResult(**{k: v for k, v in result.items() if k in known})

    def _read(self, path: Path) -> dict:
        """The verified payload of the record at ``path``, or CorruptFileError."""
        payload = load_torch_file(path)
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
            found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
            raise CorruptFileError(
                path, f"it is not a unit record of format {_FORMAT!r} (found {found!r})"
            )
        stored = payload.get("checksum")
        if not isinstance(stored, str) or stored != content_checksum(payload):
            raise CorruptFileError(
                path, "its content does not match its checksum (altered or damaged after writing)"
            )
        if not isinstance(payload.get("fingerprint"), str) or not isinstance(payload.get("result"), dict):
            raise CorruptFileError(path, "it lacks the fingerprint or the result")
        for name, (ok, allowed) in _SCHEMA.items():
            if name in payload["result"] and not ok(payload["result"][name]):
                raise CorruptFileError(
                    path, f"field {name!r} is a {type(payload['result'][name]).__name__}, not {allowed}"
                )
        return payload

    def _quarantine(self, path: Path, err: CorruptFileError) -> None:
        moved = quarantine(path)
        sidecar = path.with_suffix(".json")
        if sidecar.exists():
            quarantine(sidecar)
        self.quarantined.append(moved)
        _log.warning("%s; moved it to %s and the unit will be redone", err, moved.name)


# ------------------------------------------------------------------------------------------
# the run's settings (the command line's run.json)
# ------------------------------------------------------------------------------------------
def save_settings(path: str | os.PathLike, settings: Mapping[str, object]) -> None:
    """Write a run's ``settings`` (a JSON object) to ``path`` atomically.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "run.json"
    >>> save_settings(p, {"seed": 0, "data": "digits"})
    >>> load_settings(p)
    {'seed': 0, 'data': 'digits'}
    >>> _ = p.write_text('{"seed": 0, "da')  # a truncated file is named, not a JSONDecodeError
    >>> load_settings(p)
    Traceback (most recent call last):
    ...
    deqppl.inference.io.CorruptFileError: '...run.json' is not a readable deqppl file: it is not JSON (...)
    """
    text = json.dumps(dict(settings), indent=2, allow_nan=False) + "\n"
    _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def load_settings(path: str | os.PathLike) -> dict:
    """Read the settings written by :func:`save_settings` (a JSON object).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    CorruptFileError
        (a ``ValueError``) naming the file, if it is empty, not UTF-8 JSON or not a JSON
        object. The caller decides: ``compare`` moves it aside with :func:`quarantine` and
        starts afresh; ``report`` cannot know the settings and stops.
    """
    path = Path(path)
    raw = path.read_bytes()
    if not raw.strip():
        raise CorruptFileError(path, "the file is empty")
    try:
        settings = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptFileError(path, f"it is not JSON ({err})") from None
    if not isinstance(settings, dict):
        raise CorruptFileError(
            path, f"it holds a JSON {type(settings).__name__}, not an object of settings"
        )
    return settings
