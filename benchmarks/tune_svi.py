r"""Tune SVI (AutoDelta + Adam) for the joint MAP of Binomial(16) PCA on the digits.

The harness compares the DEQ against SVI and L-BFGS; SVI must be at its best, and the README's
demo must run in minutes. This script sweeps SVI's settings (learning rate, schedule, step
cap, minibatches) on the digits (``deqppl.data.load_digits()``, first ``--rows`` rows,
``ExpFamPCA(binomial(16), obs_dim=64, latent_dim=5)``, float64) and reports for each the
final log joint's relative gap to the L-BFGS optimum (``fit_map(optimizer=LBFGS())``, stopped
by its gradient rule, from the same initial values), the wall and CPU time, and the first
step (and its time) at which the gap fell below 1e-3 and 1e-4 (read from the full-batch loss
trace, which for full-batch SVI is exactly $-\log p$ at every step).

Usage::

    python benchmarks/tune_svi.py [--out docs/svi_tuning.md] [--rows 600] [--threads 1]
                                  [--groups plateau,cosine,exponential,minibatch,rtol] [--quick]

``--quick`` runs three short configurations (a smoke test, ~1 min).
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import torch

from deqppl.data import load_digits
from deqppl.expfam import binomial
from deqppl.inference import fit_map
from deqppl.models import ExpFamPCA
from deqppl.optim import LBFGS, SVI, CosineDecay, ExponentialDecay, PlateauDecay


GROUPS = ("plateau", "cosine", "exponential", "minibatch", "rtol")


def _configs(quick: bool, groups: tuple[str, ...] = GROUPS):
    if quick:
        return [
            SVI(lr=0.5, max_steps=200, schedule=PlateauDecay()),
            SVI(lr=0.5, max_steps=200, schedule=CosineDecay()),
            SVI(lr=0.5, max_steps=200, schedule=PlateauDecay(), subsample_size=200),
        ]
    out = []
    if "plateau" in groups:
        # Plateau halving (stops by its own rules: a window mean that stops changing); the
        # first row is the previous default (lr 0.05).
        for lr in (0.05, 0.2, 0.5, 1.0):
            out.append(SVI(lr=lr, max_steps=20_000, schedule=PlateauDecay()))
    if "cosine" in groups:
        # Cosine decay to 0 over a fixed budget of updates
        for lr in (0.3, 0.5, 1.0):
            out.append(SVI(lr=lr, max_steps=2000, schedule=CosineDecay()))
        out.append(SVI(lr=0.5, max_steps=1000, schedule=CosineDecay()))
    if "exponential" in groups:
        # Exponential decay by 1e3 over the budget
        out.append(SVI(lr=1.0, max_steps=2000, schedule=ExponentialDecay(final_factor=1e-3)))
    if "minibatch" in groups:
        # Minibatches of the plate "data" (Pyro rescales by N/n)
        out.append(SVI(lr=0.5, max_steps=20_000, schedule=PlateauDecay(), subsample_size=300))
        out.append(SVI(lr=0.5, max_steps=4000, schedule=CosineDecay(), subsample_size=300))
    if "rtol" in groups:
        # The default rules with a looser window-mean rule: how early can SVI stop honestly?
        for rtol in (1e-8, 1e-10, 1e-12):
            out.append(SVI(lr=0.5, max_steps=20_000, schedule=PlateauDecay(), rtol=rtol))
    return out


def _describe(opt: SVI) -> str:
    sched = type(opt.schedule).__name__
    if isinstance(opt.schedule, ExponentialDecay):
        sched += f"({opt.schedule.final_factor:g})"
    elif isinstance(opt.schedule, CosineDecay):
        sched += f"({opt.schedule.final_factor:g})"
    elif isinstance(opt.schedule, PlateauDecay):
        sched += f"({opt.schedule.factor:g})"
    batch = "full" if opt.subsample_size is None else str(opt.subsample_size)
    rtol = "10 eps" if opt.rtol is None else f"{opt.rtol:g}"
    return f"{opt.lr:g} | {sched} | {opt.max_steps} | {batch} | {rtol}"


def _first_below(trace: torch.Tensor, best: float, rel: float) -> int | None:
    gap = (trace - best) / abs(best)  # trace is -log p; best is -log p at the L-BFGS optimum
    hits = torch.nonzero(gap <= rel)
    return int(hits[0]) if hits.numel() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="write the markdown report here")
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--groups", default=",".join(GROUPS), help=f"comma-separated subset of {','.join(GROUPS)}"
    )
    args = parser.parse_args()
    groups = tuple(g.strip() for g in args.groups.split(",") if g.strip())
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        parser.error(f"unknown --groups {unknown}; valid groups are: {', '.join(GROUPS)}")
    torch.set_num_threads(args.threads)

    y = load_digits().y[: args.rows]
    model = ExpFamPCA(family=binomial(16), obs_dim=64, latent_dim=5)
    data = {"y": y}

    t0, c0 = time.perf_counter(), time.process_time()
    ref = fit_map(model, data, optimizer=LBFGS(), seed=args.seed, progress=False)
    ref_wall, ref_cpu = time.perf_counter() - t0, time.process_time() - c0
    best = -float(ref.log_joint)
    lines = [
        "# SVI tuning on the digits (joint MAP, Binomial(16) PCA, latent_dim 5)",
        "",
        f"Machine: {platform.machine()}, 2 CPU cores shared with other jobs, torch "
        f"{torch.__version__}, `torch.set_num_threads({args.threads})`, float64. Data: the first "
        f"{args.rows} rows of `deqppl.data.load_digits()`; model "
        "`ExpFamPCA(family=binomial(16), obs_dim=64, latent_dim=5)`; seed "
        f"{args.seed} (same initial values for every fit).",
        "",
        f"Reference: `fit_map(optimizer=LBFGS())`: log joint {-best:.10g}, {ref.num_steps} "
        f"iterations, {ref.status.name} ({ref.criterion}), wall {ref_wall:.1f} s, CPU {ref_cpu:.1f} s.",
        "",
        "Gap = (log joint of L-BFGS - log joint of SVI) / |log joint of L-BFGS| at the end; "
        "'to 1e-3' / 'to 1e-4' = first step whose full-batch loss is within that relative gap "
        "(CPU time estimated as that fraction of the run's CPU time; minibatch losses are noisy "
        "estimates, so for minibatch rows those columns are indicative only).",
        "",
        "| lr | schedule | max_steps | batch | rtol | steps | status | gap | wall s | CPU s | to 1e-3 (step, CPU s) | to 1e-4 (step, CPU s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for opt in _configs(args.quick, groups):
        t0, c0 = time.perf_counter(), time.process_time()
        fit = fit_map(model, data, optimizer=opt, seed=args.seed, progress=False)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        gap = (float(ref.log_joint) - float(fit.log_joint)) / abs(float(ref.log_joint))
        cells = []
        for rel in (1e-3, 1e-4):
            k = _first_below(fit.loss_trace, best, rel)
            cells.append("never" if k is None else f"{k}, {cpu * k / max(fit.num_steps, 1):.1f}")
        row = (
            f"| {_describe(opt)} | {fit.num_steps} | {fit.status.name} | {gap:.2e} | "
            f"{wall:.1f} | {cpu:.1f} | {cells[0]} | {cells[1]} |"
        )
        lines.append(row)
        print(row, flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
