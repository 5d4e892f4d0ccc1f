"""Stored samples: compact, the one summary derived from them, re-derived on read."""

from __future__ import annotations

import json

from attnbench.bench import samples

from attnbench import bench


def test_summary_and_compact():
    s = samples.summary([1.0, 2.0, 3.0, 4.0, 5.0])
    assert s == {"latency_ms_median": 3.0, "latency_ms_p20": 1.8, "latency_ms_p80": 4.2, "samples": 5}
    assert samples.compact([0.123456789, 1234.5678]) == [0.1235, 1235.0]


def test_median_interval_ignores_a_minority_of_bursts():
    quiet = [1.0 + 0.001 * i for i in range(40)]
    bursts = quiet[:28] + [5.0] * 12  # 30% of the samples hit by a load burst
    assert samples.spread(bursts) > 1  # p80 lands in the bursts
    assert samples.median_ci_width(bursts) < 0.1  # the median stays pinned
    assert samples.median_ci_width([1.0, 3.0] * 20) >= 1  # a bimodal half and half does not


def test_load_derives_the_summary_from_samples(tmp_path):
    cfg = {"mechanism": "full", "knobs": {}, "height": 8, "width": 8, "batch": 1, "dim": 32, "heads": 2}
    cfg.update({"dtype": "float32", "pass": "fwd", "impl": "fast", "compile": False, "device": "cpu"})
    rec = {"point_id": "p", **cfg, "status": "ok", "latency_ms_median": 99.0}
    rec["latency_samples_ms"] = [1.0, 2.0, 3.0]
    old = {"point_id": "q", **cfg, "height": 16, "status": "ok", "latency_ms_median": 7.0}
    (tmp_path / "results.jsonl").write_text(json.dumps(rec) + "\n" + json.dumps(old) + "\n")
    df = bench.load(tmp_path, derived=False).set_index("point_id")
    assert df.loc["p", "latency_ms_median"] == 2.0 and df.loc["p", "samples"] == 3
    assert df.loc["q", "latency_ms_median"] == 7.0  # a record without samples keeps its stored summary
