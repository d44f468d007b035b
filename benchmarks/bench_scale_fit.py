"""Issue 16, part B: the 1- vs 2-process time of the data-parallel joint fit.

Run alone::

    nice -n 10 python benchmarks/bench_scale_fit.py [--sizes 20000,50000] [--steps 20]
        [--optimizers lbfgs,alternating] [--quick]

or as the "Data-parallel fitting" section of ``python benchmarks/bench_scale.py``
(:func:`fit_section`). For each N, the joint fit of a Poisson PCA's globals (d = 50, l = 5;
``fit_encoder``, float64) runs once in one process and once as two gloo ranks launched by
``torch.distributed.run`` (``Shard.even``: each rank simulates the same seeded table and keeps
its half), with two optimisers: profiled full-batch L-BFGS for a fixed number of iterations,
and the structured joint fit ``AlternatingNewton()`` (the default of PED encoders) run to
convergence. Every process uses one torch thread; only ``fit_encoder`` is timed (rank 0's wall
clock; the ranks leave the call together), not the interpreter start-up or the data. Both runs
of an optimiser do the same work: they take the same steps (L-BFGS: by the fixed count;
AlternatingNewton: every decision is taken on the same all-reduced sums, and the number of
sweeps and evaluations are printed for both), and the losses are printed, equal up to rounding.
The ratio is measured on whatever the machine gives the two processes; on a shared machine it is
a lower bound of what two free cores give.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
#: The generated table: 50 Poisson columns from 5 latents (as benchmarks/bench_scale.py).
D, L = 50, 5


#: ``--optimizers`` names and the table's label of each.
OPTIMIZERS = {"lbfgs": "profiled L-BFGS", "alternating": "AlternatingNewton"}


def _child(n: int, steps: int, out: str, name: str) -> None:
    import torch

    torch.set_num_threads(1)
    from deqppl import distributed
    from deqppl.encoders import PEDEncoder, fit_encoder
    from deqppl.expfam import family
    from deqppl.models import ExpFamPCA
    from deqppl.optim import LBFGS, AlternatingNewton

    parallel = distributed.init_process_group(timeout_s=600)
    truth_model = ExpFamPCA(family=family("poisson"), obs_dim=D, latent_dim=L, param_scale=0.3)
    y = truth_model.simulate(n, seed=1, dtype=torch.float64).data["y"]
    shard = distributed.Shard.even(n) if parallel else None
    rows = y if shard is None else y[shard.start : shard.stop]
    model = ExpFamPCA(family=family("poisson"), obs_dim=D, latent_dim=L)
    enc = PEDEncoder(model, seed=0).double()
    t = time.perf_counter()
    # L-BFGS: gtol=0, no early stop, every run makes exactly `steps` iterations;
    # AlternatingNewton: to convergence (both runs take the same sweeps, printed)
    optimizer = LBFGS(max_steps=steps, gtol=0.0) if name == "lbfgs" else AlternatingNewton()
    fit = fit_encoder(enc, rows, optimizer=optimizer, progress=False, shard=shard)
    wall = time.perf_counter() - t
    if distributed.rank() == 0:
        Path(out).write_text(json.dumps({
            "wall": wall, "steps": fit.num_steps, "evals": fit.num_grad_evals, "solves": fit.num_solves,
            "loss": float(fit.loss_trace[-1]), "ranks": distributed.world_size(),
            "status": fit.status.name,
        }))


def _run(n: int, steps: int, nproc: int, work: Path, name: str) -> dict:
    out = work / f"fit_{name}_{n}_{steps}_{nproc}.json"
    if out.exists():  # measured by an earlier, interrupted run of the same command
        return json.loads(out.read_text())
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(HERE), "--child", str(n), str(steps), str(out), name]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *cmd[1:]]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    # a failure after rank 0 wrote its figures (torchrun's teardown on the loaded machine, seen
    # once) does not change them; any earlier failure is reported
    if run.returncode != 0 and not out.exists():
        raise RuntimeError(f"{' '.join(cmd)} exited with {run.returncode}:\n{run.stderr[-3000:]}")
    return json.loads(out.read_text())


def fit_section(work: Path, *, sizes: list[int], steps: int,
                optimizers: tuple[str, ...] = ("lbfgs", "alternating")) -> list[str]:
    """Measure and return the markdown lines of the "Data-parallel fitting" section.

    A run already measured in ``work`` (its JSON file) is read, not redone: an interrupted
    benchmark resumes.
    """
    work.mkdir(parents=True, exist_ok=True)
    lines = [
        "## Data-parallel fitting (`benchmarks/bench_scale_fit.py`)\n",
        f"Joint fit of the globals (`fit_encoder`, float64) of a Poisson PCA, d = {D}, l = {L}: profiled "
        f"L-BFGS for {steps} iterations (fixed), AlternatingNewton() to convergence; one torch thread per "
        f"process, gloo on {os.cpu_count()} shared CPU cores; only `fit_encoder` is timed.\n",
        "| N | fit | 1 process (s) | 2 processes (s) | speed-up | s per step, 1 / 2 processes | steps | "
        "evaluations | status | |loss difference| |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in sizes:
        for name in optimizers:
            one, two = _run(n, steps, 1, work, name), _run(n, steps, 2, work, name)
            lines.append(
                f"| {n:,} | {OPTIMIZERS[name]} | {one['wall']:.2f} | {two['wall']:.2f} | "
                f"{one['wall'] / two['wall']:.2f} | {one['wall'] / one['steps']:.3f} / "
                f"{two['wall'] / two['steps']:.3f} | {one['steps']} / {two['steps']} | "
                f"{one['evals']} / {two['evals']} | {one['status']} / {two['status']} | "
                f"{abs(one['loss'] - two['loss']):.1e} |"
            )
    return lines


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        _child(int(argv[1]), int(argv[2]), argv[3], argv[4])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="20000,50000")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--optimizers", default="lbfgs,alternating", help="comma-separated: lbfgs, alternating")
    parser.add_argument("--quick", action="store_true", help="N = 4 000, 5 iterations")
    parser.add_argument("--work", default=None)
    args = parser.parse_args(argv)
    import tempfile

    sizes = [4_000] if args.quick else [int(float(s)) for s in args.sizes.split(",")]
    steps = 5 if args.quick else args.steps
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_scale_fit_"))
    names = tuple(args.optimizers.split(","))
    unknown = [name for name in names if name not in OPTIMIZERS]
    if unknown:
        parser.error(f"unknown --optimizers {', '.join(unknown)}; valid: {', '.join(OPTIMIZERS)}")
    print("\n".join(fit_section(work, sizes=sizes, steps=steps, optimizers=names)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
