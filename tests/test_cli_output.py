"""What the CLI prints and where it writes: `list` at 80 columns, the skip reasons of a sweep, the report's
default path."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from attnbench.bench.points import Grid, expand
from typer.testing import CliRunner

from attnbench import attentions, cli


def test_list_fits_80_columns_and_cuts_no_knob(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    res = CliRunner().invoke(cli.app, ["list"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in res.output
    for name in attentions.available():
        assert any(line.startswith(f"{name}: ") for line in lines)
        for knob, spec in attentions.get(name).describe()["knobs"].items():
            assert any(f"{knob}={spec['default']}" in line for line in lines)  # whole, on one line


def test_a_sweep_prints_each_skip_reason_once_with_its_count(tmp_path):
    args = ["sweep", "-m", "swin", "-r", "32", "-b", "1,2", "--dim", "32", "--heads", "2", "-k", "window=7"]
    res = CliRunner().invoke(cli.app, [*args, "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    flat = " ".join(res.output.split())
    assert flat.count("skipped 2 points: swin: the map 32x32") == 1
    assert "pass pad=True" in flat and "done: skipped 2" in flat


def _run(tmp: Path) -> Path:
    point = expand(Grid(mechanisms=["full"], resolutions=["4"], dims=[8], devices=["cpu"])).points[0]
    run = tmp / "run"
    run.mkdir()
    (run / "env.json").write_text(json.dumps({"torch": torch.__version__}))
    rec = {**point.to_json(), "status": "ok", "latency_ms_median": 1.0, "peak_bytes": 100}
    (run / "results.jsonl").write_text(json.dumps(rec) + "\n")
    return run


def test_report_without_out_writes_into_the_run(tmp_path, monkeypatch):
    run = _run(tmp_path)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    res = CliRunner().invoke(cli.app, ["report", str(run)])
    assert res.exit_code == 0, res.output
    assert (run / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert not (elsewhere / "report.html").exists()
