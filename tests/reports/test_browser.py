"""Open generated pages in a real headless Chromium: every plot renders, no console error, no injected script runs.

Needs selenium, a Chromium and its chromedriver (Debian: chromium, chromium-driver);
skipped cleanly where any of them is missing. .ci/run installs them.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from attnbench.reports import build_compare_page, build_report, compare, load_run
from report_fixtures import FIXTURES, row

pytestmark = pytest.mark.browser

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1400,1000",
]


def _browser_paths() -> tuple[str, str] | None:
    binary = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    return (binary, driver) if binary and driver else None


@pytest.fixture(scope="module")
def driver():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    paths = _browser_paths()
    if paths is None:
        pytest.skip("no chromium and chromedriver on PATH (Debian: apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = paths[0]
    for flag in FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(paths[1]), options=options)
    yield d
    d.quit()


# Plots whose drawn traces number at least their shown ones (traces listed only in the legend are not drawn).
COUNT_DRAWN = (
    "return Array.from(document.querySelectorAll('.plotly-graph-div')).filter(d => d._fullLayout !== undefined"
    " && d.data.length > 0 && d.querySelectorAll('svg.main-svg .trace').length >="
    " d.data.filter(t => t.visible !== 'legendonly').length).length"
)
SHOW_ALL = (
    "document.querySelectorAll('.plotly-graph-div').forEach(d => Plotly.restyle(d, {visible: true}));"
    "return Array.from(document.querySelectorAll('.plotly-graph-div'))"
    ".reduce((n, d) => n + d.data.filter(t => t.visible === 'legendonly').length, 0)"
)


def _wait_drawn(driver, expected: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    rendered = -1
    while time.monotonic() < deadline:
        rendered = driver.execute_script(COUNT_DRAWN)
        if rendered == expected:
            break
        time.sleep(0.25)
    return rendered


def _open_and_wait(driver, page: Path, timeout_s: float = 60.0) -> int:
    """Load ``page``; wait until plotly has drawn every shown trace of every plot, then every trace once those
    waiting in the legend are switched on; no console error. Returns the number of plots."""
    driver.get_log("browser")  # drop what earlier pages logged
    driver.get(page.as_uri())
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and driver.execute_script(
        f"return document.readyState !== 'complete' || document.URL !== {page.as_uri()!r}"
    ):
        time.sleep(0.1)
    expected = driver.execute_script("return document.querySelectorAll('.plotly-graph-div').length")
    rendered = _wait_drawn(driver, expected, timeout_s)
    assert rendered == expected, f"{rendered} of {expected} plots rendered in {timeout_s} s"
    assert driver.execute_script(SHOW_ALL) == 0
    rendered = _wait_drawn(driver, expected, timeout_s)
    assert rendered == expected, f"{rendered} of {expected} plots drew every trace once all were shown"
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, f"console errors: {errors}"
    return expected


def test_report_renders_without_console_errors(driver, tmp_path):
    page = tmp_path / "report.html"
    page.write_text(build_report([load_run(FIXTURES / "gpu_base")]), encoding="utf-8")
    assert _open_and_wait(driver, page) == 12
    # The verdict comes first and names the fastest and smallest per pass against the declared baseline.
    verdict = driver.execute_script("return document.querySelector('main section').innerText")
    assert verdict.startswith("Verdict") and "fastest" in verdict and "smallest" in verdict
    # The hover text of a point holds its configuration; plotly keeps it on the trace.
    hover = driver.execute_script("return document.querySelector('#scaling .plotly-graph-div').data[0].customdata[0]")
    assert "tokens, batch" in hover


def test_compare_page_renders(driver, tmp_path):
    base, new = load_run(FIXTURES / "gpu_base"), load_run(FIXTURES / "gpu_new")
    page = tmp_path / "compare.html"
    page.write_text(build_compare_page(compare(base, new), base, new), encoding="utf-8")
    assert _open_and_wait(driver, page) == 1


def test_injected_markup_stays_text(driver, tmp_path):
    evil = '<img src=x onerror="window.__pwned=1"> &amp; it\'s'
    rows = [row("full", hw, 1.0 * hw) for hw in (8, 16)]
    rows += [row(evil, hw, 0.5 * hw, knobs={"k": "<script>window.__pwned=2</script>"}) for hw in (8, 16)]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    from report_fixtures import write_run

    write_run(run_dir, rows)
    page = tmp_path / "evil.html"
    page.write_text(build_report([load_run(run_dir)]), encoding="utf-8")
    _open_and_wait(driver, page)
    assert driver.execute_script("return window.__pwned === undefined")
    text = driver.execute_script("return document.body.innerText")
    assert evil in text
    # In the plots too: the legend shows the markup as text.
    legend = driver.execute_script(
        "return Array.from(document.querySelectorAll('.legendtext')).map(e => e.textContent).join('|')"
    )
    assert evil in legend


def test_reproduce_page_renders(driver, tmp_path):
    """The committed quick run's page: one plot per experiment, drawn without console errors."""
    from attnbench.reports.experiments import build_page

    run = Path(__file__).resolve().parents[2] / "results" / "quadtree_mechanisms"
    page = tmp_path / "reproduce.html"
    page.write_text(build_page([run]), encoding="utf-8")
    assert _open_and_wait(driver, page) == 1
    assert "quadtree_b_no_lepe" in driver.execute_script("return document.body.innerText")


def test_clip_footprint_page_draws_a_strip_of_frames(driver, tmp_path):
    """``attnbench footprint`` on a clip: every frame of every mechanism drawn, each row's bar once."""
    from attnbench.reports.matching import write_footprint_page

    frames = 4
    panels = [
        {"mechanism": m, "kind": "self", "keys_per_query": 9, "macs": 1e6, "query": [2, 1, 1], "knobs": {},
         "query_hw": [frames, 3, 3], "weights": [[[s * (t + i + j) for j in range(3)] for i in range(3)]
                                                 for t in range(frames)]}
        for m, s in (("pvt", 0.01), ("swin", 0.1))
    ]  # fmt: skip
    page = write_footprint_page(panels, tmp_path / "clip.html")
    # Heat maps are drawn as images (g.hm), not as the .trace groups _open_and_wait counts: wait for those.
    driver.get_log("browser")
    driver.get(page.as_uri())
    count = "return document.querySelectorAll('#footprint-figure .heatmaplayer .hm image').length"
    deadline, drawn = time.monotonic() + 60, 0
    while time.monotonic() < deadline and drawn < 2 * frames:
        time.sleep(0.25)
        drawn = driver.execute_script(count)
    bars = driver.execute_script("return document.querySelectorAll('#footprint-figure .colorbar').length")
    assert (drawn, bars) == (2 * frames, 2)
    assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
