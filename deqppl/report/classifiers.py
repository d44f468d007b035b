"""Report section of a classifier comparison: narrow text tables (mean ± sd over seeds) and a
glossary of every metric they show.

Every number goes through :func:`~deqppl.report.tables.format_value`, so a cell can be parsed
back and compared with :attr:`deqppl.harness.ClassifierComparison.summary`.
"""

from __future__ import annotations

import math

import pandas as pd

from deqppl.report.glossary import describe_metric
from deqppl.report.tables import format_value, table_markdown

__all__ = ["CLASSIFIER_TABLES", "classifier_glossary", "classifier_markdown", "classifier_tables"]

#: The tables of the section: title -> metric columns, in order (absent metrics are dropped).
CLASSIFIER_TABLES: dict[str, tuple[str, ...]] = {
    "Accuracy, cost and convergence": (
        "test_accuracy", "num_parameters", "forward_steps", "backward_steps", "time_per_epoch",
        "unconverged_runs", "runs", "train_loss_first", "train_loss_last",
    ),
    "Certificate of the implicit layer (test images, after training)": (
        "certified", "cone_ok", "activation_ok", "injection_ok", "all_samples_converged",
        "rate_residual", "rate_thompson", "rho_jacobian", "rho_bound", "slope_max",
        "monotonicity_margin", "measured_margin", "lipschitz",
    ),
}
# Shown without a spread: counts over seeds (totals), the parameter count and settings (the
# same for every seed) and 0/1 checks (their mean is the fraction of seeds that passed).
_NO_SPREAD = ("unconverged_runs", "runs", "num_parameters", "monotonicity_margin", "certified",
              "cone_ok", "activation_ok", "injection_ok", "all_samples_converged")


def _cell(mean: float, sd: float, runs: float) -> str:
    text = format_value(mean)
    if runs > 1 and not math.isnan(sd) and not math.isnan(mean):
        text += f" ± {format_value(sd)}"
    return text


def classifier_tables(comparison) -> list[tuple[str, pd.DataFrame]]:
    """The comparison's summary as text tables: ``model``, ``stage``, ``method``, then one
    column per metric, each cell ``mean ± sd`` over seeds (counts as totals; parameter counts,
    settings and 0/1 checks as the mean alone; ``—`` missing).

    Parameters
    ----------
    comparison
        A :class:`deqppl.harness.ClassifierComparison`.

    Examples
    --------
    >>> import pandas as pd
    >>> from deqppl.harness.classifiers import ClassifierComparison
    >>> index = pd.MultiIndex.from_tuples([("d-linear", "test", "pcdeq")],
    ...                                   names=["model", "stage", "method"])
    >>> summary = pd.DataFrame({"test_accuracy": [0.9], "runs": [2.0], "certified": [1.0]}, index=index)
    >>> sd = pd.DataFrame({"test_accuracy": [0.01], "certified": [0.0]}, index=index)
    >>> tables = classifier_tables(ClassifierComparison(table=pd.DataFrame(), summary=summary, sd=sd))
    >>> [(title[:11], frame.values.tolist()) for title, frame in tables]
    [('Accuracy, c', [['d-linear', 'test', 'pcdeq', '0.9 ± 0.01', '2']]), ('Certificate', [['d-linear', 'test', 'pcdeq', '1']])]
    """
    summary, sd = comparison.summary, comparison.sd
    runs = summary["runs"] if "runs" in summary.columns else pd.Series(1.0, index=summary.index)
    out = []
    for title, metrics in CLASSIFIER_TABLES.items():
        shown = [m for m in metrics if m in summary.columns and summary[m].notna().any()]
        if not shown:
            continue
        frame = summary.index.to_frame(index=False).astype(str)
        for metric in shown:
            means = summary[metric].tolist()
            if metric in _NO_SPREAD or metric not in sd.columns:
                frame[metric] = [format_value(m) for m in means]
            else:
                frame[metric] = [_cell(m, s, r) for m, s, r in
                                 zip(means, sd[metric].tolist(), runs.tolist(), strict=True)]
        out.append((title, frame))
    return out


def classifier_glossary(tables: list[tuple[str, pd.DataFrame]]) -> pd.DataFrame:
    """One row (``metric``, ``unit``, ``meaning``) per metric column of ``tables``."""
    names = list(dict.fromkeys(c for _, t in tables for c in t.columns
                               if c not in ("model", "stage", "method")))
    infos = [describe_metric(n) for n in names]
    return pd.DataFrame({"metric": names, "unit": [i.unit or "—" for i in infos],
                         "meaning": [i.description for i in infos]})


def classifier_markdown(comparison, *, title: str = "Implicit classifiers", level: int = 2) -> str:
    """The section as Markdown: a heading of ``level``, the tables, and their glossary."""
    if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= 5:
        raise ValueError(f"level must be an integer heading level 1..5, got {level!r}")
    tables = classifier_tables(comparison)
    hashes = "#" * level
    lines = [f"{hashes} {title}", ""]
    for heading, frame in tables:
        lines += [f"{hashes}# {heading}", "", table_markdown(frame), ""]
    lines += [f"{hashes}# Glossary", "", table_markdown(classifier_glossary(tables))]
    return "\n".join(lines) + "\n"
