"""The declared baseline, the verdict, the MAC bound, stable colours and the fit rules, on hand-made results
whose answers are known."""

from __future__ import annotations

import math

import pytest
from attnbench.reports import analysis, build_report, figures, load_run, tidy
from report_fixtures import row
from typer.testing import CliRunner

from attnbench import cli

runner = CliRunner()
MB = 1_000_000


def _df(make_run, rows):
    return tidy([load_run(make_run(rows))])


def _verdict_rows(full_reference_ms: float) -> list[dict]:
    """full fast 4 ms / 8 MB / 1e9 MACs; full reference (``full_reference_ms``); lin 1 ms / 1 MB / 1e8 MACs;
    swin 3 ms / 0.5 MB / 5e8 MACs; forward at 16x16 and 32x32, and fwd+bwd at 32x32 (lin counts its backward)."""
    rows = []
    for hw in (16, 32):
        rows += [
            row("full", hw, 4.0, impl="fast", peak=8 * MB, macs=10**9),
            row("full", hw, full_reference_ms, impl="reference", peak=16 * MB, macs=10**9),
            row("lin", hw, 1.0, impl="fast", peak=1 * MB, macs=10**8),
            row("swin", hw, 3.0, impl="fast", peak=MB // 2, macs=5 * 10**8),
        ]
    rows += [
        row("full", 32, 12.0, impl="fast", peak=20 * MB, macs=10**9, pass_="fwd+bwd"),
        row("full", 32, 6.0, impl="reference", peak=40 * MB, macs=10**9, pass_="fwd+bwd"),
        row("lin", 32, 2.0, impl="fast", peak=2 * MB, macs=10**8, backward_macs=3 * 10**8, pass_="fwd+bwd"),
    ]
    return rows


@pytest.mark.parametrize("full_reference_ms", [8.0, 2.0, 0.5])
def test_verdict_and_ratios_hold_the_declared_baseline(make_run, full_reference_ms):
    # 2.0 and 0.5: full's reference path times faster than its fast path; the baseline stays full [fast].
    df = _df(make_run, _verdict_rows(full_reference_ms))
    base = analysis.resolve_baseline(df)
    assert (base.name, base.impl) == ("full", "fast")
    refs = analysis.references(df, base)
    v = analysis.verdict(df, refs, base).set_index("pass")
    assert v.loc["fwd", "resolution"] == "32x32"
    if full_reference_ms > 1.0:
        assert v.loc["fwd", "fastest"] == "lin" and v.loc["fwd", "fastest_text"] == "4x faster"
    else:  # the reference path is the fastest point here, and its ratio is to full [fast] too
        assert v.loc["fwd", "fastest"] == "full [reference]" and v.loc["fwd", "fastest_text"] == "8x faster"
    assert v.loc["fwd", "smallest"] == "swin" and v.loc["fwd", "smallest_text"] == "16x smaller"
    assert v.loc["fwd+bwd", "fastest"] == "lin" and v.loc["fwd+bwd", "fastest_ratio"] == pytest.approx(6.0)
    t = analysis.summary_table(df, refs, base).set_index(["mechanism", "impl", "pass"])
    lin, swin = t.loc[("lin", "fast", "fwd")], t.loc[("swin", "fast", "fwd")]
    assert lin["speed-up vs full [fast] (x)"] == pytest.approx(4.0)
    assert lin["memory vs full [fast] (x smaller)"] == pytest.approx(8.0)
    # The bound: full's MACs / lin's MACs = 10x promised, 4x measured, 40% realised; swin 2x, 4/3x, 2/3.
    assert lin["MACs vs full [fast] (x fewer)"] == pytest.approx(10.0)
    assert lin["share of MAC promise realised %"] == pytest.approx(40.0)
    assert swin["share of MAC promise realised %"] == pytest.approx(100 * (4 / 3) / 2)
    # fwd+bwd counts the backward: full 1e9 + 2e9 (estimated), lin 1e8 + 3e8 (counted) -> 7.5x; 6x measured.
    lin_train = t.loc[("lin", "fast", "fwd+bwd")]
    assert lin_train["MACs vs full [fast] (x fewer)"] == pytest.approx(7.5)
    assert lin_train["share of MAC promise realised %"] == pytest.approx(80.0)
    # No promise (same MACs as the baseline): no share.
    assert math.isnan(t.loc[("full", "reference", "fwd"), "share of MAC promise realised %"])
    # Crossovers are against full [fast] too: lin is faster and smaller at every map.
    cross = analysis.crossovers(df, refs, base).set_index(["series", "pass"])
    assert cross.loc[("lin", "fwd"), "faster_kind"] == "few"  # two maps only: not enough to tell
    if full_reference_ms != 2.0:
        return
    page = build_report([load_run(make_run(_verdict_rows(full_reference_ms)))])
    assert page.index('<section id="verdict">') < page.index('<section id="summary">')
    assert "against the declared baseline full [fast]" in page


def test_ratios_read_as_words():
    assert analysis.ratio_text(4.0, "faster", "slower") == "4x faster"
    assert analysis.ratio_text(0.25, "faster", "slower") == "4x slower"
    assert analysis.ratio_text(1 / 15.09, "smaller", "larger") == "15.1x larger"
    assert analysis.ratio_text(1.0, "faster", "slower") == "same"
    assert analysis.ratio_text(math.nan, "faster", "slower") == "-"


def test_an_explicit_baseline_is_checked_and_named_everywhere(make_run, tmp_path):
    run = make_run(_verdict_rows(2.0))
    df = tidy([load_run(run)])
    ref = analysis.resolve_baseline(df, "full:reference", strict=True)
    assert ref.label == "full [reference]"
    with pytest.raises(analysis.BaselineError, match="its impls: fast, reference"):
        analysis.resolve_baseline(df, "full:turbo", strict=True)
    with pytest.raises(analysis.BaselineError, match="full, lin, swin"):
        analysis.resolve_baseline(df, "nosuch", strict=True)
    # Without a fast full point, the rule picks full's only impl (never the faster one) and says so.
    other = tidy([load_run(make_run([row("full", 16, 1.0, impl="math"), row("lin", 16, 0.5)]))])
    picked = analysis.resolve_baseline(other)
    assert picked.impl == "math" and "no fast points" in picked.note
    md = runner.invoke(cli.app, ["report", str(run), "--format", "md", "--baseline", "full:reference"])
    assert md.exit_code == 0, md.output
    assert "speed-up vs full [reference]" in md.stdout and "2x faster" in md.stdout
    out = tmp_path / "r.html"
    for bad in ("nosuch", "full:turbo", "full:", "[red]x[/]"):
        res = runner.invoke(cli.app, ["report", str(run), "--out", str(out), "--baseline", bad])
        assert res.exit_code == 2, res.output
        assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
        assert not out.exists()


def test_a_mechanisms_colour_is_fixed_by_its_name(make_run):
    a = _df(make_run, [row(m, hw, 1.0 * hw) for m in ("full", "linear", "mine") for hw in (8, 16)])
    b = _df(make_run, [row(m, hw, 2.0 * hw) for m in ("quadtree", "mine", "linear", "aaa") for hw in (8, 16)])

    def drawn(df):
        fig = figures.scaling(df, analysis.references(df), "latency_ms_median", figures.colors(df))
        return {t.legendgroup: t.line.color for t in fig.data}

    ca, cb = drawn(a), drawn(b)
    assert ca["linear"] == cb["linear"] == figures.MECHANISM_COLORS["linear"]
    assert ca["mine"] == cb["mine"]  # a name outside the built-ins too
    assert len(set(figures.MECHANISM_COLORS.values())) == len(figures.MECHANISM_COLORS)
    assert len(set(cb.values())) == len(cb)


def test_the_fast_impl_is_drawn_and_the_others_wait_in_the_legend(make_run):
    rows = [row(m, hw, 1.0, impl=i) for m in ("full", "lin") for i in ("fast", "reference") for hw in (8, 16)]
    rows += [row("only", hw, 1.0, impl="math") for hw in (8, 16)]
    df = _df(make_run, rows)
    fig = figures.scaling(df, analysis.references(df), "latency_ms_median", figures.colors(df))
    visible = {t.legendgroup: t.visible for t in fig.data}
    assert visible == {
        "full [fast]": True,
        "full [reference]": "legendonly",
        "lin [fast]": True,
        "lin [reference]": "legendonly",
        "only": True,  # a mechanism without a fast impl shows its own
    }
    many = _df(make_run, [row(f"m{i:02d}", hw, 1.0) for i in range(14) for hw in (8, 16)])
    styles = figures.colors(many)
    assert sum(s["visible"] is True for s in styles.values()) == figures.MAX_SHOWN


def _overhead_rows(sides: tuple[int, ...]) -> list[dict]:
    """Per-call overhead 0.2 ms (bound below 0.6 ms). full ~1e-6 N^2, lin ~3e-3 N (crossing at N = 3000),
    both at their overhead on the 8x8 and 16x16 maps, where lin would look faster."""
    rows = []
    for hw in sides:
        n = hw * hw
        small = {8: (0.3, 0.25), 16: (0.5, 0.4)}.get(hw)
        full_ms, lin_ms = small if small else (1e-6 * n * n, 3e-3 * n)
        rows.append(row("full", hw, full_ms, overhead_ms=0.2, peak=n * n, impl="fast"))
        rows.append(row("lin", hw, lin_ms, overhead_ms=0.2, peak=1000 * n, impl="fast"))
    return rows


def test_overhead_bound_points_are_left_out_of_fits_and_crossovers(make_run):
    df = _df(make_run, _overhead_rows((8, 16, 32, 64, 128)))
    assert list(df[df["mechanism"] == "lin"].sort_values("tokens")["overhead_bound"]) == [
        True,
        True,
        False,
        False,
        False,
    ]
    fits = analysis.exponents(df, "latency_ms_median")
    lin = fits[("lin", "fwd")]
    assert (lin.n, lin.excluded, lin.status) == (3, 2, "ok")
    assert lin.exponent == pytest.approx(1.0)
    # Memory is not bound by the call: every point is fitted.
    assert analysis.exponents(df, "peak_bytes")[("lin", "fwd")].n == 5
    refs = analysis.references(df)
    cross = analysis.crossovers(df, refs).set_index("series")
    # With the bound points, lin would read faster at 16x16 too ("mixed"); without them it crosses at 3000.
    assert cross.loc["lin", "faster_kind"] == "from"
    assert cross.loc["lin", "faster_tokens"] == pytest.approx(3000.0, rel=1e-6)
    assert "2 overhead-bound point(s) left out" in cross.loc["lin", "note"]
    fig = figures.scaling(df, refs, "latency_ms_median", figures.colors(df))
    trace = next(t for t in fig.data if t.legendgroup == "lin")
    assert "~N^1.00" in trace.name
    assert list(trace.marker.symbol) == ["circle-open", "circle-open", "circle", "circle", "circle"]
    page = build_report([load_run(make_run(_overhead_rows((8, 16, 32, 64, 128))))])
    assert "4 of 10 ok points time within 3x of it" in page and "left out of latency fits" in page


def test_fits_over_too_few_points_or_poor_ones_are_not_numbers(make_run):
    df = _df(make_run, _overhead_rows((8, 16, 32, 64)))
    lin = analysis.exponents(df, "latency_ms_median")[("lin", "fwd")]
    assert lin.status == "few" and lin.value is None and lin.text() == "n/a (2 pts)"
    cross = analysis.crossovers(df, analysis.references(df)).set_index("series")
    assert cross.loc["lin", "faster_kind"] == "few"
    assert cross.loc["lin", "faster_than_baseline"].startswith("too few points to tell (2 above")
    zigzag = analysis.fit([256, 1024, 4096, 16384], [1.0, 5.0, 1.5, 6.0])
    assert zigzag.status == "poor" and zigzag.text().startswith("poor fit (R")
    assert analysis.fit([256, 1024, 4096], [1.0, 2.0, 4.0]).text() == "0.50"


def test_without_a_measured_overhead_nothing_is_excluded_and_the_report_says_so(make_run):
    rows = [{k: v for k, v in r.items() if k != "overhead_ms"} for r in _overhead_rows((8, 16, 32, 64, 128))]
    df = _df(make_run, rows)
    assert not df["overhead_bound"].any()
    assert analysis.exponents(df, "latency_ms_median")[("lin", "fwd")].n == 5
    page = build_report([load_run(make_run(rows))])
    assert "per-call overhead was not measured" in page and "no point is left out of the fits" in page
