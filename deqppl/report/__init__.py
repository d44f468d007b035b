"""Reports of a comparison: pandas tables, matplotlib figures, HTML and Markdown pages.

ArviZ is imported only by :mod:`deqppl.report.arviz_adapter`.
"""

from deqppl.report import arviz_adapter
from deqppl.report.arviz_adapter import load_netcdf, loo, save_netcdf, to_inference_data
from deqppl.report.classifiers import (
    CLASSIFIER_TABLES,
    classifier_glossary,
    classifier_markdown,
    classifier_tables,
)
from deqppl.report.finding import Number, finding, finding_html, finding_markdown
from deqppl.report.glossary import METRICS, MODEL_METRICS, Group, MetricInfo, describe_metric
from deqppl.report.plots import (
    figure_png,
    key_figure,
    plot_latent_space,
    plot_latents,
    plot_model_comparison,
    plot_reconstructions,
    plot_timing,
    plot_traces,
)
from deqppl.report.reconstruct import (
    Reconstruction,
    latent_matrix,
    method_values,
    observation_mean,
    reconstruct,
)
from deqppl.report.tables import (
    format_table,
    format_value,
    method_tables,
    stage_means,
    table_html,
    table_markdown,
)
from deqppl.report.write import model_comparison_frame, write_report

__all__ = [
    "CLASSIFIER_TABLES",
    "classifier_glossary",
    "classifier_markdown",
    "classifier_tables",
    "METRICS",
    "MODEL_METRICS",
    "Group",
    "MetricInfo",
    "Number",
    "Reconstruction",
    "arviz_adapter",
    "describe_metric",
    "finding",
    "finding_html",
    "finding_markdown",
    "latent_matrix",
    "method_tables",
    "method_values",
    "observation_mean",
    "plot_latent_space",
    "plot_reconstructions",
    "reconstruct",
    "stage_means",
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
