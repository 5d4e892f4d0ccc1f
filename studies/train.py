"""The training loop: AdamW, cosine schedule with warm-up, gradient clipping, AMP,
held-out evaluation, checkpoints each epoch (resumed exactly, loaded with
``weights_only=True``) and metrics in the results store the sweeps use.

A run directory holds ``env.json`` and ``results.jsonl`` (the results store),
``train.json`` (the configuration and ``status``: running, interrupted or
complete) and ``checkpoint.pt``. Every input is checked before the directory is
created; a run that fails before its first checkpoint removes the directory it
created, and a run stopped later is left ``interrupted`` (resumable with
``resume=True``), never ``complete``. Rows appended to results.jsonl:

- ``kind: "train_epoch"``: per epoch, train loss and accuracy, held-out loss and
  accuracy, learning rate, images/s;
- ``kind: "train"``: the final row: model, resolution, epochs, held-out
  ``accuracy``, ``macs`` per image (FLOPs = 2 * MACs), ``params``,
  ``images_per_s`` (training throughput), ``peak_bytes`` (``memory_method`` says
  how it was taken).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from attnbench.models import zoo
from torch import nn
from torch.utils.data import DataLoader, Dataset

from attnbench.errors import AttnbenchError

from . import data as data_mod

CHECKPOINT = "checkpoint.pt"
TRAIN_JSON = "train.json"


class TrainError(AttnbenchError, ValueError):
    """A training run cannot start as asked."""


@dataclasses.dataclass
class TrainConfig:
    model: str
    out: str
    tiny: bool = False
    data: str = "synthetic"
    resolution: int | None = None  # None: the model's native resolution
    epochs: int = 10
    batch: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr: float = 1e-6
    clip: float = 1.0
    amp: bool = False
    device: str = "cpu"
    resume: bool = False
    train_size: int = 2048  # synthetic data only
    val_size: int = 512
    seed: int = 0  # initial weights, data order and the synthetic images
    drop_path: float | None = None  # None: the configuration's own
    threads: int | None = None  # torch intra-op threads (None: torch's default)

    # Fields that must match between a run and its resumption.
    SAME_ON_RESUME = ("model", "tiny", "data", "resolution", "batch", "seed", "train_size", "val_size")


@dataclasses.dataclass
class Prepared:
    config: TrainConfig
    model: nn.Module
    train_set: Dataset
    val_set: Dataset
    classes: list[str]
    device: torch.device
    run_dir: Path
    checkpoint: dict[str, Any] | None = None


ModelFn = Callable[[int], nn.Module]  # number of classes -> a freshly built model


def prepare(cfg: TrainConfig, model_fn: ModelFn | None = None) -> Prepared:
    """Check everything and build model and data; creates nothing on disk.

    ``model_fn`` builds a model that is not a zoo entry (``cfg.model`` then only names it)."""
    if model_fn is None:
        try:
            zoo.entry(cfg.model)
        except KeyError as exc:
            raise TrainError(exc.args[0]) from None
    for name in ("epochs", "batch", "threads", "train_size", "val_size"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if not cfg.lr > 0:
        raise TrainError(f"--lr must be positive, got {cfg.lr}")
    device = _device(cfg.device)
    torch.manual_seed(cfg.seed)  # the initial weights (a resumed run takes its weights and RNG from the checkpoint)
    overrides: dict[str, Any] = {}
    if cfg.drop_path is not None:
        overrides["drop_path"] = cfg.drop_path
    if model_fn is None:

        def model_fn(num_classes: int) -> nn.Module:
            return zoo.create(cfg.model, tiny=cfg.tiny, num_classes=num_classes, **overrides)

    probe = model_fn(1000)
    resolution = cfg.resolution or probe.config.resolution
    cfg = dataclasses.replace(cfg, resolution=resolution)
    reasons = probe.unsupported(resolution)
    if reasons:
        raise TrainError(
            f"{cfg.model}{' (tiny)' if cfg.tiny else ''} cannot take {resolution} px: " + "; ".join(reasons)
        )
    try:
        train_set = data_mod.build(cfg.data, resolution, "train", size=cfg.train_size, seed=cfg.seed)
        val_set = data_mod.build(cfg.data, resolution, "val", size=cfg.val_size, seed=cfg.seed)
    except data_mod.DataError as exc:
        raise TrainError(str(exc)) from None
    classes = data_mod.classes_of(train_set)
    model = model_fn(len(classes))
    run_dir = Path(cfg.out)
    ckpt = run_dir / CHECKPOINT
    checkpoint = None
    if cfg.resume:
        if not ckpt.exists():
            raise TrainError(f"--resume: {run_dir} holds no {CHECKPOINT}; run without --resume to start a new run")
        try:
            stored = json.loads((run_dir / TRAIN_JSON).read_text())["config"]
        except (OSError, ValueError, KeyError, TypeError):
            raise TrainError(
                f"--resume: {run_dir / TRAIN_JSON} is missing or unreadable; start a new run with another --out"
            ) from None
        diffs = [f"{k}: {stored.get(k)!r} there, {getattr(cfg, k)!r} now" for k in cfg.SAME_ON_RESUME
                 if stored.get(k) != getattr(cfg, k)]  # fmt: skip
        if diffs:
            raise TrainError(f"--resume: {run_dir} was trained differently ({'; '.join(diffs)}); pass the same options")
        checkpoint = _load_checkpoint(ckpt, device, model)
        if int(checkpoint["epoch"]) >= cfg.epochs:
            raise TrainError(
                f"--resume: {run_dir} has already trained {int(checkpoint['epoch'])} epochs; "
                "pass a larger --epochs to train further"
            )
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise TrainError(f"{run_dir} is not empty; pass --resume to continue the run in it, or choose a new --out")
    return Prepared(cfg, model.to(device), train_set, val_set, classes, device, run_dir, checkpoint)


CHECKPOINT_KEYS = ("model", "optimizer", "scaler", "epoch", "step", "rng_cpu")


def _load_checkpoint(path: Path, device: torch.device, model: nn.Module) -> dict[str, Any]:
    """The checkpoint of a run, loaded with ``weights_only`` (no code runs) and checked against the model;
    a truncated, empty, foreign or tampered file is a TrainError."""
    fix = "it is truncated, empty or not a checkpoint of attnbench train; start a new run with another --out"
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # torch raises many kinds here (zip, pickle, EOF, unsafe globals)
        first = (str(exc).strip().splitlines() or [""])[0].split(". ")[0][:100]
        raise TrainError(f"--resume: {path} cannot be loaded ({type(exc).__name__}: {first}); {fix}") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise TrainError(f"--resume: {path} lacks {', '.join(missing)}; {fix}")
    try:
        model.load_state_dict(ck["model"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0].split(". ")[0][:100]
        raise TrainError(f"--resume: {path} does not fit the model ({first}); {fix}") from None
    return ck


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TrainError(f"--device {name!r} is not a device; use cpu or cuda (cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {name}: CUDA is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise TrainError(f"--device {name}: only cpu and cuda are supported")
    return device


def lr_at(step: int, total: int, warmup: int, base: float, floor: float) -> float:
    """Linear warm-up from base/warmup to base over ``warmup`` steps, then cosine to ``floor``."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * min(1.0, t)))


