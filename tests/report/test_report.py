"""write_report on real comparisons: a valid, self-contained page whose words and tables are the table's."""

from __future__ import annotations

import base64
import dataclasses
import math
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch

from deqppl.report import (
    METRICS,
    MODEL_METRICS,
    finding,
    finding_markdown,
    format_value,
    model_comparison_frame,
    observation_mean,
    table_markdown,
    write_report,
)
from deqppl.report.finding import FINDING_DIGITS
from deqppl.report.tables import SIGNIFICANT_DIGITS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}
#: Figures of a comparison with labels and image data.
DIGITS_FIGURES = ("traces", "latents", "latent_space", "reconstructions", "timing")


class StrictParser(HTMLParser):
    """Checks nesting and collects images, references, table cells and the finding's numbers."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.images: list[str] = []
        self.references: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.numbers: list[tuple[dict[str, str], str]] = []
        self.finding: list[str] | None = None
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._number: dict[str, str] | None = None
        self._number_text: list[str] = []
        self._in_finding = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("src", "href"):
            if key in attrs:
                self.references.append(attrs[key])
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag == "table":
            self._table = attrs.get("id", "")
            assert self._table not in self.tables, f"duplicate table id {self._table}"
            self.tables[self._table] = []
        if tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        if tag in ("td", "th"):
            self._cell = []
        if tag == "p" and attrs.get("id") == "finding":
            self._in_finding, self.finding = True, []
        if tag == "span" and attrs.get("class") == "num":
            self._number, self._number_text = attrs, []
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        if tag == "table":
            self._table = None
        if tag == "span" and self._number is not None:
            self.numbers.append((self._number, "".join(self._number_text)))
            self._number = None
        if tag == "p" and self._in_finding:
            self._in_finding = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._number is not None:
            self._number_text.append(data)
        if self._in_finding:
            self.finding.append(data)


def parse(text: str) -> StrictParser:
    parser = StrictParser()
    parser.feed(text)
    parser.close()
    return parser


def check_page(html_text: str) -> StrictParser:
    parser = parse(html_text)
    assert parser.errors == []
    assert parser.stack == [], f"unclosed tags {parser.stack}"
    assert html_text.startswith("<!DOCTYPE html>")
    assert not re.search(r"https?://", html_text), "the report must not reference the network"
    assert "<script" not in html_text
    assert all(ref.startswith("data:image/png;base64,") for ref in parser.references)
    for src in parser.images:
        assert base64.b64decode(src.split(",", 1)[1], validate=True).startswith(PNG_SIGNATURE)
    return parser


def printed_equal(text: str, value: float, digits: int) -> bool:
    """``text`` is ``value`` printed with ``digits`` significant digits (half a unit in the last)."""
    if pd.isna(value):
        return text == "—"
    shown = float(text)
    tol = 0.5 * 10.0 ** (math.floor(math.log10(abs(value))) - digits + 1) if value else 0.0
    return abs(shown - value) <= tol * (1 + 1e-12)


def means_by_stage(table: pd.DataFrame) -> dict[tuple[str, str, str], float]:
    """(method, stage, metric) -> mean over seeds, computed here independently of the report."""
    grouped = table.groupby(["method", "stage", "metric"])["value"].mean()
    return {key: float(v) for key, v in grouped.items()}


def method_table_cells(parser: StrictParser, methods: list[str]) -> dict[tuple[str, str, str], str]:
    """(method, stage, metric) -> printed cell, from every method table of the page."""
    cells = {}
    for table_id, rows in parser.tables.items():
        if table_id.startswith(("glossary", "model-comparison")):
            continue
        header, body = rows[0], rows[1:]
        assert header[:3] == ["metric", "stage", "unit"], (table_id, header)
        assert set(header[3:]) <= set(methods), (table_id, header)
        for row in body:
            for method, cell in zip(header[3:], row[3:], strict=True):
                key = (method, row[1], row[0])
                assert key not in cells, f"{key} shown twice"
                cells[key] = cell
    return cells


@pytest.fixture(scope="module")
def digits_page(digits_report):
    return digits_report, check_page(digits_report["html"].read_text(encoding="utf-8"))


def test_page_has_every_figure(digits_page):
    paths, parser = digits_page
    assert len(parser.images) == len(DIGITS_FIGURES) + 1  # + the model comparison
    for key in (*DIGITS_FIGURES, "model_comparison"):
        assert paths[key].read_bytes().startswith(PNG_SIGNATURE)
    assert "Tiny &lt;test&gt; &amp; report" in paths["html"].read_text(encoding="utf-8")


def test_tables_show_every_metric_of_the_table(digits_comparison, digits_page):
    _, parser = digits_page
    methods = [str(m) for m in digits_comparison.summary.index]
    cells = method_table_cells(parser, methods)
    expected = {k: v for k, v in means_by_stage(digits_comparison.table).items() if not math.isnan(v)}
    assert set(expected) <= set(cells)
    for key, value in expected.items():
        assert printed_equal(cells[key], value, SIGNIFICANT_DIGITS), (key, cells[key], value)
    # The summary's columns are the held-out metrics plus the fit time: all shown.
    for method, row in digits_comparison.summary.iterrows():
        for column, value in row.items():
            key = (method, "fit", "wall_time") if column == "fit_wall_time" else (method, "heldout", column)
            if not pd.isna(value):
                assert printed_equal(cells[key], float(value), SIGNIFICANT_DIGITS), (key, value)


def test_tables_are_narrow(digits_comparison, digits_page):
    _, parser = digits_page
    # metric, stage, unit and one column per method: the width does not grow with the metrics.
    widest = 3 + len(digits_comparison.summary.index)
    for table_id, rows in parser.tables.items():
        assert max(len(r) for r in rows) <= max(widest, 6), table_id
    assert len([t for t in parser.tables if not t.startswith(("glossary", "model"))]) >= 4


def check_finding_numbers(parser: StrictParser, comparison, models: pd.DataFrame | None = None) -> list:
    means = means_by_stage(comparison.table)
    checked = []
    for attrs, text in parser.numbers:
        source = attrs["data-source"]
        if source == "methods":
            value = means[(attrs["data-key"], attrs["data-stage"], attrs["data-metric"])]
        elif source == "models":
            value = float(models.loc[attrs["data-key"], attrs["data-metric"]])
        else:
            assert (source, attrs["data-metric"]) == ("data", "num_rows")
            value = float(next(iter(comparison.heldout_data.values())).shape[0])
        assert printed_equal(text, value, FINDING_DIGITS), (attrs, text, value)
        checked.append((source, attrs.get("data-key"), attrs.get("data-stage"), attrs["data-metric"]))
    return checked


def test_finding_numbers_are_the_table(digits_comparison, digits_models, digits_page):
    paths, parser = digits_page
    checked = check_finding_numbers(parser, digits_comparison, model_comparison_frame(digits_models)[0])
    reference = digits_comparison.reference
    methods = list(digits_comparison.latents)
    # Agreement of every other method, time ratio of every non-DEQ method in both stages,
    # the DEQ's times, and the accuracy of every method are stated.
    for m in methods:
        if m != reference:
            assert ("methods", m, "heldout", "max_abs_dz") in checked
        for stage in ("fit", "heldout"):
            metric = "wall_time" if m == "deq" else "time_ratio_vs_deq"
            assert ("methods", m, stage, metric) in checked
        assert ("methods", m, "heldout", "accuracy") in checked
    assert ("methods", "pca", "heldout", "accuracy") in checked
    # Every stage that did not converge is named with its number of steps.
    means = means_by_stage(digits_comparison.table)
    stopped = [(m, s) for m in methods for s in ("fit", "heldout") if means[(m, s, "converged")] < 1]
    assert stopped, "the small budgets of the fixture should leave some fit unconverged"
    for m, stage in stopped:
        assert ("methods", m, stage, "num_steps") in checked
    assert any(c[0] == "models" for c in checked)
    # The Markdown paragraph is the same text.
    text = re.sub(r"\s+", " ", "".join(parser.finding)).strip()
    markdown = paths["markdown"].read_text(encoding="utf-8")
    assert text in markdown


def test_finding_names_a_failed_method(digits_comparison):
    bad = {**digits_comparison.latents, "svi": torch.full_like(digits_comparison.latents["svi"], math.nan)}
    table = digits_comparison.table.copy()
    rows = (table["method"] == "svi") & (table["stage"] == "heldout") & table["metric"].isin(["log_joint"])
    table.loc[rows, "value"] = math.nan
    broken = dataclasses.replace(digits_comparison, latents=bad, table=table)
    text = finding_markdown(finding(broken, time_reference="deq"))
    assert "Failures: svi (non-finite held-out log_joint, latents)" in text
    assert "No method returned a non-finite result" not in text
    good = finding_markdown(finding(digits_comparison, time_reference="deq"))
    assert "No method returned a non-finite result" in good


def test_finding_without_a_deq_states_seconds(digits_comparison):
    table = digits_comparison.table
    table = table[(table["method"] != "deq") & (table["metric"] != "time_ratio_vs_deq")]
    latents = {k: v for k, v in digits_comparison.latents.items() if k != "deq"}
    summary = digits_comparison.summary.drop(index="deq")
    other = dataclasses.replace(digits_comparison, table=table, latents=latents, summary=summary)
    text = finding_markdown(finding(other, time_reference="deq"))
    assert "Inferring the held-out latents took svi " in text and "×" not in text


def test_finding_states_the_deq_seconds_its_ratios_divide_by(digits_comparison):
    """The ratios are over the DEQ's time: asked for another reference (the CLI passes the
    latents' reference, L-BFGS), the paragraph must still state the DEQ's seconds, never
    "lbfgs 0.13 s, deq 1×"."""
    text = finding_markdown(finding(digits_comparison, time_reference="lbfgs"))
    assert "Inferring the held-out latents took deq " in text and "deq 1×" not in text


def test_glossary_covers_every_metric_shown(digits_comparison, digits_page):
    _, parser = digits_page
    shown = {row[0] for t, rows in parser.tables.items() if not t.startswith(("glossary", "model"))
             for row in rows[1:]}
    glossary = {row[0]: row for row in parser.tables["glossary"][1:]}
    assert set(glossary) == shown
    # Every metric the harness produces has a registered unit and description.
    assert set(digits_comparison.table["metric"]) <= set(METRICS)
    for name, (_, unit, meaning) in glossary.items():
        assert meaning == METRICS[name].description and unit == METRICS[name].unit
    model_glossary = {row[0] for row in parser.tables["glossary-models"][1:]}
    model_columns = {c for t, rows in parser.tables.items() if t.startswith("model") for c in rows[0][1:]}
    assert model_glossary == model_columns and model_columns <= set(MODEL_METRICS)


def test_model_comparison_tables(digits_models, digits_page):
    _, parser = digits_page
    frame, scores = model_comparison_frame(digits_models)
    rows = parser.tables["model-comparison"]
    header = rows[0]
    assert header[:3] == ["model", "family", "latent_dim"]
    assert header[3:] == [v for v, _ in scores]
    assert [r[0] for r in rows[1:]] == list(frame.index)
    for row in rows[1:]:
        for (value, se), cell in zip(scores, row[3:], strict=True):
            shown, shown_se = cell.split(" ± ")
            assert printed_equal(shown, frame.loc[row[0], value], SIGNIFICANT_DIGITS)
            assert printed_equal(shown_se, frame.loc[row[0], se], SIGNIFICANT_DIGITS)
    assert "model-comparison-2" in parser.tables  # PSIS-LOO diagnostics


def test_markdown_and_png_files(digits_comparison, tmp_path):
    paths = write_report(digits_comparison, tmp_path)
    text = paths["markdown"].read_text(encoding="utf-8")
    for key in DIGITS_FIGURES:
        assert paths[key].read_bytes().startswith(PNG_SIGNATURE)
        assert f"]({key}.png)" in text
    assert "## Glossary" in text and "## Finding" in text
    assert "model_comparison" not in paths


def test_report_without_labels_or_images(poisson_comparison, tmp_path):
    paths = write_report(poisson_comparison, tmp_path)
    parser = check_page(paths["html"].read_text(encoding="utf-8"))
    assert "latent_space" not in paths  # no labels
    assert {"traces", "latents", "reconstructions", "timing"} <= set(paths)
    assert len(parser.images) == 4
    check_finding_numbers(parser, poisson_comparison)
    with pytest.raises(ValueError, match=r"image_shape \(2, 3\) has 6 pixels; the observations have 5"):
        write_report(poisson_comparison, tmp_path / "bad", image_shape=(2, 3))
    assert not (tmp_path / "bad").exists()  # checked before any work
    with pytest.raises(ValueError, match="num_reconstructed must be a positive integer, got 0"):
        write_report(poisson_comparison, tmp_path, num_reconstructed=0)


def test_reconstruction_is_the_models_mean(digits_comparison):
    # Oracle: Binomial(16) PCA with the identity nonlinearity has E[y | z] = 16 sigmoid(z W^T + B).
    g = digits_comparison.shared_globals
    z = digits_comparison.latents["lbfgs"]
    mean = observation_mean(digits_comparison.model, digits_comparison.heldout_data, {**g, "z": z})
    expected = 16.0 * torch.sigmoid(z @ g["W"].T + g["B"])
    torch.testing.assert_close(mean["y"], expected, rtol=1e-12, atol=1e-12)


def user_model(x, y=None):
    """A model the report has never seen: observation site 'obs', data 'x' and 'y'."""
    a = pyro.sample("a", dist.Normal(0.0, 1.0))
    with pyro.plate("rows", x.shape[0]):
        u = pyro.sample("u", dist.Normal(0.0, 1.0))
        return pyro.sample("obs", dist.Normal(a * x + u, 0.5), obs=y)


def test_reconstruction_of_a_user_model():
    x = torch.linspace(0.0, 1.0, 5, dtype=torch.float64)
    u = torch.arange(5, dtype=torch.float64)
    values = {"a": torch.tensor(2.0, dtype=torch.float64), "u": u}
    mean = observation_mean(user_model, {"x": x, "y": torch.zeros(5, dtype=torch.float64)}, values)
    torch.testing.assert_close(mean["obs"], 2.0 * x + u, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"no observed site besides the conditioned"):
        observation_mean(user_model, {"x": x}, values)


def test_model_comparison_without_score_names_columns():
    with pytest.raises(ValueError, match=r"need one of .*heldout_log_lik.*elpd_loo"):
        model_comparison_frame(pd.DataFrame({"model": ["a"], "rmse": [1.0]}))


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1234.5678, "1235"),
        (-21975.27, "-21980"),
        (12345678.0, "1.235e+07"),
        (-0.000123456, "-0.0001235"),
        (float("nan"), "—"),
        (3, "3"),
        ("svi", "svi"),
    ],
    ids=["large", "sum-of-logs", "huge", "small", "nan", "int", "text"],
)
def test_format_value(value, text):
    assert format_value(value) == text


def test_markdown_table_escapes_pipes():
    frame = pd.DataFrame({"model": ["a|b"], "x": [np.float64(0.5)]})
    assert table_markdown(frame).splitlines()[-1] == "| a\\|b | 0.5 |"
