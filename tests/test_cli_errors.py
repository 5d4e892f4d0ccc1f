"""Every bad input gets one line saying what to change, exit status 2, no traceback and nothing written."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from attnbench.bench.points import Grid, expand
from typer.testing import CliRunner

from attnbench import cli

TRAIN = ["train", "-m", "pyramid_full", "--tiny", "--train-size", "8", "--val-size", "8", "--batch", "8"]


def run_dir(tmp: Path) -> None:
    """A run directory holding one stored point of full attention."""
    point = expand(Grid(mechanisms=["full"], resolutions=["4"], dims=[8], devices=["cpu"])).points[0]
    (tmp / "run").mkdir()
    (tmp / "run" / "env.json").write_text(json.dumps({"torch": torch.__version__}))
    rec = {**point.to_json(), "status": "ok", "latency_ms_median": 1.0, "peak_bytes": 100}
    (tmp / "run" / "results.jsonl").write_text(json.dumps(rec) + "\n")


def trained(checkpoint: Callable[[Path], None]) -> Callable[[Path], None]:
    """A training run directory that the same command would continue, but for its checkpoint."""

    def setup(tmp: Path) -> None:
        import dataclasses

        from attnbench.studies.train import TRAIN_JSON, TrainConfig

        d = tmp / "t"
        d.mkdir()
        made = TrainConfig("pyramid_full", "t", tiny=True, resolution=32, batch=8, train_size=8, val_size=8)
        config = dataclasses.asdict(made)
        (d / TRAIN_JSON).write_text(json.dumps({"config": config, "status": "interrupted"}))
        checkpoint(d / "checkpoint.pt")

    return setup


def truncated(path: Path) -> None:
    torch.save({"epoch": 1, "step": 1, "model": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:300])


class Payload:
    def __reduce__(self):  # unpickling would call os.getcwd: weights_only must refuse it
        return (os.getcwd, ())


def write(name: str, text: str) -> Callable[[Path], None]:
    return lambda tmp: (tmp / name).write_text(text)


CASES: dict[str, tuple[list[str], Callable[[Path], None] | None, str]] = {
    "config-missing": (["sweep", "--config", "nope.yaml", "--out", "o"], None, "no such file"),
    "config-directory": (["sweep", "--config", "cfg", "--out", "o"], lambda t: (t / "cfg").mkdir(), "directory"),
    "config-malformed": (["sweep", "--config", "bad.yaml", "--out", "o"], write("bad.yaml", "grid: [a\n"), "line 2"),
    "config-python-tag": (
        ["sweep", "--config", "tag.yaml", "--out", "o"],
        write("tag.yaml", "grid: !!python/object/apply:os.system ['touch pwned']\n"),
        "tag",
    ),
    "config-rounds-0": (
        ["sweep", "-m", "full", "-r", "4", "--config", "r.yaml", "--out", "o"],
        write("r.yaml", "grid: {}\nsettings: {rounds: 0}\n"),
        "setting rounds must be above 0",
    ),
    "sweep-threads-0": (["sweep", "-m", "full", "-r", "4", "--threads", "0", "--out", "o"], None, "--threads"),
    "train-threads-0": ([*TRAIN, "--threads", "0", "--out", "t"], None, "--threads"),
    "report-out-directory": (["report", "run", "--out", "html"], lambda t: (run_dir(t), (t / "html").mkdir()), "--out"),
    "flops-model-nosuch": (["flops", "--model", "nosuch.module:fn"], None, "cannot import nosuch.module"),
    "resume-truncated": ([*TRAIN, "--resume", "--epochs", "2", "--out", "t"], trained(truncated), "cannot be loaded"),
    "resume-empty": (
        [*TRAIN, "--resume", "--epochs", "2", "--out", "t"],
        trained(lambda p: p.write_bytes(b"")),
        "empty",
    ),
    "resume-malicious": (
        [*TRAIN, "--resume", "--epochs", "2", "--out", "t"],
        trained(lambda p: torch.save({"epoch": 1, "x": Payload()}, p)),
        "cannot be loaded",
    ),
    "markup-sweep-mechanism": (["sweep", "-m", "a[/]b", "--out", "o"], None, "unknown mechanism 'a[/]b'"),
    "markup-sweep-out": (["sweep", "-m", "full", "-r", "", "--out", "x[/]y"], None, "--resolution"),
    "markup-report-path": (["report", "no[/]such"], None, "no[/]such"),
    "markup-compare-path": (["compare", "[red]a", "[/]b"], None, "[red]a"),
    "markup-flops-mechanism": (["flops", "-m", "[bold]x[/]"], None, "unknown mechanism '[bold]x[/]'"),
    "markup-train-model": ([*TRAIN, "-m", "[/]m", "--out", "t"], None, "unknown model '[/]m'"),
    "sweep-timeout-negative": (["sweep", "-m", "full", "-r", "4", "--timeout", "-5", "--out", "o"], None, "--timeout"),
    "sweep-resolution-empty": (["sweep", "-m", "full", "-r", "", "--out", "o"], None, "--resolution"),
    "sweep-impl-turbo": (["sweep", "-m", "full", "-r", "4", "--impl", "turbo", "--out", "o"], None, "turbo"),
    "sweep-device-cuda": (["sweep", "-m", "full", "-r", "4", "--device", "cuda", "--out", "o"], None, "CUDA"),
    "report-baseline-nosuch": (["report", "run", "--baseline", "nosuch", "--format", "md"], run_dir, "nosuch"),
    "train-size-0": ([*TRAIN[:-4], "--train-size", "0", "--out", "t"], None, "--train-size"),
    # train, reproduce and match: their options and run directories
    "train-out-file": ([*TRAIN, "--out", "f"], write("f", "not a directory"), "is a file"),
    "train-seed-negative": ([*TRAIN, "--seed", "-1", "--out", "t"], None, "--seed must be 0 or more"),
    "train-lr-inf": ([*TRAIN, "--lr", "inf", "--out", "t"], None, "--lr must be a positive finite number"),
    "train-lr-nan": ([*TRAIN, "--lr", "nan", "--out", "t"], None, "--lr must be a positive finite number"),
    "train-resolution-0": ([*TRAIN, "-r", "0", "--out", "t"], None, "--resolution must be at least 1"),
    "train-into-sweep": (
        [*TRAIN, "--out", "run"],
        lambda t: (run_dir(t), write("run/sweep.json", "{}")(t)),
        "sweep run",
    ),
    "train-other-options": ([*TRAIN, "--seed", "1", "--out", "t"], trained(lambda p: None), "other options (seed"),
    "reproduce-work-file": (
        ["reproduce", "quadtree_mechanisms", "--smoke", "--work", "w", "--out", "o"],
        write("w", "x"),
        "--work w is a file",
    ),
    "reproduce-seeds-negative": (
        ["reproduce", "quadtree_mechanisms", "--seeds", "-1", "--out", "o"],
        None,
        "--seeds must be at least 1",
    ),
    "reproduce-compare-missing": (
        ["reproduce", "quadtree_mechanisms", "--smoke", "--compare", "nonexistent", "--out", "o"],
        None,
        "--compare nonexistent: no results.jsonl",
    ),
    "reproduce-into-sweep": (
        ["reproduce", "quadtree_mechanisms", "--smoke", "--out", "run"],
        lambda t: (run_dir(t), write("run/sweep.json", "{}")(t)),
        "holds a sweep run",
    ),
    "match-resolution-huge": (["match", "--smoke", "-r", "100000", "--out", "o"], None, "from 32 to 1024 px"),
    "match-threads-0": (["match", "--smoke", "--threads", "0", "--out", "o"], None, "--threads must be at least 1"),
    "match-into-sweep": (
        ["match", "--smoke", "--out", "run"],
        lambda t: (run_dir(t), write("run/sweep.json", "{}")(t)),
        "holds a sweep run",
    ),
    "match-other-settings": (
        ["match", "--smoke", "-m", "full", "--seeds", "1", "-r", "64", "--out", "m"],
        lambda t: ((t / "m").mkdir(), write("m/match.json", '{"preset": "smoke", "resolution": 32}')(t)),
        "other settings (",
    ),
}


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, monkeypatch):
    args, setup, says = CASES[case]
    if case == "sweep-device-cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.chdir(tmp_path)
    if setup is not None:
        setup(tmp_path)
    before = snapshot(tmp_path)
    res = CliRunner().invoke(cli.app, args)
    out = res.output.strip()
    assert res.exit_code == 2, out
    assert len(out.splitlines()) == 1, out
    assert out.startswith("error: ") and says in out, out
    assert "Traceback" not in out and isinstance(res.exception, SystemExit)
    assert snapshot(tmp_path) == before


def test_user_strings_are_printed_as_they_are_not_as_rich_markup(tmp_path, monkeypatch):
    import shutil

    from attnbench.bench import executors

    class Instant(executors.InProcess):
        def run(self, points, settings):
            for p in points:
                rec = {**p.to_json(), "status": "ok", "reason": None, "device_name": "cpu", "noisy": False}
                yield rec | {"latency_ms_median": 1.0, "latency_ms_p20": 0.9, "latency_ms_p80": 1.1, "peak_bytes": 100}

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(executors, "InProcess", Instant)
    runner = CliRunner()
    res = runner.invoke(
        cli.app, ["sweep", "-m", "full", "-r", "4", "--dim", "8", "--device", "cpu", "--out", "[red]r[/]"]
    )
    assert res.exit_code == 0, res.output
    assert "already in [red]r[/]" in res.output and "results in [red]r[/]/results.jsonl" in res.output
    shutil.copytree(tmp_path / "[red]r[/]", tmp_path / "[bold]new")
    res = runner.invoke(cli.app, ["compare", "[red]r[/]", "[bold]new"])
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output and "1 matched points" in res.output


def test_flops_reads_maps_and_knobs_in_the_sweep_grammar():
    from attnbench.bench.points import parse_knob, parse_resolution

    runner = CliRunner()
    args = ["flops", "-m", "quadtree", "-r", "64px:s1", "--dim", "16", "--heads", "2", "-k", "topk=[4,2]", "--json"]
    res = runner.invoke(cli.app, [*args, "-k", "levels=2"])
    assert res.exit_code == 0, res.output
    assert "at 16x16 tokens" in json.loads(res.output)["what"] and parse_resolution("64px:s1")[0].hw == (16, 16)
    assert parse_knob("topk=[4,2]") == ("topk", [["4", "2"]])
    res = runner.invoke(cli.app, ["flops", "-m", "full", "-r", "224px"])  # four stages: not one map
    assert res.exit_code == 2 and "one map" in res.output
