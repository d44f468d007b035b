r"""Out-of-core amortised encoding: a Parquet/CSV table of any size through a fitted encoder.

:func:`encode` streams the observations in chunks of ``chunk_rows`` rows (Arrow record batches:
:meth:`pyarrow.parquet.ParquetFile.iter_batches`, :func:`pyarrow.csv.open_csv`), validates each
chunk with the model (errors name the file's global row and the column), solves the fixed point
$z^* = f(z^*; y)$ of every row and writes, per row, the latents, whether the solve converged, its
residual $\lVert f(z)-z\rVert$ and the Laplace standard deviations $\sqrt{\mathrm{diag}\,H^{-1}}$
(SPEC §2.5). Memory is bounded by the chunk (and by a Parquet file's row group, which Arrow
decodes whole: write big files with row groups of at most a few hundred thousand rows).

Resuming
--------
Finished chunks are written at once, each as a Parquet part with a JSON record of its SHA-256,
into ``.{out name}.parts/{fingerprint}/`` next to ``out``. The fingerprint is a digest of the
model (its configuration and tensors), the data file's bytes, the column names, ``chunk_rows``,
``laplace``, the dtype and the deqppl and torch versions, so a part of another model, data file
or setting is never reused. Run the same call again after an interruption: finished parts are
checked and skipped, a damaged or missing part is recomputed. ``out`` itself appears only at the
end, by an atomic rename of the assembled parts, so nothing at ``out`` is ever half-finished;
the parts are then removed. Chunks are solved independently and deterministically, so a resumed
run's output equals an uninterrupted run's.

Output columns
--------------
``row`` (int64, the row of the data file), the latents (site ``z`` of width $l$: ``z_0 …
z_{l-1}``; several sites, e.g. ``z1_0 …, z2_0 …``), ``converged`` (bool), ``residual``
(float64) and, with ``laplace=True``, ``sd_z_0 …`` (NaN where the Hessian is not positive
definite, which only rectified nonlinearities allow).
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deqppl._progress import counter
from deqppl.validation import table_positions

__all__ = ["DEFAULT_CHUNK_ROWS", "EncodeResult", "EncodeStatus", "encode"]

#: Rows per chunk by default: 10 000 rows of 50 float64 columns are 4 MB of observations, and
#: the per-chunk overhead (validation, one batched solve, one Parquet part) is then a few
#: percent of the solve (measured with benchmarks/bench_scale.py).
DEFAULT_CHUNK_ROWS = 10_000
#: Version of the parts' layout and output schema; part of the fingerprint.
OUTPUT_VERSION = 1
_DATA_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}
_HASH_BLOCK = 8 * 2**20


class EncodeStatus(enum.Enum):
    """Outcome of :func:`encode` over all rows."""

    #: Every row's fixed point converged.
    CONVERGED = "converged"
    #: Some rows did not converge: their ``converged`` column is false (their latents are the
    #: iterate with the smallest residual, as :class:`~deqppl.deq.Solution` returns).
    NOT_CONVERGED = "not_converged"


@dataclass(frozen=True)
class EncodeResult:
    """What :func:`encode` did.

    Attributes
    ----------
    out_path
        The Parquet file written.
    num_rows, num_chunks
        Rows encoded and chunks they were cut into.
    num_reused
        Chunks found finished (from an interrupted run) and not recomputed.
    num_redone
        Chunks whose stored part was damaged (checksum or row count) and were recomputed.
    num_converged
        Rows whose solve converged.
    max_residual
        Largest residual $\\lVert f(z)-z\\rVert$ over the rows.
    status
        :class:`EncodeStatus`.
    wall_time
        Seconds of the whole call.
    columns
        The output columns.
    """

    out_path: Path
    num_rows: int
    num_chunks: int
    num_reused: int
    num_redone: int
    num_converged: int
    max_residual: float
    status: EncodeStatus
    wall_time: float
    columns: tuple[str, ...]

    @property
    def converged(self) -> bool:
        """Whether every row converged."""
        return self.status is EncodeStatus.CONVERGED


# --------------------------------------------------------------------------------------------
# the data file
# --------------------------------------------------------------------------------------------
def _data_format(path: Path) -> str:
    try:
        return _DATA_SUFFIXES[path.suffix.lower()]
    except KeyError:
        raise ValueError(
            f"data file {path} has the suffix {path.suffix!r}; encode reads "
            f"{', '.join(sorted(_DATA_SUFFIXES))} files"
        ) from None


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def _check_schema(path: Path, names: list[str], wanted: list[str]) -> None:
    missing = [c for c in wanted if c not in names]
    if missing:
        raise ValueError(
            f"data file {path} lacks the model's observation columns {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''} ({len(missing)} of {len(wanted)} missing); "
            f"the model reads {wanted[0]} ... {wanted[-1]}, the file has {names[:10]}"
            f"{' ...' if len(names) > 10 else ''}"
        )


def _batches(path: Path, fmt: str, columns: list[str], chunk_rows: int):
    """(total rows or None, iterator of record batches of the observation columns)."""
    import pyarrow as pa

    if fmt == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
        _check_schema(path, schema.names, columns)
        for c in columns:
            t = schema.field(c).type
            if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
                raise TypeError(
                    f"column {c!r} of {path} has Arrow type {t}; observation columns must be "
                    f"numeric (integer, floating or boolean)"
                )
        return pf.metadata.num_rows, pf.iter_batches(batch_size=chunk_rows, columns=columns)
    import pyarrow.csv as pacsv

    # Read as strings and convert here: Arrow's own conversion error names the column but not
    # the row, and the rule is that bad input names the global row.
    with open(path, "rb") as fh:
        first = pacsv.open_csv(fh, read_options=pacsv.ReadOptions(block_size=1 << 16))
        _check_schema(path, first.schema.names, columns)
    reader = pacsv.open_csv(
        path,
        convert_options=pacsv.ConvertOptions(
            include_columns=columns, column_types={c: pa.string() for c in columns}
        ),
    )
    return None, iter(reader)


def _rechunk(batches, chunk_rows: int) -> Iterator:
    """Tables of exactly ``chunk_rows`` rows (the last may be shorter), whatever the batches."""
    import pyarrow as pa

    buf, n = [], 0
    for batch in batches:
        while batch.num_rows:
            take = min(chunk_rows - n, batch.num_rows)
            buf.append(batch.slice(0, take))
            n += take
            batch = batch.slice(take)
            if n == chunk_rows:
                yield pa.Table.from_batches(buf)
                buf, n = [], 0
    if n:
        yield pa.Table.from_batches(buf)


def _column(table, name: str, first_row: int, path: Path) -> np.ndarray:
    """One observation column as float64 numbers, or an error naming the global row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = table.column(name)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        try:
            col = pc.cast(col, pa.float64())
        except pa.ArrowInvalid:
            for i, text in enumerate(col.to_pylist()):
                try:
                    float(text)
                except (TypeError, ValueError):
                    raise ValueError(
                        f"{path}: row {first_row + i}, column {name!r} holds {text!r}, which is not "
                        f"a number"
                    ) from None
            raise
    if col.null_count:
        i = pc.index(pc.is_null(col), True).as_py()
        raise ValueError(f"{path}: row {first_row + i}, column {name!r} is empty (null); every observation needs a value")
    return col.to_numpy().astype(np.float64)  # a writable copy (Arrow buffers are read-only)


