"""write_report: a valid, self-contained HTML page whose table shows the DataFrame's numbers."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

from deqppl.report import format_value, model_comparison_frame, table_markdown, write_report
from deqppl.report.tables import SIGNIFICANT_DIGITS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}


class StrictParser(HTMLParser):
    """Checks nesting and collects images, references and table cells."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.images: list[str] = []
        self.references: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("src", "href"):
            if key in attrs:
                self.references.append(attrs[key])
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag == "table":
            self._table = attrs.get("id", "")
            self.tables[self._table] = []
        if tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        if tag in ("td", "th"):
            self._cell = []
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

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


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
    assert all(ref.startswith("data:image/png;base64,") for ref in parser.references)
    for src in parser.images:
        assert base64.b64decode(src.split(",", 1)[1], validate=True).startswith(PNG_SIGNATURE)
    return parser


def check_table_matches(rows: list[list[str]], summary: pd.DataFrame) -> None:
    header, body = rows[0], rows[1:]
    frame = summary.set_index("method") if "method" in summary.columns else summary
    assert header == [str(frame.index.name or "index")] + [str(c) for c in frame.columns]
    assert [r[0] for r in body] == [str(i) for i in frame.index]
    shown = 0
    for r, (_, expected) in zip(body, frame.iterrows(), strict=True):
        for cell, value in zip(r[1:], expected.tolist(), strict=True):
            if pd.isna(value):
                assert cell == "—"
                continue
            # The cell is value printed with SIGNIFICANT_DIGITS significant digits, so it
            # agrees with the DataFrame to half a unit in the last printed digit.
            tol = 0.5 * 10.0 ** (np.floor(np.log10(abs(value))) - SIGNIFICANT_DIGITS + 1) if value else 0.0
            assert abs(float(cell) - value) <= tol * (1 + 1e-12), (cell, value)
            shown += 1
    assert shown >= frame.size // 2


def test_html_is_valid_and_self_contained(comparison, tmp_path):
    paths = write_report(comparison, tmp_path, title="Tiny <test> & report")
    parser = check_page(paths["html"].read_text(encoding="utf-8"))
    assert len(parser.images) == 3  # traces, latents, timing
    check_table_matches(parser.tables["summary"], comparison.summary)


def test_markdown_and_png_files(comparison, tmp_path):
    paths = write_report(comparison, tmp_path)
    text = paths["markdown"].read_text(encoding="utf-8")
    for key in ("traces", "latents", "timing"):
        assert paths[key].read_bytes().startswith(PNG_SIGNATURE)
        assert f"]({key}.png)" in text
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    rows = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines]
    check_table_matches(rows[: len(comparison.summary) + 1], comparison.summary)
    assert table_markdown(comparison.summary) in text


def test_model_comparison_section(comparison, tmp_path):
    mc = pd.DataFrame(
        {"model": ["pca_l2", "pca_l5"], "elpd_loo": [-1000.25, -950.125], "elpd_loo_se": [12.5, 11.0]}
    )
    paths = write_report(comparison, tmp_path, model_comparison=mc)
    parser = check_page(paths["html"].read_text(encoding="utf-8"))
    assert len(parser.images) == 4
    assert paths["model_comparison"].read_bytes().startswith(PNG_SIGNATURE)
    rows = parser.tables["model-comparison"]
    assert rows[0] == ["model", "elpd_loo", "elpd_loo_se"]
    assert [float(c) for c in rows[2][1:]] == [-950.1, 11.0]


def test_model_comparison_without_score_names_columns():
    with pytest.raises(ValueError, match=r"need one of .*heldout_log_lik.*elpd_loo"):
        model_comparison_frame(pd.DataFrame({"model": ["a"], "rmse": [1.0]}))


@pytest.mark.parametrize(
    ("value", "text"),
    [(1234.5678, "1235"), (-0.000123456, "-0.0001235"), (float("nan"), "—"), (3, "3"), ("svi", "svi")],
    ids=["large", "small", "nan", "int", "text"],
)
def test_format_value(value, text):
    assert format_value(value) == text


@pytest.fixture(scope="module")
def real_comparison():
    """A Comparison from the real harness on tiny simulated data (labels add the pca row)."""
    import torch

    from deqppl.expfam import family
    from deqppl.harness import DEQMethod, LBFGSMethod, SVIMethod, compare
    from deqppl.models import ExpFamPCA

    model = ExpFamPCA(family=family("poisson"), obs_dim=5, latent_dim=2)
    y = model.simulate(40, seed=0, dtype=torch.float64).data["y"]
    labels = (y[:, 0] > y[:, 0].median()).long()
    methods = [DEQMethod(num_epochs=20), SVIMethod(max_steps=300), LBFGSMethod(max_steps=100)]
    return compare(model, y, methods=methods, labels=labels, progress=False)


@pytest.mark.slow
def test_report_of_real_comparison(real_comparison, tmp_path):
    paths = write_report(real_comparison, tmp_path)
    parser = check_page(paths["html"].read_text(encoding="utf-8"))
    assert len(parser.images) == 3
    check_table_matches(parser.tables["summary"], real_comparison.summary)
    assert "pca" in [row[0] for row in parser.tables["summary"][1:]]
