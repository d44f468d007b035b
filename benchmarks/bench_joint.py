r"""Issue 19: the joint MAP of (W, B, Z) of exponential-family PCA — deqppl's default structured fit
(``fit_encoder`` with ``AlternatingNewton()``) against glmpca 0.1.0 and deqppl's own L-BFGS fits.

Problems (float64, ``torch.set_num_threads(1)``, BLAS threads 1):

* *anchor*: $y\sim\mathrm{Poisson}(\exp(0.5\,Wz+1))$, $W\in\mathbb R^{200\times2}$, $z_s$ and
  $W_{ij}$ iid $\mathcal N(0,1)$, $N$ rows ($N$ = 2 000 for the comparison, 20 000 and 200 000
  for the cost growth); model ``ExpFamPCA(poisson(), 200, 2)`` ($\lambda = 1$, $s = 1$).
* *digits*: the 1 797 bundled digits as Binomial(16) counts, $l = 5$, the pixels that are 0 in
  every image dropped (glmpca refuses all-zero features; every method gets the same data).

Methods, all in this process on the same data:

* ``deqppl default``: ``fit_encoder(PEDEncoder(model), y)`` (no optimizer given: the encoder's
  default, ``AlternatingNewton()``), whose result carries the fitted latents (``fit.latents``).
* ``glmpca``: ``glmpca.glmpca(Y.T, L, fam="poi", penalty=1, sz=ones)`` at its documented
  defaults (``ctl={"maxIter": 1000, "eps": 1e-4}``): Fisher scoring, one coordinate at a time,
  $\ell_2$ penalty 1 on factors and loadings (= our $\lambda = 1$, $s = 1$), unpenalised
  intercepts. For the digits glmpca has no Binomial($t$) family; its ``"mult"`` family is the
  binomial with a per-observation size ``colSums(Y)``, and we hand it the constant size 16
  (``GlmpcaFamily("mult", mult_n=16)``: gradient $Y-16p$, information $16p(1-p)$, i.e. Fisher
  scoring for Binomial(16), glmpca's own code otherwise untouched).
  glmpca's returned factorisation is orthonormalised (``ortho``), which changes the prior
  penalty but not $\eta$; before scoring it we move it, along the likelihood's symmetries, to
  the factorisation of the same $\eta$ with the *lowest* penalty (deqppl's closed-form
  balancing, iterated) — this only raises glmpca's log joint.
* ``joint L-BFGS``: ``fit_map(model, {"y": y}, optimizer=LBFGS())`` over $(W, B, z)$, the
  protocol's gradient rule.
* ``profiled L-BFGS``: ``fit_encoder(PEDEncoder(model), y, optimizer=LBFGS())`` (L-BFGS on
  $(W,B)$ through the fixed point), then ``enc.solve(y)``.

Scores (not timed), for each method's $(W, B, Z)$: the training Poisson (binomial) log-lik
$\sum\log p(y\mid\eta)$ and the log joint of the deqppl model (from the Pyro trace), the
canonical correlations between the fitted and the true latents (anchor), and the gap of the log
joint to a reference optimum (the default fit continued with ``dtol=0`` until it stalls).
Times are CPU seconds of this process (``time.process_time``; one thread, so less sensitive to
other jobs on the machine than wall time, which is also printed); the default fit and glmpca are
run ``--repeats`` times, interleaved, and their medians reported; the time-to-reach figures
come from the default fit's last run (per-sweep CPU times from its callback).

Run: ``nice -n 10 python benchmarks/bench_joint.py [--rows 20000 200000] [--repeats 5] [--out FILE]`` (the tables of ``docs/bench_joint.md``).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from deqppl.data import load_digits  # noqa: E402
from deqppl.encoders import PEDEncoder, fit_encoder  # noqa: E402
from deqppl.encoders.joint import _Problem  # noqa: E402
from deqppl.expfam import binomial, poisson  # noqa: E402
from deqppl.inference import fit_map  # noqa: E402
from deqppl.models import ExpFamPCA  # noqa: E402
from deqppl.optim import LBFGS, AlternatingNewton  # noqa: E402

F64 = torch.float64


def anchor(num_rows: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(200, 2, generator=g, dtype=F64)
    z = torch.randn(num_rows, 2, generator=g, dtype=F64)
    y = torch.poisson(torch.exp(0.5 * z @ W.T + 1.0), generator=g)
    return ExpFamPCA(family=poisson(), obs_dim=200, latent_dim=2), y, z


def digits():
    y = load_digits(dtype=F64).y
    y = y[:, (y > 0).any(0)]
    return ExpFamPCA(family=binomial(16), obs_dim=y.shape[1], latent_dim=5), y


def timed(fn):
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c0, time.perf_counter() - w0


def canon_corr(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    qa, _ = torch.linalg.qr(a - a.mean(0))
    qb, _ = torch.linalg.qr(b - b.mean(0))
    return torch.linalg.svdvals(qa.T @ qb).tolist()


def score(model, y, values, truth=None):
    with torch.no_grad():
        eta = values["z"] @ values["W"].T + values["B"]
        loglik = float(model.likelihood.log_prob(y, eta).sum())
        lj = float(model.log_joint({"y": y}, values))
    out = {"log_lik": loglik, "log_joint": lj}
    if truth is not None:
        out["cc"] = canon_corr(values["z"], truth)
    return out


#: (CPU seconds since the start, loss) after each sweep of the last default fit
PROGRESS: list[tuple[float, float]] = []


def run_default(model, y):
    PROGRESS.clear()
    c0 = time.process_time()

    def fn():
        enc = PEDEncoder(model).double()
        fit = fit_encoder(enc, y, progress=False,
                          callback=lambda k, loss: PROGRESS.append((time.process_time() - c0, loss)))
        return enc, fit, fit.latents

    (enc, fit, z), cpu, wall = timed(fn)
    values = {"W": enc.W.detach(), "B": enc.B.detach(), "z": z}
    return values, cpu, wall, fit.num_steps, f"{fit.status.name}: {fit.criterion}"


def time_to_reach(log_joint: float) -> tuple[float, int] | None:
    """CPU time and sweeps the last default fit took to reach ``log_joint`` (from its trace)."""
    for k, (t, loss) in enumerate(PROGRESS, start=1):
        if -loss >= log_joint:
            return t, k
    return None


def run_profiled(model, y):
    def fn():
        enc = PEDEncoder(model).double()
        fit = fit_encoder(enc, y, optimizer=LBFGS(), progress=False)
        z = enc.solve(y).value.detach()
        return enc, fit, z

    (enc, fit, z), cpu, wall = timed(fn)
    values = {"W": enc.W.detach(), "B": enc.B.detach(), "z": z}
    return values, cpu, wall, fit.num_steps, fit.status.name


def run_joint_lbfgs(model, y):
    fit, cpu, wall = timed(lambda: fit_map(model, {"y": y}, optimizer=LBFGS(), progress=False))
    return dict(fit.values), cpu, wall, fit.num_steps, fit.status.name


def _glmpca_binomial16():
    """glmpca's own init with its "mult" family given the constant size 16 (= Binomial(16))."""
    import glmpca.glmpca as G

    original = G.glmpca_init

    def init(Y, fam, sz=None, nb_theta=None):
        out = original(Y, fam, sz, nb_theta)
        n = 16.0 * np.ones(Y.shape[1])
        gf = G.GlmpcaFamily("mult", None, n)
        out["gf"] = gf
        out["intercepts"] = gf.family.link(G.rowSums(Y) / np.sum(n))
        return out

    return G, original, init