# --------------------------------------------------------------------------------------------
# fingerprints and parts
# --------------------------------------------------------------------------------------------
def _model_digest(encoder) -> str:
    from .model_file import digest

    tensors = {k: v.detach() for k, v in encoder.state_dict().items()}
    try:
        config = json.dumps(
            {"encoder": type(encoder).__qualname__, "config": encoder.config(), "model": encoder.model.config()},
            sort_keys=True,
        )
    except (TypeError, AttributeError):
        # an encoder outside the saved-model protocol: its repr may hold object addresses,
        # so its parts are at worst not reused by another process, never wrongly reused
        config = repr((type(encoder).__qualname__, encoder.model, encoder.solver, encoder.adjoint, encoder.throw))
    return digest(config, tensors)


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _finished(part: Path, record: Path, first_row: int, num_rows: int) -> dict | None:
    """The record of a finished part if the part is intact, else None."""
    if not (part.is_file() and record.is_file()):
        return None
    try:
        info = json.loads(record.read_text())
    except ValueError:
        return None
    if info.get("first_row") != first_row or info.get("num_rows") != num_rows:
        return None
    if _file_sha256(part) != info.get("sha256"):
        return None
    return info


# --------------------------------------------------------------------------------------------
# one chunk
# --------------------------------------------------------------------------------------------
def _names(site: str, shape: tuple[int, ...]) -> list[str]:
    width = int(np.prod(shape)) if shape else 1
    return [site] if not shape else [f"{site}_{j}" for j in range(width)]


