"""Run a sweep: expand the grid, skip what is stored, measure the rest, append each record.

A run directory holds one sweep request (``sweep.json``): a request with another
grid or other measurement settings is refused unless it is appended. A stored
point counts as done only if it was measured by the same code revision (or
``resume`` asks to reuse it); the sweep holds the directory's lock throughout.

Progress goes through ``on_event(kind, data)`` (the CLI renders it); nothing
here prints. Kinds: ``warning`` {message}, ``start`` {total, stored, todo},
``setup`` {point_id, label, active} and ``slot`` {point_id, label, slot, active}
as the in-process rotation sets points up and takes their timing slots
(bench.interleave), ``point`` {record} when a point is stored, ``end`` {counts,
run_dir, timed_s, wall_s, timed_share}: the seconds the stored records' timed
regions took (their ``timed_s``), as a share of the sweep's wall time.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .measure import Settings, precheck
from .points import Grid, GridError, Point, expand
from .rundir import RunDir
from .store import ResultsStore, StoreError

Event = Callable[[str, dict[str, Any]], None]


def _ignore(kind: str, data: dict[str, Any]) -> None:
    pass


@dataclasses.dataclass
class Summary:
    run_dir: Path
    total: int
    stored: int
    counts: dict[str, int]
    timed_s: float = 0.0  # the seconds the timed regions of the points measured now took
    wall_s: float = 0.0  # the sweep's wall time (from run_sweep's call)


def run_sweep(
    grid: Grid,
    out: str | Path,
    settings: Settings | None = None,
    executor: Any = None,
    on_event: Event | None = None,
    *,
    append: bool = False,
    resume: bool = False,
) -> Summary:
    """Measure every point of ``grid`` that ``out`` does not hold yet.

    ``append``: add this grid to a run directory that holds a sweep of another grid
    or other settings (refused otherwise). ``resume``: count points measured by
    another code revision as done (otherwise they are measured again)."""
    started = time.perf_counter()
    import torch

    from .env import fingerprint
    from .executors import InProcess

    settings = settings or Settings()
    emit = on_event or _ignore
    executor = executor or InProcess()
    if settings.threads is None:
        settings = dataclasses.replace(settings, threads=torch.get_num_threads())
    torch.set_num_threads(settings.threads)  # type: ignore[arg-type]

    expansion = expand(grid)  # bad grids fail here, before anything is written
    validate = getattr(executor, "validate", None)
    if validate is not None:
        validate(expansion.points)
    store = ResultsStore(out)
    env = fingerprint(threads=settings.threads)
    request = {"grid": grid.to_dict(), "settings": settings.to_dict(), "executor": executor.name}
    with RunDir(out, "sweep").claim(request):
        return _locked_sweep(store, env, request, expansion, settings, executor, emit, append, resume, started)


def _locked_sweep(
    store: ResultsStore,
    env: dict[str, Any],
    request: dict[str, Any],
    expansion: Any,
    settings: Settings,
    executor: Any,
    emit: Event,
    append: bool,
    resume: bool,
    started: float,
) -> Summary:
    stored_sweep = store.stored_sweep() if store.has_results() else None
    diffs = sweep_differences(stored_sweep, request) if stored_sweep is not None else []
    if diffs and not append:
        raise StoreError(
            f"{store.run_dir} holds a sweep of another grid or other settings ({'; '.join(diffs)}); "
            "pass --append to add these points to it, or another --out"
        )
    stored_env = store.stored_env()
    report = store.open(env, sweep=None if stored_sweep is not None and not diffs else request, appended=bool(diffs))
    for message in report.messages():
        emit("warning", {"message": message})
    revision = env.get("revision")

    def measured_by(rec: dict[str, Any]) -> Any:  # records written before revisions were stored: env.json's
        return rec.get("revision", stored_env.get("revision"))

    current = {r["point_id"] for r in report.records if measured_by(r) == revision}
    latest = {r["point_id"]: r for r in report.records if r["point_id"] not in current}  # points of other code only
    others = Counter(str(measured_by(r)) for r in latest.values())
    if others:
        was = ", ".join(f"{n} by {rev}" for rev, n in others.most_common())
        if resume:
            message = f"reusing points measured by another code revision ({was}; now {revision}): --resume"
        else:
            message = (
                f"the code changed since points were stored ({was}; now {revision}): measuring them again "
                "(pass --resume to reuse them)"
            )
        emit("warning", {"message": message})
    stored_ids = {r["point_id"] for r in report.records if resume or measured_by(r) == revision}
    todo = [p for p in expansion.points if p.point_id not in stored_ids]
    emit("start", {"total": len(expansion.points), "stored": len(expansion.points) - len(todo), "todo": len(todo)})

    counts: Counter[str] = Counter()
    timed = [0.0]

    def record(rec: dict[str, Any]) -> None:
        rec = {**rec, "revision": revision}
        store.append(rec)
        counts[rec["status"]] += 1
        timed[0] += float(rec.get("timed_s") or 0.0)
        emit("point", {"record": rec})

    # Points refused statically or by the mechanism's unsupported() are recorded
    # here, without spending a worker on them.
    runnable: list[Point] = []
    for p in todo:
        reasons = expansion.refused.get(p)
        if reasons is None:
            try:
                reasons = precheck(p)
            except Exception as exc:  # building the module failed: that is the point's result
                record({**p.to_json(), "status": "error", "reason": f"{type(exc).__name__}: {exc}"})
                continue
        if reasons:
            record({**p.to_json(), "status": "skipped", "reason": "; ".join(reasons)})
        else:
            runnable.append(p)
    # Executors that report set-ups and slots (the in-process rotation) are given the event sink.
    takes_events = "on_event" in inspect.signature(executor.run).parameters
    for rec in executor.run(runnable, settings, on_event=emit) if takes_events else executor.run(runnable, settings):
        record(rec)
    wall = time.perf_counter() - started
    share = timed[0] / wall if wall > 0 else 0.0
    emit(
        "end",
        {
            "counts": dict(counts),
            "run_dir": str(store.run_dir),
            "timed_s": timed[0],
            "wall_s": wall,
            "timed_share": share,
        },
    )
    total, stored = len(expansion.points), len(expansion.points) - len(todo)
    return Summary(store.run_dir, total, stored, dict(counts), timed_s=timed[0], wall_s=wall)


# Settings that bound a sweep rather than shape its numbers: they may change between resumptions.
NOT_MEASUREMENT = ("timeout_s",)


def sweep_differences(stored: dict[str, Any], request: dict[str, Any]) -> list[str]:
    """``field: X there, Y now`` for each grid axis or measurement setting in which two sweep requests differ."""
    try:
        old_grid = Grid.from_dict(stored.get("grid") or {}).to_dict()
    except GridError:
        old_grid = dict(stored.get("grid") or {})
    defaults = Settings().to_dict()
    old_settings = {**defaults, **(stored.get("settings") or {})}
    new_settings = {**defaults, **request["settings"]}
    out = []
    for old, new in ((old_grid, request["grid"]), (old_settings, new_settings)):
        for key in dict.fromkeys([*old, *new]):
            if key not in NOT_MEASUREMENT and old.get(key) != new.get(key):
                out.append(f"{key}: {old.get(key)!r} there, {new.get(key)!r} now")
    return out


def check_runnable(grid: Grid, *, devices_here: bool = True) -> None:
    """Refuse, before anything is measured, an impl that none of the selected mechanisms
    declares and (``devices_here``: the points run on this machine) a device it lacks."""
    from attnbench import attentions

    from .points import load_plugins

    load_plugins()
    names = grid.mechanisms or attentions.available()
    declared = list(dict.fromkeys(i for n in names for i in attentions.get(n).impls))
    for impl in grid.impls:
        if impl not in declared:
            raise GridError(
                f"--impl {impl!r} is not an implementation of {', '.join(names)}; use one of {', '.join(declared)}"
            )
    if not devices_here:
        return
    import torch

    for device in grid.devices:
        if not str(device).startswith("cuda"):
            continue
        if not torch.cuda.is_available():
            raise GridError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        index = torch.device(device).index or 0
        if index >= torch.cuda.device_count():
            raise GridError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")


def load_sweep_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or TOML sweep file (safely): {"grid": {...}, "settings": {...}} or a bare grid."""
    path = Path(path)
    if not path.exists():
        raise GridError(f"--config {path}: no such file; pass a YAML or TOML sweep file")
    if path.is_dir():
        raise GridError(f"--config {path} is a directory; pass a YAML or TOML sweep file")
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise GridError(f"sweep file {path} must end in .yaml, .yml or .toml")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise GridError(f"--config {path} cannot be read ({exc}); pass a YAML or TOML text file") from None
    if suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python < 3.11
            import tomli as tomllib  # type: ignore[no-redef]
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise GridError(f"--config {path} is not valid TOML: {exc}") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.constructor.ConstructorError as exc:
            tag = getattr(exc, "problem", "") or "a tag"
            raise GridError(
                f"--config {path} uses a YAML tag that sweep files may not hold ({' '.join(str(tag).split())}); "
                "write plain values only"
            ) from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
            raise GridError(f"--config {path} is not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise GridError(f"sweep file {path} must hold a mapping of sweep fields, got {type(data).__name__}")
    if "grid" in data or "settings" in data or "slurm" in data:
        unknown = set(data) - {"grid", "settings", "slurm"}
        if unknown:
            raise GridError(
                f"sweep file {path}: unknown top-level keys {sorted(unknown)}; use grid:, settings: and slurm:"
            )
        return {
            "grid": dict(data.get("grid") or {}),
            "settings": dict(data.get("settings") or {}),
            "slurm": dict(data.get("slurm") or {}),
        }
    return {"grid": data, "settings": {}, "slurm": {}}


# Settings given by a command-line option, named as the option in errors.
SETTING_OPTIONS = {"timeout_s": "--timeout", "threads": "--threads"}
# Settings that must be above zero; every other number must not be negative.
POSITIVE = (
    "timeout_s",
    "cpu_min_run_time",
    "cuda_rep_ms",
    "min_samples",
    "max_samples",
    "threads",
    "rounds",
    "interleave",
)


def make_settings(values: dict[str, Any]) -> Settings:
    """Settings from plain values, each checked against the type and range of its field."""
    fields = {f.name: str(f.type) for f in dataclasses.fields(Settings)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise GridError(f"unknown measurement setting(s) {unknown}; valid: {', '.join(sorted(fields))}")
    for name, value in values.items():
        label = SETTING_OPTIONS.get(name, f"setting {name}")
        kind = fields[name]
        if value is None and "None" in kind:
            continue
        if "bool" in kind:
            if not isinstance(value, bool):
                raise GridError(f"{label} must be true or false, got {value!r}")
            continue
        if "str" in kind:
            if not isinstance(value, str) or not value:
                raise GridError(f"{label} must be a name, got {value!r}")
            continue
        number = (int,) if "int" in kind else (int, float)
        if isinstance(value, bool) or not isinstance(value, number) or value != value:
            raise GridError(f"{label} must be {'an integer' if 'int' in kind else 'a number'}, got {value!r}")
        if name in POSITIVE and value <= 0:
            raise GridError(f"{label} must be above 0, got {value!r}")
        if name != "seed" and value < 0:
            raise GridError(f"{label} must not be negative, got {value!r}")
    return Settings(**values)


# The command-line option of each grid axis, as errors name it.
AXIS_OPTIONS = {
    "mechanisms": "--mechanism",
    "resolutions": "--resolution",
    "batches": "--batch",
    "dims": "--dim",
    "heads": "--heads",
    "dtypes": "--dtype",
    "passes": "--pass",
    "impls": "--impl",
    "compile": "--compile",
    "devices": "--device",
    "cross": "--cross",
    "frames": "--frames",
}

BOOL_WORDS = {
    "compile": {"eager": [False], "compile": [True], "both": [False, True]},
    "cross": {"self": [False], "cross": [True], "both": [False, True]},
}


def resolve_request(
    preset: str | None = None,
    config: str | Path | None = None,
    axes: dict[str, list[str] | None] | None = None,
    knobs: list[str] | None = None,
    settings: dict[str, Any] | None = None,
    stored: Path | None = None,
) -> tuple[Grid, Settings]:
    """The grid and settings of a request: a preset, then a sweep file, then the
    command-line axes, each overriding the one before; with none of them, the
    sweep stored in ``stored/sweep.json`` (``--resume``)."""

    from . import presets
    from .points import parse_ints, parse_knob, split_values

    grid_d: dict[str, Any] = {}
    settings_d: dict[str, Any] = {}
    axes = {k: v for k, v in (axes or {}).items() if v}
    if preset is None and config is None and not axes and not knobs:
        saved = ResultsStore(stored).stored_sweep() if stored else None
        if saved is None:
            raise GridError(
                "say what to sweep: --preset NAME, --config FILE or axes such as --mechanism and --resolution"
            )
        grid_d, settings_d = dict(saved.get("grid") or {}), dict(saved.get("settings") or {})
    if preset is not None:
        p = presets.get(preset)
        grid_d.update(p["grid"])
        settings_d.update(p.get("settings", {}))
    if config is not None:
        f = load_sweep_file(config)
        grid_d.update(f["grid"])
        settings_d.update(f["settings"])
    for key, values in axes.items():
        items = split_values(values)
        if not items:
            raise GridError(f"{AXIS_OPTIONS.get(key, key)} is empty; give at least one value (see --help)")
        if key in ("batches", "heads", "frames"):
            grid_d[key] = parse_ints(f"--{key}", items)
        elif key == "dims":
            grid_d[key] = [v if v == "stage" else parse_ints("--dim", [v])[0] for v in items]
        elif key in BOOL_WORDS:
            words = BOOL_WORDS[key]
            vals: list[bool] = []
            for v in items:
                if v not in words:
                    raise GridError(f"--{key} takes {', '.join(words)}, got {v!r}")
                vals += [b for b in words[v] if b not in vals]
            grid_d[key] = vals
        else:
            grid_d[key] = items
    if knobs:
        grid_d["knobs"] = dict(grid_d.get("knobs") or {})
        for text in knobs:
            name, values = parse_knob(text)
            grid_d["knobs"][name] = values
    settings_d.update({k: v for k, v in (settings or {}).items() if v is not None})
    return Grid.from_dict(grid_d), make_settings(settings_d)
