"""A small comparison for the report tests: from the real harness when present, else hand-built."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch

METHODS = ("deq", "svi", "lbfgs")


@dataclass(frozen=True)
class HandBuiltComparison:
    """Satisfies the ``deqppl.harness.Comparison`` contract of docs/CONVENTIONS.md."""

    table: pd.DataFrame
    summary: pd.DataFrame
    latents: dict
    traces: dict
    model_name: str


def hand_built_comparison() -> HandBuiltComparison:
    rng = np.random.default_rng(0)
    rows = []
    for m, method in enumerate(METHODS):
        for stage in ("fit", "heldout"):
            metrics = {
                "wall_time": 0.01 * 10.0**m * (1 + rng.random()),
                "num_steps": float(5 + 100 * m),
                "converged": 1.0,
                "log_joint": -1234.5678 - m * rng.random(),
                "max_abs_dz": 0.0 if m == 0 else 10.0 ** (-3 - m) * rng.random(),
                "heldout_log_lik": -987.654321 - m * 1e-3,
            }
            for metric, value in metrics.items():
                rows.append(("ExpFamPCA", method, 0, stage, metric, value))
    table = pd.DataFrame(rows, columns=["model", "method", "seed", "stage", "metric", "value"])
    held = table[table["stage"] == "heldout"]
    summary = held.pivot_table(index="method", columns="metric", values="value").reindex(METHODS)
    fit_time = table[(table["stage"] == "fit") & (table["metric"] == "wall_time")]
    summary["fit_wall_time"] = fit_time.set_index("method")["value"].reindex(METHODS)
    summary.columns.name = None
    z = torch.randn(30, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    latents = {m: z + 1e-4 * i for i, m in enumerate(METHODS)}
    traces = {
        "deq": torch.logspace(0, -10, 6, dtype=torch.float64),  # residuals
        "svi": torch.linspace(50.0, -20.0, 200, dtype=torch.float64),  # negative losses
        "lbfgs": torch.linspace(50.0, 10.0, 20, dtype=torch.float64),
    }
    return HandBuiltComparison(table, summary, latents, traces, "ExpFamPCA")


@pytest.fixture(scope="session")
def comparison():
    return hand_built_comparison()
