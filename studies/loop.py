"""The one training loop: AdamW (no weight decay on biases, norms and tokens), linear warm-up then
cosine decay, gradient clipping, optional AMP, a checkpoint after every epoch, and exact resumption.

A task (image classification in ``studies.train``, image-pair matching in ``studies.matching``) says
what a batch is, what its loss is, and what is measured after each epoch; the loop does the rest.

Data-parallel (``studies.distributed``): in a process group of several, the model is wrapped in
DistributedDataParallel, each rank takes its share of every global batch (the task's ``batches``), the
step's loss is the mean over the ranks (the global batch's loss), the epoch's sums are added over the
ranks, and rank 0 alone evaluates, writes the checkpoint (holding every rank's random state) and calls
``on_epoch``; the other ranks wait at a barrier. Every row records the world size, images/s in all and
per device, the share of the epoch spent waiting for the next batch (``data_wait_share``) and, on CUDA,
the training's own peak memory per device (``torch.cuda.max_memory_allocated``, the largest rank's).

The checkpoint is written whole or not at all (a temporary file renamed over it) and holds, beside
the weights, optimizer, scaler and random state, every epoch row made so far: the rows the results
store must hold are derived from it, so a kill between the checkpoint and the store's append loses
nothing (the next run appends what is missing) and writes nothing twice. Loaded with
``weights_only=True``: a checkpoint cannot run code.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
from attnbench.bench.rundir import kill_point, os_error
from torch import nn

from attnbench.errors import AttnbenchError

CHECKPOINT_KEYS = ("model", "optimizer", "scaler", "epoch", "step", "rng_cpu", "rows", "images", "train_s")
# Beside those: every rank's random state (CPU and CUDA generators), rank 0's CUDA one, the EMA weights.
OPTIONAL_KEYS = ("rng_ranks", "rng_cuda", "ema")


class CheckpointError(AttnbenchError, ValueError):
    """A checkpoint cannot be loaded into this run."""


@dataclasses.dataclass(frozen=True)
class Optim:
    """How the loop optimises: AdamW at ``lr`` with a linear warm-up of ``warmup_epochs`` then a cosine
    decay to ``min_lr`` over all steps, gradients clipped to norm ``clip``; ``amp``: bfloat16 autocast
    (float16 with a gradient scaler on a GPU without bfloat16); ``ema``: the decay of an exponential moving
    average of the weights, evaluated beside them (``ema_accuracy``), or None."""

    epochs: int
    lr: float
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr: float = 1e-6
    clip: float = 1.0
    amp: bool = False
    ema: float | None = None


class Task(Protocol):
    """What the loop trains on."""

    steps_per_epoch: int

    def batches(self, epoch: int) -> Iterable[Any]:
        """The batches of one epoch, in an order fixed by the run's seed and the epoch."""
        ...

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """The batch's mean loss and running sums for the epoch's statistics (``n``: items in the batch)."""
        ...

    def epoch_row(self, model: nn.Module, sums: dict[str, float]) -> dict[str, Any]:
        """The epoch's row fields: training statistics from ``sums`` and held-out metrics."""
        ...

    def stats(self, sums: dict[str, float]) -> str:
        """A short progress text of the running sums."""
        ...


def lr_at(step: int, total: int, warmup: int, base: float, floor: float) -> float:
    """Linear warm-up from base/warmup to base over ``warmup`` steps, then cosine to ``floor``."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * min(1.0, t)))


def amp_dtype(device: torch.device) -> torch.dtype:
    """bfloat16, as the papers' recent recipes, except on a GPU without it (float16 with a scaler)."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, amp: bool) -> Any:
    return torch.autocast(device.type, dtype=amp_dtype(device), enabled=amp)


@dataclasses.dataclass
class Fit:
    """What a call of :func:`fit` leaves: the epoch rows of the whole run (resumed ones included), the
    losses of the steps this call took, the images seen and seconds spent training over the whole run."""

    rows: list[dict[str, Any]]
    step_losses: list[float]
    images: int
    train_s: float
    resumed_from: int


