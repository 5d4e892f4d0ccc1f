"""The results store: a run directory holding env.json, sweep.json and results.jsonl.

One JSON object per point is appended and flushed as each point finishes, so a
killed sweep loses at most the point in flight. Every record is checked against
the typed schema below when it is read: a line that is not JSON, or a record
that does not fit (a field of the wrong type, a missing configuration field),
is reported with its line number and skipped, never fatal. A cut-short last
line is moved aside to ``results.corrupt``; a valid last record that only lacks
its newline is kept. While a sweep writes a run directory it holds its lock.
Nothing here imports torch: reports and studies read results with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from attnbench.errors import AttnbenchError

from . import samples
from .env import env_differences

RESULTS = "results.jsonl"
ENV = "env.json"
SWEEP = "sweep.json"
CORRUPT = "results.corrupt"

STATUSES = ("ok", "skipped", "oom", "error", "timeout")


class MemoryMethod:
    """How a peak memory was read: the one enumeration that every writer of ``memory_method`` uses
    (bench.measure's probes, and through them sweep points, experiment cost rows, the matcher's cost and
    training rows)."""

    CPU_PROFILER = "torch.profiler memory events (CPU allocator), peak of the running sum"
    CUDA_ALLOCATOR = "torch.cuda max_memory_allocated"


MEMORY_METHODS = (MemoryMethod.CPU_PROFILER, MemoryMethod.CUDA_ALLOCATOR)

# Field types of a stored record: str, int, float (an int is a float too), bool,
# object (a JSON object), list, floats (a list of numbers), any; "a|b" is either.
# Every field may be null unless it is required below; fields not declared are kept
# as they are. See README, "Sweeps and the results schema".
POINT_FIELDS: dict[str, str] = {
    "point_id": "str",
    "mechanism": "str",
    "knobs": "object",
    "height": "int",
    "width": "int",
    "tokens": "int",
    "batch": "int",
    "dim": "int",
    "heads": "int",
    "dtype": "str",
    "pass": "str",
    "impl": "str",
    "compile": "bool",
    "device": "str",
    "cross": "bool",
    "context_height": "int",
    "context_width": "int",
    "image_height": "int",
    "image_width": "int",
    "stage": "int",
    "frames": "int",
    "status": "str",
    "reason": "str",
    "latency_ms_median": "float",
    "latency_ms_p20": "float",
    "latency_ms_p80": "float",
    "samples": "int",
    "noisy": "bool",
    "timing_method": "str",
    "first_call_ms": "float",
    "peak_bytes": "int",
    "baseline_bytes": "int",
    "reserved_bytes": "int",
    "memory_method": "str",
    "macs": "int",
    "analytic_macs": "int",
    "counted_macs": "int",
    "macs_uncovered": "object",
    "backward_macs": "int",
    "macs_error": "str",
    "params": "int",
    "threads": "int",
    "device_name": "str",
    "wall_s": "float",
    "timed_s": "float",
    "finished_at": "str",
    # the code that measured the point (bench.env.git_state: commit, and a hash of a dirty tree's changes)
    "revision": "str",
    # raw timing samples, provenance and the machine's load while the point ran
    "latency_samples_ms": "floats",
    # the number of samples of each timing round kept (their sum is len(latency_samples_ms))
    "latency_rounds": "floats",
    "provenance": "object",
    "contended": "bool",
    "contention": "object",
    "probe_ms": "float|floats",
    "load_avg": "float|floats",
    "host_ms_per_call": "float",
    "launch_bound": "bool",
    "overhead_ms": "float",
}
# Rows a training run appends (studies.train), told apart by ``kind``.
TRAIN_FIELDS: dict[str, str] = {
    "kind": "str",
    "model": "str",
    "tiny": "bool",
    "data": "str",
    "resolution": "int",
    "epoch": "int",
    "epochs": "int",
    "train_loss": "float",
    "train_accuracy": "float",
    "val_loss": "float",
    "accuracy": "float",
    "lr": "float",
    "images_per_s": "float",
    "mechanisms": "list",
    "classes": "int",
    "train_images": "int",
    "val_images": "int",
    "world_size": "int",
    "images_per_s_per_device": "float",
    "data_wait_share": "float",
    "peak_bytes_per_device": "int",
    "recipe": "str",
    "ema_accuracy": "float",
    "ema_val_loss": "float",
}
FIELD_TYPES: dict[str, str] = {**POINT_FIELDS, **TRAIN_FIELDS}
# What a record must hold: a sweep point its whole configuration, a training row its model.
REQUIRED_POINT: tuple[str, ...] = ("point_id", "status", "mechanism", "knobs", "height", "width", "batch")
REQUIRED_POINT += ("dim", "heads", "dtype", "pass", "impl", "compile", "device")
REQUIRED_TRAIN = ("point_id", "status", "kind", "model")
# Rows told apart by ``kind`` and what each must hold; a record without ``kind`` is a sweep point.
REQUIRED_BY_KIND: dict[str, tuple[str, ...]] = {
    "train": REQUIRED_TRAIN,
    "train_epoch": REQUIRED_TRAIN,
    # studies.matching: one row per (mechanism, seed) of the matching task.
    "match": ("point_id", "status", "kind", "mechanism", "seed", "height", "width"),
    # studies.experiments: one row per (variant, seed) trained, one per (variant, resolution) measured.
    "experiment": ("point_id", "status", "kind", "experiment", "mode", "variant", "seed"),
    "experiment_cost": ("point_id", "kind", "experiment", "mode", "variant"),
}

_PANDAS = {"int": "Int64", "float": "float64", "bool": "boolean", "str": "str"}
# The stored columns of bench.load, in order, with their pandas dtypes ("str": pandas' string dtype).
SCHEMA: dict[str, str] = {name: _PANDAS.get(kind, "object") for name, kind in POINT_FIELDS.items()}


# Stored integers are 64-bit (pandas' Int64, torch's sizes): a larger one is refused when read.
INT_LIMIT = 2**63


def _in_range(value: Any) -> bool:
    return not isinstance(value, int) or -INT_LIMIT <= value < INT_LIMIT


def _fits(value: Any, kind: str) -> bool:
    if "|" in kind:
        return any(_fits(value, k) for k in kind.split("|"))
    if kind == "any":
        return True
    if kind == "str":
        return isinstance(value, str)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return (isinstance(value, int) and not isinstance(value, bool) and _in_range(value)) or (
            isinstance(value, float) and value.is_integer() and abs(value) < INT_LIMIT
        )
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and _in_range(value)
    if kind == "object":
        return isinstance(value, dict)
    if kind == "list":
        return isinstance(value, list)
    if kind == "floats":
        return isinstance(value, list) and all(_fits(v, "float") for v in value)
    raise ValueError(f"unknown field type {kind!r}")


def _short(value: Any) -> str:
    try:
        return repr(value)[:80]
    except ValueError:  # an int too long for repr; nested inside a list or object
        return f"a {type(value).__name__} holding a number too long to print"


def problems(record: Any) -> list[str]:
    """Why a parsed line is not a valid record (empty: it is one)."""
    if not isinstance(record, dict):
        return [f"a record is a JSON object, not {type(record).__name__}"]
    out = []
    kind = record.get("kind")
    if kind is not None and kind not in REQUIRED_BY_KIND:
        return [f"kind must be one of {', '.join(REQUIRED_BY_KIND)}, got {_short(kind)}"[:120]]
    required = REQUIRED_POINT if kind is None else REQUIRED_BY_KIND[kind]
    missing = [k for k in required if record.get(k) is None]
    if missing:
        out.append("missing " + ", ".join(missing))
    for key, value in record.items():
        kind_of = FIELD_TYPES.get(key)
        if kind_of is not None and value is not None and not _fits(value, kind_of):
            big = isinstance(value, int) and not isinstance(value, bool) and not _in_range(value)
            shown = f"an integer of {value.bit_length()} bits" if big else _short(value)
            out.append(f"{key} must be {kind_of}, got {shown}"[:120])
    status = record.get("status")
    if status is not None and status not in STATUSES:
        out.append(f"status must be one of {', '.join(STATUSES)}, got {_short(status)}"[:120])
    return out


class StoreError(AttnbenchError, RuntimeError):
    """The run directory cannot be used as asked."""


class WriteError(AttnbenchError, OSError):
    """A file could not be written (disk full, a read-only directory); nothing of it was left behind."""

    def __init__(self, path: str | os.PathLike, exc: OSError):
        super().__init__(exc.errno, exc.strerror)
        self.filename = str(path)
        self.message = f"cannot write {path}: [Errno {exc.errno}] {exc.strerror}; {os_advice(exc)}"

    def __str__(self) -> str:
        return self.message


def os_advice(exc: OSError) -> str:
    """What to change after an OSError, in a few words."""
    import errno

    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return "free space on that disk, or write somewhere else"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "make it writable, or write somewhere else"
    if exc.errno == errno.EISDIR:
        return "pass a file, not a directory"
    if exc.errno == errno.ENOTDIR:
        return "a part of the path is a file; pass another path"
    return "check the path"


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all: a temporary file beside it, fsynced, then renamed.

    A failure (disk full, a read-only directory) leaves ``path`` as it was and no temporary file behind,
    and is raised as a WriteError naming ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, text.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, WriteError):
            raise
        raise WriteError(path, exc) from None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


@dataclasses.dataclass
class ReadReport:
    records: list[dict[str, Any]]
    # (1-based line number, the start of the line) of every line that is not JSON.
    corrupt: list[tuple[int, str]]
    # True when the last line is not JSON (typically a write cut short by a kill).
    trailing_corrupt: bool = False
    # (1-based line number, why) of every JSON line that is not a valid record.
    invalid: list[tuple[int, str]] = dataclasses.field(default_factory=list)

    def messages(self) -> list[str]:
        out = []
        for lineno, text in self.corrupt:
            where = "trailing line" if (self.trailing_corrupt and (lineno, text) == self.corrupt[-1]) else "line"
            out.append(f"{RESULTS} {where} {lineno} is not a JSON object and was skipped: {text[:80]!r}")
        for lineno, why in self.invalid:
            out.append(f"{RESULTS} line {lineno} is not a valid record and was skipped: {why}")
        return out


def read_results(run_dir: str | os.PathLike) -> ReadReport:
    """Every valid record of a run, with the corrupt and invalid lines reported (never raised)."""
    path = Path(run_dir) / RESULTS
    if not path.exists():
        return ReadReport([], [])
    lines = path.read_bytes().split(b"\n")
    records: list[dict[str, Any]] = []
    corrupt: list[tuple[int, str]] = []
    invalid: list[tuple[int, str]] = []
    last_nonempty = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    trailing = False
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        text = raw.decode("utf-8", errors="replace")
        try:
            obj = json.loads(text)
        except ValueError:  # not JSON, or an integer longer than Python reads (4300 digits)
            corrupt.append((i + 1, text))
            trailing = trailing or i == last_nonempty
            continue
        why = problems(obj)
        if why:
            invalid.append((i + 1, "; ".join(why)))
            continue
        records.append(obj)
    return ReadReport(records, corrupt, trailing, invalid)


def read_env(run_dir: str | os.PathLike) -> dict[str, Any]:
    """A run directory's env.json ({} when there is none); one that is not a JSON object is a StoreError."""
    path = Path(run_dir) / ENV
    if not path.exists():
        return {}
    try:
        env = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise StoreError(f"{path} is not valid JSON; restore it from the run, or pass another run directory") from None
    if not isinstance(env, dict):
        raise StoreError(
            f"{path} holds a JSON {type(env).__name__}, not an object; restore it from the run, "
            "or pass another run directory"
        )
    return env


