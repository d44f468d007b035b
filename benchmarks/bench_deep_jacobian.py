r"""Deep PED Jacobian: one GEMM per diagonal block against the einsum it replaced.

``DeepPEDEncoder.layer_jacobian`` forms each diagonal block
$W^{(l)\top}\mathrm{diag}(c^{(l)})W^{(l)}$ as ``weighted_gram(W, c)``: one ``(n, d) x (d, l*l)``
matrix product against the outer products of $W$'s rows. The baseline is the former
``einsum("di,nd,dj->nij", W, c, W)``, run here on the same ``W`` and ``c`` (the curvature of
the encoder's likelihood at its fixed point), in one process, interleaved and repeated; medians
of CPU time (``time.process_time``) with one torch thread are reported, with the ratio
einsum / GEMM. The two results are also compared (they must agree to round-off).

torch's einsum picks its contraction order with the optional ``opt_einsum`` package when it is
installed (it is not a torch dependency); the einsum baseline is timed both with it
(``torch.backends.opt_einsum.enabled = True``) and without it (left-to-right contraction, which
materialises the ``(n, d, l)`` intermediate).

Run: ``python benchmarks/bench_deep_jacobian.py [--repeats 15] [--rows 2000]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from deqppl.encoders import DeepPEDEncoder, weighted_gram
from deqppl.expfam import smooth_relu
from deqppl.models import HierarchicalExpFamPCA

SIZES = [(6, 3, 2), (50, 10, 5), (200, 20, 10), (784, 32, 8)]


def _cpu(fn, reps: int = 5) -> float:
    start = time.process_time()
    for _ in range(reps):
        fn()
    return (time.process_time() - start) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = [
        f"rows n = {args.rows}, float64, torch threads = {torch.get_num_threads()}, "
        f"medians of {args.repeats} interleaved repeats (CPU seconds per call)",
        "",
        f"opt_einsum installed: {torch.backends.opt_einsum.is_available()}",
        "",
        "| widths | block (d, l) | GEMM | einsum (opt_einsum) | ratio | einsum (no opt_einsum) | ratio "
        "| max abs diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for widths in SIZES:
        model = HierarchicalExpFamPCA(widths=widths, nonlinearities=(smooth_relu(0.5),) * (len(widths) - 1),
                                      param_scale=0.5)
        sim = model.simulate(args.rows, seed=0, dtype=torch.float64)
        enc = DeepPEDEncoder.from_values(model, sim.truth)
        y = sim.data["y"]
        zeta = torch.cat([sim.truth[k] for k in model.local_sites], dim=1)
        zs, etas = enc._terms(zeta, y)
        W = enc.W1.detach()
        c = enc.likelihoods[0].curvature(zs[0], etas[0]).detach()
        t_opt, t_plain, t_gemm = [], [], []
        einsum = lambda: torch.einsum("di,nd,dj->nij", W, c, W)  # noqa: E731
        for _ in range(args.repeats):
            t_gemm.append(_cpu(lambda: weighted_gram(W, c)))
            t_opt.append(_cpu(einsum))
            torch.backends.opt_einsum.enabled = False
            try:
                t_plain.append(_cpu(einsum))
            finally:
                torch.backends.opt_einsum.enabled = True
        diff = float((einsum() - weighted_gram(W, c)).abs().max())
        g, a, b = (statistics.median(t) for t in (t_gemm, t_opt, t_plain))
        lines.append(
            f"| {widths} | ({widths[0]}, {widths[1]}) | {g:.2e} | {a:.2e} | {a / g:.2f} | {b:.2e} | "
            f"{b / g:.2f} | {diff:.1e} |"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
