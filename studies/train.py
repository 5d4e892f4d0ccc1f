"""``attnbench train``: train a zoo model (or an experiment's variant) on an image classification task
with the one training loop (``studies.loop``), and record it in the results store the sweeps use.

A run directory (kind ``train``, ``bench.rundir``: locked while written, refused to other commands)
holds ``env.json`` and ``results.jsonl`` (the results store), ``train.json`` (the configuration and
``status``: running, interrupted or complete) and ``checkpoint.pt``. Every input is checked before the
directory is created. Running the same command again continues the run wherever it stopped: from its
last checkpoint, writing any row the checkpoint holds that the store lacks, or only the final row; a
complete run returns its final row. A run made with other options is refused in one line. Rows:

- ``kind: "train_epoch"``: per epoch, train loss and accuracy, held-out loss and accuracy, learning
  rate, images/s;
- ``kind: "train"``: the final row: model, resolution, epochs, held-out ``accuracy``, ``macs`` per image
  (FLOPs = 2 * MACs), ``params``, ``images_per_s`` (training throughput), and the peak memory of one
  training step at the training batch (``peak_bytes``, read by the harness's ``measure_module``, with its
  ``memory_method``).
Every row records ``threads``, the intra-op thread count the run used (1 unless asked).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
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
from . import distributed as D
from .loop import Fit, Optim, Progress, amp_dtype, autocast, fit, load_checkpoint

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
    resume: bool = False  # accepted for older scripts: the same command continues a run anyway
    train_size: int = 2048  # synthetic data only
    val_size: int = 512
    seed: int = 0  # initial weights, data order and the synthetic images
    drop_path: float | None = None  # None: the configuration's own
    threads: int = 1  # torch intra-op threads, set before any work and recorded in every row
    recipe: str = "none"  # training augmentation: none, or deit (studies.augment)
    ema: float | None = None  # decay of an exponential moving average of the weights; None: none
    nproc: int = 1  # processes (devices) per node; --batch is the global batch, split across them
    cluster: str | None = None  # "slurm": submit through submitit (nodes x nproc tasks)
    nodes: int = 1  # --cluster slurm only
    partition: str | None = None  # --cluster slurm only
    workers: int = 0  # data-loader processes per training process (0: load in the training process)

    # Fields that must match between a run and its continuation (--epochs may grow).
    SAME_ON_RESUME = ("model", "tiny", "data", "resolution", "batch", "seed", "train_size", "val_size", "lr")
    SAME_ON_RESUME += ("weight_decay", "warmup_epochs", "min_lr", "clip", "amp", "drop_path", "recipe", "ema")


@dataclasses.dataclass
class Prepared:
    config: TrainConfig
    model: nn.Module
    train_set: Dataset
    val_set: Dataset
    classes: list[str]
    device: torch.device
    run_dir: Path
    world: int = 1  # processes training together; each takes batch // world of every global batch


ModelFn = Callable[[int], nn.Module]  # number of classes -> a freshly built model


def prepare(
    cfg: TrainConfig,
    model_fn: ModelFn | None = None,
    *,
    device: torch.device | None = None,
    world: int = 1,
    checks: bool = True,
) -> Prepared:
    """Check everything and build model and data; creates nothing on disk.

    ``model_fn`` builds a model that is not a zoo entry (``cfg.model`` then only names it); ``device``
    replaces ``cfg.device`` (a rank's own GPU), ``world`` is the number of processes training together;
    ``checks=False`` (ranks other than 0) reads nothing of the run directory."""
    if model_fn is None:
        try:
            zoo.entry(cfg.model)
        except KeyError as exc:
            raise TrainError(exc.args[0]) from None
    if cfg.workers < 0:
        raise TrainError(f"--workers must be 0 or more, got {cfg.workers}")
    for name in ("epochs", "batch", "threads", "train_size", "val_size", "nproc", "nodes"):
        if getattr(cfg, name) is None or getattr(cfg, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.resolution is not None and cfg.resolution < 1:
        raise TrainError(f"--resolution must be at least 1 px, got {cfg.resolution}")
    if cfg.seed < 0:
        raise TrainError(f"--seed must be 0 or more, got {cfg.seed}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise TrainError(f"--lr must be a positive finite number, got {cfg.lr}")
    for name in ("weight_decay", "warmup_epochs", "min_lr", "clip"):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value >= 0):
            raise TrainError(f"{name} must be a finite number of 0 or more, got {value}")
    if cfg.drop_path is not None and not 0 <= cfg.drop_path < 1:
        raise TrainError(f"--drop-path must be in [0, 1), got {cfg.drop_path}")
    if cfg.ema is not None and not 0 < cfg.ema < 1:
        raise TrainError(f"--ema must be a decay in (0, 1), such as 0.9998, got {cfg.ema}")
    from . import augment

    if cfg.recipe not in augment.RECIPES:
        raise TrainError(f"--recipe must be one of {', '.join(augment.RECIPES)}, got {cfg.recipe!r}")
    if cfg.cluster not in (None, "slurm"):
        raise TrainError(f"--cluster must be slurm, got {cfg.cluster!r}")
    world = max(world, cfg.nproc * cfg.nodes)
    if cfg.batch % world:
        raise TrainError(f"--batch {cfg.batch} (the global batch) must be a multiple of the {world} processes")
    device = device or _device(cfg.device)
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
        sizes = {"train": cfg.train_size, "val": cfg.val_size}
        train_set, val_set = (
            data_mod.build(cfg.data, resolution, split, size=sizes[split], seed=cfg.seed, verify=checks)
            for split in ("train", "val")
        )  # ranks other than 0 (checks=False) list a folder's files without opening each
    except data_mod.DataError as exc:
        raise TrainError(str(exc)) from None
    classes = data_mod.classes_of(train_set)
    model = model_fn(len(classes))
    run_dir = Path(cfg.out)
    from attnbench.bench.rundir import RunDir

    if not checks:
        return Prepared(cfg, _placed(model, device), train_set, val_set, classes, device, run_dir, world)
    RunDir(run_dir, "train").check()  # a file, another command's directory, no write access: refused here
    if (run_dir / TRAIN_JSON).exists():
        _check_same(run_dir, cfg)
    if (run_dir / CHECKPOINT).exists():  # the checkpoint's model must fit, and hold no more epochs than asked
        trained = int(load_checkpoint(run_dir / CHECKPOINT, device, model)["epoch"])
        if trained > cfg.epochs:
            raise TrainError(f"{run_dir} has trained {trained} epochs; pass --epochs {trained} or more")
    return Prepared(cfg, _placed(model, device), train_set, val_set, classes, device, run_dir, world)


def _placed(model: nn.Module, device: torch.device) -> nn.Module:
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)  # the convolutions' fast layout on a GPU
    return model.to(device)


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


def _loader(
    ds: Dataset, batch: int, shuffle: bool, seed: int, epoch: int, world: int = 1, rank: int = 0, workers: int = 0
) -> DataLoader:
    """One epoch's batches. Shuffled, the order is torch's DistributedSampler's (a permutation seeded by the
    run's seed and the epoch, the same for any number of processes); rank r of W takes every W-th index from
    r on, ``batch // W`` at a time, so that step k's global batch is the same images as one process's."""
    if not shuffle:
        return DataLoader(ds, batch_size=batch, shuffle=False)
    from torch.utils.data import DistributedSampler

    drop = len(ds) > batch  # a dataset smaller than a batch trains on one short batch
    sampler = DistributedSampler(ds, world, rank, shuffle=True, seed=seed * 100_003, drop_last=True)
    sampler.set_epoch(epoch)  # the order of an epoch does not depend on resumes
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)  # the loader's own draws: not the global generator
    more = {"num_workers": workers, "pin_memory": torch.cuda.is_available(), "persistent_workers": False}
    return DataLoader(ds, batch_size=batch // world, sampler=sampler, drop_last=drop, generator=g, **more)


@torch.no_grad()
def evaluate(
    model: nn.Module, ds: Dataset, batch: int, device: torch.device, amp: bool, recipe: str = "none"
) -> tuple[float, float]:
    """Mean loss and accuracy on ``ds`` (under an augmenting recipe, after its eval resize and centre crop)."""
    from . import augment

    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    resolution = ds[0][0].shape[-1]
    prepare_eval = augment.eval_transform(resolution) if augment.RECIPES[recipe].augments else None
    for x, y in _loader(ds, batch, False, 0, 0):
        x, y = x.to(device), y.to(device)
        if prepare_eval is not None:
            x = prepare_eval(x)
        with autocast(device, amp):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
        n += len(y)
    return loss_sum / n, correct / n


class Classification:
    """The loop's task for image classification: cross-entropy (soft targets under mixup and cutmix, with
    the recipe's label smoothing), accuracy, held-out evaluation per epoch. In a process group each rank
    takes its share of every global batch (``_loader``)."""

    def __init__(self, prep: Prepared):
        from . import augment

        self.prep = prep
        cfg = prep.config
        self.rank = D.rank()
        self.recipe = augment.RECIPES[cfg.recipe]
        self.augment = augment.TrainAugment(self.recipe, cfg.resolution) if self.recipe.augments else None
        self.steps_per_epoch = len(self._loader(0))

    def _loader(self, epoch: int) -> DataLoader:
        cfg = self.prep.config
        return _loader(
            self.prep.train_set, cfg.batch, True, cfg.seed, epoch, self.prep.world, self.rank, cfg.workers
        )  # fmt: skip

    def batches(self, epoch: int) -> Any:
        device = self.prep.device
        for x, y in self._loader(epoch):
            x = x.to(device, non_blocking=True)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(device, non_blocking=True)

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        from . import augment

        x, y = batch
        target = None
        if self.augment is not None:
            x, target = self.augment(x, y, len(self.prep.classes))
        logits = model(x)
        if target is None:
            loss = F.cross_entropy(logits.float(), y, label_smoothing=self.recipe.label_smoothing)
        else:
            loss = augment.soft_cross_entropy(logits.float(), target)
        correct = (logits.argmax(-1) == y).sum().item()
        return loss, {"n": len(y), "loss": loss.item() * len(y), "correct": correct}

    def stats(self, sums: dict[str, float]) -> str:
        n = max(sums.get("n", 0), 1)
        return f"loss {sums.get('loss', 0) / n:.3f}  acc {sums.get('correct', 0) / n:.1%}"

    def epoch_row(self, model: nn.Module, sums: dict[str, float]) -> dict[str, Any]:
        cfg = self.prep.config
        val_loss, accuracy = evaluate(model, self.prep.val_set, cfg.batch, self.prep.device, cfg.amp, cfg.recipe)
        n = max(sums.get("n", 0), 1)
        return {
            "train_loss": sums.get("loss", 0) / n,
            "train_accuracy": sums.get("correct", 0) / n,
            "val_loss": val_loss,
            "accuracy": accuracy,
        }


def _check_same(run_dir: Path, cfg: TrainConfig) -> str:
    """The stored run's status; refuses a run made with other options (or more epochs than asked)."""
    path = run_dir / TRAIN_JSON
    try:
        stored = json.loads(path.read_text())
        config, status = stored["config"], stored["status"]
    except (OSError, ValueError, KeyError, TypeError):
        raise TrainError(f"{path} is missing or unreadable; restore it, or pass another --out") from None
    diffs = [f"{k}: {config.get(k)!r} there, {getattr(cfg, k)!r} now" for k in cfg.SAME_ON_RESUME
             if config.get(k) != getattr(cfg, k)]  # fmt: skip
    if diffs:
        raise TrainError(
            f"{run_dir} holds a training run made with other options ({'; '.join(diffs)}); "
            "pass the same options to continue it, or another --out"
        )
    return str(status)


def train(
    cfg: TrainConfig,
    *,
    progress: bool = True,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    model_fn: ModelFn | None = None,
) -> dict[str, Any]:
    """Train, evaluate and record, continuing the run in ``cfg.out`` if it holds one; returns the final
    row plus ``step_losses`` (the losses of the steps this call took) and ``reused`` (the run was complete
    before this call).

    ``cfg.nproc`` > 1 starts that many local processes through torch's launcher (``studies.distributed``;
    every input is checked here first) and returns rank 0's result; ``cfg.cluster == "slurm"`` submits
    ``nodes`` x ``nproc`` tasks through submitit and returns the job's id. A process started as one rank of
    several (by torchrun, srun or the launcher) trains its share; only rank 0 writes and returns the row
    (the other ranks return None)."""
    if D.in_launched_world():
        return _rank_train(cfg, progress=progress, on_epoch_end=on_epoch_end, model_fn=model_fn)
    cpu = torch.device("cpu")  # the checks build the model here: no GPU memory held by the launching process
    if cfg.cluster == "slurm":
        if cfg.device.split(":")[0] not in ("cpu", "cuda"):  # the GPUs are the job's, not this (login) node's
            raise TrainError(f"--device {cfg.device}: only cpu and cuda are supported")
        prepare(cfg, model_fn, device=cpu)  # every check before anything is submitted
        return _submit_slurm(cfg)
    if cfg.nproc > 1:
        _crosses_processes(model_fn, on_epoch_end)
        device = _device(cfg.device)
        if device.type == "cuda" and torch.cuda.device_count() < cfg.nproc:
            raise TrainError(f"--nproc {cfg.nproc} needs as many GPUs; {torch.cuda.device_count()} here")
        prepare(cfg, model_fn, device=cpu)  # every check here, in one line, before any process starts
        return D.launch(_launched, (cfg, progress, model_fn), cfg.nproc)
    return _train(cfg, D.World(), progress=progress, on_epoch_end=on_epoch_end, model_fn=model_fn)


def _crosses_processes(model_fn: ModelFn | None, on_epoch_end: Any) -> None:
    import pickle

    if on_epoch_end is not None:
        raise TrainError("nproc > 1 takes no on_epoch_end callback (it cannot cross processes)")
    try:
        pickle.dumps(model_fn)
    except (pickle.PicklingError, AttributeError, TypeError):
        raise TrainError("nproc > 1 needs a model builder that pickles (a module-level function)") from None


def _launched(cfg: TrainConfig, progress: bool, model_fn: ModelFn | None) -> dict[str, Any] | None:
    """One process started by :func:`distributed.launch`."""
    return _rank_train(cfg, progress=progress, model_fn=model_fn)


def _rank_train(cfg: TrainConfig, **kw: Any) -> dict[str, Any] | None:
    world = D.from_env()
    try:
        return _train(cfg, world, **kw)
    finally:
        D.teardown()


def _submit_slurm(cfg: TrainConfig) -> dict[str, Any]:
    """Submit the run as one Slurm job of ``nodes`` x ``nproc`` tasks (one per GPU) through submitit."""
    try:
        import submitit
    except ImportError:
        raise TrainError("--cluster slurm needs submitit (pip install 'attnbench[cluster]')") from None
    folder = Path(f"{cfg.out}.slurm")
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    gpus = cfg.nproc if cfg.device.startswith("cuda") else 0
    executor.update_parameters(
        name=f"attnbench-train-{Path(cfg.out).name}", nodes=cfg.nodes, tasks_per_node=cfg.nproc,
        gpus_per_node=gpus, cpus_per_task=max(cfg.threads, 4), timeout_min=72 * 60,
        **({"slurm_partition": cfg.partition} if cfg.partition else {}),
    )  # fmt: skip
    job = executor.submit(_slurm_task, dataclasses.replace(cfg, cluster=None, nodes=1))
    return {"submitted": job.job_id, "logs": str(folder), "tasks": cfg.nodes * cfg.nproc}


def _slurm_task(cfg: TrainConfig) -> dict[str, Any] | None:
    """One Slurm task of a submitted run: the rendezvous from Slurm's environment (submitit's helper)."""
    import submitit

    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    world = D.from_env()
    try:
        return _train(dataclasses.replace(cfg, nproc=max(1, world.size)), world, progress=False)
    finally:
        D.teardown()


def _train(
    cfg: TrainConfig,
    world: D.World,
    *,
    progress: bool = True,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    model_fn: ModelFn | None = None,
) -> dict[str, Any] | None:
    from attnbench.bench.env import fingerprint
    from attnbench.bench.rundir import RunDir, kill_point, write_json
    from attnbench.bench.store import ENV, RESULTS, ResultsStore

    if world.size > 1:
        cfg = dataclasses.replace(cfg, nproc=world.size, nodes=1)  # as started (torchrun, srun, the launcher)
    device = D.setup(world, _device(cfg.device))
    prep = prepare(cfg, model_fn, device=device, world=world.size, checks=world.main)
    torch.set_num_threads(cfg.threads)  # (checked by prepare)
    cfg, model, device, run_dir = prep.config, prep.model, prep.device, prep.run_dir
    if world.rank > 0:  # each rank its own dropout and augmentation draws (rank 0 keeps one process's)
        torch.manual_seed(cfg.seed * 1_000_003 + world.rank)
    if not world.main:
        if D.broadcast_object(None):  # rank 0 says whether there is anything to train (a complete run: no)
            fit(model, Classification(prep), _optim(cfg), run_dir / CHECKPOINT, device=device)
        return None
    run = RunDir(run_dir, "train")
    run.check()
    created = not run_dir.exists()
    ckpt = run_dir / CHECKPOINT
    with run.claim(request=_jsonable(cfg)):
        kill_point("created")
        status = _check_same(run_dir, cfg) if (run_dir / TRAIN_JSON).exists() else "new"
        store = ResultsStore(run_dir)
        stored = {r["point_id"]: r for r in store.open(fingerprint(threads=cfg.threads)).records}
        final_id = _row_id(cfg, f"final{cfg.epochs}")["point_id"]
        complete = status == "complete" and final_id in stored
        D.broadcast_object(not complete)
        if complete:
            return {**stored[final_id], "step_losses": [], "reused": True}
        state = {"config": _jsonable(cfg), "classes": prep.classes, "status": "running"}
        try:
            write_json(run_dir / TRAIN_JSON, state)

            def record(row: dict[str, Any]) -> None:
                full = {**_row_id(cfg, f"epoch{row['epoch']}"), "kind": "train_epoch", **row}
                if full["point_id"] not in stored:
                    store.append(full)
                    stored[full["point_id"]] = full
                if on_epoch_end is not None:
                    on_epoch_end(int(row["epoch"]), full)

            with Progress(progress) as bar:
                done = fit(model, Classification(prep), _optim(cfg), ckpt, device=device, progress=bar, on_epoch=record)
                kill_point("final")
                bar.note(f"{cfg.model}: {cfg.epochs} epochs trained; measuring the final row")
                final = _final_row(cfg, prep, done)
            store.append(final)
            state["status"] = "complete"
            write_json(run_dir / TRAIN_JSON, state)
            return {**final, "step_losses": done.step_losses, "reused": False}
        except BaseException:
            if not ckpt.exists():  # nothing worth keeping: leave no half-made run behind
                if created:
                    shutil.rmtree(run_dir, ignore_errors=True)
                else:
                    for name in (ENV, RESULTS, TRAIN_JSON):
                        (run_dir / name).unlink(missing_ok=True)
            elif run_dir.exists():
                state["status"] = "interrupted"
                with contextlib.suppress(Exception):
                    write_json(run_dir / TRAIN_JSON, state)
            raise


def _optim(cfg: TrainConfig) -> Optim:
    return Optim(
        epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_epochs=cfg.warmup_epochs,
        min_lr=cfg.min_lr, clip=cfg.clip, amp=cfg.amp, ema=cfg.ema,
    )  # fmt: skip


def _final_row(cfg: TrainConfig, prep: Prepared, done: Fit) -> dict[str, Any]:
    """The final row: the last epoch's held-out metrics, MACs per image, parameters, training throughput,
    and the peak memory of one training step measured by the harness."""
    model, device = prep.model, prep.device
    last = done.rows[-1]
    return {
        **_row_id(cfg, f"final{cfg.epochs}"),
        "kind": "train",
        "mechanism": "+".join(_mechanisms(model)),
        "mechanisms": _mechanisms(model),
        "epochs": cfg.epochs,
        "accuracy": last["accuracy"],
        "val_loss": last["val_loss"],
        "classes": len(prep.classes),
        "train_images": len(prep.train_set),
        "val_images": len(prep.val_set),
        "params": sum(p.numel() for p in model.parameters()),
        "macs": _macs(model, cfg.resolution, device),
        "images_per_s": done.images / done.train_s if done.train_s else None,
        "images_per_s_per_device": done.images / done.train_s / prep.world if done.train_s else None,
        "data_wait_share": _largest(done.rows, "data_wait_share"),
        "peak_bytes_per_device": _largest(done.rows, "peak_bytes_per_device"),
        **_step_memory(cfg, prep),
    }


def _largest(rows: list[dict[str, Any]], key: str) -> Any:
    values = [r[key] for r in rows if r.get(key) is not None]
    return max(values) if values else None


def _step_memory(cfg: TrainConfig, prep: Prepared) -> dict[str, Any]:
    """Peak memory of one training step (forward and backward, the training batch) on a copy of the
    trained model, by ``bench.measure.measure_module`` (memory probe only)."""
    import copy

    from attnbench.bench.measure import Settings, measure_module

    per_device = max(1, cfg.batch // prep.world)
    x = torch.stack([prep.train_set[i][0] for i in range(min(per_device, len(prep.train_set)))]).to(prep.device)
    record = measure_module(
        copy.deepcopy(prep.model), (x,), Settings(threads=cfg.threads, count_flops=False), pass_="fwd+bwd",
        macs=0, timing=False,
    )  # fmt: skip
    out = {"peak_bytes": record.get("peak_bytes"), "memory_method": record.get("memory_method")}
    if record["status"] != "ok":
        out["memory_reason"] = f"{record['status']}: {record.get('reason')}"
    return out


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
        "dtype": f"{str(amp_dtype(torch.device(cfg.device))).split('.')[-1]} autocast" if cfg.amp else "float32",
        "device": cfg.device,
        "world_size": cfg.nproc * cfg.nodes,
        "recipe": cfg.recipe,
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


def _jsonable(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
