"""report.html in a real browser: headless Chromium decodes every image and nothing overflows.

A copy of the page (in a tmp folder; the report itself has no scripts) gets a small script that,
once the page has loaded and its images have been decoded, measures the layout at a 1280 px
viewport and writes the measurements into the DOM as JSON; ``chromium --dump-dom`` returns them.
In CI (``CI`` set, as ``.ci/run`` does) a missing Chromium is a failure, not a skip:
``.ci/run`` installs Debian's ``chromium``.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess

import pytest

# Chromium start-up takes seconds: slow, and still run in CI.
pytestmark = pytest.mark.slow

#: A typical laptop browser window, CSS pixels.
VIEWPORT = (1280, 900)
#: Seconds allowed for one Chromium run (start-up dominates; the page renders in well under 1 s).
TIMEOUT = 120
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

MEASURE = """
<script>
// Measured synchronously in the load handler: every image is a data: URI, so by "load" each is
// complete and has its natural size (or failed to decode). Awaiting img.decode() here let
// --dump-dom run first on a loaded machine (no measurement in the DOM), so it is not used.
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const width = window.innerWidth;
  const result = {
    innerWidth: width,
    scrollWidth: document.documentElement.scrollWidth,
    images: images.map((img) => ({
      alt: img.alt.slice(0, 60), complete: img.complete, naturalWidth: img.naturalWidth,
      naturalHeight: img.naturalHeight, right: img.getBoundingClientRect().right,
    })),
    tables: Array.from(document.querySelectorAll("table")).map((t) => ({
      id: t.id, scrollWidth: t.scrollWidth, right: t.getBoundingClientRect().right,
      containerWidth: t.parentElement.clientWidth,
    })),
  };
  const out = document.createElement("pre");
  out.id = "browser-check";
  out.textContent = JSON.stringify(result);
  document.body.appendChild(out);
});
</script>
"""


def find_browser() -> str:
    for name in (os.environ.get("DEQPPL_CHROMIUM"), *BROWSERS):
        if name and shutil.which(name):
            return shutil.which(name)
    reason = f"no Chromium found (tried {list(BROWSERS)}); .ci/run installs Debian's chromium"
    if os.environ.get("CI"):
        pytest.fail(reason + " — in CI the browser test must run")
    pytest.skip(reason)


def chromium(browser: str, tmp_path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "profile"
    command = [
        browser,
        "--headless",
        "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
        "--disable-gpu",
        "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm
        "--no-first-run",
        "--no-default-browser-check",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}",
        *args,
    ]
    env = {**os.environ, "HOME": str(tmp_path)}  # nothing written outside tmp_path
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=env, check=False)


@pytest.fixture(scope="module")
def measured(digits_report, tmp_path_factory):
    browser = find_browser()
    tmp = tmp_path_factory.mktemp("browser")
    page = digits_report["html"].read_text(encoding="utf-8")
    assert "</body>" in page
    probe = tmp / "report-probe.html"
    probe.write_text(page.replace("</body>", MEASURE + "</body>"), encoding="utf-8")
    run = chromium(
        browser, tmp, "--virtual-time-budget=20000", "--run-all-compositor-stages-before-draw",
        "--dump-dom", probe.as_uri(),
    )
    found = re.search(r'<pre id="browser-check">(.*?)</pre>', run.stdout, flags=re.S)
    assert found, f"no measurement in the dumped DOM (rc {run.returncode}); stderr: {run.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


def test_every_image_decoded(measured, digits_report):
    images = measured["images"]
    expected = [k for k in digits_report if k not in ("html", "markdown")]
    assert len(images) == len(expected)
    for img in images:
        assert img["complete"] and img["naturalWidth"] > 0 and img["naturalHeight"] > 0, img


def test_nothing_overflows_horizontally(measured):
    width = measured["innerWidth"]
    assert width == VIEWPORT[0]
    assert measured["scrollWidth"] <= width
    for img in measured["images"]:
        assert img["right"] <= width, img
    assert len(measured["tables"]) >= 6
    for table in measured["tables"]:
        assert table["right"] <= width, table
        assert table["scrollWidth"] <= table["containerWidth"], table


def test_screenshot(digits_report, tmp_path):
    browser = find_browser()
    shot = tmp_path / "report.png"
    run = chromium(browser, tmp_path, f"--screenshot={shot}", digits_report["html"].as_uri())
    assert shot.exists(), f"no screenshot (rc {run.returncode}); stderr: {run.stderr[-2000:]}"
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == VIEWPORT
