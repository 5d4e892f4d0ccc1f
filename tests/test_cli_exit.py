"""``attnbench`` and ``python -m attnbench`` end through ``cli.entry``: the app's exit status, its output
flushed, the exit handlers run, and no interpreter teardown (``os._exit``) unless another thread still runs."""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from attnbench import cli

REPO = Path(__file__).resolve().parents[1]


class Exited(Exception):
    def __init__(self, how: str, status: object):
        super().__init__(how, status)
        self.how, self.status = how, status


@pytest.fixture
def ending(monkeypatch):
    """entry() with the app replaced by ``raising``; returns how it ended, its status and whether atexit ran."""
    ran: list[bool] = []

    def os_exit(status: int) -> None:
        raise Exited("os._exit", status)

    def sys_exit(status: object = None) -> None:
        raise Exited("sys.exit", status)

    monkeypatch.setattr(os, "_exit", os_exit)
    monkeypatch.setattr(sys, "exit", sys_exit)
    monkeypatch.setattr(atexit, "_run_exitfuncs", lambda: ran.append(True))
    monkeypatch.setattr(sys, "getprofile", lambda: None)  # as in a plain run, whatever watches the tests
    monkeypatch.setattr(sys, "gettrace", lambda: None)

    def end(exc: BaseException | None) -> tuple[str, object, bool]:
        def app() -> None:
            if exc is not None:
                raise exc

        monkeypatch.setattr(cli, "app", app)
        with pytest.raises(Exited) as info:
            cli.entry()
        return info.value.how, info.value.status, bool(ran)

    return end


@pytest.mark.parametrize(
    ("exc", "status"), [(None, 0), (SystemExit(None), 0), (SystemExit(0), 0), (SystemExit(2), 2), (SystemExit(1), 1)]
)
def test_entry_ends_with_the_apps_status_after_the_exit_handlers(ending, exc, status):
    assert ending(exc) == ("os._exit", status, True)


def test_a_message_status_is_printed_and_ends_with_status_1(ending, capsys):
    assert ending(SystemExit("no such run")) == ("os._exit", 1, True)
    assert capsys.readouterr().err == "no such run\n"


def test_a_running_thread_gets_the_usual_exit(ending):
    release = threading.Event()
    worker = threading.Thread(target=release.wait, daemon=False)
    worker.start()
    try:
        assert ending(SystemExit(3)) == ("sys.exit", 3, False)
    finally:
        release.set()
        worker.join()


@pytest.mark.parametrize("hook", ["getprofile", "gettrace"])
def test_a_profiler_or_tracer_gets_the_usual_exit(ending, monkeypatch, hook):
    monkeypatch.setattr(sys, hook, lambda: object())  # set after the fixture's plain-run defaults
    assert ending(SystemExit(0)) == ("sys.exit", 0, False)


def test_python_m_cprofile_writes_its_stats(tmp_path):
    out = tmp_path / "stats.prof"
    cmd = [sys.executable, "-m", "cProfile", "-o", str(out), "-m", "attnbench", "list", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.is_file() and out.stat().st_size > 0


def test_an_error_of_the_app_is_raised_not_swallowed(ending):
    with pytest.raises(ZeroDivisionError):
        ending(ZeroDivisionError("boom"))


def test_python_m_attnbench_prints_everything_and_exits_with_the_status(tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "attnbench", *args], capture_output=True, text=True, cwd=REPO, timeout=120
        )

    listed = run("list", "--json")  # stdout is a pipe: its buffer must be flushed before the quick exit
    assert listed.returncode == 0, listed.stderr
    assert "full" in {m["name"] for m in json.loads(listed.stdout)}
    bad = run("sweep", "--preset", "no-such-preset", "--out", str(tmp_path / "r"))
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: unknown preset 'no-such-preset'")
