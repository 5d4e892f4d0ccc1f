"""MAC counts of sweep configurations, cached on disk per code revision.

Counting a configuration (fvcore's jit trace and FlopCounterMode's forward and
backward) costs more than timing it on the smoke grid, and its result depends
only on the code and the configuration. So the sweep counts each configuration
once and keeps the fields it stores in ``<cache>/flops/<revision>/<key>.json``:
``<cache>`` is ``$ATTNBENCH_CACHE``, else ``$XDG_CACHE_HOME/attnbench``, else
``~/.cache/attnbench``; ``<revision>`` is bench.env's code revision (the commit,
plus a hash of the uncommitted diff when the tree is dirty), so an edit to the
code never reuses a count. Outside a git checkout (no revision) nothing is
cached on disk. ``ATTNBENCH_CACHE=off`` turns the disk cache off.

The three-way triangulation of the counters stays in ``attnbench flops`` and the
tests; this module only remembers what the sweep's counter said.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def cache_root() -> Path | None:
    """The cache folder, or None when ``ATTNBENCH_CACHE`` is ``off``."""
    env = os.environ.get("ATTNBENCH_CACHE")
    if env == "off":
        return None
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "attnbench"


@functools.lru_cache(maxsize=1)
def code_revision() -> str | None:
    """This process's code revision (git runs once per process)."""
    from .env import git_state

    revision = git_state().get("revision")
    return str(revision) if revision else None


def _path(key: tuple) -> Path | None:
    root, revision = cache_root(), code_revision()
    if root is None or revision is None:
        return None
    digest = hashlib.sha256(repr(key).encode()).hexdigest()[:24]
    return root / "flops" / revision.replace("/", "_") / f"{digest}.json"


def load(key: tuple) -> dict[str, Any] | None:
    """The cached fields of configuration ``key``, or None (never raises)."""
    path = _path(key)
    if path is None:
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != repr(key) or not isinstance(data.get("fields"), dict):
        return None
    return data["fields"]


def save(key: tuple, fields: dict[str, Any]) -> None:
    """Keep ``fields`` for ``key``, written atomically; a cache that cannot be written is skipped."""
    path = _path(key)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"key": repr(key), "fields": fields}, f)
        os.replace(tmp, path)
    except (OSError, TypeError, ValueError):
        return
