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

import contextlib
import contextvars
import math
import numbers
from collections.abc import Iterator, Mapping, Sequence

import torch

__all__ = [
    "BLOCK_ENTRIES",
    "FLOAT_DTYPES",
    "ValidatedData",
    "as_tensor",
    "check_data_keys",
    "check_finite",
    "check_int",
    "check_mask",
    "check_real",
    "check_seed",
    "check_shape",
    "holds_everywhere",
    "position",
    "table_positions",
    "validated",
]


#: (first row, {data name: column names}) of the table a chunk being validated came from; set
#: by :func:`table_positions`, read by :func:`position`.
_TABLE: contextvars.ContextVar[tuple[int, Mapping[str, Sequence[str]]] | None] = contextvars.ContextVar(
    "deqppl_table_positions", default=None
)


@contextlib.contextmanager
def table_positions(*, first_row: int, columns: Mapping[str, Sequence[str]] | None = None) -> Iterator[None]:
    """Report positions in 2-D data as rows and columns of the whole table a chunk came from.

    Streaming code validates one chunk at a time (rows ``first_row ...`` of a file) with the
    model's own ``validate``; inside this context every message of :func:`position` (hence of
    :func:`check_finite`, :func:`check_mask` and every model's support check) names the global
    row, and the column's name where ``columns`` gives the names of that data tensor.

    Parameters
    ----------
    first_row
        Global index of the chunk's row 0.
    columns
        Data name -> the table's column names for the columns of that tensor.

    Examples
    --------
    >>> y = as_tensor([[0.0, 1.0], [float("nan"), 2.0]], "y")
    >>> with table_positions(first_row=1000, columns={"y": ("y_0", "y_1")}):
    ...     check_finite(y, "y")
    Traceback (most recent call last):
    ...
    ValueError: y contains a non-finite value nan at row 1001, column 0 ('y_0') (1 non-finite entries in all); only finite numbers are allowed
    """
    if isinstance(first_row, bool) or not isinstance(first_row, int) or first_row < 0:
        raise ValueError(f"first_row must be a non-negative integer, got {first_row!r}")
    token = _TABLE.set((first_row, dict(columns or {})))
    try:
        yield
    finally:
        _TABLE.reset(token)


def position(index: Sequence[int], name: str | None = None) -> str:
    """Describe a tensor index as ``row r, column c`` (or ``position (i, j, k)``).

    Inside :func:`table_positions` the row is the table's global row and, for a data tensor
    ``name`` whose column names were given, the column's name follows its index.
    """
    index = tuple(int(i) for i in index)
    if len(index) == 1:
        return f"position {index[0]}"
    if len(index) == 2:
        table = _TABLE.get()
        if table is None:
            return f"row {index[0]}, column {index[1]}"
        first, columns = table
        names = columns.get(name, ()) if name is not None else ()
        label = f" ({names[index[1]]!r})" if index[1] < len(names) else ""
        return f"row {first + index[0]}, column {index[1]}{label}"
    return f"position {index}"


