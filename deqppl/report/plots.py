"""Figures of a comparison, drawn with matplotlib's object API (no pyplot, no global state).

Each function returns a :class:`matplotlib.figure.Figure`; :func:`figure_png` renders one to PNG
bytes with the Agg renderer, so nothing here needs a display.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping

import matplotlib
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from deqppl.report.reconstruct import latent_matrix, reconstruct

__all__ = [
    "MIN_IMAGE_SIDE",
    "figure_png",
    "image_shape_of",
    "key_figure",
    "plot_latent_space",
    "plot_latents",
    "plot_model_comparison",
    "plot_reconstructions",
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
    if isinstance(x, Mapping):
        return latent_matrix(x)
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
        # Losses (negative log joints) of different methods differ by constants (SVI's ELBO
        # of a point mass, minibatch scaling) and can be negative: plot each one's excess over
        # its own minimum, dropping the exact zero so the log axis has only positive values.
        y = t - t.min()
        y = np.where(y > 0, y, np.nan)
        if not np.isfinite(y).any():
            continue
        axes.plot(np.arange(1, t.size + 1), y, label=name, lw=1.4)
        drawn = True
    if drawn:
        axes.set_yscale("log")
        axes.set_xscale("log")
        axes.legend(fontsize=8)
    axes.set_xlabel("step of the joint fit [iterations] (log scale)")
    axes.set_ylabel("loss − its minimum [nats] (log scale)")
    axes.set_title("Convergence of the joint fits")


def plot_traces(traces: Mapping[str, object]) -> Figure:
    """Convergence trace per method: loss minus its minimum against step, log-log axes.

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
    axes.set_xlabel(f"{reference}: z[{dim}] [latent units]")
    axes.set_ylabel(f"other method: z[{dim}] [latent units]")
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
    axes.set_xlabel("method")
    if (wide.to_numpy() > 0).any():
        axes.set_yscale("log")
    axes.set_ylabel("wall time [s] (log scale)")
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
    """One panel per score (nats, higher is better), with a ±1 standard-error bar.

    With ``family`` and ``latent_dim`` columns and more than one latent size, each family is a
    line against the latent dimension; otherwise each model is one point.

    Parameters
    ----------
    frame
        One row per model, index = model names.
    scores
        ``(score column, se column or None)`` pairs, e.g. ``[("elpd_loo", "elpd_loo_se")]``.
    """
    by_size = {"family", "latent_dim"} <= set(frame.columns) and frame["latent_dim"].nunique() > 1
    if by_size:
        fig = Figure(figsize=(4.0 * len(scores) + 1.0, 3.6), layout="constrained")
    else:
        fig = Figure(
            figsize=(4.0 * len(scores) + 1.0, 1.0 + 0.45 * max(len(frame), 2)), layout="constrained"
        )
    axes = np.atleast_1d(fig.subplots(1, len(scores), sharey=not by_size))
    for ax, (value, se) in zip(axes, scores, strict=True):
        if by_size:
            for fam, rows in frame.groupby("family", sort=False):
                rows = rows.sort_values("latent_dim")
                err = rows[se].to_numpy(dtype=float) if se is not None else None
                ax.errorbar(
                    rows["latent_dim"].to_numpy(dtype=float), rows[value].to_numpy(dtype=float),
                    yerr=err, fmt="o-", capsize=4, label=str(fam),
                )
            ax.set_xlabel("latent dimension l")
            ax.set_ylabel(f"{value} [nats]")
            ax.set_xticks(sorted(int(v) for v in frame["latent_dim"].unique()))
            ax.legend(fontsize=7)
        else:
            y = np.arange(len(frame))
            err = frame[se].to_numpy(dtype=float) if se is not None else None
            ax.errorbar(frame[value].to_numpy(dtype=float), y, xerr=err, fmt="o", capsize=4)
            ax.set_xlabel(f"{value} [nats]")
            ax.set_yticks(y, [str(i) for i in frame.index])
            ax.set_ylabel("model")
        ax.set_title(value, fontsize=9)
    fig.suptitle("Model comparison on held-out rows (± 1 se; higher is better)", fontsize=10)
    return fig


