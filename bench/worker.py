"""Measure one point in a fresh process: ``python -m attnbench.bench.worker IN.json OUT.json``.

IN.json holds ``{"point": <point config>, "settings": <Settings fields>}``; the
record is written to OUT.json (atomically), never to stdout, so whatever a
mechanism prints cannot corrupt it. Used by the subprocess, multi-GPU and
submitit executors.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


def measure_dict(point: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """Measure a point given as JSON-able dicts; importable (and picklable) for submitit."""
    from .measure import Settings, measure
    from .points import Point, load_plugins

    load_plugins()
    return measure(Point.from_json(point), Settings(**settings))


def _job_dir(in_json: str) -> Path | None:
    """The executor's temporary directory holding IN.json (``attnbench-<pid>-*``), else None."""
    folder = Path(in_json).resolve().parent
    return folder if folder.name.startswith("attnbench-") else None


def _die_with_parent(job_dir: Path | None) -> None:
    """End this worker when the sweep process that started it dies, removing the job's temporary directory.

    On Linux the kernel sends SIGTERM at the parent's death (PR_SET_PDEATHSIG), whose handler removes the
    directory and exits; a watcher thread that sees the parent change does the same wherever that signal
    is not available (and should the handler wait on a long native call)."""
    import signal
    import threading

    # The executor names itself: a parent that died before this line leaves getppid() at the reaper's pid.
    parent = int(os.environ.get("ATTNBENCH_WORKER_PARENT") or os.getppid())

    def leave(*_: Any) -> None:
        if job_dir is not None:
            import shutil

            shutil.rmtree(job_dir, ignore_errors=True)
        os._exit(1)

    signal.signal(signal.SIGTERM, leave)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the signal was armed
        leave()

    def watch() -> None:
        import time

        while os.getppid() == parent:
            time.sleep(1.0)
        leave()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str]) -> int:
    _die_with_parent(_job_dir(argv[0]) if argv else None)
    if len(argv) != 2:
        print("usage: python -m attnbench.bench.worker IN.json OUT.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text())
    record = measure_dict(job["point"], job["settings"])
    tmp = Path(argv[1] + ".tmp")
    tmp.write_text(json.dumps(record, default=str))
    os.replace(tmp, argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
