"""Derived numbers on synthetic data with known answers: exponents, crossovers, reference, summary table."""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
import pytest
from attnbench.reports import analysis, format_table, load_run, summary_of, tidy
from attnbench.reports.analysis import crossover, fit_exponent
from report_fixtures import FIXTURES, row

TOKENS = [256, 576, 1024, 2304, 4096, 9216]


@pytest.mark.parametrize("exponent", [0.5, 1.0, 1.5, 2.0])
def test_fit_exponent_recovers_power_law(exponent):
    y = [3.7 * n**exponent for n in TOKENS]
    assert fit_exponent(TOKENS, y) == pytest.approx(exponent, abs=1e-9)


def test_fit_exponent_least_squares_and_degenerate_input():
    # log x = 0, 1, 3 and log y = 0, 1, 1: the least-squares slope is 12/42 (the endpoints alone would give 1/3).
    e = math.e
    assert fit_exponent([1, e, e**3], [1, e, e]) == pytest.approx(2 / 7, rel=1e-12)
    assert fit_exponent([1024, 1024], [1.0, 2.0]) is None
    assert fit_exponent([1024], [1.0]) is None
    # Non-positive and NaN values are dropped, not fitted.
    assert fit_exponent([256, 1024, 4096, 9216], [0.0, 1024.0, math.nan, 9216.0]) == pytest.approx(1.0)


def test_crossover_of_a_power_law_ratio_is_exact():
    # full ~ a N^2, mechanism ~ b N: ratio = (b / a) / N crosses 1 at N = b / a = 3000 tokens.
    a, b = 1e-6, 3e-3
    ratio = [(b * n) / (a * n * n) for n in TOKENS]
    c = crossover(TOKENS, ratio)
    assert c.kind == "from"
    assert c.tokens == pytest.approx(3000.0, rel=1e-9)
    assert c.first_point == 4096
    assert "~54.8x54.8" in c.describe() and "first measured 64x64" in c.describe()


def test_crossover_always_never_mixed_and_empty():
    assert crossover(TOKENS, [0.5] * 6).kind == "always"
    never = crossover(TOKENS, [1.5] * 6)
    assert never.kind == "never" and never.describe() == "never in range (16x16 to 96x96)"
    # Faster in the middle, slower again at the largest map: faster only up to the last crossing.
    until = crossover(TOKENS, [2.0, 1.5, 0.8, 0.7, 0.9, 1.2])
    assert until.kind == "until" and until.first_point == 9216 and 4096 < until.tokens < 9216
    assert until.describe().startswith("only below ~")
    # Below, above, then below to the end: the crossing that holds to the end counts.
    late = crossover(TOKENS, [0.9, 1.2, 1.1, 0.8, 0.7, 0.6])
    assert late.kind == "mixed" and late.first_point == 2304 and 1024 < late.tokens < 2304
    assert "also below at a smaller size" in late.describe()
    assert crossover([], []).kind == "none"
    # Unsorted input is sorted by tokens first.
    shuffled = crossover(TOKENS[::-1], [3000 / n for n in TOKENS[::-1]])
    assert shuffled.tokens == pytest.approx(3000.0)


def test_crossovers_from_runs(make_run):
    # Full attention quadratic, the other linear in N: faster from 3000 tokens, smaller from 2000.
    rows = []
    for hw in (16, 24, 32, 48, 64, 96):
        n = hw * hw
        rows.append(row("full", hw, 1e-6 * n * n, peak=int(n * n / 2)))
        rows.append(row("lin", hw, 3e-3 * n, peak=int(1000 * n)))
    run = load_run(make_run(rows))
    df = tidy([run])
    ref = analysis.reference(df)
    table = analysis.crossovers(df, ref.side)
    assert list(table["series"]) == ["lin"]
    assert table["faster_tokens"].iloc[0] == pytest.approx(3000.0, rel=1e-6)
    assert table["smaller_tokens"].iloc[0] == pytest.approx(2000.0, rel=1e-6)
    # Another baseline name is honoured: against "lin", full is faster only below 3000 tokens.
    other = analysis.crossovers(df, ref.side, baseline="lin")
    assert list(other["series"]) == ["full"]
    assert other["faster_kind"].iloc[0] == "until"
    assert other["faster_tokens"].iloc[0] == pytest.approx(3000.0, rel=1e-6)


def test_reference_prefers_largest_resolution_where_baseline_ran_every_pass(make_run):
    rows = []
    for hw in (16, 32, 64):
        for p in ("fwd", "fwd+bwd"):
            oom = hw == 64 and p == "fwd+bwd"
            rows.append(row("full", hw, None if oom else 1.0, pass_=p, status="oom" if oom else "ok"))
            rows.append(row("other", hw, 0.5, pass_=p))
    # A batch sweep at one resolution must not move the reference batch.
    rows += [row("full", 32, 2.0, batch=b) for b in (2, 4)]
    df = tidy([load_run(make_run(rows))])
    ref = analysis.reference(df)
    assert (ref.height, ref.width, ref.tokens) == (32, 32, 1024)
    assert ref.side["batch"] == 1