def _make_dirs(path: Path) -> list[Path]:
    """mkdir -p ``path``; the folders it created, outermost first."""
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    return missing[::-1]


def _remove_if_empty(created: list[Path]) -> None:
    """Remove the folders of ``created`` (outermost first) that are still empty, innermost first."""
    for d in reversed(created):
        try:
            d.rmdir()
        except OSError:  # not empty (or gone): it holds what was written, so it stays
            return


class ResultsStore:
    """Appends results of one run directory; the only writer of results.jsonl."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / RESULTS

    def has_results(self) -> bool:
        """Whether results.jsonl holds anything (even lines that do not read)."""
        return self.path.exists() and bool(self.path.read_bytes().strip())

    def stored_env(self) -> dict[str, Any]:
        """The stored env.json ({} when there is none)."""
        return read_env(self.run_dir)

    def stored_sweep(self) -> dict[str, Any] | None:
        path = self.run_dir / SWEEP
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError:
            raise StoreError(f"{path} is not valid JSON; restore it, or pass another --out") from None

    def open(self, env: dict[str, Any], sweep: dict[str, Any] | None = None, *, appended: bool = False) -> ReadReport:
        """Create or reopen the run directory; returns what is already stored.

        An environment that is not comparable with the stored one is refused, and so
        are results without their env.json. ``sweep`` is written to sweep.json; with
        ``appended`` it is added to the stored request's ``appended`` list instead.
        A cut-short last line is moved to results.corrupt; a valid last record that
        lacks its newline gets one (so appends start on a clean line).
        """
        created = _make_dirs(self.run_dir)
        try:
            return self._open(env, sweep, appended)
        except BaseException:
            _remove_if_empty(created)  # e.g. env.json could not be written: no empty folder is left
            raise

    def _open(self, env: dict[str, Any], sweep: dict[str, Any] | None, appended: bool) -> ReadReport:
        env_path = self.run_dir / ENV
        if env_path.exists():
            stored = self.stored_env()
            diffs = [f"{k}: {stored.get(k)!r} here, {env.get(k)!r} now" for k in env_differences(stored, env)]
            if diffs:
                raise StoreError(
                    f"{self.run_dir} holds results from another environment ({'; '.join(diffs)}); "
                    "results are comparable only within one fingerprint, so pass a new --out"
                )
        elif self.has_results():
            raise StoreError(
                f"{self.run_dir} holds results but no {ENV}, so they cannot be matched to this machine; "
                f"restore {ENV}, or pass another --out"
            )
        else:
            write_atomic(env_path, json.dumps(env, indent=2, sort_keys=True) + "\n")
        if sweep is not None:
            saved = self.stored_sweep() if appended else None
            if saved is not None:
                saved.setdefault("appended", []).append(sweep)
                sweep = saved
            write_atomic(self.run_dir / SWEEP, json.dumps(sweep, indent=2, sort_keys=True) + "\n")
        report = read_results(self.run_dir)
        if self.path.exists():
            self._repair_tail()
        return report

    def _repair_tail(self) -> None:
        """Cut a last line that is not JSON off into results.corrupt; end a valid one with its newline."""
        data = self.path.read_bytes()
        if not data or data.endswith(b"\n"):
            return
        cut = data.rfind(b"\n") + 1
        last = data[cut:]
        try:
            json.loads(last)
        except ValueError:
            with open(self.run_dir / CORRUPT, "ab") as f:
                f.write(last + b"\n")
            with open(self.path, "r+b") as f:
                f.truncate(cut)
            return
        with open(self.path, "ab") as f:
            f.write(b"\n")

    def append(self, record: dict[str, Any]) -> None:
        """Append one record as a line, whole or not at all: a failed write (disk full) is cut back off,
        so the records stored before stay as they were, and raised as a WriteError."""
        line = json.dumps(record, sort_keys=False, allow_nan=False, default=str) + "\n"
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise WriteError(self.path, exc) from None
        try:
            start = os.fstat(fd).st_size
            try:
                _write_all(fd, line.encode("utf-8"))
                os.fsync(fd)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
                raise WriteError(self.path, exc) from None
        finally:
            os.close(fd)


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
    env = read_env(run_dir)
    if derived:
        df = _derive(df, env)
    df.attrs["env"] = env
    df.attrs["corrupt"] = report.messages()
    return df
