"""The environment fingerprint stored with every run (env.json), and the one rule of
when two environments give comparable numbers (torch-free: reports use it too)."""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

# The fingerprint fields that must be equal for two timings to be comparable: the
# hardware and the software stack. Time, host name, platform string and the code
# revision are left out (a baseline from main is compared with a branch on one
# machine); the revision decides instead whether a stored point is reused.
COMPARABLE = (
    "gpu_names",
    "driver",
    "cuda",
    "cudnn",
    "torch",
    "triton",
    "python",
    "cpu_model",
    "cpu_count",
    "threads",
    "float32_matmul_precision",
)


def comparable(env: dict[str, Any]) -> dict[str, Any]:
    """The part of a fingerprint that decides comparability (missing fields read as None)."""
    return {key: env.get(key) for key in COMPARABLE}


def env_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The comparable fields whose values differ between two fingerprints, in ``COMPARABLE`` order.

    The only definition of comparable environments: the store, ``compare``, the
    report page and the perf baselines all ask it (empty list: comparable)."""
    ca, cb = comparable(a), comparable(b)
    return [key for key in COMPARABLE if ca[key] != cb[key]]


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_state() -> dict[str, Any]:
    """``git_rev``, ``git_dirty`` and ``revision``: the commit, plus a hash of the uncommitted
    changes to tracked files when the tree is dirty (``abc123def456+dirty.1a2b3c4d``), so that
    editing a dirty tree changes it too. None outside a git checkout."""
    rev = _run(["git", "rev-parse", "HEAD"], cwd=REPO)
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO)
    dirty = None if status is None else bool(status)
    revision = rev[:12] if rev else None
    if revision and dirty:
        diff = _run(["git", "diff", "HEAD", "--no-ext-diff", "--binary"], cwd=REPO) or ""
        revision += "+dirty." + hashlib.sha256(diff.encode()).hexdigest()[:8]
    return {"git_rev": rev, "git_dirty": dirty, "revision": revision}


def fingerprint(threads: int | None = None) -> dict[str, Any]:
    """GPU name and count, driver, CUDA, torch, triton, Python, CPU, threads, git revision, time."""
    import torch

    cuda = torch.cuda.is_available()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    driver = None
    if cuda:
        out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        driver = out.splitlines()[0].strip() if out else None
    return {
        "gpu_name": gpus[0] if gpus else None,
        "gpu_names": gpus,
        "gpu_count": len(gpus),
        "driver": driver,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": platform.node(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        **git_state(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
