"""Fixtures of the report tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from report_fixtures import write_run


@pytest.fixture
def make_run(tmp_path: Path) -> Callable[..., Path]:
    counter = {"n": 0}

    def make(rows: list[dict[str, Any]], env: dict[str, Any] | None = None, name: str | None = None) -> Path:
        counter["n"] += 1
        return write_run(tmp_path / (name or f"run{counter['n']}"), rows, env)

    return make
