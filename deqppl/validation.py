"""Input checks shared by the library and by models built on it (public API).

Every check raises *before* any fitting starts, with a message that names the offending value,
where it is (row, column) and what is allowed. Zoo models and user models use these to write
their ``validate`` (see :mod:`deqppl.protocols`).

Examples
--------
>>> import torch
>>> from deqppl.validation import as_tensor, check_finite
>>> y = as_tensor([[0.0, 1.0], [float("nan"), 2.0]], "y")
>>> check_finite(y, "y")
Traceback (most recent call last):
...
ValueError: y contains a non-finite value nan at row 1, column 0 (1 non-finite entries in all); only finite numbers are allowed
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch

__all__ = [
    "ValidatedData",
    "as_tensor",
    "check_data_keys",
    "check_finite",
    "check_mask",
    "check_shape",
    "position",
    "validated",
]


def position(index: Sequence[int]) -> str:
    """Describe a tensor index as ``row r, column c`` (or ``position (i, j, k)``)."""
    index = tuple(int(i) for i in index)
    if len(index) == 1:
        return f"position {index[0]}"
    if len(index) == 2:
        return f"row {index[0]}, column {index[1]}"
    return f"position {index}"


def as_tensor(
    x: object, name: str, *, dtype: torch.dtype | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """Convert array-likes to a floating tensor, rejecting non-numeric input with a clear error.

    Integer and boolean input is promoted to ``dtype`` (default: torch's default float dtype);
    floating input keeps its dtype unless ``dtype`` is given.
    """
    if isinstance(x, torch.Tensor):
        t = x
    else:
        try:
            t = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(
                f"{name} must be numeric (a tensor or array of numbers), got {type(x).__name__}: {err}"
            ) from err
    if t.is_complex():
        raise TypeError(f"{name} must be real-valued, got dtype {t.dtype}")
    if not (t.is_floating_point() or t.dtype in _INTEGER_DTYPES):
        raise TypeError(f"{name} must have a real or integer dtype, got {t.dtype}")
    if dtype is not None:
        t = t.to(dtype)
    elif not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    if device is not None:
        t = t.to(device)
    return t


_INTEGER_DTYPES = {
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
}


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` naming the first NaN or infinite entry of ``x``."""
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        idx = torch.nonzero(bad)[0].tolist()
        raise ValueError(
            f"{name} contains a non-finite value {x[tuple(idx)].item()} at {position(idx)} "
            f"({int(bad.sum())} non-finite entries in all); only finite numbers are allowed"
        )


def check_mask(x: torch.Tensor, ok: torch.Tensor, name: str, allowed: str) -> None:
    """Raise ``ValueError`` naming the first entry of ``x`` where the boolean ``ok`` is False."""
    bad = ~ok
    if bool(bad.any()):
        idx = torch.nonzero(bad)[0].tolist()
        raise ValueError(
            f"{name} has value {x[tuple(idx)].item()!r} at {position(idx)}, outside the allowed "
            f"values ({allowed}); {int(bad.sum())} entries are out of range"
        )


def check_shape(x: torch.Tensor, expected: Sequence[int | None], name: str) -> None:
    """Raise ``ValueError`` unless ``x.shape`` matches ``expected`` (``None`` matches any size)."""
    ok = x.dim() == len(expected) and all(
        e is None or int(s) == int(e) for s, e in zip(x.shape, expected, strict=True)
    )
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")


def check_data_keys(data: object, names: Sequence[str], owner: str) -> None:
    """Raise unless ``data`` is a mapping whose keys are exactly ``names``.

    Parameters
    ----------
    data
        What the caller passed as the data of a model.
    names
        The model's declared data names, e.g. ``("x", "y")``.
    owner
        Who asks (a model's class name), for the message.

    Raises
    ------
    TypeError
        If ``data`` is not a mapping.
    ValueError
        If a name is missing or unknown; the message lists both and the allowed names.

    Examples
    --------
    >>> check_data_keys({"y": 1, "z": 2}, ("y",), "ExpFamPCA")
    Traceback (most recent call last):
    ...
    ValueError: ExpFamPCA data must have exactly the keys ['y']; unknown: ['z'], missing: []
    """
    if not isinstance(data, Mapping):
        raise TypeError(
            f"{owner} data must be a mapping {{name: tensor}} with the keys {list(names)}, "
            f"got {type(data).__name__}"
        )
    unknown = sorted(str(k) for k in set(data) - set(names))
    missing = [name for name in names if name not in data]
    if unknown or missing:
        raise ValueError(
            f"{owner} data must have exactly the keys {list(names)}; "
            f"unknown: {unknown}, missing: {missing}"
        )


class ValidatedData(Mapping):
    """A read-only data mapping returned by a model's ``validate``, tagged with that model.

    Public entries (``compare``, ``fit_map``, ``fit_encoder``, the encoders) that receive it for
    an equal model do not validate it again (:func:`validated`): validate once at the outermost
    entry and pass the tensors inward.
    """

    __slots__ = ("_data", "_model")

    def __init__(self, model, data: Mapping[str, torch.Tensor]) -> None:
        self._model = model
        self._data = dict(data)

    @property
    def model(self):
        """The model whose ``validate`` produced the data."""
        return self._model

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        shapes = {k: tuple(v.shape) for k, v in self._data.items()}
        return f"ValidatedData({type(self._model).__name__}, {shapes})"


def validated(model, data: Mapping[str, object]) -> ValidatedData:
    """``data`` checked by ``model.validate`` once: returned as is if it already was.

    Data validated by an equal model (frozen dataclass models compare by their
    hyperparameters) is passed through; anything else goes through ``model.validate`` (a
    model without one is taken as is).

    Examples
    --------
    >>> from deqppl.expfam import family
    >>> from deqppl.models import ExpFamPCA
    >>> model = ExpFamPCA(family=family("poisson"), obs_dim=2, latent_dim=1)
    >>> data = validated(model, {"y": [[0, 1], [2, 3]]})
    >>> data["y"].dtype, validated(model, data) is data
    (torch.float32, True)
    """
    if isinstance(data, ValidatedData) and (data.model is model or data.model == model):
        return data
    validate = getattr(model, "validate", None)
    return ValidatedData(model, validate(data) if validate is not None else dict(data))
