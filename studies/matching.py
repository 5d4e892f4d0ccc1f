"""``attnbench match``: train the coarse matcher for each mechanism and seed, measure, record.

The output directory is a results store (env.json, results.jsonl) with one
``kind: "match"`` row per (mechanism, seed): held-out precision, recall and
homography AUCs, parameters, and the cost of the attention stack at the stated
resolution (analytic and counted MACs, CPU latency, peak memory, measured the
way bench measures a point). ``footprints.jsonl`` holds, per run, where one
query of the first validation pair looks in every block, at initialisation and
after training. Each run checkpoints every epoch under ``checkpoints/`` and
resumes from there; a finished run's row is never recomputed, and its
checkpoint is removed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from attnbench.models.matching import AttentionStack, Matcher, MatcherConfig, MatchError, check_config

from attnbench import attentions

from . import distributed as D
from .controls import MATCH_CONTROLS
from .loop import Optim, Progress, fit
from .matching_data import DataError, MatchingPairs
from .matching_metrics import chance_precision, evaluate
from .matching_metrics import loss_fn as match_loss

FOOTPRINTS = "footprints.jsonl"
HELD_OUT_SEED = 0  # the seed of the held-out pairs every run is evaluated on
CHECKPOINTS = "checkpoints"

# Named sizes: the quick preset fits four mechanisms and two seeds in 10 minutes of a 2-core CPU.
PRESETS: dict[str, dict[str, Any]] = {
    "default": dict(
        resolution=96, dim=64, layers=("self", "cross") * 2, epochs=12, train_size=512, val_size=64, stem="conv",
        lr=2e-3,
    ),
    # The quick task's stem gives each token its own 8 x 8 cell only: its context (what tells two similar cells
    # apart) has to come through attention, which the positive control (MECHANISM.isolated) takes away. With
    # the default's convolutional stem (31 x 31 px per token) the quick matcher matched as well with no attention.
    "quick": dict(
        resolution=96, dim=32, layers=("self", "cross") * 2, epochs=20, train_size=160, val_size=64, stem="patch",
        lr=4e-3,
    ),
    "smoke": dict(
        resolution=96, dim=16, layers=("self", "cross"), epochs=1, train_size=8, val_size=4, stem="conv", lr=2e-3
    ),
}  # fmt: skip


@dataclasses.dataclass
class MatchRunConfig:
    mechanisms: tuple[str, ...]
    out: str
    seeds: int = 2
    preset: str = "default"
    source: str = "synthetic"
    resolution: int | None = None  # None: the preset's
    knobs: tuple[tuple[str, str], ...] = ()  # applied to every mechanism that has the knob
    batch: int = 16
    lr: float | None = None  # None: the preset's
    threads: int = 1  # torch intra-op threads, set before any work and recorded in every row
    # Preset settings replaced (epochs, train_size, val_size, dim, layers), as (name, value) pairs.
    overrides: tuple[tuple[str, Any], ...] = ()
    nproc: int = 1  # processes training each run data-parallel (batch: the global batch); not a setting of rows

    def settings(self) -> dict[str, Any]:
        s = dict(PRESETS[self.preset])
        if self.resolution is not None:
            s["resolution"] = self.resolution
        if self.lr is not None:
            s["lr"] = self.lr
        unknown = [k for k, _ in self.overrides if k not in s]
        if unknown:
            raise MatchError(f"unknown setting(s) {', '.join(unknown)}; settings are {', '.join(s)}")
        s.update(self.overrides)
        return s

    def matcher(self, mechanism: str) -> MatcherConfig:
        s = self.settings()
        base, control = split_control(mechanism)
        own = attentions.get(base).knob_types()
        knobs = tuple((k, v) for k, v in self.knobs if k in own)
        layers = tuple("self" for _ in s["layers"]) if control in ("self-only", "isolated") else tuple(s["layers"])
        return MatcherConfig(
            base,
            resolution=s["resolution"],
            dim=s["dim"],
            layers=layers,
            knobs=knobs,
            stem=s["stem"],
            isolated=control == "isolated",
        )


def split_control(mechanism: str) -> tuple[str, str | None]:
    """'full.twin' -> ('full', 'twin'); 'full' -> ('full', None); an unknown control raises MatchError."""
    base, _, control = mechanism.partition(".")
    if control and control not in MATCH_CONTROLS:
        raise MatchError(
            f"{mechanism}: unknown control {control!r}; a control is MECHANISM.twin (negative: the mechanism on "
            "its own seeds), MECHANISM.isolated (positive: each token reads only itself) or MECHANISM.self-only "
            "(positive: no cross attention)"
        )
    return base, control or None


def train_seed(mechanism: str, seed: int) -> int:
    """Seed k of a twin runs as 1000 + k (its own weights, data order and pairs)."""
    from .controls import TWIN_SEED_OFFSET

    return TWIN_SEED_OFFSET + seed if split_control(mechanism)[1] == "twin" else seed


def validate(cfg: MatchRunConfig) -> None:
    """Every check that can fail, before anything trains: mechanisms, knobs, resolution, data."""
    if cfg.preset not in PRESETS:
        raise MatchError(f"preset must be one of {', '.join(PRESETS)}, got {cfg.preset!r}")
    s = cfg.settings()
    for key in ("epochs", "train_size", "val_size"):
        if not isinstance(s[key], int) or s[key] < 1:
            raise MatchError(f"{key} must be a positive integer, got {s[key]!r}")
    if not cfg.mechanisms:
        raise MatchError("give at least one mechanism with --mechanism")
    if cfg.seeds < 1:
        raise MatchError(f"--seeds must be at least 1, got {cfg.seeds}")
    if cfg.threads < 1:
        raise MatchError(f"--threads must be at least 1, got {cfg.threads}")
    if cfg.batch < 1:
        raise MatchError(f"--batch must be at least 1, got {cfg.batch}")
    if cfg.nproc < 1 or cfg.batch % cfg.nproc:
        raise MatchError(f"--nproc {cfg.nproc}: the batch {cfg.batch} (the global batch) must be a multiple of it")
    if not (isinstance(s["lr"], (int, float)) and math.isfinite(s["lr"]) and s["lr"] > 0):
        raise MatchError(f"--lr must be a positive finite number, got {s['lr']}")
    bases = []
    for mech in cfg.mechanisms:
        base, _ = split_control(mech)
        try:
            attentions.get(base)
        except KeyError as exc:
            raise MatchError(str(exc.args[0])) from None
        bases.append(base)
    unknown = [k for k, _ in cfg.knobs if not any(k in attentions.get(m).knob_types() for m in bases)]
    if unknown:
        raise MatchError(f"knob(s) {', '.join(unknown)} belong to none of {', '.join(cfg.mechanisms)}")
    for mech in cfg.mechanisms:
        check_config(cfg.matcher(mech))
    try:
        MatchingPairs(1, s["resolution"], source=cfg.source)
    except DataError as exc:
        raise MatchError(str(exc)) from None


def run_id(cfg: MatchRunConfig, mechanism: str, seed: int) -> str:
    m = cfg.matcher(mechanism)
    s = cfg.settings()
    spec = json.dumps(
        [dataclasses.asdict(m), s, cfg.source, cfg.batch, cfg.lr, seed], sort_keys=True, default=str
    ).encode()
    return f"match:{mechanism}:s{seed}:{m.resolution}px:{hashlib.sha1(spec).hexdigest()[:10]}"


_DATA_CACHE: dict[tuple, list] = {}


def pairs(size: int, resolution: int, split: str, seed: int, source: str) -> list[tuple[torch.Tensor, ...]]:
    """The materialised pairs of one split (cached: every mechanism trains on the same pairs of a seed)."""
    key = (size, resolution, split, seed, source)
    if key not in _DATA_CACHE:
        ds = MatchingPairs(size, resolution, split, seed, source)
        _DATA_CACHE[key] = [ds[i] for i in range(size)]
    return _DATA_CACHE[key]


# What shapes a row: a directory holds rows made with one of these at a time (mechanisms and seeds may grow).
SAME_SETTINGS = ("preset", "source", "resolution", "knobs", "batch", "lr", "overrides")


def _request(cfg: MatchRunConfig) -> dict[str, Any]:
    """What match.json holds: the command's fields and the settings they resolve to (the preset's, as this
    version of attnbench defines it, with the overrides applied)."""
    return json.loads(json.dumps({**dataclasses.asdict(cfg), "settings": cfg.settings()}, default=str))


def _check_same(out: Path, cfg: MatchRunConfig) -> None:
    path = out / "match.json"
    if not path.exists():
        return
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        raise MatchError(f"{path} is not readable JSON; restore it, or pass another --out") from None
    now = _request(cfg)
    if "settings" not in stored:
        raise MatchError(
            f"{out} holds a match run of an earlier attnbench that did not record its preset's settings (they may "
            "have changed since); pass another --out"
        )
    diffs = [f"{k}: {stored.get(k)!r} there, {now.get(k)!r} now" for k in SAME_SETTINGS if stored.get(k) != now.get(k)]
    diffs += [
        f"{k}: {stored['settings'].get(k)!r} there, {now['settings'].get(k)!r} now"
        for k in dict.fromkeys([*stored["settings"], *now["settings"]])
        if stored["settings"].get(k) != now["settings"].get(k) and not any(d.startswith(f"{k}:") for d in diffs)
    ]
    if diffs:
        raise MatchError(
            f"{out} holds a match run made with other settings ({'; '.join(diffs)}); "
            "pass the same settings to continue it (mechanisms and seeds may be added), or another --out"
        )


def run(cfg: MatchRunConfig, *, log: Callable[[str], None] = print, progress: bool = False) -> list[dict[str, Any]]:
    """Train and record every (mechanism, seed) not yet in the store; returns all the final rows.

    ``cfg.out`` is a run directory of kind ``match`` (``bench.rundir``): locked while written, refused
    to other commands and to other settings. Killed at any moment, the same call continues: a run
    resumes from its last checkpoint, a trained run is evaluated and stored, and nothing is stored twice.
    """
    from attnbench.bench.rundir import RunDir

    validate(cfg)
    torch.set_num_threads(cfg.threads)
    if D.in_launched_world():
        return _rank_run(cfg, log, progress)
    if cfg.nproc > 1:
        _check_same(Path(cfg.out), cfg)
        RunDir(cfg.out, "match").check()
        return D.launch(_launched, (cfg, progress), cfg.nproc)
    return _run(cfg, log, progress)


def _run(cfg: MatchRunConfig, log: Callable[[str], None], progress: bool) -> list[dict[str, Any]]:
    from attnbench.bench.env import fingerprint
    from attnbench.bench.rundir import RunDir, kill_point, write_json
    from attnbench.bench.store import ResultsStore

    out = Path(cfg.out)
    run_dir = RunDir(out, "match")
    run_dir.check()
    _check_same(out, cfg)
    rows = []
    with run_dir.claim(request=json.loads(json.dumps(dataclasses.asdict(cfg), default=str))):
        kill_point("created")
        store = ResultsStore(out)
        done = {
            r["point_id"]: r for r in store.open(fingerprint(threads=cfg.threads)).records if r.get("kind") == "match"
        }
        D.broadcast_object(sorted(done))  # the other ranks train what rank 0 has not stored
        write_json(out / "match.json", _request(cfg))
        total = len(cfg.mechanisms) * cfg.seeds
        with Progress(progress) as bar:
            for i, (mech, seed) in enumerate((m, s) for m in cfg.mechanisms for s in range(cfg.seeds)):
                rid = run_id(cfg, mech, seed)
                ck_path = out / CHECKPOINTS / (rid.replace(":", "_") + ".pt")
                if rid in done:
                    ck_path.unlink(missing_ok=True)  # a kill after the row, before its checkpoint went
                    log(f"[{i + 1}/{total}] {mech} seed {seed}: already recorded, skipped")
                    rows.append(done[rid])
                    continue
                log(f"[{i + 1}/{total}] {mech} seed {seed}: training" + (" (resumed)" if ck_path.exists() else ""))
                t0 = time.perf_counter()
                row = train_one(cfg, mech, seed, rid, ck_path, bar)
                store.append(_finite(row))
                kill_point("stored")
                ck_path.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    ck_path.parent.rmdir()  # only when empty
                log(
                    f"{mech} seed {seed}: precision {row['precision']:.1%}, AUC@3/5/10 px "
                    f"{row['auc@3']:.1%} / {row['auc@5']:.1%} / {row['auc@10']:.1%} "
                    f"({time.perf_counter() - t0:.0f} s)"
                )
                rows.append(row)
    return rows


def _launched(cfg: MatchRunConfig, progress: bool) -> list[dict[str, Any]] | None:
    """One process started by :func:`distributed.launch`."""
    return run(cfg, progress=progress)


def _rank_run(cfg: MatchRunConfig, log: Callable[[str], None], progress: bool) -> list[dict[str, Any]] | None:
    """One rank of a data-parallel match: rank 0 runs as one process does (it alone writes); the others
    train the runs rank 0 has not stored, their share of every global batch, and return None."""
    world = D.from_env()
    D.setup(world, torch.device("cpu"))
    try:
        if world.main:
            return _run(cfg, log, progress)
        done = set(D.broadcast_object(None))
        with Progress(False) as bar:
            for mech, seed in ((m, s) for m in cfg.mechanisms for s in range(cfg.seeds)):
                rid = run_id(cfg, mech, seed)
                if rid not in done:
                    train_one(cfg, mech, seed, rid, Path(cfg.out) / CHECKPOINTS / (rid.replace(":", "_") + ".pt"), bar)
        return None
    finally:
        D.teardown()


class MatchingTask:
    """The loop's task for the matcher: batches of pairs in an order fixed by (seed, epoch), the loss at
    the ground-truth cells."""

    def __init__(self, train_set: list, batch: int, seed: int, world: int = 1, rank: int = 0):
        self.train_set, self.batch, self.seed, self.world, self.rank = train_set, batch, seed, world, rank
        # Several processes: whole global batches only, each rank its contiguous share of every one.
        full = len(train_set) // batch
        self.steps_per_epoch = math.ceil(len(train_set) / batch) if world == 1 or not full else full

    def batches(self, epoch: int) -> Any:
        order = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
        share = self.batch // self.world
        for b in range(self.steps_per_epoch):
            start = b * self.batch + self.rank * share
            chunk = [self.train_set[int(i)] for i in order[start : start + (share if self.world > 1 else self.batch)]]
            yield (
                torch.stack([c[0] for c in chunk]),
                torch.stack([c[1] for c in chunk]),
                torch.stack([c[3] for c in chunk]),
            )

    def loss(self, model: Any, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        img0, img1, gt = batch
        loss = match_loss(model(img0, img1), gt)
        return loss, {"n": len(gt), "loss": loss.item() * len(gt)}

    def stats(self, sums: dict[str, float]) -> str:
        return f"loss {sums.get('loss', 0) / max(sums.get('n', 0), 1):.3f}"

    def epoch_row(self, model: Any, sums: dict[str, float]) -> dict[str, Any]:
        return {"train_loss": sums.get("loss", 0) / max(sums.get("n", 0), 1)}


def train_one(cfg: MatchRunConfig, mech: str, seed: int, rid: str, ck_path: Path, bar: Progress) -> dict[str, Any]:
    """Train (or continue) one (mechanism, seed) with the one training loop; evaluate, measure; its row."""
    from attnbench.bench.rundir import kill_point

    s = cfg.settings()
    mcfg = cfg.matcher(mech)
    out = Path(cfg.out)
    seed = train_seed(mech, seed)
    train_set = pairs(s["train_size"], mcfg.resolution, "train", seed, cfg.source)
    # One held-out set for every run (the val split's seed 0): the spread over seeds is the training's alone,
    # not also the draw of each run's held-out pairs
    val_set = pairs(s["val_size"], mcfg.resolution, "val", HELD_OUT_SEED, cfg.source)
    torch.manual_seed(seed)
    model = Matcher(mcfg)
    main = D.rank() == 0
    if D.rank() > 0:  # each rank its own dropout draws (rank 0 keeps one process's)
        torch.manual_seed(seed * 1_000_003 + D.rank())
    if main and seed == 0 and not ck_path.exists():  # the figure shows seed 0
        _append_footprints(out, rid, mech, seed, "init", model, val_set[0])
    # AdamW at lr with 10% warm-up then cosine to 0, weight decay 0.01, gradients clipped to 1.
    optim = Optim(epochs=s["epochs"], lr=s["lr"], weight_decay=0.01, warmup_epochs=0.1 * s["epochs"], min_lr=0.0)
    task = MatchingTask(train_set, cfg.batch, seed, D.size(), D.rank())
    done = fit(model, task, optim, ck_path, device=torch.device("cpu"), progress=bar, label=f"{mech} seed {seed}: ")
    if not main:
        return {}
    kill_point("trained")
    metrics = evaluate(model, val_set)
    if seed == 0:
        _append_footprints(out, rid, mech, seed, "trained", model, val_set[0])
    cost = stack_cost(model.stack, mcfg, smoke=cfg.preset == "smoke", threads=cfg.threads)
    if cfg.source == "skimage":  # the stereo pair of the same wheel, never trained on
        from .matching_images import evaluate_stereo

        metrics.update(evaluate_stereo(model))
    hw = mcfg.coarse_hw
    return {
        "point_id": rid,
        "kind": "match",
        "status": "ok",
        "mechanism": mech,
        "knobs": dict(mcfg.knobs),
        "seed": seed,
        "preset": cfg.preset,
        "data": cfg.source,
        "image_height": mcfg.resolution,
        "image_width": mcfg.resolution,
        "height": hw[0],
        "width": hw[1],
        "tokens": hw[0] * hw[1],
        "cross": "cross" in mcfg.layers,
        "control": split_control(mech)[1],
        "dim": mcfg.dim,
        "heads": mcfg.heads,
        "layers": list(mcfg.layers),
        "epochs": s["epochs"],
        "lr": s["lr"],
        "stem": mcfg.stem,
        "train_pairs": len(train_set),
        "val_pairs": len(val_set),
        "batch": cfg.batch,
        "world_size": D.size(),
        "params": sum(p.numel() for p in model.parameters()),
        "stack_params": sum(p.numel() for p in model.stack.parameters()),
        "chance_precision": chance_precision(hw),
        "train_loss": done.rows[-1]["train_loss"],
        **metrics,
        **cost,
        "train_s": done.train_s,
        "threads": cfg.threads,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _finite(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def stack_cost(
    stack: AttentionStack, mcfg: MatcherConfig, smoke: bool = False, threads: int | None = None
) -> dict[str, Any]:
    """Cost of the attention stack on one pair (batch 1, forward, float32, CPU), measured by the harness's
    one function (``bench.measure.measure_module``) as a sweep measures a point."""
    from attnbench.bench.flops import count
    from attnbench.bench.measure import measure_module

    from .cost import cost_settings

    n = mcfg.coarse_hw[0] * mcfg.coarse_hw[1]
    gen = torch.Generator().manual_seed(0)
    f0, f1 = torch.randn(1, n, mcfg.dim, generator=gen), torch.randn(1, n, mcfg.dim, generator=gen)
    out: dict[str, Any] = {"analytic_macs": stack.attention_macs(1), "macs_error": None}
    try:
        counted = count(stack.eval(), (f0, f1), flop_counter=False, backward=False)
        out["macs"] = int(counted.macs)
        out["macs_uncovered"] = dict(counted.uncovered or {})
    except Exception as exc:  # noqa: BLE001  (a count that fails must not lose a trained run)
        out["macs"], out["macs_uncovered"] = None, None
        out["macs_error"] = f"{type(exc).__name__}: {exc}"[:300]
    record = measure_module(stack, (f0, f1), cost_settings(smoke, threads), pass_="fwd", macs=out["macs"])
    status, reason = record.pop("status"), record.pop("reason")
    record.pop("macs", None)
    record.pop("params", None)  # the stack's, which the row holds as stack_params; its params are the matcher's
    out.update(record)
    if status != "ok":  # the training stands; the row says why its cost is missing
        out["cost_reason"] = f"{status}: {reason}"
    out["keys_per_query"] = {
        kind: stack.blocks[[b.kind for b in stack.blocks].index(kind)].attn.keys_per_query(
            mcfg.coarse_hw, None if kind == "self" else mcfg.coarse_hw
        )
        for kind in set(mcfg.layers)
    }
    return out


@torch.no_grad()
def footprint_rows(model: Matcher, pair: tuple[torch.Tensor, ...], query: tuple[int, int] | None = None) -> list:
    """Where one query of image 0 looks in every block: head-mean weights over image 0 (self) or image 1 (cross)."""
    model.eval()
    hw = model.cfg.coarse_hw
    query = query or (hw[0] // 2, hw[1] // 2)
    record: list = []
    model(pair[0][None], pair[1][None], record)
    rows = []
    for i, kind, args0, _ in record:
        attn = model.stack.blocks[i].attn
        x, xhw, ctx, chw = args0
        fp = attn.footprint(x, xhw, query, ctx, chw)  # (heads, Hk, Wk)
        rows.append(
            {
                "block": i,
                "kind": kind,
                "query": list(query),
                "heads": fp.shape[0],
                "weights": [[round(float(v), 6) for v in r] for r in fp.mean(0)],
                "keys_per_query": attn.keys_per_query(xhw, chw),
            }
        )
    return rows


def _append_footprints(out: Path, rid: str, mech: str, seed: int, state: str, model: Matcher, pair: tuple) -> None:
    """Add one run's footprints in one state, once: a record already there (written before a kill) is kept,
    and a line a kill cut short is dropped."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / FOOTPRINTS
    kept, have = [], set()
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            kept.append(line)
            have.add((rec.get("point_id"), rec.get("state")))
        if (rid, state) in have:
            return
        if len(kept) != len(path.read_text(encoding="utf-8").splitlines()):
            path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
    rows = footprint_rows(model, pair)
    record = {
        "point_id": rid,
        "mechanism": mech,
        "seed": seed,
        "state": state,
        "resolution": model.cfg.resolution,
        "coarse_hw": list(model.cfg.coarse_hw),
        "gt": int(pair[3][rows[0]["query"][0] * model.cfg.coarse_hw[1] + rows[0]["query"][1]]),
        "image0": (pair[0][0] * 255).round().to(torch.uint8).tolist(),  # grey levels 0..255
        "image1": (pair[1][0] * 255).round().to(torch.uint8).tolist(),
        "blocks": rows,
    }
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def standalone_footprints(
    mechanisms: list[str],
    hw: tuple[int, ...],
    query: tuple[int, ...] | None,
    cross: bool,
    knobs: tuple[tuple[str, str], ...],
    dim: int,
    heads: int,
    seed: int,
) -> list[dict[str, Any]]:
    """Footprint panels of freshly initialised mechanisms on random tokens (``attnbench footprint``).

    Refuses, before drawing anything, a mechanism or knob that does not fit, naming what to change.
    """
    if not mechanisms:
        raise MatchError("give at least one mechanism with --mechanism")
    unknown = [k for k, _ in knobs if not any(k in attentions.get(m).knob_types() for m in mechanisms)]
    if unknown:
        raise MatchError(f"knob(s) {', '.join(unknown)} belong to none of {', '.join(mechanisms)}")
    where = "x".join(map(str, hw))
    if len(hw) == 3:  # a clip: only mechanisms that take time
        flat = [n for n in mechanisms if not attentions.get(n).time.supported]
        if flat:
            timed = [n for n in attentions.available() if attentions.get(n).time.supported]
            why = "; ".join(f"{n}: {attentions.get(n).time.why_not}" for n in flat)
            raise MatchError(
                f"{', '.join(flat)} take(s) no time axis ({why}); a {where} clip can be drawn for "
                f"{', '.join(timed)}, or draw an H x W map (no --frames, no T in -r)"
            )
    query = query or tuple(side // 2 for side in hw)
    if len(query) != len(hw):
        what = "T,I,J on a clip" if len(hw) == 3 else "I,J on an (H, W) map"
        raise MatchError(f"--query takes {what}, got {','.join(map(str, query))} for the {where} map")
    if not all(0 <= a < side for a, side in zip(query, hw, strict=True)):
        raise MatchError(f"--query {query} lies outside the {where} map")
    built = []
    for name in mechanisms:
        cls = attentions.get(name)
        own = {k: v for k, v in knobs if k in cls.knob_types()}
        torch.manual_seed(seed)
        attn = attentions.build(name, dim=dim, heads=heads, **own)
        if cross and not attn.supports_cross:
            crossing = [n for n in attentions.available() if attentions.get(n).supports_cross]
            raise MatchError(f"{name} has no cross attention; drop --cross or use {', '.join(crossing)}")
        args = attn.example_inputs(1, hw, cross=cross or attn.requires_context, seed=seed)
        chw = args[3] if len(args) > 3 else None
        reasons = attn.unsupported(1, hw, chw)
        if reasons:
            raise MatchError(f"{name} cannot run on a {where} map: {'; '.join(reasons)}")
        built.append((name, attn, args, chw))
    panels = []
    for name, attn, args, chw in built:
        fp = attn.footprint(args[0], args[1], query, *args[2:])  # (heads, Hk, Wk), or (heads, T, Hk, Wk) on a clip
        panels.append(
            {
                "mechanism": name,
                "knobs": {k: v if not isinstance(v, tuple) else list(v) for k, v in attn.knobs.as_dict().items()},
                "kind": "cross" if chw is not None else "self",
                "query": list(query),
                "query_hw": list(hw),
                "weights": fp.mean(0).tolist(),
                "per_head": fp.tolist(),
                "keys_per_query": attn.keys_per_query(hw, chw),
                "macs": int(attn.macs(1, hw, chw)),
            }
        )
    return panels
