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

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from attnbench.models.matching import AttentionStack, Matcher, MatcherConfig, MatchError, check_config

from attnbench import attentions

from .matching_data import DataError, MatchingPairs
from .matching_metrics import chance_precision, evaluate
from .matching_metrics import loss_fn as match_loss

FOOTPRINTS = "footprints.jsonl"
CHECKPOINTS = "checkpoints"

# Named sizes: the quick preset fits four mechanisms and two seeds in 10 minutes of a 2-core CPU.
PRESETS: dict[str, dict[str, Any]] = {
    "default": dict(resolution=96, dim=64, layers=("self", "cross") * 2, epochs=12, train_size=512, val_size=64),
    "quick": dict(resolution=96, dim=32, layers=("self", "cross") * 2, epochs=6, train_size=160, val_size=32),
    "smoke": dict(resolution=96, dim=16, layers=("self", "cross"), epochs=1, train_size=8, val_size=4),
}


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
    lr: float = 2e-3
    threads: int | None = None
    # Preset settings replaced (epochs, train_size, val_size, dim, layers), as (name, value) pairs.
    overrides: tuple[tuple[str, Any], ...] = ()

    def settings(self) -> dict[str, Any]:
        s = dict(PRESETS[self.preset])
        if self.resolution is not None:
            s["resolution"] = self.resolution
        unknown = [k for k, _ in self.overrides if k not in s]
        if unknown:
            raise MatchError(f"unknown setting(s) {', '.join(unknown)}; settings are {', '.join(s)}")
        s.update(self.overrides)
        return s

    def matcher(self, mechanism: str) -> MatcherConfig:
        s = self.settings()
        own = attentions.get(mechanism).knob_types()
        knobs = tuple((k, v) for k, v in self.knobs if k in own)
        return MatcherConfig(mechanism, resolution=s["resolution"], dim=s["dim"], layers=s["layers"], knobs=knobs)


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
    for mech in cfg.mechanisms:
        try:
            attentions.get(mech)
        except KeyError as exc:
            raise MatchError(str(exc.args[0])) from None
    unknown = [k for k, _ in cfg.knobs if not any(k in attentions.get(m).knob_types() for m in cfg.mechanisms)]
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


