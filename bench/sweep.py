"""Run a sweep: expand the grid, skip what is stored, measure the rest, append each record.

Progress goes through ``on_event(kind, data)`` (the CLI renders it); nothing
here prints. Kinds: ``warning`` {message}, ``start`` {total, stored, todo},
``point`` {record}, ``end`` {counts, run_dir}.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .measure import Settings, precheck
from .points import Grid, Point, expand
from .store import ResultsStore

Event = Callable[[str, dict[str, Any]], None]


def _ignore(kind: str, data: dict[str, Any]) -> None:
    pass


@dataclasses.dataclass
class Summary:
    run_dir: Path
    total: int
    stored: int
    counts: dict[str, int]


def run_sweep(
    grid: Grid,
    out: str | Path,
    settings: Settings | None = None,
    executor: Any = None,
    on_event: Event | None = None,
) -> Summary:
    """Measure every point of ``grid`` that ``out`` does not hold yet."""
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
    report = store.open(env, sweep={"grid": grid.to_dict(), "settings": settings.to_dict(), "executor": executor.name})
    for message in report.messages():
        emit("warning", {"message": message})
    stored_ids = {r["point_id"] for r in report.records}
    todo = [p for p in expansion.points if p.point_id not in stored_ids]
    emit("start", {"total": len(expansion.points), "stored": len(expansion.points) - len(todo), "todo": len(todo)})

    counts: Counter[str] = Counter()

    def record(rec: dict[str, Any]) -> None:
        store.append(rec)
        counts[rec["status"]] += 1
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
    for rec in executor.run(runnable, settings):
        record(rec)
    emit("end", {"counts": dict(counts), "run_dir": str(store.run_dir)})
    return Summary(store.run_dir, len(expansion.points), len(expansion.points) - len(todo), dict(counts))


def load_sweep_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or TOML sweep file (safely): {"grid": {...}, "settings": {...}} or a bare grid."""
    path = Path(path)
    text = path.read_text()
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ImportError:  # Python < 3.11
            import tomli as tomllib  # type: ignore[no-redef]
        data = tomllib.loads(text)
    elif path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        raise ValueError(f"sweep file {path} must end in .yaml, .yml or .toml")
    if not isinstance(data, dict):
        raise ValueError(f"sweep file {path} must hold a mapping of sweep fields, got {type(data).__name__}")
    if "grid" in data or "settings" in data or "slurm" in data:
        unknown = set(data) - {"grid", "settings", "slurm"}
        if unknown:
            raise ValueError(
                f"sweep file {path}: unknown top-level keys {sorted(unknown)}; use grid:, settings: and slurm:"
            )
        return {
            "grid": dict(data.get("grid") or {}),
            "settings": dict(data.get("settings") or {}),
            "slurm": dict(data.get("slurm") or {}),
        }
    return {"grid": data, "settings": {}, "slurm": {}}


def make_settings(values: dict[str, Any]) -> Settings:
    fields = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"unknown measurement setting(s) {unknown}; valid: {', '.join(sorted(fields))}")
    return Settings(**values)


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
    import json

    from . import presets
    from .points import parse_ints, parse_knob, split_values

    grid_d: dict[str, Any] = {}
    settings_d: dict[str, Any] = {}
    axes = {k: v for k, v in (axes or {}).items() if v}
    if preset is None and config is None and not axes and not knobs:
        sweep_json = stored / "sweep.json" if stored else None
        if sweep_json is None or not sweep_json.exists():
            raise ValueError(
                "say what to sweep: --preset NAME, --config FILE or axes such as --mechanism and --resolution"
            )
        saved = json.loads(sweep_json.read_text())
        grid_d, settings_d = saved["grid"], saved["settings"]
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
        if key in ("batches", "heads"):
            grid_d[key] = parse_ints(f"--{key}", items)
        elif key == "dims":
            grid_d[key] = [v if v == "stage" else parse_ints("--dim", [v])[0] for v in items]
        elif key in BOOL_WORDS:
            words = BOOL_WORDS[key]
            vals: list[bool] = []
            for v in items:
                if v not in words:
                    raise ValueError(f"--{key} takes {', '.join(words)}, got {v!r}")
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
