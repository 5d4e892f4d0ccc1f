"""The reproduce report and the seed statistics: torch-free, from stored rows only."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from attnbench.bench.store import ResultsStore
from attnbench.reports.experiments import build_page, ranking, summarise
from attnbench.reports.stats import mean_ci, overlap, t_quantile


def test_student_t_quantiles_and_intervals():
    # two-sided 95%: 12.706 for one degree of freedom, 4.303 for two, 1.96 in the limit
    assert t_quantile(0.975, 1) == pytest.approx(12.7062, abs=1e-3)
    assert t_quantile(0.975, 2) == pytest.approx(4.3027, abs=1e-3)
    assert t_quantile(0.975, 10_000) == pytest.approx(1.9602, abs=1e-3)
    mean, lo, hi = mean_ci([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6) and hi - mean == pytest.approx(4.3027 * 0.1 / math.sqrt(3), rel=1e-4)
    assert lo == pytest.approx(2 * mean - hi)
    one = mean_ci([0.4])
    assert one[0] == 0.4 and math.isnan(one[1]) and math.isnan(one[2])
    assert overlap((0.5, 0.4, 0.6), (0.55, 0.5, 0.7)) and not overlap((0.5, 0.45, 0.55), (0.7, 0.65, 0.75))


def _store(tmp_path, name, mode, accs, published=None):
    out = tmp_path / name
    store = ResultsStore(out)
    store.open({"cpu_model": "test"})
    for variant, values in accs.items():
        pub = (published or {}).get(variant, {})
        for seed, a in enumerate(values):
            store.append({
                "point_id": f"exp:e:{mode}:{variant}:seed{seed}", "kind": "experiment", "status": "ok",
                "experiment": "e", "mode": mode, "variant": variant, "seed": seed, "accuracy": a, "params": 1000,
                "macs": 2e6 if variant == "a" else 1e6, "resolution": 32, "published": pub,
            })  # fmt: skip
        store.append({
            "point_id": f"exp:e:{mode}:{variant}:cost32", "kind": "experiment_cost", "experiment": "e", "mode": mode,
            "variant": variant, "resolution": 32, "batch": 4, "latency_ms_median": 2.0, "latency_ms_p20": 1.5,
            "latency_ms_p80": 2.5, "peak_bytes": 2**20, "macs": 1e6,
        })  # fmt: skip
    title = {"name": "e", "title": "an <experiment>", "task": "why"}
    (out / "experiment.json").write_text(json.dumps({mode: {"experiment": title, "data": "synthetic"}}))
    return out


def test_ranking_agrees_disagrees_or_is_within_noise(tmp_path):
    pub = {"a": {"top1": 80.0}, "b": {"top1": 70.0}, "c": {"top1": 75.0}}
    out = _store(tmp_path, "q", "quick", {"a": [0.9, 0.91, 0.92], "b": [0.5, 0.51, 0.52], "c": [0.95, 0.96, 0.97]},
                 pub)  # fmt: skip
    from attnbench.reports.experiments import load_rows

    s = summarise(load_rows([out])[0])
    r = ranking(s)
    assert r["a"] == "agrees with 1, disagrees with 1"  # a > b as in the paper; a < c against it
    assert r["b"] == "agrees with 2" and r["c"] == "agrees with 1, disagrees with 1"
    noisy = _store(tmp_path, "n", "quick", {"a": [0.5, 0.9, 0.7], "b": [0.6, 0.8, 0.4]}, pub)
    r = ranking(summarise(load_rows([noisy])[0]))
    assert r["a"] == "within seed noise of 1"


def test_quick_and_full_on_one_page_escaped_and_torch_free(tmp_path):
    quick = _store(tmp_path, "q", "quick", {"a": [0.9, 0.8, 0.85], "b": [0.5, 0.52, 0.51]})
    full = _store(tmp_path, "f", "full", {"a": [0.81], "b": [0.7]}, {"a": {"top1": 80.0, "gmacs": 4.5}})
    code = (
        "import sys; from reports.experiments import build_page; "
        f"page = build_page([{str(quick)!r}, {str(full)!r}]); "
        "assert 'torch' not in sys.modules, 'the report imported torch'; print(len(page))"
    )
    assert subprocess.run([sys.executable, "-c", code], check=True, capture_output=True).returncode == 0
    page = build_page([quick, full])
    assert "an &lt;experiment&gt;" in page and "<experiment>" not in page
    assert "quick: trained at 32 px, 3 seed(s)" in page and "full: trained at 32 px, 1 seed(s)" in page
    assert "paper GMACs" in page  # the full mode shows the paper's cost beside ours
    assert "One seed per variant" in page and "Pairs whose 95% intervals do not overlap: a vs b" in page
    assert page.count("plot-0") >= 1 and "paper (full)" in page
