"""Reading run directories into one tidy table.

A run directory holds ``env.json`` (the environment fingerprint) and
``results.jsonl`` (one JSON object per sweep point, or per training run when the
row has ``kind == "train"``). Reports only ever read these files: no torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from attnbench.errors import AttnbenchError

# The fields that define a benchmark point; two points with equal values here are the same measurement.
POINT_FIELDS = [
    "mechanism",
    "knobs_label",
    "cross",
    "height",
    "width",
    "tokens",
    "batch",
    "dim",
    "heads",
    "dtype",
    "pass",
    "impl",
    "compile",
    "device",
]
# The context of a point: everything but the mechanism, its knobs and its implementation.
CONTEXT_FIELDS = ["cross", "height", "width", "tokens", "batch", "dim", "heads", "dtype", "pass", "compile", "device"]
# Axes a sweep may vary besides resolution; fixed to their most common value where one curve is drawn.
SIDE_AXES = ["batch", "dim", "heads", "dtype", "compile", "cross", "device"]
MIB = 2**20
# Stored and read-time (bench.load) numeric columns, read as float64 with NaN for missing.
NUMERIC = [
    "height",
    "width",
    "tokens",
    "batch",
    "dim",
    "heads",
    "latency_ms_median",
    "latency_ms_p20",
    "latency_ms_p80",
    "samples",
    "first_call_ms",
    "peak_bytes",
    "baseline_bytes",
    "reserved_bytes",
    "macs",
    "backward_macs",
    "params",
    "flops",
    "tflops",
    "peak_tflops",
    "pct_peak",
    "overhead_ms",
    "host_ms_per_call",
    "probe_ms",
    "load_avg",
]
# A point whose median latency is within this factor of its per-call overhead (an empty module's call,
# same timer, device and pass; the ``overhead_ms`` field) measures the call, not the attention: it is
# marked and left out of latency fits and crossovers.
OVERHEAD_FACTOR = 3.0


class RunError(AttnbenchError, ValueError):
    """A run directory is missing or malformed."""


@dataclasses.dataclass
class Run:
    """One run directory: its name, fingerprint and raw rows."""

    name: str
    path: Path
    env: dict[str, Any]
    rows: pd.DataFrame
    sweep: dict[str, Any] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)


def knob_value_label(value: Any) -> str:
    """Render one knob value compactly: 8, 0.5, [16, 8, 8] -> 16,8,8, True."""
    if isinstance(value, (list, tuple)):
        return ",".join(knob_value_label(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def knobs_label(knobs: Any) -> str:
    """A stable, readable label of a knob dict: ``topk=8 levels=3`` (sorted by name), ``-`` when empty."""
    if not isinstance(knobs, dict) or not knobs:
        return "-"
    return " ".join(f"{k}={knob_value_label(knobs[k])}" for k in sorted(knobs))


def load_run(path: str | Path) -> Run:
    """Read one run directory with ``bench.store.load`` (torch-free). Raises RunError naming what is missing."""
    from attnbench.bench import store

    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path} is not a directory; pass a run directory written by `attnbench sweep --out DIR`")
    if not (path / store.RESULTS).is_file():
        raise RunError(f"{path} has no {store.RESULTS}; is it a run directory written by `attnbench sweep`?")
    rows = store.load(path)  # an env.json that is not a JSON object is a StoreError
    skipped = list(rows.attrs.get("corrupt", []))
    if not len(rows) and skipped:
        raise RunError(
            f"{path / store.RESULTS} holds no valid record ({len(skipped)} line(s) skipped; the first: {skipped[0]}); "
            "restore it from the run, or pass another run directory"
        )
    sweep: dict[str, Any] = {}
    sweep_path = path / store.SWEEP
    if sweep_path.is_file():
        try:
            sweep = json.loads(sweep_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            sweep = {"note": f"{store.SWEEP} is not valid JSON"}
    return Run(
        name=path.resolve().name,
        path=path,
        env=dict(rows.attrs.get("env", {})),
        rows=rows,
        sweep=sweep,
        warnings=list(rows.attrs.get("corrupt", [])),
    )


def _num(series: pd.Series) -> pd.Series:
    return pd.to_numeric(series.astype(object), errors="coerce").astype("float64")


def _uncovered(value: Any) -> str:
    """The ops the FLOP counter saw but could not count (stored as name -> calls), as text; "" when complete."""
    if isinstance(value, dict):
        return ", ".join(f"{k} x{v}" for k, v in sorted(value.items()))
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return ""
    return str(value)


def tidy(runs: list[Run]) -> pd.DataFrame:
    """All benchmark rows of ``runs`` in one table with derived columns.

    Adds ``run``, ``knobs_label``, ``flops`` (= 2 * macs), ``series`` (what one
    curve is: mechanism, knobs, and the implementation and run where those vary)
    and ``hover`` (the exact configuration, as plain text). Training rows
    (``kind == "train"``) are left out; see :func:`train_rows`.
    """
    frames = []
    names = _unique_names(runs)
    for run, name in zip(runs, names, strict=True):
        df = run.rows.copy()
        if df.empty:
            continue
        df["run"] = name
        frames.append(df)
    # An empty run still goes through every step below, so the table always has every column.
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["run"])
    if "kind" in df.columns:
        df = df[df["kind"].astype(object).fillna("bench").astype(str) != "train"].copy()
    # optional fields a run may lack (older harnesses, failed points): present as nulls, so readers need no guard
    optional = ["latency_samples_ms", "latency_rounds", "provenance", "contention", "load_avg"]
    for col in POINT_FIELDS + ["status", "reason", "point_id", "knobs", "device_name"] + optional:
        if col not in df.columns and col != "knobs_label":
            df[col] = None
    df["knobs"] = [k if isinstance(k, dict) else {} for k in df["knobs"]]
    df["knobs_label"] = [knobs_label(k) for k in df["knobs"]]
    # Series are told apart by the knobs that vary within their mechanism; fixed knobs are listed once.
    varied = knob_axes(df)
    df["knobs_varied"] = [
        knobs_label({k: v for k, v in kn.items() if k in varied.get(str(m), {})})
        for m, kn in zip(df["mechanism"], df["knobs"], strict=True)
    ]
    for col in NUMERIC:
        df[col] = _num(df[col]) if col in df.columns else math.nan
    df["uncounted_ops"] = [_uncovered(v) for v in df.get("macs_uncovered", pd.Series(index=df.index, dtype=object))]
    missing_tokens = df["tokens"].isna()
    df.loc[missing_tokens, "tokens"] = df.loc[missing_tokens, "height"] * df.loc[missing_tokens, "width"]
    envs = dict(zip(names, (run.env for run in runs), strict=True))
    df["bandwidth_gbs"] = [
        _bandwidth(envs.get(run, {}), name) for run, name in zip(df["run"], df["device_name"], strict=True)
    ]
    df["status"] = df["status"].astype(object).fillna("ok").astype(str)
    df["reason"] = df["reason"].astype(object).fillna("").astype(str)
    for col in ("mechanism", "dtype", "pass", "impl", "device", "device_name", "timing_method", "memory_method"):
        df[col] = df[col].astype(object).fillna("-").astype(str) if col in df.columns else "-"
    for col in ("cross", "compile", "noisy", "contended", "launch_bound"):
        df[col] = [_flag(v) for v in df[col]] if col in df.columns else False
    df["overhead_bound"] = (df["latency_ms_median"] < OVERHEAD_FACTOR * df["overhead_ms"]).fillna(False).astype(bool)
    df["resolution"] = [resolution_text(h, w) for h, w in zip(df["height"], df["width"], strict=True)]
    df["series"] = _series_labels(df) if len(df) else pd.Series(dtype=object)
    df["hover"] = [_hover(r) for r in df.to_dict("records")]
    return df.reset_index(drop=True)


def _flag(value: Any) -> bool:
    """A stored boolean as bool: missing, NA and anything but true / a non-zero number read False."""
    if isinstance(value, (bool, int, float, np.bool_, np.integer, np.floating)):
        return bool(value) and not (isinstance(value, (float, np.floating)) and math.isnan(value))
    return False


def train_rows(runs: list[Run]) -> pd.DataFrame:
    """Rows with ``kind == "train"`` (model, accuracy, macs, params, ...), with ``run`` and ``flops`` added."""
    frames = []
    for run, name in zip(runs, _unique_names(runs), strict=True):
        df = run.rows
        if "kind" not in df.columns:
            continue
        df = df[df["kind"].astype(str) == "train"].copy()
        if df.empty:
            continue
        df["run"] = name
        frames.append(df)
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True)
    for col in ("accuracy", "macs", "params", "flops"):
        df[col] = _num(df[col]) if col in df.columns else math.nan
    if "model" not in df.columns:
        df["model"] = "-"
    df["model"] = df["model"].fillna("-").astype(str)
    return df


def _bandwidth(env: dict[str, Any], device_name: str) -> float:
    """Memory bandwidth (GB/s) of a point's GPU from bench's hardware table, NaN when unknown."""
    from attnbench.bench.hardware import lookup

    name = device_name if isinstance(device_name, str) and device_name not in ("-", "") else env.get("gpu_name")
    spec = lookup(name) if isinstance(name, str) else None
    return spec.bandwidth_gbs if spec else math.nan


def _unique_names(runs: list[Run]) -> list[str]:
    names: list[str] = []
    for run in runs:
        name, i = run.name, 2
        while name in names:
            name, i = f"{run.name}#{i}", i + 1
        names.append(name)
    return names


def resolution_text(h: Any, w: Any) -> str:
    """``HxW``, or ``-`` where either is missing."""
    if not isinstance(h, (int, float)) or not isinstance(w, (int, float)) or pd.isna(h) or pd.isna(w):
        return "-"
    return f"{int(h)}x{int(w)}"


def _series_labels(df: pd.DataFrame) -> list[str]:
    multi_impl = df.groupby("mechanism")["impl"].nunique().to_dict()
    multi_run = df["run"].nunique() > 1
    labels = []
    for mech, knobs, impl, run in zip(df["mechanism"], df["knobs_varied"], df["impl"], df["run"], strict=True):
        parts = [mech]
        if knobs != "-":
            parts.append(knobs)
        if multi_impl.get(mech, 1) > 1:
            parts.append(f"[{impl}]")
        if multi_run:
            parts.append(f"({run})")
        labels.append(" ".join(parts))
    return labels


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _hover(r: dict[str, Any]) -> str:
    """The exact configuration and raw numbers of one point, one fact per line (plain text)."""
    lines = [
        f"{r['mechanism']}  {json.dumps(r['knobs'], sort_keys=True)}",
        f"{r['resolution']} = {_fmt(r['tokens'])} tokens, batch {_fmt(r['batch'])}, "
        f"dim {_fmt(r['dim'])}, heads {_fmt(r['heads'])}, cross {r['cross']}",
        f"{r['dtype']}, {r['pass']}, impl {r['impl']}, compile {r['compile']}, {r['device']} ({r['device_name']})",
        f"status {r['status']}" + (f": {r['reason']}" if r["reason"] else ""),
    ]
    if r["status"] == "ok":
        lines += [
            f"latency median {_fmt(r['latency_ms_median'])} ms "
            f"(p20 {_fmt(r['latency_ms_p20'])}, p80 {_fmt(r['latency_ms_p80'])}, {_fmt(r['samples'])} samples"
            + (", noisy" if r.get("noisy") else "")
            + f", {r['timing_method']}), first call {_fmt(r['first_call_ms'])} ms",
            f"peak {_fmt(r['peak_bytes'] / MIB)} MiB above a baseline of {_fmt(r['baseline_bytes'] / MIB)} MiB"
            f" ({r['memory_method']})",
            f"forward MACs {_fmt(r['macs'])} (FLOPs = 2 x MACs = {_fmt(r['flops'])}), backward MACs "
            f"{_fmt(r['backward_macs'])}, params {_fmt(r['params'])}",
            f"uncounted ops: {r['uncounted_ops'] or 'none'}",
            f"achieved {_fmt(r['tflops'])} TFLOP/s"
            + (f", {_fmt(r['pct_peak'])}% of peak" if r["pct_peak"] > 0 else ""),
        ]
        if r["overhead_ms"] == r["overhead_ms"]:  # not NaN
            lines.append(
                f"per-call overhead {_fmt(r['overhead_ms'])} ms"
                + (f": within {OVERHEAD_FACTOR:g}x of it, left out of fits" if r["overhead_bound"] else "")
            )
        if r["host_ms_per_call"] == r["host_ms_per_call"]:
            lines.append(
                f"host launch {_fmt(r['host_ms_per_call'])} ms per call"
                + (", which bounds this point" if r["launch_bound"] else "")
            )
        if r["contended"]:
            lines.append("measured while the machine was contended")
    lines.append(f"run {r['run']}, point {r.get('point_id') or '-'}")
    return "\n".join(lines)


def plain(value: Any) -> Any:
    """Whole floats (pandas reads integer columns with gaps as float) back to int, for display."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def side_axes(df: pd.DataFrame) -> dict[str, list[Any]]:
    """The side axes (batch, dtype, ...) that take more than one value among the points, with their values."""
    out = {}
    for col in SIDE_AXES + ["impl"]:
        values = sorted((plain(v) for v in df[col].dropna().unique().tolist()), key=_sort_key)
        if len(values) > 1:
            out[col] = values
    return out


def knob_axes(df: pd.DataFrame) -> dict[str, dict[str, list[Any]]]:
    """Per mechanism, the knobs whose value varies across its points, with the values seen (sorted)."""
    out: dict[str, dict[str, list[Any]]] = {}
    for mech, group in df.groupby("mechanism", sort=True):
        seen: dict[str, dict[str, Any]] = {}
        for knobs in group["knobs"]:
            for k, v in knobs.items():
                seen.setdefault(k, {})[json.dumps(v, sort_keys=True)] = v
        varied = {k: sorted(vals.values(), key=_sort_key) for k, vals in seen.items() if len(vals) > 1}
        if varied:
            out[str(mech)] = varied
    return out


def _sort_key(v: Any) -> tuple[int, Any]:
    if isinstance(v, bool):
        return (0, int(v))
    if isinstance(v, (int, float)):
        return (1, v)
    if isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) for x in v):
        return (2, tuple(v))
    return (3, str(v))
