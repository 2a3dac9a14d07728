"""Looking at rankmesh's pages as a person does: Debian's Chromium, driven by playwright."""

import shutil
from pathlib import Path

import pytest


def chromium_path() -> str:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Debian's chromium is not installed (scripts/install.sh installs it)")
    return chromium


def read_report(report: Path, screenshot: Path | None = None) -> dict[str, object]:
    """What a report file shows once its script ran: its worker and prefix rows, the
    task stream's bars and the memory chart's lines."""
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(report.resolve().as_uri())
        page.wait_for_selector("#stream[data-bars]")
        seen = {
            "errors": errors,
            "workers": [
                row.get_attribute("data-worker") for row in page.query_selector_all("tr.worker")
            ],
            "prefixes": [
                row.get_attribute("data-prefix") for row in page.query_selector_all("tr.prefix")
            ],
            "bars": int(page.get_attribute("#stream", "data-bars")),
            "lines": int(page.get_attribute("#memory", "data-lines")),
            "moved": page.inner_text("#moved"),
            "stream_legend": page.inner_text("#stream-legend"),
        }
        if screenshot is not None:
            page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    return seen
