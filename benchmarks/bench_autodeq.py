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
  of the generic start from the cost of the generic derivatives;
* both with a ``LearnedStart`` (``start=``), fitted by ``LearnedStart.fit(enc, y_train)`` on the
  fixed points of $N$ independent training rows of the same model and globals, with the
  settings ``bench_ped.learned_start`` chooses per case; the PED encoder's regresses on its
  summary $W^\top y$, AutoDEQ's on its generic summary, the score at $u = 0$ (an affine map
  of $W^\top y$ here), with ``ZeroStart()`` in place of the PED-only ``RidgeStart()``
  fallback of the Poisson cases. The start's evaluation is inside the timings, its fit (a
  one-off cost) is listed separately.

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
import dataclasses
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ped import FULL, QUICK, learned_start, make_case, training_data  # noqa: E402  (the same cases)

from deqppl.encoders import AutoDEQ, PEDEncoder, ZeroStart  # noqa: E402

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
    y_train = training_data(model, values["W"], values["B"], case.num_data)
    settings = learned_start(case)
    auto_settings = settings if settings.fallback is None else dataclasses.replace(settings, fallback=ZeroStart())
    ped_learned = PEDEncoder.from_values(model, values)
    auto_learned = AutoDEQ(model, values)
    with torch.no_grad():
        auto_learned(y_train[:8])  # the structure checks, outside the fit's timing
    fits = {}
    ped_learned.start, fits["ped_learned"] = timed(lambda: settings.fit(ped_learned, y_train))
    auto_learned.start, fits["auto_learned"] = timed(lambda: auto_settings.fit(auto_learned, y_train))
    methods = {
        "ped": lambda: ped(y),
        "auto": lambda: auto(y),
        "auto_z0": lambda: auto(y, z0=z0),
        "ped_learned": lambda: ped_learned(y),
        "auto_learned": lambda: auto_learned(y),
    }
    runs = {key: [] for key in methods}
    out = {}
    first = {}
    with torch.no_grad():
        for key in ("ped", "auto", "ped_learned", "auto_learned"):
            first[key] = timed(methods[key])[1]  # warm-up: first-call costs are not amortised
        for _ in range(repeats):
            for key, fn in methods.items():
                res, cpu = timed(fn)
                runs[key].append(cpu)
                out[key] = res
    rows = []
    z_ped = out["ped"][0]
    for key, name in NAMES.items():
        z, sol = out[key]
        rows.append(dict(
            key=key, name=name, cpu=statistics.median(runs[key]), steps=sol.num_steps, f=sol.num_fevals,
            H=sol.num_jac_evals, conv=f"{int(sol.converged.sum())}/{sol.converged.numel()}",
            diff=float((z - z_ped).abs().max()), first=first.get(key, float("nan")), fit=fits.get(key),
        ))
        log(f"  {name}: {rows[-1]}")
    fallback = None if auto_settings.fallback is None else type(auto_settings.fallback).__name__
    return dict(case=case, rows=rows, start=f"LearnedStart(degree={auto_settings.degree}, "
                f"hidden={auto_settings.hidden}, fallback={fallback})")


NAMES = {
    "ped": "PEDEncoder",
    "auto": "AutoDEQ",
    "auto_z0": "AutoDEQ, PED's start",
    "ped_learned": "PEDEncoder, learned start",
    "auto_learned": "AutoDEQ, learned start",
}


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
        "| max \\|z - z_PED\\| | first call | start's fit |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    summary = []
    for res in results:
        c = res["case"]
        by = {r["key"]: r for r in res["rows"]}
        base = by["ped"]["cpu"]
        for r in res["rows"]:
            fit = "" if r["fit"] is None else f"{r['fit'] * 1e3:.0f} ms"
            lines.append(
                f"| {c.family} d={c.obs_dim} l={c.latent_dim} N={c.num_data} | {r['name']} | "
                f"{r['cpu'] * 1e3:.0f} ms | {r['cpu'] / base:.2f} | {r['steps']} | {r['f']} | "
                f"{r['H']} | {r['conv']} | {r['diff']:.1e} | {fmt_first(r['first'])} | {fit} |")
        ratio = by["auto"]["cpu"] / base
        learned = by["auto_learned"]["cpu"] / by["ped_learned"]["cpu"]
        summary.append(
            f"- {c.family} d={c.obs_dim} l={c.latent_dim}: AutoDEQ / PED (default starts: zero / ridge) = "
            f"{ratio:.2f} (target <= {TARGET:g}: {'met' if ratio <= TARGET else '**not met**'}); "
            f"learned / learned = {learned:.2f}; AutoDEQ learned / PED default = "
            f"{by['auto_learned']['cpu'] / base:.2f}. AutoDEQ's learned start: `{res['start']}`")
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
