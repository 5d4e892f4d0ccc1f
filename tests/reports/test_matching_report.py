"""The matching report and the seed statistics, torch-free: intervals, the table, the figures, the controls' verdict
(judged on AUC@10; precision shown, not judged)."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import pandas as pd
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


def _rows(auc: dict[str, list[float]], matches: dict[str, float]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"mechanism": m, "auc@10": a, "precision": 0.5, "matches_per_pair": matches[m]}
            for m, values in auc.items()
            for a in values
        ]
    )


FULL = [0.149, 0.133, 0.126, 0.140, 0.137]
TWIN = [0.128, 0.116, 0.108, 0.137, 0.160]


def test_an_isolated_control_below_full_on_auc_holds_and_the_run_ranks():
    iso = [0.044, 0.056, 0.062, 0.059, 0.053]
    html = matching.controls_html(
        _rows(
            {"full": FULL, "full.twin": TWIN, "full.isolated": iso}, {"full": 35.0, "full.twin": 34, "full.isolated": 9}
        )
    )
    assert "Both controls held" in html and "Ranking" in html
    assert "full.isolated makes 9.0 matches per pair, full 35.0" in html


def test_a_positive_control_that_overlaps_full_fails_and_nothing_is_ranked():
    self_only = [0.150, 0.120, 0.139, 0.131, 0.128]
    html = matching.controls_html(
        _rows(
            {"full": FULL, "full.twin": TWIN, "full.self-only": self_only},
            {"full": 35, "full.twin": 34, "full.self-only": 33},
        )
    )
    assert "Controls failed: positive control full.self-only" in html and "Ranking" not in html
