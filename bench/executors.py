"""Executors: where points are measured. Each yields records as points finish.

- :class:`InProcess` (default): in this process, several points' timing rounds taken in
  rotation (``bench.interleave``).
- :class:`Subprocess` (``--isolate``): a fresh Python process per point, so
  allocator and autotune state cannot leak and a hard crash costs one point; a
  point that outlives ``timeout_s + startup_grace_s`` is killed and recorded as
  ``timeout``.
- :class:`MultiDevice` (``--devices cuda:0,cuda:1``): one isolated worker per
  device, in parallel; each sees only its GPU (``CUDA_VISIBLE_DEVICES``).
- :class:`Submitit`: one job per point on a Slurm cluster through submitit
  (``submitit.LocalExecutor`` runs the same path on one machine).

The sweep's main process is the only writer of the results store.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import attnbench

from .measure import Settings
from .points import GridError, Point


def _failure(point: Point, status: str, reason: str, **extra: Any) -> dict[str, Any]:
    return {**point.to_json(), "status": status, "reason": reason, **extra}


class InProcess:
    """Points measured in this process, their timing rounds interleaved (``bench.interleave``)."""

    name = "in-process"

    def run(self, points: Iterable[Point], settings: Settings, on_event: Any = None) -> Iterator[dict[str, Any]]:
        """``on_event(kind, data)`` hears of each point's set-up and timing slot (bench.interleave)."""
        from .interleave import interleaved

        yield from interleaved(points, settings, on_event=on_event)