def _encode_chunk(
    encoder,
    table,
    columns: Mapping[str, tuple[str, ...]],
    vectors: frozenset[str],
    first_row: int,
    path: Path,
    laplace: bool,
):
    """Validate, solve and tabulate one chunk; ``vectors`` are the data names of shape ``(N,)``."""
    import pyarrow as pa

    arrays = {}
    for name, cols in columns.items():
        values = [_column(table, c, first_row, path) for c in cols]
        arrays[name] = values[0] if name in vectors else np.stack(values, axis=1)
    data = {name: torch.from_numpy(a) for name, a in arrays.items()}
    try:
        with table_positions(first_row=first_row, columns=columns):
            data = encoder.check_data(data)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    with torch.no_grad():
        sol = encoder.solve(data, validated=True, throw=False)
        z = sol.value.detach()
        n = z.shape[0]
        sites = encoder.to_sites(z, data)
        flat = z.reshape(n, -1)
        parts = [v.reshape(n, -1) for v in sites.values()]
        if not torch.equal(torch.cat(parts, dim=1), flat):
            raise TypeError(
                f"encode writes the sites of {type(encoder).__name__} column by column with the fixed "
                f"point's Laplace sds; its to_sites is not a split of the fixed point into the sites"
            )
        out = {"row": pa.array(np.arange(first_row, first_row + n, dtype=np.int64))}
        for site, v in sites.items():
            for j, name in enumerate(_names(site, tuple(v.shape[1:]))):
                out[name] = pa.array(v.reshape(n, -1)[:, j].cpu().to(torch.float64).numpy())
        out["converged"] = pa.array(sol.converged.cpu().numpy())
        out["residual"] = pa.array(sol.residual.detach().cpu().to(torch.float64).numpy())
        if laplace:
            H = encoder.hessian(z, data)
            chol, info = torch.linalg.cholesky_ex(H)
            ok = info == 0
            eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
            chol = torch.where(ok[:, None, None], chol, eye)  # placeholder rows, masked below
            var = torch.cholesky_inverse(chol).diagonal(dim1=-2, dim2=-1)
            sd = torch.where(ok[:, None], var.sqrt(), torch.full_like(var, float("nan")))
            start = 0
            for site, v in sites.items():
                width = v.reshape(n, -1).shape[1]
                for j, name in enumerate(_names(site, tuple(v.shape[1:]))):
                    out[f"sd_{name}"] = pa.array(sd[:, start + j].cpu().to(torch.float64).numpy())
                start += width
    return pa.table(out), int(sol.converged.sum()), float(sol.residual.max()) if n else 0.0


