"""pytest-benchmark set-up of the perf cases: one baseline folder per machine, and no comparison across machines.

- The default storage (``./.benchmarks``) becomes ``<repo>/.benchmarks/<machine key>/`` (pytest-benchmark adds
  its own ``<OS>-<Python>`` folder below it), the key naming the device, torch and a hash of the fingerprint.
- ``machine_info`` of every saved run holds the harness's environment fingerprint (GPU, driver, CUDA, cuDNN,
  torch, triton, Python, CPU, threads) under ``attnbench``.
- Comparing against a baseline whose fingerprint differs, or asking for a comparison with no baseline saved for
  this machine, stops the run with a message that says what to do.

These hooks act when pytest is pointed at tests/perf (``nox -s bench`` does); from the repository root the
conftest is loaded too late to choose the storage, so saving or comparing is refused there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import perf_points
import pytest

REPO = Path(__file__).resolve().parents[2]
DEFAULT_STORAGE = "file://./.benchmarks"
SAVE_COMMAND = "nox -s bench -- --save"
REGRESSED_ENV = "ATTNBENCH_BENCH_REGRESSED"
# Set when this conftest was loaded after pytest-benchmark had chosen its storage.
_LATE = pytest.StashKey[bool]()


def _benchmarks_active(config: pytest.Config) -> bool:
    return bool(config.getoption("benchmark_only", False)) or not config.getoption("benchmark_skip", False)


def _stores_or_compares(config: pytest.Config) -> bool:
    return any(config.getoption(o, None) for o in ("benchmark_save", "benchmark_autosave", "benchmark_compare"))


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    if not _benchmarks_active(config) or config.getoption("benchmark_storage", None) != DEFAULT_STORAGE:
        return
    if hasattr(config, "_benchmarksession"):
        config.stash[_LATE] = True
        return
    folder = REPO / ".benchmarks" / perf_points.machine_key()
    config.option.benchmark_storage = f"file://{folder}"
    if config.getoption("benchmark_compare", None) is True and not any(folder.glob("*/[0-9][0-9][0-9][0-9]_*.json")):
        raise pytest.UsageError(
            f"no saved baseline for this machine in {folder.relative_to(REPO)}/ to compare with; "
            f"save one on main first: {SAVE_COMMAND}"
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.stash.get(_LATE, False) and _stores_or_compares(config):
        raise pytest.UsageError(
            "the perf baselines are kept per machine; save or compare them with `pytest tests/perf ...` "
            "(tests/perf as the path) or `nox -s bench`, not from the repository root"
        )


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    info = dict(perf_points.machine_info())
    machine_info["attnbench"] = info
    machine_info["attnbench_key"] = perf_points.machine_key(info)


def pytest_benchmark_compare_machine_info(
    config: pytest.Config, benchmarksession: Any, machine_info: dict[str, Any], compared_benchmark: dict[str, Any]
) -> None:
    """Refuse to compare with a baseline taken on another machine (or with another GPU, driver, CUDA, torch...)."""
    saved = compared_benchmark.get("machine_info", {}).get("attnbench")
    current = machine_info.get("attnbench") or perf_points.machine_info()
    if saved is None:
        raise pytest.UsageError(
            "the baseline has no attnbench fingerprint in its machine_info, so it cannot be matched to this "
            f"machine; save a new one with {SAVE_COMMAND}"
        )
    from attnbench.bench.env import env_differences

    differ = {k: (saved.get(k), current.get(k)) for k in env_differences(saved, current)}
    if differ:
        detail = "; ".join(f"{k}: baseline {a!r}, here {b!r}" for k, (a, b) in sorted(differ.items()))
        raise pytest.UsageError(
            f"the baseline was taken on a different machine ({detail}); timings are only compared within one "
            f"fingerprint. Save a baseline on this machine with {SAVE_COMMAND}"
        )


@pytest.hookimpl(wrapper=True)
def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> Any:
    """A regression (listed by pytest-benchmark just above) fails the run with exit status 1, not a traceback.

    With ATTNBENCH_BENCH_REGRESSED=FILE (set by ``nox -s bench``) the slower cases' node ids go to FILE and the
    exit status is left to the tests: the session measures those cases again and fails only if they are still
    slower, so a burst of load on a shared machine during one case does not fail the run.
    """
    from pytest_benchmark.session import PerformanceRegression

    try:
        return (yield)
    except PerformanceRegression:
        session = config._benchmarksession  # type: ignore[attr-defined]
        regressions = session.performance_regressions
        checks = config.getoption("benchmark_compare_fail") or []
        threshold = ", ".join(
            f"{c.field}:{c.threshold:g}{'%' if type(c).__name__.startswith('Percentage') else 's'}" for c in checks
        )
        names = [name for name, _ in regressions]
        record = os.environ.get(REGRESSED_ENV)
        if record:
            slower = {name.rsplit(" (", 1)[0] for name in names}
            Path(record).write_text("".join(f"{b.fullname}\n" for b in session.benchmarks if b.name in slower))
            terminalreporter.write_line(
                f"{len(names)} case(s) slower than the baseline by more than {threshold}; measuring them again",
                yellow=True,
                bold=True,
            )
            return None
        terminalreporter.write_line(
            f"FAILED: {len(names)} case(s) slower than the baseline by more than {threshold}: " + ", ".join(names),
            red=True,
            bold=True,
        )
        terminalreporter._session.exitstatus = pytest.ExitCode.TESTS_FAILED
        return None