def run(
    cfg: MatchRunConfig, *, log: Callable[[str], None] = print, progress: Callable[[str], None] | None = None
) -> list[dict[str, Any]]:
    """Train and record every (mechanism, seed) not yet in the store; returns all the final rows."""
    from attnbench.bench.env import fingerprint
    from attnbench.bench.store import ResultsStore

    validate(cfg)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    store = ResultsStore(out)
    done = {r["point_id"]: r for r in store.open(fingerprint()).records if r.get("kind") == "match"}
    (out / "match.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2, default=str) + "\n")
    rows = []
    for mech in cfg.mechanisms:
        for seed in range(cfg.seeds):
            rid = run_id(cfg, mech, seed)
            if rid in done:
                log(f"{mech} seed {seed}: already recorded, skipped")
                rows.append(done[rid])
                continue
            t0 = time.perf_counter()
            row = train_one(cfg, mech, seed, rid, store, progress or log)
            log(
                f"{mech} seed {seed}: precision {row['precision']:.1%}, AUC@3/5/10 px "
                f"{row['auc@3']:.1%} / {row['auc@5']:.1%} / {row['auc@10']:.1%} "
                f"({time.perf_counter() - t0:.0f} s)"
            )
            rows.append(row)
    return rows


def train_one(
    cfg: MatchRunConfig, mech: str, seed: int, rid: str, store: Any, progress: Callable[[str], None]
) -> dict[str, Any]:
    s = cfg.settings()
    mcfg = cfg.matcher(mech)
    out = Path(cfg.out)
    ck_dir = out / CHECKPOINTS
    ck_path = ck_dir / (rid.replace(":", "_") + ".pt")
    train_set = pairs(s["train_size"], mcfg.resolution, "train", seed, cfg.source)
    val_set = pairs(s["val_size"], mcfg.resolution, "val", seed, cfg.source)
    torch.manual_seed(seed)
    model = Matcher(mcfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch)
    total = steps_per_epoch * s["epochs"]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.1)
    start = 0
    train_s = 0.0
    if ck_path.exists():
        ck = torch.load(ck_path, weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        start, train_s = int(ck["epoch"]), float(ck["train_s"])
        torch.set_rng_state(ck["rng"])
        progress(f"{mech} seed {seed}: resumed after epoch {start}")
    elif seed == 0:  # the figure shows seed 0
        _append_footprints(out, rid, mech, seed, "init", model, val_set[0])
    for epoch in range(start, s["epochs"]):
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        loss_sum = 0.0
        for b in range(steps_per_epoch):
            chunk = [train_set[int(i)] for i in order[b * cfg.batch : (b + 1) * cfg.batch]]
            img0, img1 = torch.stack([c[0] for c in chunk]), torch.stack([c[1] for c in chunk])
            gt = torch.stack([c[3] for c in chunk])
            loss = match_loss(model(img0, img1), gt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            loss_sum += loss.item()
        train_s += time.perf_counter() - t0
        ck_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "epoch": epoch + 1,
            "train_s": train_s,
            "rng": torch.get_rng_state(),
        }
        torch.save(state, ck_path.with_suffix(".tmp"))
        os.replace(ck_path.with_suffix(".tmp"), ck_path)  # atomic: a kill never leaves half a checkpoint
        progress(f"{mech} seed {seed}: epoch {epoch + 1}/{s['epochs']} loss {loss_sum / steps_per_epoch:.3f}")
    metrics = evaluate(model, val_set)
    if seed == 0:
        _append_footprints(out, rid, mech, seed, "trained", model, val_set[0])
    cost = stack_cost(model.stack, mcfg, smoke=cfg.preset == "smoke")
    hw = mcfg.coarse_hw
    row = {
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
        "cross": True,
        "dim": mcfg.dim,
        "heads": mcfg.heads,
        "layers": list(mcfg.layers),
        "epochs": s["epochs"],
        "train_pairs": len(train_set),
        "val_pairs": len(val_set),
        "batch": cfg.batch,
        "dtype": "float32",
        "device": "cpu",
        "params": sum(p.numel() for p in model.parameters()),
        "stack_params": sum(p.numel() for p in model.stack.parameters()),
        "chance_precision": chance_precision(hw),
        **metrics,
        **cost,
        "train_s": train_s,
        "threads": torch.get_num_threads(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    store.append(_finite(row))
    ck_path.unlink(missing_ok=True)
    if not any(ck_dir.iterdir()):
        ck_dir.rmdir()
    return row


def _finite(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def stack_cost(stack: AttentionStack, mcfg: MatcherConfig, smoke: bool = False) -> dict[str, Any]:
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
    record = measure_module(stack, (f0, f1), cost_settings(smoke), pass_="fwd", macs=out["macs"])
    status, reason = record.pop("status"), record.pop("reason")
    record.pop("macs", None)
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
    out.mkdir(parents=True, exist_ok=True)
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
    with open(out / FOOTPRINTS, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def standalone_footprints(
    mechanisms: list[str],
    hw: tuple[int, int],
    query: tuple[int, int] | None,
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
    query = query or (hw[0] // 2, hw[1] // 2)
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
            raise MatchError(f"{name} cannot run on a {hw[0]}x{hw[1]} map: {'; '.join(reasons)}")
        if not (0 <= query[0] < hw[0] and 0 <= query[1] < hw[1]):
            raise MatchError(f"--query {query} lies outside the {hw[0]}x{hw[1]} map")
        built.append((name, attn, args, chw))
    panels = []
    for name, attn, args, chw in built:
        fp = attn.footprint(args[0], args[1], query, *args[2:])  # (heads, Hk, Wk)
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