# --------------------------------------------------------------------------------------------
# the entry point
# --------------------------------------------------------------------------------------------
def encode(
    encoder,
    data_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    laplace: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> EncodeResult:
    """Encode every row of a Parquet/CSV file with a fitted encoder, chunk by chunk, resumably.

    Parameters
    ----------
    encoder
        A model file written by :func:`deqppl.io.save` (path), or an encoder of the protocol
        (:class:`~deqppl.encoders.AbstractMAPEncoder`). Its dtype is the computation's.
    data_path
        ``.parquet``/``.pq`` or ``.csv`` file holding the model's observation columns (for a
        model file, the columns stored in it; for an encoder,
        :func:`deqppl.io.default_columns`: ``y_0 … y_{d-1}``). Other columns are ignored.
    out_path
        The Parquet file to write (see the module notes for its columns). Written only at the
        end, atomically.
    chunk_rows
        Rows per chunk: memory is bounded by it, and it is the unit of resumption.
    laplace
        Also write the Laplace standard deviations.
    overwrite
        Replace an existing ``out_path`` (at the end); otherwise an existing file is an error.
    progress
        Show a progress bar in rows.
    device
        Where to solve when ``encoder`` is a model file (e.g. ``"cuda"``); an encoder object is
        used where it is. Chunks are moved there and results back to the CPU.

    Returns
    -------
    EncodeResult

    Raises
    ------
    FileNotFoundError
        A missing model or data file.
    ValueError
        Before any work: ``out_path`` exists (without ``overwrite``), an unknown data suffix,
        missing observation columns, bad ``chunk_rows``; for a chunk, before it is solved: an
        empty, non-numeric, non-finite or out-of-support value, naming the file's global row
        and the column. Finished chunks stay stored for a re-run; nothing is written at
        ``out_path``.
    TypeError
        A non-numeric column type (Parquet), or something that is not an encoder.

    Examples
    --------
    >>> import tempfile, torch
    >>> import pyarrow as pa, pyarrow.parquet as pq
    >>> from pathlib import Path
    >>> from deqppl.encoders import PEDEncoder
    >>> from deqppl.expfam import family
    >>> from deqppl.models import ExpFamPCA
    >>> model = ExpFamPCA(family=family("poisson"), obs_dim=3, latent_dim=2)
    >>> enc = PEDEncoder(model).double()
    >>> y = model.simulate(25, seed=1, dtype=torch.float64).data["y"]
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     data = Path(tmp) / "y.parquet"
    ...     pq.write_table(pa.table({f"y_{j}": y[:, j].numpy() for j in range(3)}), data)
    ...     res = encode(enc, data, Path(tmp) / "z.parquet", chunk_rows=10, progress=False)
    ...     out = pq.read_table(res.out_path)
    >>> res.num_rows, res.num_chunks, res.status.name, out.column_names[:4]
    (25, 3, 'CONVERGED', ['row', 'z_0', 'z_1', 'converged'])
    >>> z = torch.stack([torch.from_numpy(out.column(c).to_numpy()) for c in ("z_0", "z_1")], 1)
    >>> bool((z - enc.solve(y).value).abs().max() < 1e-10)
    True
    """
    from deqppl import __version__
    from deqppl.encoders.base import AbstractMAPEncoder

    from .model_file import default_columns, load, read_info

    start_time = time.perf_counter()
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    for flag, value in (("laplace", laplace), ("overwrite", overwrite), ("progress", progress)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be True or False, got {value!r}")
    data_path, out_path = Path(data_path), Path(out_path)
    if isinstance(encoder, (str, os.PathLike)):
        model_path = Path(encoder)
        columns = read_info(model_path).columns
        encoder = load(model_path, device=device)
    elif isinstance(encoder, AbstractMAPEncoder):
        if device is not None:
            raise ValueError(
                "device is for a model file path; an encoder object is used on its own device "
                "(move it with encoder.to(device))"
            )
        columns = default_columns(encoder.model)
    else:
        raise TypeError(
            f"encode needs a model file path or an encoder of the protocol "
            f"(deqppl.encoders.AbstractMAPEncoder), got {type(encoder).__name__}"
        )
    fmt = _data_format(data_path)
    if not data_path.is_file():
        raise FileNotFoundError(f"data file {data_path} does not exist")
    if out_path.exists() and not overwrite:
        raise ValueError(
            f"{out_path} exists; encode writes its output only when every chunk is done and does "
            f"not replace a file unless overwrite=True (deqppl encode --overwrite)"
        )
    if out_path.suffix.lower() not in (".parquet", ".pq"):
        raise ValueError(f"out_path {out_path} must be a .parquet file (the latents are written as Parquet)")
    if not out_path.parent.is_dir():
        raise FileNotFoundError(f"the folder of out_path, {out_path.parent}, does not exist")
    wanted = [c for cols in columns.values() for c in cols]
    vectors = frozenset(k for k, v in default_columns(encoder.model).items() if v == (k,))
    total, batches = _batches(data_path, fmt, wanted, chunk_rows)

    ref = next(iter(encoder.parameters()), None)
    fingerprint_inputs = {
        "output_version": OUTPUT_VERSION,
        "model": _model_digest(encoder),
        "data": _file_sha256(data_path),
        "columns": {k: list(v) for k, v in columns.items()},
        "chunk_rows": chunk_rows,
        "laplace": laplace,
        "dtype": str(ref.dtype) if ref is not None else None,
        "device": str(ref.device) if ref is not None else None,
        "deqppl": __version__,
        "torch": torch.__version__,
    }
    fingerprint = hashlib.sha256(json.dumps(fingerprint_inputs, sort_keys=True).encode()).hexdigest()
    root = out_path.parent / f".{out_path.name}.parts"
    parts_dir = root / fingerprint[:16]
    parts_dir.mkdir(parents=True, exist_ok=True)
    run_file = parts_dir / "run.json"
    if not run_file.is_file():
        _write_atomic(run_file, lambda p: p.write_text(json.dumps(fingerprint_inputs, indent=1, sort_keys=True)))

    import pyarrow.parquet as pq

    num_rows = num_chunks = reused = redone = converged = 0
    max_residual = 0.0
    out_columns: tuple[str, ...] = ()
    with counter(total=total, enable=progress, desc="encode", unit="rows") as bar:
        for k, table in enumerate(_rechunk(batches, chunk_rows)):
            first, n = k * chunk_rows, table.num_rows
            part = parts_dir / f"part-{k:06d}.parquet"
            record = parts_dir / f"part-{k:06d}.json"
            info = _finished(part, record, first, n)
            if info is not None:
                reused += 1
            else:
                if part.exists() or record.exists():
                    redone += 1
                    record.unlink(missing_ok=True)
                result, n_conv, max_res = _encode_chunk(encoder, table, columns, vectors, first, data_path, laplace)
                _write_atomic(part, lambda p, t=result: pq.write_table(t, p))
                info = {
                    "chunk": k,
                    "first_row": first,
                    "num_rows": n,
                    "num_converged": n_conv,
                    "max_residual": max_res,
                    "columns": result.column_names,
                    "sha256": _file_sha256(part),
                }
                _write_atomic(record, lambda p, i=info: p.write_text(json.dumps(i, sort_keys=True)))
            out_columns = tuple(info["columns"])
            converged += info["num_converged"]
            max_residual = max(max_residual, info["max_residual"])
            num_rows += n
            num_chunks += 1
            bar.update(n)
            del table

    if num_chunks == 0:
        raise ValueError(f"data file {data_path} has no rows")

    def assemble(tmp: Path) -> None:
        writer = None
        try:
            for k in range(num_chunks):
                t = pq.read_table(parts_dir / f"part-{k:06d}.parquet")
                if writer is None:
                    writer = pq.ParquetWriter(tmp, t.schema)
                writer.write_table(t)
        finally:
            if writer is not None:
                writer.close()

    _write_atomic(out_path, assemble)
    shutil.rmtree(parts_dir, ignore_errors=True)
    try:
        root.rmdir()  # only if no other run's parts are left in it
    except OSError:
        pass
    return EncodeResult(
        out_path=out_path,
        num_rows=num_rows,
        num_chunks=num_chunks,
        num_reused=reused,
        num_redone=redone,
        num_converged=converged,
        max_residual=max_residual,
        status=EncodeStatus.CONVERGED if converged == num_rows else EncodeStatus.NOT_CONVERGED,
        wall_time=time.perf_counter() - start_time,
        columns=out_columns,
    )
