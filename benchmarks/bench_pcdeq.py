r"""Forward and backward cost per batch: pcDEQ (plain iteration) vs monDEQ (splitting) vs an
unconstrained DEQ (Anderson), at equal accuracy (issue 18).

Backward: pcDEQ by plain iteration on $u = J^\top u + g$ (valid since $\rho(J) < 1$), monDEQ by
GMRES (its $J$ need not be a contraction), the DEQ by Anderson; all at the forward's rtol.

Layers of one shape (linear: 64 -> 80, batch 64; conv: 1 -> 16 channels on 8x8, batch 64),
float32, random initial weights (as at the start of training) and the same weights scaled by 10.
Every solver stops at the same relative tolerance (``--rtol``) of the layer's map (the driver's
rule, also for the monDEQ splittings); the table
reports the relative residual of the layer's own map $\lVert f(z) - z\rVert / \lVert f(z)\rVert$
actually reached (the worst sample), so "equal accuracy" is checked, not assumed, and the
relative error of the implicit gradient against the same layer solved at a 100x tighter
tolerance. Costs: median CPU seconds (``time.process_time``, one torch thread) of the forward
solve and of ``backward()`` over ``--repeats`` interleaved repeats, with solver steps, and the
ratio to pcDEQ-1.

Run: ``python benchmarks/bench_pcdeq.py [--repeats 5] [--out docs/bench_pcdeq.md]``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from deqppl.deq import GMRES, Anderson, ConvergenceWarning, FixedPointIteration, ImplicitAdjoint
from deqppl.layers import (DEQConv2d, DEQLinear, ForwardBackward, MonDEQConv2d, MonDEQLinear,
                           PCDEQConv2d, PCDEQLinear, PeacemanRachford, Sigmoid, Tanh)


#: Step cap of every forward and adjoint solve: far above what a converging solver needs here
#: (pcDEQ < 20, Peaceman-Rachford < 200 at x1), so hitting it means "did not converge".
CAP = 2000


def make_layers(arch: str, rtol: float):
    """name -> factory(rtol) building the layer with forward and adjoint at ``rtol``."""
    def plain(r):
        return dict(solver=FixedPointIteration(rtol=r, max_steps=CAP),
                    adjoint=ImplicitAdjoint(solver=FixedPointIteration(rtol=r, atol=0.0,
                                                                       max_steps=CAP),
                                            throw=False), throw=False)

    def anderson(r):
        return dict(solver=Anderson(rtol=r, max_steps=CAP),
                    adjoint=ImplicitAdjoint(solver=Anderson(rtol=r, atol=0.0, max_steps=CAP),
                                            throw=False), throw=False)

    def mon(r, splitting):
        # J = diag(relu') W need not be a contraction: the monDEQ adjoint owns GMRES
        return dict(splitting=splitting, throw=False,
                    adjoint=ImplicitAdjoint(linear_solver=GMRES(rtol=r, max_steps=CAP),
                                            throw=False))

    if arch == "linear":
        shape = (64, 64)
        return shape, {
            "pcdeq-1 (tanh, plain)": lambda r: PCDEQLinear(64, 80, activation=Tanh(), **plain(r)),
            "pcdeq-2 (sigmoid, plain)": lambda r: PCDEQLinear(64, 80, activation=Sigmoid(),
                                                              **plain(r)),
            "mondeq (Peaceman-Rachford)": lambda r: MonDEQLinear(
                64, 80, **mon(r, PeacemanRachford(rtol=r, max_steps=CAP))),
            "mondeq (forward-backward)": lambda r: MonDEQLinear(
                64, 80, **mon(r, ForwardBackward(rtol=r, max_steps=CAP))),
            "deq (tanh, Anderson)": lambda r: DEQLinear(64, 80, **anderson(r)),
        }
    shape = (64, 1, 8, 8)
    return shape, {
        "pcdeq-1 (tanh, plain)": lambda r: PCDEQConv2d(1, 16, activation=Tanh(), **plain(r)),
        "pcdeq-2 (sigmoid, plain)": lambda r: PCDEQConv2d(1, 16, activation=Sigmoid(),
                                                          **plain(r)),
        "mondeq (Peaceman-Rachford)": lambda r: MonDEQConv2d(
            1, 16, **mon(r, PeacemanRachford(rtol=r, max_steps=CAP))),
        "mondeq (forward-backward)": lambda r: MonDEQConv2d(
            1, 16, **mon(r, ForwardBackward(rtol=r, max_steps=CAP))),
        "deq (tanh, Anderson)": lambda r: DEQConv2d(1, 16, **anderson(r)),
    }


def measure(layer, x, c):
    t0 = time.process_time()
    sol = layer.solve(x)
    t1 = time.process_time()
    with warnings.catch_warnings():
        # a failed adjoint solve is reported in the table (bwd converged), not as a warning
        warnings.simplefilter("ignore", ConvergenceWarning)
        (sol.value * c).sum().backward()
    t2 = time.process_time()
    with torch.no_grad():
        u = layer.injection(x)
        fz = layer.layer(sol.value, u)
        rel = ((fz - sol.value).flatten(1).norm(dim=1) / fz.flatten(1).norm(dim=1)).max()
    grads = torch.cat([p.grad.flatten() for p in layer.parameters()])
    layer.zero_grad(set_to_none=True)
    solves = sol.backward_solves()
    steps_b = [s.num_steps for s in solves]
    return dict(forward=t1 - t0, backward=t2 - t1, fwd_steps=sol.solution.num_steps,
                bwd_steps=steps_b[-1] if steps_b else math.nan,
                failed=sol.solution.num_failed, bwd_ok=all(bool(s.converged.all()) for s in solves),
                rel_residual=float(rel), grads=grads)


def bench(arch, scale, args):
    shape, factories = make_layers(arch, args.rtol)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=g)
    layers, tight = {}, {}
    for name, factory in factories.items():
        layers[name] = factory(args.rtol)
        tight[name] = factory(args.rtol / 100)
        tight[name].load_state_dict(layers[name].state_dict())
        if scale != 1:
            layers[name].scale_weight_(scale)
            tight[name].scale_weight_(scale)
    with torch.no_grad():
        c = torch.randn(next(iter(layers.values())).solve(x).value.shape, generator=g)
    for layer in layers.values():  # warm-up: first calls allocate and dispatch
        measure(layer, x, c)
    results = {name: [] for name in layers}
    for repeat in range(args.repeats):
        for name, layer in layers.items():  # interleaved, so load changes hit all alike
            results[name].append(measure(layer, x, c))
    rows = []
    for name in layers:
        ref = measure(tight[name], x, c)["grads"]
        rs = results[name]
        grad_err = float((rs[-1]["grads"] - ref).norm() / ref.norm().clamp_min(1e-30))
        rows.append(dict(
            name=name, forward=statistics.median(r["forward"] for r in rs),
            backward=statistics.median(r["backward"] for r in rs),
            fwd_steps=rs[-1]["fwd_steps"], bwd_steps=rs[-1]["bwd_steps"],
            failed=rs[-1]["failed"], bwd_ok=rs[-1]["bwd_ok"], rel_residual=rs[-1]["rel_residual"], grad_err=grad_err))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rtol", type=float, default=1e-4)
    parser.add_argument("--arch", default="linear,conv")
    parser.add_argument("--scales", default="1,10")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    lines = [f"Machine: {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, torch threads "
             f"{torch.get_num_threads()}, torch {torch.__version__}; rtol {args.rtol:g}, "
             f"{args.repeats} repeats (median CPU time).", ""]
    for arch in args.arch.split(","):
        for scale in [float(s) for s in args.scales.split(",")]:
            rows = bench(arch, scale, args)
            base = rows[0]
            lines += [f"### {arch}, initial weights x{scale:g}", "",
                      "| layer | forward ms | backward ms | fwd steps | bwd steps | "
                      "fwd failed samples | bwd converged | worst rel. residual | grad rel. error | forward ratio | "
                      "backward ratio |", "|---|---|---|---|---|---|---|---|---|---|---|"]
            for r in rows:
                lines.append(
                    f"| {r['name']} | {1e3 * r['forward']:.2f} | {1e3 * r['backward']:.2f} | "
                    f"{r['fwd_steps']} | {r['bwd_steps']} | {r['failed']} | "
                    f"{'yes' if r['bwd_ok'] else 'NO'} | "
                    f"{r['rel_residual']:.1e} | {r['grad_err']:.1e} | "
                    f"{r['forward'] / base['forward']:.2f} | "
                    f"{r['backward'] / base['backward']:.2f} |")
            lines.append("")
            print("\n".join(lines[-len(rows) - 4:]), flush=True)
    text = "\n".join(lines)
    if args.out is not None:
        args.out.write_text("# bench_pcdeq\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
