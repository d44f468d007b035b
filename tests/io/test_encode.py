"""Out-of-core encoding (deqppl.io.encode, ``deqppl encode``): equals the in-memory solve,
validates every chunk naming the global row and column, resumes after an interruption (also
SIGKILL) without redoing finished chunks, and never leaves anything at ``out`` before the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch

from deqppl import io
from deqppl.encoders import AbstractMAPEncoder, DeepPEDEncoder, PEDEncoder
from deqppl.expfam import family
from deqppl.io import stream
from deqppl.models import ExpFamPCA, HierarchicalExpFamPCA

D, L = 8, 3


def _poisson(n: int, *, seed: int = 0):
    # param_scale 0.5 keeps the counts moderate (natural parameters of variance 0.25 (l/lam + 1))
    model = ExpFamPCA(family=family("poisson"), obs_dim=D, latent_dim=L, param_scale=0.5)
    sim = model.simulate(n, seed=seed, dtype=torch.float64)
    return PEDEncoder.from_values(model, sim.truth), sim.data["y"]


def _table(y: torch.Tensor, names=None, extra: bool = True) -> pa.Table:
    names = names or [f"y_{j}" for j in range(y.shape[1])]
    cols = {"cell": pa.array([f"c{i}" for i in range(y.shape[0])])} if extra else {}
    cols.update({c: pa.array(y[:, j].numpy().astype(np.int64)) for j, c in enumerate(names)})
    return pa.table(cols)


def _write(tmp_path: Path, y: torch.Tensor, *, name="y.parquet", row_group_size=None) -> Path:
    path = tmp_path / name
    table = _table(y)
    if path.suffix == ".csv":
        pacsv.write_csv(table, path)
    else:
        pq.write_table(table, path, row_group_size=row_group_size)
    return path


def _matrix(table: pa.Table, prefix: str, width: int) -> torch.Tensor:
    return torch.stack([torch.from_numpy(table.column(f"{prefix}_{j}").to_numpy().copy()) for j in range(width)], 1)


def _parts(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.parts/*/part-*.json"))


@pytest.fixture
def problem(tmp_path):
    enc, y = _poisson(95)
    model_path = io.save(tmp_path / "m.deqppl", enc)
    return enc, y, model_path, _write(tmp_path, y, row_group_size=40)


# ------------------------------------------------------------------ equals the in-memory solve
def test_encode_equals_in_memory_solve_and_laplace(problem, tmp_path):
    enc, y, model_path, data = problem
    res = io.encode(model_path, data, tmp_path / "z.parquet", chunk_rows=20, progress=False)
    assert (res.num_rows, res.num_chunks, res.num_reused, res.status) == (95, 5, 0, io.EncodeStatus.CONVERGED)
    out = pq.read_table(res.out_path)
    assert out.column_names == ["row", "z_0", "z_1", "z_2", "converged", "residual", "sd_z_0", "sd_z_1", "sd_z_2"]
    assert out.column("row").to_pylist() == list(range(95))
    rows = torch.tensor([0, 19, 20, 41, 77, 94])  # a sample across chunk boundaries
    sol = enc.solve(y[rows])
    z = _matrix(out, "z", L)[rows]
    # 1e-10: the bound; both solves stop at the same rtol from the same start
    assert (z - sol.value.detach()).abs().max() < 1e-10
    assert all(out.column("converged").to_pylist())
    # Laplace sds against an independent Hessian: autograd through the Pyro trace of the model
    # (the protocol's generic hessian), not the PED closed form that encode uses
    data_rows = enc.check_data(y[rows])
    H = AbstractMAPEncoder.hessian(enc, z, data_rows)
    sd = torch.linalg.inv(H).diagonal(dim1=-2, dim2=-1).sqrt()
    assert torch.allclose(_matrix(out, "sd_z", L)[rows], sd, rtol=1e-10, atol=0)  # float64 round-off of two Hessians
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "parts removed at the end"


def test_encoder_object_csv_and_chunking_give_the_same_latents(problem, tmp_path):
    enc, y, model_path, data = problem
    a = pq.read_table(io.encode(model_path, data, tmp_path / "a.parquet", chunk_rows=1000, progress=False).out_path)
    csv = _write(tmp_path, y, name="y.csv")
    b = pq.read_table(io.encode(enc, csv, tmp_path / "b.parquet", chunk_rows=7, laplace=False, progress=False).out_path)
    assert "sd_z_0" not in b.column_names
    # 1e-10: a row's solve does not depend on its chunk's other rows (per-row convergence)
    assert (_matrix(a, "z", L) - _matrix(b, "z", L)).abs().max() < 1e-10


def test_deep_encoder_sites(tmp_path):
    model = HierarchicalExpFamPCA(widths=(5, 3, 2), param_scale=0.5)
    sim = model.simulate(30, seed=1, dtype=torch.float64)
    enc = DeepPEDEncoder(model, sim.truth)
    data = tmp_path / "y.parquet"
    pq.write_table(pa.table({f"y_{j}": sim.data["y"][:, j].numpy() for j in range(5)}), data)
    res = io.encode(io.save(tmp_path / "d.deqppl", enc), data, tmp_path / "z.parquet", chunk_rows=8, progress=False)
    out = pq.read_table(res.out_path)
    assert [c for c in out.column_names if c.startswith("z")] == ["z1_0", "z1_1", "z1_2", "z2_0", "z2_1"]
    (z1, z2), _ = enc(sim.data["y"])
    assert (_matrix(out, "z1", 3) - z1.detach()).abs().max() < 1e-10  # the bound
    assert (_matrix(out, "z2", 2) - z2.detach()).abs().max() < 1e-10


# ------------------------------------------------------------------ bad input
def _nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.parts/*/part-*")), "no part before the first solve"


def test_columns_must_match_the_model(problem, tmp_path):
    enc, y, model_path, _ = problem
    data = tmp_path / "renamed.parquet"
    pq.write_table(_table(y, names=[f"gene{j}" for j in range(D)]), data)
    out = tmp_path / "z.parquet"
    with pytest.raises(ValueError, match=r"lacks the model's observation columns \['y_0', .*8 of 8 missing.*'gene0'"):
        io.encode(model_path, data, out, progress=False)
    _nothing_written(out)
    # columns stored in the model file at save time are what is read
    named = io.save(tmp_path / "named.deqppl", enc, columns=[f"gene{j}" for j in range(D)])
    assert io.encode(named, data, out, progress=False).converged


def test_non_numeric_column(problem, tmp_path):
    _, y, model_path, _ = problem
    table = _table(y).set_column(3, "y_2", pa.array(["a"] * y.shape[0]))
    data = tmp_path / "s.parquet"
    pq.write_table(table, data)
    out = tmp_path / "z.parquet"
    with pytest.raises(TypeError, match="column 'y_2' of .*s.parquet has Arrow type string"):
        io.encode(model_path, data, out, progress=False)
    _nothing_written(out)


@pytest.mark.parametrize(
    ("value", "message"),
    [(-1, "has value -1.0 at row 57, column 4 \\('y_4'\\), outside the allowed values \\(poisson\\(\\) needs"),
     (2.5, "has value 2.5 at row 57, column 4 \\('y_4'\\)"),
     (float("nan"), "non-finite value nan at row 57, column 4 \\('y_4'\\)"),
     (None, "row 57, column 'y_4' is empty \\(null\\)")],
    ids=["negative", "fraction", "nan", "null"],
)
def test_out_of_support_value_names_the_global_row(problem, tmp_path, value, message):
    _, y, model_path, _ = problem
    values = y[:, 4].tolist()
    values[57] = value
    table = _table(y).set_column(5, "y_4", pa.array(values, type=pa.float64()))
    data = tmp_path / "bad.parquet"
    pq.write_table(table, data)
    out = tmp_path / "z.parquet"
    with pytest.raises(ValueError, match=message):
        io.encode(model_path, data, out, chunk_rows=20, progress=False)
    assert not out.exists()
    assert len(_parts(out)) == 2, "chunks 0-1 (rows 0-39) finished and kept; chunk 2 (row 57) rejected before its solve"


def test_csv_text_names_the_global_row(problem, tmp_path):
    _, y, model_path, _ = problem
    lines = _write(tmp_path, y, name="y.csv").read_text().splitlines()
    cells = lines[1 + 61].split(",")
    cells[3] = '"seven"'  # y_2 of row 61
    lines[1 + 61] = ",".join(cells)
    data = tmp_path / "bad.csv"
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="bad.csv: row 61, column 'y_2' holds 'seven', which is not a number"):
        io.encode(model_path, data, tmp_path / "z.parquet", chunk_rows=25, progress=False)


def test_bad_arguments_before_any_work(problem, tmp_path):
    _, _, model_path, data = problem
    out = tmp_path / "z.parquet"
    out.write_text("someone's file")
    with pytest.raises(ValueError, match="z.parquet exists; .*overwrite=True"):
        io.encode(model_path, data, out, progress=False)
    assert out.read_text() == "someone's file"
    with pytest.raises(ValueError, match="suffix '.json'"):
        io.encode(model_path, tmp_path / "y.json", tmp_path / "w.parquet", progress=False)
    with pytest.raises(ValueError, match="chunk_rows must be a positive integer, got 0"):
        io.encode(model_path, data, tmp_path / "w.parquet", chunk_rows=0, progress=False)
    with pytest.raises(TypeError, match="model file path or an encoder"):
        io.encode(42, data, tmp_path / "w.parquet", progress=False)
    assert not list(tmp_path.glob(".w.parquet.parts"))


def test_cli_reports_bad_input_with_exit_status_2(problem, tmp_path, capsys):
    from deqppl.cli import main

    _, _, model_path, _ = problem
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model at all, but long enough")
    code = main(["encode", "--model", str(notes), "--data", str(tmp_path / "y.parquet"), "--out", str(tmp_path / "z.parquet")])
    assert code == 2
    assert "notes.txt is not a deqppl model file" in capsys.readouterr().err


# ------------------------------------------------------------------ resuming
def test_interrupted_run_resumes_and_equals_an_uninterrupted_run(problem, tmp_path, monkeypatch):
    _, _, model_path, data = problem
    full = pq.read_table(io.encode(model_path, data, tmp_path / "full.parquet", chunk_rows=10, progress=False).out_path)

    out = tmp_path / "z.parquet"
    real = stream._encode_chunk
    calls = []

    def interrupted(encoder, table, columns, vectors, first_row, *args):
        calls.append(first_row)
        if first_row == 40 and len(calls) == 5:  # the first run only: rows 0..39 are done
            raise KeyboardInterrupt
        return real(encoder, table, columns, vectors, first_row, *args)

    monkeypatch.setattr(stream, "_encode_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        io.encode(model_path, data, out, chunk_rows=10, progress=False)
    assert not out.exists() and len(_parts(out)) == 4

    # damage one finished part: it must be detected by its checksum and redone
    damaged = sorted(out.parent.glob(f".{out.name}.parts/*/part-000002.parquet"))[0]
    raw = bytearray(damaged.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    damaged.write_bytes(bytes(raw))

    calls.clear()
    res = io.encode(model_path, data, out, chunk_rows=10, progress=False)
    assert (res.num_reused, res.num_redone, res.num_chunks) == (3, 1, 10)
    assert calls == [20, 40, 50, 60, 70, 80, 90], "finished chunks 0, 1, 3 are not recomputed"
    assert pq.read_table(out).equals(full)


def test_parts_of_other_settings_or_data_are_not_reused(problem, tmp_path, monkeypatch):
    _, y, model_path, data = problem
    out = tmp_path / "z.parquet"
    real = stream._encode_chunk

    def stop_at_30(encoder, table, columns, vectors, first_row, *args):
        if first_row == 30:
            raise KeyboardInterrupt
        return real(encoder, table, columns, vectors, first_row, *args)

    monkeypatch.setattr(stream, "_encode_chunk", stop_at_30)
    with pytest.raises(KeyboardInterrupt):
        io.encode(model_path, data, out, chunk_rows=10, progress=False)
    monkeypatch.setattr(stream, "_encode_chunk", real)
    assert io.encode(model_path, data, out, chunk_rows=10, laplace=False, progress=False).num_reused == 0
    out.unlink()
    other = _write(tmp_path, y.flip(0), name="other.parquet")
    assert io.encode(model_path, other, out, chunk_rows=10, progress=False).num_reused == 0
    out.unlink()
    enc2, _ = _poisson(5, seed=9)
    assert io.encode(io.save(tmp_path / "m2.deqppl", enc2), data, out, chunk_rows=10, progress=False).num_reused == 0
    out.unlink()
    assert io.encode(model_path, data, out, chunk_rows=10, progress=False).num_reused == 3  # the first run's parts


@pytest.mark.slow
def test_sigkill_half_way_then_resume(tmp_path):
    enc, y = _poisson(12_000, seed=3)
    model_path = io.save(tmp_path / "m.deqppl", enc)
    data = _write(tmp_path, y, row_group_size=2000)
    out = tmp_path / "z.parquet"
    cmd = [sys.executable, "-m", "deqppl", "encode", "--model", str(model_path), "--data", str(data),
           "--out", str(out), "--chunk-rows", "100", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while len(_parts(out)) < 5 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"finished or failed before it could be killed: {proc.stderr.read().decode()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    done = len(_parts(out))
    assert 5 <= done < 120 and not out.exists()

    res = io.encode(model_path, data, out, chunk_rows=100, progress=False)
    assert res.num_reused >= done - 1  # a part being renamed at the kill may lack its record
    assert res.num_reused + res.num_redone <= done + 1
    full = io.encode(model_path, data, tmp_path / "full.parquet", chunk_rows=100, progress=False)
    assert pq.read_table(out).equals(pq.read_table(full.out_path))
    assert json.loads(json.dumps(res.num_rows)) == 12_000


def test_device_of_a_model_file(problem, tmp_path):
    enc, y, model_path, data = problem
    res = io.encode(model_path, data, tmp_path / "z.parquet", chunk_rows=50, device="cpu", progress=False)
    assert res.converged
    with pytest.raises(ValueError, match="device is for a model file path"):
        io.encode(enc, data, tmp_path / "w.parquet", device="cpu", progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")
def test_encode_on_cuda_equals_cpu(problem, tmp_path):
    _, _, model_path, data = problem
    cpu = pq.read_table(io.encode(model_path, data, tmp_path / "c.parquet", chunk_rows=30, progress=False).out_path)
    gpu = pq.read_table(io.encode(model_path, data, tmp_path / "g.parquet", chunk_rows=30, device="cuda", progress=False).out_path)
    # 1e-10: the same float64 Newton iteration; GEMMs differ in summation order on the GPU
    assert (_matrix(cpu, "z", L) - _matrix(gpu, "z", L)).abs().max() < 1e-10
    assert gpu.column("converged").to_pylist() == cpu.column("converged").to_pylist()
