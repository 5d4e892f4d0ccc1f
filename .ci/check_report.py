"""Open an attnbench HTML report in headless Chromium and check that a person would see it whole.

    python .ci/check_report.py runs/smoke/report.html

Passes when the page loads, every plotly figure has drawn all of its shown traces, the browser console has
no error, the page shows text and its verdict names the fastest and the smallest mechanism; prints what it
saw. Needs selenium (the ``browser`` extra) and Debian's
chromium and chromium-driver. Used by ``nox -s smoke``.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

TIMEOUT_S = 90.0
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--window-size=1400,1000")
COUNT_PLOTS = "return document.querySelectorAll('.plotly-graph-div').length"
# A figure is drawn when plotly has laid it out and its SVG holds one group per shown trace (a trace listed
# only in the legend, visible='legendonly', is drawn when clicked).
COUNT_DRAWN = (
    "return Array.from(document.querySelectorAll('.plotly-graph-div')).filter(d => d._fullLayout !== undefined"
    " && d.data.length > 0 && d.querySelectorAll('svg.main-svg .trace').length >="
    " d.data.filter(t => t.visible !== 'legendonly').length).length"
)
# The verdict: the first section, naming the fastest and the smallest mechanism.
VERDICT = "const s = document.querySelector('section#verdict'); return s ? s.innerText : ''"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python .ci/check_report.py REPORT.html", file=sys.stderr)
        return 2
    page = Path(argv[0]).resolve()
    if not page.is_file():
        print(f"error: no report at {page}; write one with attnbench report RUN --out {argv[0]}", file=sys.stderr)
        return 2
    binary = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        print(
            "error: the browser check needs Chromium and its driver on PATH "
            "(Debian: apt-get install -y chromium chromium-driver)",
            file=sys.stderr,
        )
        return 2
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = binary
    for flag in FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(page.as_uri())
        deadline = time.monotonic() + TIMEOUT_S
        plots, drawn = 0, -1
        while time.monotonic() < deadline:
            # counted again each time: the figures' divs are made by scripts that may still be running
            plots = driver.execute_script(COUNT_PLOTS)
            drawn = driver.execute_script(COUNT_DRAWN)
            if plots > 0 and drawn == plots:
                break
            time.sleep(0.25)
        errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        words = len(driver.execute_script("return document.body.innerText").split())
        verdict = driver.execute_script(VERDICT)
        title = driver.title
    finally:
        driver.quit()
    problems = []
    if plots == 0:
        problems.append("the page has no plot")
    if drawn != plots:
        problems.append(f"{drawn} of {plots} plots drew all their traces within {TIMEOUT_S:g} s")
    if errors:
        problems.append(f"console errors: {errors}")
    if words < 50:
        problems.append(f"the page shows only {words} words of text")
    if "fastest" not in verdict or "smallest" not in verdict:
        problems.append("the page has no verdict naming the fastest and the smallest mechanism")
    print(f"{page.name}: '{title}', {plots} plots ({drawn} drawn), {words} words, {len(errors)} console errors")
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