def run_glmpca(model, y, *, binomial16: bool):
    import glmpca.glmpca as G

    Y = y.numpy().T.copy()
    N = Y.shape[1]
    L = model.latent_dim
    np.random.seed(0)
    if binomial16:
        _, original, init = _glmpca_binomial16()
        G.glmpca_init = init
        try:
            res, cpu, wall = timed(lambda: G.glmpca(Y, L, fam="mult", penalty=1))
        finally:
            G.glmpca_init = original
    else:
        res, cpu, wall = timed(lambda: G.glmpca(Y, L, fam="poi", penalty=1, sz=np.ones(N)))
    W = torch.tensor(res["loadings"], dtype=F64)
    z = torch.tensor(res["factors"], dtype=F64)
    B = torch.tensor(res["coefX"][:, 0], dtype=F64)
    # the same eta at the factorisation with the lowest prior penalty (only helps glmpca)
    pb = _Problem(PEDEncoder(model).double().joint_structure(), y, AlternatingNewton())
    th = [torch.cat([W, B[:, None]], 1)]
    for _ in range(50):
        th, z = pb.balance(th, z)
    values = {"W": th[0][:, :-1], "B": th[0][:, -1], "z": z}
    return values, cpu, wall, len(res["dev"]), "eps 1e-4 (default ctl)"