def as_tensor(
    x: object, name: str, *, dtype: torch.dtype | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """Convert array-likes to a floating tensor, rejecting non-numeric input with a clear error.

    Integer and boolean input is promoted to ``dtype`` (default: torch's default float dtype);
    floating input keeps its dtype unless ``dtype`` is given. The result must be float32 or
    float64 (:data:`FLOAT_DTYPES`): half-precision input raises ``TypeError`` naming the
    dtypes allowed, never a silent upcast.

    Examples
    --------
    >>> as_tensor([1, 2], "y").dtype
    torch.float32
    >>> as_tensor(torch.ones(2, dtype=torch.float16), "y")
    Traceback (most recent call last):
    ...
    TypeError: y has dtype torch.float16; deqppl computes in torch.float32 or torch.float64 only ...
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
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} has dtype {t.dtype}; deqppl computes in "
            f"{' or '.join(str(d) for d in FLOAT_DTYPES)} only (half precision cannot represent "
            f"the sums of a log joint or its gradients: fits would stop at a wrong optimum), so "
            f"convert explicitly, e.g. {name}.double()"
        )
    if device is not None:
        t = t.to(device)
    return t


#: Floating dtypes the library computes in. float16/bfloat16 (eps 1e-3/8e-3) are refused rather
#: than silently upcast: the caller chooses the precision and gets results in it (as in torch).
FLOAT_DTYPES = (torch.float32, torch.float64)


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
            f"{name} contains a non-finite value {x[tuple(idx)].item()} at {position(idx, name)} "
            f"({int(bad.sum())} non-finite entries in all); only finite numbers are allowed"
        )


#: Entries per block of the blocked elementwise passes (:func:`holds_everywhere` here, the
#: encoders' graph-free layer evaluations, :func:`deqppl.encoders.base.row_blocks`): 2^16
#: float64 entries (512 KiB) and their temporaries stay in the L2 cache and are recycled by the
#: allocator, where whole-tensor temporaries are fresh memory at every call (page faults).
#: Measured on 10 000 x 500 Poisson counts: the support check of the whole tensor took 94 ms,
#: in blocks of 2^16 entries ~12 ms; the PED layer's measurements are at ``row_blocks``.
BLOCK_ENTRIES = 2**16


def holds_everywhere(x: torch.Tensor, predicate) -> bool:
    """Whether the boolean elementwise ``predicate(block)`` holds for every entry of ``x``.

    Evaluated on contiguous blocks of the flattened ``x`` (the predicate must be elementwise),
    stopping at the first block where it fails; the caller then runs the whole-tensor check
    that names the first bad entry (:func:`check_finite`, :func:`check_mask`).

    Examples
    --------
    >>> holds_everywhere(torch.arange(5.0), lambda b: b >= 0)
    True
    >>> holds_everywhere(torch.tensor([1.0, float("nan")]), torch.isfinite)
    False
    """
    flat = x.reshape(-1)
    for start in range(0, flat.shape[0], BLOCK_ENTRIES):
        if not bool(predicate(flat[start:start + BLOCK_ENTRIES]).all()):
            return False
    return True


def check_mask(x: torch.Tensor, ok: torch.Tensor, name: str, allowed: str) -> None:
    """Raise ``ValueError`` naming the first entry of ``x`` where the boolean ``ok`` is False."""
    bad = ~ok
    if bool(bad.any()):
        idx = torch.nonzero(bad)[0].tolist()
        raise ValueError(
            f"{name} has value {x[tuple(idx)].item()!r} at {position(idx, name)}, outside the allowed "
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


def _type_name(value: object) -> str:
    return type(value).__name__


def check_int(
    value: object, name: str, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    """Return ``value`` as an ``int`` in ``[minimum, maximum]``, or raise naming it.

    Integers of any kind (Python, NumPy) pass; ``bool``, floats (even ``2.0``: a count given as
    a float is usually a mistake elsewhere), strings and ``None`` raise ``TypeError``.

    Examples
    --------
    >>> check_int(3, "num_steps", minimum=1)
    3
    >>> check_int(0, "subsample_size", minimum=1)
    Traceback (most recent call last):
    ...
    ValueError: subsample_size must be an integer >= 1, got 0
    >>> check_int(1.5, "seed")
    Traceback (most recent call last):
    ...
    TypeError: seed must be an integer, got float 1.5
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {_type_name(value)} {value!r}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        if maximum is None:
            allowed = f">= {minimum}"
        elif minimum is None:
            allowed = f"<= {maximum}"
        else:
            allowed = f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be an integer {allowed}, got {value}")
    return value


#: Seeds: non-negative and representable by torch.manual_seed and numpy alike.
_MAX_SEED = 2**63 - 1


def check_seed(seed: object, name: str = "seed") -> int:
    """Return ``seed`` as an ``int`` in ``[0, 2**63 - 1]``; see :func:`check_int`.

    Examples
    --------
    >>> check_seed("1")
    Traceback (most recent call last):
    ...
    TypeError: seed must be an integer, got str '1'
    """
    return check_int(seed, name, minimum=0, maximum=_MAX_SEED)


def check_real(
    value: object,
    name: str,
    *,
    minimum: float | None = None,
    exclusive_minimum: bool = False,
    maximum: float | None = None,
) -> float:
    """Return ``value`` as a finite ``float`` above ``minimum`` (and below ``maximum``).

    ``bool``, strings (``'1'``), ``None`` and other non-numbers raise ``TypeError``; NaN, an
    infinity or a value out of range raise ``ValueError`` saying what is allowed.

    Examples
    --------
    >>> check_real(0.5, "lam", minimum=0.0, exclusive_minimum=True)
    0.5
    >>> check_real("1", "lam")
    Traceback (most recent call last):
    ...
    TypeError: lam must be a real number, got str '1'
    >>> check_real(float("nan"), "precision", minimum=0.0, exclusive_minimum=True)
    Traceback (most recent call last):
    ...
    ValueError: precision must be positive and finite, got nan
    >>> check_real(2.0, "slope", minimum=0.0, maximum=1.0)
    Traceback (most recent call last):
    ...
    ValueError: slope must be a finite number >= 0 and <= 1, got 2.0
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {_type_name(value)} {value!r}")
    number = float(value)
    if minimum == 0 and maximum is None:
        allowed = "positive and finite" if exclusive_minimum else "non-negative and finite"
    else:
        parts = []
        if minimum is not None:
            parts.append(f"{'>' if exclusive_minimum else '>='} {minimum:g}")
        if maximum is not None:
            parts.append(f"<= {maximum:g}")
        allowed = "a finite number" + (" " + " and ".join(parts) if parts else "")
    below = minimum is not None and (number <= minimum if exclusive_minimum else number < minimum)
    if not math.isfinite(number) or below or (maximum is not None and number > maximum):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return number


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
