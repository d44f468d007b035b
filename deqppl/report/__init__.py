"""Reports of a comparison: pandas tables, matplotlib figures, HTML and Markdown pages.

ArviZ is imported only by :mod:`deqppl.report.arviz_adapter`.
"""

from deqppl.report import arviz_adapter
from deqppl.report.arviz_adapter import load_netcdf, loo, save_netcdf, to_inference_data
from deqppl.report.plots import (
    figure_png,
    key_figure,
    plot_latents,
    plot_model_comparison,
    plot_timing,
    plot_traces,
)
from deqppl.report.tables import format_table, format_value, table_html, table_markdown
from deqppl.report.write import model_comparison_frame, write_report

__all__ = [
    "arviz_adapter",
    "load_netcdf",
    "loo",
    "save_netcdf",
    "to_inference_data",
    "figure_png",
    "format_table",
    "format_value",
    "key_figure",
    "model_comparison_frame",
    "plot_latents",
    "plot_model_comparison",
    "plot_timing",
    "plot_traces",
    "table_html",
    "table_markdown",
    "write_report",
]