def reference(model, y, start_values):
    """The default fit continued until it stalls (dtol=0): the reference optimum."""
    enc = PEDEncoder(model, W=start_values["W"], B=start_values["B"]).double()
    opt = AlternatingNewton(dtol=0.0, max_steps=300, spectral_start=False)
    fit = fit_encoder(enc, y, optimizer=opt, progress=False)
    return {"W": enc.W.detach(), "B": enc.B.detach(), "z": fit.latents}, fit


METHODS_DEFAULT = "deqppl default (AlternatingNewton)"
METHODS = {
    "deqppl default (AlternatingNewton)": run_default,
    "glmpca 0.1.0 (Fisher scoring, sz=1)": None,
    "deqppl joint L-BFGS (fit_map)": run_joint_lbfgs,
    "deqppl profiled L-BFGS (fit_encoder LBFGS)": run_profiled,
}


def _eta(values):
    return values["z"] @ values["W"].T + values["B"]


def compare(name, model, y, truth, methods, *, binomial16=False, repeats=1):
    rows = []
    progress = []
    # The two fast methods are run `repeats` times, interleaved, and their median CPU (wall)
    # time is reported; the L-BFGS fits (tens of seconds) once.
    fast = [m for m in methods if m == METHODS_DEFAULT or m.startswith("glmpca")]
    times: dict[str, list[tuple[float, float]]] = {m: [] for m in fast}
    for _ in range(repeats - 1):
        for label in fast:
            out = run_glmpca(model, y, binomial16=binomial16) if label.startswith("glmpca") else METHODS[label](model, y)
            times[label].append((out[1], out[2]))
    for label in methods:
        if label.startswith("glmpca"):
            values, cpu, wall, its, status = run_glmpca(model, y, binomial16=binomial16)
        else:
            values, cpu, wall, its, status = METHODS[label](model, y)
        if label in times:
            times[label].append((cpu, wall))
            cpu = float(np.median([t[0] for t in times[label]]))
            wall = float(np.median([t[1] for t in times[label]]))
        rows.append((label, values, cpu, wall, its, status, score(model, y, values, truth)))
        if label == METHODS_DEFAULT:
            progress = list(PROGRESS)
        print(f"  [{name}] {label}: cpu {cpu:.2f} s, wall {wall:.2f} s, {its} its, "
              f"log joint {rows[-1][-1]['log_joint']:.3f}", flush=True)
    ref_values, ref_fit = reference(model, y, rows[0][1])
    ref = score(model, y, ref_values, truth)
    best = max([ref["log_joint"]] + [r[-1]["log_joint"] for r in rows])
    lines = [
        f"### {name}: N = {y.shape[0]}, d = {y.shape[1]}, l = {model.latent_dim}",
        "",
        "| method | CPU s | wall s | iterations | log-lik | log joint | gap to best log joint (rel.) "
        + ("| canonical corr. " if truth is not None else "") + "| stop |",
        "|---|---|---|---|---|---|---|" + ("---|" if truth is not None else "") + "---|",
    ]
    for label, _, cpu, wall, its, status, sc in rows:
        gap = (best - sc["log_joint"]) / abs(best)
        cc = f"| {sc['cc'][0]:.4f} / {sc['cc'][1]:.4f} " if truth is not None else ""
        lines.append(
            f"| {label} | {cpu:.2f} | {wall:.2f} | {its} | {sc['log_lik']:.2f} | {sc['log_joint']:.3f} "
            f"| {gap:.2e} {cc}| {status} |"
        )
    base = rows[0]
    lines.append("")
    for label, _, cpu, *_rest in rows[1:]:
        lines.append(f"- CPU time of the default / {label}: **{base[2] / cpu:.3f}**")
    PROGRESS[:] = progress
    for label, _, cpu, _w, _i, _s, sc in rows[1:]:
        hit = time_to_reach(sc["log_joint"])
        if hit is not None:
            lines.append(
                f"- the default fit passed {label}'s final log joint after {hit[1]} sweeps, "
                f"{hit[0]:.3f} CPU s: **{hit[0] / cpu:.3f}** of {label}'s time"
            )
    lines.append(
        f"- reference optimum (default fit continued with dtol=0, {ref_fit.num_steps} sweeps, "
        f"{ref_fit.status.name}): log joint {ref['log_joint']:.6f}; the default's stopping rule "
        f"left a gap of {ref['log_joint'] - base[-1]['log_joint']:.3g} "
        f"({(ref['log_joint'] - base[-1]['log_joint']) / abs(ref['log_joint']):.2e} relative); "
        f"largest principal angle between its W and the reference's: "
        f"{model.global_metrics(base[1], ref_values)['subspace_angle']:.2e} rad; "
        f"max |eta - eta_ref| = {float((_eta(base[1]) - _eta(ref_values)).abs().max()):.2e}"
    )
    lines.append("")
    return "\n".join(lines), rows


