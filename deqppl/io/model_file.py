r"""Model files: a fitted model and its encoder in one safetensors file.

Format (version :data:`FORMAT_VERSION`)
---------------------------------------
One `safetensors <https://huggingface.co/docs/safetensors>`_ file: an 8-byte little-endian
header length, a JSON header, then the raw tensor bytes. It holds

* the encoder's ``state_dict()`` tensors (for :class:`~deqppl.encoders.PEDEncoder` ``W`` and
  ``B``; for :class:`~deqppl.encoders.DeepPEDEncoder` ``W1..WL``, ``b1..bL``) in their dtype;
* in the header's ``__metadata__`` (strings only, as safetensors requires):
  ``format`` = ``"deqppl-model"``, ``format_version``, ``deqppl_version`` (the writer's),
  ``config`` (a JSON document: ``{"model": {"kind", "config"}, "encoder": {"kind", "config"},
  "columns": {data name: [column names]}, "metadata": {...}}``) and ``sha256``, a digest of
  ``config`` and of every tensor's name, dtype, shape and bytes, so that a flipped or missing
  byte anywhere but in the padding is detected.

No Python object is pickled: the model and encoder are rebuilt from their registered names
(:mod:`deqppl.io.registry`) and JSON hyperparameters. Files are written to a temporary file in
the same folder and moved into place with :func:`os.replace`, so a reader never sees half a file.

Observation columns
-------------------
A table of observations (Parquet/CSV, :func:`deqppl.io.encode`) maps to the model's data by the
column names stored at save time: by default data name ``y`` of width $d$ is read from the
columns ``y_0 … y_{d-1}`` (:func:`default_columns`); ``save(..., columns=...)`` stores others.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .registry import lookup, name_of

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ModelFileError",
    "ModelFileInfo",
    "default_columns",
    "digest",
    "load",
    "read_info",
    "save",
]

#: The ``format`` field of every deqppl model file.
FORMAT = "deqppl-model"
#: The layout written by this deqppl; :func:`load` reads only this version.
FORMAT_VERSION = 1
#: A safetensors header longer than this is not one deqppl wrote (a deep model's header is a
#: few kB); guards against reading gigabytes when a random file is passed.
_MAX_HEADER_BYTES = 64 * 2**20


class ModelFileError(ValueError):
    """A file that is not a deqppl model file of this version, or is damaged, or of another kind."""


@dataclass(frozen=True)
class ModelFileInfo:
    """What a model file's header says, read without building the model (:func:`read_info`).

    Attributes
    ----------
    path
        The file.
    format_version, deqppl_version
        The layout version and the deqppl version that wrote it.
    model_kind, encoder_kind
        The registered names of the model and encoder classes (e.g. ``"ExpFamPCA"``).
    model_config, encoder_config
        Their JSON hyperparameters.
    columns
        Data name -> the table columns holding it (:func:`default_columns`).
    metadata
        The ``metadata`` passed to :func:`save`.
    sha256
        The digest of configuration and tensors (:func:`digest`); it identifies the fitted
        model, e.g. in the fingerprint of :func:`deqppl.io.encode`'s finished chunks.
    tensors
        Name -> ``(dtype, shape)`` of every stored tensor.
    """

    path: Path
    format_version: int
    deqppl_version: str
    model_kind: str
    encoder_kind: str
    model_config: dict
    encoder_config: dict
    columns: dict[str, tuple[str, ...]]
    metadata: dict
    sha256: str
    tensors: dict[str, tuple[str, tuple[int, ...]]]


# --------------------------------------------------------------------------------------------
# digests and columns
# --------------------------------------------------------------------------------------------
def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def digest(config: str, tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a configuration string and tensors (name, dtype, shape and bytes, by name).

    Examples
    --------
    >>> a = digest("{}", {"W": torch.zeros(2)})
    >>> a == digest("{}", {"W": torch.zeros(2)}), a == digest("{}", {"W": torch.ones(2)})
    (True, False)
    """
    h = hashlib.sha256()
    h.update(config.encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"\0{name}\0{str(t.dtype)}\0{tuple(t.shape)}\0".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def default_columns(model) -> dict[str, tuple[str, ...]]:
    """Column names of each data tensor of a model: ``{"y": ("y_0", ..., "y_{d-1}")}``.

    Each data name ``n`` of width ``w`` (its shape ``(N, w)``, read from one simulated row)
    maps to ``n_0 … n_{w-1}``; a data name of shape ``(N,)`` maps to the single column ``n``.

    Raises
    ------
    TypeError
        If a data tensor has more than two dimensions (it is not a table).

    Examples
    --------
    >>> from deqppl.expfam import family
    >>> from deqppl.models import ExpFamPCA
    >>> default_columns(ExpFamPCA(family=family("poisson"), obs_dim=3, latent_dim=1))
    {'y': ('y_0', 'y_1', 'y_2')}
    """
    data = model.simulate(1, seed=0, dtype=torch.float64).data
    columns = {}
    for name in model.data_names:
        shape = tuple(data[name].shape)
        if len(shape) == 1:
            columns[name] = (name,)
        elif len(shape) == 2:
            columns[name] = tuple(f"{name}_{j}" for j in range(shape[1]))
        else:
            raise TypeError(
                f"data {name!r} of {type(model).__name__} has shape (N, {', '.join(map(str, shape[1:]))}); "
                f"only (N,) or (N, width) data map to table columns"
            )
    return columns


def _check_columns(model, columns: object) -> dict[str, tuple[str, ...]]:
    default = default_columns(model)
    if columns is None:
        return default
    names = tuple(model.data_names)
    if not isinstance(columns, Mapping):
        if len(names) != 1 or isinstance(columns, str) or not isinstance(columns, Sequence):
            raise TypeError(
                f"columns must be a mapping data name -> column names (data {list(names)}), "
                f"or for one data name a sequence of column names; got {columns!r}"
            )
        columns = {names[0]: columns}
    if set(columns) != set(names):
        raise ValueError(f"columns must name the columns of every data name {list(names)}; got {sorted(columns)}")
    out = {}
    seen: set[str] = set()
    for name in names:
        cols = tuple(columns[name])
        if len(cols) != len(default[name]) or not all(isinstance(c, str) and c for c in cols):
            raise ValueError(
                f"columns[{name!r}] must be {len(default[name])} non-empty strings (one per column "
                f"of {name!r}), got {cols!r}"
            )
        dup = seen.intersection(cols) | {c for c in cols if cols.count(c) > 1}
        if dup:
            raise ValueError(f"column names must be distinct; repeated: {sorted(dup)}")
        seen.update(cols)
        out[name] = cols
    return out


# --------------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------------
def _atomic_write(path: Path, data: bytes) -> None:
    # a unique name in the same folder (os.replace is atomic within one file system), opened
    # exclusively; open() rather than mkstemp keeps the usual permissions (umask, not 0600)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save(
    path: str | os.PathLike,
    encoder,
    *,
    metadata: Mapping[str, Any] | None = None,
    columns: Mapping[str, Sequence[str]] | Sequence[str] | None = None,
) -> Path:
    """Write a fitted encoder and its model to one file (atomically); returns the path.

    Parameters
    ----------
    path
        The file to write (any extension; ``.deqppl`` is customary). Its folder must exist.
    encoder
        An encoder of the protocol (:class:`~deqppl.encoders.AbstractMAPEncoder`) whose class
        and whose model's class implement the saved-model protocol
        (:mod:`deqppl.io.registry`): :class:`~deqppl.encoders.PEDEncoder` with
        :class:`~deqppl.models.ExpFamPCA`, :class:`~deqppl.encoders.DeepPEDEncoder` with
        :class:`~deqppl.models.HierarchicalExpFamPCA`.
    metadata
        JSON-able notes stored with the model (e.g. how it was fitted).
    columns
        The table columns of each data name (:func:`default_columns` by default); what
        :func:`deqppl.io.encode` reads.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    TypeError
        If the encoder or model cannot be saved (e.g. :class:`~deqppl.encoders.AutoDEQ`, which
        wraps user Python code), or ``metadata`` is not JSON-able.
    ValueError
        Bad ``columns``.

    Examples
    --------
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from deqppl.encoders import PEDEncoder
    >>> from deqppl.expfam import family
    >>> from deqppl.models import ExpFamPCA
    >>> enc = PEDEncoder(ExpFamPCA(family=family("poisson"), obs_dim=4, latent_dim=2)).double()
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = save(Path(tmp) / "model.deqppl", enc, metadata={"note": "doc"})
    ...     back = load(path)
    ...     info = read_info(path)
    >>> y = torch.tensor([[0.0, 3.0, 1.0, 2.0]], dtype=torch.float64)
    >>> bool(torch.equal(back.solve(y).value, enc.solve(y).value)), info.model_kind, info.columns
    (True, 'ExpFamPCA', {'y': ('y_0', 'y_1', 'y_2', 'y_3')})
    """
    from deqppl.encoders.base import AbstractMAPEncoder

    if not isinstance(encoder, AbstractMAPEncoder):
        raise TypeError(
            f"save writes an encoder of the protocol (deqppl.encoders.AbstractMAPEncoder) with its "
            f"model, got {type(encoder).__name__}"
        )
    path = Path(path)
    encoder_config = encoder.config()  # raises TypeError saying why a class cannot be saved
    encoder_kind = name_of(type(encoder))
    model = encoder.model
    if not callable(getattr(model, "config", None)):
        raise TypeError(
            f"the model {type(model).__name__} of this {type(encoder).__name__} does not implement the "
            f"saved-model protocol (config() and from_config(); deqppl.io.registry)"
        )
    model_config = model.config()
    model_kind = name_of(type(model))
    document = {
        "model": {"kind": model_kind, "config": model_config},
        "encoder": {"kind": encoder_kind, "config": encoder_config},
        "columns": {k: list(v) for k, v in _check_columns(model, columns).items()},
        "metadata": dict(metadata or {}),
    }
    try:
        config = json.dumps(document, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise TypeError(f"the model file's configuration must be JSON (no NaN/inf): {err}") from err
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in encoder.state_dict().items()}
    from deqppl import __version__
    from safetensors.torch import save as st_save

    header = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "deqppl_version": __version__,
        "config": config,
        "sha256": digest(config, tensors),
    }
    _atomic_write(path, st_save(tensors, metadata=header))
    return path


