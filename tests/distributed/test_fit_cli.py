"""``deqppl fit``: one process and ``torchrun --nproc-per-node 2`` write the same model file."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from deqppl.cli import main

N, D = 120, 5


@pytest.fixture
def tables(tmp_path):
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from deqppl.expfam import family
    from deqppl.models import ExpFamPCA

    model = ExpFamPCA(family=family("poisson"), obs_dim=D, latent_dim=2)
    y = model.simulate(N, seed=1, dtype=torch.float64).data["y"].numpy().astype("int64")
    table = pa.table({f"c{j}": y[:, j] for j in range(D)})
    # small row groups / blocks, so that a rank's rows span several Arrow batches
    pq.write_table(table, tmp_path / "y.parquet", row_group_size=16)
    pacsv.write_csv(table, tmp_path / "y.csv")
    return tmp_path, torch.as_tensor(y, dtype=torch.float64)


def _optimizer(name):
    from deqppl.optim import LBFGS, Adam, AlternatingNewton

    return {None: None, "alternating": AlternatingNewton(max_steps=500), "lbfgs": LBFGS(),
            "adam": Adam(lr=0.02, num_epochs=3, batch_size=32)}[name]


@pytest.mark.parametrize(
    ("args", "name"),
    [
        # no --optimizer: the encoder's default (AlternatingNewton for Poisson PCA), as fit_encoder's
        ([], None),
        (["--optimizer", "alternating", "--max-steps", "500"], "alternating"),
        (["--optimizer", "lbfgs"], "lbfgs"),
        (["--optimizer", "adam", "--epochs", "3", "--batch-size", "32"], "adam"),
    ],
    ids=["default", "alternating", "lbfgs", "adam"],
)
def test_fit_one_process_equals_the_python_api(tables, capsys, args, name):
    from deqppl.encoders import PEDEncoder, fit_encoder
    from deqppl.expfam import family
    from deqppl.io import load
    from deqppl.models import ExpFamPCA

    tmp, y = tables
    out = tmp / "m.deqppl"
    rc = main(["fit", "--family", "poisson", "--latent-dim", "2", "--data", str(tmp / "y.parquet"),
               "--out", str(out), "--no-progress", *args])
    printed = capsys.readouterr().out
    assert (rc == 0 and "CONVERGED" in printed) or name == "adam"  # 3 epochs: MAX_STEPS
    enc = PEDEncoder(ExpFamPCA(family=family("poisson"), obs_dim=D, latent_dim=2), seed=0).double()
    fit = fit_encoder(enc, y, optimizer=_optimizer(name), progress=False)
    assert type(fit.optimizer).__name__ == ("AlternatingNewton" if name is None else type(_optimizer(name)).__name__)
    got = load(out)
    assert torch.equal(got.W.detach(), enc.W.detach()) and torch.equal(got.B.detach(), enc.B.detach())


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--family", "poisson", "--data", "nope.parquet"], "no such file"),
        (["--family", "poisson", "--data", "y.txt"], "unknown --data"),
        (["--data", "y.csv"], "--family is required"),
        (["--family", "poisson", "--data", "y.csv", "--optimizer", "sgd"], "unknown --optimizer 'sgd'"),
        (["--family", "poisson", "--data", "y.csv", "--optimizer", "adam", "--max-steps", "3"],
         "--max-steps caps alternating and lbfgs"),
        (["--family", "poisson", "--data", "y.csv", "--model", "kglm"], "supports --model pca"),
        (["--family", "poisson", "--data", "y.csv", "--out", "missing/m.deqppl"], "does not exist"),
    ],
    ids=["missing-file", "suffix", "family", "optimizer", "adam-max-steps", "model", "out-folder"],
)
def test_fit_bad_arguments(tables, monkeypatch, capsys, args, match):
    tmp, _ = tables
    monkeypatch.chdir(tmp)
    argv = ["fit", *args] + ([] if "--out" in args else ["--out", "m.deqppl"])
    assert main(argv) == 2
    assert match in capsys.readouterr().err
    assert not (tmp / "m.deqppl").exists()


def test_fit_names_the_global_row_of_a_bad_value(tables, capsys):
    tmp, y = tables
    bad = tmp / "bad.csv"
    lines = (tmp / "y.csv").read_text().splitlines()
    cells = lines[1 + 77].split(",")
    cells[2] = "-3"
    lines[1 + 77] = ",".join(cells)
    bad.write_text("\n".join(lines) + "\n")
    assert main(["fit", "--family", "poisson", "--data", str(bad), "--out", str(tmp / "m.deqppl"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "row 77, column 2 ('c2')" in err
    assert not (tmp / "m.deqppl").exists()


@pytest.mark.slow
def test_fit_under_torchrun_equals_one_process(tables):
    from deqppl.io import load

    tmp, _ = tables
    one, two = tmp / "one.deqppl", tmp / "two.deqppl"
    common = ["fit", "--family", "poisson", "--latent-dim", "2", "--no-progress"]
    assert main([*common, "--data", str(tmp / "y.parquet"), "--out", str(one)]) == 0
    # two ranks (gloo), each reading its half of the CSV; --standalone picks a free port
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "deqppl", *common, "--data", str(tmp / "y.csv"), "--out", str(two), "--timeout", "60"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "over 2 rank(s)" in run.stdout
    a, b = load(one), load(two)
    # float64 full-batch AlternatingNewton (the default): the ranks' sums differ from one
    # process's by rounding only
    torch.testing.assert_close(b.W.detach(), a.W.detach(), rtol=0, atol=1e-10)
    torch.testing.assert_close(b.B.detach(), a.B.detach(), rtol=0, atol=1e-10)
