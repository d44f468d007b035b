"""Write a comparison as a self-contained HTML page and a Markdown page with PNG figures.

The page reads top to bottom as a statistician would ask: what was found (one paragraph whose
numbers are read from the table), the numbers in a few narrow tables, the figures (each axis with
its unit), the model comparison, and a glossary of every metric shown.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from deqppl.report.finding import finding, finding_html, finding_markdown
from deqppl.report.glossary import METRICS, MODEL_METRICS, MetricInfo, describe_metric
from deqppl.report.plots import (
    figure_png,
    image_shape_of,
    plot_latent_space,
    plot_latents,
    plot_model_comparison,
    plot_reconstructions,
    plot_timing,
    plot_traces,
)
from deqppl.report.reconstruct import reconstruct
from deqppl.report.tables import format_value, method_tables, table_html, table_markdown

__all__ = ["model_comparison_frame", "write_report"]

#: Score columns a model comparison may carry (higher is better), each with its se column.
_SCORES = (
    ("heldout_log_lik", "heldout_log_lik_se"),
    ("heldout_log_marginal", "heldout_log_marginal_se"),
    ("elpd_loo", "elpd_loo_se"),
    ("elpd", "se"),
)
#: Further columns shown in the model-comparison diagnostics table when present.
_DIAGNOSTICS = ("p_loo", "pareto_k_max", "fit_converged", "fit_wall_time")

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 62em; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
code { overflow-wrap: anywhere; }
p.finding { font-size: 1.05em; background: #f6f8fa; padding: 0.8em 1em; border-left: 4px solid #4a7; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.4em 0 1.2em; max-width: 100%; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; overflow-wrap: anywhere; }
th { background: #f3f3f3; }
td { white-space: nowrap; }
td:first-child, th:first-child, td.text, th.text { text-align: left; }
table.glossary td, table.glossary th { text-align: left; white-space: normal; }
table.glossary td:first-child { white-space: nowrap; }
figure { margin: 1em 0; }
img { max-width: 100%; height: auto; }
figcaption { font-size: 0.9em; color: #555; }
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


def _reconstructions(comparison, image_shape, detect_images: bool, num_rows: int):
    """The reconstruction figure, or None when the comparison lacks the model or its data."""
    recon = reconstruct(comparison)
    if recon is None:
        return None
    original, site = recon.original, recon.site
    d = int(np.prod(tuple(original.shape[1:]))) if original.dim() > 1 else 1
    shape = image_shape_of(d, image_shape=image_shape, detect_images=detect_images)
    where = "top row" if shape is not None else "dots"
    caption = (
        f"Held-out rows ({where}) and the mean of the observation site {site!r} of the model "
        "conditioned on each method's MAP latents and the shared globals"
    )
    titles = _row_titles(comparison)
    fig = plot_reconstructions(
        original, recon.means, image_shape=shape, num_rows=num_rows,
        value_label=f"{site} and E[{site} | latents] [data units]", titles=titles,
    )
    return caption, fig


def _row_titles(comparison) -> list[str] | None:
    labels = getattr(comparison, "heldout_labels", None)
    if labels is None:
        return None
    return [f"row {k}: label {int(v)}" for k, v in enumerate(labels.tolist())]


def _glossary_rows(names: list[str], table: dict[str, MetricInfo]) -> pd.DataFrame:
    infos = [describe_metric(n, table=table) for n in names]
    return pd.DataFrame(
        {
            "metric": names,
            "unit": [i.unit or "—" for i in infos],
            "meaning": [i.description for i in infos],
        }
    )


def _glossary_html(frame: pd.DataFrame, table_id: str) -> str:
    rows = "\n".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
        for row in frame.itertuples(index=False)
    )
    head = "".join(f"<th>{html.escape(c)}</th>" for c in frame.columns)
    return (
        f'<table class="glossary" id="{table_id}">\n<thead><tr>{head}</tr></thead>\n<tbody>\n'
        f"{rows}\n</tbody>\n</table>"
    )


def _model_tables(
    frame: pd.DataFrame, scores: list[tuple[str, str | None]]
) -> list[tuple[str, pd.DataFrame]]:
    """Model comparison as two narrow text tables: scores as ``value ± se``, then diagnostics."""
    index = pd.Index([str(i) for i in frame.index], name="model")
    described = pd.DataFrame(index=index)
    for col in ("family", "latent_dim"):
        if col in frame.columns:
            described[col] = [format_value(v) for v in frame[col].tolist()]
    score_table = described.copy()
    for value, se in scores:
        cells = []
        ses = frame[se].tolist() if se is not None else [None] * len(frame)
        for v, e in zip(frame[value].tolist(), ses, strict=True):
            text = format_value(v)
            if e is not None and not pd.isna(e):
                text += f" ± {format_value(e)}"
            cells.append(text)
        score_table[value] = cells
    out = [("Held-out scores (nats, ± 1 se)", score_table)]
    diagnostics = [c for c in _DIAGNOSTICS if c in frame.columns]
    if diagnostics:
        diag_table = pd.DataFrame(index=index)
        for col in diagnostics:
            diag_table[col] = [format_value(v) for v in frame[col].tolist()]
        out.append(("PSIS-LOO and fit diagnostics", diag_table))
    return out


def write_report(
    comparison,
    out_dir: str | Path,
    *,
    model_comparison: object | None = None,
    title: str = "deqppl comparison report",
    reference: str = "deq",
    image_shape: tuple[int, int] | None = None,
    detect_images: bool = True,
    num_reconstructed: int = 8,
) -> dict[str, Path]:
    """Write ``report.html`` (self-contained) and ``report.md`` (+ PNG figures) into ``out_dir``.

    The page opens with a paragraph of findings (agreement of the held-out latents, time ratios
    to the DEQ, convergence, failures, downstream accuracy, best model) whose every number is
    read from the comparison's table; then the metrics in narrow tables (one per
    :class:`~deqppl.report.glossary.Group`: one row per metric and stage, one column per
    method); the figures; the model comparison; and a glossary of every metric shown.

    The HTML page embeds every figure as a base64 PNG and has no external links, scripts or
    style sheets, so it can be mailed or archived as one file. The Markdown page shows the same
    text and tables and links the same figures, saved as PNG files beside it.

    Parameters
    ----------
    comparison
        A :class:`deqppl.harness.Comparison`. With labels, the latent space is drawn coloured
        by label; with its ``model``, ``heldout_data`` and ``shared_globals``, each method's
        reconstruction of the held-out rows is read from the model's Pyro program.
    out_dir
        Folder to write into (created if needed).
    model_comparison
        Optional :class:`deqppl.harness.ModelComparison` (or a DataFrame, see
        :func:`model_comparison_frame`); adds a model-comparison plot and table.
    title
        Page title.
    reference
        Method timings are divided by (default ``"deq"``; the first method in the summary if
        absent). Latents are compared with ``comparison.reference`` (the most accurate method).
    image_shape
        ``(height, width)`` of one observation row drawn as an image; default: square rows
        with a side of at least 8 values are drawn as square images (the 8x8 digits).
    detect_images
        Whether square rows are drawn as images when ``image_shape`` is None.
    num_reconstructed
        Held-out rows shown reconstructed.

    Returns
    -------
    dict
        ``"html"``, ``"markdown"`` and one entry per figure name (``"traces"``, ``"latents"``,
        ``"latent_space"``, ``"reconstructions"``, ``"timing"``, ``"model_comparison"``) ->
        path written.

    Raises
    ------
    ValueError
        An ``image_shape`` that does not match the observations, a non-positive
        ``num_reconstructed``, or a model comparison without a score column.
    """
    if isinstance(num_reconstructed, bool) or not isinstance(num_reconstructed, int) or num_reconstructed < 1:
        raise ValueError(f"num_reconstructed must be a positive integer, got {num_reconstructed!r}")
    if not isinstance(detect_images, bool):
        raise TypeError(f"detect_images must be True or False, got {detect_images!r}")
    out = Path(out_dir)
    summary = _summary_frame(comparison)
    methods = [str(m) for m in summary.index]
    if reference not in comparison.latents and reference not in methods:
        reference = str(next(iter(comparison.latents), summary.index[0]))
    latent_reference = getattr(comparison, "reference", "") or reference
    if latent_reference not in comparison.latents:
        latent_reference = reference

    mc_frame = mc_scores = None
    if model_comparison is not None:
        mc_frame, mc_scores = model_comparison_frame(model_comparison)

    figures: dict[str, tuple[str, Figure]] = {
        "traces": (
            "Convergence of each method's joint fit of the globals: loss (negative log joint, "
            "nats) minus its minimum against step",
            plot_traces(comparison.traces),
        ),
    }
    if latent_reference in comparison.latents and len(comparison.latents) > 1:
        figures["latents"] = (
            f"Held-out latents of each method against {latent_reference}'s (the reference): "
            "points on the dashed identity line are the same conditional MAP",
            plot_latents(comparison.latents, reference=latent_reference),
        )
    labels = getattr(comparison, "heldout_labels", None)
    if labels is not None and latent_reference in comparison.latents:
        figures["latent_space"] = (
            "Latent space of the held-out rows coloured by label, one panel per method (more "
            f"than two latent dimensions: projected on the principal axes of {latent_reference}'s)",
            plot_latent_space(comparison.latents, labels, reference=latent_reference),
        )
    recon = _reconstructions(comparison, image_shape, detect_images, num_reconstructed)
    if recon is not None:
        figures["reconstructions"] = recon
    figures["timing"] = (
        f"Wall time per method and stage (log scale); labels: ratio to {reference}",
        plot_timing(comparison.table, reference=reference),
    )
    if mc_frame is not None:
        figures["model_comparison"] = (
            "Model comparison: held-out scores (nats, summed over held-out rows, ± 1 se; higher "
            "is better)",
            plot_model_comparison(mc_frame, scores=mc_scores),
        )

    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    pngs: dict[str, bytes] = {}
    for key, (_, fig) in figures.items():
        pngs[key] = figure_png(fig)
        paths[key] = out / f"{key}.png"
        paths[key].write_bytes(pngs[key])

    parts = finding(comparison, time_reference=reference, model_comparison=mc_frame)
    tables = method_tables(comparison.table, methods)
    shown = list(dict.fromkeys(m for _, t in tables for m in t["metric"]))
    glossary = _glossary_rows(shown, METRICS)
    mc_tables = mc_glossary = None
    if mc_frame is not None:
        mc_tables = _model_tables(mc_frame, mc_scores)
        mc_glossary = _glossary_rows(
            list(dict.fromkeys(c for _, t in mc_tables for c in t.columns)), MODEL_METRICS
        )
    mc_note = (
        "Scores of models whose observations have different supports (a Gaussian density "
        "against a Poisson or Binomial probability mass) differ in their base measure and are "
        "not comparable: compare rows of the same support."
    )

    md = [f"# {title}", "", f"Model: `{comparison.model_name}`", "", "## Finding", ""]
    md.append(finding_markdown(parts))
    for group, frame in tables:
        md += ["", f"## {group.value}", "", table_markdown(frame)]
    for key, (caption, _) in figures.items():
        if key == "model_comparison":
            continue
        md += ["", f"![{caption}]({key}.png)", "", f"*{caption}*"]
    if mc_tables is not None:
        md += ["", "## Model comparison", "", mc_note]
        for heading, frame in mc_tables:
            md += ["", f"### {heading}", "", table_markdown(frame)]
        caption = figures["model_comparison"][0]
        md += ["", f"![{caption}](model_comparison.png)", "", f"*{caption}*"]
    md += ["", "## Glossary", "", table_markdown(glossary)]
    if mc_glossary is not None:
        md += ["", "Model comparison:", "", table_markdown(mc_glossary)]
    paths["markdown"] = out / "report.md"
    paths["markdown"].write_text("\n".join(md) + "\n", encoding="utf-8")

    esc = html.escape

    def figure(key: str) -> list[str]:
        caption = figures[key][0]
        data = base64.b64encode(pngs[key]).decode("ascii")
        return [
            f'<figure id="figure-{key}"><img alt="{esc(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>"
        ]

    body = [
        f"<h1>{esc(title)}</h1>",
        f"<p>Model: <code>{esc(str(comparison.model_name))}</code></p>",
        "<h2>Finding</h2>",
        f'<p class="finding" id="finding">{finding_html(parts)}</p>',
    ]
    for group, frame in tables:
        table_id = group.name.lower().replace("_", "-")
        body += [f"<h2>{esc(group.value)}</h2>", table_html(frame, table_id=table_id)]
    body.append("<h2>Figures</h2>")
    for key in figures:
        if key != "model_comparison":
            body += figure(key)
    if mc_tables is not None:
        body += ["<h2>Model comparison</h2>", f"<p>{esc(mc_note)}</p>"]
        for k, (heading, frame) in enumerate(mc_tables):
            table_id = "model-comparison" if k == 0 else f"model-comparison-{k + 1}"
            body += [f"<h3>{esc(heading)}</h3>", table_html(frame, table_id=table_id)]
        body += figure("model_comparison")
    body += ["<h2>Glossary</h2>", _glossary_html(glossary, "glossary")]
    if mc_glossary is not None:
        body += ["<h3>Model comparison</h3>", _glossary_html(mc_glossary, "glossary-models")]
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )
    paths["html"] = out / "report.html"
    paths["html"].write_text(page, encoding="utf-8")
    return paths
