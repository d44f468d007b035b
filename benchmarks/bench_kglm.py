r"""Kernel GLM fits: the DEQ forward solve vs an independent IRLS vs fit_map (L-BFGS) (SPEC §4).

Part 1 (solver choice for the coupled $n$-dimensional state): the kGLM fixed point
$z=A'(-Kz/\lambda+K\,T(y)/\lambda)$ solved by ``Newton`` (analytic Jacobian
$\mathrm{diag}(A'')W$, one dense solve per step), ``Anderson`` (the DEQ core's default) and
``NewtonGMRES`` (Newton-Krylov: each Newton system solved by the core's ``GMRES``, one $O(n^2)$
matrix-vector product per iteration; the kGLM default), for $n$ from 100 to
5 000, Gaussian and Bernoulli, with $\lambda=s\lVert K\rVert_2$ at the paper's $s$ (1 and 2) and
at $s=0.01$ where $\mathrm{Lip}(\sigma)\lVert K\rVert/\lambda\ge1$.

Part 2 (the target): at n = 1 000, 2 000, 5 000, time of the default DEQ solve
(:func:`deqppl.encoders.solve_kglm`) vs the NumPy IRLS of ``tests/encoders/kglm_reference.py``
vs ``fit_map`` with L-BFGS on the ``KernelGLM`` Pyro model, with the error of each in fitted
means against a tight IRLS solution (max abs). Times are wall-clock medians, one thread for torch
and for NumPy's BLAS, on 2 CPU cores shared with other jobs: read the ratios.

Run: ``python benchmarks/bench_kglm.py [--sizes 1000 2000 5000] [--repeats 3] [--lbfgs-max 5000]``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from deqppl.deq import Anderson, Newton  # noqa: E402
from deqppl.encoders import solve_kglm  # noqa: E402
from deqppl.encoders.kglm import default_kglm_solver, spectral_norm  # noqa: E402
from deqppl.expfam import bernoulli, gaussian  # noqa: E402
from deqppl.inference import fit_map  # noqa: E402
from deqppl.kernels import SquaredExponential  # noqa: E402
from deqppl.models.kernel_glm import KernelGLM  # noqa: E402
from deqppl.optim import LBFGS  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "encoders"))
from kglm_reference import FAMILIES, irls  # noqa: E402

FAM = {"gaussian": gaussian(), "bernoulli": bernoulli()}
S = {"gaussian": 1.0, "bernoulli": 2.0}  # SPEC §4: s = 1 regression, s = 2 logistic


def _data(name: str, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.sort(6 * torch.rand(n, generator=g, dtype=torch.float64) - 3).values
    f = torch.sin(1.5 * x)
    if name == "gaussian":
        y = f + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    else:
        y = torch.bernoulli(torch.sigmoid(2 * f), generator=g)
    return x, y


def _median_time(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def part1(sizes, repeats):
    lines = ["| family | s | n | solver | converged | steps | f evals | max abs error | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in ("gaussian", "bernoulli"):
        for s in (S[name], 0.01):
            for n in sizes:
                x, y = _data(name, n)
                K = SquaredExponential(lengthscale=0.5)(x)
                lam = s * spectral_norm(K)
                alpha, _ = irls(name, K.numpy(), y.numpy(), lam)
                want = torch.from_numpy(FAMILIES[name][1](K.numpy() @ alpha))
                solvers = {
                    "Newton (direct solves)": Newton(rtol=1e-10, atol=0.0, max_steps=100),
                    "Anderson": Anderson(rtol=1e-10, atol=0.0, max_steps=2000),
                    "NewtonGMRES (default)": default_kglm_solver(torch.float64),
                }
                for label, solver in solvers.items():
                    sec, fit = _median_time(
                        lambda solver=solver: solve_kglm(FAM[name], K, y, lam=lam, solver=solver, throw=False, check_psd=False),
                        repeats)
                    sol = fit.solution
                    err = float((fit.mean - want).abs().max())
                    lines.append(f"| {name} | {s:g} | {n} | {label} | {bool(sol.converged.all())} | {sol.num_steps} "
                                 f"| {sol.num_fevals} | {err:.1e} | {sec:.3f} |")
                    print(lines[-1], flush=True)
    return lines


def part2(sizes, repeats, lbfgs_max):
    lines = ["| family | n | method | iterations | max abs error vs tight IRLS | seconds | / IRLS |",
             "|---|---|---|---|---|---|---|"]
    summary = []
    for name in ("gaussian", "bernoulli"):
        for n in sizes:
            x, y = _data(name, n)
            model = KernelGLM(FAM[name], SquaredExponential(lengthscale=0.5), lam=1.0)
            Kj = model.gram(x)
            lam = S[name] * spectral_norm(Kj)
            model = KernelGLM(FAM[name], SquaredExponential(lengthscale=0.5), lam=lam)
            tight, _ = irls(name, Kj.numpy(), y.numpy(), lam, tol=1e-15)
            want = torch.from_numpy(FAMILIES[name][1](Kj.numpy() @ tight))
            # IRLS at the accuracy target: stop when the alpha update is below 1e-10 (relative)
            t_irls, (alpha, steps) = _median_time(lambda: irls(name, Kj.numpy(), y.numpy(), lam, tol=1e-10), repeats)
            err_irls = float(np.abs(FAMILIES[name][1](Kj.numpy() @ alpha) - want.numpy()).max())
            t_chk, fit_chk = _median_time(lambda: solve_kglm(FAM[name], Kj, y, lam=lam), repeats)
            err_chk = float((fit_chk.mean - want).abs().max())
            # the kernel object's K is PSD by construction: the encoder path certifies nothing more
            t_deq, fit = _median_time(lambda: solve_kglm(FAM[name], Kj, y, lam=lam, check_psd=False), repeats)
            err_deq = float((fit.mean - want).abs().max())
            rows = [("IRLS (NumPy, reference)", steps, err_irls, t_irls),
                    (f"DEQ solve_kglm ({fit.solution.solver}), K from a kernel (check_psd=False)",
                     fit.solution.num_steps, err_deq, t_deq),
                    (f"DEQ solve_kglm ({fit_chk.solution.solver}) + PSD certificate of a user's K",
                     fit_chk.solution.num_steps, err_chk, t_chk)]
            if n <= lbfgs_max:
                data = model.validate({"x": x, "y": y})
                start = time.perf_counter()
                res = fit_map(model, data, optimizer=LBFGS(max_steps=5000), progress=False)
                t_lbfgs = time.perf_counter() - start
                err_lbfgs = float((model.fitted_mean(res.values, x) - want).abs().max())
                rows.append((f"fit_map L-BFGS ({'converged' if res.converged else 'NOT converged'})",
                             res.num_steps, err_lbfgs, t_lbfgs))
                summary.append(f"- {name} n={n}: DEQ/IRLS time = {t_deq / t_irls:.2f} (with PSD certificate "
                               f"{t_chk / t_irls:.2f}; target <= 2), "
                               f"L-BFGS/DEQ = {t_lbfgs / t_deq:.1f} (target >= 5); errors DEQ {err_deq:.1e}, "
                               f"IRLS {err_irls:.1e}, L-BFGS {err_lbfgs:.1e} (target <= 1e-8)")
            else:
                summary.append(f"- {name} n={n}: DEQ/IRLS time = {t_deq / t_irls:.2f} (target <= 2); L-BFGS not run "
                               f"(n > --lbfgs-max {lbfgs_max}); errors DEQ {err_deq:.1e}, IRLS {err_irls:.1e}")
            for label, it, err, sec in rows:
                lines.append(f"| {name} | {n} | {label} | {it} | {err:.1e} | {sec:.3f} | {sec / t_irls:.2f} |")
                print(lines[-1], flush=True)
    return lines + [""] + summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 5000])
    parser.add_argument("--solver-sizes", type=int, nargs="+", default=[100, 1000, 2000, 5000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lbfgs-max", type=int, default=5000)
    parser.add_argument("--skip-part1", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = [f"torch {torch.__version__}, float64, 1 thread, medians of {args.repeats} runs", ""]
    if not args.skip_part1:
        out += ["Part 1: solver for the coupled n-dim state", ""] + part1(args.solver_sizes, args.repeats) + [""]
    out += ["Part 2: DEQ vs IRLS vs fit_map L-BFGS", ""] + part2(args.sizes, args.repeats, args.lbfgs_max)
    print("\n".join(out))


if __name__ == "__main__":
    main()
