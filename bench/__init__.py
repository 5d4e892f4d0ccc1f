"""The sweep harness: points -> measurements -> results store.

``bench.load(run_dir)`` reads a run into a pandas DataFrame without importing
torch; everything that measures is imported lazily.
"""

from __future__ import annotations

from typing import Any

from .store import SCHEMA, load, read_results

__all__ = ["SCHEMA", "load", "read_results", "run_sweep", "Grid", "Settings"]


def __getattr__(name: str) -> Any:
    # Lazy: these pull in torch.
    if name == "run_sweep":
        from .sweep import run_sweep

        return run_sweep
    if name == "Grid":
        from .points import Grid

        return Grid
    if name == "Settings":
        from .measure import Settings

        return Settings
    raise AttributeError(f"module 'bench' has no attribute {name!r}")
