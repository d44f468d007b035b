"""Fixed-point solver benchmark: deqppl.deq against plain iteration and torchdeq, side by side.

Problem: a batch of 64 independent DEQ layers $f(z) = \\tanh(W z + u)$, dimension 256, $W$ symmetric
with spectral norm 0.99 (so plain iteration contracts, slowly), injections $u \\sim N(0, s^2)$ with
input scale $s \\in \\{0.01, 1\\}$, relative tolerance 1e-5, float32, CPU.

Stopping rule, matched across libraries: every sample must satisfy
$\\lVert f(z) - z\\rVert_2 \\le 10^{-5}\\lVert f(z)\\rVert_2$. deqppl solvers get ``rtol=1e-5, atol=0``;
torchdeq solvers get ``stop_mode='rel', tol=1e-5``, which stops when the largest
$\\lVert f(z)-z\\rVert / (\\lVert f(z)\\rVert + 10^{-9})$ over the batch falls below ``tol`` -- the same
rule up to the 1e-9. All other settings are each library's defaults, except ``max_steps`` /
``max_iter`` raised to 5000 so that every solver can reach the tolerance.

Run: ``python benchmarks/bench_solvers.py [--out docs/bench_solvers.md] [--repeats 3]``.
Needs torchdeq (``pip install torchdeq==0.1.0 --no-deps``); without it the torchdeq rows are skipped.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from deqppl.deq import (
    Anderson,
    Broyden,
    FixedPointIteration,
    ImplicitAdjoint,
    Newton,
    fixed_point,
)

BATCH, DIM, SPECTRAL_NORM, RTOL, MAX_STEPS = 64, 256, 0.99, 1e-5, 5000


def make_problem(scale: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(DIM, DIM, generator=g)
    W = A + A.T
    W = SPECTRAL_NORM * W / torch.linalg.matrix_norm(W, ord=2)
    u = scale * torch.randn(BATCH, DIM, generator=g)
    c = torch.randn(BATCH, DIM, generator=g)  # loss weights for the backward pass
    return W, u, c


def max_rel_residual(f, z):
    with torch.no_grad():
        fz = f(z)
        return float(((fz - z).norm(dim=1) / (fz.norm(dim=1) + 1e-30)).max())


def run_deqppl(name, solver, W, u, c, repeats):
    W = W.clone().requires_grad_()
    f = lambda z: torch.tanh(z @ W + u)  # noqa: E731 - W symmetric, so z @ W = (W z)^T
    adjoint = ImplicitAdjoint(solver=solver)
    fwd, bwd = [], []
    for _ in range(repeats):
        W.grad = None
        t0 = time.perf_counter()
        sol = fixed_point(f, torch.zeros_like(u), solver=solver, adjoint=adjoint, throw=False)
        t1 = time.perf_counter()
        (c * sol.value).sum().backward()
        t2 = time.perf_counter()
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
    return dict(
        method=f"deqppl {name}", steps=sol.num_steps, fevals=sol.num_fevals,
        converged=f"{int(sol.converged.sum())}/{BATCH}",
        rel_res=max_rel_residual(f, sol.value.detach()),
        fwd_ms=1e3 * statistics.median(fwd), bwd_ms=1e3 * statistics.median(bwd))


def run_torchdeq(name, solver_fn, W, u, repeats, **kwargs):
    counter = {"n": 0}

    def f(z):
        counter["n"] += 1
        return torch.tanh(z @ W + u)

    times = []
    for _ in range(repeats):
        counter["n"] = 0
        t0 = time.perf_counter()
        with torch.no_grad():
            z, _, info = solver_fn(f, torch.zeros_like(u), max_iter=MAX_STEPS, tol=RTOL,
                                   stop_mode="rel", **kwargs)
        times.append(time.perf_counter() - t0)
    rel = max_rel_residual(lambda x: torch.tanh(x @ W + u), z)
    return dict(method=f"torchdeq {name}", steps=counter["n"], fevals=counter["n"],
                converged=f"{int((info['rel_lowest'] < RTOL).sum())}/{BATCH}",
                rel_res=rel, fwd_ms=1e3 * statistics.median(times), bwd_ms=float("nan"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the markdown table to this file")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    solvers = {
        "plain": FixedPointIteration(rtol=RTOL, atol=0.0, max_steps=MAX_STEPS),
        "Anderson": Anderson(rtol=RTOL, atol=0.0, max_steps=MAX_STEPS),
        "Broyden": Broyden(rtol=RTOL, atol=0.0, max_steps=MAX_STEPS),
        "Newton": Newton(rtol=RTOL, atol=0.0, max_steps=MAX_STEPS),
    }
    try:
        from torchdeq.solver import anderson_solver, broyden_solver, fixed_point_iter
    except ImportError:
        anderson_solver = None
    lines = [
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, batch {BATCH}, "
        f"dimension {DIM}, ||W||_2 = {SPECTRAL_NORM}, rtol {RTOL}; times are medians of "
        f"{args.repeats} runs.",
        "",
        "| input scale | method | iterations | f evals | converged | max rel. residual "
        "| forward ms | implicit backward ms | backward / forward |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    checks = []
    for scale in (0.01, 1.0):
        W, u, c = make_problem(scale)
        rows = [run_deqppl(name, s, W, u, c, args.repeats) for name, s in solvers.items()]
        if anderson_solver is not None:
            rows.append(run_torchdeq("fixed_point_iter (its default solver)", fixed_point_iter,
                                     W, u, args.repeats))
            rows.append(run_torchdeq("anderson (defaults m=6, lam=1e-4)", anderson_solver,
                                     W, u, args.repeats))
            rows.append(run_torchdeq("broyden (defaults)", broyden_solver, W, u, args.repeats))
        for r in rows:
            ratio = r["bwd_ms"] / r["fwd_ms"]
            bwd = "-" if r["bwd_ms"] != r["bwd_ms"] else f"{r['bwd_ms']:.1f}"
            rat = "-" if ratio != ratio else f"{ratio:.2f}"
            lines.append(f"| {scale} | {r['method']} | {r['steps']} | {r['fevals']} | "
                         f"{r['converged']} | {r['rel_res']:.1e} | {r['fwd_ms']:.1f} | {bwd} | "
                         f"{rat} |")
        by = {r["method"]: r for r in rows}
        plain, anderson = by["deqppl plain"], by["deqppl Anderson"]
        checks.append(
            f"scale {scale}: Anderson/plain iterations = {anderson['steps']}/{plain['steps']} = "
            f"{anderson['steps'] / plain['steps']:.3f} (target <= 0.2 where plain > 100, and <= 1)")
        td = by.get("torchdeq anderson (defaults m=6, lam=1e-4)")
        if td is not None:
            checks.append(f"scale {scale}: Anderson iterations deqppl {anderson['steps']} vs "
                          f"torchdeq {td['steps']} (target: fewer)")
        checks.append(f"scale {scale}: deqppl Anderson implicit backward / forward time = "
                      f"{anderson['bwd_ms'] / anderson['fwd_ms']:.2f} (target <= 1)")
    lines += ["", *[f"- {c}" for c in checks]]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
