"""The rendered book: built from the cached executions, opened in headless Chromium, figures drawn."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ftbook import run

JOBS = int(os.environ.get("FTBOOK_TEST_JOBS", "2"))
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


def _browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if os.environ.get("FTBOOK_REQUIRE_BROWSER") == "1":
        pytest.fail("no Chromium found; install Debian's `chromium` (CI does)")
    pytest.skip("no Chromium on this machine (apt-get install chromium)")


@pytest.fixture(scope="module")
def html():
    return run.build_book(profile="cpu", seed=0, jobs=JOBS)


def test_every_page_is_rendered(html):
    for page in ["index.html", "setup.html", "results.html"] + \
            [f"chapters/{p.stem}.html" for p in run.all_chapters()]:
        assert (html / page).exists(), page
    results = (html / "results.html").read_text()
    assert "Verdicts by run" in results and "holds" in results


@pytest.mark.parametrize("chapter", [p.stem for p in run.all_chapters()])
def test_figures_are_drawn_in_a_real_browser(html, chapter, tmp_path):
    browser = _browser()
    page = html / "chapters" / f"{chapter}.html"
    expected = page.read_text().count('class="plotly-graph-div')
    assert expected > 0, "the page holds no plotly figure"
    common = BROWSER_FLAGS + [f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000"]
    dom = subprocess.run([browser, *common, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=180).stdout
    # plotly replaces each empty div with an SVG scene when (and only when) its script ran
    drawn = len(re.findall(r'<svg[^>]*class="main-svg"', dom)) // 2  # plotly draws two main-svg layers
    assert drawn >= expected, f"{drawn} of {expected} figures drawn"
    shot = tmp_path / "page.png"
    subprocess.run([browser, *common, "--window-size=1280,2400", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=180)
    assert shot.exists() and shot.stat().st_size > 50_000, "the screenshot is blank"
    keep = os.environ.get("FTBOOK_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, Path(keep) / f"{chapter}.png")