def load_checkpoint(path: Path, device: torch.device, model: nn.Module) -> dict[str, Any]:
    """A run's checkpoint, loaded with ``weights_only`` (no code runs) and checked against the model;
    a truncated, empty, foreign or tampered file is a CheckpointError that says what to do."""
    fix = "it is truncated, empty or not a checkpoint of this run; remove it to start the run again"
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # torch raises many kinds here (zip, pickle, EOF, unsafe globals)
        first = (str(exc).strip().splitlines() or [""])[0].split(". ")[0][:100]
        raise CheckpointError(f"{path} cannot be loaded ({type(exc).__name__}: {first}); {fix}") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; {fix}")
    try:
        model.load_state_dict(ck["model"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0].split(". ")[0][:100]
        raise CheckpointError(f"{path} does not fit the model ({first}); {fix}") from None
    return ck


def fit(
    model: nn.Module,
    task: Task,
    optim: Optim,
    checkpoint: Path,
    *,
    device: torch.device,
    progress: Progress | None = None,
    label: str = "",
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> Fit:
    """Train ``model`` on ``task`` for ``optim.epochs`` epochs, resuming from ``checkpoint`` if it exists;
    returns every epoch's row. ``on_epoch`` is called with each row: first the rows the checkpoint holds,
    then each new row after its checkpoint is saved (the caller stores those it does not hold yet).
    In a process group (``studies.distributed``) every rank calls ``fit``; rank 0 alone saves and calls
    ``on_epoch``, and the rows returned are rank 0's on every rank."""
    from . import distributed as D

    rank, world = D.rank(), D.size()
    main = rank == 0
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]  # biases, norms, tokens: no weight decay
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=optim.lr,
    )
    fp16 = optim.amp and amp_dtype(device) == torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=fp16 and device.type == "cuda")
    ema = _ema(model, optim.ema) if optim.ema else None
    steps = task.steps_per_epoch
    total = steps * optim.epochs
    warmup = min(total // 2, round(optim.warmup_epochs * steps))
    start, step, rows, images, train_s = 0, 0, [], 0, 0.0
    if checkpoint.exists():
        ck = load_checkpoint(checkpoint, device, model)
        opt.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        if ema is not None and "ema" in ck:
            ema.load_state_dict(ck["ema"])
        start, step, rows = int(ck["epoch"]), int(ck["step"]), list(ck["rows"])
        images, train_s = int(ck["images"]), float(ck["train_s"])
        states = ck.get("rng_ranks") or [{"cpu": ck["rng_cpu"], "cuda": ck.get("rng_cuda")}]
        if len(states) == world:
            torch.set_rng_state(states[rank]["cpu"])
            if device.type == "cuda" and states[rank].get("cuda") is not None:
                torch.cuda.set_rng_state(states[rank]["cuda"], device)
        else:  # resumed with another number of processes: the data order is the same, the dropout draws are not
            torch.manual_seed(step * 1_000_003 + rank)
        for row in rows if on_epoch is not None and main else ():
            on_epoch(row)
    net: nn.Module = model
    if world > 1:
        import warnings

        from torch.nn.parallel import DistributedDataParallel

        # Depthwise convolutions hand back gradients in another stride order than DDP's buckets: a copy, not an error.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_losses: list[float] = []
    bar = progress if progress is not None and main else Progress(False)
    lr = lr_at(step, total, warmup, optim.lr, min(optim.min_lr, optim.lr))
    for epoch in range(start, optim.epochs):
        net.train()
        sums: dict[str, float] = {}
        task_id = bar.add(f"{label}epoch {epoch + 1}/{optim.epochs}", steps)
        t0 = time.perf_counter()
        wait = 0.0
        batches = iter(task.batches(epoch))
        while True:
            t_wait = time.perf_counter()
            batch = next(batches, None)
            wait += time.perf_counter() - t_wait
            if batch is None:
                break
            lr = lr_at(step, total, warmup, optim.lr, min(optim.min_lr, optim.lr))
            for group in opt.param_groups:
                group["lr"] = lr
            with autocast(device, optim.amp):
                loss, batch_sums = task.loss(net, batch)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), optim.clip)
            scaler.step(opt)
            scaler.update()
            if ema is not None:
                ema.update_parameters(model)
            step += 1
            step_losses.append(D.mean(loss))
            for key, value in batch_sums.items():
                sums[key] = sums.get(key, 0.0) + value
            bar.advance(task_id, f"{task.stats(sums)}  {sums.get('n', 0) / (time.perf_counter() - t0):.0f} items/s")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        sums = D.all_reduce_sums(sums, device)
        wait_share = D.maximum(wait / seconds if seconds else 0.0, device)
        peak = D.maximum(torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None, device)
        images += int(sums.get("n", 0))
        train_s += seconds
        if main:
            row = {
                **task.epoch_row(model, sums),
                "epoch": epoch + 1,
                "lr": lr,
                "images_per_s": sums.get("n", 0) / seconds,
                "world_size": world,
                "images_per_s_per_device": sums.get("n", 0) / seconds / world,
                "data_wait_share": wait_share,
                "peak_bytes_per_device": None if peak is None else int(peak),
            }
            if ema is not None:
                ema_row = task.epoch_row(ema.module, sums)
                row.update({f"ema_{k}": ema_row[k] for k in ("accuracy", "val_loss") if k in ema_row})
            bar.finish(task_id, ", ".join(f"{k} {_short(v)}" for k, v in row.items() if k not in ("epoch", "lr")))
            rows.append(row)
        rng_ranks = D.gather_objects(_rng_state(device))  # after the evaluation, as one process saves it
        if main:
            save_checkpoint(
                checkpoint, model, opt, scaler, epoch + 1, step, rows, images, train_s, device,
                extra={"rng_ranks": rng_ranks, **({"ema": ema.state_dict()} if ema is not None else {})},
            )  # fmt: skip
        D.barrier()  # the checkpoint exists before any rank goes on (or is killed)
        kill_point("checkpoint")
        kill_point(f"checkpoint@rank{rank}")
        if on_epoch is not None and main:
            on_epoch(row)
    rows = D.broadcast_object(rows)
    return Fit(rows, step_losses, images, train_s, start)


