"""Row compaction in the solver driver: a batch no longer costs its slowest row.

One command::

    nice -n 10 python benchmarks/bench_compaction.py [--rows 10000] [--seed 1] [--repeats 3]

The case of ``docs/scale.md`` ("a slow chunk"): an exponential-family PCA with Poisson counts,
50 columns, 5 latents and the zoo's default prior scale (``param_scale = 1``), so that a few
rows reach counts of about $10^7$; there the default Newton solve of `PEDEncoder` stalls just
above its float64 ``rtol`` and runs to ``max_steps``. The PED solve of the simulated rows (true
globals, the encoder's default ridge start and solver) is timed twice in this process:

* *full batch*: ``fixed_point(layer, z0, rows_independent=False)``, every step on all rows
  (the driver before compaction; run once, it takes about a minute);
* *compacted*: ``PEDEncoder.solve``, which declares the rows independent, so that only the rows
  still iterating are evaluated.

The two results are compared (max |Δz|, per-row flags, step and evaluation counts), and the
ratio of CPU times (``time.process_time``, one torch thread) is printed with the rows
evaluated.
"""

from __future__ import annotations

import argparse
import time

import torch

from deqppl.deq import fixed_point
from deqppl.encoders import PEDEncoder
from deqppl.expfam import poisson
from deqppl.models import ExpFamPCA


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    # seed 1: two rows (counts up to 9e7) stall above rtol; seed 0 happens to draw none
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the compacted solve")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = ExpFamPCA(family=poisson(), obs_dim=50, latent_dim=5, param_scale=1.0)
    sim = model.simulate(args.rows, seed=args.seed, dtype=torch.float64)
    enc = PEDEncoder(model, W=sim.truth["W"], B=sim.truth["B"], throw=False)
    data = enc.check_data(sim.data["y"])
    z0 = enc.initial_guess(data)
    solver = enc.default_solver(torch.float64)
    print(f"rows {args.rows}, max count {float(data['y'].max()):.3g}, solver {solver}")

    def full():
        with torch.no_grad():
            return fixed_point(lambda z: enc.layer(z, data), z0, solver=solver,
                               jacobian=lambda z: enc.layer_jacobian(z, data), throw=False)

    def compact():
        with torch.no_grad():
            return enc.solve(data, z0=z0, solver=solver, throw=False, validated=True)

    ref, full_wall, full_cpu = timed(full)
    cpus, walls = [], []
    for _ in range(args.repeats):
        sol, w, c = timed(compact)
        cpus.append(c)
        walls.append(w)
    cpu, wall = sorted(cpus)[len(cpus) // 2], sorted(walls)[len(walls) // 2]
    n = args.rows
    for name, s, c, w in (("full batch", ref, full_cpu, full_wall), ("compacted", sol, cpu, wall)):
        print(f"{name:>10}: CPU {c:.3f} s, wall {w:.3f} s, steps {s.num_steps}, f calls "
              f"{s.num_fevals}, H calls {s.num_jac_evals}, rows evaluated "
              f"{s.num_row_fevals / n:.2f} N (f) {s.num_row_jac_evals / n:.2f} N (H), "
              f"converged {int(s.converged.sum())}/{n}, status {s.status.name}")
    bad = (~ref.converged).nonzero().flatten().tolist()
    print(f"unconverged rows: {bad} (max count of each: "
          f"{[float(data['y'][i].max()) for i in bad]}, rel residual "
          f"{[float(ref.rel_residual[i]) for i in bad]})")
    same = (torch.equal(ref.converged, sol.converged) and ref.status is sol.status
            and (ref.num_steps, ref.num_fevals, ref.num_jac_evals)
            == (sol.num_steps, sol.num_fevals, sol.num_jac_evals))
    print(f"max |dz| full vs compacted {float((ref.value - sol.value).abs().max()):.3g}; "
          f"flags, status and counts equal: {same}")
    print(f"CPU time compacted / full batch = {cpu / full_cpu:.4f} "
          f"({full_cpu / cpu:.0f}x faster; wall {wall / full_wall:.4f})")


if __name__ == "__main__":
    main()
