"""experiments/fig7.py: the paper's grid, the resumable checksummed row store, the kink-aware
backbone's gradient and a tiny end-to-end run (UMAP, an optional extra, is exercised by the
full run only)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from deqppl.encoders import PEDEncoder
from deqppl.expfam import binomial, gaussian
from deqppl.models import ExpFamPCA

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fig7():
    spec = importlib.util.spec_from_file_location("fig7", ROOT / "experiments" / "fig7.py")
    module = importlib.util.module_from_spec(spec)
    # dataclasses resolve string annotations through sys.modules
    sys.modules["fig7"] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("fig7", None)


def test_grid_has_exactly_the_papers_size(fig7):
    z = fig7.grid_latents()
    assert z.shape == (42453, 2)
    # every point lies strictly inside one of the three components
    x, y = z[:, 0], z[:, 1]
    inside = ((x - 2) ** 2 + (y - 2) ** 2 < 9) | ((x + 3) ** 2 + (y + 3) ** 2 < 4) | \
        ((x - 4).abs() + (y + 4).abs() < 1)
    assert bool(inside.all())


def test_simulated_columns_follow_the_protocol(fig7):
    protocol = fig7.Protocol()
    data = fig7.simulate(fig7.COLUMNS["poisson"], 0, protocol)
    assert data.y.shape == (42453, 50) and len(data.train) == int(0.8 * 42453)
    assert len(set(data.train.tolist()) | set(data.test.tolist())) == 42453
    torch.testing.assert_close(data.target[:, 0], data.z.sum(1))
    assert bool((data.y == data.y.round()).all() and (data.y >= 0).all())
    # datasets of different columns or indices differ; the same one is reproducible
    again = fig7.simulate(fig7.COLUMNS["poisson"], 0, protocol)
    assert torch.equal(again.y, data.y)
    seeds = {fig7.dataset_seed(c, d) for c in fig7.COLUMNS.values() for d in range(3)}
    assert len(seeds) == 15
    # the paper's "Bernoulli" column as its code draws it: binomial counts of t = 10 trials,
    # encoded by binomial PCA of the same t
    small = fig7.Protocol(num_data=4000)
    counts = fig7.simulate(fig7.COLUMNS["binomial"], 0, small).y
    assert set(counts.unique().tolist()) == set(range(11))
    family = fig7.ped_encoder(fig7.COLUMNS["binomial"], 0, torch.float64).model.family
    assert family == binomial(10)


def test_kink_backbone_gradient_is_the_implicit_gradient_at_a_fixed_point(fig7):
    # Oracle: the library's implicit adjoint (PEDEncoder's default) where every row converged.
    torch.manual_seed(0)
    model = ExpFamPCA(family=gaussian(), obs_dim=7, latent_dim=2, lam=0.5)
    y = torch.randn(9, 7, dtype=torch.float64)
    enc = PEDEncoder(model, seed=3).double()
    weights = torch.randn(9, 2, dtype=torch.float64)
    z_lib, sol = enc(y)
    assert bool(sol.converged.all())
    g_lib = torch.autograd.grad((z_lib * weights).sum(), [enc.W, enc.B])
    z_kink = fig7.KinkBackbone(enc)(y)
    g_kink = torch.autograd.grad((z_kink * weights).sum(), [enc.W, enc.B])
    # both at the solver's tolerance (relative residual 1e-8)
    torch.testing.assert_close(z_kink, z_lib.detach(), rtol=1e-7, atol=1e-9)
    for a, b in zip(g_kink, g_lib):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def _tiny(out, *extra):
    return ["--out", str(out), "--num-datasets", "1", "--num-data", "60", "--epochs-scale", "0.1",
            "--head-epochs", "1", "--methods", "ped,pca", "--no-progress", *extra]


def test_tiny_run_resumes_and_redoes_damaged_rows(fig7, tmp_path, capsys):
    out = tmp_path / "run"
    assert fig7.main(_tiny(out, "--columns", "gaussian,relu2")) == 0
    rows = sorted(p.name for p in (out / "rows").glob("*.json"))
    assert rows == ["gaussian-0000-pca.json", "gaussian-0000-ped.json",
                    "relu2-0000-pca.json", "relu2-0000-ped.json"]
    first = capsys.readouterr().out
    assert first.count("fig7 dataset 0") == 4
    record = json.loads((out / "rows" / "relu2-0000-ped.json").read_text())
    assert record["test_mse"] > 0 and record["checksum"] == fig7.checksum(record)

    # Nothing to redo: a rerun runs no row.
    assert fig7.main(_tiny(out, "--columns", "gaussian,relu2")) == 0
    assert "fig7 dataset" not in capsys.readouterr().out

    # Damage two rows: one truncated, one altered after writing (its checksum no longer holds).
    (out / "rows" / "gaussian-0000-ped.json").write_text('{"dataset": 0, "col')
    original = json.loads((out / "rows" / "relu2-0000-pca.json").read_text())
    altered = {**original, "test_mse": 1e-9}
    (out / "rows" / "relu2-0000-pca.json").write_text(json.dumps(altered))
    assert fig7.main(_tiny(out, "--columns", "gaussian,relu2")) == 0
    captured = capsys.readouterr()
    assert "damaged row file" in captured.err
    redone = [line.split(":")[0] for line in captured.out.splitlines() if line.startswith("fig7 dataset")]
    assert redone == ["fig7 dataset 0 gaussian ped", "fig7 dataset 0 relu2 pca"]
    assert len(list((out / "rows").glob("*.corrupt-1"))) == 2
    again = json.loads((out / "rows" / "relu2-0000-pca.json").read_text())
    assert again["test_mse"] == original["test_mse"]  # same seed, one thread: deterministic

    # Rows of another protocol are never mixed in.
    with pytest.raises(ValueError, match="another protocol"):
        fig7.main(_tiny(out, "--columns", "gaussian", "--head-epochs", "2"))

    # --summarise rebuilds the tables, the figure and the CSV from the row files alone.
    doc = tmp_path / "docs" / "fig7.md"
    doc.parent.mkdir()
    doc.write_text(f"# Figure 7\n\nprose kept\n\n{fig7.BEGIN}\nold\n{fig7.END}\n\ntail kept\n")
    assert fig7.main(["--summarise", "--out", str(out), "--docs", str(doc)]) == 0
    text = doc.read_text()
    assert "prose kept" in text and "tail kept" in text and "old" not in text
    assert "| rectified Gaussian L=2 | 0 |" in text  # no UMAP row: no complete dataset-column
    assert "| rectified Gaussian L=2 | 1 of 1 |" in text or "| rectified Gaussian L=2 | 0 of 1 |" in text
    assert (tmp_path / "docs" / "figures" / "fig7.png").stat().st_size > 0
    lines = (tmp_path / "docs" / "fig7_results.csv").read_text().splitlines()
    assert len(lines) == 1 + 4 and lines[0].startswith("dataset,column,method")


def test_every_run_starts_on_one_torch_thread(fig7, tmp_path, monkeypatch):
    # UMAP (numba's threading layer) sets torch's OpenMP threads to the number of cores; the
    # runs after it must still be single-threaded (deterministic rows, no oversubscription)
    seen = []

    def resets_threads(column, data, protocol):
        seen.append(torch.get_num_threads())
        torch.set_num_threads(2)
        return {"test_mse": 1.0, "train_mse": 1.0, "backbone_seconds": 0.0, "head_seconds": 0.0}

    monkeypatch.setitem(fig7.RUNNERS, "pca", resets_threads)
    monkeypatch.setitem(fig7.RUNNERS, "ped", resets_threads)
    threads = torch.get_num_threads()
    try:
        assert fig7.main(_tiny(tmp_path / "run", "--columns", "gaussian,poisson")) == 0
    finally:
        torch.set_num_threads(threads)
    assert seen == [1, 1, 1, 1]


def test_frozen_backbone_diagnostics(fig7, tmp_path):
    # experiments/fig7_frozen.py: PED and PCA frozen (features standardised, the head trained
    # alone, as UMAP's), compared with the fine-tuned and UMAP rows of the Figure 7 store
    spec = importlib.util.spec_from_file_location("fig7_frozen", ROOT / "experiments" / "fig7_frozen.py")
    frozen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(frozen)
    out = tmp_path / "frozen"
    extra = ["--columns", "gaussian,relu2"]
    assert fig7.main([*_tiny(out, *extra)[:-3], "--methods", "ped_frozen,pca_frozen", "--no-progress", *extra]) == 0
    rows = fig7.RowStore(out).load()
    assert sorted((r["column"], r["method"]) for r in rows) == [
        ("gaussian", "pca_frozen"), ("gaussian", "ped_frozen"), ("relu2", "pca_frozen"), ("relu2", "ped_frozen")]
    assert all(r["test_mse"] > 0 for r in rows)
    # frozen PCA features: standardised, so the head alone sees unit-variance inputs
    data = fig7.simulate(fig7.COLUMNS["gaussian"], 0, fig7.Protocol(num_data=60))
    feats = fig7._standardised(fig7.pca_layer(data.y)(data.y), torch.float64)
    torch.testing.assert_close(feats.std(0), torch.ones(2, dtype=torch.float64))
    # the comparison counts per dataset, on the datasets with every row
    main_rows = [{"column": "poisson", "dataset": d, "method": m, "test_mse": v}
                 for d, vals in ((0, (1.0, 3.0, 5.0)), (1, (1.0, 3.0, 2.0)), (2, (1.0, 1.0, 1.0)))
                 for m, v in zip(("ped", "pca", "umap"), vals)]
    frozen_rows = [{"column": "poisson", "dataset": d, "method": m, "test_mse": v}
                   for d, vals in ((0, (2.0, 4.0)), (1, (2.5, 2.5))) for m, v in zip(frozen.DIAGNOSTICS, vals)]
    text = frozen.comparison_markdown(fig7, main_rows, frozen_rows)
    assert "| Poisson | 2 | 1 / 2.25 / 3 / 3.25 / 3.5 | 1 of 2 | 1 of 2 | 2 of 2 |" in text


def test_the_superseded_t1_store_still_summarises(fig7):
    # the first Bernoulli column (t = 1) is no longer run, but its committed rows are kept and
    # their tables can be rebuilt (read-only here: nothing is written into the repository)
    rows = fig7.RowStore(ROOT / "experiments" / "results" / "fig7_bernoulli_t1").load()
    assert len(rows) == 63 and {r["column"] for r in rows} == {"bernoulli"}
    text = fig7.summary_markdown(rows)
    assert "| Bernoulli (t = 1, superseded) | 21 | 14 ± 2.2 | 7 ± 2.2 | 0 ± 0.0 |" in text
    assert "Gaussian" not in text  # only the columns the rows hold


def test_win_counts_and_standard_errors(fig7):
    def row(d, c, m, mse):
        return {"dataset": d, "column": c, "method": m, "test_mse": mse, "unconverged": 0}

    rows = [row(d, "gaussian", m, mse) for d in range(4)
            for m, mse in (("ped", 1.0 + (d == 3)), ("pca", 1.5), ("umap", 1.7))]
    rows.append(row(4, "gaussian", "ped", 0.1))  # incomplete dataset: not counted in the 3-way table
    w = fig7.win_counts(rows)["gaussian"]
    assert w.num_datasets == 4 and w.wins == {"ped": 3, "pca": 1, "umap": 0}
    assert w.ped_vs["pca"] == (3, 4)
    assert fig7._se(3, 4) == pytest.approx((4 * 0.75 * 0.25) ** 0.5)
    assert "| Gaussian | 4 | 3 ± 0.9 | 1 ± 0.9 | 0 ± 0.0 |" in fig7.summary_markdown(rows)
    # Wilson interval against statsmodels' proportion_confint(3, 4, method="wilson")
    lo, hi = fig7.wilson(3, 4)
    assert (lo, hi) == pytest.approx((0.3006418, 0.9544127), abs=1e-6)
    assert fig7.wilson(1, 1)[0] == pytest.approx(0.2065493, abs=1e-6)  # informative at k = n


def test_shards_split_the_datasets_between_processes(fig7, tmp_path, capsys):
    # Two "processes" (shards 0/2 and 1/2) on one --out: each dataset is run by exactly one of
    # them, and together they leave the rows one unsharded run would.
    out = tmp_path / "run"
    assert fig7.main(_tiny(out, "--columns", "gaussian", "--methods", "pca", "--num-datasets", "3",
                           "--shard", "1/2")) == 0
    assert sorted(p.name for p in (out / "rows").glob("*.json")) == ["gaussian-0001-pca.json"]
    assert fig7.main(_tiny(out, "--columns", "gaussian", "--methods", "pca", "--num-datasets", "3",
                           "--shard", "0/2")) == 0
    assert sorted(p.name for p in (out / "rows").glob("*.json")) == [
        "gaussian-0000-pca.json", "gaussian-0001-pca.json", "gaussian-0002-pca.json"]
    capsys.readouterr()
    assert fig7.main(_tiny(out, "--columns", "gaussian", "--methods", "pca", "--num-datasets", "3")) == 0
    assert "fig7 dataset" not in capsys.readouterr().out  # nothing left for an unsharded run
    for bad in ("2/2", "1", "a/b", "-1/2"):
        with pytest.raises(SystemExit):
            fig7.main(_tiny(out, "--shard", bad))
    with pytest.raises(ValueError, match="0 <= k < m"):
        fig7.run(out, fig7.Protocol(num_data=40), num_datasets=1, columns=["gaussian"], shard=(3, 2))
