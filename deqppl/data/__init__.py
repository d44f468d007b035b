"""Built-in data and loaders for a user's own files.

The handwritten digits ship inside the package (``digits.npz``, 45 kB): the 1 797 images of
8×8 pixel counts 0–16 of the UCI optical-recognition data set as distributed with scikit-learn
(``sklearn.datasets.load_digits``, BSD-3 licence), so nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

__all__ = ["Dataset", "load_digits", "load_table"]


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


def load_table(
    path: str | Path,
    *,
    columns: list[str] | None = None,
    label_column: str | None = None,
    dtype: torch.dtype = torch.float64,
) -> Dataset:
    """Load a numeric table from a CSV or Parquet file, checking every cell first.

    Parameters
    ----------
    path
        ``.csv`` (header row required) or ``.parquet`` (needs ``pyarrow``).
    columns
        Expected observation columns, in order; a header mismatch raises. Default: every
        column except ``label_column``.
    label_column
        Optional column of integer labels kept aside for downstream checks.
    dtype
        Floating dtype of the returned tensor.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        Naming the file, row (1-based data row) and column of the first missing or non-numeric
        cell, or the header mismatch.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "t.csv"
    >>> _ = p.write_text("a,b\\n1,2\\n3,4\\n")
    >>> tuple(load_table(p).y.shape)
    (2, 2)
    """
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    elif suffix in (".parquet", ".pq"):
        frame = pd.read_parquet(path).astype(str)
    else:
        raise ValueError(
            f"data file {str(path)!r} has suffix {suffix!r}; allowed: .csv, .parquet"
        )
    header = [str(c) for c in frame.columns]
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
        raise ValueError(f"{path}: no data columns")
    values = np.empty((len(frame), len(data_cols)), dtype=np.float64)
    for j, col in enumerate(data_cols):
        for i, cell in enumerate(frame[col].tolist()):
            values[i, j] = _parse_cell(cell, path, i, col)
    labels = None
    if label_column is not None:
        raw = [_parse_cell(c, path, i, label_column) for i, c in enumerate(frame[label_column])]
        labels = torch.as_tensor(np.asarray(raw, dtype=np.int64))
    return Dataset(
        y=torch.as_tensor(values, dtype=dtype),
        labels=labels,
        name=path.name,
        columns=tuple(data_cols),
    )


def _parse_cell(cell: object, path: Path, row: int, column: str) -> float:
    text = str(cell).strip()
    where = f"{path}: row {row + 1}, column {column!r}"
    if text == "" or text.lower() in ("nan", "na", "null", "none"):
        raise ValueError(f"{where}: missing value {text!r}; every cell must hold a number")
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{where}: non-numeric value {text!r}") from None
    if not np.isfinite(value):
        raise ValueError(f"{where}: non-finite value {text!r}")
    return value
