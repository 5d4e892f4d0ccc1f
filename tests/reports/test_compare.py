"""Run comparison: verdicts from the stored spread, regressions, fingerprints; the report and compare commands."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from attnbench.reports import FingerprintMismatch, compare, load_run
from attnbench.reports.compare import latency_verdict, missing_line, parse_percent
from report_fixtures import ENV, FIXTURES, row
from typer.testing import CliRunner

from attnbench import cli


def _pt(median: float, p20: float | None, p80: float | None) -> pd.Series:
    return pd.Series({"latency_ms_median": median, "latency_ms_p20": p20, "latency_ms_p80": p80})


def test_latency_verdict_from_spread_and_noise_band():
    base = _pt(1.0, 0.95, 1.05)
    assert latency_verdict(base, _pt(1.2, 1.1, 1.3), 0.05) == "slower"
    assert latency_verdict(base, _pt(0.8, 0.7, 0.9), 0.05) == "faster"
    # Overlapping spreads are noise, even with a 4% change of the median.
    assert latency_verdict(base, _pt(1.04, 0.99, 1.09), 0.05) == "within noise"
    # A wide spread hides a large change of the median.
    assert latency_verdict(_pt(1.0, 0.5, 1.5), _pt(1.3, 1.0, 1.6), 0.05) == "within noise"
    # Without a spread, the relative noise band decides.
    assert latency_verdict(_pt(1.0, None, None), _pt(1.04, None, None), 0.05) == "within noise"
    assert latency_verdict(_pt(1.0, None, None), _pt(1.06, None, None), 0.05) == "slower"
    assert latency_verdict(_pt(1.0, None, None), _pt(0.9, None, None), 0.05) == "faster"


def test_compare_fixture_runs_finds_the_regressed_mechanism():
    base, new = load_run(FIXTURES / "gpu_base"), load_run(FIXTURES / "gpu_new")
    cmp = compare(base, new)
    t = cmp.table
    assert len(t) == 99 and cmp.only_base.empty and cmp.only_new.empty
    regressed = t[t["regression"]]
    # Linear attention was made 30% slower at every point of the resolution sweep (11 ran in both).
    assert set(regressed["mechanism"]) == {"linear"} and len(regressed) == 11
    assert (regressed["verdict"] == "slower").all()
    assert regressed["latency_change"].between(0.2, 0.4).all()
    # Everything else moved by the fixture's noise only.
    others = t[(t["mechanism"] != "linear") & t["latency_change"].notna()]
    assert (others["verdict"] == "within noise").mean() > 0.9
    assert cmp.failed
    # A looser threshold lets the same change pass.
    assert not compare(base, new, fail_above=0.5).failed


def test_compare_status_changes_and_memory(make_run):
    base = [
        row("a", 16, 1.0),
        row("a", 32, 1.0),
        row("a", 64, None, status="oom", reason="CUDA out of memory"),
        row("b", 16, 1.0, peak=1000),
        row("c", 16, 1.0),
    ]
    new = [
        row("a", 16, 1.0),
        row("a", 32, None, status="timeout", reason="over 60 s"),
        row("a", 64, 2.0),
        row("b", 16, 1.0, peak=1500),
        row("d", 16, 1.0),
    ]
    cmp = compare(load_run(make_run(base)), load_run(make_run(new)))
    t = cmp.table.set_index(["mechanism", "height"])
    assert t.loc[("a", 16), "verdict"] == "within noise" and not t.loc[("a", 16), "regression"]
    assert t.loc[("a", 32), "verdict"] == "now timeout" and t.loc[("a", 32), "regression"]
    assert t.loc[("a", 64), "verdict"] == "runs now (was oom)" and not t.loc[("a", 64), "regression"]
    assert t.loc[("b", 16), "memory_change"] == pytest.approx(0.5)
    assert t.loc[("b", 16), "regression"] and "memory grew" in t.loc[("b", 16), "verdict"]
    assert list(cmp.only_base["mechanism"]) == ["c"] and list(cmp.only_new["mechanism"]) == ["d"]
    # Regressions come first.
    assert cmp.table["regression"].iloc[:2].all()


def test_different_fingerprints_are_refused_unless_forced(make_run):
    rows = [row("a", 16, 1.0)]
    a100 = "NVIDIA A100-SXM4-80GB"
    other = {**ENV, "gpu_name": a100, "gpu_names": [a100], "torch": "2.12.0", "git_rev": "bbbb", "time": "later"}
    base, new = load_run(make_run(rows)), load_run(make_run(rows, env=other))
    with pytest.raises(FingerprintMismatch) as err:
        compare(base, new)
    # The differences are listed; the git revision and time are expected to differ and are not.
    assert err.value.differences == [
        "gpu_names: base ['NVIDIA H100 80GB HBM3'], new ['NVIDIA A100-SXM4-80GB']",
        "torch: base '2.13.0', new '2.12.0'",
    ]
    assert "--force" in str(err.value)
    forced = compare(base, new, force=True)
    assert len(forced.table) == 1 and forced.differences == err.value.differences


def test_parse_percent():
    assert parse_percent("10%") == pytest.approx(0.10)
    assert parse_percent("2.5") == pytest.approx(0.025)
    for bad in ("ten", "-5%", "nan"):
        with pytest.raises(ValueError, match="percentage"):
            parse_percent(bad)


runner = CliRunner()


def test_cli_compare_exit_codes_and_html(tmp_path, make_run):
    base, new = str(FIXTURES / "gpu_base"), str(FIXTURES / "gpu_new")
    out = tmp_path / "cmp.html"
    res = runner.invoke(cli.app, ["compare", base, new, "--html", str(out)])
    assert res.exit_code == 1, res.output
    assert "11 regressed beyond 10%" in res.output
    page = out.read_text()
    assert page.count("plotly.js v") == 1 and "REGRESSION" in page
    assert runner.invoke(cli.app, ["compare", base, new, "--fail-above", "50%"]).exit_code == 0
    assert runner.invoke(cli.app, ["compare", base, base]).exit_code == 0
    cpu = str(FIXTURES / "cpu_small")
    refused = runner.invoke(cli.app, ["compare", base, cpu])
    assert refused.exit_code == 2 and "gpu_name" in refused.output and "--force" in refused.output
    forced = runner.invoke(cli.app, ["compare", base, cpu, "--force"])  # no point of the base is in cpu_small
    assert forced.exit_code == 1 and "missing from the new run" in forced.output and "--allow-missing" in forced.output
    assert runner.invoke(cli.app, ["compare", base, cpu, "--force", "--allow-missing"]).exit_code == 0
    missing = runner.invoke(cli.app, ["compare", base, str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "not a directory" in missing.output


def test_cli_report_html_md_and_csv(tmp_path):
    run = str(FIXTURES / "cpu_small")
    out = tmp_path / "sub" / "report.html"
    res = runner.invoke(cli.app, ["report", run, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_text().startswith("<!DOCTYPE html>")
    md = runner.invoke(cli.app, ["report", run, "--format", "md"])
    assert md.exit_code == 0 and md.stdout.splitlines()[0].startswith("| mechanism | knobs | pass |")
    csv = runner.invoke(cli.app, ["report", run, "--format", "csv"])
    table = pd.read_csv(io.StringIO(csv.stdout))
    assert set(table["mechanism"]) == {"full", "linear"}
    assert "speed-up vs full [math] (x)" in table.columns
    assert runner.invoke(cli.app, ["report", run, "--format", "tex"]).exit_code != 0
    other = runner.invoke(cli.app, ["report", run, "--format", "csv", "--baseline", "linear"])
    assert "speed-up vs linear [math] (x)" in other.stdout


def _sampled(mechanism, hw, scale, rng, **kw):
    """A point with 30 raw samples around ``scale`` ms, 10% of them hit by a 3x load burst."""
    times = [scale * (1 + 0.02 * rng.standard_normal()) * (3 if i % 10 == 0 else 1) for i in range(30)]
    return row(mechanism, hw, float(np.median(times)), latency_samples_ms=times, spread=0.5, **kw)


def test_compare_decides_from_samples_corrected_by_the_probe(make_run):
    rng = np.random.default_rng(0)
    base = [_sampled(m, hw, 1.0, rng, probe_ms=0.1) for m in ("a", "b") for hw in (8, 16)]
    # The new machine is 1.5x slower as a whole (its probe says so); b is 2x slower on top.
    new = [_sampled(m, hw, 1.5 * (2 if m == "b" else 1), rng, probe_ms=0.15) for m in ("a", "b") for hw in (8, 16)]
    cmp = compare(load_run(make_run(base)), load_run(make_run(new)))
    t = cmp.table.set_index("mechanism")
    assert set(cmp.regressions["mechanism"]) == {"b"} and len(cmp.regressions) == 2
    assert (t.loc["a", "verdict"] == "within noise").all() and (t["decided_by"] == "samples").all()
    assert t.loc["b", "latency_change"].between(0.9, 1.1).all()
    assert (t.loc["b", "ratio_low"] > 1.1).all()


def test_contended_points_are_inconclusive_and_never_fail(make_run):
    rng = np.random.default_rng(1)
    base = [_sampled("a", 8, 1.0, rng)]
    new = [_sampled("a", 8, 3.0, rng, contended=True)]
    cmp = compare(load_run(make_run(base)), load_run(make_run(new)))
    assert cmp.table["verdict"].tolist() == ["inconclusive"] and not cmp.failed


def test_a_small_conclusive_change_below_fail_above_does_not_fail(make_run):
    rng = np.random.default_rng(2)
    base = [_sampled("a", 8, 1.0, rng)]
    new = [_sampled("a", 8, 1.05, rng)]
    cmp = compare(load_run(make_run(base)), load_run(make_run(new)))
    assert cmp.table["verdict"].tolist() == ["slower"] and not cmp.failed


def _rounds(mechanism, hw, levels, rng):
    """A point timed in rounds of 10 samples, round k around ``levels[k]`` ms (2% jitter)."""
    times = [lv * (1 + 0.02 * rng.standard_normal()) for lv in levels for _ in range(10)]
    return row(mechanism, hw, float(np.median(times)), latency_samples_ms=times, latency_rounds=[10] * len(levels))


def test_rounds_that_disagree_widen_the_interval_rounds_that_agree_do_not(make_run):
    rng = np.random.default_rng(3)
    base = [_rounds("a", 8, [1.0, 1.0, 1.0], rng), _rounds("b", 8, [1.0, 1.0, 1.0], rng)]
    # a: two of three rounds 1.3x slower, one not (the machine drifted between rounds); b: every round 1.3x
    new = [_rounds("a", 8, [1.0, 1.3, 1.3], rng), _rounds("b", 8, [1.3, 1.3, 1.3], rng)]
    t = compare(load_run(make_run(base)), load_run(make_run(new))).table.set_index("mechanism")
    assert t.loc["a", "latency_change"] == pytest.approx(0.3, abs=0.05)  # the pooled median moved all the same
    assert t.loc["a", "ratio_low"] < 1.05 and not t.loc["a", "regression"]
    assert t.loc["b", "ratio_low"] > 1.2 and t.loc["b", "regression"]
    # the same samples without their rounds: the one-level bootstrap calls a a regression
    flat = [{**r, "latency_rounds": None} for r in new]
    t = compare(load_run(make_run([{**r, "latency_rounds": None} for r in base])), load_run(make_run(flat))).table
    assert t.set_index("mechanism").loc["a", "regression"]


def test_points_missing_from_the_new_run_fail_the_comparison_unless_allowed(make_run):
    base = load_run(make_run([row("a", 16, 1.0), row("a", 32, 1.0)]))
    new = load_run(make_run([row("a", 16, 1.0)]))
    cmp = compare(base, new)
    assert cmp.missing == 1 and cmp.failed and "missing from the new run" in missing_line(cmp)
    allowed = compare(base, new, allow_missing=True)
    assert not allowed.failed and missing_line(allowed) is None
    assert not compare(new, base).failed  # points only in the new run fail nothing
