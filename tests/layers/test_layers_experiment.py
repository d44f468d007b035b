"""The experiment's one-command MNIST protocol, on tiny IDX files the test writes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from deqppl.data.idx import write_idx

EXPERIMENT = Path(__file__).resolve().parents[2] / "experiments" / "pcdeq_digits.py"


def _load():
    spec = importlib.util.spec_from_file_location("pcdeq_digits", EXPERIMENT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # ~5-10 s on a loaded 2-core machine (a real, if tiny, training run)
def test_mnist_protocol_runs_from_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "mnist"
    data.mkdir()
    for stem, n in (("train", 40), ("t10k", 20)):
        write_idx(data / f"{stem}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28),
                                                                  dtype=np.uint8))
        write_idx(data / f"{stem}-labels-idx1-ubyte", rng.integers(0, 10, n, dtype=np.uint8))
    out = tmp_path / "out"
    experiment = _load()
    assert experiment.main(["--mnist", str(data), "--out", str(out), "--seeds", "1",
                            "--epochs", "1", "--arch", "linear", "--families", "pcdeq-1 (tanh)",
                            "--stress", "1"]) == 0
    tidy = pd.read_csv(out / "tidy.csv")
    assert list(tidy.columns) == ["model", "method", "seed", "stage", "metric", "value"]
    run = tidy[(tidy["model"] == "mnist-linear") & (tidy["method"] == "pcdeq-1 (tanh)")
               & (tidy["stage"] == "test")].set_index("metric")["value"]
    assert run["num_parameters"] == 70_410  # the paper's MNIST linear pcDEQ (SPEC 5)
    assert run["certified"] == 1 and run["unconverged"] == 0
    table = (out / "table.md").read_text()
    assert "| mnist-linear | test | pcdeq-1 (tanh) |" in table and "### What happened" in table
    # resumable: the run is a unit of the harness's store, loaded (not retrained) on a rerun
    assert len(list((out / "runs").rglob("*.pt"))) == 1
    before = (out / "tidy.csv").read_text()
    assert experiment.main(["--mnist", str(data), "--out", str(out), "--seeds", "1",
                            "--epochs", "1", "--arch", "linear", "--families", "pcdeq-1 (tanh)",
                            "--stress", "1"]) == 0
    assert (out / "tidy.csv").read_text() == before


def test_mnist_protocol_rejects_bad_files(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03\x00")
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x00")
    with pytest.raises(ValueError, match="truncated in its header"):
        _load().main(["--mnist", str(tmp_path), "--out", str(tmp_path / "o")])
