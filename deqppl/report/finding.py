r"""The report's opening paragraph, written from the comparison's table.

Every number in the paragraph is a :class:`Number` that remembers the table cell it came from
(source, method or model, stage, metric), so the HTML page can tag it and a test can check it
against the table; the words around the numbers depend only on which methods converged, failed or
were compared.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from deqppl.report.reconstruct import latent_matrix
from deqppl.report.tables import format_value, stage_means

__all__ = ["FINDING_DIGITS", "Number", "finding", "finding_html", "finding_markdown"]

#: Significant digits of the numbers in the paragraph: prose needs fewer than the tables.
FINDING_DIGITS = 3

#: Model-comparison scores the paragraph names the best model by, in order of preference: the
#: held-out evidence is the proper predictive score (see deqppl.harness.model_comparison).
_MODEL_SCORES = (
    ("heldout_log_marginal", "heldout_log_marginal_se"),
    ("elpd_loo", "elpd_loo_se"),
    ("heldout_log_lik", "heldout_log_lik_se"),
)


@dataclass(frozen=True, kw_only=True)
class Number:
    """One number of the paragraph and the table cell it was read from.

    Parameters
    ----------
    value
        The cell's value.
    source
        ``"methods"`` (``Comparison.table``, mean over seeds), ``"models"``
        (``ModelComparison.table``) or ``"data"`` (a count of the data).
    key
        Method or model name (row of the table), or the data item counted.
    metric
        Column (metric) name.
    stage
        Stage of the comparison (``"fit"``, ``"heldout"``), None outside ``"methods"``.
    """

    value: float
    source: str
    key: str
    metric: str
    stage: str | None = None

    @property
    def text(self) -> str:
        """The value as printed, :data:`FINDING_DIGITS` significant digits."""
        return format_value(self.value, digits=FINDING_DIGITS)


Part = str | Number


def _join(items: Sequence[list[Part]], last: str = "and") -> list[Part]:
    out: list[Part] = []
    for k, item in enumerate(items):
        if k:
            out.append(f" {last} " if k == len(items) - 1 else ", ")
        out.extend(item)
    return out


def _num_rows(latents: Mapping[str, object]) -> int | None:
    for value in latents.values():
        return int(latent_matrix(value).shape[0])
    return None


def finding(
    comparison, *, time_reference: str, model_comparison: pd.DataFrame | None = None
) -> list[Part]:
    """The paragraph as text pieces and :class:`Number` s, from ``comparison``'s table.

    Parameters
    ----------
    comparison
        A :class:`deqppl.harness.Comparison`.
    time_reference
        Method the time ratios are stated against (the DEQ); when absent or without
        ``time_ratio_vs_deq`` rows, wall times are stated in seconds for every method.
    model_comparison
        Optional model-comparison frame indexed by model (see
        :func:`deqppl.report.model_comparison_frame`): adds the best model by held-out score.

    Returns
    -------
    list
        Strings and :class:`Number` objects, in reading order.
    """
    means = stage_means(comparison.table)
    methods = [str(m) for m in comparison.summary.index if str(m) in means.columns]
    # Methods that inferred latents; other rows (the plain-PCA baseline) are baselines.
    compared = [m for m in methods if m in comparison.latents]
    baselines = [m for m in methods if m not in comparison.latents]
    reference = comparison.reference if getattr(comparison, "reference", "") in compared else None
    if reference is None:
        dz = means.loc[("heldout", "max_abs_dz")] if ("heldout", "max_abs_dz") in means.index else None
        zero = [m for m in compared if dz is not None and dz.get(m) == 0.0]
        reference = zero[0] if zero else (compared[0] if compared else None)

    def num(method: str, stage: str, metric: str) -> Number | None:
        if (stage, metric) not in means.index or method not in means.columns:
            return None
        value = means.loc[(stage, metric), method]
        if pd.isna(value):
            return None
        return Number(value=float(value), source="methods", key=method, metric=metric, stage=stage)

    parts: list[Part] = []
    n = _num_rows(comparison.latents)
    others = [m for m in compared if m != reference]
    source = next(iter(getattr(comparison, "globals_source", {}).values()), None)
    # 1. Agreement of the held-out latents.
    if reference is not None:
        parts.append("With the globals ")
        parts.append(f"of {source}'s joint fit " if source else "of the best joint fit ")
        parts.append("held fixed, the latents of the ")
        if n is not None:
            parts.append(Number(value=float(n), source="data", key="heldout", metric="num_rows"))
            parts.append(" ")
        parts.append("held-out rows ")
        dz = [(m, num(m, "heldout", "max_abs_dz")) for m in others]
        dz = [[x, f" for {m}"] for m, x in dz if x is not None]
        if dz:
            parts += [f"agree with {reference}'s (the reference): max |Δz| = "]
            parts += _join(dz)
            parts.append(" (latent units)")
        else:
            parts.append(f"were inferred by {reference} only")
        gaps = [(m, num(m, "heldout", "log_joint_gap")) for m in compared]
        gaps = [(m, x) for m, x in gaps if x is not None]
        if gaps:
            worst, gap = max(gaps, key=lambda mx: mx[1].value)
            parts += ["; the largest held-out log-joint gap to the best method is ", gap,
                      f" nats ({worst})"]
        parts.append(". ")
    # 2. Time.
    ratios = [(m, num(m, "heldout", "time_ratio_vs_deq")) for m in compared]
    # The ratios are over the DEQ's wall time (its own ratio is exactly 1): state that method's
    # seconds, whatever reference the latents were compared against.
    deq = next((m for m, x in ratios if x is not None and x.value == 1.0), None)
    time_reference = deq if deq is not None else time_reference
    has_ratio = time_reference in compared and any(x is not None for m, x in ratios if m != time_reference)
    for stage, what in (("heldout", "Inferring the held-out latents"), ("fit", "Fitting the globals")):
        base = num(time_reference, stage, "wall_time") if has_ratio else None
        if base is not None:
            parts += [f"{what} took {time_reference} ", base, " s"]
            items = [[f"{m} ", x, "×"] for m in compared if m != time_reference
                     for x in [num(m, stage, "time_ratio_vs_deq")] if x is not None]
            if items:
                parts.append(", ")
                parts += _join(items)
                parts.append(" as long")
            parts.append(". ")
        else:
            items = [[f"{m} ", x, " s"] for m in compared for x in [num(m, stage, "wall_time")]
                     if x is not None]
            if items:
                parts += [f"{what} took "] + _join(items) + [". "]
    # 3. Convergence.
    stopped = []
    for m in compared:
        stages: list[list[Part]] = []
        for stage in ("fit", "heldout"):
            conv = num(m, stage, "converged")
            if conv is None or conv.value >= 1.0:
                continue
            item: list[Part] = [f"{'held-out' if stage == 'heldout' else 'fit'}: "]
            if conv.value > 0.0:
                item += ["converged in a fraction ", conv, " of seeds, "]
            steps = num(m, stage, "num_steps")
            item += ["stopped after ", steps, " steps"] if steps is not None else ["stopped"]
            stages.append(item)
        if stages:
            item = [f"{m} ("]
            for k, stage_item in enumerate(stages):
                item += (["; "] if k else []) + stage_item
            stopped.append(item + [")"])
    if stopped:
        parts.append("Not converged (stopped by the step budget, not by the stopping criterion): ")
        parts += _join(stopped)
        parts.append("; every other stage converged. ")
    elif compared:
        parts.append("Every method met its own stopping criterion in both stages. ")
    rows_failed = []
    for m in compared:
        for stage in ("fit", "heldout"):
            frac = num(m, stage, "fraction_converged")
            if frac is not None and frac.value < 1.0:
                rows_failed.append([f"{m} ({stage}: a fraction ", frac, " of rows)"])
    if rows_failed:
        parts.append("Row-wise fixed-point solves within tolerance: ")
        parts += _join(rows_failed)
        parts.append(". ")
    # 4. Failures: non-finite results.
    failed = []
    for m in compared:
        bad = [
            metric for metric in ("log_joint", "heldout_log_lik")
            if ("heldout", metric) in means.index
            and not math.isfinite(float(means.loc[("heldout", metric), m]))
        ]
        if not bool(np.isfinite(latent_matrix(comparison.latents[m])).all()):
            bad.append("latents")
        if bad:
            failed.append([f"{m} (non-finite held-out {', '.join(bad)})"])
    if failed:
        parts.append("Failures: ")
        parts += _join(failed)
        parts.append(". ")
    else:
        parts.append("No method returned a non-finite result. ")
    # 5. Downstream accuracy.
    acc = [[x, f" ({m})"] for m in compared for x in [num(m, "heldout", "accuracy")] if x is not None]
    if acc:
        parts.append("A logistic regression on the latents classifies the held-out rows with accuracy ")
        parts += _join(acc)
        for m in baselines:
            x = num(m, "heldout", "accuracy")
            if x is not None:
                parts += [f"; the {m} baseline reaches ", x]
        parts.append(". ")
    # 6. Model comparison.
    if model_comparison is not None and len(model_comparison):
        for value, se in _MODEL_SCORES:
            if value not in model_comparison.columns or not model_comparison[value].notna().any():
                continue
            best = model_comparison[value].astype(float).idxmax()
            parts += [
                f"Of the {len(model_comparison)} models compared, {best} has the highest {value}, ",
                Number(value=float(model_comparison.loc[best, value]), source="models", key=str(best),
                       metric=value),
            ]
            if se is not None and se in model_comparison.columns and pd.notna(model_comparison.loc[best, se]):
                parts += [" ± ", Number(value=float(model_comparison.loc[best, se]), source="models",
                                        key=str(best), metric=se)]
            parts.append(" nats")
            if "family" in model_comparison.columns and model_comparison["family"].nunique() > 1:
                # A density and a probability mass differ in base measure (model comparison
                # section of the report): say so where the ranking is stated.
                parts.append(" (families of different supports are not comparable)")
            parts.append(". ")
            break
    return parts


def finding_markdown(parts: Sequence[Part]) -> str:
    """The paragraph as plain text (Markdown).

    Examples
    --------
    >>> finding_markdown(["took ", Number(value=0.00559, source="methods", key="deq",
    ...                                   metric="wall_time", stage="heldout"), " s."])
    'took 0.00559 s.'
    """
    return "".join(p.text if isinstance(p, Number) else p for p in parts).strip()


def finding_html(parts: Sequence[Part]) -> str:
    """The paragraph as HTML; each number is a ``<span class="num">`` naming its table cell.

    Examples
    --------
    >>> finding_html([Number(value=2.0, source="methods", key="svi", metric="wall_time",
    ...                      stage="fit")])
    '<span class="num" data-source="methods" data-key="svi" data-stage="fit" data-metric="wall_time">2</span>'
    """
    out = []
    for p in parts:
        if isinstance(p, Number):
            stage = "" if p.stage is None else f' data-stage="{html.escape(p.stage)}"'
            out.append(
                f'<span class="num" data-source="{html.escape(p.source)}" '
                f'data-key="{html.escape(p.key)}"{stage} data-metric="{html.escape(p.metric)}">'
                f"{html.escape(p.text)}</span>"
            )
        else:
            out.append(html.escape(p))
    return "".join(out).strip()
