"""The summary table as text: one number format shared by the HTML and Markdown reports.

Every number shown in a report goes through :func:`format_value`, so a reader (or a test) can
parse a cell back and compare it with the DataFrame at the precision :data:`SIGNIFICANT_DIGITS`.
"""

from __future__ import annotations

import html
import math
import re

import pandas as pd

from deqppl.report.glossary import METRICS, Group, describe_metric

__all__ = [
    "SIGNIFICANT_DIGITS",
    "STAGE_ORDER",
    "format_table",
    "format_value",
    "method_tables",
    "stage_means",
    "table_html",
    "table_markdown",
]

#: Significant digits of every number in a report table (``"{:.4g}"``): enough to tell a
#: 1e-8 latent agreement from a 1e-4 one and a 10x timing gap from a 2x one, short enough to read.
SIGNIFICANT_DIGITS = 4
_TEXT = ' class="text"'
# A printed number, optionally "± se", or the missing-value dash.
_NUMBER = re.compile(r"—|[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?( ± [-+]?(\d+\.?\d*)(e[-+]?\d+)?)?")
#: Numbers below this magnitude are printed without an exponent.
_PLAIN_BELOW = 1e7


def format_value(value: object, *, digits: int = SIGNIFICANT_DIGITS) -> str:
    """Format one cell: numbers with ``digits`` significant digits, missing as ``"—"``.

    Examples
    --------
    >>> format_value(3.14159), format_value(-21975.27), format_value(12345678.0), format_value(float("nan"))
    ('3.142', '-21980', '1.235e+07', '—')
    """
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) or hasattr(value, "__float__") and not isinstance(value, str):
        x = float(value)  # numpy scalars included
        if math.isnan(x):
            return "—"
        if 10.0**digits <= abs(x) < _PLAIN_BELOW:
            # "{:.4g}" would print -21975.3 as -2.198e+04; a statistician reads sums of log
            # densities of this size more easily as -21980 (the same digits, no exponent).
            return f"{round(x, digits - 1 - math.floor(math.log10(abs(x)))):.0f}"
        return f"{x:.{digits}g}"
    return str(value)


def format_table(frame: pd.DataFrame, *, digits: int = SIGNIFICANT_DIGITS) -> pd.DataFrame:
    """Return ``frame`` with the index as the first column(s) and every cell formatted as text.

    Examples
    --------
    >>> df = pd.DataFrame({"wall_time": [0.5, 12.25]}, index=pd.Index(["deq", "svi"], name="method"))
    >>> format_table(df).values.tolist()
    [['deq', '0.5'], ['svi', '12.25']]
    """
    flat = frame.reset_index() if _has_named_index(frame) else frame.reset_index(drop=True)
    out = flat.copy().astype(object)
    for col in flat.columns:
        out[col] = [format_value(v, digits=digits) for v in flat[col].tolist()]
    out.columns = [str(c) for c in flat.columns]
    return out


def _has_named_index(frame: pd.DataFrame) -> bool:
    return any(name is not None for name in frame.index.names)


def table_markdown(frame: pd.DataFrame, *, digits: int = SIGNIFICANT_DIGITS) -> str:
    """A GitHub-flavoured Markdown table of ``frame`` (index included when named).

    Examples
    --------
    >>> df = pd.DataFrame({"method": ["deq"], "wall_time": [0.25]})
    >>> print(table_markdown(df))
    | method | wall_time |
    |---|---|
    | deq | 0.25 |
    """
    text = format_table(frame, digits=digits)
    lines = ["| " + " | ".join(text.columns) + " |", "|" + "---|" * len(text.columns)]
    for row in text.itertuples(index=False):
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines)