# --------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------
def _read(path: Path) -> tuple[dict, bytes]:
    """The safetensors header and the whole file, or ModelFileError saying what was found."""
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    raw = path.read_bytes()
    what = f"{path} is not a deqppl model file"
    if len(raw) < 8:
        raise ModelFileError(f"{what}: it has {len(raw)} bytes, a model file starts with an 8-byte header length")
    (n,) = struct.unpack("<Q", raw[:8])
    start = raw[8:9]
    if n > _MAX_HEADER_BYTES or start != b"{":
        raise ModelFileError(
            f"{what}: expected a safetensors file (8-byte header length, then a JSON header "
            f"starting with '{{'), found header length {n} and first header byte {start!r}"
        )
    if 8 + n > len(raw):
        raise ModelFileError(
            f"{path} is truncated: its header says {n} header bytes, but the file has only "
            f"{len(raw) - 8} bytes after the length"
        )
    try:
        header = json.loads(raw[8 : 8 + n])
    except ValueError as err:
        raise ModelFileError(f"{what}: its safetensors header is not valid JSON ({err})") from err
    if not isinstance(header, dict):
        raise ModelFileError(f"{what}: its header is a JSON {type(header).__name__}, not an object")
    return header, raw


def _meta(path: Path, header: dict) -> dict:
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        found = meta.get("format", "no 'format' field")
        raise ModelFileError(
            f"{path} is not a deqppl model file: it is a safetensors file whose metadata has "
            f"format {found!r}, expected {FORMAT!r} (tensors {sorted(k for k in header if k != '__metadata__')})"
        )
    version = meta.get("format_version")
    if version != str(FORMAT_VERSION):
        raise ModelFileError(
            f"{path} is a deqppl model file of format version {version} (written by deqppl "
            f"{meta.get('deqppl_version', '?')}); this deqppl reads format version {FORMAT_VERSION} "
            f"only: re-save the model with this deqppl, or load it with the deqppl that wrote it"
        )
    for key in ("config", "sha256"):
        if key not in meta:
            raise ModelFileError(f"{path} is damaged: its metadata lacks the field {key!r}")
    return meta


