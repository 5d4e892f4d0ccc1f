"""Data-parallel training on the CPU: two processes with the gloo backend, started by torch's launcher.

Tolerance: at the same global batch (8) and data order, the losses of the first steps of two processes
equal those of one process within 1e-5 absolute (float32; the gradients are summed in another order, so
the last bits may differ: seen 1.2e-7). Only rank 0 writes (every rank logs, through Python's audit
events, the files it opens for writing, renames, removes or makes). A kill of rank 1 right after the
first epoch's checkpoint, followed by the same command, ends with the final weights of an uninterrupted
two-process run bit for bit, and started again once complete gives its stored row. reproduce trains a
variant in two processes to the accuracy of one; match trains in two processes with rank 0 alone writing.
Each two-process case costs one to three launches of two Python processes (seconds each, more on a busy
machine).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from attnbench.bench.rundir import KILL_ENV
from attnbench.bench.store import read_results
from attnbench.studies import distributed as D
from attnbench.studies.train import TrainConfig, TrainError, train

TOLERANCE = 1e-5


def _cfg(out: Path, nproc: int) -> TrainConfig:
    return TrainConfig(
        "pyramid_full", str(out), tiny=True, epochs=2, batch=8, train_size=32, val_size=8, resolution=32, lr=2e-3,
        nproc=nproc,
    )  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dist")
    one = train(_cfg(root / "one", 1), progress=False)
    mp = pytest.MonkeyPatch()
    mp.setenv(D.AUDIT_ENV, str(root / "writes"))
    try:
        two = train(_cfg(root / "two", 2), progress=False)
    finally:
        mp.undo()
    return {"root": root, "one": one, "two": two}


def test_two_processes_take_the_steps_of_one_at_the_same_global_batch(runs):
    one, two = runs["one"]["step_losses"], runs["two"]["step_losses"]
    assert len(one) == len(two) == 2 * 4  # 32 images, global batch 8: 4 steps per epoch
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) < TOLERANCE
    assert runs["two"]["world_size"] == 2 and runs["one"]["world_size"] == 1
    rows = [r for r in read_results(runs["root"] / "two").records if r["kind"] == "train_epoch"]
    assert [r["world_size"] for r in rows] == [2, 2]
    for r in rows:
        assert 0 <= r["data_wait_share"] < 1
        assert r["images_per_s_per_device"] == pytest.approx(r["images_per_s"] / 2)


def test_rank_0_alone_writes(runs):
    root = runs["root"]
    written = {r: Path(f"{root / 'writes'}.rank{r}").read_text().splitlines() for r in (0, 1)}
    assert any("checkpoint.pt" in line for line in written[0])
    assert any("results.jsonl" in line for line in written[0])
    assert not [line for line in written[1] if str(root) in line], written[1]
    ids = [r["point_id"] for r in read_results(root / "two").records]
    assert len(ids) == len(set(ids)) == 3  # two epoch rows and the final row, each once


def test_a_killed_rank_is_continued_by_the_same_command_to_the_same_weights(runs, tmp_path, monkeypatch):
    out = tmp_path / "killed"
    monkeypatch.setenv(KILL_ENV, "checkpoint@rank1:1")
    with pytest.raises(D.DistributedError, match="rank 1 of 2 failed"):
        train(_cfg(out, 2), progress=False)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
    monkeypatch.delenv(KILL_ENV)
    train(_cfg(out, 2), progress=False)
    ours = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    theirs = torch.load(runs["root"] / "two" / "checkpoint.pt", weights_only=True)["model"]
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    ids = [r["point_id"] for r in read_results(out).records]
    assert len(ids) == len(set(ids)) == 3
    again = train(_cfg(out, 2), progress=False)  # complete: rank 0 gives the stored row, the others train nothing
    assert again["reused"] and again["step_losses"] == []


def test_the_global_batch_must_split_evenly(tmp_path):
    with pytest.raises(TrainError, match="multiple of the 3 processes"):
        train(_cfg(tmp_path / "x", 3), progress=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("env", "world"),
    [
        ({}, D.World()),
        ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, D.World(1, 4, 1, "torch")),
        ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}, D.World(5, 8, 1, "slurm")),
    ],
)
def test_the_world_is_read_from_torchrun_or_slurm(env, world):
    assert D.from_env(env) == world


def test_slurm_rendezvous_defaults_and_a_bad_rank():
    assert D._slurm_rendezvous({"MASTER_ADDR": "n1", "SLURM_JOB_ID": "123"}) == {"MASTER_PORT": "20123"}
    with pytest.raises(D.DistributedError, match="outside a world of 2"):
        D.from_env({"RANK": "2", "WORLD_SIZE": "2"})


ONE_VARIANT = """\
name: one
title: one tiny variant
seeds: 1
modes:
  quick: {tiny: true, resolution: 32, epochs: 1, batch: 8, train_size: 16, val_size: 8, cost_resolutions: [32],
          cost_batch: 1, recipe: none, lr_rule: "5e-4 x batch / 512", recipe_source: "a test"}
