"""The deqppl command line: listing, comparing into a folder, clear errors, resuming."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from deqppl.cli import main
from deqppl.harness import TIMING_METRICS
from deqppl.expfam import FAMILIES, NONLINEARITIES

#: Tiny but complete: 3 methods, fit + held-out stages, a few seconds per method.
TINY = ["--data", "simulate:poisson,n=40,d=5,l=2", "--small", "--no-progress"]
#: Metrics that measure time, which legitimately differ between two runs.
TIMING = set(TIMING_METRICS)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def comparable(table: pd.DataFrame) -> pd.DataFrame:
    keep = table[~table["metric"].isin(TIMING)]
    return keep.sort_values(["model", "method", "seed", "stage", "metric"]).reset_index(drop=True)


def assert_same_results(a: Path, b: Path) -> None:
    ta, tb = comparable(pd.read_csv(a / "table.csv")), comparable(pd.read_csv(b / "table.csv"))
    pd.testing.assert_frame_equal(ta.drop(columns="value"), tb.drop(columns="value"))
    # Resumed units are read back bit-for-bit; 1e-10 only absorbs the CSV round trip.
    np.testing.assert_allclose(ta["value"], tb["value"], rtol=1e-10, atol=1e-12)


def test_list(capsys):
    code, out, _ = run_cli(capsys, "list")
    assert code == 0
    lines = dict(line.split(": ", 1) for line in out.strip().splitlines())
    assert set(lines) == {"models", "model names", "families", "nonlinearities", "methods", "datasets"}
    assert lines["model names"].split(", ") == ["pca", "hierarchical", "kglm"]
    assert lines["families"].split(", ") == sorted(FAMILIES)
    assert lines["nonlinearities"].split(", ") == sorted(NONLINEARITIES)
    assert set(lines["methods"].split(", ")) >= {"deq", "svi", "lbfgs"}
    assert "ExpFamPCA" in lines["models"] and "digits" in lines["datasets"]
    assert {"diabetes", "breast_cancer"} <= set(lines["datasets"].split(", "))


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--data", "simulate:poison"], ["'poison'", "poisson", "binomial", "gaussian"]),
        (["--family", "poison", "--data", "digits"], ["'poison'", "poisson", "bernoulli"]),
        (["--methods", "deq,newton"], ["'newton'", "deq", "lbfgs", "svi"]),
        (["--data", "mnist"], ["'mnist'", "digits", "simulate:", ".csv", ".parquet"]),
        (["--nonlinearity", "tanh"], ["'tanh'", "identity", "relu"]),
        (["--data", "simulate:poisson,k=3"], ["'k=3'", "n=INT", "l=INT"]),
        (["--data", "simulate:binomial"], ["--total-count"]),
        (["--model", "gplvm"], ["'gplvm'", "pca", "hierarchical", "kglm"]),
        (["--model", "kglm", "--methods", "deq"], ["'deq'", "'kglm'", "lbfgs", "svi"]),
        (["--model", "kglm", "--data", "digits"], ["'digits'", "diabetes", "breast_cancer"]),
        (["--model", "kglm", "--family", "poison"], ["'poison'", "bernoulli"]),
        (["--model", "hierarchical", "--widths", "3,x"], ["--widths", "'3,x'"]),
        (["--model", "hierarchical", "--family", "poisson"], ["'poisson'", "gaussian"]),
    ],
    ids=["family-in-data", "family", "method", "data", "nonlinearity", "simulate-option", "binomial-trials",
         "model", "kglm-deq", "kglm-data", "kglm-family", "widths", "hierarchical-family"],
)
def test_unknown_names_exit_2_listing_valid_ones(capsys, tmp_path, argv, expected):
    code, out, err = run_cli(capsys, "compare", *argv, "--out", str(tmp_path / "o"), "--no-progress")
    assert code == 2
    assert "Traceback" not in err
    for text in expected:
        assert text in err
    assert not (tmp_path / "o" / "runs").exists()


@pytest.mark.parametrize(
    ("rows", "family", "expected"),
    [
        ("1,2\n3,x\n", "poisson", ["row 2", "column 'b'", "non-numeric", "'x'"]),
        ("1,2\n,4\n", "poisson", ["row 2", "column 'a'", "missing"]),
        ("1,2\n3,-1\n", "poisson", ["row 2", "column 'b'", "-1", "non-negative integer"]),
        ("1,2\n3,0.5\n", "poisson", ["row 2", "column 'b'", "0.5"]),
    ],
    ids=["non-numeric", "missing", "negative-count", "fractional-count"],
)
def test_bad_csv_names_file_row_column(capsys, tmp_path, rows, family, expected):
    path = tmp_path / "counts.csv"
    path.write_text("a,b\n" + rows)
    code, _, err = run_cli(
        capsys, "compare", "--data", str(path), "--family", family, "--out", str(tmp_path / "o")
    )
    assert code == 2
    assert str(path) in err and "Traceback" not in err
    for text in expected:
        assert text in err
    assert not (tmp_path / "o" / "runs").exists()  # rejected before any fitting


def test_missing_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "compare", "--data", str(tmp_path / "nope.csv"), "--family", "poisson")
    assert code == 2 and "nope.csv" in err and "does not exist" in err


def test_report_without_run(capsys, tmp_path):
    code, _, err = run_cli(capsys, "report", "--out", str(tmp_path))
    assert code == 2 and "run.json" in err


@pytest.mark.slow
def test_compare_writes_files_and_report_regenerates(capsys, tmp_path):
    out = tmp_path / "out"
    code, stdout, _ = run_cli(capsys, "compare", *TINY, "--out", str(out))
    assert code == 0
    for name in ("table.csv", "summary.csv", "report.html", "report.md", "run.json"):
        assert (out / name).stat().st_size > 0
    table = pd.read_csv(out / "table.csv")
    assert list(table.columns) == ["model", "method", "seed", "stage", "metric", "value"]
    assert set(table["method"]) == {"deq", "svi", "lbfgs"}
    assert set(table["stage"]) == {"fit", "heldout"}
    summary = pd.read_csv(out / "summary.csv")
    for method in ("deq", "svi", "lbfgs"):
        assert method in stdout
        assert method in summary.iloc[:, 0].tolist()
    first = (out / "table.csv").read_text()
    (out / "report.html").unlink()
    code, _, _ = run_cli(capsys, "report", "--out", str(out), "--no-progress")
    assert code == 0 and (out / "report.html").exists()
    # The table is rebuilt from the stored units: identical apart from nothing at all.
    regenerated = comparable(pd.read_csv(out / "table.csv"))
    pd.testing.assert_frame_equal(regenerated, comparable(pd.read_csv(io.StringIO(first))))


def test_compare_refuses_other_settings_in_same_folder(capsys, tmp_path):
    (tmp_path / "run.json").write_text('{"data": "digits"}')
    code, _, err = run_cli(capsys, "compare", *TINY, "--out", str(tmp_path))
    assert code == 2 and "different settings" in err


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_table(capsys, tmp_path, monkeypatch):
    from deqppl.harness import methods

    reference = tmp_path / "reference"
    assert run_cli(capsys, "compare", *TINY, "--out", str(reference))[0] == 0

    def interrupt(self, *args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        patch.setattr(methods.SVIMethod, "fit_globals", interrupt)
        code, _, err = run_cli(capsys, "compare", *TINY, "--out", str(out))
    assert code == 130 and "resume" in err
    finished = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.pt")}
    assert finished, "the deq units finished before the interrupt must be kept"
    code, _, _ = run_cli(capsys, "compare", *TINY, "--out", str(out))
    assert code == 0
    for path, mtime in finished.items():  # finished units were not redone
        assert path.stat().st_mtime_ns == mtime
    assert_same_results(out, reference)


@pytest.mark.slow
def test_killed_process_resumes_to_the_same_table(tmp_path):
    cmd = [sys.executable, "-m", "deqppl.cli", "compare", *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference, out = tmp_path / "reference", tmp_path / "killed"
    subprocess.run([*cmd, "--out", str(reference)], check=True, env=env, capture_output=True)
    proc = subprocess.Popen([*cmd, "--out", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while proc.poll() is None and not list((out / "runs").rglob("*.pt")) and time.monotonic() < deadline:
        time.sleep(0.05)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.communicate()
    kept = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.pt")}
    assert kept
    subprocess.run([*cmd, "--out", str(out)], check=True, env=env, capture_output=True)
    for path, mtime in kept.items():  # finished units are reused, not recomputed
        assert path.stat().st_mtime_ns == mtime
    assert not list((out / "runs").rglob("*.tmp"))
    assert_same_results(out, reference)


# ------------------------------------------------------------------------------- other models
def _summary(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "summary.csv").set_index("method")


@pytest.mark.slow
def test_hierarchical_on_the_digits(capsys, tmp_path):
    out = tmp_path / "h"
    code, stdout, _ = run_cli(
        capsys, "compare", "--model", "hierarchical", "--data", "digits", "--widths", "4,2",
        "--rows", "120", "--small", "--no-model-comparison", "--no-progress", "--out", str(out),
    )
    assert code == 0
    s = _summary(out)
    assert {"deq", "svi", "lbfgs", "pca"} <= set(s.index)
    # the deep DEQ and L-BFGS solve the same strongly convex (Gaussian) problems under the
    # shared globals: both certified to < 1e-6 (Newton at relative residual 1e-8)
    assert s.loc["deq", "certified_bound"] < 1e-6
    assert {"max_abs_dz[z1]", "max_abs_dz[z2]"} <= set(s.columns)
    assert (out / "report.html").stat().st_size > 0


@pytest.mark.parametrize(
    ("data", "family"), [("diabetes", "family=gaussian("), ("breast_cancer", "family=bernoulli(")]
)
@pytest.mark.slow
def test_kglm_on_the_bundled_tables(capsys, tmp_path, data, family):
    out = tmp_path / data
    code, _, _ = run_cli(
        capsys, "compare", "--model", "kglm", "--data", data, "--small", "--no-progress", "--out", str(out),
    )
    assert code == 0
    table = pd.read_csv(out / "table.csv")
    assert set(table["method"]) == {"svi", "lbfgs"}
    assert table["model"].str.contains(family, regex=False).all()
    s = _summary(out)
    assert np.isfinite(s["heldout_log_lik"]).all()
    assert (s["certified_bound"] < 1e-3).all()


def test_kglm_on_a_user_csv(capsys, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 2))
    y = np.sin(x[:, 0]) + 0.1 * rng.normal(size=30)
    path = tmp_path / "xy.csv"
    pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "noise": rng.normal(size=30), "target": y}).to_csv(path, index=False)
    out = tmp_path / "o"
    code, _, err = run_cli(
        capsys, "compare", "--model", "kglm", "--data", str(path), "--family", "gaussian",
        "--x-columns", "a,b", "--y-column", "target", "--methods", "lbfgs", "--no-progress",
        "--out", str(out),
    )
    assert code == 0, err
    # two standardised inputs: the default lengthscale is sqrt(2)
    assert "lengthscale=1.414" in pd.read_csv(out / "table.csv")["model"].iloc[0]
    code, _, err = run_cli(
        capsys, "compare", "--model", "kglm", "--data", str(path), "--family", "gaussian",
        "--x-columns", "a,c", "--y-column", "target", "--out", str(tmp_path / "o2"),
    )
    assert code == 2 and "['c']" in err and "header" in err
    code, _, err = run_cli(
        capsys, "compare", "--model", "kglm", "--data", str(path), "--family", "gaussian",
        "--out", str(tmp_path / "o3"),
    )
    assert code == 2 and "--y-column" in err


def test_one_validation_per_cli_run(capsys, tmp_path, monkeypatch):
    from deqppl.models import ExpFamPCA

    calls = []
    original = ExpFamPCA.validate

    def counting(self, data):
        calls.append(1)
        return original(self, data)

    monkeypatch.setattr(ExpFamPCA, "validate", counting)
    argv = ["compare", "--data", "simulate:poisson,n=30,d=4,l=1", "--methods", "deq,svi,lbfgs", "--small",
            "--no-progress", "--out", str(tmp_path / "o")]
    assert run_cli(capsys, *argv)[0] == 0
    assert len(calls) == 1


def test_digits_default_subset_and_full(capsys, tmp_path):
    from deqppl.cli import DIGITS_DEFAULT_ROWS, _settings, build_parser, build_problem

    def problem(*argv):
        return build_problem(_settings(build_parser().parse_args(["compare", *argv])))

    default = problem()
    assert default.data["y"].shape[0] + default.heldout["y"].shape[0] == DIGITS_DEFAULT_ROWS
    assert default.model_comparison is not None  # the digits' report compares families and sizes
    full = problem("--full", "--no-model-comparison")
    assert full.data["y"].shape[0] + full.heldout["y"].shape[0] == 1797
    assert full.model_comparison is None
    assert problem("--rows", "100").heldout["y"].shape[0] == 20
    code, _, err = run_cli(capsys, "compare", "--rows", "100", "--full", "--out", str(tmp_path / "o"))
    assert code == 2 and "--rows N or --full" in err
