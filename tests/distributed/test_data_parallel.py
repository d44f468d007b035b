"""Data-parallel fitting over torch.distributed (gloo, 2 processes) equals the single-process fit.

The multi-process tests launch two ranks of ``dp_worker.py`` as ``torchrun`` would (environment
``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``, a free port), each with a timeout, and
compare what they write with the single-process fit computed here: the oracle is the library's
own single-process path, which the rest of the suite checks against closed forms and scipy.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deqppl import distributed
from deqppl.distributed import DisagreementError, Shard, ShardLayout

WORKER = Path(__file__).with_name("dp_worker.py")
sys.path.insert(0, str(WORKER.parent))
import dp_worker  # noqa: E402  (the problem and settings the ranks fit)

#: Seconds a whole 2-process run may take before the test fails (no hang): start-up of two
#: Python processes importing torch and Pyro takes ~10 s on the loaded 2-core test machine.
RUN_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, out: Path, *, nproc: int = 2, timeout_s: float = 120.0,
           device: str = "cpu") -> list[tuple[int, str]]:
    """Run ``nproc`` ranks of the worker; returns (exit status, output) per rank.

    ``timeout_s`` is the process group's: how long a rank waits for a silent peer. It bounds a
    real hang only, so it is generous (other test runs share the machine's two cores).
    """
    for _ in range(3):
        runs = _launch_once(scenario, out, nproc=nproc, timeout_s=timeout_s, device=device)
        # another process may take the free port between choosing and binding it: choose again
        if not any("EADDRINUSE" in text or "ddress already in use" in text for _, text in runs):
            break
    return runs


def _launch_once(scenario: str, out: Path, *, nproc: int, timeout_s: float, device: str) -> list[tuple[int, str]]:
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = []
    for r in range(nproc):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_RANK=str(r),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DEQPPL_TEST_TIMEOUT=str(timeout_s),
                   DEQPPL_TEST_DEVICE=device)
        procs.append(subprocess.Popen([sys.executable, str(WORKER), scenario, str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    results = []
    try:
        for p in procs:
            text, _ = p.communicate(timeout=RUN_TIMEOUT_S)
            results.append((p.returncode, text))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results


def load(out: Path, r: int) -> dict:
    return torch.load(out / f"rank{r}.pt", weights_only=False)


@pytest.fixture(scope="module")
def fits(tmp_path_factory):
    out = tmp_path_factory.mktemp("fits")
    runs = launch("fits", out)
    assert [rc for rc, _ in runs] == [0, 0], "\n".join(text[-3000:] for _, text in runs)
    return load(out, 0), load(out, 1)


@pytest.fixture(scope="module")
def single():
    from deqppl.encoders import PEDEncoder, fit_encoder
    from deqppl.inference import fit_map

    model, y = dp_worker.problem()
    s = dp_worker.settings()
    out = {}
    for name in ("lbfgs", "adam", "alternating"):
        enc = PEDEncoder(model, seed=0).double()
        fit = fit_encoder(enc, y, optimizer=s[name], progress=False)
        out[name] = {"W": enc.W.detach(), "B": enc.B.detach(), "fit": fit}
    out["svi"] = fit_map(model, {"y": y}, optimizer=s["svi"], seed=1, progress=False)
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "tol"),
    [
        # float64, the profiled full-batch L-BFGS: the two runs differ only in the order of the
        # sums over rows (rounding, ~1e-16 relative); the trajectory amplifies it to ~1e-13.
        ("lbfgs", 1e-10),
        # minibatch Adam with the same global batches: the same rounding, over 20 steps.
        ("adam", 1e-8),
        # the structured joint fit (Newton half-steps, Anderson): the same rounding of the sums.
        ("alternating", 1e-10),
    ],
    ids=["full-batch-lbfgs", "minibatch-adam", "full-batch-alternating-newton"],
)
def test_fit_encoder_two_ranks_equals_one_process(fits, single, name, tol):
    ref = single[name]
    for r in (0, 1):
        got = fits[r][name]
        torch.testing.assert_close(got["W"], ref["W"], rtol=0, atol=tol)
        torch.testing.assert_close(got["B"], ref["B"], rtol=0, atol=tol)
        assert got["status"] == ref["fit"].status.name
        assert got["num_steps"] == ref["fit"].num_steps
        assert got["num_solves"] == ref["fit"].num_solves
        # the loss traces are the full-data loss (all ranks' rows) at every step
        torch.testing.assert_close(got["trace"], ref["fit"].loss_trace, rtol=tol, atol=0)
    # every rank holds the very same globals: the same decisions from the same sums
    assert torch.equal(fits[0][name]["W"], fits[1][name]["W"])
    assert torch.equal(fits[0][name]["trace"], fits[1][name]["trace"])


@pytest.mark.slow
def test_alternating_newton_two_ranks_latents_and_log_joint(fits, single):
    from deqppl.inference import log_joint

    ref = single["alternating"]["fit"]
    assert ref.optimizer == dp_worker.settings()["alternating"] and ref.status.name == "CONVERGED"
    model, y = dp_worker.problem()
    for r in (0, 1):
        got = fits[r]["alternating"]
        a, b = got["shard"]
        # each rank's latents are its rows of the single-process fit's latents (1e-10: as the globals)
        torch.testing.assert_close(got["latents"], ref.latents[a:b], rtol=0, atol=1e-10)
        assert got["num_grad_evals"] == ref.num_grad_evals
        assert got["grad_norm"] == pytest.approx(ref.grad_norm, rel=1e-6, abs=1e-9)  # ~0 at the optimum
    # the log joint of the Pyro model at the two ranks' globals and latents put together equals
    # the single-process fit's (an oracle independent of the fit's own objective)
    z = torch.cat([fits[0]["alternating"]["latents"], fits[1]["alternating"]["latents"]])
    glob = {"W": fits[0]["alternating"]["W"], "B": fits[0]["alternating"]["B"]}
    two = log_joint(model, {"y": y}, {**glob, "z": z})
    one = log_joint(model, {"y": y}, {"W": single["alternating"]["W"], "B": single["alternating"]["B"],
                                      "z": ref.latents})
    torch.testing.assert_close(two, one, rtol=1e-12, atol=0)
    torch.testing.assert_close(-two, fits[0]["alternating"]["trace"][-1].to(two.dtype), rtol=1e-12, atol=0)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fit_encoder_two_ranks_on_cuda_equals_one_cpu_process(tmp_path, single):
    # Two ranks on CUDA (NCCL with a GPU per rank, else gloo reducing CUDA tensors) against the
    # single-process CPU fit. 1e-8: CUDA's kernels round differently from the CPU's.
    runs = launch("fits", tmp_path, device="cuda")
    assert [rc for rc, _ in runs] == [0, 0], "\n".join(text[-3000:] for _, text in runs)
    for r in (0, 1):
        got = load(tmp_path, r)
        for name in ("lbfgs", "adam"):
            torch.testing.assert_close(got[name]["W"], single[name]["W"], rtol=0, atol=1e-8)
            torch.testing.assert_close(got[name]["B"], single[name]["B"], rtol=0, atol=1e-8)


@pytest.mark.slow
def test_svi_two_ranks_equals_one_process(fits, single):
    ref = single["svi"]
    for r in (0, 1):
        got = fits[r]["svi"]
        a, b = got["shard"]
        # 1e-8 (float64): 150 Adam updates on gradients that differ by rounding of the sums.
        for site in ("W", "B"):
            torch.testing.assert_close(got["values"][site], ref.values[site], rtol=0, atol=1e-8)
        # each rank's locals are its rows of the single-process locals (also their start)
        torch.testing.assert_close(got["values"]["z"], ref.values["z"][a:b], rtol=0, atol=1e-8)
        torch.testing.assert_close(got["log_joint"], ref.log_joint, rtol=1e-12, atol=0)
        torch.testing.assert_close(got["trace"], ref.loss_trace, rtol=1e-10, atol=0)
        assert got["grad_norm"] == pytest.approx(ref.grad_norm, rel=1e-8)
        assert got["status"] == ref.status.name


@pytest.mark.slow
def test_failing_and_disagreeing_ranks(tmp_path):
    runs = launch("errors", tmp_path)
    assert [rc for rc, _ in runs] == [0, 0], "\n".join(text[-3000:] for _, text in runs)
    for r in (0, 1):
        got = load(tmp_path, r)
        # a bad shard on rank 1: every rank raises, naming rank 1, its error and the global row
        # (row 2 of the shard starting at row 24)
        kind, msg = got["bad_shard"]
        assert kind == "RankFailedError"
        assert "rank 1: ValueError" in msg and "row 26, column 3" in msg and "holds rows 24..47" in msg
        kind, msg = got["mid_fit"]
        assert kind == "RankFailedError" and "rank 1: RuntimeError: injected failure in a solve" in msg
        kind, msg = got["mid_alternating"]
        assert kind == "RankFailedError" and "rank 1: RuntimeError: injected failure in a latent half-step" in msg
        # disagreements fail before any work: no solve ran, the globals are untouched
        kind, msg = got["settings"]
        assert kind == "DisagreementError" and "disagree on optimizer" in msg and "lr=0.05" in msg
        assert got["settings_work"] == (0, True)
        kind, msg = got["model"]
        assert kind == "DisagreementError" and "disagree on model" in msg and "lam=2.0" in msg
        kind, msg = got["seed"]
        assert kind == "DisagreementError" and "seed" in msg
        kind, msg = got["overlap"]
        assert kind == "DisagreementError" and "do not tile" in msg
        kind, msg = got["svi_bad_shard"]
        assert kind == "RankFailedError" and "rank 1: ValueError" in msg and "row 26, column 3" in msg
        kind, msg = got["throw"]
        assert kind == "FitConvergenceError" and "MAX_STEPS" in msg
        # after all that the ranks are still in step
        assert got["after"] == 2.0


@pytest.mark.slow
def test_a_dead_rank_stops_the_others(tmp_path):
    runs = launch("crash", tmp_path, timeout_s=20.0)
    assert runs[1][0] == 3  # the rank that died
    assert runs[0][0] == 0, runs[0][1][-3000:]
    kind, msg = load(tmp_path, 0)["crash"]
    assert kind == "RankFailedError" and "lost contact with the other ranks" in msg


# ------------------------------------------------------------------------------------------
# one process: shards, layouts, agreement, and the data-parallel code path with one rank
# ------------------------------------------------------------------------------------------
def test_even_shards_tile_the_rows():
    for n, w in [(10, 3), (7, 7), (100, 4)]:
        shards = [Shard.even(n, rank=r, world_size=w) for r in range(w)]
        layout = ShardLayout(shards=tuple(shards), rank=0)
        assert sum(s.num_rows for s in shards) == n and layout.num_total == n
        assert max(s.num_rows for s in shards) - min(s.num_rows for s in shards) <= 1


@pytest.mark.parametrize(
    ("shards", "match"),
    [
        ((Shard(0, 3, 6), Shard(2, 4, 6)), "do not tile"),
        ((Shard(0, 3, 6), Shard(4, 2, 6)), "do not tile"),
        ((Shard(0, 3, 6), Shard(3, 2, 6)), r"cover rows \[0, 5\)"),
        ((Shard(0, 3, 6), Shard(3, 3, 7)), "disagree on the number of rows"),
    ],
    ids=["overlap", "gap", "short", "totals"],
)
def test_layout_rejects_bad_shards(shards, match):
    with pytest.raises(DisagreementError, match=match):
        ShardLayout(shards=shards, rank=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"start": -1, "num_rows": 2, "num_total": 4}, ValueError, "start >= 0"),
        ({"start": 0, "num_rows": 0, "num_total": 4}, ValueError, "num_rows >= 1"),
        ({"start": 3, "num_rows": 2, "num_total": 4}, ValueError, "past num_total=4"),
        ({"start": 0, "num_rows": 2.0, "num_total": 4}, TypeError, "num_rows must be an integer"),
    ],
    ids=["negative-start", "empty", "past-end", "float"],
)
def test_shard_rejects_bad_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        Shard(**kwargs)


def test_layout_maps_a_global_batch_to_local_rows():
    layout = ShardLayout(shards=(Shard(0, 4, 10), Shard(4, 3, 10), Shard(7, 3, 10)), rank=1)
    batch = torch.tensor([9, 5, 0, 4, 6, 8])
    assert layout.local(batch).tolist() == [1, 0, 2]
    assert layout.prior_rank(batch) == 0
    assert layout.prior_rank(torch.tensor([9, 5])) == 1
    assert layout.prior_rank(torch.tensor([8])) == 2


def test_shard_of_uniform_equals_rows_of_the_full_draw():
    from deqppl.inference.map import _shard_of_uniform

    shards = tuple(Shard.even(11, rank=r, world_size=3) for r in range(3))
    torch.manual_seed(5)
    full = torch.rand(11, 4, dtype=torch.float64)
    after = torch.rand(3, dtype=torch.float64)
    for r, s in enumerate(shards):
        torch.manual_seed(5)
        part = _shard_of_uniform(torch.Size([s.num_rows, 4]), ShardLayout(shards=shards, rank=r), torch.float64)
        assert torch.equal(part, full[s.start : s.stop])
        assert torch.equal(torch.rand(3, dtype=torch.float64), after)  # the generator ends in step


def test_prior_scale_counts_the_prior_once(float64):
    from deqppl.inference import log_joint

    model, y = dp_worker.problem()
    values = {"W": torch.randn(dp_worker.D, dp_worker.L), "B": torch.zeros(dp_worker.D),
              "z": torch.randn(dp_worker.N, dp_worker.L)}
    total = log_joint(model, {"y": y}, values)
    rows = log_joint(model, {"y": y}, values, per_datum=True)
    head = {"W": values["W"], "B": values["B"], "z": values["z"][:20]}
    tail = {"W": values["W"], "B": values["B"], "z": values["z"][20:]}
    parts = log_joint(model, {"y": y[:20]}, head) + log_joint(model, {"y": y[20:]}, tail, prior_scale=0.0)
    torch.testing.assert_close(parts, total, rtol=1e-13, atol=0)
    torch.testing.assert_close(log_joint(model, {"y": y}, values, prior_scale=0.0), rows.sum(), rtol=1e-13, atol=0)


def test_one_rank_shard_is_the_single_process_fit(float64):
    from deqppl.encoders import PEDEncoder, fit_encoder
    from deqppl.optim import Adam

    model, y = dp_worker.problem()
    fits = []
    for shard in (None, Shard(0, dp_worker.N, dp_worker.N)):
        enc = PEDEncoder(model, seed=0)
        fit = fit_encoder(enc, y, optimizer=Adam(num_epochs=2, batch_size=16), progress=False, shard=shard)
        fits.append((enc.W.detach().clone(), fit.loss_trace))
    assert torch.equal(fits[0][0], fits[1][0]) and torch.equal(fits[0][1], fits[1][1])


def test_bad_data_parallel_arguments(float64):
    from deqppl.encoders import PEDEncoder, fit_encoder
    from deqppl.inference import fit_map
    from deqppl.optim import LBFGS, SVI

    model, y = dp_worker.problem()
    with pytest.raises(ValueError, match="the data have 48 rows but the shard says num_rows=10"):
        fit_encoder(PEDEncoder(model), y, progress=False, shard=Shard(0, 10, 48))
    with pytest.raises(DisagreementError, match=r"cover rows \[0, 10\) of num_total=48"):
        fit_encoder(PEDEncoder(model), y[:10], progress=False, shard=Shard(0, 10, 48))
    with pytest.raises(TypeError, match="shard must be a deqppl.distributed.Shard"):
        fit_encoder(PEDEncoder(model), y, progress=False, shard=(0, 48))
    with pytest.raises(TypeError, match=r"fit_map\(shard=...\) runs SVI"):
        fit_map(model, {"y": y}, optimizer=LBFGS(), progress=False, shard=Shard(0, 48, 48))
    with pytest.raises(ValueError, match="full-batch SVI; got subsample_size=8"):
        fit_map(model, {"y": y}, optimizer=SVI(subsample_size=8), progress=False, shard=Shard(0, 48, 48))


def test_describe_ignores_addresses_and_hashes_tensors():
    from deqppl.expfam import family, nonlinearity

    assert " at 0x" not in distributed.describe(nonlinearity("relu"))
    assert distributed.describe(family("poisson")) == distributed.describe(family("poisson"))
    a = torch.arange(4.0)
    assert distributed.describe(a) == distributed.describe(a.clone())
    assert distributed.describe(a) != distributed.describe(a + 1e-12)
