"""The results store: a run directory holding env.json, sweep.json and results.jsonl.

One JSON object per point is appended and flushed as each point finishes, so a
killed sweep loses at most the point in flight. A corrupt trailing line (a write
cut short) is detected, moved aside to ``results.corrupt`` and reported; corrupt
lines elsewhere are reported and skipped. Nothing here imports torch: reports
read results with pandas only.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from . import samples

RESULTS = "results.jsonl"
ENV = "env.json"
SWEEP = "sweep.json"
CORRUPT = "results.corrupt"

STATUSES = ("ok", "skipped", "oom", "error", "timeout")

# The stored columns users can rely on, in order (see README, "Sweeps and the results schema").
SCHEMA: dict[str, str] = {
    "point_id": "str",
    "mechanism": "str",
    "knobs": "object",
    "height": "Int64",
    "width": "Int64",
    "tokens": "Int64",
    "batch": "Int64",
    "dim": "Int64",
    "heads": "Int64",
    "dtype": "str",
    "pass": "str",
    "impl": "str",
    "compile": "boolean",
    "device": "str",
    "cross": "boolean",
    "context_height": "Int64",
    "context_width": "Int64",
    "image_height": "Int64",
    "image_width": "Int64",
    "stage": "Int64",
    "status": "str",
    "reason": "str",
    "latency_ms_median": "float64",
    "latency_ms_p20": "float64",
    "latency_ms_p80": "float64",
    "samples": "Int64",
    "noisy": "boolean",
    "timing_method": "str",
    "first_call_ms": "float64",
    "peak_bytes": "Int64",
    "baseline_bytes": "Int64",
    "reserved_bytes": "Int64",
    "memory_method": "str",
    "macs": "Int64",
    "analytic_macs": "Int64",
    "counted_macs": "Int64",
    "macs_uncovered": "object",
    "backward_macs": "Int64",
    "macs_error": "str",
    "params": "Int64",
    "threads": "Int64",
    "device_name": "str",
    "wall_s": "float64",
    "finished_at": "str",
    # What ran, the raw samples and the noise evidence (README, "Provenance and noise").
    "latency_samples_ms": "object",
    "provenance": "object",
    "probe_ms": "float64",
    "contended": "boolean",
    "contention": "object",
    "load_avg": "object",
    "host_ms_per_call": "float64",
    "launch_bound": "boolean",
    "overhead_ms": "float64",
}

# Environment fields that must match for results to share a run directory.
FINGERPRINT_KEYS = ("gpu_name", "gpu_count", "cuda", "torch", "python", "cpu_model")


class StoreError(RuntimeError):
    """The run directory cannot be used as asked."""


@dataclasses.dataclass
class ReadReport:
    records: list[dict[str, Any]]
    # (1-based line number, the start of the line) of every line that is not a JSON object.
    corrupt: list[tuple[int, str]]
    # True when the last line is corrupt (typically a write cut short by a kill).
    trailing_corrupt: bool = False

    def messages(self) -> list[str]:
        out = []
        for lineno, text in self.corrupt:
            where = "trailing line" if (self.trailing_corrupt and (lineno, text) == self.corrupt[-1]) else "line"
            out.append(f"{RESULTS} {where} {lineno} is not a JSON object and was skipped: {text[:80]!r}")
        return out


def read_results(run_dir: str | os.PathLike) -> ReadReport:
    """Every well-formed record of a run, with the corrupt lines reported (never raised)."""
    path = Path(run_dir) / RESULTS
    if not path.exists():
        return ReadReport([], [])
    data = path.read_bytes()
    lines = data.split(b"\n")
    records: list[dict[str, Any]] = []
    corrupt: list[tuple[int, str]] = []
    last_nonempty = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    trailing = False
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        text = raw.decode("utf-8", errors="replace")
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict) or "point_id" not in obj:
            corrupt.append((i + 1, text))
            trailing = trailing or i == last_nonempty
            continue
        records.append(obj)
    return ReadReport(records, corrupt, trailing)


class ResultsStore:
    """Appends results of one run directory; the only writer of results.jsonl."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / RESULTS

    def open(self, env: dict[str, Any], sweep: dict[str, Any] | None = None) -> ReadReport:
        """Create or reopen the run directory; returns what is already stored.

        A corrupt trailing line is moved to results.corrupt (so appends start on a
        clean line); an environment that differs from the stored one is refused.
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        env_path = self.run_dir / ENV
        if env_path.exists():
            stored = json.loads(env_path.read_text())
            diffs = [
                f"{k}: {stored.get(k)!r} here, {env.get(k)!r} now"
                for k in FINGERPRINT_KEYS
                if stored.get(k) != env.get(k)
            ]
            if diffs:
                raise StoreError(
                    f"{self.run_dir} holds results from another environment ({'; '.join(diffs)}); "
                    "results are comparable only within one fingerprint, so pass a new --out"
                )
        else:
            env_path.write_text(json.dumps(env, indent=2, sort_keys=True) + "\n")
        if sweep is not None:
            (self.run_dir / SWEEP).write_text(json.dumps(sweep, indent=2, sort_keys=True) + "\n")
        report = read_results(self.run_dir)
        if self.path.exists():
            self._repair_tail()
        return report

    def _repair_tail(self) -> None:
        """Cut an unterminated or corrupt last line off into results.corrupt."""
        data = self.path.read_bytes()
        if not data:
            return
        body = data[:-1] if data.endswith(b"\n") else data
        cut = body.rfind(b"\n") + 1
        last = body[cut:]
        try:
            ok = isinstance(json.loads(last), dict) and data.endswith(b"\n")
        except json.JSONDecodeError:
            ok = False
        if ok:
            return
        with open(self.run_dir / CORRUPT, "ab") as f:
            f.write(last + b"\n")
        with open(self.path, "r+b") as f:
            f.truncate(cut)

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=False, allow_nan=False, default=str) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def _derive(df: Any, env: dict[str, Any]) -> Any:
    """Add the read-time columns: flops, achieved TFLOP/s, % of peak, bytes per token."""
    from .hardware import lookup

    macs = df["macs"].astype("float64")
    # fwd+bwd: the measured backward MACs where the counter gave them, else the
    # usual estimate that a backward costs twice the forward.
    backward = df["backward_macs"].astype("float64").fillna(2 * macs)
    pass_macs = macs + backward.where(df["pass"] == "fwd+bwd", 0.0)
    df["flops"] = 2 * df["macs"]
    seconds = df["latency_ms_median"].astype("float64") / 1e3
    df["tflops"] = 2 * pass_macs / seconds / 1e12
    tf32 = env.get("float32_matmul_precision") in ("high", "medium")

    def peak(row: Any) -> float:
        if not str(row["device"]).startswith("cuda"):
            return float("nan")
        name = row.get("device_name")
        spec = lookup(name if isinstance(name, str) else env.get("gpu_name"))
        try:
            return spec.peak_tflops(row["dtype"], tf32=tf32) if spec else float("nan")
        except KeyError:
            return float("nan")

    df["peak_tflops"] = df.apply(peak, axis=1) if len(df) else df["tflops"]
    df["pct_peak"] = 100 * df["tflops"] / df["peak_tflops"]
    df["bytes_per_token"] = df["peak_bytes"].astype("float64") / (df["batch"] * df["tokens"]).astype("float64")
    return df


def load(run_dir: str | os.PathLike, *, derived: bool = True, dedupe: bool = True) -> Any:
    """A tidy pandas DataFrame of a run: one row per point, the stored columns of
    ``SCHEMA`` first (with stable dtypes), then any others; with ``derived`` also
    flops, tflops, peak_tflops, pct_peak and bytes_per_token (computed here, never stored).
    Corrupt lines are skipped; ``df.attrs["corrupt"]`` lists them."""
    import pandas as pd

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run directory {run_dir}; pass the --out of a sweep")
    report = read_results(run_dir)
    df = pd.DataFrame.from_records(report.records)
    for col in SCHEMA:
        if col not in df.columns:
            df[col] = None
    extra = [c for c in df.columns if c not in SCHEMA]
    df = df[list(SCHEMA) + extra]
    if dedupe and len(df):
        df = df.drop_duplicates("point_id", keep="last").reset_index(drop=True)
    df = samples.rederive(df)  # the latency summary comes from the samples wherever they are stored
    for col, dtype in SCHEMA.items():
        if dtype == "object":
            continue
        if dtype == "str":
            df[col] = df[col].astype("string")
        elif dtype == "float64":
            df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
        else:
            df[col] = df[col].astype(dtype)
    env_path = run_dir / ENV
    env = json.loads(env_path.read_text()) if env_path.exists() else {}
    if derived:
        df = _derive(df, env)
    df.attrs["env"] = env
    df.attrs["corrupt"] = report.messages()
    return df