def growth(ns, methods, max_baseline_rows):
    lines = [
        "### Cost growth on the anchor problem (d = 200, l = 2)",
        "",
        "| N | method | CPU s | wall s | iterations | log joint | stop |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in ns:
        model, y, z = anchor(n)
        for label in methods:
            if label != METHODS_DEFAULT and n > max_baseline_rows:
                continue
            if label.startswith("glmpca"):
                values, cpu, wall, its, status = run_glmpca(model, y, binomial16=False)
            else:
                values, cpu, wall, its, status = METHODS[label](model, y)
            sc = score(model, y, values)
            print(f"  [growth N={n}] {label}: cpu {cpu:.2f} s, {its} its", flush=True)
            lines.append(f"| {n} | {label} | {cpu:.2f} | {wall:.2f} | {its} | {sc['log_joint']:.3f} | {status} |")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="*", default=[20_000, 200_000],
                    help="N for the cost-growth table (N = 2 000 is the comparison)")
    ap.add_argument("--growth-methods", nargs="*", default=["default", "glmpca"],
                    help="which methods the growth table runs: default glmpca joint profiled")
    ap.add_argument("--max-baseline-rows", type=int, default=20_000,
                    help="the growth table runs the baselines only up to this N (time on a shared machine)")
    ap.add_argument("--skip-profiled", action="store_true", help="leave profiled L-BFGS out of the comparison")
    ap.add_argument("--repeats", type=int, default=5,
                    help="runs of the default fit and of glmpca in the comparison (medians reported)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = list(METHODS)
    comp = names if not args.skip_profiled else names[:3]
    short = {"default": names[0], "glmpca": names[1], "joint": names[2], "profiled": names[3]}
    load = os.getloadavg()
    parts = [
        "# Structured joint fit vs glmpca and L-BFGS (issue 19)",
        "",
        f"Command: `nice -n 10 python benchmarks/bench_joint.py --rows {' '.join(map(str, args.rows))}"
        f" --growth-methods {' '.join(args.growth_methods)} --max-baseline-rows {args.max_baseline_rows}"
        f" --repeats {args.repeats}` "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores shared with other jobs, "
        f"load average at start {load[0]:.1f}, torch threads {torch.get_num_threads()}, float64).",
        "",
    ]
    t0 = time.perf_counter()
    model, y, z = anchor(2000)
    text, _ = compare("anchor (Poisson)", model, y, z, comp, repeats=args.repeats)
    parts.append(text)
    model, y = digits()
    text, _ = compare("digits (Binomial(16))", model, y, None, comp, binomial16=True, repeats=args.repeats)
    parts.append(text)
    if args.rows:
        parts.append(growth(args.rows, [short[m] for m in args.growth_methods], args.max_baseline_rows))
    parts.append(f"Total run time {time.perf_counter() - t0:.0f} s; load average at the end "
                 f"{os.getloadavg()[0]:.1f}.")
    report = "\n".join(parts)
    print(report)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(report + "\n")


if __name__ == "__main__":
    main()
