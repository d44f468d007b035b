r"""Issue 15 benchmark: the kernel theory against empirical kernels, and batching the empirical CK.

Two comparisons on SPEC 6's two-class mixture ($n=0.8p$), ReLU DEQ, $\sigma_a^2=0.2$, float64:

1. **Theory vs experiment.** Time of the theory -- the four equations (`solve_coefficients`) and
   $\bar G$, $\bar\Theta$ assembled on the data's statistics (`predict_kernels`, statistics included) --
   against one empirical CK estimate: one draw of a random DEQ of width $m=1024$ solved on all $n$
   points (`empirical_kernels(..., num_draws=1)`), at $p=512$ and $p=1024$. Reported as a ratio;
   a useful empirical estimate needs 10-20 draws (docs/spectra.md), so multiply accordingly.
2. **Batched vs per-sample loop.** The empirical CK of $D$ draws computed (a) batched: one
   `fixed_point` call on all $D\cdot n$ independent problems (`deqppl.spectra`), (b) a loop over
   draws, batched over points, and (c) a loop over draws and points, one `fixed_point` call per
   point (the per-sample loop the issue asks to beat). Same solver (plain iteration, rtol 1e-8),
   same weights; the three kernels agree to 1e-10, checked before timing is reported.

Timings are medians over ``--repeats`` of process (CPU) time with one torch thread, interleaved;
wall time for reference. Run: ``python benchmarks/bench_spectra.py [--out docs/bench_spectra.md]
[--repeats 3] [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from deqppl.deq import fixed_point
from deqppl.spectra import (DEFAULT_SOLVER, RandomDEQ, ReLU, deq_features, draw_deq_weights,
                            empirical_kernels, predict_kernels, solve_coefficients,
                            two_class_mixture)
from deqppl.spectra.empirical import _deq_step


def timed(fn):
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c0, time.perf_counter() - w0


def theory_vs_empirical(p, repeats, width):
    deq = RandomDEQ(activation=ReLU())
    mix = two_class_mixture(p)
    sample = mix.sample(int(0.8 * p), seed=0)
    rows = {"theory": [], "empirical (1 draw)": []}
    for _ in range(repeats):
        _, cpu, wall = timed(lambda: predict_kernels(deq, mix.statistics(sample)))
        rows["theory"].append((cpu, wall))
        _, cpu, wall = timed(lambda: empirical_kernels(deq, sample.x, width=width, num_draws=1,
                                                       seed=0))
        rows["empirical (1 draw)"].append((cpu, wall))
    return {k: (statistics.median(c for c, _ in v), statistics.median(w for _, w in v))
            for k, v in rows.items()}


def batched_vs_loop(p, draws, width, repeats):
    deq = RandomDEQ(activation=ReLU())
    x = two_class_mixture(p).sample(int(0.8 * p), seed=0).x
    n = x.shape[0]
    c = solve_coefficients(deq, float((x * x).sum(1).mean()) ** 0.5)
    A, B = draw_deq_weights(draws, width, p, seed=0)

    def batched():
        Z, _ = deq_features(c, x, A, B)
        return (Z @ Z.transpose(1, 2)).mean(0)

    def per_draw():
        G = torch.zeros(n, n, dtype=x.dtype)
        for d in range(draws):
            Z, _ = deq_features(c, x, A[d:d + 1], B[d:d + 1])
            G += Z[0] @ Z[0].T
        return G / draws

    def per_sample():
        G = torch.zeros(n, n, dtype=x.dtype)
        for d in range(draws):
            drive = (deq.var_b ** 0.5) * (x @ B[d].T)
            f = _deq_step(c.activation, deq.var_a)
            rows = []
            for i in range(n):
                rows.append(fixed_point(f, torch.zeros(1, width, dtype=x.dtype),
                                        args=(A[d:d + 1], drive[i:i + 1][None]),
                                        solver=DEFAULT_SOLVER).value[0])
            Z = torch.stack(rows)
            G += Z @ Z.T
        return G / draws

    methods = {"batched (deqppl.spectra)": batched, "loop over draws": per_draw,
               "loop over draws and points": per_sample}
    times = {k: [] for k in methods}
    results = {}
    for _ in range(repeats):
        for name, fn in methods.items():
            results[name], cpu, wall = timed(fn)
            times[name].append((cpu, wall))
    ref = results["batched (deqppl.spectra)"]
    agree = max(float((G - ref).abs().max()) for G in results.values())
    return {k: (statistics.median(c for c, _ in v), statistics.median(w for _, w in v))
            for k, v in times.items()}, agree


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="p = 128 / 256, width 256: seconds")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    width = 256 if args.quick else 1024
    dims = (128, 256) if args.quick else (512, 1024)
    lines = ["# Benchmark: implicit-kernel theory vs empirical kernels (issue 15)", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, load average "
             f"{os.getloadavg()[0]:.1f}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} thread; medians of {args.repeats} repeats; "
             f"float64; ReLU DEQ, var_a = 0.2, width m = {width}.", "",
             "## Theory (four equations + Gbar + Thetabar) vs one empirical CK estimate", "",
             "| p | n | theory CPU s | empirical CPU s | ratio empirical / theory | theory wall s "
             "| empirical wall s |", "|---|---|---|---|---|---|---|"]
    for p in dims:
        t = theory_vs_empirical(p, args.repeats, width)
        th, em = t["theory"], t["empirical (1 draw)"]
        lines.append(f"| {p} | {int(0.8 * p)} | {th[0]:.3g} | {em[0]:.3g} | {em[0] / th[0]:.3g} "
                     f"| {th[1]:.3g} | {em[1]:.3g} |")
        print(lines[-1], flush=True)
    p, draws = dims[0], 4 if args.quick else 5
    times, agree = batched_vs_loop(p, draws, width, args.repeats)
    base = times["loop over draws and points"][0]
    lines += ["", f"## Empirical CK: batched vs loops (p = {p}, n = {int(0.8 * p)}, "
              f"D = {draws} draws, m = {width})", "",
              f"Largest difference between the three kernels: {agree:.2g}.", "",
              "| method | CPU s | wall s | speed-up vs per-sample loop (CPU) |",
              "|---|---|---|---|"]
    for name, (cpu, wall) in times.items():
        lines.append(f"| {name} | {cpu:.3g} | {wall:.3g} | {base / cpu:.3g}x |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(report)


if __name__ == "__main__":
    main()
