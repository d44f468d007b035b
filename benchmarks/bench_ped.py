r"""PED encoder benchmark: conditional MAP latents of exponential-family PCA for new data.

Problem (issue 4): $W, B$ known (the simulation's truth), find for every row of new data
$z^*_s = \arg\min_z F_s(z)$ with (SPEC §2.2, $R$ = identity)

$$F_s(z)=\tfrac\lambda2\lVert z\rVert^2-y_s^\top(Wz+B)+\mathbf 1^\top A(Wz+B),$$

in float64, for Poisson and Bernoulli ExpFamPCA with $N = 10\,000$ rows and
$(d, l) \in \{(50, 5), (500, 20)\}$, $\lambda = 1$. All methods run in one process on the
same data.

Simulation scale. ``param_scale`` $s = 1/\sqrt l$, so that the natural parameters
$\eta = Wz + B$ have variance $s^2(l/\lambda + 1) = (l+1)/l$, i.e. standard deviation
$\approx 1.1$ ($l = 5$) and $\approx 1.02$ ($l = 20$): $O(1)$ as issue 4 asks. (The model's
default $s = 1$ gives $\mathrm{sd}(\eta) = \sqrt{l+1}$, Poisson counts in the $10^4$-$10^9$
range, and a much worse float64 accuracy floor for every method.)

Methods
-------
* ``DEQ``: ``PEDEncoder.from_values(model, {"W": W, "B": B})`` then ``enc(y)`` under
  ``torch.no_grad()`` (inference). Default solver: Newton with the analytic Jacobian,
  relative residual $\lVert f(z)-z\rVert \le 10^{-8}\lVert f(z)\rVert$ per sample, starting
  from ``enc.initial_guess(y)``. ``DEQ (autograd on)`` is the same call with autograd enabled
  (the implicit adjoint then evaluates $f$ once more to attach the graph to $W, B$).
* ``Newton floor`` and ``Newton floor + LS``: a plain batched Newton loop written here, from
  the *same* initial guess and with the *same* per-sample stopping rule as the DEQ: per step
  $\eta = zW^\top + B$, $\nabla F = \lambda z - (y - A'(\eta))W$, $H = \lambda I +
  W^\top\mathrm{diag}(A''(\eta))W$ (formed as one matmul $A''(\eta)\,[W_{\cdot i}W_{\cdot j}]$),
  one batched ``torch.linalg.solve``. Without a line search (as issue 4 suggests) Newton from
  this guess overshoots on Poisson rows with large counts and needs about twice the steps,
  so the floor with a per-sample Armijo backtracking on $F$ is also run; the *faster* of the
  two is the floor the 1.5x target is judged against.
* ``Newton from zero`` / ``from learned start`` (issue 19): the same hand-written Newton
  loop (with and without the line search) from $z_0 = 0$ and from the encoder's
  ``LearnedStart`` (whose cost is inside the timing), and the DEQ with ``start=ZeroStart()``
  and ``start=LearnedStart(...)`` (fitted by ``LearnedStart.fit(enc, y_train)`` on the fixed
  points of $N$ independent training rows drawn from the same model and globals). The
  issue 19 target: the DEQ with the learned start in at most 0.6x the CPU time of the faster
  batched Newton from zero. Newton steps per datapoint (mean / max) are counted per row in
  the hand-written loop (the step after which the row first met the stopping rule).
* ``L-BFGS``: ``fit_map(optimizer=LBFGS(gtol=...), fixed={"W", "B"}, init={"z": z0})`` (same
  initial guess), max gradient entry $\le\lambda\cdot 10^{-6}/\sqrt l$ (then
  $\lVert\nabla F_s\rVert_2 \le 10^{-6}\lambda$, hence $\lVert z_s - z^*_s\rVert_2 \le
  10^{-6}$ by $\lambda$-strong convexity), ``rtol`` / ``xtol`` left at their defaults.
* ``SVI``: ``fit_map(optimizer=SVI(...), ...)`` (AutoDelta + Adam with the built-in plateau
  halving of the learning rate), same init and ``gtol``, ``lr`` tuned (``SVI_LR`` below),
  ``max_steps`` set from a measured per-step time so that each SVI run stays under a time cap.

Accuracy. The reference $z^*$ is the Newton floor iterated 3 steps past the DEQ's stopping
rule; its certificate $\max_s\lVert\nabla F_s(z)\rVert_2/\lambda$ bounds its own error (strong
convexity) and is printed. Each method's accuracy is $\max_{s,j}\lvert z_{sj} - z^*_{sj}\rvert$.

Costs. One *gradient evaluation* is one batched evaluation of $\nabla F$ (equivalently the
PED layer $f(z) = z - \nabla F(z)/\lambda$) on all $N$ rows; line-search trials count. For the
DEQ and the floors ``f evals`` are such evaluations and ``H evals`` are batched analytic
Hessians ($(N, l, l)$; the DEQ's ``num_jac_evals``); the DEQ evaluates only the rows still
iterating (row compaction), so its notes add the rows evaluated in units of $N$. For L-BFGS
and SVI every evaluation is a Pyro log joint plus its autograd gradient.

Timing. ``torch.set_num_threads(1)`` by default (``--threads``): the benchmark machine has 2
cores shared with other jobs, so wall times are noisy; each process's CPU time
(``time.process_time``) is far less sensitive to the load with one thread and is what the
ratios use. DEQ and floor runs are interleaved and repeated (``--repeats``); medians are
reported. L-BFGS is repeated only where it is fast; SVI runs once per case.

Run: ``python benchmarks/bench_ped.py [--quick] [--cases 0,2] [--skip-baselines]
[--repeats 3] [--out docs/bench_ped.md]`` (the full run, with the L-BFGS and SVI baselines,
takes about half an hour on a loaded machine; ``--skip-baselines`` leaves out their minutes).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import math
import os
import platform
import pstats
import statistics
import time
from dataclasses import dataclass

import torch

from deqppl.encoders import LearnedStart, PEDEncoder, RidgeStart, ZeroStart
from deqppl.expfam import Likelihood, family
from deqppl.inference import fit_map
from deqppl.optim import LBFGS, SVI
from deqppl.models import ExpFamPCA

LAM = 1.0
TARGET = 1e-6  # issue 4: max |z - z*| per method
DEQ_RTOL = 1e-8  # the encoder's default float64 tolerance (deqppl.encoders.ped.default_solver)
# Tuned on Poisson (d, l) = (50, 5), N = 10 000, same init and stopping rule, lr in {0.01, 0.05,
# 0.1, 0.2, 0.3, 0.5}: 0.01 still had max|grad| 2e-2 after 3000 steps; 0.05 / 0.1 / 0.2 stalled
# (relative loss change below 10 eps after the plateau decay) at max|dz| 4.0e-6 / 5.9e-6 /
# 1.9e-6 after 1399 / 824 / 524 steps; 0.3 / 0.5 reached 4.2e-7 / 3.3e-7 in 399 / 474 steps.
SVI_LR = 0.3


@dataclass(frozen=True)
class Case:
    family: str
    obs_dim: int
    latent_dim: int
    num_data: int
    svi_cap_s: float  # wall-clock cap on the one SVI run of this case
    lbfgs_repeats: int


FULL = [
    Case("poisson", 50, 5, 10_000, 240.0, 2),
    Case("bernoulli", 50, 5, 10_000, 240.0, 2),
    Case("poisson", 500, 20, 10_000, 270.0, 1),
    Case("bernoulli", 500, 20, 10_000, 270.0, 1),
]
QUICK = [
    Case("poisson", 20, 3, 500, 10.0, 1),
    Case("bernoulli", 20, 3, 500, 10.0, 1),
]


# ------------------------------------------------------------------------------ the floor
class NewtonFloor:
    """Plain batched Newton on $F$, closed-form gradient and Hessian, written out in full."""

    def __init__(self, model: ExpFamPCA, W: torch.Tensor, B: torch.Tensor):
        self.fam = model.family
        self.W, self.B, self.lam = W, B, float(model.lam)
        d, l = W.shape
        # H = lam I + sum_k c_k W_k W_k^T = lam I + c @ [W_ki W_kj]: one (N, d) x (d, l*l) matmul.
        self.WW = (W[:, :, None] * W[:, None, :]).reshape(d, l * l)
        self.eye = torch.eye(l, dtype=W.dtype)

    def initial_guess(self, y: torch.Tensor) -> torch.Tensor:
        # The encoder's guess (ped.py, initial_guess), re-typed: ridge regression of the
        # natural parameters of a mean shrunk half-way to A'(B).
        fam, W, B = self.fam, self.W, self.B
        eta_hat = fam.link(0.5 * (fam.T(y) + fam.dA(B)))
        return torch.linalg.solve(self.lam * self.eye + W.T @ W, W.T @ (eta_hat - B).T).T

    def objective(self, z, y, eta):
        return 0.5 * self.lam * (z * z).sum(1) + (self.fam.A(eta) - y * eta).sum(1)

    @torch.no_grad()
    def solve(self, y, *, z0=None, rtol=DEQ_RTOL, line_search=False, extra_steps=0, max_steps=100):
        """Newton from ``z0`` (a tensor or a callable of ``y``; default the ridge guess).

        Returns ``(z, steps, f evals, H evals, row_steps)``; ``row_steps[s]`` is the number of
        Newton steps after which row ``s`` first met the stopping rule (-1: never).
        """
        fam, W, B, lam, l = self.fam, self.W, self.B, self.lam, self.W.shape[1]
        z = self.initial_guess(y) if z0 is None else (z0(y) if callable(z0) else z0)
        eta = z @ W.T + B
        nf, nh, steps, extra = 1, 0, 0, 0
        row_steps = torch.full((len(y),), -1, dtype=torch.long)
        F = self.objective(z, y, eta) if line_search else None
        while steps < max_steps:
            fz = (y - fam.dA(eta)) @ W / lam  # the PED layer f(z) (SPEC eq. 6)
            g = z - fz  # = grad F / lam
            ok = g.norm(dim=1) <= rtol * fz.norm(dim=1)
            row_steps = torch.where(ok & (row_steps < 0), steps, row_steps)
            if bool(ok.all()):
                if extra >= extra_steps:
                    break
                extra += 1
            H = (fam.d2A(eta) @ self.WW).view(-1, l, l) + lam * self.eye
            nh += 1
            dz = -torch.linalg.solve(H, lam * g)
            steps += 1
            if not line_search:
                z = z + dz
                eta = z @ W.T + B
                nf += 1
                continue
            # Armijo on F per sample; a row whose Newton decrement is at round-off level takes
            # the full step (Boyd & Vandenberghe, 2004, §9.5: inside the quadratic region).
            slope = lam * (g * dz).sum(1)
            t = torch.ones_like(slope)
            done = torch.zeros_like(slope, dtype=torch.bool)
            z_new, eta_new, F_new = z.clone(), eta.clone(), F.clone()
            for _ in range(40):
                z_try = z + t[:, None] * dz
                eta_try = z_try @ W.T + B
                nf += 1
                F_try = self.objective(z_try, y, eta_try)
                ok = ~done & ((F_try <= F + 1e-4 * t * slope) | (-slope < 1e-12 * F.abs()))
                z_new[ok], eta_new[ok], F_new[ok] = z_try[ok], eta_try[ok], F_try[ok]
                done |= ok
                if bool(done.all()):
                    break
                t = torch.where(done, t, 0.5 * t)
            z, eta, F = z_new, eta_new, F_new
        return z, steps, nf, nh, row_steps

    @torch.no_grad()
    def certificate(self, z, y):
        """$\\max_s\\lVert\\nabla F_s(z)\\rVert_2/\\lambda \\ge \\max_s\\lVert z_s - z_s^*\\rVert_2$."""
        fz = (y - self.fam.dA(z @ self.W.T + self.B)) @ self.W / self.lam
        return float((z - fz).norm(dim=1).max())


# ------------------------------------------------------------------------------ helpers
def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def fmt_t(s):
    return f"{s * 1e3:.0f} ms" if s < 10 else f"{s:.1f} s"


def make_case(case: Case, seed: int = 0):
    l = case.latent_dim
    model = ExpFamPCA(family=family(case.family), obs_dim=case.obs_dim, latent_dim=l, lam=LAM,
                      param_scale=1.0 / math.sqrt(l))
    sim = model.simulate(case.num_data, seed=seed, dtype=torch.float64)
    return model, sim


def training_data(model: ExpFamPCA, W: torch.Tensor, B: torch.Tensor, num_data: int) -> torch.Tensor:
    """Independent rows from the same model and globals (seed 1; the test rows use seed 0)."""
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(num_data, W.shape[1], generator=gen, dtype=W.dtype) / math.sqrt(model.lam)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        return Likelihood(model.family, model.nonlinearity).distribution(z @ W.T + B).sample()


def learned_start(case: Case) -> LearnedStart:
    """The learned start's settings per case (chosen on these cases; docs/bench_ped.md).

    Bernoulli: a polynomial in the summary s = W^T y (z* = Phi^{-1}(s) with Phi(z) = lam z +
    W^T sigmoid(Wz + B), close to a cubic: the sigmoid's Taylor series is odd). A batch steps
    until its slowest row has converged, so what counts is the largest number of Newton steps
    of any row: at l = 5 the cubic brings every row to 2 (the quadratic leaves a third of them
    at 3); at l = 20 both leave a few rows at 3 (quadratic: 78%, cubic: 0.1%), and the
    quadratic's 230 monomials cost a tenth of the cubic's 1 770. Poisson: z* grows like log(s)
    along the directions of large counts, which no polynomial follows, and the rows with the
    largest counts are the ones a regression misses: at l = 5 a tanh network (32, 32) on s
    (alone it cut the mean Newton steps per row from 4.8 to 3.0 but its worst rows needed 12,
    against 7 from the ridge start), with the ridge start as a per-row fallback chosen by the
    objective; at l = 20 (where that network fitted poorly, rms 0.4) a quadratic with the
    same fallback.
    """
    if case.family == "bernoulli":
        return LearnedStart(degree=3 if case.latent_dim <= 5 else 2)
    if case.latent_dim <= 5:
        return LearnedStart(degree=1, hidden=(32, 32), max_steps=1000, fallback=RidgeStart())
    return LearnedStart(degree=2, fallback=RidgeStart())


def run_case(case: Case, repeats: int, log, baselines: bool = True):
    model, sim = make_case(case)
    y, W, B = sim.data["y"], sim.truth["W"], sim.truth["B"]
    eta_true = sim.truth["z"] @ W.T + B
    log(f"\n== {case.family} N={case.num_data} d={case.obs_dim} l={case.latent_dim}: "
        f"sd(eta)={float(eta_true.std()):.3f}, max y={float(y.max()):.0f}")
    floor = NewtonFloor(model, W, B)
    enc = PEDEncoder.from_values(model, {"W": W, "B": B})
    z0 = enc.initial_guess(y)
    assert torch.equal(floor.initial_guess(y), z0) or torch.allclose(floor.initial_guess(y), z0,
                                                                      rtol=0, atol=1e-12)

    z_ref, ref_steps, _, _, _ = floor.solve(y, line_search=True, extra_steps=3)
    cert = floor.certificate(z_ref, y)
    log(f"reference: Newton+LS, {ref_steps} steps, certificate max ||grad F||/lam = {cert:.1e}")

    # -- the learned start, fitted on the fixed points of independent training rows
    y_train = training_data(model, W, B, case.num_data)
    learned, _, fit_cpu = timed(lambda: learned_start(case).fit(enc, y_train))
    log(f"learned start {learned!r}: fitted in {fmt_t(fit_cpu)} CPU on {learned.num_train} "
        f"training rows (their fixed points solved by the DEQ from the ridge start), train rmse "
        f"{learned.train_rmse:.2e}")
    enc_zero = PEDEncoder.from_values(model, {"W": W, "B": B}, start=ZeroStart())
    enc_learned = PEDEncoder.from_values(model, {"W": W, "B": B}, start=learned)

    def zeros(yy):
        return torch.zeros(len(yy), case.latent_dim, dtype=yy.dtype)

    def learned_z0(yy):  # the start's whole cost is inside the floor's timing too
        return learned(enc_learned, yy)

    def acc(z):
        return float((z.detach() - z_ref).abs().max())

    rows = {}

    def record(name, wall, cpu, steps, fevals, hevals, err, note="", row_steps=None, start=""):
        rows[name] = dict(method=name, wall=wall, cpu=cpu, steps=steps, fevals=fevals,
                          hevals=hevals, err=err, note=note, row_steps=row_steps, start=start)
        per_row = ("" if row_steps is None else
                   f" per-row steps mean {float(row_steps.double().mean()):.2f} max {int(row_steps.max())}")
        log(f"  {name}: wall {fmt_t(med(wall))} cpu {fmt_t(med(cpu))} steps {steps} "
            f"f {fevals} H {hevals} max|dz| {err:.1e}{per_row} {note}")

    def no_grad(e):
        def run():
            with torch.no_grad():
                return e(y)
        return run

    # -- DEQ and floors, interleaved
    jobs = (
        ("deq", no_grad(enc)),
        ("floor", lambda: floor.solve(y)),
        ("floor_ls", lambda: floor.solve(y, line_search=True)),
        ("deq_grad", lambda: enc(y)),
        ("deq_zero", no_grad(enc_zero)),
        ("floor_zero", lambda: floor.solve(y, z0=zeros)),
        ("floor_zero_ls", lambda: floor.solve(y, z0=zeros, line_search=True)),
        ("deq_learned", no_grad(enc_learned)),
        ("floor_learned", lambda: floor.solve(y, z0=learned_z0)),
        ("floor_learned_ls", lambda: floor.solve(y, z0=learned_z0, line_search=True)),
    )
    runs = {k: ([], []) for k, _ in jobs}
    out, failed = {}, {}
    for _ in range(repeats):
        for key, fn in jobs:
            if key in failed:
                continue
            try:
                res, w, c = timed(fn)
            except RuntimeError as err:  # full-step Newton from zero overflows on Poisson rows
                failed[key] = str(err).splitlines()[0][:90]
                continue
            runs[key][0].append(w)
            runs[key][1].append(c)
            out[key] = res
    for key, name, start in (("deq", "DEQ (PEDEncoder, no_grad)", "ridge"),
                             ("deq_grad", "DEQ (autograd on)", "ridge"),
                             ("deq_zero", "DEQ, zero start", "zero"),
                             ("deq_learned", "DEQ, learned start", "learned")):
        z, sol = out[key]
        record(name, *runs[key], sol.num_steps, sol.num_fevals, sol.num_jac_evals, acc(z),
               f"converged {int(sol.converged.sum())}/{sol.converged.numel()}; rows evaluated "
               f"{sol.num_row_fevals / sol.converged.numel():.2f} N (f), "
               f"{sol.num_row_jac_evals / sol.converged.numel():.2f} N (H)", start=start)
    for key, name, start in (("floor", "Newton floor (no line search)", "ridge"),
                             ("floor_ls", "Newton floor + LS", "ridge"),
                             ("floor_zero", "Newton from zero (no line search)", "zero"),
                             ("floor_zero_ls", "Newton from zero + LS", "zero"),
                             ("floor_learned", "Newton from learned start (no line search)", "learned"),
                             ("floor_learned_ls", "Newton from learned start + LS", "learned")):
        if key in failed:
            rows[name] = dict(method=name, wall=[], cpu=[], steps=None, fevals=None, hevals=None,
                              err=math.inf, note=f"failed: {failed[key]}", row_steps=None,
                              start=start)
            log(f"  {name}: failed ({failed[key]})")
            continue
        z, steps, nf, nh, row_steps = out[key]
        record(name, *runs[key], steps, nf, nh, acc(z), row_steps=row_steps, start=start)

    if baselines:
        run_baselines(case, model, sim, z0, acc, record)

    # -- component costs (one call each, medians), to explain the DEQ / floor gap
    comp = {}
    with torch.no_grad():
        z = out["deq"][0]
        eta = z @ W.T + B
        fns = {
            "validate y (enc._check_y)": lambda: enc._check_y(y),
            "initial_guess (ridge start)": lambda: enc.initial_guess(y),
            "learned start": lambda: enc_learned.initial_guess(y),
            "enc.layer (one f eval)": lambda: enc.layer(z, y),
            "floor f eval (eta, A'(eta), matmul)": lambda: (y - floor.fam.dA(z @ W.T + B)) @ W,
            "enc.layer_jacobian (one H eval)": lambda: enc.layer_jacobian(z, y),
            "floor H eval": lambda: (floor.fam.d2A(eta) @ floor.WW).view(len(y), -1),
        }
        for name, fn in fns.items():
            comp[name] = med([timed(fn)[2] for _ in range(max(3, repeats))])
    return dict(case=case, rows=rows, cert=cert, sd_eta=float(eta_true.std()),
                max_y=float(y.max()), comp=comp, enc=enc, y=y, learned=learned, fit_cpu=fit_cpu)


def run_baselines(case, model, sim, z0, acc, record):
    """L-BFGS and SVI through fit_map, from the ridge start, same accuracy target."""
    W, B = sim.truth["W"], sim.truth["B"]
    # -- L-BFGS
    gtol = LAM * TARGET / math.sqrt(case.latent_dim)
    fixed = {"W": W, "B": B}
    # The optimisers' gradient rule is relative, max|g| <= gtol max(1, min(|f|, |f0|)/n)
    # (deqppl.optim.LBFGS); dividing by the scale at the start keeps max|g| <= gtol absolute.
    f0 = -float(model.log_joint(sim.data, {**fixed, "z": z0}))
    gtol = gtol / max(1.0, abs(f0) / z0.numel())
    wall, cpu = [], []
    for _ in range(case.lbfgs_repeats):
        r, w, c = timed(lambda: fit_map(model, sim.data, optimizer=LBFGS(gtol=gtol, max_steps=5000),
                                        fixed=fixed, init={"z": z0}, progress=False))
        wall.append(w)
        cpu.append(c)
    record("L-BFGS (fit_map)", wall, cpu, r.num_steps, r.num_grad_evals, 0, acc(r.values["z"]),
           f"stop: {r.criterion}")

    # -- SVI: calibrate the per-step time, then one capped run
    _, w20, _ = timed(lambda: fit_map(model, sim.data, optimizer=SVI(lr=SVI_LR, gtol=gtol, max_steps=20),
                                      fixed=fixed, init={"z": z0}, progress=False))
    max_steps = max(50, int(case.svi_cap_s / (w20 / 21)))
    r, w, c = timed(lambda: fit_map(model, sim.data, optimizer=SVI(lr=SVI_LR, gtol=gtol, max_steps=max_steps),
                                    fixed=fixed, init={"z": z0}, progress=False))
    record("SVI (fit_map, AutoDelta + Adam)", [w], [c], r.num_steps, r.num_grad_evals, 0,
           acc(r.values["z"]), f"stop: {r.criterion}")



def profile_deq(enc, y, top=18):
    prof = cProfile.Profile()
    with torch.no_grad():
        prof.enable()
        enc(y)
        prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(top)
    lines = [ln for ln in s.getvalue().splitlines() if ln.strip()]
    start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls"))
    return "\n".join(lines[start - 1 if start else 0:])


# ------------------------------------------------------------------------------ report
def _cpu(r):
    return med(r["cpu"]) if r["cpu"] else math.inf


def _steps(r):
    rs = r["row_steps"]
    if rs is None:
        return "-" if r["steps"] is None else f"(batch {r['steps']})"
    if bool((rs < 0).any()):
        return f"{int((rs < 0).sum())} rows never met the rule"
    return f"{float(rs.double().mean()):.2f} / {int(rs.max())}"


def report(results, args, total_s):
    cmd = "python benchmarks/bench_ped.py"
    for flag, on in (("--quick", args.quick), ("--skip-baselines", args.skip_baselines)):
        cmd += f" {flag}" if on else ""
    if args.cases:
        cmd += f" --cases {args.cases}"
    if args.repeats_given:
        cmd += f" --repeats {args.repeats}"
    if args.out:
        cmd += f" --out {args.out}"
    lines = [
        "# PED encoder benchmark (issues 4 and 19)",
        "",
        f"Command: `{'nice -n ' + str(os.nice(0)) + ' ' if os.nice(0) else ''}{cmd}` (total run "
        f"time {total_s / 60:.1f} min).",
        "",
        f"Machine: {platform.machine()}, 2 CPU cores shared with other jobs (loaded while this "
        f"ran), torch {torch.__version__}, `torch.set_num_threads({args.threads})`, "
        "float64. Times are medians over interleaved repeats "
        f"(DEQ and Newton runs: {args.repeats}; L-BFGS: 1-2; SVI: 1). **Ratios use CPU time** "
        "(`time.process_time`), which with one thread is much less sensitive to the other jobs "
        "than wall time; wall times are shown for reference.",
        "",
        f"Task: conditional MAP $z^*(y; W, B)$ with $W, B$ known, $\\lambda = {LAM:g}$, "
        "`param_scale` $= 1/\\sqrt l$ (so sd$(\\eta) \\approx 1$). Accuracy target: "
        f"max $|z - z^*| \\le {TARGET:g}$, against a reference Newton solution whose "
        "strong-convexity certificate (max $\\lVert\\nabla F_s\\rVert_2/\\lambda$, an upper "
        "bound on its own error) is listed. One *gradient eval* = one batched $\\nabla F$ "
        "(= PED layer) on all $N$ rows, line-search trials included; *H evals* = batched "
        "analytic Hessians (the DEQ's `num_jac_evals`). The DEQ evaluates only the rows still "
        "iterating (row compaction, `fixed_point(..., rows_independent=True)`): its counts are "
        "batched calls, each on the active rows only, and its notes give the rows evaluated in "
        "total in units of N. L-BFGS/SVI gradient evals are Pyro log joints with autograd.",
        "",
        "Starts (issue 19): *zero*; *ridge* (`RidgeStart`, the encoder's default: ridge "
        "regression of shrunk natural parameters); *learned* (`LearnedStart`, a regression of "
        "$z^*$ on the summary $s = W^\\top y$, fitted on the fixed points of N independent "
        "training rows of the same model; its settings per case are printed with each case and "
        "explained in `learned_start` of the benchmark). "
        "The learned start's cost is inside every timing that uses it; its fit is not (listed "
        "per case). *Newton steps per datapoint* (mean / max) count, for the hand-written "
        "Newton runs, the steps after which each row first met the stopping rule; all rows of "
        "a hand-written batch step until the last has converged, so its cost follows the max. "
        "The DEQ rows give the batch's step count (its Newton has the same per-row rule), but "
        "the DEQ steps only the active rows, so its cost follows the rows evaluated. "
        "**The issue 19 target: DEQ with the learned start ≤ 0.6× the faster of the two "
        "batched Newton runs from zero.**",
        "",
    ]
    summary = []
    for res in results:
        c, rows = res["case"], res["rows"]
        deq = _cpu(rows["DEQ (PEDEncoder, no_grad)"])
        floor_key = min(("Newton floor (no line search)", "Newton floor + LS"),
                        key=lambda k: _cpu(rows[k]))
        floor = _cpu(rows[floor_key])
        zero_key = min(("Newton from zero (no line search)", "Newton from zero + LS"),
                       key=lambda k: _cpu(rows[k]))
        zero = _cpu(rows[zero_key])
        learned = res["learned"]
        lines += [
            f"## {c.family}, N = {c.num_data}, d = {c.obs_dim}, l = {c.latent_dim}",
            "",
            f"sd($\\eta$) = {res['sd_eta']:.2f}, max y = {res['max_y']:.0f}; reference "
            f"certificate {res['cert']:.1e}. Learned start: `{learned!r}`, fitted in "
            f"{fmt_t(res['fit_cpu'])} CPU (training fixed points included), train rms error "
            f"{learned.train_rmse:.2e}.",
            "",
            "| method | start | CPU time | wall time | iterations | Newton steps per datapoint "
            "(mean / max) | gradient evals | H evals | max \\|Δz\\| | ≤ 1e-6 | CPU / DEQ (ridge) "
            "| CPU / Newton from zero | notes |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows.values():
            cpu = _cpu(r)
            if not r["cpu"]:
                lines.append(f"| {r['method']} | {r['start']} | - | - | - | - | - | - | - | - "
                             f"| - | - | {r['note']} |")
                continue
            lines.append(
                f"| {r['method']} | {r['start'] or '-'} | {fmt_t(cpu)} | {fmt_t(med(r['wall']))} "
                f"| {r['steps']} | {_steps(r)} | {r['fevals']} | {r['hevals'] or '-'} "
                f"| {r['err']:.1e} | {'yes' if r['err'] <= TARGET else '**no**'} "
                f"| {cpu / deq:.2f} | {cpu / zero:.2f} | {r['note']} |")
        ratio_learned = _cpu(rows["DEQ, learned start"]) / zero
        ratio_floor = deq / floor
        lines += [
            "",
            f"- DEQ, learned start / batched Newton from zero = {ratio_learned:.2f} "
            f"(from zero: {zero_key}; target ≤ 0.6): "
            f"{'met' if ratio_learned <= 0.6 else '**not met**'}",
            f"- DEQ (ridge start) / Newton floor = {ratio_floor:.2f} (floor = {floor_key}; "
            f"issue 4 target ≤ 1.5): {'met' if ratio_floor <= 1.5 else '**not met**'}",
        ]
        base = {}
        if "L-BFGS (fit_map)" in rows:
            lbfgs, svi = rows["L-BFGS (fit_map)"], rows["SVI (fit_map, AutoDelta + Adam)"]

            def target_line(name, r, want):
                ratio = med(r["cpu"]) / deq
                reached = r["err"] <= TARGET
                bound = "" if reached else (
                    f" (it stopped at max|Δz| = {r['err']:.1e} without reaching 1e-6, so the "
                    f"true ratio at equal accuracy is **at least** {ratio:.1f}x)")
                ok = ratio >= want
                return (f"- {name} / DEQ = {ratio:.1f}x (issue 4 target ≥ {want}x): "
                        f"{'met' if ok else '**not met**'}{bound}")

            lines += [target_line("SVI", svi, 100), target_line("L-BFGS", lbfgs, 10)]
            base = dict(svi=svi, lbfgs=lbfgs, rs=med(svi["cpu"]) / deq,
                        rl=med(lbfgs["cpu"]) / deq)
        lines += [
            "",
            "Per-call CPU cost of the pieces (median):",
            "",
            "| piece | CPU ms |",
            "|---|---|",
            *[f"| {k} | {v * 1e3:.1f} |" for k, v in res["comp"].items()],
            "",
        ]
        steps = {k: _steps(rows[n]) for k, n in (
            ("zero", "Newton from zero + LS"), ("ridge", "Newton floor + LS"),
            ("learned", "Newton from learned start + LS"))}
        summary.append((c, base, ratio_learned, ratio_floor, steps,
                        rows["DEQ, learned start"]["steps"], rows["DEQ (PEDEncoder, no_grad)"]["steps"],
                        rows["DEQ, zero start"]["steps"]))
    lines += ["## Summary", "",
              "| case | DEQ learned / Newton from 0 (≤ 0.6) | DEQ steps zero / ridge / learned "
              "| Newton + LS steps per datapoint, mean / max: zero · ridge · learned "
              "| DEQ / floor | SVI / DEQ | L-BFGS / DEQ |",
              "|---|---|---|---|---|---|---|"]
    for c, base, rlr, rf, steps, s_l, s_r, s_z in summary:
        if base:
            sv = f"{base['rs']:.0f}" + ("" if base["svi"]["err"] <= TARGET else " (lower bound)")
            lb = f"{base['rl']:.1f}" + ("" if base["lbfgs"]["err"] <= TARGET else " (lower bound)")
        else:
            sv = lb = "not run"
        lines.append(f"| {c.family} d={c.obs_dim} l={c.latent_dim} | {rlr:.2f} | {s_z} / {s_r} / "
                     f"{s_l} | {steps['zero']} · {steps['ridge']} · {steps['learned']} | {rf:.2f} "
                     f"| {sv} | {lb} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds")
    parser.add_argument("--out", help="write the markdown report to this file")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cases", help="comma-separated indices of the cases to run (default all)")
    parser.add_argument("--skip-baselines", action="store_true",
                        help="skip the L-BFGS and SVI rows (minutes per case)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.repeats_given = args.repeats is not None
    args.repeats = args.repeats or (2 if args.quick else 5)
    cases = QUICK if args.quick else FULL
    if args.cases:
        cases = [cases[int(i)] for i in args.cases.split(",")]
    start = time.perf_counter()
    results = [run_case(c, args.repeats, lambda s: print(s, flush=True),
                        baselines=not args.skip_baselines) for c in cases]
    text = report(results, args, time.perf_counter() - start)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
