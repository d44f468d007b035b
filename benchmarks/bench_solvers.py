"""Fixed-point solver benchmark: deqppl.deq against plain iteration and torchdeq, side by side.

Part 1, iterations and time. Problem: a batch of 64 independent DEQ layers $f(z) = \\tanh(W z + u)$,
dimension 256, $W$ symmetric with spectral norm 0.99 (so plain iteration contracts, slowly),
injections $u \\sim N(0, s^2)$ with input scale $s \\in \\{0.01, 1\\}$, relative tolerance 1e-5,
float32, CPU.

Stopping rule, matched across libraries: every sample must satisfy
$\\lVert f(z) - z\\rVert_2 \\le 10^{-5}\\lVert f(z)\\rVert_2$. deqppl solvers get ``rtol=1e-5, atol=0``;
torchdeq solvers get ``stop_mode='rel', tol=1e-5``, which stops when the largest
$\\lVert f(z)-z\\rVert / (\\lVert f(z)\\rVert + 10^{-9})$ over the batch falls below ``tol`` -- the same
rule up to the 1e-9. All other settings are each library's defaults, except ``max_steps`` /
``max_iter`` raised to 5000 so that every solver can reach the tolerance.

The implicit backward of the loss $\\sum c \\odot z^*$ is timed twice: with the default
``ImplicitAdjoint()`` (for dimension 256: `GMRES`, tolerance following the forward rtol, so the
backward is solved to the same relative accuracy as the forward) and with
``ImplicitAdjoint(solver=<the forward solver>)`` (the papers' choice, SPEC 7). The parameters
are passed explicitly, ``fixed_point(f, z0, args=(W,))``.

Part 2, memory. Peak memory of forward + implicit backward (default adjoint) at about 10, 100
and 1000 forward steps (damped plain iteration on a faster contraction, $\\lVert W\\rVert_2 = 0.3$,
with damping chosen so that it takes that many steps), measured with `torch.profiler`
(``profile_memory=True``: the running sum of the bytes allocated and freed, event by event, in
time order), against backpropagation through the same number of steps (``UnrolledAdjoint``).

Timings are the minimum over ``--repeats`` runs (robust to other processes on a shared
machine), with ``--threads`` intra-op threads.

Run: ``python benchmarks/bench_solvers.py [--out docs/bench_solvers.md] [--repeats 5]``.
Needs torchdeq (``pip install torchdeq==0.1.0 --no-deps``); without it the torchdeq rows are skipped.
"""

from __future__ import annotations

import argparse
import time

import torch

from deqppl.deq import (
    Anderson,
    Broyden,
    FixedPointIteration,
    ImplicitAdjoint,
    Newton,
    UnrolledAdjoint,
    fixed_point,
)

BATCH, DIM, SPECTRAL_NORM, RTOL, MAX_STEPS = 64, 256, 0.99, 1e-5, 5000
#: Damping of plain iteration on the ||W|| = 0.3 memory problem, measured to take about 10,
#: 100 and 1000 steps to rtol 1e-5 (10, 101 and 998 steps).
MEMORY_DAMPINGS = (0.8, 0.12, 0.0127)


def make_problem(scale: float, seed: int = 0, spectral_norm: float = SPECTRAL_NORM):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(DIM, DIM, generator=g)
    W = A + A.T
    W = spectral_norm * W / torch.linalg.matrix_norm(W, ord=2)
    u = scale * torch.randn(BATCH, DIM, generator=g)
    c = torch.randn(BATCH, DIM, generator=g)  # loss weights for the backward pass
    return W, u, c


def max_rel_residual(f, z):
    with torch.no_grad():
        fz = f(z)
        return float(((fz - z).norm(dim=1) / (fz.norm(dim=1) + 1e-30)).max())


def _layer(z, W, u):
    return torch.tanh(z @ W + u)  # W symmetric, so z @ W = (W z)^T


def run_deqppl(name, solver, W, u, c, repeats):
    W = W.clone().requires_grad_()
    adjoints = {"default": ImplicitAdjoint(), "same": ImplicitAdjoint(solver=solver)}
    fwd = []
    bwd = {key: [] for key in adjoints}
    stats = {}
    for _ in range(repeats):
        for key, adjoint in adjoints.items():  # interleaved, so both see the same machine load
            W.grad = None
            t0 = time.perf_counter()
            sol = fixed_point(_layer, torch.zeros_like(u), args=(W, u), solver=solver,
                              adjoint=adjoint, throw=False)
            t1 = time.perf_counter()
            (c * sol.value).sum().backward()
            t2 = time.perf_counter()
            if key == "default":
                fwd.append(t1 - t0)
            bwd[key].append(t2 - t1)
            stats[key] = sol.adjoint_log.last
    return dict(
        method=f"deqppl {name}", steps=sol.num_steps, fevals=sol.num_fevals,
        converged=f"{int(sol.converged.sum())}/{BATCH}",
        rel_res=max_rel_residual(lambda z: _layer(z, W, u), sol.value.detach()),
        fwd_ms=1e3 * min(fwd), bwd_ms=1e3 * min(bwd["default"]),
        bwd_steps=stats["default"].num_steps,
        bwd_rel_res=float(stats["default"].rel_residual.max()),
        same_ms=1e3 * min(bwd["same"]), same_steps=stats["same"].num_steps)


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
    nan = float("nan")
    return dict(method=f"torchdeq {name}", steps=counter["n"], fevals=counter["n"],
                converged=f"{int((info['rel_lowest'] < RTOL).sum())}/{BATCH}",
                rel_res=rel, fwd_ms=1e3 * min(times), bwd_ms=nan, bwd_steps="-",
                bwd_rel_res=nan, same_ms=nan, same_steps="-")