def table_html(frame: pd.DataFrame, *, digits: int = SIGNIFICANT_DIGITS, table_id: str = "summary") -> str:
    """An HTML ``<table>`` of ``frame`` (escaped text, index included when named).

    Examples
    --------
    >>> df = pd.DataFrame({"method": ["deq"], "wall_time": [0.25]})
    >>> "<td>0.25</td>" in table_html(df)
    True
    """
    text = format_table(frame, digits=digits)
    # Text columns (names, families, units) are left-aligned, numbers right-aligned.
    is_text = [not all(_NUMBER.fullmatch(str(c)) for c in text[col]) for col in text.columns]
    head = "".join(
        f"<th{_TEXT if t else ''}>{html.escape(c)}</th>" for c, t in zip(text.columns, is_text, strict=True)
    )
    rows = []
    for row in text.itertuples(index=False):
        rows.append(
            "<tr>"
            + "".join(
                f"<td{_TEXT if t else ''}>{html.escape(str(c))}</td>"
                for c, t in zip(row, is_text, strict=True)
            )
            + "</tr>"
        )
    return (
        f'<table id="{html.escape(table_id)}">\n<thead><tr>{head}</tr></thead>\n<tbody>\n'
        + "\n".join(rows)
        + "\n</tbody>\n</table>"
    )


#: Stages of a comparison in the order a report shows them (the held-out comparison first).
STAGE_ORDER = ("heldout", "fit")


def stage_means(table: pd.DataFrame) -> pd.DataFrame:
    """Mean over seeds of every metric: index ``(stage, metric)``, one column per method.

    Examples
    --------
    >>> t = pd.DataFrame({"model": "m", "method": ["deq", "deq"], "seed": [0, 1], "stage": "fit",
    ...                   "metric": "wall_time", "value": [1.0, 3.0]})
    >>> float(stage_means(t).loc[("fit", "wall_time"), "deq"])
    2.0
    """
    wide = table.pivot_table(
        index=["stage", "metric"], columns="method", values="value", aggfunc="mean", dropna=False
    )
    wide.columns.name = None
    return wide


def method_tables(
    table: pd.DataFrame, methods: list[str]
) -> list[tuple[Group, pd.DataFrame]]:
    """The tidy table as a few narrow tables, one per :class:`~deqppl.report.glossary.Group`.

    Each table has one row per (metric, stage) with the columns ``metric``, ``stage``,
    ``unit`` and one column per method, so its width grows with the number of methods, not of
    metrics. Rows and method columns that are all missing are dropped.

    Parameters
    ----------
    table
        The tidy ``Comparison.table``.
    methods
        Method columns in the order shown (``Comparison.summary.index``).

    Examples
    --------
    >>> t = pd.DataFrame({"model": "m", "method": ["deq", "svi"], "seed": 0, "stage": "heldout",
    ...                   "metric": "wall_time", "value": [0.5, 2.0]})
    >>> [(g.name, list(f.columns)) for g, f in method_tables(t, ["deq", "svi"])]
    [('TIME', ['metric', 'stage', 'unit', 'deq', 'svi'])]
    """
    means = stage_means(table)
    metric_rank = {m: k for k, m in enumerate(METRICS)}
    pairs = sorted(
        means.index,
        key=lambda p: (
            metric_rank.get(p[1], len(metric_rank)),
            p[1],
            STAGE_ORDER.index(p[0]) if p[0] in STAGE_ORDER else len(STAGE_ORDER),
            p[0],
        ),
    )
    out = []
    for group in Group:
        rows = [p for p in pairs if describe_metric(p[1]).group is group]
        if not rows:
            continue
        values = means.loc[rows].reindex(columns=[m for m in methods if m in means.columns])
        keep = values.notna().any(axis=1).to_numpy()
        values = values[keep]
        values = values.loc[:, values.notna().any(axis=0)]
        if values.empty:
            continue
        frame = pd.DataFrame(
            {
                "metric": [metric for _, metric in values.index],
                "stage": [stage for stage, _ in values.index],
                "unit": [describe_metric(metric).unit for _, metric in values.index],
            }
        )
        for method in values.columns:
            frame[str(method)] = values[method].to_numpy()
        out.append((group, frame))
    return out
