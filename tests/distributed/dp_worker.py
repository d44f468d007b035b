"""One rank of a data-parallel test run: ``python dp_worker.py SCENARIO OUT_DIR``.

Launched by ``tests/distributed`` with the environment ``torchrun`` sets (``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``); writes ``OUT_DIR/rank{r}.pt``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from deqppl import distributed
from deqppl.distributed import Shard

torch.set_num_threads(1)

#: The problem every scenario fits (also built by the tests for the single-process oracle).
N, D, L = 48, 6, 2


def problem(*, lam: float = 1.0):
    from deqppl.expfam import family
    from deqppl.models import ExpFamPCA

    model = ExpFamPCA(family=family("poisson"), obs_dim=D, latent_dim=L, lam=lam)
    y = model.simulate(N, seed=3, dtype=torch.float64).data["y"]
    return model, y


def settings():
    from deqppl.optim import LBFGS, SVI, Adam, AlternatingNewton

    return {
        # the structured joint fit (the default of PED encoders), full-batch
        "alternating": AlternatingNewton(),
        # rtol=0: every run takes all its epochs/updates, so the stopping rule (a comparison of
        # two losses equal up to rounding) cannot end the two runs at different steps.
        "lbfgs": LBFGS(),
        "adam": Adam(lr=0.05, num_epochs=4, batch_size=10, rtol=0.0),
        "svi": SVI(lr=0.05, max_steps=150, window=25, rtol=0.0, xtol=0.0, gtol=0.0),
    }


def device() -> torch.device:
    """``DEQPPL_TEST_DEVICE`` (default cpu); with ``cuda`` each rank uses GPU ``LOCAL_RANK`` if there
    are enough of them, else GPU 0."""
    name = os.environ.get("DEQPPL_TEST_DEVICE", "cpu")
    if name != "cuda":
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return torch.device("cuda", local if local < torch.cuda.device_count() else 0)


def fits(out: dict) -> None:
    from deqppl.encoders import PEDEncoder, fit_encoder
    from deqppl.inference import fit_map

    model, y = problem()
    shard = Shard.even(N)
    rows = y[shard.start : shard.stop].to(device())
    s = settings()
    # AlternatingNewton's data-parallel run is tested on the CPU (gloo) only so far
    names = ("lbfgs", "adam", "alternating") if device().type == "cpu" else ("lbfgs", "adam")
    for name in names:
        enc = PEDEncoder(model, seed=0).double().to(device())
        fit = fit_encoder(enc, rows, optimizer=s[name], progress=False, shard=shard)
        out[name] = {"W": enc.W.detach().cpu().clone(), "B": enc.B.detach().cpu().clone(),
                     "trace": fit.loss_trace, "status": fit.status.name, "num_steps": fit.num_steps,
                     "grad_norm": fit.grad_norm, "num_solves": fit.num_solves,
                     "num_grad_evals": fit.num_grad_evals, "shard": (shard.start, shard.stop),
                     "latents": None if fit.latents is None else fit.latents.cpu().clone()}
    if device().type != "cpu":
        return  # fit_map's starting values are drawn on the CPU: its data-parallel run is tested there
    fit = fit_map(model, {"y": rows}, optimizer=s["svi"], seed=1, progress=False, shard=shard)
    out["svi"] = {"values": fit.values, "log_joint": fit.log_joint, "trace": fit.loss_trace,
                  "status": fit.status.name, "grad_norm": fit.grad_norm, "shard": (shard.start, shard.stop)}


def _record(out: dict, name: str, fn) -> None:
    try:
        fn()
        out[name] = ("ok", "")
    except Exception as exc:  # the test checks type and message
        out[name] = (type(exc).__name__, str(exc))


def errors(out: dict) -> None:
    from deqppl.encoders import PEDEncoder, fit_encoder
    from deqppl.inference import fit_map
    from deqppl.optim import SVI, Adam

    r = distributed.rank()
    model, y = problem()
    shard = Shard.even(N)
    rows = y[shard.start : shard.stop].clone()

    # a bad shard: a negative count on rank 1
    bad = rows.clone()
    if r == 1:
        bad[2, 3] = -1.0
    _record(out, "bad_shard", lambda: fit_encoder(PEDEncoder(model).double(), bad, progress=False, shard=shard))

    # an exception in the middle of the fit on rank 1 (its fourth solve raises)
    enc = PEDEncoder(model).double()
    calls = {"n": 0}
    solve = enc.solve

    def failing_solve(*args, **kwargs):
        calls["n"] += 1
        if r == 1 and calls["n"] == 4:
            raise RuntimeError("injected failure in a solve")
        return solve(*args, **kwargs)

    enc.solve = failing_solve
    _record(out, "mid_fit", lambda: fit_encoder(enc, rows, optimizer=Adam(num_epochs=3, batch_size=8),
                                                 progress=False, shard=shard))

    # an exception in the middle of the default (AlternatingNewton) fit on rank 1: the
    # evaluation of its log-partition function raises on the third call
    enc = PEDEncoder(model).double()
    _record(out, "mid_alternating", lambda: _failing_alternating(enc, rows, shard, r))

    # disagreeing settings: the learning rate, the model, the seed; and overlapping shards
    counted = {"n": 0}
    enc = PEDEncoder(model).double()
    before = enc.W.detach().clone()
    solve2 = enc.solve

    def counting_solve(*args, **kwargs):
        counted["n"] += 1
        return solve2(*args, **kwargs)

    enc.solve = counting_solve
    _record(out, "settings", lambda: fit_encoder(enc, rows, optimizer=Adam(lr=0.02 if r == 0 else 0.05),
                                                  progress=False, shard=shard))
    out["settings_work"] = (counted["n"], bool(torch.equal(before, enc.W.detach())))
    other, _ = problem(lam=1.0 if r == 0 else 2.0)
    _record(out, "model", lambda: fit_encoder(PEDEncoder(other).double(), rows, progress=False, shard=shard))
    _record(out, "seed", lambda: fit_map(model, {"y": rows}, optimizer=SVI(max_steps=5), seed=r,
                                          progress=False, shard=shard))
    overlap = Shard(start=0, num_rows=N // 2, num_total=N)
    _record(out, "overlap", lambda: fit_encoder(PEDEncoder(model).double(), y[: N // 2], progress=False,
                                                 shard=overlap))
    # fit_map: a bad shard on rank 1 stops both; a fit that does not converge with throw=True
    # raises FitConvergenceError on every rank (the same decision on the same sums)
    _record(out, "svi_bad_shard", lambda: fit_map(model, {"y": bad}, optimizer=SVI(max_steps=5),
                                                   progress=False, shard=shard))
    from deqppl.optim import LBFGS

    _record(out, "throw", lambda: fit_encoder(PEDEncoder(model).double(), rows, optimizer=LBFGS(max_steps=2),
                                               progress=False, throw=True, shard=shard))
    # the ranks are still in step: a sum over ranks after all the failures
    out["after"] = float(distributed.all_reduce_sum(torch.ones(1))[0])


def _failing_alternating(enc, rows, shard, r):
    from deqppl.encoders import fit_encoder
    from deqppl.encoders import joint

    latent_step = joint._Problem.latent_step
    calls = {"n": 0}

    def failing(self, p):
        calls["n"] += 1
        if r == 1 and calls["n"] == 3:
            raise RuntimeError("injected failure in a latent half-step")
        return latent_step(self, p)

    joint._Problem.latent_step = failing
    try:
        return fit_encoder(enc, rows, progress=False, shard=shard)
    finally:
        joint._Problem.latent_step = latent_step


def crash(out: dict) -> None:
    from deqppl.encoders import PEDEncoder, fit_encoder
    from deqppl.optim import Adam

    model, y = problem()
    shard = Shard.even(N)
    enc = PEDEncoder(model).double()
    solve = enc.solve
    calls = {"n": 0}

    def dying_solve(*args, **kwargs):
        calls["n"] += 1
        if distributed.rank() == 1 and calls["n"] == 3:
            os._exit(3)  # a rank that dies without a word (killed, out of memory, ...)
        return solve(*args, **kwargs)

    enc.solve = dying_solve
    _record(out, "crash", lambda: fit_encoder(enc, y[shard.start : shard.stop],
                                               optimizer=Adam(num_epochs=3, batch_size=8),
                                               progress=False, shard=shard))


def main() -> None:
    scenario, out_dir = sys.argv[1], Path(sys.argv[2])
    timeout = float(os.environ.get("DEQPPL_TEST_TIMEOUT", "30"))
    # NCCL needs a GPU per rank; with fewer GPUs the CUDA run reduces its CUDA tensors over gloo
    nccl = device().type == "cuda" and torch.cuda.device_count() >= int(os.environ["WORLD_SIZE"])
    distributed.init_process_group(device="cuda" if nccl else "cpu", timeout_s=timeout)
    out: dict = {"rank": distributed.rank(), "world_size": distributed.world_size()}
    {"fits": fits, "errors": errors, "crash": crash}[scenario](out)
    torch.save(out, out_dir / f"rank{distributed.rank()}.pt")
    if scenario == "crash":
        # The survivor's gloo group still holds connections to the dead peer; torch's
        # ProcessGroupGloo destructor can then std::terminate at interpreter exit (SIGABRT,
        # "terminate called without an active exception", seen under load in CI). The result
        # is written: leave without running that destructor.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    else:
        # leave together and close the gloo connections before the interpreter exits: a rank
        # that exits while its peer's connections are open can abort it (SIGABRT, seen once
        # on the loaded test machine)
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
