"""Figures of a comparison, drawn with matplotlib's object API (no pyplot, no global state).

Each function returns a :class:`matplotlib.figure.Figure`; :func:`figure_png` renders one to PNG
bytes with the Agg renderer, so nothing here needs a display.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

__all__ = [
    "figure_png",
    "key_figure",
    "plot_latents",
    "plot_model_comparison",
    "plot_timing",
    "plot_traces",
]

#: Methods drawn first and in this order; others follow alphabetically.
_ORDER = ("deq", "svi", "lbfgs")


def _methods(names) -> list[str]:
    names = list(dict.fromkeys(str(n) for n in names))
    first = [m for m in _ORDER if m in names]
    return first + sorted(m for m in names if m not in first)


def figure_png(fig: Figure, *, dpi: int = 110) -> bytes:
    """Render ``fig`` to PNG bytes (Agg).

    Examples
    --------
    >>> png = figure_png(Figure(figsize=(1, 1)))
    >>> png[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
    True
    """
    buf = io.BytesIO()
    # Fixed metadata keeps the bytes independent of the matplotlib version string.
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _draw_traces(axes, traces: Mapping[str, object]) -> None:
    drawn = False
    for name in _methods(traces):
        t = _as_numpy(traces[name]).ravel()
        t = t[np.isfinite(t)]
        if t.size == 0:
            continue
        if (t > 0).all():
            y, label = t, name
        else:
            # A loss (negative log joint) can be negative: plot its excess over the final
            # minimum, dropping the exact zero so the log axis has only positive values.
            y, label = t - t.min(), f"{name} (loss − min)"
            y = np.where(y > 0, y, np.nan)
            if not np.isfinite(y).any():
                continue
        axes.plot(np.arange(1, t.size + 1), y, label=label, lw=1.4)
        drawn = True
    if drawn:
        axes.set_yscale("log")
        axes.set_xscale("log")
        axes.legend(fontsize=8)
    axes.set_xlabel("step")
    axes.set_ylabel("loss or residual (log)")
    axes.set_title("Convergence")


def plot_traces(traces: Mapping[str, object]) -> Figure:
    """Convergence trace per method (loss or residual against step, log-log axes).

    Parameters
    ----------
    traces
        Method name -> 1-D trace (``Comparison.traces``).
    """
    fig = Figure(figsize=(5.5, 3.8), layout="constrained")
    _draw_traces(fig.add_subplot(), traces)
    return fig


def _draw_latents(axes, latents: Mapping[str, object], reference: str, dim: int) -> None:
    ref = _as_numpy(latents[reference])
    lo, hi = np.inf, -np.inf
    for name in _methods(latents):
        if name == reference:
            continue
        z = _as_numpy(latents[name])
        if z.shape[1] <= dim:
            continue
        axes.scatter(ref[:, dim], z[:, dim], s=9, alpha=0.6, label=name)
        lo = min(lo, ref[:, dim].min(), z[:, dim].min())
        hi = max(hi, ref[:, dim].max(), z[:, dim].max())
    if np.isfinite(lo):
        axes.plot([lo, hi], [lo, hi], color="black", lw=0.8, ls="--", label="identity")
        axes.legend(fontsize=8)
    axes.set_xlabel(f"{reference} z[{dim}]")
    axes.set_ylabel(f"other method z[{dim}]")
    axes.set_title(f"Held-out latents, dim {dim}")


def plot_latents(latents: Mapping[str, object], *, reference: str = "deq") -> Figure:
    """Held-out latents of every method against ``reference``'s, first two dimensions.

    Points on the dashed identity line mean the two methods found the same conditional MAP.

    Raises
    ------
    ValueError
        If ``reference`` is not among the methods.
    """
    if reference not in latents:
        raise ValueError(f"reference method {reference!r} not in the latents of {sorted(latents)}")
    num_dims = min(2, _as_numpy(latents[reference]).shape[1])
    fig = Figure(figsize=(4.2 * num_dims + 0.6, 3.8), layout="constrained")
    for dim in range(num_dims):
        _draw_latents(fig.add_subplot(1, num_dims, dim + 1), latents, reference, dim)
    return fig


def timing_frame(table: pd.DataFrame) -> pd.DataFrame:
    """Mean ``wall_time`` over seeds, one row per method and one column per stage.

    Examples
    --------
    >>> t = pd.DataFrame({"model": "m", "method": ["deq", "svi"], "seed": 0, "stage": "fit",
    ...                   "metric": "wall_time", "value": [1.0, 4.0]})
    >>> timing_frame(t)["fit"].tolist()
    [1.0, 4.0]
    """
    rows = table[table["metric"] == "wall_time"]
    wide = rows.pivot_table(index="method", columns="stage", values="value", aggfunc="mean")
    wide = wide.reindex(_methods(wide.index))
    wide.columns = [str(c) for c in wide.columns]
    return wide


def _draw_timing(axes, table: pd.DataFrame, reference: str) -> None:
    wide = timing_frame(table)
    stages = [s for s in ("fit", "heldout") if s in wide.columns] + sorted(
        s for s in wide.columns if s not in ("fit", "heldout")
    )
    width = 0.8 / max(len(stages), 1)
    x = np.arange(len(wide.index))
    for k, stage in enumerate(stages):
        values = wide[stage].to_numpy(dtype=float)
        bars = axes.bar(x + (k - (len(stages) - 1) / 2) * width, values, width, label=stage)
        ref = wide[stage].get(reference, np.nan)
        for bar, v in zip(bars, values, strict=True):
            if np.isfinite(v) and np.isfinite(ref) and ref > 0:
                axes.annotate(
                    f"{v / ref:.3g}×", (bar.get_x() + bar.get_width() / 2, v),
                    ha="center", va="bottom", fontsize=7,
                )
    axes.set_xticks(x, list(wide.index))
    if (wide.to_numpy() > 0).any():
        axes.set_yscale("log")
    axes.set_ylabel("wall time [s] (log)")
    axes.set_title(f"Time (labels: ratio to {reference})")
    axes.legend(fontsize=8)


def plot_timing(table: pd.DataFrame, *, reference: str = "deq") -> Figure:
    """Wall time per method and stage (log scale), each bar labelled with its ratio to ``reference``.

    Parameters
    ----------
    table
        The tidy ``Comparison.table``; its ``wall_time`` rows are averaged over seeds.
    """
    fig = Figure(figsize=(5.5, 3.8), layout="constrained")
    _draw_timing(fig.add_subplot(), table, reference)
    return fig


def plot_model_comparison(frame: pd.DataFrame, *, scores: list[tuple[str, str | None]]) -> Figure:
    """One panel per score: a point per model with a ±1 standard-error bar (higher is better).

    Parameters
    ----------
    frame
        One row per model, index = model names.
    scores
        ``(score column, se column or None)`` pairs, e.g. ``[("elpd_loo", "elpd_loo_se")]``.
    """
    fig = Figure(
        figsize=(4.2 * len(scores) + 1.0, 0.8 + 0.45 * max(len(frame), 2)), layout="constrained"
    )
    axes = np.atleast_1d(fig.subplots(1, len(scores), sharey=True))
    y = np.arange(len(frame))
    for ax, (value, se) in zip(axes, scores, strict=True):
        err = frame[se].to_numpy(dtype=float) if se is not None else None
        ax.errorbar(frame[value].to_numpy(dtype=float), y, xerr=err, fmt="o", capsize=4)
        ax.set_xlabel(value)
        ax.set_yticks(y, [str(i) for i in frame.index])
    fig.suptitle("Model comparison (± 1 se; higher is better)")
    return fig


def key_figure(comparison, *, reference: str = "deq") -> Figure:
    """The report's headline: convergence, held-out latents (dim 0) and timing side by side.

    Parameters
    ----------
    comparison
        A :class:`deqppl.harness.Comparison`.
    """
    fig = Figure(figsize=(15, 4.2), layout="constrained")
    axes = fig.subplots(1, 3)
    _draw_traces(axes[0], comparison.traces)
    if reference in comparison.latents:
        _draw_latents(axes[1], comparison.latents, reference, 0)
    _draw_timing(axes[2], comparison.table, reference)
    fig.suptitle(f"MAP by DEQ vs SVI vs L-BFGS\n{comparison.model_name}", fontsize=10)
    return fig