def _projection(reference: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Centre and axes mapping latents to two plotted coordinates, with the axis labels."""
    k = reference.shape[1]
    if k <= 2:
        return np.zeros(k), np.eye(k), [f"z[{j}] [latent units]" for j in range(k)]
    centre = reference.mean(0)
    # Principal axes of the reference method's latents: every method's panel uses the same
    # projection, so the panels can be compared point by point.
    _, _, vt = np.linalg.svd(reference - centre, full_matrices=False)
    return centre, vt[:2].T, [f"PC {j + 1} of the latents [latent units]" for j in range(2)]


def plot_latent_space(
    latents: Mapping[str, object], labels: object, *, reference: str
) -> Figure:
    """Held-out latents of each method coloured by label, one panel per method.

    Two latent dimensions are drawn as they are; more are projected on the first two principal
    axes of ``reference``'s latents (the same axes for every method); one dimension is drawn
    against the label.

    Parameters
    ----------
    latents
        Method name -> ``(n, l)`` latents (or site -> tensor mapping).
    labels
        ``(n,)`` integer labels.
    reference
        Method whose latents define the projection.

    Raises
    ------
    ValueError
        If ``reference`` is missing or the labels do not have one entry per row.
    """
    if reference not in latents:
        raise ValueError(f"reference method {reference!r} not in the latents of {sorted(latents)}")
    lab = _as_numpy(labels).astype(np.int64).ravel()
    ref = _as_numpy(latents[reference])
    if lab.shape[0] != ref.shape[0]:
        raise ValueError(f"labels have {lab.shape[0]} entries for {ref.shape[0]} held-out rows")
    methods = _methods(latents)
    fig = Figure(figsize=(3.3 * len(methods) + 1.2, 3.4), layout="constrained")
    _draw_latent_space(fig, latents, lab, reference, methods)
    return fig


def _draw_latent_space(fig, latents, lab: np.ndarray, reference: str, methods: list[str]) -> None:
    centre, axes_map, names = _projection(_as_numpy(latents[reference]))
    axes = np.atleast_1d(fig.subplots(1, len(methods), sharex=True, sharey=True))
    classes = np.unique(lab)
    cmap = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20"]
    for ax, name in zip(axes, methods, strict=True):
        xy = (_as_numpy(latents[name]) - centre) @ axes_map
        for k, c in enumerate(classes):
            rows = lab == c
            x = xy[rows, 0]
            y = xy[rows, 1] if xy.shape[1] > 1 else np.full(rows.sum(), float(c))
            ax.scatter(x, y, s=10, color=cmap(k % cmap.N), label=str(c), alpha=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(names[0])
    axes[0].set_ylabel(names[1] if len(names) > 1 else "label")
    handles, texts = axes[0].get_legend_handles_labels()
    fig.legend(handles, texts, title="label", loc="outside right center", fontsize=7)
    fig.suptitle("Held-out latents coloured by label", fontsize=10)


def plot_reconstructions(
    original: object,
    means: Mapping[str, object],
    *,
    image_shape: tuple[int, int] | None,
    num_rows: int = 8,
    value_label: str = "y [data units]",
    titles: list[str] | None = None,
) -> Figure:
    """Held-out rows next to the mean of the observation given each method's MAP latents.

    Parameters
    ----------
    original
        ``(n, d)`` observed held-out rows.
    means
        Method name -> ``(n, d)`` mean of the observation site given that method's latents.
    image_shape
        ``(height, width)`` with ``height * width == d`` to draw rows as images (one row of the
        figure per method, one column per example); None draws each example as a profile
        against the coordinate index.
    num_rows
        Examples shown (the first ones).
    value_label
        Colour-bar or y-axis label, with the unit.
    titles
        One title per example (e.g. its label); default ``"row k"``.

    Raises
    ------
    ValueError
        If ``image_shape`` does not multiply to ``d``.
    """
    y = _as_numpy(original)
    shown = min(num_rows, y.shape[0])
    num_panels = len(means) + 1
    if image_shape is not None:
        size = (0.85 * shown + 1.9, 0.85 * num_panels + 0.6)
    else:
        size = (9.0, 3.0 * ((min(shown, 4) + 1) // 2) + 0.6)
    fig = Figure(figsize=size, layout="constrained")
    _draw_reconstructions(fig, y, means, image_shape, shown, value_label, titles)
    return fig


def _draw_reconstructions(fig, y, means, image_shape, shown, value_label, titles) -> None:
    n, d = y.shape[0], y.reshape(y.shape[0], -1).shape[1]
    y = y.reshape(n, d)
    titles = [f"row {k}" for k in range(n)] if titles is None else [str(t) for t in titles]
    methods = _methods(means)
    rows = [("observed", y)] + [(m, _as_numpy(means[m]).reshape(n, d)) for m in methods]
    if image_shape is not None:
        h, w = image_shape
        if h * w != d:
            raise ValueError(f"image_shape {image_shape} has {h * w} pixels; rows have {d}")
        vmax = float(np.nanmax(y[:shown])) if np.isfinite(y[:shown]).any() else 1.0
        axes = fig.subplots(len(rows), shown, squeeze=False)
        for r, (name, values) in enumerate(rows):
            for c in range(shown):
                ax = axes[r, c]
                im = ax.imshow(values[c].reshape(h, w), cmap="gray_r", vmin=0.0, vmax=vmax)
                ax.set_xticks([])
                ax.set_yticks([])
                if c == 0:
                    ax.set_ylabel(name, fontsize=8)
                if r == 0:
                    ax.set_title(titles[c], fontsize=7)
        fig.colorbar(im, ax=axes, shrink=0.8, label=value_label)
        fig.suptitle("Held-out rows and their reconstructions E[y | MAP latents]", fontsize=10)
        return
    shown = min(shown, 4)
    ncols = min(shown, 2)
    grid = fig.subplots((shown + ncols - 1) // ncols, ncols, sharey=True, squeeze=False)
    coords = np.arange(d)
    # Methods that found the same MAP draw on top of each other: distinct dashes keep each visible.
    styles = ("-", "--", ":", "-.")
    for c, ax in enumerate(grid.ravel()):
        if c >= shown:
            ax.set_axis_off()
            continue
        ax.plot(coords, y[c], "ko", ms=3, label="observed")
        for k, (name, values) in enumerate(rows[1:]):
            ax.plot(coords, values[c], lw=1.4, ls=styles[k % len(styles)], label=f"{name} mean")
        ax.set_title(titles[c], fontsize=9)
        ax.set_xlabel("observation coordinate (index)")
        if c % ncols == 0:
            ax.set_ylabel(value_label)
    grid[0, 0].legend(fontsize=7)
    fig.suptitle("Held-out rows and E[y | MAP latents] of each method", fontsize=10)


#: Smallest side of a square observation drawn as an image when no image shape is given: the
#: 8x8 digits are the smallest image data in use; smaller square rows are more likely features.
MIN_IMAGE_SIDE = 8


def image_shape_of(
    num_values: int, *, image_shape: tuple[int, int] | None, detect_images: bool
) -> tuple[int, int] | None:
    """The ``(height, width)`` rows of ``num_values`` are drawn with, or None for profiles.

    Raises
    ------
    ValueError
        If ``image_shape`` does not have ``num_values`` pixels.

    Examples
    --------
    >>> image_shape_of(64, image_shape=None, detect_images=True), image_shape_of(25, image_shape=None, detect_images=True)
    ((8, 8), None)
    """
    if image_shape is not None:
        h, w = (int(v) for v in image_shape)
        if h < 1 or w < 1 or h * w != num_values:
            raise ValueError(
                f"image_shape {tuple(image_shape)} has {h * w} pixels; the observations have "
                f"{num_values} values per row"
            )
        return h, w
    side = math.isqrt(num_values)
    if detect_images and side * side == num_values and side >= MIN_IMAGE_SIDE:
        return side, side
    return None


def key_figure(
    comparison,
    *,
    reference: str = "deq",
    image_shape: tuple[int, int] | None = None,
    detect_images: bool = True,
    num_reconstructed: int = 6,
) -> Figure:
    """The report's main panel: what a reader should see first.

    Top row: convergence of the joint fits, held-out latents of every method against the
    reference method's (dim 0), wall times with ratios to ``reference``. Bottom row, when the
    comparison carries labels or its model and held-out data: ``reference``'s held-out latents
    coloured by label, and held-out rows next to each method's reconstruction.

    Parameters
    ----------
    comparison
        A :class:`deqppl.harness.Comparison`.
    reference
        Method timings are divided by, and whose latent space is drawn (default ``"deq"``).
    image_shape, detect_images, num_reconstructed
        As in :func:`deqppl.report.write_report`.
    """
    latents = comparison.latents
    latent_reference = getattr(comparison, "reference", "") or reference
    if latent_reference not in latents:
        latent_reference = reference
    labels = getattr(comparison, "heldout_labels", None)
    space = labels is not None and (reference in latents or latent_reference in latents)
    recon = reconstruct(comparison)
    bottom_row = space or recon is not None
    fig = Figure(figsize=(15, 8.6 if bottom_row else 4.2), layout="constrained")
    if bottom_row:
        top, bottom = fig.subfigures(2, 1, height_ratios=[1.0, 1.05])
    else:
        top = fig
    axes = top.subplots(1, 3)
    _draw_traces(axes[0], comparison.traces)
    if latent_reference in latents:
        _draw_latents(axes[1], latents, latent_reference, 0)
    _draw_timing(axes[2], comparison.table, reference)
    top.suptitle(f"MAP by DEQ vs SVI vs L-BFGS\n{comparison.model_name}", fontsize=10)
    if bottom_row:
        left, right = bottom.subfigures(1, 2, width_ratios=[1.0, 1.6])
        if space:
            shown = reference if reference in latents else latent_reference
            lab = _as_numpy(labels).astype(np.int64).ravel()
            _draw_latent_space(left, {shown: latents[shown]}, lab, shown, [shown])
        if recon is not None:
            y = _as_numpy(recon.original)
            d = y.reshape(y.shape[0], -1).shape[1]
            shape = image_shape_of(d, image_shape=image_shape, detect_images=detect_images)
            titles = None if labels is None else [f"label {int(v)}" for v in labels.tolist()]
            _draw_reconstructions(
                right, y, recon.means, shape, min(num_reconstructed, y.shape[0]),
                f"{recon.site} and E[{recon.site} | latents] [data units]", titles,
            )
    return fig
