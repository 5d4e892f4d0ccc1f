"""kill -9 at every named window of train, reproduce and match: the same command, run again, finishes with
the rows (ids once each, the same metrics) and, for train, the same final weights as an uninterrupted run.

The process is forked and kills itself with SIGKILL at the window named in ATTNBENCH_KILL_AT
(``bench.rundir.kill_point``): a kill at exactly that moment, as a kill from outside would be, with
nothing flushed or cleaned up. Windows: ``created`` (the run directory exists, nothing trained),
``checkpoint:N`` (right after the N-th epoch's checkpoint, before its row is stored), ``final`` (train:
after the last epoch, before the final row), ``trained`` (reproduce and match: a training finished,
its row not yet stored), ``stored`` (match: the row stored, the checkpoint not yet removed).
"""

from __future__ import annotations

import os
import signal
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from attnbench.bench.rundir import KILL_ENV
from attnbench.bench.store import read_results
from attnbench.studies import experiments as E
from attnbench.studies import matching as M
from attnbench.studies.train import TrainConfig, train

# The fields that an uninterrupted run and a killed-then-continued one must share (timings aside).
SAME = ("point_id", "kind", "status", "epoch", "train_loss", "train_accuracy", "val_loss", "accuracy", "lr")
SAME += ("params", "macs", "precision", "recall", "auc@3", "auc@5", "auc@10", "seed", "variant", "epochs")


def killed_at(window: str, fn: Callable[[], object]) -> None:
    """Run ``fn`` in a forked child that SIGKILLs itself at ``window``; the child must die there."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.environ[KILL_ENV] = window
            fn()
        except BaseException:  # noqa: BLE001
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"not killed at {window} ({status})"


def rows(out: Path) -> list[dict]:
    return [{k: r.get(k) for k in SAME} for r in read_results(out).records]


def unique_ids(out: Path) -> None:
    ids = [r["point_id"] for r in read_results(out).records]
    assert len(ids) == len(set(ids)), sorted(ids)


def _train_cfg(out: Path) -> TrainConfig:
    return TrainConfig(
        "pyramid_full", str(out), tiny=True, epochs=2, batch=8, train_size=16, val_size=8, resolution=32, lr=2e-3
    )


@pytest.fixture(scope="module")
def train_baseline(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "straight"
    train(_train_cfg(out), progress=False)
    return out


@pytest.mark.parametrize("window", ["created", "checkpoint:1", "checkpoint:2", "final"])
def test_train_killed_at_each_window_is_finished_by_the_same_command(tmp_path, train_baseline, window):
    out = tmp_path / "run"
    killed_at(window, lambda: train(_train_cfg(out), progress=False))
    assert out.is_dir()
    result = train(_train_cfg(out), progress=False)
    assert not result["reused"]
    assert rows(out) == rows(train_baseline)
    unique_ids(out)
    ours = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    theirs = torch.load(train_baseline / "checkpoint.pt", weights_only=True)["model"]
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)  # bit for bit


TINY = """
name: tiny
seeds: 2
modes:
  quick: {tiny: true, resolution: 32, epochs: 2, batch: 8, train_size: 16, val_size: 8, cost_resolutions: [32],
          cost_batch: 1}
variants:
  - name: full
    model: pyramid_full
"""


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> tuple[E.Experiment, Path]:
    root = tmp_path_factory.mktemp("exp")
    path = root / "tiny.yaml"
    path.write_text(textwrap.dedent(TINY))
    exp = E.load(str(path))
    E.run(exp, "quick", root / "straight", log=lambda s: None)
    return exp, root / "straight"


@pytest.mark.parametrize("window", ["created", "checkpoint:3", "trained:2"])
def test_reproduce_killed_at_each_window_is_finished_by_the_same_command(tmp_path, experiment, window):
    exp, straight = experiment
    out = tmp_path / "out"
    killed_at(window, lambda: E.run(exp, "quick", out, log=lambda s: None))
    E.run(exp, "quick", out, log=lambda s: None)
    assert sorted(rows(out), key=str) == sorted(rows(straight), key=str)
    unique_ids(out)
    for seed in (0, 1):  # the training runs in the work directory: the same weights
        ours = torch.load(out / "runs/quick/full" / f"seed{seed}" / "checkpoint.pt", weights_only=True)["model"]
        theirs = torch.load(straight / "runs/quick/full" / f"seed{seed}" / "checkpoint.pt", weights_only=True)
        assert all(torch.equal(ours[k], theirs["model"][k]) for k in ours)


def _match_cfg(out: Path) -> M.MatchRunConfig:
    settings = {"epochs": 2, "train_size": 8, "val_size": 4, "dim": 16, "layers": ("self", "cross")}
    return M.MatchRunConfig(
        mechanisms=("full",), out=str(out), seeds=2, preset="smoke", resolution=32, overrides=tuple(settings.items())
    )


@pytest.fixture(scope="module")
def match_baseline(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("match") / "straight"
    M.run(_match_cfg(out), log=lambda s: None)
    return out


@pytest.mark.parametrize("window", ["created", "checkpoint:1", "trained:2", "stored:1"])
def test_match_killed_at_each_window_is_finished_by_the_same_command(tmp_path, match_baseline, window):
    out = tmp_path / "run"
    killed_at(window, lambda: M.run(_match_cfg(out), log=lambda s: None))
    M.run(_match_cfg(out), log=lambda s: None)
    assert rows(out) == rows(match_baseline)
    unique_ids(out)
    assert not (out / M.CHECKPOINTS).exists()  # every checkpoint removed once its row is stored
    states = [line for line in (out / M.FOOTPRINTS).read_text().splitlines()]
    assert len(states) == len((match_baseline / M.FOOTPRINTS).read_text().splitlines())  # each once
