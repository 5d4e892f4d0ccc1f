"""Property tests: ``report`` (html, md, csv) and ``compare`` render any result set the store accepts.

Generated runs mix every status, leave optional fields out or null, hold a single point or none that ran,
come in several runs, and carry hostile strings. Kept to a few seconds: small example counts, no browser.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from attnbench.reports import (
    analysis,
    build_compare_page,
    build_report,
    compare,
    format_table,
    load_run,
    summary_of,
    tidy,
)
from attnbench.reports.compare import display_table, summary_line, terminal_table
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from report_fixtures import ENV, row, write_run

HOSTILE = ["<script>alert(1)</script>", "a|b\nc", "[red]x[/]", "ünï ✓", "", "&amp;", "-"]
NAMES = ["full", "linear", "swin", *HOSTILE[:4]]
STATUSES = ["ok", "skipped", "oom", "error", "timeout"]

maybe = st.one_of  # readability: maybe(none(), x)
positive = st.floats(min_value=1e-4, max_value=1e4, allow_nan=False, allow_infinity=False)
whole = st.integers(min_value=0, max_value=10**12)
# Optional fields: absent, null, or a value (those the measurement adds in newer results included).
OPTIONAL = {
    "latency_ms_p20": positive,
    "latency_ms_p80": positive,
    "samples": st.integers(1, 100),
    "first_call_ms": positive,
    "peak_bytes": whole,
    "baseline_bytes": whole,
    "macs": whole,
    "backward_macs": whole,
    "params": whole,
    "reason": st.sampled_from(HOSTILE),
    "noisy": st.booleans(),
    "device_name": st.sampled_from(["NVIDIA H100 80GB HBM3", "cpu", "<b>gpu</b>"]),
    "macs_uncovered": st.dictionaries(st.sampled_from(["aten::elu", "<op>"]), st.integers(1, 5), max_size=2),
    "overhead_ms": positive,
    "latency_samples_ms": st.lists(positive, max_size=5),
    "provenance": st.dictionaries(st.sampled_from(["backend", "<k>"]), st.sampled_from(HOSTILE), max_size=2),
    "contended": st.booleans(),
    "contention": st.dictionaries(st.sampled_from(["probe_ratio"]), positive, max_size=1),
    "probe_ms": positive,
    "load_avg": positive,
    "host_ms_per_call": positive,
    "launch_bound": st.booleans(),
}


@st.composite
def record(draw, index: int) -> dict:
    hw = draw(st.sampled_from([8, 16, 32, None]))
    status = draw(st.sampled_from(STATUSES))
    out = {
        "point_id": f"p{index}",
        "mechanism": draw(st.sampled_from(NAMES)),
        "knobs": draw(maybe(st.none(), st.dictionaries(st.sampled_from(["topk", "<k>"]), st.sampled_from([4, "x"])))),
        "height": hw,
        "width": hw,
        "tokens": None if hw is None else hw * hw,
        "batch": draw(st.sampled_from([1, 2, None])),
        "dim": draw(st.sampled_from([32, None])),
        "heads": draw(st.sampled_from([2, None])),
        "dtype": draw(st.sampled_from(["float32", "bfloat16", "<dt>"])),
        "pass": draw(st.sampled_from(["fwd", "fwd+bwd", None])),
        "impl": draw(st.sampled_from(["fast", "reference", HOSTILE[0], None])),
        "compile": draw(st.sampled_from([False, True, None])),
        "device": draw(st.sampled_from(["cpu", "cuda", None])),
        "cross": draw(st.sampled_from([False, True, None])),
        "status": status,
        "latency_ms_median": draw(positive) if status == "ok" and draw(st.booleans()) else draw(maybe(st.none())),
    }
    if out["latency_ms_median"] is None and status == "ok":
        out["latency_ms_median"] = draw(maybe(st.none(), positive))
    for name, values in OPTIONAL.items():
        choice = draw(st.integers(0, 2))
        if choice == 1:
            out[name] = None
        elif choice == 2:
            out[name] = draw(values)
    return out


@st.composite
def result_set(draw) -> list[list[dict]]:
    runs = []
    for r in range(draw(st.integers(1, 3))):
        n = draw(st.integers(0, 6))
        runs.append([draw(record(100 * r + i)) for i in range(n)])
    return runs


def _write(root: Path, runs: list[list[dict]], envs: list[bool]) -> list:
    """The runs that load; a run whose every line the store refuses is itself refused, in one error."""
    from attnbench.bench.store import read_results
    from attnbench.reports.data import RunError

    out = []
    for i, (rows, with_env) in enumerate(zip(runs, envs, strict=False)):
        path = write_run(root / f"run{i}<b>", rows, ENV if with_env else {})
        try:
            out.append(load_run(path))
        except RunError as exc:
            assert rows and not read_results(path).records and "holds no valid record" in str(exc)
    return out


# No shrinking: a failure prints its (unshrunk) example at once instead of minutes later.
PHASES = (Phase.explicit, Phase.reuse, Phase.generate)
# ATTNBENCH_PROPERTY_EXAMPLES=500 searches harder (minutes); CI runs the default in seconds.
EXAMPLES = int(os.environ.get("ATTNBENCH_PROPERTY_EXAMPLES", "12"))
FAST = settings(max_examples=EXAMPLES, deadline=None, phases=PHASES, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(result_set(), st.lists(st.booleans(), min_size=3, max_size=3))
def test_tables_and_compare_never_crash(runs, envs):
    with tempfile.TemporaryDirectory() as tmp:
        loaded = _write(Path(tmp), runs, envs)
        if not loaded:
            return
        for fmt in ("md", "csv"):
            format_table(summary_of(loaded), fmt)
        cmp = compare(loaded[0], loaded[-1], force=True)
        display_table(cmp), terminal_table(cmp), summary_line(cmp)
        build_compare_page(cmp, loaded[0], loaded[-1])


@settings(
    max_examples=max(1, EXAMPLES * 2 // 3), deadline=None, phases=PHASES, suppress_health_check=[HealthCheck.too_slow]
)
@given(result_set(), st.lists(st.booleans(), min_size=3, max_size=3), st.sampled_from(["full", "linear:fast"]))
def test_html_report_never_crashes_and_escapes(runs, envs, baseline):
    with tempfile.TemporaryDirectory() as tmp:
        loaded = _write(Path(tmp), runs, envs)
        if not loaded:
            return
        page = build_report(loaded, baseline)
    assert page.startswith("<!DOCTYPE html>") and "<script>alert(1)" not in page
    assert page.count("</script>") == page.count("<script")
    assert "Baseline(" not in page  # the baseline is named by its label, never by its repr


def test_a_run_holding_a_skipped_point_reports(make_run, tmp_path):
    # The README's stage sweep and `-m swin,quadtree -r 16,32` hold skipped points; reports once crashed there.
    rows = [row("swin", 16, None, status="skipped", reason="window 7"), row("quadtree", 16, 1.0)]
    run = load_run(make_run(rows))
    assert "window 7" in build_report([run])
    assert format_table(summary_of([run]), "md").count("\n") >= 3
    assert not compare(run, run).failed
    # One point, nothing ran, or no run at all in the table: a page that says so.
    assert "no point ran" in build_report([load_run(make_run([rows[0]]))])
    df = tidy([run])
    v = analysis.verdict(df, analysis.references(df)).iloc[0]
    assert v["fastest"] == "quadtree" and v["fastest_text"] == "no baseline"
