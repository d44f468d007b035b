"""The summary table as text: one number format shared by the HTML and Markdown reports.

Every number shown in a report goes through :func:`format_value`, so a reader (or a test) can
parse a cell back and compare it with the DataFrame at the precision :data:`SIGNIFICANT_DIGITS`.
"""

from __future__ import annotations

import html
import math

import pandas as pd

__all__ = ["SIGNIFICANT_DIGITS", "format_table", "format_value", "table_html", "table_markdown"]

#: Significant digits of every number in a report table (``"{:.4g}"``): enough to tell a
#: 1e-8 latent agreement from a 1e-4 one and a 10x timing gap from a 2x one, short enough to read.
SIGNIFICANT_DIGITS = 4


def format_value(value: object, *, digits: int = SIGNIFICANT_DIGITS) -> str:
    """Format one cell: numbers with ``digits`` significant digits, missing as ``"—"``.

    Examples
    --------
    >>> format_value(3.14159), format_value(12345678.0), format_value(float("nan")), format_value("deq")
    ('3.142', '1.235e+07', '—', 'deq')
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
    head = "".join(f"<th>{html.escape(c)}</th>" for c in text.columns)
    rows = []
    for row in text.itertuples(index=False):
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>")
    return (
        f'<table id="{html.escape(table_id)}">\n<thead><tr>{head}</tr></thead>\n<tbody>\n'
        + "\n".join(rows)
        + "\n</tbody>\n</table>"
    )
