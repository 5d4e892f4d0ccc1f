"""Experiments as files: the papers' ablations, trained and measured by ``attnbench reproduce``.

An experiment is a YAML file (read with the safe loader) under ``experiments/``:

```yaml
name: quadtree_mechanisms            # the file's stem by convention
title: ...                            # one line
paper: Tang et al., ICLR 2022         # the paper whose comparison this is
task: |                               # why the data and resolution can separate the variants
  ...
data: synthetic                       # or an image folder (--data overrides)
seeds: 3                              # seeds per variant (--seeds overrides)
modes:                                # quick: CPU, tiny models; full: the published configuration
  quick: {tiny: true, resolution: 64, epochs: 2, batch: 32, lr: 0.002, train_size: 512, val_size: 256,
          cost_resolutions: [64, 128], cost_batch: 8}
  full:  {tiny: false, resolution: 224, ...}
variants:
  - name: swin
    model: pyramid_swin               # a zoo entry (attnbench models)
    config: {fusion: pairwise}        # fields of its configuration (BackboneConfig or CrossViTConfig)
    knobs: {topk: 4}                  # merged into every block whose mechanism has these knobs
    stages:                           # backbone only, one entry per stage; null keeps the stage
      - {attention: swin, knobs: {window: 2}}   # a new mechanism (and its knobs) for every block
      - {knobs: {window: 4}}                    # knobs merged into the stage's blocks
      - {attention: [swin, deformable], knobs: [{window: 2}, {stride: 1}]}   # cycled over the blocks
    quick: {stages: ...}              # per-mode overrides of model, config, knobs, stages
    published: {top1: 82.0, params_m: 29, gmacs: 4.6, source: "Table 6, p. 8"}
```

``--smoke`` runs the quick mode with one training step per variant, one seed and the
first cost resolution (seconds; CI runs every shipped experiment so). Everything is
checked before anything trains (:func:`validate`): unknown fields, unknown models,
mechanisms or knobs, and a variant that cannot run at a stated resolution are
refused with the field named (:class:`ExperimentError`).

Results: ``OUT/results.jsonl`` of the results store (``kind: "experiment"`` per
variant and seed: accuracy, params, MACs; ``kind: "experiment_cost"`` per variant and
cost resolution: params, MACs, inference latency, peak memory of inference and of a training step),
``OUT/experiment.json`` (the
experiment as run) and ``OUT/runs/<mode>/<variant>/seed<k>/``, each a training run
directory of ``models.train`` with its checkpoint (``--work`` puts them elsewhere).
A killed run resumes: stored rows are skipped, and an interrupted training run
continues from its last checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from attnbench.errors import AttnbenchError

from . import controls

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"
MODES = ("quick", "full")

TOP_FIELDS = {"name", "title", "paper", "task", "data", "seeds", "modes", "variants", "notes"}
TOP_REQUIRED = ("name", "modes", "variants")
MODE_REQUIRED = ("resolution",)
VARIANT_REQUIRED = ("name", "model")
MODE_FIELDS = {
    "tiny", "resolution", "epochs", "batch", "lr", "train_size", "val_size", "cost_resolutions", "cost_batch",
    "warmup_epochs", "weight_decay", "amp", "threads", "recipe", "ema", "lr_rule", "recipe_source",
}  # fmt: skip
VARIANT_FIELDS = {
    "name", "model", "config", "knobs", "stages", "quick", "full", "published", "notes", "twin_of",
    "positive_control_of", "modes",
}  # fmt: skip
OVERRIDE_FIELDS = {"model", "config", "knobs", "stages"}
STAGE_FIELDS = {"attention", "knobs"}
PUBLISHED_FIELDS = {"top1", "params_m", "gmacs", "source"}
MODE_DEFAULTS: dict[str, Any] = {
    "tiny": True, "resolution": None, "epochs": 2, "batch": 32, "lr": 2e-3, "train_size": 512, "val_size": 256,
    "cost_resolutions": None, "cost_batch": 1, "warmup_epochs": 1.0, "weight_decay": 0.05, "amp": False,
    "threads": 1, "recipe": "none", "ema": None, "lr_rule": None, "recipe_source": None,
}  # fmt: skip


# Fields added after rows were stored: at their defaults they leave a variant's hash as it was.
HASH_QUIET = ("recipe", "ema", "lr_rule", "recipe_source")


class ExperimentError(AttnbenchError, ValueError):
    """An experiment file that cannot run as written; the message names the field."""


@dataclasses.dataclass
class Variant:
    name: str
    spec: dict[str, Any]  # model, config, knobs, stages, quick, full
    published: dict[str, Any]


@dataclasses.dataclass
class Experiment:
    name: str
    title: str
    paper: str
    task: str
    data: str
    seeds: int
    modes: dict[str, dict[str, Any]]
    variants: list[Variant]
    path: str
    raw: dict[str, Any]

    def mode(self, mode: str) -> dict[str, Any]:
        """The recipe of ``mode`` ('quick', 'full' or 'smoke', the quick one cut to one step)."""
        if mode == "smoke":
            m = dict(self.modes["quick"])
            m.update(epochs=1, train_size=m["batch"], val_size=8, cost_resolutions=m["cost_resolutions"][:1])
            return m
        if mode not in self.modes:
            raise ExperimentError(f"{self.path}: modes.{mode}: this experiment has no {mode} mode")
        return self.modes[mode]

    def variants_in(self, mode: str) -> list[Variant]:
        """The variants that run in ``mode`` (a variant's ``modes`` field; smoke runs the quick ones)."""
        key = "quick" if mode == "smoke" else mode
        return [v for v in self.variants if key in (v.spec.get("modes") or MODES)]


# ---------------------------------------------------------------------- loading and checking
def shipped() -> list[Path]:
    return sorted(EXPERIMENTS_DIR.glob("*.yaml"))


def resolve(name_or_file: str) -> Path:
    path = Path(name_or_file)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ExperimentError(f"experiment file {path} does not exist")
        return path
    candidate = EXPERIMENTS_DIR / f"{name_or_file}.yaml"
    if candidate.is_file():
        return candidate
    names = ", ".join(p.stem for p in shipped())
    raise ExperimentError(f"no experiment {name_or_file!r}: pass a YAML file or one of {names}")


def _fields(obj: Any, allowed: set[str], where: str, required: tuple[str, ...] = ()) -> dict[str, Any]:
    if not isinstance(obj, Mapping):
        raise ExperimentError(f"{where}: must be a mapping, got {type(obj).__name__}")
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ExperimentError(f"{where}.{unknown[0]}: unknown field; valid fields: {', '.join(sorted(allowed))}")
    for key in required:
        if key not in obj:
            raise ExperimentError(f"{where}.{key}: required field missing")
    return dict(obj)


# Upper bounds of the numbers of a recipe (a larger one is a typo, or a run no machine finishes).
INT_LIMITS = {
    "resolution": 4096, "epochs": 100_000, "batch": 65_536, "train_size": 100_000_000, "val_size": 100_000_000,
    "cost_batch": 65_536, "cost_resolutions": 4096, "seeds": 1000, "threads": 1024,
}  # fmt: skip
FLOAT_LIMITS = {"lr": 10.0, "weight_decay": 10.0, "warmup_epochs": 100_000.0}
# Limits of an experiment file, checked while it is read, before anything is validated.
MAX_FILE_BYTES = 256 * 1024
MAX_DEPTH = 32  # nesting of mappings and lists
MAX_NODES = 100_000  # values of the document with every alias written out


def _positive_int(value: Any, where: str, limit: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ExperimentError(f"{where}: must be a positive integer, got {_shown(value)}")
    if limit is not None and value > limit:
        raise ExperimentError(f"{where}: must be at most {limit:,}, got {_shown(value)}")
    return value


def _number(value: Any, where: str, *, low: float, limit: float, low_open: bool = False) -> float:
    """A finite number in [low, limit] (low excluded with ``low_open``); anything else names the field."""
    import math

    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value):
        raise ExperimentError(f"{where}: must be a finite number, got {_shown(value)}")
    if value < low or (low_open and value == low) or value > limit:
        bounds = f"above {low:g}" if low_open else f"at least {low:g}"
        raise ExperimentError(f"{where}: must be {bounds} and at most {limit:g}, got {_shown(value)}")
    return value


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ExperimentError(f"{where}: must be true or false, got {_shown(value)}")
    return value


def _shown(value: Any) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int too long to print
        return "a number too long to print"
    return text if len(text) <= 60 else text[:57] + "..."


def _limited_loader(where: str) -> type:
    """A yaml SafeLoader that refuses a document nested deeper than MAX_DEPTH or, with its aliases
    written out, larger than MAX_NODES values (an alias bomb), as it composes it."""
    import yaml

    class Loader(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent, index):  # noqa: ANN001, ANN201 - yaml's signature
            self.depth += 1
            if self.depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise ExperimentError(
                    f"{where}: nested deeper than {MAX_DEPTH} levels (line {mark.line + 1}); flatten it"
                )
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

        def compose_document(self):  # noqa: ANN201 - yaml's signature
            node = super().compose_document()
            _expanded_size(node, where)
            return node

    return Loader


def _expanded_size(root: Any, where: str) -> int:
    """How many values the document holds with every alias written out; refuses more than MAX_NODES,
    a deeper nesting than MAX_DEPTH, and an alias inside its own anchor."""
    import yaml

    sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (values, depth)
    busy: set[int] = set()

    def walk(node: Any) -> tuple[int, int]:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in busy:
            raise ExperimentError(f"{where}: an alias refers to its own anchor (line {node.start_mark.line + 1})")
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            sizes[key] = (1, 1)
            return sizes[key]
        busy.add(key)
        total, depth = 1, 1
        for child in children:
            n, d = walk(child)
            total, depth = total + n, max(depth, d + 1)
            if total > MAX_NODES:
                raise ExperimentError(
                    f"{where}: holds more than {MAX_NODES:,} values with its aliases written out "
                    "(an alias bomb?); write fewer aliases"
                )
            if depth > MAX_DEPTH:
                raise ExperimentError(f"{where}: nested deeper than {MAX_DEPTH} levels through its aliases")
        busy.discard(key)
        sizes[key] = (total, depth)
        return sizes[key]

    if root is not None:
        walk(root)
    return 0 if root is None else sizes[id(root)][0]


def read_yaml(path: Path) -> Any:
    """An experiment file's YAML, read with limits: at most MAX_FILE_BYTES of UTF-8 text, nested at most
    MAX_DEPTH deep and MAX_NODES values with its aliases written out; safe tags only."""
    import yaml

    where = str(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ExperimentError(
                f"{where}: {size:,} bytes, more than an experiment file may hold ({MAX_FILE_BYTES:,}); "
                "pass the experiment's YAML file"
            )
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ExperimentError(f"{where}: cannot be read ([Errno {exc.errno}] {exc.strerror})") from None
    if len(data) > MAX_FILE_BYTES:
        raise ExperimentError(f"{where}: more than {MAX_FILE_BYTES:,} bytes; pass the experiment's YAML file")
    try:
        if b"\0" in data:
            raise UnicodeDecodeError("utf-8", data, data.index(b"\0"), data.index(b"\0") + 1, "NUL byte")
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ExperimentError(
            f"{where}: not a text file (byte {exc.start} is not UTF-8 text); pass the experiment's YAML file"
        ) from None
    try:
        return yaml.load(text, Loader=_limited_loader(path.name))  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ExperimentError(f"{where}: not valid YAML: {str(exc).splitlines()[0]}") from None
    except RecursionError:
        raise ExperimentError(f"{where}: nested too deeply to read; flatten it") from None


def load(name_or_file: str) -> Experiment:
    """Read and check the fields of an experiment file (models are built by :func:`validate`)."""
    path = resolve(name_or_file)
    raw = read_yaml(path)
    where = path.name
    top = _fields(raw, TOP_FIELDS, where, required=TOP_REQUIRED)
    modes_raw = _fields(top["modes"], set(MODES), f"{where}: modes", required=("quick",))
    modes: dict[str, dict[str, Any]] = {}
    for m, spec in modes_raw.items():
        at = f"{where}: modes.{m}"
        fields = _fields(spec, MODE_FIELDS, at, required=MODE_REQUIRED)
        merged = {**MODE_DEFAULTS, **fields}
        for key in ("resolution", "epochs", "batch", "train_size", "val_size", "cost_batch"):
            _positive_int(merged[key], f"{at}.{key}", INT_LIMITS[key])
        _number(merged["lr"], f"{at}.lr", low=0.0, limit=FLOAT_LIMITS["lr"], low_open=True)
        for key in ("weight_decay", "warmup_epochs"):
            _number(merged[key], f"{at}.{key}", low=0.0, limit=FLOAT_LIMITS[key])
        for key in ("tiny", "amp"):
            _bool(merged[key], f"{at}.{key}")
        if merged["threads"] is not None:
            _positive_int(merged["threads"], f"{at}.threads", INT_LIMITS["threads"])
        from .augment import RECIPES

        if merged["recipe"] not in RECIPES:
            raise ExperimentError(f"{at}.recipe: one of {', '.join(RECIPES)}, got {merged['recipe']!r}")
        if merged["ema"] is not None and not (isinstance(merged["ema"], float) and 0 < merged["ema"] < 1):
            raise ExperimentError(f"{at}.ema: a decay in (0, 1) such as 0.9998, or null; got {merged['ema']!r}")
        cost = merged["cost_resolutions"] or [merged["resolution"]]
        if not isinstance(cost, list) or not cost:
            raise ExperimentError(f"{at}.cost_resolutions: must be a list of image sides in px, got {_shown(cost)}")
        merged["cost_resolutions"] = [
            _positive_int(r, f"{at}.cost_resolutions[{i}]", INT_LIMITS["cost_resolutions"]) for i, r in enumerate(cost)
        ]
        modes[m] = merged
    variants_raw = top["variants"]
    if not isinstance(variants_raw, list) or not variants_raw:
        raise ExperimentError(f"{where}: variants: must be a non-empty list")
    variants: list[Variant] = []
    seen: set[str] = set()
    for i, v in enumerate(variants_raw):
        at = f"{where}: variants[{i}]"
        twin = isinstance(v, Mapping) and v.get("twin_of") is not None  # a twin takes its model from its twin
        spec = _fields(v, VARIANT_FIELDS, at, required=("name",) if twin else VARIANT_REQUIRED)
        name = str(spec.pop("name"))
        if name in seen or not name or "/" in name:
            raise ExperimentError(f"{at}.name: {name!r} must be unique, non-empty and without '/'")
        seen.add(name)
        at = f"{where}: variants[{i}] ({name})"
        for m in MODES:
            if m in spec:
                _fields(spec[m], OVERRIDE_FIELDS, f"{at}.{m}")
        runs_in = spec.get("modes")
        if runs_in is not None and (not isinstance(runs_in, list) or not runs_in or set(runs_in) - set(MODES)):
            raise ExperimentError(f"{at}.modes: must list some of {', '.join(MODES)}, got {runs_in!r}")
        published = _fields(spec.pop("published", None) or {}, PUBLISHED_FIELDS, f"{at}.published")
        for key in ("top1", "params_m", "gmacs"):
            if published.get(key) is not None:
                _number(published[key], f"{at}.published.{key}", low=0.0, limit=1e9)
        variants.append(Variant(name, spec, published))
    controls.resolve(variants, where, ExperimentError)
    seeds = _positive_int(top.get("seeds", 3), f"{where}: seeds", INT_LIMITS["seeds"])
    for key in ("name", "title", "paper", "task", "data"):
        if key in top and not isinstance(top[key], str):
            raise ExperimentError(f"{where}: {key}: must be a string, got {_shown(top[key])}")
    if not top["name"].strip():
        raise ExperimentError(f"{where}: name: must not be empty")
    return Experiment(
        name=str(top["name"]), title=str(top.get("title", "")), paper=str(top.get("paper", "")),
        task=str(top.get("task", "")), data=str(top.get("data", "synthetic")), seeds=seeds, modes=modes,
        variants=variants, path=str(path), raw=raw,
    )  # fmt: skip


def _variant_spec(variant: Variant, mode: str) -> dict[str, Any]:
    spec = {k: copy.deepcopy(variant.spec.get(k)) for k in OVERRIDE_FIELDS}
    override = variant.spec.get("full" if mode == "full" else "quick") or {}
    spec.update(copy.deepcopy(override))
    return spec


def _tupled(value: Any) -> Any:
    """YAML lists -> tuples (configuration dataclasses hold tuples)."""
    if isinstance(value, list):
        return tuple(_tupled(v) for v in value)
    return value


def model_fn(exp: Experiment, variant: Variant, mode: str) -> Callable[[int], Any]:
    """num_classes -> the variant's model in ``mode``; raises ExperimentError naming the field."""
    from attnbench.attentions import KnobError
    from attnbench.models import zoo
    from attnbench.models.backbone import Backbone, BackboneConfig
    from attnbench.models.crossvit import CrossViT

    spec = _variant_spec(variant, mode)
    tiny = exp.mode(mode)["tiny"]
    at = f"{Path(exp.path).name}: variants[{exp.variants.index(variant)}] ({variant.name})"
    override = (
        f".{'full' if mode == 'full' else 'quick'}" if variant.spec.get("full" if mode == "full" else "quick") else ""
    )
    try:
        base = zoo.config(str(spec["model"]), tiny)
    except KeyError as exc:
        raise ExperimentError(f"{at}.model: {exc.args[0]}") from None
    config = dict(spec.get("config") or {})
    fields = {f.name for f in dataclasses.fields(base)} - {"stages", "num_classes"}
    for key in config:
        if key not in fields:
            raise ExperimentError(f"{at}.config.{key}: unknown field of {type(base).__name__}; valid: "
                                  f"{', '.join(sorted(fields))}")  # fmt: skip
    cfg = dataclasses.replace(base, **{k: _tupled(v) for k, v in config.items()})
    knobs_all = spec.get("knobs") or {}
    stages = spec.get("stages")
    if isinstance(cfg, BackboneConfig):
        new_stages = list(cfg.stages)
        if stages is not None:
            if not isinstance(stages, list) or len(stages) != len(cfg.stages):
                raise ExperimentError(f"{at}{override}.stages: must list {len(cfg.stages)} stages (null keeps one)")
            for i, st in enumerate(stages):
                if st is None:
                    continue
                st = _fields(st, STAGE_FIELDS, f"{at}{override}.stages[{i}]")
                old = new_stages[i]
                if "attention" in st:
                    att = st["attention"]
                    names = tuple(att) if isinstance(att, list) else (att,)
                    kn = st.get("knobs") or {}
                    knobs = tuple(dict(k or {}) for k in kn) if isinstance(kn, list) else (dict(kn),)
                    new_stages[i] = dataclasses.replace(old, attention=names, knobs=knobs)
                elif "knobs" in st:  # merged into the stage's blocks (a list: one mapping per block, cycled)
                    kn = st["knobs"] if isinstance(st["knobs"], list) else [st["knobs"]]
                    new_stages[i] = dataclasses.replace(
                        old,
                        attention=tuple(old.block(j)[0] for j in range(old.depth)),
                        knobs=tuple({**old.block(j)[1], **(kn[j % len(kn)] or {})} for j in range(old.depth)),
                    )
        if knobs_all:
            from attnbench import attentions

            used: set[str] = set()
            for i, st in enumerate(new_stages):
                per_block = []
                for j in range(st.depth):
                    name, kn = st.block(j)
                    try:
                        valid = set(attentions.get(name).knob_types())
                    except KeyError as exc:
                        raise ExperimentError(f"{at}{override}.stages[{i}].attention: {exc.args[0]}") from None
                    mine = {k: v for k, v in knobs_all.items() if k in valid}
                    used |= set(mine)
                    per_block.append({**kn, **mine})
                new_stages[i] = dataclasses.replace(
                    st, attention=tuple(st.block(j)[0] for j in range(st.depth)), knobs=tuple(per_block)
                )
            unused = sorted(set(knobs_all) - used)
            if unused:
                raise ExperimentError(f"{at}.knobs.{unused[0]}: no mechanism of this model has that knob")
        cfg = dataclasses.replace(cfg, stages=tuple(new_stages))
    elif stages is not None or knobs_all:
        raise ExperimentError(f"{at}.stages: {type(cfg).__name__} has no stages; use config")

    def build(num_classes: int) -> Any:
        c = dataclasses.replace(cfg, num_classes=num_classes)
        return Backbone(c) if isinstance(c, BackboneConfig) else CrossViT(c)

    try:
        build(4)
    except (KnobError, ValueError, TypeError, KeyError) as exc:
        field = "stages" if stages is not None else "knobs" if knobs_all else "config"
        where = f"{at}{override if field == 'stages' else ''}.{field}"
        raise ExperimentError(f"{where}: {exc.args[0] if exc.args else exc}") from None
    return build


@dataclasses.dataclass(frozen=True)
class VariantBuilder:
    """A variant's model builder that crosses processes (pickled by name: the file is read again there)."""

    path: str
    mode: str
    variant: str

    def __call__(self, num_classes: int) -> Any:
        import torch

        with torch.random.fork_rng(devices=[]):  # reading the file draws nothing the weights would miss
            exp = load(self.path)
            variant = next(v for v in exp.variants if v.name == self.variant)
            build = model_fn(exp, variant, self.mode)
        return build(num_classes)


def validate(exp: Experiment, mode: str) -> dict[str, Callable[[int], Any]]:
    """Build every variant of ``mode`` and check it runs at every stated resolution; the builders."""
    recipe = exp.mode(mode)
    key = "quick" if mode == "smoke" else mode
    builders = {}
    for i, v in enumerate(exp.variants):
        if v not in exp.variants_in(mode):
            continue
        fn = model_fn(exp, v, mode)
        model = fn(4)
        for field, resolutions in (
            ("resolution", [recipe["resolution"]]),
            ("cost_resolutions", recipe["cost_resolutions"]),
        ):
            for r in resolutions:
                reasons = model.unsupported(r)
                if reasons:
                    raise ExperimentError(
                        f"{Path(exp.path).name}: variants[{i}] ({v.name}) cannot run at modes.{key}.{field} {r} px: "
                        + "; ".join(reasons)
                    )
        builders[v.name] = fn
    return builders


# ---------------------------------------------------------------------- running
def _pid(exp: Experiment, mode: str, variant: str, what: str) -> str:
    return f"exp:{exp.name}:{mode}:{variant}:{what}"


def run(
    exp: Experiment,
    mode: str,
    out: str | os.PathLike,
    *,
    seeds: int | None = None,
    data: str | None = None,
    device: str = "cpu",
    work: str | os.PathLike | None = None,
    progress: bool = False,
    log: Callable[[str], None] = print,
    nproc: int = 1,
) -> dict[str, Any]:
    """Train and measure every variant of ``exp`` in ``mode`` into ``out``; a summary. ``nproc`` > 1 trains
    each variant data-parallel in that many processes (``studies.train``; the recipe's batch is global).

    ``out`` is a run directory of kind ``reproduce`` (``bench.rundir``): locked while written, refused to
    other commands. Killed at any moment, the same call continues: rows already stored are kept, a
    training run in ``work`` continues from its checkpoint (or gives its stored final row), and nothing
    is written twice."""
    from attnbench.bench.env import fingerprint
    from attnbench.bench.rundir import RunDir, kill_point, write_json
    from attnbench.bench.store import ResultsStore

    from . import data as data_mod
    from . import train as train_mod

    builders = validate(exp, mode)
    recipe = exp.mode(mode)
    if seeds is not None and seeds < 1:
        raise ExperimentError(f"--seeds must be at least 1, got {seeds}")
    from . import distributed

    if distributed.in_launched_world():
        raise ExperimentError("reproduce starts its own processes: run it once with --nproc N, not by torchrun or srun")
    if nproc < 1 or recipe["batch"] % nproc:
        raise ExperimentError(f"--nproc {nproc}: the recipe's batch {recipe['batch']} must be a multiple of it")
    n_seeds = 1 if mode == "smoke" else (seeds or exp.seeds)
    data = data or exp.data
    train_mod._device(device)  # an unknown or absent device fails before anything is written
    try:  # so does data that cannot be read (an image folder is scanned here)
        data_mod.build(data, recipe["resolution"], "val", size=8)
    except data_mod.DataError as exc:
        raise ExperimentError(f"--data {data}: {exc}") from None
    out = Path(out)
    work_dir = Path(work) if work is not None else out / "runs"
    if work_dir.exists() and not work_dir.is_dir():
        raise ExperimentError(f"--work {work_dir} is a file; pass a directory for the training runs")
    threads = int(recipe["threads"] or 1)
    torch_threads(threads)
    run_dir = RunDir(out, "reproduce")
    run_dir.check()
    variants = exp.variants_in(mode)
    hashes = {v.name: spec_hash(exp, v, mode, data) for v in variants}
    with run_dir.claim(request={"experiment": exp.name, "mode": mode}):
        kill_point("created")
        store = ResultsStore(out)
        stored = store.open(fingerprint(threads=threads))
        for r in stored.records:  # rows of an edited definition would be mistaken for this one's
            mine = r.get("experiment") == exp.name and r.get("mode") == mode and r.get("variant") in hashes
            if mine and r.get("spec_hash") not in (None, hashes[r["variant"]]):  # (rows stored before hashes: None)
                raise ExperimentError(
                    f"{out} holds {mode} results of variant {r['variant']!r} of {exp.name} as it was defined "
                    "before (the file, the recipe or --data changed since); pass a new --out"
                )
        done = {r["point_id"] for r in stored.records if r.get("status") == "ok"}
        meta_path = out / "experiment.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        meta[mode] = {"experiment": exp.raw, "path": exp.path, "seeds": n_seeds, "data": data, "device": device}
        write_json(meta_path, meta)
        t_start = time.perf_counter()
        trained = measured = skipped = reused_runs = 0
        total = len(variants) * (n_seeds + len(recipe["cost_resolutions"]))
        step = 0
        for v in variants:
            fn = builders[v.name]
            for seed in range(n_seeds):
                step += 1
                pid = _pid(exp, mode, v.name, f"seed{seed}")
                if pid in done:
                    skipped += 1
                    continue
                cfg = train_mod.TrainConfig(
                    model=f"{exp.name}/{v.name}", out=str(work_dir / mode / v.name / f"seed{seed}"),
                    tiny=recipe["tiny"], data=data, resolution=recipe["resolution"], epochs=recipe["epochs"],
                    batch=recipe["batch"], lr=recipe["lr"], weight_decay=recipe["weight_decay"],
                    warmup_epochs=recipe["warmup_epochs"], amp=recipe["amp"], device=device,
                    train_size=recipe["train_size"], val_size=recipe["val_size"], seed=controls.train_seed(v, seed),
                    threads=threads, recipe=recipe["recipe"], ema=recipe["ema"], nproc=nproc,
                )  # fmt: skip
                if nproc > 1:
                    fn = VariantBuilder(exp.path, mode, v.name)
                log(f"[{step}/{total}] {exp.name} [{mode}] {v.name} seed {seed}: training")
                t0 = time.perf_counter()
                try:
                    final = train_mod.train(cfg, progress=progress, model_fn=fn)
                except train_mod.TrainError as exc:
                    raise ExperimentError(f"{v.name} seed {seed}: {exc}") from None
                reused = bool(final.get("reused"))
                kill_point("trained")
                row = {
                    "point_id": pid, "kind": "experiment", "status": "ok", "experiment": exp.name, "mode": mode,
                    "variant": v.name, "seed": controls.train_seed(v, seed), "data": data, "device": device,
                    "spec_hash": hashes[v.name],
                    **{k: final.get(k) for k in ("accuracy", "val_loss", "params", "macs", "resolution", "epochs",
                                                 "batch", "mechanism", "images_per_s", "train_images",
                                                 "val_images")},
                    "train_s": None if reused else time.perf_counter() - t0, "threads": threads,
                    "published": v.published, "reused": reused,
                    "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                }  # fmt: skip
                store.append(row)
                trained += not reused
                reused_runs += reused
                log(f"{exp.name} [{mode}] {v.name} seed {seed}: held-out accuracy {row['accuracy']:.1%}"
                    + (" (a finished training, reused)" if reused else ""))  # fmt: skip
            for r in recipe["cost_resolutions"]:
                step += 1
                pid = _pid(exp, mode, v.name, f"cost{r}")
                if pid in done:
                    continue
                log(f"[{step}/{total}] {exp.name} [{mode}] {v.name}: measuring cost at {r} px")
                cost = cost_row(fn(4), r, recipe["cost_batch"], device, smoke=mode == "smoke", threads=threads)
                store.append({
                    "point_id": pid, "kind": "experiment_cost", "experiment": exp.name, "mode": mode,
                    "variant": v.name, "published": v.published, **cost,
                })  # fmt: skip
                measured += 1
    wall = time.perf_counter() - t_start
    return {
        "trained": trained, "reused": reused_runs, "measured": measured, "skipped": skipped, "wall_s": wall,
        "seeds": n_seeds, "threads": threads,
    }  # fmt: skip


def torch_threads(threads: int) -> None:
    """Set torch's intra-op threads before any work (the sweep's rule: a fixed count, recorded)."""
    import torch

    torch.set_num_threads(threads)


def spec_hash(exp: Experiment, variant: Variant, mode: str, data: str) -> str:
    """12 hex digits naming what a variant's rows were made from: its model, the recipe and the data."""
    import hashlib

    recipe = {k: v for k, v in exp.mode(mode).items() if k not in HASH_QUIET or v != MODE_DEFAULTS[k]}
    text = json.dumps({"spec": _variant_spec(variant, mode), "recipe": recipe, "data": data}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cost_row(
    model: Any, resolution: int, batch: int, device: str, smoke: bool = False, threads: int | None = None
) -> dict[str, Any]:
    """The cost of one variant at one resolution, measured by the harness's one function
    (``bench.measure.measure_module``): the inference forward's record (latency samples in rounds between
    calibration probes, ``contended``, ``noisy``, peak memory, first call) with the MACs of one image
    (counted by ``bench.flops``), and the peak memory of a training forward and backward
    (``train_peak_bytes``, same batch, same probe)."""
    import torch
    from attnbench.bench.flops import count
    from attnbench.bench.measure import measure_module

    from .cost import cost_settings

    model = model.to(device)
    x = torch.randn(batch, 3, resolution, resolution, device=device, generator=torch.Generator().manual_seed(0))
    row: dict[str, Any] = {"resolution": resolution, "image_height": resolution, "image_width": resolution}
    row["batch"] = batch
    try:
        c = count(model.eval(), (x[:1],), flop_counter=False, backward=False)
        row.update(macs=int(c.macs), macs_uncovered=dict(c.uncovered), macs_error=None)
    except Exception as exc:  # noqa: BLE001  (a counter failure is recorded, not fatal)
        row.update(macs=None, macs_uncovered=None, macs_error=f"{type(exc).__name__}: {exc}"[:300])
    settings = cost_settings(smoke, threads)
    fwd = measure_module(model, (x,), settings, pass_="fwd", macs=row["macs"])
    fwd.pop("macs", None)  # the MACs above are per image; the record's would be the batch's
    row.update(fwd)
    train = measure_module(model, (x,), settings, pass_="fwd+bwd", macs=row["macs"], timing=False)
    row["train_peak_bytes"] = train.get("peak_bytes")
    if train["status"] != "ok":
        row["train_reason"] = f"{train['status']}: {train.get('reason')}"
    return row