def _rng_state(device: torch.device) -> dict[str, Any]:
    """This rank's random state: the CPU generator's and, on CUDA, its device's (both on the CPU)."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _ema(model: nn.Module, decay: float) -> Any:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def save_checkpoint(
    path: Path, model: nn.Module, opt: Any, scaler: Any, epoch: int, step: int, rows: list, images: int,
    train_s: float, device: torch.device, extra: dict[str, Any] | None = None,
) -> None:  # fmt: skip
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "step": step,
        "rng_cpu": torch.get_rng_state(),
        "rows": rows,
        "images": images,
        "train_s": train_s,
        **(extra or {}),
    }
    if device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state(device)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic: a kill never leaves a half-written checkpoint
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise os_error(path, exc) from None


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


class Progress:
    """Progress of training: a rich bar per epoch with its statistics on a terminal; elsewhere (a pipe,
    a log file) one line per finished epoch; nothing when disabled."""

    def __init__(self, enabled: bool, *, stream: Any = None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.p: Any = None
        self.lines = enabled and not self.stream.isatty()
        self.names: dict[int, str] = {}
        if enabled and not self.lines:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as Bar

            self.p = Bar(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[stats]}"),
                console=Console(file=self.stream),
            )

    def __enter__(self) -> Progress:
        if self.p is not None:
            self.p.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.p is not None:
            self.p.__exit__(*exc)

    def add(self, description: str, total: int) -> int:
        if self.p is not None:
            return int(self.p.add_task(description, total=total, stats=""))
        self.names[len(self.names)] = description
        return len(self.names) - 1

    def advance(self, task: int, stats: str) -> None:
        if self.p is not None:
            self.p.update(task, advance=1, stats=stats)

    def finish(self, task: int, stats: str) -> None:
        if self.p is not None:
            self.p.update(task, stats=stats)
        elif self.lines:
            print(f"{self.names.get(task, '')}: {stats}", file=self.stream, flush=True)

    def note(self, text: str) -> None:
        """A line of its own (a run started, resumed or finished)."""
        if self.p is not None:
            self.p.console.print(text, markup=False, highlight=False)
        elif self.lines:
            print(text, file=self.stream, flush=True)
