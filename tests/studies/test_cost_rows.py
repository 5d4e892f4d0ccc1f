"""Cost rows of the studies come from the harness's one measurement function, with a sweep point's fields;
two writers of one directory, or a directory of another command, are refused in one line."""

from __future__ import annotations

import textwrap
import threading

import pytest
import torch
from attnbench.bench.measure import Settings, measure, measure_module
from attnbench.bench.points import Grid, expand
from attnbench.bench.rundir import RunDirError
from attnbench.bench.store import MEMORY_METHODS, read_results
from attnbench.studies import experiments as E
from attnbench.studies import matching as M

from attnbench import attentions

# What measure_module gives every cost row, as the sweep gives every point.
MEASURED = {
    "status", "threads", "device_name", "params", "first_call_ms", "peak_bytes", "baseline_bytes", "memory_method",
    "latency_samples_ms", "latency_rounds", "latency_ms_median", "latency_ms_p20", "latency_ms_p80", "samples",
    "noisy", "contended", "contention", "probe_ms", "timing_method", "provenance", "host_ms_per_call",
    "overhead_ms", "load_avg", "wall_s", "finished_at",
}  # fmt: skip
QUICK = Settings(cpu_min_run_time=0.01, min_samples=3, rounds=2, count_flops=False)


def sound(row: dict) -> None:
    """A cost row as the sweep stores a point: samples in rounds, a median inside its own p20-p80, flags."""
    missing = MEASURED - set(row)
    assert not missing, f"missing {sorted(missing)}"
    samples = row["latency_samples_ms"]
    assert samples and sum(row["latency_rounds"]) == len(samples) == row["samples"]
    assert row["latency_ms_p20"] <= row["latency_ms_median"] <= row["latency_ms_p80"]
    assert isinstance(row["contended"], bool) and isinstance(row["noisy"], bool)
    assert row["memory_method"] in MEMORY_METHODS and row["peak_bytes"] > 0


def test_a_module_measured_as_a_sweep_point_and_as_a_cost_row_gets_the_same_fields():
    point = expand(Grid(mechanisms=["full"], resolutions=["6"], dims=[16], heads=[2], devices=["cpu"])).points[0]
    swept = measure(point, QUICK)
    torch.manual_seed(0)
    module = attentions.build("full", dim=16, heads=2)
    x, hw = module.example_inputs(1, (6, 6))
    direct = measure_module(module, (x, hw), QUICK)
    sound(swept)
    sound(direct)
    assert swept["memory_method"] == direct["memory_method"]
    assert swept["params"] == direct["params"] and swept["threads"] == direct["threads"] == 1
    # the same timer; the rounds kept (after contended ones were taken again) may differ
    assert swept["timing_method"].split(";")[0] == direct["timing_method"].split(";")[0]


def test_measure_module_records_a_failure_as_its_status():
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("no")

    record = measure_module(Broken(), (torch.zeros(2),), QUICK)
    assert record["status"] == "error" and "no" in record["reason"]
    assert "latency_ms_median" not in record and "peak_bytes" not in record  # no number under a failed label


TINY = """
name: tiny
seeds: 1
modes:
  quick: {tiny: true, resolution: 32, epochs: 1, batch: 8, train_size: 8, val_size: 8, cost_resolutions: [32]}
variants:
  - name: full
    model: pyramid_full
"""


def test_reproduce_smoke_cost_rows_are_sweep_records(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(textwrap.dedent(TINY))
    E.run(E.load(str(path)), "smoke", tmp_path / "out", log=lambda s: None)
    (cost,) = [r for r in read_results(tmp_path / "out").records if r.get("kind") == "experiment_cost"]
    sound(cost)
    assert cost["train_peak_bytes"] > 0 and cost["macs"] > 0


def test_match_smoke_cost_rows_are_sweep_records(tmp_path):
    cfg = M.MatchRunConfig(mechanisms=("full", "linear"), out=str(tmp_path / "m"), seeds=1, preset="smoke")
    M.run(cfg, log=lambda s: None)
    rows = [r for r in read_results(tmp_path / "m").records if r.get("kind") == "match"]
    assert len(rows) == 2
    for row in rows:
        sound(row)
        assert row["threads"] == 1


def test_a_second_reproduce_into_one_directory_is_refused_while_the_first_writes(tmp_path, monkeypatch):
    path = tmp_path / "tiny.yaml"
    path.write_text(textwrap.dedent(TINY))
    exp, out = E.load(str(path)), tmp_path / "out"
    started, release, refused = threading.Event(), threading.Event(), []
    real = E.cost_row

    def slow_cost(*args, **kwargs):  # the first run holds the directory here while the second tries
        started.set()
        release.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(E, "cost_row", slow_cost)
    first = threading.Thread(target=lambda: E.run(exp, "smoke", out, log=lambda s: None))
    first.start()
    assert started.wait(120)
    try:
        with pytest.raises(RunDirError, match=r"is being written by another reproduce \(pid \d+"):
            E.run(exp, "smoke", out, log=lambda s: refused.append(s))
    finally:
        release.set()
        first.join()
    assert not refused  # refused before any work
    ids = [r["point_id"] for r in read_results(out).records]
    assert len(ids) == len(set(ids)) == 2


def test_reproduce_and_match_refuse_a_sweeps_directory(tmp_path):
    from attnbench.bench.sweep import run_sweep

    sweep = tmp_path / "sweep"
    run_sweep(Grid(mechanisms=["full"], resolutions=["4"], dims=[8], devices=["cpu"]), sweep, QUICK)
    before = (sweep / "results.jsonl").read_text()
    path = tmp_path / "tiny.yaml"
    path.write_text(textwrap.dedent(TINY))
    with pytest.raises(RunDirError, match="holds a sweep run; `attnbench reproduce` writes its own kind"):
        E.run(E.load(str(path)), "smoke", sweep, log=lambda s: None)
    with pytest.raises(RunDirError, match="holds a sweep run; `attnbench match` writes its own kind"):
        M.run(M.MatchRunConfig(mechanisms=("full",), out=str(sweep), seeds=1, preset="smoke"), log=lambda s: None)
    assert (sweep / "results.jsonl").read_text() == before