def test_summary_table_values_and_units(make_run):
    rows = [
        row("full", 32, 2.0, peak=4_000_000, macs=10**9),
        row("lin", 32, 0.5, peak=1_000_000, macs=10**8, knobs={"r": 2}),
        row("lin", 32, 1.0, peak=2_000_000, macs=10**8, knobs={"r": 4}),
        row("win", 32, None, status="skipped", reason="window 7 does not divide 32"),
    ]
    df = tidy([load_run(make_run(rows))])
    table = analysis.summary_table(df, analysis.references(df))
    t = table.set_index(["mechanism", "knobs"])
    # The fixture rows' impl is "default": with no fast full point, full's only impl is the baseline.
    assert t.loc[("lin", "r=2"), "speed-up vs full [default] (x)"] == pytest.approx(4.0)
    assert t.loc[("lin", "r=4"), "memory vs full [default] (x smaller)"] == pytest.approx(2.0)
    assert t.loc[("lin", "r=2"), "MACs vs full [default] (x fewer)"] == pytest.approx(10.0)
    assert t.loc[("lin", "r=2"), "share of MAC promise realised %"] == pytest.approx(40.0)
    # Fastest first.
    assert list(table["mechanism"][:3]) == ["lin", "lin", "full"]
    assert t.loc[("full", "-"), "GFLOPs fwd (2 x MACs)"] == pytest.approx(2.0)
    # 2 * 1e9 FLOPs in 2 ms = 1 TFLOP/s; the H100 fp16 dense peak is 989.5 TFLOP/s.
    assert t.loc[("full", "-"), "achieved TFLOP/s"] == pytest.approx(1.0)
    assert t.loc[("full", "-"), "% of peak"] == pytest.approx(100 / 989.5)
    assert t.loc[("win", "-"), "status"] == "skipped"
    assert math.isnan(t.loc[("win", "-"), "latency ms (median)"])
    assert t.loc[("lin", "r=2"), "peak memory MiB"] == pytest.approx(1_000_000 / 2**20)


def test_summary_without_gpu_has_no_peak_column():
    table = summary_of([load_run(FIXTURES / "cpu_small")])
    assert "% of peak" not in table.columns
    assert set(table["mechanism"]) == {"full", "linear"}
    # The uncounted ops of the linear point are shown, never hidden.
    assert table.set_index("mechanism").loc["linear", "uncounted ops"] == "aten::elu x1"


def test_format_md_and_csv():
    table = pd.DataFrame({"mechanism": ["a|b", "<x>"], "latency ms": [1.23456, np.nan]})
    md = format_table(table, "md")
    lines = md.strip().splitlines()
    assert lines[0] == "| mechanism | latency ms |"
    assert lines[2] == "| a\\|b | 1.23 |"
    assert lines[3] == "| &lt;x&gt; | - |"
    csv = format_table(table, "csv")
    back = pd.read_csv(io.StringIO(csv))
    assert back["mechanism"].tolist() == ["a|b", "<x>"]
    assert back["latency ms"].iloc[0] == pytest.approx(1.23456)
    with pytest.raises(ValueError, match="md or csv"):
        format_table(table, "tex")


def test_mechanism_outside_the_common_context_keeps_its_own(make_run):
    # "x" only runs cross attention; the common context is self attention, yet x must not drop out.
    rows = [row("full", hw, 1.0) for hw in (16, 32)] + [row("y", hw, 0.5) for hw in (16, 32)]
    rows += [row("x", hw, 0.2, cross=True) for hw in (16, 32)]
    df = tidy([load_run(make_run(rows))])
    refs = analysis.references(df)
    ref = next(iter(refs.values()))
    assert not ref.side["cross"]
    assert ref.own["x"]["cross"]
    table = analysis.summary_table(df, refs).set_index("mechanism")
    assert set(table.index) == {"full", "x", "y"}
    # No full attention point shares x's context, so it gets no speed-up rather than a wrong one.
    assert math.isnan(table.loc["x", "speed-up vs full [default] (x)"])
    assert table.loc["y", "speed-up vs full [default] (x)"] == pytest.approx(2.0)
    assert set(analysis.in_side(df, refs)["mechanism"]) == {"full", "x", "y"}


def test_baselines_other_implementation_is_a_row_against_the_declared_one(make_run):
    rows = [
        row("full", 32, 2.0, peak=4_000_000, impl="fast"),
        row("full", 32, 8.0, peak=8_000_000, impl="reference"),
        row("lin", 32, 1.0, peak=1_000_000, impl="fast"),
    ]
    df = tidy([load_run(make_run(rows))])
    t = analysis.summary_table(df, analysis.references(df)).set_index(["mechanism", "impl"])
    col = "speed-up vs full [fast] (x)"
    assert t.loc[("full", "fast"), col] == pytest.approx(1.0)
    assert t.loc[("full", "reference"), col] == pytest.approx(0.25)
    assert t.loc[("full", "reference"), "memory vs full [fast] (x smaller)"] == pytest.approx(0.5)
    assert t.loc[("lin", "fast"), col] == pytest.approx(2.0)
    # Read by a person: below 1 is "N x" the other way, never a negative percentage.
    shown = analysis.display_table(t.reset_index()).set_index(["mechanism", "impl"])
    assert shown.loc[("full", "reference"), "speed-up vs full [fast]"] == "4x slower"
    assert shown.loc[("full", "reference"), "memory vs full [fast]"] == "2x larger"
    assert shown.loc[("lin", "fast"), "memory vs full [fast]"] == "4x smaller"