class Subprocess:
    """One ``python -m attnbench.bench.worker`` per point."""

    name = "subprocess"

    def __init__(self, startup_grace_s: float = 60.0, env: dict[str, str] | None = None, python: str | None = None):
        self.startup_grace_s = startup_grace_s
        self.env = env or {}
        self.python = python or sys.executable

    def run_one(self, point: Point, settings: Settings, env: dict[str, str] | None = None) -> dict[str, Any]:
        # Named by this process's id: a worker removes it when this process dies, and the next sweep
        # removes any left by a process that is gone (remove_stale_dirs).
        with tempfile.TemporaryDirectory(prefix=f"{TMP_PREFIX}{os.getpid()}-") as tmp:
            src, dst = Path(tmp) / "in.json", Path(tmp) / "out.json"
            src.write_text(json.dumps({"point": point.to_json(), "settings": settings.to_dict()}))
            limit = settings.timeout_s + self.startup_grace_s
            full_env = {**os.environ, **self.env, **(env or {})}
            # The folder that holds the package attnbench (a checkout or site-packages), for the worker's imports.
            repo = str(Path(attnbench.__file__).resolve().parent.parent)
            full_env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, full_env.get("PYTHONPATH", "")) if p)
            full_env["ATTNBENCH_WORKER_PARENT"] = str(os.getpid())  # the worker leaves when this process dies
            start = time.perf_counter()
            # Own session: on timeout the whole process group goes (compile workers included).
            proc = subprocess.Popen(
                [self.python, "-m", "attnbench.bench.worker", str(src), str(dst)],
                env=full_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            try:
                _, stderr = proc.communicate(timeout=limit)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                return _failure(
                    point,
                    "timeout",
                    f"worker killed after {limit:g} s (hard limit: --timeout {settings.timeout_s:g} s "
                    f"+ {self.startup_grace_s:g} s for process start-up)",
                    wall_s=round(time.perf_counter() - start, 4),
                )
            if dst.exists():
                return json.loads(dst.read_text())
            tail = (stderr or "").strip().splitlines()[-5:]
            how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
            return _failure(
                point,
                "error",
                f"worker process died ({how}) without a result: " + " | ".join(tail),
                wall_s=round(time.perf_counter() - start, 4),
            )

    def run(self, points: Iterable[Point], settings: Settings) -> Iterator[dict[str, Any]]:
        remove_stale_dirs()
        for point in points:
            yield self.run_one(point, settings)


TMP_PREFIX = "attnbench-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_dirs(root: str | os.PathLike | None = None) -> list[Path]:
    """Remove the workers' temporary directories (``attnbench-<pid>-*``) whose sweep process is gone."""
    import re
    import shutil

    removed = []
    for d in Path(root or tempfile.gettempdir()).glob(f"{TMP_PREFIX}*-*"):
        m = re.fullmatch(re.escape(TMP_PREFIX) + r"(\d+)-.*", d.name)
        if m and d.is_dir() and not _alive(int(m.group(1))):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


class MultiDevice:
    """Isolated workers on several devices of one machine, in parallel.

    Points keep their device axis value (``cuda`` or ``cpu``); a worker for
    ``cuda:N`` runs with ``CUDA_VISIBLE_DEVICES=N`` so ``cuda`` means its own GPU.
    The physical device is recorded as ``worker_device``.
    """

    name = "multi-device"

    def __init__(self, devices: list[str], startup_grace_s: float = 60.0):
        if not devices:
            raise GridError("MultiDevice needs at least one device, e.g. --devices cuda:0,cuda:1")
        for d in devices:
            if not (d == "cpu" or d.startswith("cuda:")):
                raise GridError(f"--devices takes cpu or cuda:N entries, got {d!r}")
        self.devices = devices
        self.inner = Subprocess(startup_grace_s=startup_grace_s)

    def validate(self, points: Iterable[Point]) -> None:
        """Raise before anything is written when a point names a device index."""
        for p in points:
            if p.device not in ("cpu", "cuda"):
                raise GridError(
                    f"with --devices, sweep points on --device cuda (or cpu), not {p.device!r}; "
                    "each worker is given one physical device"
                )

    def run(self, points: Iterable[Point], settings: Settings) -> Iterator[dict[str, Any]]:
        remove_stale_dirs()
        points = list(points)
        self.validate(points)
        todo: queue.Queue[Point] = queue.Queue()
        for p in points:
            todo.put(p)
        done: queue.Queue[dict[str, Any]] = queue.Queue()

        def worker(device: str) -> None:
            env = {"CUDA_VISIBLE_DEVICES": device.split(":")[1]} if device.startswith("cuda:") else {}
            while True:
                try:
                    p = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    rec = self.inner.run_one(p, settings, env=env)
                except Exception as exc:  # the executor itself failed; the point is still data
                    rec = _failure(p, "error", f"executor error: {type(exc).__name__}: {exc}")
                rec["worker_device"] = device
                done.put(rec)

        threads = [threading.Thread(target=worker, args=(d,), daemon=True) for d in self.devices]
        for t in threads:
            t.start()
        for _ in range(len(points)):
            yield done.get()
        for t in threads:
            t.join()


class Submitit:
    """One submitit job per point (Slurm through ``submitit.AutoExecutor``, or any
    submitit executor passed in, such as ``submitit.LocalExecutor`` for tests)."""

    name = "submitit"

    def __init__(
        self,
        folder: str | os.PathLike,
        executor: Any = None,
        slurm: dict[str, Any] | None = None,
        poll_s: float = 1.0,
    ):
        try:
            import submitit
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise GridError("the cluster executor needs submitit: pip install 'attnbench[cluster]'") from exc
        self.folder = Path(folder)
        self.poll_s = poll_s
        self.slurm = dict(slurm or {})
        self.auto = executor is None
        self.executor = executor if executor is not None else submitit.AutoExecutor(folder=str(self.folder))

    def run(self, points: Iterable[Point], settings: Settings) -> Iterator[dict[str, Any]]:
        from .worker import measure_dict

        points = list(points)
        if not points:
            return
        params: dict[str, Any] = {"timeout_min": max(1, int(settings.timeout_s * 2 / 60) + 5)}
        if self.auto and any(p.device.startswith("cuda") for p in points):
            params["gpus_per_node"] = 1
        params.update(self.slurm)  # the sweep file's slurm: section wins (names as submitit takes them)
        if self.auto:
            self.executor.update_parameters(**params)
        else:
            with contextlib.suppress(Exception):  # executors without a time limit parameter
                self.executor.update_parameters(timeout_min=params["timeout_min"])
        # One array job for the lot rather than one submission per point.
        with self.executor.batch():
            jobs = [(p, self.executor.submit(measure_dict, p.to_json(), settings.to_dict())) for p in points]
        pending = dict(enumerate(jobs))
        while pending:
            finished = [i for i, (_, job) in pending.items() if job.done()]
            if not finished:
                time.sleep(self.poll_s)
                continue
            for i in finished:
                point, job = pending.pop(i)
                try:
                    rec = job.result()
                except Exception as exc:  # job failed, was cancelled or timed out on the cluster
                    text = str(exc).strip().splitlines()
                    status = (
                        "timeout" if any("timed-out" in t.lower() or "timeout" in t.lower() for t in text) else "error"
                    )
                    rec = _failure(point, status, f"submitit job {job.job_id}: " + " | ".join(text[-5:]))
                rec["job_id"] = str(job.job_id)
                yield rec
