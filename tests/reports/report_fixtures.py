"""Helpers of the report tests: the stored fixture runs and small synthetic runs written on the fly."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parent / "fixtures"

ENV = {
    "gpu_name": "NVIDIA H100 80GB HBM3",
    "gpu_names": ["NVIDIA H100 80GB HBM3"],
    "gpu_count": 1,
    "driver": "550.54.15",
    "cuda": "12.4",
    "torch": "2.13.0",
    "triton": "3.5.0",
    "python": "3.11.9",
    "cpu_model": "AMD EPYC 7R13 Processor",
    "threads": 8,
    "git_rev": "aaaa",
    "git_dirty": False,
    "time": "2026-11-20T14:03:11+00:00",
}


def row(mechanism: str, hw: int, latency: float | None, **kw: Any) -> dict[str, Any]:
    """One stored result row with every schema field; ``latency`` None makes a failed point."""
    cfg = {
        "mechanism": mechanism,
        "knobs": kw.pop("knobs", {}),
        "cross": False,
        "height": hw,
        "width": hw,
        "tokens": hw * hw,
        "batch": kw.pop("batch", 1),
        "dim": 64,
        "heads": 2,
        "dtype": kw.pop("dtype", "float16"),
        "pass": kw.pop("pass_", "fwd"),
        "impl": kw.pop("impl", "default"),
        "compile": False,
        "device": kw.pop("device", "cuda"),
    }
    pid = hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]
    spread = kw.pop("spread", 0.01)
    out = {
        "point_id": pid,
        **cfg,
        "status": kw.pop("status", "ok" if latency is not None else "error"),
        "reason": kw.pop("reason", None),
        "latency_ms_median": latency,
        "latency_ms_p20": None if latency is None else latency * (1 - spread),
        "latency_ms_p80": None if latency is None else latency * (1 + spread),
        "samples": 20,
        "first_call_ms": 10.0,
        "peak_bytes": kw.pop("peak", None if latency is None else 1_000_000),
        "baseline_bytes": 500_000,
        "macs": kw.pop("macs", 1_000_000),
        "macs_uncovered": {},
        "params": 16_384,
        "device_name": "NVIDIA H100 80GB HBM3" if cfg["device"] == "cuda" else "cpu",
    }
    out.update(kw)
    return out


def write_run(path: Path, rows: list[dict[str, Any]], env: dict[str, Any] | None = None) -> Path:
    """A run directory as the harness writes it: env.json and results.jsonl."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "env.json").write_text(json.dumps(ENV if env is None else env))
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
