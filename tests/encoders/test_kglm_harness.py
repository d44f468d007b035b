"""The kGLM DEQ row of compare / the CLI: same held-out log-likelihood as L-BFGS on the Pyro model."""

from __future__ import annotations

import numpy as np
import pandas as pd

from deqppl.cli import main


def test_kglm_deq_row_on_a_user_csv(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 2))
    y = np.sin(x[:, 0]) + 0.1 * rng.normal(size=40)
    path = tmp_path / "xy.csv"
    pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "target": y}).to_csv(path, index=False)
    out = tmp_path / "o"
    code = main(["compare", "--model", "kglm", "--data", str(path), "--family", "gaussian", "--y-column", "target",
                 "--methods", "deq,lbfgs", "--no-progress", "--out", str(out)])
    capsys.readouterr()
    assert code == 0
    t = pd.read_csv(out / "table.csv").set_index(["method", "stage", "metric"])["value"]
    assert t["deq", "fit", "converged"] == 1 and t["deq", "heldout", "converged"] == 1
    # both reach the same MAP: L-BFGS's gradient rule leaves ~1e-10 (tests/models/test_kernel_glm.py)
    assert abs(t["deq", "heldout", "heldout_log_lik"] - t["lbfgs", "heldout", "heldout_log_lik"]) < 1e-8
    assert t["deq", "heldout", "certified_bound"] < 1e-8
