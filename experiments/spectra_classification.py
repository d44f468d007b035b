r"""Random-feature classification: random DEQ vs matched vs unmatched shallow networks.

Only the last linear layer is trained: hidden weights are random and frozen, features of the
training and test points come from one network draw per seed, and a ridge readout on one-hot
targets is fitted on the training features, its ridge chosen per model on a held-out fifth of the
training set from $\{10^{-6},10^{-4},10^{-2},1\}$ and then refitted on the whole training set.

Models, for a DEQ with $\sigma_a^2=0.2$ and activation ReLU or tanh, all of width $m$:

* ``deq``: the random DEQ's fixed point $z^*(x)$ (centred activation at $\tau_*$ of the training
  data), solved for all points at once with `deqppl.spectra.deq_features`;
* ``matched``: the shallow network of `deqppl.spectra.match_network` (ReLU: two layers of centred
  leaky ReLU; tanh: one layer of hard tanh), matched on the training data's $\tau_0$;
* ``unmatched``: the same depth with the DEQ's own activation (two centred ReLU layers; one tanh
  layer).

Data: SPEC 6's two-class mixture ($p=256$, 512 training and 512 test points; it is separated
perfectly from width 512 on, so also ``mixture-weak``: the same with means of norm 3 instead of
8) and scikit-learn's
handwritten digits ($8\times8$, 10 classes; centred by the training mean and scaled so the mean
squared norm of a training point is 1, $x=\mu_a/\sqrt p+\omega$ as SPEC 6 reads data; a fixed random
split of 1 000 training and 797 test points).

Results: ``OUT/results.csv`` one row per (dataset, activation, model, width, seed) as each
finishes (a rerun skips finished rows), ``OUT/summary.md`` (mean and standard deviation over
seeds) and ``OUT/accuracy_vs_width.png``.

Run: ``python experiments/spectra_classification.py --out docs/spectra_classification``
(``--widths 32,128,512,2048 --seeds 0,1,2`` by default; ~20 min on one loaded core).
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

import numpy as np
import torch

from deqppl.deq import FixedPointIteration
from deqppl.spectra import (ExplicitNetwork, GaussianMixture, OneLayerHardTanh, RandomDEQ, ReLU,
                            Tanh, TwoLayerLeakyReLU, deq_features, draw_deq_weights,
                            explicit_coefficients, match_network, solve_coefficients,
                            two_class_mixture, unmatched_activations)

ACTIVATIONS = {"relu": (ReLU(), TwoLayerLeakyReLU()), "tanh": (Tanh(), OneLayerHardTanh())}
MODELS = ("deq", "matched", "unmatched")
RIDGES = (1e-6, 1e-4, 1e-2, 1.0)
FIELDS = ["dataset", "activation", "model", "width", "seed", "accuracy", "ridge", "seconds"]
#: float32 features: the kernels need ~1e-5 relative accuracy at most, and float32 halves the
#: cost of the batched matrix products; the fixed-point tolerance is set accordingly.
DTYPE = torch.float32
SOLVER = FixedPointIteration(rtol=1e-5, atol=0.0, max_steps=1000)


def load(name: str):
    if name in ("mixture", "mixture-weak"):
        mix = two_class_mixture(256)
        if name == "mixture-weak":  # the same mixture with means of norm 3 instead of 8
            mix = GaussianMixture(means=mix.means * (3.0 / 8.0), covariances=mix.covariances)
        train, test = mix.sample(512, seed=10), mix.sample(512, seed=11)
        return train.x, train.labels, test.x, test.labels
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float64)
    y = torch.tensor(digits.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1000], perm[1000:]
    mean = x[tr].mean(0)
    x = x - mean
    x = x / math.sqrt(float((x[tr] ** 2).sum(1).mean()))
    return x[tr], y[tr], x[te], y[te]


def features(model, act, design, x_train, x_all, width, seed):
    deq = RandomDEQ(activation=act, var_a=0.2, var_b=0.8)
    tau0 = math.sqrt(float((x_train**2).sum(1).mean()))
    coefficients = solve_coefficients(deq, tau0)
    p = x_all.shape[1]
    if model == "deq":
        A, B = draw_deq_weights(1, width, p, seed=seed, dtype=DTYPE)
        Z, _ = deq_features(coefficients, x_all.to(DTYPE), A, B, solver=SOLVER)
        return Z[0].double()
    if model == "matched":
        acts = match_network(coefficients, design).explicit.activations
    else:
        acts = explicit_coefficients(unmatched_activations(coefficients, design),
                                     tau0).activations
    net = ExplicitNetwork(acts, input_dim=p, width=width, seed=seed, dtype=DTYPE)
    with torch.no_grad():
        return net(x_all.to(DTYPE))[0].double()


def ridge_fit(F, Y, lam):
    # the smaller of the primal (m x m) and dual (n x n) systems
    n, m = F.shape
    if m <= n:
        return torch.linalg.solve(F.T @ F + lam * torch.eye(m, dtype=F.dtype), F.T @ Y)
    return F.T @ torch.linalg.solve(F @ F.T + lam * torch.eye(n, dtype=F.dtype), Y)


def accuracy(F_train, y_train, F_test, y_test, num_classes):
    Y = torch.nn.functional.one_hot(y_train, num_classes).double()
    Y = Y - Y.mean(0)
    mean = F_train.mean(0)
    Ft, Fs = F_train - mean, F_test - mean
    cut = int(0.8 * len(y_train))
    scores = []
    for lam in RIDGES:
        W = ridge_fit(Ft[:cut], Y[:cut] - Y[:cut].mean(0), lam)
        scores.append(float(((Ft[cut:] @ W).argmax(1) == y_train[cut:]).double().mean()))
    lam = RIDGES[int(np.argmax(scores))]
    W = ridge_fit(Ft, Y, lam)
    return float(((Fs @ W).argmax(1) == y_test).double().mean()), lam


def summarise(rows, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["activation"], r["model"], int(r["width"])),
                          []).append(float(r["accuracy"]))
    lines = ["| dataset | activation | width | deq | matched | unmatched |",
             "|---|---|---|---|---|---|"]
    keys = sorted({(d, a, w) for d, a, _, w in groups})
    for d, a, w in keys:
        cells = []
        for model in MODELS:
            acc = groups.get((d, a, model, w), [])
            cells.append(f"{np.mean(acc):.4f} ± {np.std(acc):.4f} (n={len(acc)})" if acc else "")
        lines.append(f"| {d} | {a} | {w} | " + " | ".join(cells) + " |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    datasets = sorted({d for d, _, _ in keys})
    fig, axes = plt.subplots(len(datasets), 2, figsize=(10, 3.6 * len(datasets)), squeeze=False)
    for i, d in enumerate(datasets):
        for j, a in enumerate(("relu", "tanh")):
            ax = axes[i, j]
            for model, style in zip(MODELS, ("-o", "--s", ":^")):
                pts = sorted((w, np.mean(acc), np.std(acc)) for (dd, aa, mm, w), acc in
                             groups.items() if dd == d and aa == a and mm == model)
                if pts:
                    w, mu, sd = map(np.array, zip(*pts))
                    ax.errorbar(w, mu, yerr=sd, fmt=style, capsize=3, label=model)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("width m")
            ax.set_ylabel("test accuracy")
            ax.set_title(f"{d}: {a}-DEQ vs explicit networks")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_width.png", dpi=120)
    plt.close(fig)
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/spectra_classification"))
    ap.add_argument("--widths", default="32,128,512,2048")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--datasets", default="mixture,mixture-weak,digits")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.csv"
    rows = list(csv.DictReader(path.open())) if path.exists() else []
    done = {(r["dataset"], r["activation"], r["model"], int(r["width"]), int(r["seed"]))
            for r in rows}
    if not path.exists():
        with path.open("w", newline="") as fh:
            csv.DictWriter(fh, FIELDS).writeheader()
    widths = [int(w) for w in args.widths.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    for dataset in args.datasets.split(","):
        x_tr, y_tr, x_te, y_te = load(dataset)
        x_all = torch.cat([x_tr, x_te])
        k = int(y_tr.max()) + 1
        for name, (act, design) in ACTIVATIONS.items():
            for width in widths:
                for seed in seeds:
                    for model in MODELS:
                        key = (dataset, name, model, width, seed)
                        if key in done:
                            continue
                        t = time.perf_counter()
                        F = features(model, act, design, x_tr, x_all, width, seed)
                        acc, lam = accuracy(F[: len(y_tr)], y_tr, F[len(y_tr):], y_te, k)
                        row = dict(zip(FIELDS, [dataset, name, model, width, seed, acc, lam,
                                                time.perf_counter() - t]))
                        with path.open("a", newline="") as fh:
                            csv.DictWriter(fh, FIELDS).writerow(row)
                        rows.append(row)
                        print(f"{key}: accuracy {acc:.4f} (ridge {lam:g}, "
                              f"{row['seconds']:.1f} s)", flush=True)
    print(summarise(rows, out))


if __name__ == "__main__":
    main()
