"""Data-parallel training through ``torch.distributed``: who this process is, the process group, and
starting N local processes through torch's own launcher (the elastic launch API that ``torchrun`` runs).

One process per device. The rank and world size come from the environment in this order:

- ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (set by ``torchrun``, ``python -m torch.distributed.run`` and
  by :func:`launch`), with ``MASTER_ADDR`` and ``MASTER_PORT`` for the rendezvous;
- ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID`` (a task started by ``srun``, or by submitit with
  ``--cluster slurm``); ``MASTER_ADDR`` defaults to the first host of ``SLURM_JOB_NODELIST``, read with
  ``scontrol show hostnames``, and ``MASTER_PORT`` to 20000 + the job id modulo 20000.

Neither present, or a world of one: one process, no process group. The backend is NCCL on CUDA and gloo
on the CPU. Only rank 0 writes (rows, checkpoints, reports); the other ranks train and take part in the
collectives. ``ATTNBENCH_WRITE_AUDIT=PREFIX`` (a test hook) makes every rank log each file it opens for
writing, renames, removes or creates as a directory to ``PREFIX.rankN`` (Python's audit events).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from attnbench.errors import AttnbenchError

AUDIT_ENV = "ATTNBENCH_WRITE_AUDIT"


class DistributedError(AttnbenchError, RuntimeError):
    """Distributed training cannot start as asked, or one of its processes failed."""


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    source: str = "single"  # "torch" (RANK/WORLD_SIZE), "slurm" (SLURM_*) or "single"

    @property
    def main(self) -> bool:
        """Whether this process writes (rank 0)."""
        return self.rank == 0


def from_env(env: dict[str, str] | None = None) -> World:
    """The world this process belongs to, read from torch's or Slurm's environment variables."""
    env = dict(os.environ if env is None else env)
    try:
        if "RANK" in env and "WORLD_SIZE" in env:
            rank, size = int(env["RANK"]), int(env["WORLD_SIZE"])
            world = World(rank, size, int(env.get("LOCAL_RANK", rank)), "torch")
        elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
            rank, size = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
            world = World(rank, size, int(env.get("SLURM_LOCALID", 0)), "slurm")
        else:
            return World()
    except ValueError as exc:
        raise DistributedError(f"the rank variables of the environment are not integers ({exc})") from None
    if not 0 <= world.rank < world.size:
        raise DistributedError(f"rank {world.rank} is outside a world of {world.size} processes")
    return world


def _slurm_rendezvous(env: dict[str, str]) -> dict[str, str]:
    """MASTER_ADDR and MASTER_PORT for a Slurm task that lacks them."""
    out: dict[str, str] = {}
    if "MASTER_ADDR" not in env:
        nodes = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodes:
            raise DistributedError("a Slurm task without MASTER_ADDR or SLURM_JOB_NODELIST; export MASTER_ADDR")
        try:
            hosts = subprocess.run(
                ["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True, timeout=30
            ).stdout.split()
        except (OSError, subprocess.SubprocessError) as exc:
            raise DistributedError(f"scontrol cannot expand SLURM_JOB_NODELIST ({exc}); export MASTER_ADDR") from None
        out["MASTER_ADDR"] = hosts[0]
    if "MASTER_PORT" not in env:
        out["MASTER_PORT"] = str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return out


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def setup(world: World, device: torch.device) -> torch.device:
    """Join the process group (a world of one joins none) and return this rank's device: ``cuda:LOCAL_RANK``
    for a CUDA run of several processes, else ``device``. Call once per process, before building data."""
    _audit_writes(world)
    if world.size == 1 or (dist.is_available() and dist.is_initialized()):
        return _rank_device(world, device)
    if not dist.is_available():
        raise DistributedError("this torch has no torch.distributed; train with one process")
    if world.source == "slurm":
        os.environ.update(_slurm_rendezvous(dict(os.environ)))
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise DistributedError(f"rank {world.rank} of {world.size}: {name} is not set; the rendezvous needs it")
    device = _rank_device(world, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    bind = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend_for(device), rank=world.rank, world_size=world.size, **bind)
    return device


def _rank_device(world: World, device: torch.device) -> torch.device:
    if device.type == "cuda" and world.size > 1:
        if world.local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"local rank {world.local_rank} has no GPU ({torch.cuda.device_count()} here); one process per GPU"
            )
        return torch.device("cuda", world.local_rank)
    return device


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """Whether this process trains in a process group of more than one."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def size() -> int:
    return dist.get_world_size() if active() else 1


def barrier() -> None:
    if active():
        dist.barrier()


def all_reduce_sums(sums: dict[str, float], device: torch.device) -> dict[str, float]:
    """The sums of every rank added up (the same keys on every rank)."""
    if not active() or not sums:
        return sums
    keys = sorted(sums)
    t = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist(), strict=True))


def mean(value: torch.Tensor) -> float:
    """The mean of a scalar over the ranks (the global batch's mean loss when each rank's batch is equal)."""
    if not active():
        return value.item()
    t = value.detach().float().reshape(1).clone()
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def maximum(value: float | None, device: torch.device) -> float | None:
    if not active() or value is None:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (on every rank)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def launch(fn: Callable[..., Any], args: tuple, nproc: int, *, run_id: str | None = None) -> Any:
    """Run ``fn(*args)`` in ``nproc`` local processes through torch's elastic launcher (what ``torchrun
    --standalone --nproc-per-node N`` does) and return rank 0's result. A failed rank fails the whole run
    (no restarts): the other ranks are stopped and a DistributedError names the rank and its error."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise DistributedError(f"--nproc must be at least 1, got {nproc}")
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=run_id or uuid.uuid4().hex, rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.1, start_method="spawn",
    )  # fmt: skip
    import logging

    # A failed rank is reported below in one line (the rank, how it ended, its error's last line); torch's
    # own records of it (a traceback per rank, "terminating process ...") would bury that line.
    loggers = [logging.getLogger(name) for name in ("torch.distributed.elastic", "torch.multiprocessing")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        results = elastic_launch(config, fn)(*args)
    except ChildFailedError as exc:
        rank_, failure = exc.get_first_failure()
        how = f"killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exit {failure.exitcode}"
        message = failure.message
        if isinstance(message, dict):  # a Python exception's record: {"message": "Type: text", "extraInfo": ...}
            message = message.get("message", "")
        lines = str(message).strip().splitlines() if message and failure.exitcode > 0 else []
        first = lines[-1] if lines and not lines[-1].startswith("To enable traceback") else ""
        raise DistributedError(f"rank {rank_} of {nproc} failed ({how}){': ' + first if first else ''}") from None
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
    return results[0]


def in_launched_world() -> bool:
    """Whether this process was started as one rank of several (by torchrun, Slurm or :func:`launch`)."""
    return from_env().size > 1


def _audit_writes(world: World) -> None:
    prefix = os.environ.get(AUDIT_ENV)
    if not prefix:
        return
    log = open(f"{prefix}.rank{world.rank}", "a", encoding="utf-8")  # noqa: SIM115  (open for the process's life)
    watched = {"os.rename", "os.replace", "os.remove", "os.unlink", "os.mkdir", "os.rmdir", "shutil.rmtree"}

    def hook(event: str, args: tuple) -> None:
        if event == "open" and args and isinstance(args[0], (str, os.PathLike)):
            mode = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
            flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
            if any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                log.write(f"open {args[0]}\n")
                log.flush()
        elif event in watched and args:
            log.write(f"{event} {args[0]}\n")
            log.flush()

    sys.addaudithook(hook)
