r"""Cost of the accurate float32 slopes of `Tanh` and `Sigmoid` (issue 18, the x10 stress test).

`deqppl.layers.Tanh` differentiates as $\mathrm{sech}^2 t$ through a custom autograd function,
where torch's own backward uses $1 - \tanh^2 t$ (exactly 0 in float32 for $t > 9$); `Sigmoid`
as $s(t)s(-t)$ instead of $s(1 - s)$. This measures what that costs: forward solve plus
``backward()`` of a pcDEQ layer (linear 64 -> 80 and conv 1 -> 16 on 8x8, batch 64, float32,
weights x1), with the library's activation and with the torch functions, interleaved in one
process; median CPU time (``time.process_time``, one thread) over ``--repeats``; ratio
accurate / torch (the baseline).

Run: ``python benchmarks/bench_activation_slopes.py [--repeats 20]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from deqppl.layers import CustomActivation, PCDEQConv2d, PCDEQLinear, Sigmoid, Tanh


def _layers(activation):
    return {
        "linear": (PCDEQLinear(64, 80, activation=activation, seed=0),
                   torch.rand(64, 64, generator=torch.Generator().manual_seed(1))),
        "conv": (PCDEQConv2d(1, 16, activation=activation, seed=0),
                 torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))),
    }


def _cost(layer, x) -> float:
    start = time.process_time()
    layer(x).square().sum().backward()
    return time.process_time() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    # the torch functions as the baseline: same values, torch's backward (a CustomActivation
    # declared bounded; its concavity is verified numerically at construction)
    pairs = {
        "tanh": (Tanh(), CustomActivation(fn=torch.tanh, label="torch.tanh", bounded=True)),
        "sigmoid": (Sigmoid(), CustomActivation(fn=torch.sigmoid, label="torch.sigmoid",
                                                bounded=True)),
    }
    lines = ["| activation | layer | accurate ms | torch ms | ratio |", "|---|---|---|---|---|"]
    for name, (accurate, baseline) in pairs.items():
        ours, theirs = _layers(accurate), _layers(baseline)
        for kind in ours:
            _cost(*ours[kind]), _cost(*theirs[kind])  # warm-up (first-call allocations)
            a, b = [], []
            for _ in range(args.repeats):
                a.append(_cost(*ours[kind]))
                b.append(_cost(*theirs[kind]))
            ma, mb = statistics.median(a), statistics.median(b)
            lines.append(f"| {name} | {kind} | {1e3 * ma:.2f} | {1e3 * mb:.2f} | {ma / mb:.2f} |")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