def read_info(path: str | os.PathLike) -> ModelFileInfo:
    """Read a model file's header (kinds, configuration, columns, metadata) without loading it.

    Raises
    ------
    FileNotFoundError
        No such file.
    ModelFileError
        Not a deqppl model file, another format version, or a damaged header.
    """
    path = Path(path)
    header, _ = _read(path)
    return _info(path, header)


def _info(path: Path, header: dict) -> ModelFileInfo:
    meta = _meta(path, header)
    try:
        doc = json.loads(meta["config"])
        info = ModelFileInfo(
            path=path,
            format_version=int(meta["format_version"]),
            deqppl_version=meta.get("deqppl_version", "?"),
            model_kind=doc["model"]["kind"],
            encoder_kind=doc["encoder"]["kind"],
            model_config=doc["model"]["config"],
            encoder_config=doc["encoder"]["config"],
            columns={k: tuple(v) for k, v in doc["columns"].items()},
            metadata=doc["metadata"],
            sha256=meta["sha256"],
            tensors={k: (v["dtype"], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"},
        )
    except (ValueError, KeyError, TypeError) as err:
        raise ModelFileError(f"{path} is damaged: its configuration cannot be read ({type(err).__name__}: {err})") from err
    return info


def load(path: str | os.PathLike, *, expect: type | None = None, device: str | torch.device | None = None):
    """Read a model file written by :func:`save`: the encoder, holding its model.

    Parameters
    ----------
    path
        The file.
    expect
        Optional class the file must hold: an encoder class (e.g.
        :class:`~deqppl.encoders.PEDEncoder`) or a model class (e.g.
        :class:`~deqppl.models.ExpFamPCA`).
    device
        Where the tensors go (default CPU); their dtype is the one saved.

    Returns
    -------
    AbstractMAPEncoder
        The encoder (``.model`` is the model), with the saved globals and solver settings:
        its :meth:`~deqppl.encoders.AbstractMAPEncoder.solve` equals the saved encoder's.

    Raises
    ------
    FileNotFoundError
        No such file.
    ModelFileError
        (a ``ValueError``) naming the path and what was found against what was expected: not a
        deqppl model file, another format version, truncated or corrupted (checksum mismatch),
        or not of the ``expect`` kind.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     bad = Path(tmp) / "notes.txt"
    ...     _ = bad.write_text("hello, this is not a model")
    ...     load(bad)
    Traceback (most recent call last):
    ...
    deqppl.io.model_file.ModelFileError: .../notes.txt is not a deqppl model file: expected a safetensors file ...
    """
    path = Path(path)
    header, raw = _read(path)
    info = _info(path, header)
    if expect is not None:
        expected = name_of(expect)
        is_encoder = _is_encoder(expect)
        found = info.encoder_kind if is_encoder else info.model_kind
        if found != expected:
            kind = "encoder" if is_encoder else "model"
            raise ModelFileError(
                f"{path} holds a {info.encoder_kind} encoder of a {info.model_kind} model; expected "
                f"the {kind} {expected}"
            )
    n = struct.unpack("<Q", raw[:8])[0]
    data = raw[8 + n :]
    expected_bytes = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if len(data) < expected_bytes:
        raise ModelFileError(
            f"{path} is truncated: its header lists {expected_bytes} bytes of tensor data, the file "
            f"holds {len(data)}"
        )
    from safetensors.torch import load as st_load

    try:
        tensors = st_load(raw)
    except Exception as err:  # safetensors raises its own SafetensorError
        raise ModelFileError(f"{path} is damaged: safetensors cannot read it ({err})") from err
    meta = header["__metadata__"]
    if digest(meta["config"], tensors) != info.sha256:
        raise ModelFileError(
            f"{path} is corrupted: the checksum of its configuration and tensors does not match the "
            f"one stored at save time (sha256 {info.sha256[:16]}...)"
        )
    model = lookup(info.model_kind).from_config(info.model_config)
    if device is not None:
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return lookup(info.encoder_kind).from_config(model, info.encoder_config, tensors)


def _is_encoder(cls: type) -> bool:
    from deqppl.encoders.base import AbstractMAPEncoder

    return isinstance(cls, type) and issubclass(cls, AbstractMAPEncoder)
