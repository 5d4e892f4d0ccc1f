"""The matching report and the seed statistics, torch-free: intervals, the table, the figures."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
from attnbench.reports import matching
from attnbench.reports.stats import mean_ci, t_quantile

RUN = Path(__file__).resolve().parents[2] / "results" / "match-quick"


@pytest.mark.parametrize(("df", "table"), [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042)])
def test_t_quantile_agrees_with_the_printed_table(df, table):
    assert t_quantile(0.975, df) == pytest.approx(table, abs=1e-3)


def test_mean_ci():
    values = [0.61, 0.64, 0.7, 0.58]
    mean, lo, hi = mean_ci(values)
    half = t_quantile(0.975, 3) * statistics.stdev(values) / 2
    assert mean == pytest.approx(statistics.mean(values)) and (lo, hi) == pytest.approx((mean - half, mean + half))
    one = mean_ci([0.5])  # one seed: a mean, no interval
    assert one[0] == 0.5 and math.isnan(one[1]) and math.isnan(one[2])
    assert all(math.isnan(v) for v in mean_ci([None, float("nan")]))


def test_report_of_the_committed_quick_run(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(RUN, run)
    page = matching.write_report(run).read_text()
    df, fps, _ = matching.load(run)
    table = matching.summary(df)
    assert set(table["mechanism"]) == {"full", "linear", "quadtree", "pvt"} and (table["seeds"] == 2).all()
    for _, r in table.iterrows():
        assert r["precision lo"] <= r["precision"] <= r["precision hi"]
        assert r["precision"] > 20 * r["chance precision"]
    assert "footprint-figure" in page and "accuracy-cost-figure" in page
    assert {(f["mechanism"], f["state"]) for f in fps} == {
        (m, s) for m in table["mechanism"] for s in ("init", "trained")
    }
    md = matching.markdown(table)
    assert md.count("\n") == 2 + len(table)


def test_report_of_an_empty_run(tmp_path):
    (tmp_path / "results.jsonl").write_text(json.dumps({"point_id": "x", "kind": "other"}) + "\n")
    assert "no finished runs" in matching.build_report(tmp_path)
