"""Built-in data and loaders for a user's own files.

The handwritten digits ship inside the package (``digits.npz``, 45 kB): the 1 797 images of
8×8 pixel counts 0–16 of the UCI optical-recognition data set as distributed with scikit-learn
(``sklearn.datasets.load_digits``, BSD-3 licence), so nothing is downloaded.

Two small regression tables for kernel GLMs ship likewise, written from scikit-learn's copies by
``scripts/make_kglm_data.py`` (BSD-3 licence; scikit-learn is not a run-time dependency):
``diabetes.npz`` (442 patients, 10 baseline variables, disease progression after one year;
Efron et al., 2004, *Annals of Statistics*) for Gaussian regression and ``breast_cancer.npz``
(569 tumours of the Wisconsin diagnostic data, 30 features, 1 = benign) for Bernoulli
regression. Every x column is standardised to mean 0 and population standard deviation 1, and
so is the diabetes target (the Gaussian family has unit observation precision); the means and
scales are kept in :class:`Regression`.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "Dataset",
    "Regression",
    "load_breast_cancer",
    "load_diabetes",
    "load_digits",
    "load_table",
    "load_xy_table",
]


@dataclass(frozen=True)
class Dataset:
    """Observations with optional labels.

    Attributes
    ----------
    y
        Observations, shape ``(n, d)``.
    labels
        Integer labels, shape ``(n,)``, or ``None``.
    name
        Where the data came from.
    columns
        Column names, length ``d``.
    """

    y: torch.Tensor
    labels: torch.Tensor | None
    name: str
    columns: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.y.shape[0])


def load_digits(*, dtype: torch.dtype = torch.float64) -> Dataset:
    """The 1 797 handwritten digits as Binomial(16) counts, with their labels 0–9.

    Examples
    --------
    >>> ds = load_digits()
    >>> tuple(ds.y.shape), int(ds.y.max()), ds.labels.unique().numel()
    ((1797, 64), 16, 10)
    """
    with resources.files("deqppl.data").joinpath("digits.npz").open("rb") as fh:
        arrays = np.load(fh)
        images, labels = arrays["images"], arrays["labels"]
    columns = tuple(f"pixel_{r}_{c}" for r in range(8) for c in range(8))
    return Dataset(
        y=torch.as_tensor(images.astype(np.float64), dtype=dtype),
        labels=torch.as_tensor(labels.astype(np.int64)),
        name="digits",
        columns=columns,
    )


@dataclass(frozen=True)
class Regression:
    """Inputs and a response, for models with covariates (e.g. a kernel GLM).

    Attributes
    ----------
    x
        Inputs, shape ``(n, p)``.
    y
        Responses, shape ``(n,)``.
    name
        Where the data came from.
    x_columns
        Names of the ``p`` input columns.
    y_column
        Name of the response.
    x_mean, x_scale
        ``(p,)``: the raw inputs are ``x * x_scale + x_mean`` (zeros and ones when ``x`` was not
        standardised).
    y_mean, y_scale
        The raw responses are ``y * y_scale + y_mean``.
    """

    x: torch.Tensor
    y: torch.Tensor
    name: str
    x_columns: tuple[str, ...]
    y_column: str
    x_mean: torch.Tensor
    x_scale: torch.Tensor
    y_mean: float = 0.0
    y_scale: float = 1.0

    def __len__(self) -> int:
        return int(self.x.shape[0])


def _load_regression(name: str, dtype: torch.dtype) -> Regression:
    with resources.files("deqppl.data").joinpath(f"{name}.npz").open("rb") as fh:
        arrays = dict(np.load(fh))
    return Regression(
        x=torch.as_tensor(arrays["x"], dtype=dtype),
        y=torch.as_tensor(arrays["y"], dtype=dtype),
        name=name,
        x_columns=tuple(str(c) for c in arrays["x_columns"]),
        y_column=str(arrays["y_column"]),
        x_mean=torch.as_tensor(arrays["x_mean"], dtype=dtype),
        x_scale=torch.as_tensor(arrays["x_scale"], dtype=dtype),
        y_mean=float(arrays["y_mean"]),
        y_scale=float(arrays["y_scale"]),
    )


def load_diabetes(*, dtype: torch.dtype = torch.float64) -> Regression:
    """The 442 diabetes patients: 10 standardised inputs, standardised disease progression.

    Examples
    --------
    >>> ds = load_diabetes()
    >>> tuple(ds.x.shape), tuple(ds.y.shape), ds.x_columns[:3]
    ((442, 10), (442,), ('age', 'sex', 'bmi'))
    >>> round(float(ds.x.mean()), 12), round(float(ds.y.std(unbiased=False)), 12)
    (0.0, 1.0)
    """
    return _load_regression("diabetes", dtype)


def load_breast_cancer(*, dtype: torch.dtype = torch.float64) -> Regression:
    """The 569 Wisconsin breast tumours: 30 standardised inputs, response 1 = benign, 0 = malignant.

    Examples
    --------
    >>> ds = load_breast_cancer()
    >>> tuple(ds.x.shape), sorted(ds.y.unique().tolist()), int(ds.y.sum())
    ((569, 30), [0.0, 1.0], 357)
    """
    return _load_regression("breast_cancer", dtype)


def load_xy_table(
    path: str | Path,
    *,
    y_column: str,
    x_columns: list[str] | None = None,
    standardize: bool = True,
    dtype: torch.dtype = torch.float64,
) -> Regression:
    """Inputs and a response from a CSV or Parquet file, every cell checked first.

    Parameters
    ----------
    path
        ``.csv`` (header row required) or ``.parquet``.
    y_column
        The response column.
    x_columns
        The input columns; default every column but ``y_column``.
    standardize
        Standardise every input column to mean 0 and population sd 1 (as the bundled tables;
        one kernel lengthscale then suits all columns). A constant column is only centred.
    dtype
        Floating dtype of the tensors.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        A column not in the header (the header is listed), or a missing / non-numeric cell
        (naming file, row and column).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "t.csv"
    >>> _ = p.write_text("a,b,c\\n1,2,0\\n3,4,1\\n")
    >>> ds = load_xy_table(p, y_column="c")
    >>> ds.x.tolist(), ds.y.tolist(), ds.x_columns
    ([[-1.0, -1.0], [1.0, 1.0]], [0.0, 1.0], ('a', 'b'))
    """
    table = load_table(path, dtype=dtype)
    header = list(table.columns)
    wanted = [c for c in header if c != y_column] if x_columns is None else list(x_columns)
    unknown = [c for c in [y_column, *wanted] if c not in header]
    if unknown:
        raise ValueError(f"{path}: columns {unknown} not in the header {header}")
    if y_column in wanted:
        raise ValueError(f"{path}: the response column {y_column!r} is also an input column")
    if not wanted:
        raise ValueError(f"{path}: no input columns besides the response {y_column!r}")
    x = table.y[:, [header.index(c) for c in wanted]]
    y = table.y[:, header.index(y_column)]
    mean = x.mean(0) if standardize else torch.zeros(x.shape[1], dtype=dtype)
    scale = x.std(0, unbiased=False) if standardize else torch.ones(x.shape[1], dtype=dtype)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return Regression(
        x=(x - mean) / scale,
        y=y,
        name=table.name,
        x_columns=tuple(wanted),
        y_column=y_column,
        x_mean=mean,
        x_scale=scale,
    )


def load_table(
    path: str | Path,
    *,
    columns: list[str] | None = None,
    label_column: str | None = None,
    dtype: torch.dtype = torch.float64,
) -> Dataset:
    """Load a numeric table from a CSV or Parquet file, checking every cell first.

    The CSV is read with Python's :mod:`csv` module, exactly as written: no column is renamed,
    guessed or skipped, so a quirk of the file is an error naming it rather than data.

    Parameters
    ----------
    path
        ``.csv`` (UTF-8, a header row of unique non-empty names, then one line per data row
        with as many fields as the header; blank lines are skipped) or ``.parquet`` (needs
        ``pyarrow``).
    columns
        Expected observation columns, in order; a header mismatch raises. Default: every
        column except ``label_column``.
    label_column
        Optional column of integer labels kept aside for downstream checks.
    dtype
        ``torch.float64`` or ``torch.float32``, the dtype of the returned tensor.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ImportError
        For a Parquet file without ``pyarrow``, saying what to install.
    TypeError
        If ``dtype`` is not float32 or float64.
    ValueError
        Naming the file and, where it applies, the data row (1-based, blank lines not
        counted; the file's line number in brackets) and column: a directory or unknown suffix,
        an empty file, an empty or duplicated column name, a row with more or fewer fields
        than the header, no data rows, a missing or non-numeric cell, a label that is not a
        whole number, or the header mismatch.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "t.csv"
    >>> _ = p.write_text("a,b\\n1,2\\n3,4\\n")
    >>> tuple(load_table(p).y.shape)
    (2, 2)
    >>> _ = p.write_text("a,a\\n1,2\\n")
    >>> load_table(p)
    Traceback (most recent call last):
    ...
    ValueError: .../t.csv: the header names column 'a' twice (columns 1 and 2); ...
    """
    from deqppl.validation import FLOAT_DTYPES

    if dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"load_table dtype must be one of {[str(d) for d in FLOAT_DTYPES]}, got {dtype!r}"
        )
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    if path.is_dir():
        raise ValueError(f"data file {str(path)!r} is a directory; give a .csv or .parquet file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        header, rows = _read_csv(path)
    elif suffix in (".parquet", ".pq"):
        header, rows = _read_parquet(path)
    else:
        raise ValueError(
            f"data file {str(path)!r} has suffix {suffix!r}; allowed: .csv, .parquet"
        )
    if label_column is not None and label_column not in header:
        raise ValueError(
            f"{path}: label column {label_column!r} not in the header {header}"
        )
    data_cols = [c for c in header if c != label_column]
    if columns is not None and list(columns) != data_cols:
        raise ValueError(
            f"{path}: header mismatch: expected columns {list(columns)}, found {data_cols}"
        )
    if not data_cols:
        raise ValueError(f"{path}: no data columns (the header is {header})")
    if not rows:
        raise ValueError(f"{path}: no data rows below the header; at least one row is needed")
    index = {name: j for j, name in enumerate(header)}
    values = np.empty((len(rows), len(data_cols)), dtype=np.float64)
    for i, (line, cells) in enumerate(rows):
        for j, col in enumerate(data_cols):
            values[i, j] = _parse_cell(cells[index[col]], path, i, col, line)
    labels = None
    if label_column is not None:
        k = index[label_column]
        raw = [_parse_label(cells[k], path, i, label_column, line) for i, (line, cells) in enumerate(rows)]
        labels = torch.as_tensor(np.asarray(raw, dtype=np.int64))
    return Dataset(
        y=torch.as_tensor(values, dtype=dtype),
        labels=labels,
        name=path.name,
        columns=tuple(data_cols),
    )


def _check_header(path: Path, header: list[str]) -> list[str]:
    header = [name.strip() for name in header]
    for j, name in enumerate(header):
        if name == "":
            raise ValueError(
                f"{path}: column {j + 1} of the header has an empty name; every column needs a "
                f"unique, non-empty name"
            )
    seen: dict[str, int] = {}
    for j, name in enumerate(header):
        if name in seen:
            raise ValueError(
                f"{path}: the header names column {name!r} twice (columns {seen[name] + 1} and "
                f"{j + 1}); column names must be unique"
            )
        seen[name] = j
    return header


def _read_csv(path: Path) -> tuple[list[str], list[tuple[int | None, list[str]]]]:
    """Header and ``(line number, cells)`` of each non-blank data row, every row checked."""
    import csv
    import io

    try:
        text = path.read_bytes().decode("utf-8-sig")  # -sig: drop a byte-order mark
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path}: not UTF-8 text (byte {err.start} is {err.object[err.start]:#04x}); save "
            f"the table as a UTF-8 CSV"
        ) from None
    # strict: a stray or unterminated quote is an error, not a cell that swallows the line
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    rows: list[tuple[int | None, list[str]]] = []
    try:
        for cells in reader:
            if not cells:  # a blank line
                continue
            if header is None:
                header = _check_header(path, cells)
                continue
            if len(cells) != len(header):
                raise ValueError(
                    f"{path}: data row {len(rows) + 1} (line {reader.line_num}) has "
                    f"{len(cells)} fields but the header has {len(header)} "
                    f"({', '.join(header)}); every row needs one field per column"
                )
            rows.append((reader.line_num, cells))
    except csv.Error as err:
        raise ValueError(f"{path}: line {reader.line_num} is not valid CSV ({err})") from None
    if header is None:
        raise ValueError(f"{path}: the file is empty; a header row of column names is needed")
    return header, rows


def _read_parquet(path: Path) -> tuple[list[str], list[tuple[int | None, list[str]]]]:
    import pandas as pd

    try:
        frame = pd.read_parquet(path)
    except ImportError:
        raise ImportError(
            f"reading the Parquet file {str(path)!r} needs pyarrow: pip install pyarrow "
            f"(or save the table as .csv)"
        ) from None
    except Exception as err:  # noqa: BLE001 - any reader failure means a damaged/foreign file
        raise ValueError(
            f"{path}: not a readable Parquet file ({type(err).__name__}: {err})"
        ) from None
    header = _check_header(path, [str(c) for c in frame.columns])
    cells = frame.astype(str).values.tolist()
    return header, [(None, row) for row in cells]


def _where(path: Path, row: int, column: str, line: int | None) -> str:
    at = "" if line is None else f" (line {line})"
    return f"{path}: row {row + 1}{at}, column {column!r}"


def _parse_cell(cell: object, path: Path, row: int, column: str, line: int | None = None) -> float:
    text = str(cell).strip()
    where = _where(path, row, column, line)
    if text == "" or text.lower() in ("nan", "na", "null", "none"):
        raise ValueError(f"{where}: missing value {text!r}; every cell must hold a number")
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{where}: non-numeric value {text!r}") from None
    if not np.isfinite(value):
        raise ValueError(f"{where}: non-finite value {text!r}; only finite numbers are allowed")
    return value


#: Labels above 2**53 cannot all be told apart once parsed as floats.
_MAX_LABEL = 2**53


def _parse_label(cell: object, path: Path, row: int, column: str, line: int | None) -> int:
    value = _parse_cell(cell, path, row, column, line)
    if value != round(value) or abs(value) > _MAX_LABEL:
        raise ValueError(
            f"{_where(path, row, column, line)}: label {str(cell).strip()!r} is not a whole "
            f"number; class labels must be integers (at most 2**53 in size)"
        )
    return int(value)
