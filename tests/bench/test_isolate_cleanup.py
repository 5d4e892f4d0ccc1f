"""An --isolate worker removes its temporary directory when the sweep process that started it is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from attnbench.bench import executors

FAKES_DIR = str(Path(__file__).resolve().parent)
ROOT = str(Path(__file__).resolve().parents[2])

PARENT = """
from attnbench.bench import executors
from attnbench.bench.measure import Settings
from attnbench.bench.points import Grid, expand

points = expand(Grid(mechanisms=["fake_probe"], resolutions=["4"], dims=[8], knobs={"delay": ["3"]})).points
list(executors.Subprocess().run(points, Settings(cpu_min_run_time=0.01, min_samples=3, timeout_s=300.0)))
"""


def _workers_of(job: Path) -> list[int]:
    """Processes whose command line names a file in ``job``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if str(job).encode() in cmd:
                pids.append(int(proc.name))
    return pids


def _wait(cond, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.1)
    return cond()


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the worker")
def test_worker_removes_its_directory_when_the_sweep_is_killed(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path), "ATTNBENCH_PLUGINS": "bench_fakes"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, FAKES_DIR])
    parent = subprocess.Popen([sys.executable, "-c", PARENT], env=env, start_new_session=True)
    try:
        assert _wait(lambda: any(tmp_path.glob(f"attnbench-{parent.pid}-*")), 120), "no worker directory"
        (job,) = tmp_path.glob(f"attnbench-{parent.pid}-*")
        assert _wait(lambda: bool(_workers_of(job)), 60), "no worker started"
        time.sleep(1.0)  # the worker arms its parent watch first thing
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        assert _wait(lambda: not _workers_of(job), 60), "the worker outlived its sweep"
        assert not job.exists() and not list(tmp_path.glob("attnbench-*"))
    finally:
        if parent.poll() is None:
            os.kill(parent.pid, signal.SIGKILL)


def test_the_next_sweep_removes_directories_of_dead_sweeps(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"attnbench-{dead.pid}-abc"
    live = tmp_path / f"attnbench-{os.getpid()}-def"
    other = tmp_path / "attnbench-notapid"
    for d in (stale, live, other):
        d.mkdir()
        (d / "in.json").write_text("{}")
    assert executors.remove_stale_dirs(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and other.exists()