def _loader(ds: Dataset, batch: int, shuffle: bool, seed: int, epoch: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)  # the order of an epoch does not depend on resumes
    return DataLoader(ds, batch_size=batch, shuffle=shuffle, generator=g, drop_last=shuffle and len(ds) > batch)


def _autocast(device: torch.device, amp: bool) -> Any:
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=amp)


@torch.no_grad()
def evaluate(model: nn.Module, ds: Dataset, batch: int, device: torch.device, amp: bool) -> tuple[float, float]:
    """Mean loss and accuracy on ``ds``."""
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for x, y in _loader(ds, batch, False, 0, 0):
        x, y = x.to(device), y.to(device)
        with _autocast(device, amp):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
        n += len(y)
    return loss_sum / n, correct / n


def train(
    cfg: TrainConfig,
    *,
    progress: bool = True,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    model_fn: ModelFn | None = None,
) -> dict[str, Any]:
    """Train, evaluate and record; returns the final row plus ``step_losses`` of this invocation."""
    from attnbench.bench.env import fingerprint
    from attnbench.bench.store import ENV, RESULTS, ResultsStore

    prep = prepare(cfg, model_fn)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    cfg, model, device, run_dir = prep.config, prep.model, prep.device, prep.run_dir
    created = not run_dir.exists()
    params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]  # biases, norms, tokens: no weight decay
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and device.type == "cuda")
    steps_per_epoch = len(_loader(prep.train_set, cfg.batch, True, cfg.seed, 0))
    total = steps_per_epoch * cfg.epochs
    warmup = min(total // 2, round(cfg.warmup_epochs * steps_per_epoch))
    start_epoch, step = 0, 0
    store = ResultsStore(run_dir)
    status = {"config": _jsonable(cfg), "classes": prep.classes, "status": "running"}
    try:
        if prep.checkpoint is not None:
            ck = prep.checkpoint
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            scaler.load_state_dict(ck["scaler"])
            start_epoch, step = int(ck["epoch"]), int(ck["step"])
            torch.set_rng_state(ck["rng_cpu"])
            if device.type == "cuda" and "rng_cuda" in ck:
                torch.cuda.set_rng_state(ck["rng_cuda"], device)
        store.open(fingerprint())
        _write_json(run_dir / TRAIN_JSON, status)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step_losses: list[float] = []
        images, train_seconds = 0, 0.0
        accuracy = val_loss = float("nan")
        bar = _Progress(progress)
        with bar:
            for epoch in range(start_epoch, cfg.epochs):
                model.train()
                loss_sum, correct, seen = 0.0, 0, 0
                task = bar.add(f"epoch {epoch + 1}/{cfg.epochs}", steps_per_epoch)
                t0 = time.perf_counter()
                for x, y in _loader(prep.train_set, cfg.batch, True, cfg.seed, epoch):
                    x, y = x.to(device), y.to(device)
                    lr = lr_at(step, total, warmup, cfg.lr, min(cfg.min_lr, cfg.lr))
                    for group in opt.param_groups:
                        group["lr"] = lr
                    with _autocast(device, cfg.amp):
                        logits = model(x)
                    loss = F.cross_entropy(logits.float(), y)
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.unscale_(opt)
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
                    scaler.step(opt)
                    scaler.update()
                    step += 1
                    step_losses.append(loss.item())
                    loss_sum += loss.item() * len(y)
                    correct += (logits.argmax(-1) == y).sum().item()
                    seen += len(y)
                    elapsed = time.perf_counter() - t0
                    bar.advance(
                        task, f"loss {loss_sum / seen:.3f}  acc {correct / seen:.1%}  {seen / elapsed:.0f} img/s"
                    )
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                epoch_seconds = time.perf_counter() - t0
                images += seen
                train_seconds += epoch_seconds
                val_loss, accuracy = evaluate(model, prep.val_set, cfg.batch, device, cfg.amp)
                bar.finish(task, f"loss {loss_sum / seen:.3f}  acc {correct / seen:.1%}  held-out {accuracy:.1%}")
                row = {
                    **_row_id(cfg, f"epoch{epoch + 1}"),
                    "kind": "train_epoch",
                    "epoch": epoch + 1,
                    "train_loss": loss_sum / seen,
                    "train_accuracy": correct / seen,
                    "val_loss": val_loss,
                    "accuracy": accuracy,
                    "lr": lr,
                    "images_per_s": seen / epoch_seconds,
                }
                _save_checkpoint(run_dir, model, opt, scaler, epoch + 1, step, device)
                store.append(row)
                if on_epoch_end is not None:
                    on_epoch_end(epoch + 1, row)
        final = {
            **_row_id(cfg, "final"),
            "kind": "train",
            "mechanism": "+".join(_mechanisms(model)),
            "mechanisms": _mechanisms(model),
            "epochs": cfg.epochs,
            "accuracy": accuracy,
            "val_loss": val_loss,
            "classes": len(prep.classes),
            "train_images": len(prep.train_set),
            "val_images": len(prep.val_set),
            "params": params,
            "macs": _macs(model, cfg.resolution, device),
            "images_per_s": images / train_seconds if train_seconds else None,
            **_peak(device),
        }
        store.append(final)
        status["status"] = "complete"
        _write_json(run_dir / TRAIN_JSON, status)
        return {**final, "step_losses": step_losses}
    except BaseException:
        if not (run_dir / CHECKPOINT).exists():  # nothing worth keeping: leave no half-made run behind
            if created:
                shutil.rmtree(run_dir, ignore_errors=True)
            else:
                for name in (ENV, RESULTS, TRAIN_JSON):
                    (run_dir / name).unlink(missing_ok=True)
        elif run_dir.exists():
            status["status"] = "interrupted"
            _write_json(run_dir / TRAIN_JSON, status)
        raise


def _row_id(cfg: TrainConfig, what: str) -> dict[str, Any]:
    name = cfg.model + ("-tiny" if cfg.tiny else "")
    return {
        "point_id": f"train:{name}:{cfg.data}:{cfg.resolution}:{what}",
        "status": "ok",
        "model": name,
        "tiny": cfg.tiny,
        "data": cfg.data,
        "resolution": cfg.resolution,
        "image_height": cfg.resolution,
        "image_width": cfg.resolution,
        "batch": cfg.batch,
        "dtype": ("float16" if cfg.device.startswith("cuda") else "bfloat16") + " autocast" if cfg.amp else "float32",
        "device": cfg.device,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _mechanisms(model: nn.Module) -> list[str]:
    from attnbench import attentions

    names = {m.name for m in model.modules() if isinstance(m, attentions.Attention)}
    return sorted(names)


def _macs(model: nn.Module, resolution: int, device: torch.device) -> int | None:
    """Multiply-adds of one image's forward pass (FLOPs = 2 * MACs), by bench.flops."""
    from attnbench.bench.flops import count

    x = torch.zeros(1, 3, resolution, resolution, device=device)
    try:
        return int(count(model, (x,), flop_counter=False, backward=False).macs)
    except Exception:  # noqa: BLE001  (a count that fails must not lose a finished training run)
        return None


def _peak(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {"peak_bytes": int(torch.cuda.max_memory_allocated(device)), "memory_method": "cuda_max_allocated"}
    import resource

    # Linux reports ru_maxrss in KiB: the peak resident memory of the whole process.
    return {
        "peak_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024,
        "memory_method": "cpu_max_rss",
    }


def _save_checkpoint(run_dir: Path, model, opt, scaler, epoch: int, step: int, device: torch.device) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "step": step,
        "rng_cpu": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state(device)
    tmp = run_dir / (CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, run_dir / CHECKPOINT)  # atomic: a kill never leaves a half-written checkpoint


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _jsonable(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


class _Progress:
    """A rich progress bar per epoch with loss, accuracy and images/s (silent when disabled)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.p = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.p = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[stats]}"),
            )

    def __enter__(self) -> _Progress:
        if self.p is not None:
            self.p.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.p is not None:
            self.p.__exit__(*exc)

    def add(self, description: str, total: int) -> Any:
        return self.p.add_task(description, total=total, stats="") if self.p is not None else None

    def advance(self, task: Any, stats: str) -> None:
        if self.p is not None:
            self.p.update(task, advance=1, stats=stats)

    def finish(self, task: Any, stats: str) -> None:
        if self.p is not None:
            self.p.update(task, stats=stats)
