"""Write a comparison as a self-contained HTML page and a Markdown page with PNG figures."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from deqppl.report.plots import (
    figure_png,
    plot_latents,
    plot_model_comparison,
    plot_timing,
    plot_traces,
)
from deqppl.report.tables import table_html, table_markdown

__all__ = ["model_comparison_frame", "write_report"]

#: Score columns a model comparison may carry (higher is better), each with its se column.
_SCORES = (
    ("heldout_log_lik", "heldout_log_lik_se"),
    ("heldout_log_marginal", "heldout_log_marginal_se"),
    ("elpd_loo", "elpd_loo_se"),
    ("elpd", "se"),
)
#: Further columns shown in the model-comparison table when present.
_DIAGNOSTICS = ("p_loo", "pareto_k_max")

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 70em; margin: 2em auto; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; }
"""


def model_comparison_frame(model_comparison: object) -> tuple[pd.DataFrame, list[tuple[str, str | None]]]:
    """One row per model with its score columns and their standard errors.

    Parameters
    ----------
    model_comparison
        A :class:`deqppl.harness.ModelComparison` (its ``table``) or a DataFrame with a
        ``model`` column or index and at least one of the columns ``heldout_log_lik``,
        ``heldout_log_marginal``, ``elpd_loo``, ``elpd`` (se columns ``<score>_se``, or ``se``
        for ``elpd``).

    Returns
    -------
    frame, scores
        The frame indexed by model, and ``(score, se)`` column pairs present (``se`` is
        ``None`` when absent).

    Raises
    ------
    TypeError
        If ``model_comparison`` is neither.
    ValueError
        If no score column is found; the message lists the columns present and those accepted.

    Examples
    --------
    >>> df = pd.DataFrame({"model": ["a", "b"], "elpd_loo": [-3.0, -2.0], "elpd_loo_se": [0.1, 0.2]})
    >>> frame, scores = model_comparison_frame(df)
    >>> list(frame.index), scores
    (['a', 'b'], [('elpd_loo', 'elpd_loo_se')])
    """
    frame = model_comparison
    if not isinstance(frame, pd.DataFrame):
        frame = getattr(model_comparison, "table", None)
        if not isinstance(frame, pd.DataFrame):
            raise TypeError(
                "model_comparison must be a ModelComparison or a DataFrame, got "
                f"{type(model_comparison).__name__}"
            )
    if "model" in frame.columns:
        frame = frame.set_index("model")
    scores = [
        (value, se if se in frame.columns else None)
        for value, se in _SCORES
        if value in frame.columns and frame[value].notna().any()
    ]
    if not scores:
        raise ValueError(
            f"model comparison has columns {[str(c) for c in frame.columns]}; need one of "
            f"{[v for v, _ in _SCORES]}"
        )
    return frame, scores


def _summary_frame(comparison) -> pd.DataFrame:
    summary = comparison.summary
    if "method" in summary.columns:
        summary = summary.set_index("method")
    return summary


def write_report(
    comparison,
    out_dir: str | Path,
    *,
    model_comparison: object | None = None,
    title: str = "deqppl comparison report",
    reference: str = "deq",
) -> dict[str, Path]:
    """Write ``report.html`` (self-contained) and ``report.md`` (+ PNG figures) into ``out_dir``.

    The HTML page embeds every figure as a base64 PNG and has no external links, scripts or
    style sheets, so it can be mailed or archived as one file. The Markdown page shows the same
    table and links the same figures, saved as PNG files beside it.

    Parameters
    ----------
    comparison
        A :class:`deqppl.harness.Comparison`.
    out_dir
        Folder to write into (created if needed).
    model_comparison
        Optional :class:`deqppl.harness.ModelComparison` (or a DataFrame, see
        :func:`model_comparison_frame`); adds a model-comparison plot and table.
    title
        Page title.
    reference
        Method the latents are compared with and timings are divided by (default ``"deq"``;
        the first method in the summary if absent).

    Returns
    -------
    dict
        ``"html"``, ``"markdown"`` and one entry per figure name (``"traces"``, ``"latents"``,
        ``"timing"``, ``"model_comparison"``) -> path written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = _summary_frame(comparison)
    if reference not in comparison.latents and reference not in list(summary.index):
        reference = str(next(iter(comparison.latents), summary.index[0]))

    figures: dict[str, tuple[str, Figure]] = {
        "traces": ("Convergence traces", plot_traces(comparison.traces)),
    }
    if reference in comparison.latents and len(comparison.latents) > 1:
        figures["latents"] = (
            f"Held-out latents against {reference}",
            plot_latents(comparison.latents, reference=reference),
        )
    figures["timing"] = ("Wall time", plot_timing(comparison.table, reference=reference))
    mc_table = None
    if model_comparison is not None:
        frame, scores = model_comparison_frame(model_comparison)
        figures["model_comparison"] = (
            "Model comparison (held-out scores, ± 1 se)",
            plot_model_comparison(frame, scores=scores),
        )
        shown = [c for pair in scores for c in pair if c is not None]
        mc_table = frame[shown + [c for c in _DIAGNOSTICS if c in frame.columns]]

    paths: dict[str, Path] = {}
    pngs: dict[str, bytes] = {}
    for key, (_, fig) in figures.items():
        pngs[key] = figure_png(fig)
        paths[key] = out / f"{key}.png"
        paths[key].write_bytes(pngs[key])

    md = [f"# {title}", "", f"Model: `{comparison.model_name}`", "", "## Summary (held-out stage)", ""]
    md.append(table_markdown(summary))
    if mc_table is not None:
        md += ["", "## Model comparison", "", table_markdown(mc_table)]
    for key, (caption, _) in figures.items():
        md += ["", f"## {caption}", "", f"![{caption}]({key}.png)"]
    paths["markdown"] = out / "report.md"
    paths["markdown"].write_text("\n".join(md) + "\n", encoding="utf-8")

    esc = html.escape
    body = [
        f"<h1>{esc(title)}</h1>",
        f"<p>Model: <code>{esc(str(comparison.model_name))}</code></p>",
        "<h2>Summary (held-out stage)</h2>",
        table_html(summary, table_id="summary"),
    ]
    if mc_table is not None:
        body += ["<h2>Model comparison</h2>", table_html(mc_table, table_id="model-comparison")]
    for key, (caption, _) in figures.items():
        data = base64.b64encode(pngs[key]).decode("ascii")
        body += [
            f"<h2>{esc(caption)}</h2>",
            f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>",
        ]
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )
    paths["html"] = out / "report.html"
    paths["html"].write_text(page, encoding="utf-8")
    return paths
