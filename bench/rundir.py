"""The run-directory discipline that ``sweep``, ``train``, ``reproduce`` and ``match`` share.

A run directory belongs to one command (its *kind*, written to ``run.json`` when the
directory is first claimed). Claiming it:

- refuses a path that is a file, a directory that cannot be written (naming the OS
  error), and a directory of another kind (one line naming both kinds and the fix);
- takes an advisory lock (``run.lock``: pid, host, kind, since) that the operating
  system releases when the holder dies, so a killed run never leaves a stale lock; a
  second writer is refused with a line naming the holder.

What a command does inside the directory is its own, but each is written so that
the same command, run again after a kill at any moment, continues where it stopped.
``kill_point`` is the hook the tests use to stop a process at a named step.
Torch-free.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import platform
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .store import StoreError

KIND_FILE = "run.json"
LOCK = "run.lock"
KINDS = ("sweep", "train", "reproduce", "match")
# Files that told a directory's kind before run.json was written.
MARKERS = {"sweep.json": "sweep", "train.json": "train", "experiment.json": "reproduce", "match.json": "match"}
# The option that names each kind's directory, for the messages.
OPTION = {"sweep": "--out", "train": "--out", "reproduce": "--out", "match": "--out"}
KILL_ENV = "ATTNBENCH_KILL_AT"


class RunDirError(StoreError):
    """A run directory cannot be used as asked."""


def os_error(path: str | os.PathLike, exc: OSError) -> RunDirError:
    """One line naming the path and the operating system's error (disk full, read-only, ...)."""
    reason = exc.strerror or str(exc)
    code = f"[Errno {exc.errno}] " if exc.errno else ""
    hint = {errno.ENOSPC: "free some space", errno.EROFS: "choose a writable --out"}.get(exc.errno or 0, "")
    if exc.errno in (errno.EACCES, errno.EPERM):
        hint = "choose a directory you can write, or fix its permissions"
    return RunDirError(f"cannot write {path}: {code}{reason}" + (f"; {hint}" if hint else ""))


def stored_kind(path: Path) -> str | None:
    """The kind of run a directory holds (None: it holds none, or does not exist)."""
    meta = path / KIND_FILE
    if meta.is_file():
        try:
            kind = json.loads(meta.read_text()).get("kind")
        except (OSError, ValueError, AttributeError):
            raise RunDirError(f"{meta} is not a readable run description; restore it, or pass another --out") from None
        if kind in KINDS:
            return str(kind)
        raise RunDirError(f"{meta} names an unknown kind of run {kind!r}; restore it, or pass another --out")
    for name, kind in MARKERS.items():
        if (path / name).exists():
            return kind
    return None


def kill_point(step: str) -> None:
    """Test hook: with ``ATTNBENCH_KILL_AT=STEP`` (or ``STEP:N``, the N-th time, from 1) the process kills
    itself with SIGKILL when it reaches ``step``, as a kill from outside would at that moment."""
    want = os.environ.get(KILL_ENV)
    if not want:
        return
    name, _, nth = want.partition(":")
    if name != step:
        return
    count = _REACHED.get(step, 0) + 1
    _REACHED[step] = count
    if count == (int(nth) if nth else 1):
        os.kill(os.getpid(), signal.SIGKILL)


_REACHED: dict[str, int] = {}


class RunDir:
    """One run directory of one kind; ``claim()`` checks, creates and locks it."""

    def __init__(self, path: str | os.PathLike, kind: str):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.path = Path(path)
        self.kind = kind

    def check(self) -> None:
        """Refuse, before anything is written, what ``claim`` would refuse (except a held lock)."""
        path = self.path
        if path.exists() and not path.is_dir():
            raise RunDirError(f"{path} is a file, not a run directory; pass a directory to {OPTION[self.kind]}")
        kind = stored_kind(path) if path.is_dir() else None
        if kind is not None and kind != self.kind:
            raise RunDirError(
                f"{path} holds a {kind} run; `attnbench {self.kind}` writes its own kind of run directory, "
                f"so pass another {OPTION[self.kind]}"
            )
        parent = path if path.exists() else _existing_parent(path)
        if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
            raise os_error(parent, PermissionError(errno.EACCES, os.strerror(errno.EACCES)))

    @contextlib.contextmanager
    def claim(self, request: dict[str, Any] | None = None) -> Iterator[RunDir]:
        """Check the directory, create it, hold its lock for the block and record its kind."""
        self.check()
        created = [p for p in (self.path, *self.path.absolute().parents) if not p.exists()][::-1]
        fresh = not self.path.is_dir() or not any(self.path.iterdir())
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise os_error(self.path, exc) from None
        try:
            with self._locked((request or {}) if fresh else None):
                yield self
        finally:
            # A directory this claim created and in which nothing but its own files were written goes again
            # (a write that failed at once, say on a full disk, leaves no folder behind).
            if created and self.path.is_dir() and {p.name for p in self.path.iterdir()} <= {KIND_FILE}:
                (self.path / KIND_FILE).unlink(missing_ok=True)
                for folder in reversed(created):
                    with contextlib.suppress(OSError):
                        folder.rmdir()

    @contextlib.contextmanager
    def _locked(self, request: dict[str, Any] | None) -> Iterator[None]:
        """The lock, and ``run.json`` written when ``request`` is given (a new or empty directory: one made
        before run.json is told by its files, and gets none, so that a refused command writes nothing)."""
        import fcntl

        lock = self.path / LOCK
        while True:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise os_error(lock, exc) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunDirError(
                    f"{self.path} is being written by another {self.kind} ({_holder(lock)}); "
                    f"wait for it to finish, or pass another {OPTION[self.kind]}"
                ) from None
            try:  # the holder before us may have removed the file between our open and our lock
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:
            since = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            info = {"pid": os.getpid(), "host": platform.node(), "kind": self.kind, "since": since}
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(info).encode())
            if request is not None:
                write_json(self.path / KIND_FILE, {"kind": self.kind, "created": since, "request": request})
        except OSError as exc:
            lock.unlink(missing_ok=True)
            os.close(fd)
            raise os_error(self.path, exc) from None
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)
            os.close(fd)


def write_json(path: Path, obj: Any) -> None:
    """Write a JSON file whole or not at all (a temporary file renamed over it)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise os_error(path, exc) from None


def _existing_parent(path: Path) -> Path | None:
    for parent in path.absolute().parents:
        if parent.exists():
            return parent
    return None


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} on {info['host']} since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"