def peak_memory_bytes(fn) -> int:
    """Peak of the bytes allocated (net of frees) while ``fn()`` runs, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Every allocation and free is a "[memory]" event with its signed size and time stamp
    # (torch keeps the raw events on the profiler's kineto results; the per-operator summaries
    # attribute frees to the enclosing operator and so cannot give a peak).
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak


def run_memory():
    W0, u, c = make_problem(1.0, seed=1, spectral_norm=0.3)
    rows = []
    for damping in MEMORY_DAMPINGS:
        solver = FixedPointIteration(damping=damping, rtol=RTOL, atol=0.0, max_steps=MAX_STEPS)
        steps = {}

        def forward_backward(adjoint):
            W = W0.clone().requires_grad_()
            sol = fixed_point(_layer, torch.zeros_like(u), args=(W, u), solver=solver,
                              adjoint=adjoint)
            (c * sol.value).sum().backward()
            steps["n"] = sol.num_steps
            return W.grad

        implicit = peak_memory_bytes(lambda: forward_backward(ImplicitAdjoint()))
        num_steps = steps["n"]
        unrolled = peak_memory_bytes(
            lambda: forward_backward(UnrolledAdjoint(num_steps=num_steps)))
        rows.append(dict(damping=damping, steps=num_steps, implicit_mb=implicit / 2**20,
                         unrolled_mb=unrolled / 2**20))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the markdown tables to this file")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
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
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), float32, batch {BATCH}, "
        f"dimension {DIM}, ||W||_2 = {SPECTRAL_NORM}, rtol {RTOL}; times are minima of "
        f"{args.repeats} runs.",
        "",
        "| input scale | method | iterations | f evals | converged | max rel. residual "
        "| forward ms | backward ms (default adjoint) | backward iterations | backward max rel. "
        "residual | backward / forward | backward ms (same solver) | its iterations "
        "| backward / forward (same solver) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(x, spec):
        return "-" if isinstance(x, float) and x != x else format(x, spec)

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
            lines.append(
                f"| {scale} | {r['method']} | {r['steps']} | {r['fevals']} | {r['converged']} | "
                f"{r['rel_res']:.1e} | {r['fwd_ms']:.1f} | {fmt(r['bwd_ms'], '.1f')} | "
                f"{r['bwd_steps']} | {fmt(r['bwd_rel_res'], '.1e')} | "
                f"{fmt(r['bwd_ms'] / r['fwd_ms'], '.2f')} | {fmt(r['same_ms'], '.1f')} | "
                f"{r['same_steps']} | {fmt(r['same_ms'] / r['fwd_ms'], '.2f')} |")
        by = {r["method"]: r for r in rows}
        plain, anderson = by["deqppl plain"], by["deqppl Anderson"]
        checks.append(
            f"scale {scale}: Anderson/plain iterations = {anderson['steps']}/{plain['steps']} = "
            f"{anderson['steps'] / plain['steps']:.3f} (target <= 0.2 where plain > 100, and <= 1)")
        td = by.get("torchdeq anderson (defaults m=6, lam=1e-4)")
        if td is not None:
            checks.append(f"scale {scale}: Anderson iterations deqppl {anderson['steps']} vs "
                          f"torchdeq {td['steps']} (target: fewer)")
        checks.append(
            f"scale {scale}: deqppl Anderson implicit backward / forward time = "
            f"{anderson['bwd_ms'] / anderson['fwd_ms']:.2f} with the default adjoint (GMRES, "
            f"backward max rel. residual {anderson['bwd_rel_res']:.1e} vs forward "
            f"{anderson['rel_res']:.1e}), {anderson['same_ms'] / anderson['fwd_ms']:.2f} with "
            f"Anderson as the adjoint solver (target <= 1)")
    lines += ["", *[f"- {c}" for c in checks], ""]
    lines += [
        "Peak memory of forward + implicit backward vs the number of forward steps "
        "(||W||_2 = 0.3, damped plain iteration, batch 64, dimension 256, float32):",
        "",
        "| damping | forward steps | implicit (default adjoint) peak MiB "
        "| backprop through the steps (UnrolledAdjoint) peak MiB |",
        "|---|---|---|---|",
    ]
    memory = run_memory()
    for r in memory:
        lines.append(f"| {r['damping']} | {r['steps']} | {r['implicit_mb']:.2f} | "
                     f"{r['unrolled_mb']:.2f} |")
    spread = max(r["implicit_mb"] for r in memory) / min(r["implicit_mb"] for r in memory)
    lines += ["", f"- implicit peak memory, largest / smallest over "
              f"{', '.join(str(r['steps']) for r in memory)} steps = {spread:.2f} "
              f"(target: independent of the number of steps)"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
