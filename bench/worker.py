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


def _die_with_parent() -> None:
    """On Linux, get SIGKILL when the sweep process that started this worker dies."""
    parent = os.getppid()
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def main(argv: list[str]) -> int:
    _die_with_parent()
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