variants:
  - name: swin
    model: pyramid_swin
    stages: [{attention: swin, knobs: [{window: 4}, {window: 4, shift: true}]}, null, null, null]
"""


def test_reproduce_trains_each_variant_in_two_processes_as_in_one(tmp_path):
    from attnbench.studies import experiments as E

    (tmp_path / "one.yaml").write_text(ONE_VARIANT)
    exp = E.load(str(tmp_path / "one.yaml"))
    with pytest.raises(E.ExperimentError, match="batch 8 must be a multiple of it"):
        E.run(exp, "quick", tmp_path / "bad", nproc=3, log=lambda s: None)
    rows = {}
    for n in (1, 2):
        E.run(exp, "quick", tmp_path / f"n{n}", nproc=n, log=lambda s: None)
        (rows[n],) = [r for r in read_results(tmp_path / f"n{n}").records if r["kind"] == "experiment"]
    assert rows[2]["accuracy"] == rows[1]["accuracy"] and rows[2]["val_loss"] == pytest.approx(rows[1]["val_loss"])
    final = [r for r in read_results(tmp_path / "n2" / "runs" / "quick" / "swin" / "seed0").records]
    assert {r["world_size"] for r in final} == {2}


def test_cli_refuses_a_batch_that_does_not_split_before_any_process_starts(tmp_path):
    from typer.testing import CliRunner

    from attnbench.cli import app

    out = tmp_path / "run"
    args = ["train", "--model", "pyramid_full", "--tiny", "--batch", "8", "--nproc", "3", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "must be a multiple of the 3 processes" in result.output
    assert not out.exists()


def test_slurm_submission_asks_one_task_per_gpu(tmp_path, monkeypatch):
    import submitit
    from attnbench.studies import train as T

    asked: dict = {}

    class FakeExecutor:
        def __init__(self, folder, cluster):
            asked.update(folder=str(folder), cluster=cluster)

        def update_parameters(self, **kw):
            asked.update(kw)

        def submit(self, fn, cfg):
            asked.update(fn=fn, cfg=cfg)
            return type("Job", (), {"job_id": "77"})()

    monkeypatch.setattr(submitit, "AutoExecutor", FakeExecutor)
    cfg = TrainConfig("pyramid_full", str(tmp_path / "run"), tiny=True, batch=64, device="cuda", nproc=8, nodes=4,
                      cluster="slurm", partition="gpu")  # fmt: skip
    result = train(cfg, progress=False)
    assert result == {"submitted": "77", "logs": f"{tmp_path / 'run'}.slurm", "tasks": 32}
    assert (asked["nodes"], asked["tasks_per_node"], asked["gpus_per_node"]) == (4, 8, 8)
    assert asked["cluster"] == "slurm" and asked["slurm_partition"] == "gpu" and asked["fn"] is T._slurm_task
    assert asked["cfg"].cluster is None and not (tmp_path / "run").exists()


def test_match_trains_in_two_processes_and_rank_0_alone_writes(tmp_path, monkeypatch):
    from attnbench.studies import matching as M

    settings = {"epochs": 1, "train_size": 8, "val_size": 4, "dim": 16, "layers": ("self", "cross")}
    cfg = M.MatchRunConfig(
        mechanisms=("full",), out=str(tmp_path / "run"), seeds=2, preset="smoke", resolution=64, batch=4,
        overrides=tuple(settings.items()), nproc=2,
    )  # fmt: skip
    with pytest.raises(M.MatchError, match="batch 4 .* must be a multiple of it"):
        M.run(dataclasses.replace(cfg, nproc=3), log=lambda s: None)
    monkeypatch.setenv(D.AUDIT_ENV, str(tmp_path / "writes"))
    rows = M.run(cfg, log=lambda s: None)
    assert [(r["seed"], r["world_size"]) for r in rows] == [(0, 2), (1, 2)]
    stored = [r["point_id"] for r in read_results(tmp_path / "run").records]
    assert sorted(stored) == sorted(r["point_id"] for r in rows)
    rank1 = Path(f"{tmp_path / 'writes'}.rank1").read_text().splitlines()
    assert not [line for line in rank1 if str(tmp_path / "run") in line], rank1


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--recipe", "timm"], "--recipe must be one of none, deit"),
        (["--ema", "2"], "--ema must be a decay in (0, 1)"),
        (["--cluster", "pbs"], "--cluster must be slurm"),
        (["--workers", "-1"], "--workers must be 0 or more"),
        (["--nproc", "0"], "--nproc must be at least 1"),
        (["--data", "cifar10:/nowhere"], "expected /nowhere/cifar-10-batches-py/"),
    ],
)
def test_bad_training_options_are_one_line_and_write_nothing(tmp_path, extra, says):
    from typer.testing import CliRunner

    from attnbench.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--model", "pyramid_full", "--tiny", *extra, "--out", str(out)])
    assert result.exit_code == 2 and says in " ".join(result.output.split()), result.output
    assert not out.exists()
