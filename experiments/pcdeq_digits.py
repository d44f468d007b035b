r"""pcDEQ vs monDEQ vs unconstrained DEQ vs explicit, on handwritten digits (issue 18).

Data: the 1 797 8x8 digits shipped with deqppl (``deqppl.data.load_digits``, the UCI set as in
scikit-learn), pixels scaled to [0, 1], a fixed stratified split (per class, a seed-0
permutation; 25 % test: 1 347 train, 450 test).

Models (SPEC 5, 5.1), each in the paper's linear architecture (784 -> 80 becomes 64 -> 80) and
single-conv architecture (scaled down for 2 CPU cores: ``--channels`` channels, 4x4 pooling):

* pcDEQ-1: tanh, softplus(beta=5) injection, W = gain * softplus(V)/||softplus(V)|| >= 0,
  forward and backward by plain iteration;
* pcDEQ-2: sigmoid, ReLU injection;
* monDEQ: W = (1 - m) I - A^T A + B - B^T, m = 0.05, Peaceman-Rachford (alpha = 1) as a
  solver of the DEQ core's protocol, backward by GMRES;
* DEQ: unconstrained W (same shape and parameters as the pcDEQ), tanh, Anderson forward and
  backward;
* explicit: the same parameters applied twice (weight-tied, ReLU).

Every implicit model: forward rtol 1e-4 (relative residual of the layer's map), at most 200
steps, implicit backward with the same tolerance and cap, failures recorded, not
raised. AdamW, batch 64, lr 1e-2 (the paper: 1e-3 over many more epochs), 6 epochs. Then the
stress test: the same with the initial W scaled by 10 (monDEQ: A and B by 10), for
``--stress-epochs`` (2) epochs and ``--stress-seeds`` (2) seeds, since models that fail to
converge spend the full step cap on every batch.

Per run (family x architecture x seed x stress) one JSON file in ``OUT/runs`` written atomically
when the run finishes; a rerun with the same ``--out`` skips finished runs. ``OUT/table.md``
holds the table (accuracy mean +- sd over seeds, parameters, mean forward and backward steps,
time per epoch, runs with non-converged solves -- per run "Ff/Bb/Ss": F samples whose forward
solve failed, B adjoint solves that failed, S optimiser steps skipped for NaN gradients (the DEQ
core gives NaN derivatives for samples whose forward solve failed) -- and pcDEQ certificates on
the test set).

Run: ``python experiments/pcdeq_digits.py --out runs/pcdeq_digits`` (about 10 minutes on one
core at the defaults). With MNIST IDX files on disk the paper's protocol runs with
``--mnist DIR`` (28x28, 82 channels, 8x8 pooling, the paper's sizes; hours on a CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from deqppl.data import load_digits
from deqppl.deq import GMRES, Anderson, FixedPointIteration, ImplicitAdjoint
from deqppl.layers import (DEQFamily, ExplicitFamily, MonDEQFamily, PCDEQFamily,
                           PeacemanRachford, Sigmoid, Tanh, evaluate_classifier, fit_classifier,
                           implicit_layers, linear_classifier, num_parameters,
                           single_conv_classifier)

RTOL, MAX_STEPS = 1e-4, 200


def families() -> dict[str, object]:
    """The five model families, with non-convergence recorded rather than raised."""
    plain = FixedPointIteration(rtol=RTOL, max_steps=MAX_STEPS)
    plain_adjoint = ImplicitAdjoint(solver=FixedPointIteration(rtol=RTOL, atol=0.0,
                                                               max_steps=MAX_STEPS), throw=False)
    anderson = Anderson(rtol=RTOL, max_steps=MAX_STEPS)
    anderson_adjoint = ImplicitAdjoint(solver=Anderson(rtol=RTOL, atol=0.0, max_steps=MAX_STEPS),
                                       throw=False)
    # J = diag(relu') W need not be a contraction for a monDEQ: its adjoint owns GMRES
    mon_adjoint = ImplicitAdjoint(linear_solver=GMRES(rtol=RTOL, max_steps=MAX_STEPS),
                                  throw=False)
    return {
        "pcdeq-1 (tanh)": PCDEQFamily(activation=Tanh(), solver=plain, adjoint=plain_adjoint,
                                      throw=False),
        "pcdeq-2 (sigmoid)": PCDEQFamily(activation=Sigmoid(), solver=plain,
                                         adjoint=plain_adjoint, throw=False),
        "mondeq (PR)": MonDEQFamily(splitting=PeacemanRachford(rtol=RTOL, max_steps=MAX_STEPS),
                                    adjoint=mon_adjoint, throw=False),
        "deq (tanh, Anderson)": DEQFamily(activation=Tanh(), solver=anderson,
                                          adjoint=anderson_adjoint, throw=False),
        "explicit (relu)": ExplicitFamily(),
    }


def split_digits(*, dtype):
    data = load_digits(dtype=dtype)
    images = (data.y / 16.0).reshape(-1, 1, 8, 8)
    labels = data.labels.long()
    g = torch.Generator().manual_seed(0)
    train, test = [], []
    for k in range(10):
        idx = torch.nonzero(labels == k).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        cut = int(round(0.25 * len(idx)))
        test.append(idx[:cut])
        train.append(idx[cut:])
    train, test = torch.cat(train), torch.cat(test)
    return images[train], labels[train], images[test], labels[test]


def build(arch, family, *, image_size, in_channels, channels, pool, seed, dtype):
    if arch == "linear":
        return linear_classifier(family, image_size=image_size, in_channels=in_channels,
                                 seed=seed, dtype=dtype)
    return single_conv_classifier(family, image_size=image_size, in_channels=in_channels,
                                  channels=channels, pool=pool, seed=seed, dtype=dtype)


def run_one(name, family, arch, seed, stress, data, args):
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)  # BatchNorm and nothing else draws from the global generator
    model = build(arch, family, image_size=tuple(x_train.shape[2:]),
                  in_channels=x_train.shape[1], channels=args.channels, pool=args.pool,
                  seed=seed, dtype=args.dtype)
    scaled = []
    if stress != 1.0:
        for module in model.modules():
            if hasattr(module, "scale_weight_") and module is not model:
                module.scale_weight_(stress)
                scaled.append(type(module).__name__)
    start = time.perf_counter()
    epochs = args.epochs if stress == 1 else args.stress_epochs
    fit = fit_classifier(model, x_train, y_train, num_epochs=epochs, batch_size=64,
                         lr=args.lr, seed=seed, skip_nonfinite_steps=True)
    train_seconds = time.perf_counter() - start
    row = {
        "family": name, "arch": arch, "seed": seed, "stress": stress,
        "params": num_parameters(model), "epochs": epochs, "status": fit.status.name, "message": fit.message,
        "epochs_run": len(fit.epochs), "time_per_epoch": fit.mean("wall_time"),
        "forward_steps": fit.mean("forward_steps"), "backward_steps": fit.mean("backward_steps"),
        "train_forward_failed": fit.forward_failed, "train_backward_failed": fit.backward_failed,
        "skipped_steps": fit.skipped_steps,
        "train_seconds": train_seconds, "scaled": scaled,
    }
    if fit.status.name == "COMPLETED":
        ev = evaluate_classifier(model, x_test, y_test)
        row.update(accuracy=ev.accuracy, test_forward_steps=ev.forward_steps,
                   test_forward_failed=ev.forward_failed)
        layers = implicit_layers(model)
        certs = [layer.solve(layer_input(model, layer, x_test), certify=True).certificate
                 for layer in layers if hasattr(layer, "check_cone")]
        if certs:
            row["certified"] = all(c.certified for c in certs)
            row["rho_bound_max"] = max(c.as_dict()["spectral_radius_bound"] for c in certs)
            row["rho_max"] = max(c.as_dict()["spectral_radius"] for c in certs)
            row["min_weight"] = min(c.min_weight for c in certs)
        mon = [layer for layer in layers if hasattr(layer, "margin")]
        if mon:
            extra = mon[0].last_solution.extra
            row["measured_margin"] = extra.get("measured_margin", math.nan)
            row["lipschitz"] = extra.get("lipschitz", math.nan)
    else:
        row.update(accuracy=math.nan, test_forward_steps=math.nan, test_forward_failed=-1)
    return row


@torch.no_grad()
def layer_input(model, layer, x):
    """The input that ``layer`` sees inside the sequential ``model`` for images ``x``."""
    h = x
    for module in model:
        if module is layer:
            return h
        h = module(h)
    raise ValueError("layer is not a child of model")


def fmt(values, digits=1, scale=1.0):
    values = [v * scale for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(rows):
    lines = ["| W init | arch | model | test accuracy % | params | fwd steps | bwd steps | "
             "s / epoch | runs with non-converged solves | certified (pcDEQ, test) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    keys = []
    for r in rows:
        key = (r["stress"], r["arch"], r["family"])
        if key not in keys:
            keys.append(key)
    for stress, arch, family in keys:
        rs = [r for r in rows if (r["stress"], r["arch"], r["family"]) == (stress, arch, family)]
        failed = sum(1 for r in rs if r["status"] != "COMPLETED" or r["train_forward_failed"]
                     or r["train_backward_failed"] or r.get("test_forward_failed", 0)
                     or r.get("skipped_steps", 0))
        fails = [f"{r['train_forward_failed']}f/{r['train_backward_failed']}b"
                 + (f"/{r['skipped_steps']}s" if r.get("skipped_steps") else "")
                 + ("" if r["status"] == "COMPLETED" else f" {r['status']}") for r in rs]
        cert = "–"
        if any("certified" in r for r in rs):
            cert = f"{sum(bool(r.get('certified')) for r in rs)}/{len(rs)}"
        lines.append(
            f"| x{stress:g} | {arch} | {family} | {fmt([r['accuracy'] for r in rs], 1, 100)} | "
            f"{rs[0]['params']} | {fmt([r['forward_steps'] for r in rs])} | "
            f"{fmt([r['backward_steps'] for r in rs])} | {fmt([r['time_per_epoch'] for r in rs], 2)} | "
            f"{failed}/{len(rs)} ({', '.join(fails)}) | {cert} |")
    return "\n".join(lines)


#: Per-run numbers written to the tidy table (the harness's long format).
TIDY_METRICS = ("accuracy", "params", "forward_steps", "backward_steps", "time_per_epoch",
                "train_forward_failed", "train_backward_failed", "skipped_steps",
                "test_forward_failed",
                "certified", "rho_max", "rho_bound_max", "min_weight", "measured_margin",
                "lipschitz")


def write_tidy(rows, path, *, dataset):
    """Rows ``model, method, seed, stage, metric, value`` (the long format of
    `deqppl.harness.Comparison.table`): model = dataset and architecture, method = family,
    stage = ``test`` or ``stress_x10``."""
    import csv

    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", "method", "seed", "stage", "metric", "value"])
        for r in rows:
            stage = "test" if r["stress"] == 1 else f"stress_x{r['stress']:g}"
            for metric in TIDY_METRICS:
                if metric in r:
                    writer.writerow([f"{dataset}-{r['arch']}", r["family"], r["seed"], stage,
                                     metric, float(r[metric])])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--channels", type=int, default=8,
                        help="single-conv channels (the paper: 82 for MNIST)")
    parser.add_argument("--pool", type=int, default=4, help="single-conv pooling (paper: 8)")
    parser.add_argument("--arch", default="linear,conv")
    parser.add_argument("--families", default=None,
                        help="semicolon-separated subset of the names (they contain commas)")
    parser.add_argument("--stress", default="1,10", help="initial-W scales to run")
    parser.add_argument("--stress-epochs", type=int, default=2)
    parser.add_argument("--stress-seeds", type=int, default=2)
    parser.add_argument("--mnist", type=Path, default=None,
                        help="directory with the MNIST IDX files: run the paper's protocol")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.dtype = torch.float32
    if args.mnist is not None:
        from deqppl.data.idx import load_mnist

        train, test = load_mnist(args.mnist, train=True), load_mnist(args.mnist, train=False)
        data = (train.images, train.labels, test.images, test.labels)
        if args.channels == 8 and args.pool == 4:  # the paper's sizes unless overridden
            args.channels, args.pool = 82, 8
    else:
        data = split_digits(dtype=args.dtype)
    fams = families()
    if args.families:
        wanted = [f.strip() for f in args.families.split(";")]
        unknown = [w for w in wanted if w not in fams]
        if unknown:
            parser.error(f"unknown families {unknown}; valid: {list(fams)}")
        fams = {k: fams[k] for k in wanted}
    archs = [a.strip() for a in args.arch.split(",")]
    for a in archs:
        if a not in ("linear", "conv"):
            parser.error(f"unknown arch {a!r}; valid: linear, conv")
    stresses = [float(s) for s in args.stress.split(",")]
    runs = args.out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    rows = []
    for stress in stresses:
        for arch in archs:
            for name, family in fams.items():
                for seed in range(args.seeds if stress == 1 else args.stress_seeds):
                    tag = f"{arch}_{name}_{seed}_x{stress:g}".replace(" ", "").replace("/", "")
                    path = runs / f"{tag}.json"
                    if path.exists():
                        rows.append(json.loads(path.read_text()))
                        continue
                    row = run_one(name, family, arch, seed, stress, data, args)
                    tmp = path.with_suffix(".tmp")
                    tmp.write_text(json.dumps(row, indent=1))
                    os.replace(tmp, path)
                    rows.append(row)
                    print(f"{tag}: acc {row['accuracy']:.3f} fwd {row['forward_steps']:.1f} "
                          f"bwd {row['backward_steps']:.1f} {row['time_per_epoch']:.2f}s/epoch "
                          f"{row['status']} failed {row['train_forward_failed']}f/"
                          f"{row['train_backward_failed']}b", flush=True)
    text = table(rows)
    (args.out / "table.md").write_text(text + "\n")
    write_tidy(rows, args.out / "tidy.csv", dataset="mnist" if args.mnist else "digits")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
