"""Cells of tutorial 09, "A million rows" (issue 16); `build.py` writes the notebook.

Kept in its own file so that the tutorial can be edited without touching the others;
``python tutorials/build.py`` regenerates every notebook, this one included.
"""

FIRST_CELL = '''\
import os
import tempfile
from pathlib import Path

import torch

torch.manual_seed(0)
torch.set_num_threads(1)
SMALL = os.environ.get("DEQPPL_TUTORIAL_SMALL") == "1"  # set by the test suite
N = 20_000 if SMALL else 1_000_000  # rows to encode
CHUNK = 200 if SMALL else 10_000  # rows per chunk
WORK = Path(tempfile.mkdtemp(prefix="deqppl_tutorial_09_"))'''

CELLS = [
    ("md", """\
# 09 · A million rows

The promise of an amortised encoder is one cheap forward solve per new datapoint. This notebook
keeps that promise at the scale where data no longer fit in memory:

1. fit a Poisson PCA encoder on a few thousand rows and **save** it to one file
   (`deqppl.io.save`: JSON hyperparameters + safetensors tensors, versioned and checksummed, no
   pickled code);
2. write a **Parquet** file of $N$ rows of counts (50 columns);
3. **encode** it chunk by chunk (`deqppl.io.encode`, or `deqppl encode` on the command line):
   the latents, a per-row convergence flag, the residual and Laplace standard deviations, with
   memory bounded by the chunk;
4. **kill** the command line half-way and run it again: finished chunks are not redone and the
   result equals an uninterrupted run's.

The test suite runs it with $N$ = 20 000 rows. To run it at $10^6$ rows, open it without the
environment variable `DEQPPL_TUTORIAL_SMALL` (or run
`jupyter nbconvert --to notebook --execute tutorials/09_a_million_rows.ipynb`): the first code cell
then sets `N = 1_000_000` and chunks of 10 000 rows; on one core of a laptop expect a few
minutes (figures in `docs/scale.md`)."""),
    ("code", FIRST_CELL),
    ("md", """\
## Fit and save a model

A PED encoder of `ExpFamPCA(poisson, d = 50, l = 5)`, fitted by the profiled L-BFGS joint MAP on
2 000 simulated rows. `save` stores the model, the encoder's globals and solver settings, and the
**column names** each data tensor is read from (default `y_0 … y_49`)."""),
    ("code", '''\
from deqppl import io
from deqppl.encoders import PEDEncoder, fit_encoder
from deqppl.expfam import family
from deqppl.models import ExpFamPCA
from deqppl.optim import LBFGS

truth_model = ExpFamPCA(family=family("poisson"), obs_dim=50, latent_dim=5, param_scale=0.3)
truth = truth_model.simulate(1, seed=0, dtype=torch.float64).truth

def counts(rows, seed):
    """Poisson counts from the truth's loadings (lam = 1 latent prior)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, 5, generator=g, dtype=torch.float64)
    return torch.poisson(torch.exp(z @ truth["W"].T + truth["B"]), generator=g)

model = ExpFamPCA(family=family("poisson"), obs_dim=50, latent_dim=5)
fit = fit_encoder(PEDEncoder(model).double(), counts(2_000, seed=1), optimizer=LBFGS(max_steps=300), progress=False)
model_file = io.save(WORK / "ped.deqppl", fit.encoder, metadata={"fitted on": "2000 simulated rows"})
info = io.read_info(model_file)
print(fit.status, fit.num_steps, "steps;", info.model_kind, "+", info.encoder_kind, "; columns", info.columns["y"][:3], "...")'''),
    ("md", """\
## A Parquet file bigger than we want in memory

Written block by block with `pyarrow.parquet.ParquetWriter`. Row groups of 65 536 rows: Arrow
decodes a row group whole, so the row group (as well as the chunk) bounds the reader's memory."""),
    ("code", '''\
import pyarrow as pa
import pyarrow.parquet as pq

data_file = WORK / "counts.parquet"
with pq.ParquetWriter(data_file, pa.schema([(f"y_{j}", pa.int64()) for j in range(50)])) as writer:
    for k, start in enumerate(range(0, N, 100_000)):
        y = counts(min(100_000, N - start), seed=100 + k).to(torch.int64).numpy()
        writer.write_table(pa.table({f"y_{j}": y[:, j] for j in range(50)}), row_group_size=65_536)
print(f"{pq.ParquetFile(data_file).metadata.num_rows:,} rows, {data_file.stat().st_size / 2**20:.1f} MiB")'''),
    ("md", """\
## Encode it, chunk by chunk

Each chunk is validated before it is solved (an out-of-support count is reported with its row
in the file and its column), solved by the encoder's Newton iteration, and stored at once as a
checksummed Parquet part next to the output. The output file appears only at the end."""),
    ("code", '''\
import time

t = time.perf_counter()
result = io.encode(model_file, data_file, WORK / "latents.parquet", chunk_rows=CHUNK, progress=False)
wall = time.perf_counter() - t
print(result.status, f"{result.num_rows:,} rows in {result.num_chunks} chunks, {result.num_rows / wall:,.0f} rows/s")
latents = pq.read_table(result.out_path)
latents.slice(0, 5).to_pandas()'''),
    ("md", """\
## Killed half-way, resumed

The same as a command: `deqppl encode --model ped.deqppl --data counts.parquet --out
latents.parquet`. We start it, SIGKILL it once a few chunks are stored, and run it again."""),
    ("code", '''\
import signal
import subprocess
import sys

out = WORK / "resumed.parquet"
stored = lambda: sorted(WORK.glob(f".{out.name}.parts/*/part-*.json"))
cmd = [sys.executable, "-m", "deqppl", "encode", "--model", str(model_file), "--data", str(data_file),
       "--out", str(out), "--chunk-rows", str(CHUNK), "--no-progress"]
proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
while len(stored()) < 3 and proc.poll() is None:
    time.sleep(0.02)
killed = proc.poll() is None
proc.send_signal(signal.SIGKILL)
proc.wait()
at_kill, existed = len(stored()), out.exists()
print("killed while running:", killed, "| chunks stored:", at_kill, "| output exists:", existed)
resumed = io.encode(model_file, data_file, out, chunk_rows=CHUNK, progress=False)
print("re-run reused", resumed.num_reused, "chunks and computed", resumed.num_chunks - resumed.num_reused)'''),
    ("md", "## Sanity checks"),
    ("code", '''\
import numpy as np

enc = io.load(model_file)
rows = np.sort(np.random.default_rng(0).choice(N, size=500, replace=False))
y = pq.read_table(data_file).take(rows)
y = torch.stack([torch.from_numpy(y.column(f"y_{j}").to_numpy().astype("float64")) for j in range(50)], 1)
z = torch.stack([torch.from_numpy(latents.column(f"z_{j}").to_numpy()[rows]) for j in range(5)], 1)
gap = float((z - enc.solve(y).value.detach()).abs().max())
print("max |z_encode - z_in_memory| over 500 rows:", gap)
assert result.converged and gap < 1e-10
assert killed and not existed
# a part being renamed at the instant of the kill may lack its record: at most one is redone
assert resumed.num_reused >= at_kill - 1 >= 1
assert pq.read_table(out).equals(latents)
sd = latents.column("sd_z_0").to_numpy()
assert np.isfinite(sd).all() and (sd > 0).all()'''),
]
