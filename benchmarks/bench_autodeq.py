r"""AutoDEQ against the hand-written PED encoder: amortised cost of the conditional MAP (issue 17).

The four cases of ``bench_ped.py`` (Poisson and Bernoulli ExpFamPCA, $N = 10\,000$ rows,
$(d, l) \in \{(50, 5), (500, 20)\}$, $\lambda = 1$, ``param_scale`` $= 1/\sqrt l$, float64,
$W, B$ the simulation's truth): for new data, the MAP latents $z^*(y; W, B)$ by

* ``PEDEncoder.from_values(model, {"W": W, "B": B})(y)`` -- the hand-written layer with its
  analytic Jacobian and its ridge-regression initial guess (ped.py), default solver;
* ``AutoDEQ(model, {"W": W, "B": B})(y)`` -- the encoder derived from the Pyro trace, default
  settings: the objective traced once per batch shape into aten graphs with the latent-free
  terms evaluated once per solve, separable Hessians from the graph, safeguarded Newton from
  $u = 0$ (``deqppl/encoders/_traced.py``);
* ``AutoDEQ`` started from the PED encoder's initial guess (``z0=``), which separates the cost
  of the generic start from the cost of the generic derivatives.

Both under ``torch.no_grad()`` (inference), at their default float64 tolerance (relative
residual $10^{-8}$). The first call of each encoder is a warm-up outside the medians (for
AutoDEQ it traces the model's structure and the objective, once per batch shape); its CPU time
is reported separately. Reported: CPU time (``time.process_time``, one torch thread, medians over
interleaved repeats: the machine is shared), steps, batched gradient passes, Hessians, and
the largest difference between the two fixed points. The target of issue 17 is
AutoDEQ / PED $\le 2$ in CPU time.

Run: ``python benchmarks/bench_autodeq.py [--quick] [--repeats 3] [--out docs/bench_autodeq.md]``.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ped import FULL, QUICK, make_case  # noqa: E402  (the same four cases and data)

from deqppl.encoders import AutoDEQ, PEDEncoder  # noqa: E402

TARGET = 2.0


def timed(fn):
    c0 = time.process_time()
    out = fn()
    return out, time.process_time() - c0


def run_case(case, repeats, log):
    model, sim = make_case(case)
    y, values = sim.data["y"], {"W": sim.truth["W"], "B": sim.truth["B"]}
    ped = PEDEncoder.from_values(model, values)
    auto = AutoDEQ(model, values)
    z0 = ped.initial_guess(y)
    runs = {"ped": [], "auto": [], "auto_z0": []}
    out = {}
    first = {}
    with torch.no_grad():
        for key, fn in (("ped", lambda: ped(y)), ("auto", lambda: auto(y))):
            first[key] = timed(fn)[1]  # warm-up: first-call costs are not amortised
        for _ in range(repeats):
            for key, fn in (
                ("ped", lambda: ped(y)),
                ("auto", lambda: auto(y)),
                ("auto_z0", lambda: auto(y, z0=z0)),
            ):
                res, cpu = timed(fn)
                runs[key].append(cpu)
                out[key] = res
    rows = []
    z_ped = out["ped"][0]
    for key, name in (("ped", "PEDEncoder"), ("auto", "AutoDEQ"), ("auto_z0", "AutoDEQ, PED's start")):
        z, sol = out[key]
        rows.append(dict(
            name=name, cpu=statistics.median(runs[key]), steps=sol.num_steps, f=sol.num_fevals,
            H=sol.num_jac_evals, conv=f"{int(sol.converged.sum())}/{sol.converged.numel()}",
            diff=float((z - z_ped).abs().max()), first=first.get(key, float("nan")),
        ))
        log(f"  {name}: {rows[-1]}")
    return dict(case=case, rows=rows)


def fmt_first(seconds):
    return "" if math.isnan(seconds) else f"{seconds * 1e3:.0f} ms"


def report(results, args, total_s):
    lines = [
        "# AutoDEQ against the PED encoder (issue 17)",
        "",
        f"Command: `python benchmarks/bench_autodeq.py{' --quick' if args.quick else ''} "
        f"--repeats {args.repeats}` (total {total_s / 60:.1f} min). Machine: "
        f"{platform.machine()}, 2 CPU cores shared with other jobs, torch {torch.__version__}, "
        f"`torch.set_num_threads({args.threads})`, float64. CPU times, medians over "
        f"{args.repeats} interleaved repeats.",
        "",
        "| case | method | CPU time | / PED | steps | gradient passes | Hessians | converged "
        "| max \\|z - z_PED\\| | first call |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    summary = []
    for res in results:
        c = res["case"]
        base = res["rows"][0]["cpu"]
        for r in res["rows"]:
            lines.append(
                f"| {c.family} d={c.obs_dim} l={c.latent_dim} N={c.num_data} | {r['name']} | "
                f"{r['cpu'] * 1e3:.0f} ms | {r['cpu'] / base:.2f} | {r['steps']} | {r['f']} | "
                f"{r['H']} | {r['conv']} | {r['diff']:.1e} | {fmt_first(r['first'])} |")
        ratio = res["rows"][1]["cpu"] / base
        summary.append(f"- {c.family} d={c.obs_dim} l={c.latent_dim}: AutoDEQ / PED = "
                       f"{ratio:.1f} (target <= {TARGET:g}: {'met' if ratio <= TARGET else '**not met**'})")
    return "\n".join(lines + ["", *summary]) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds")
    parser.add_argument("--out", help="write the markdown report to this file")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = [run_case(c, args.repeats, lambda s: print(s, flush=True))
               for c in (QUICK if args.quick else FULL)]
    text = report(results, args, time.perf_counter() - start)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
