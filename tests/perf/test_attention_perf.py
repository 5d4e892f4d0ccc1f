"""pytest-benchmark cases: every mechanism and implementation at a few representative points.

Skipped by the normal test run (``--benchmark-skip`` in pyproject.toml); ``nox -s bench`` runs them against
this machine's saved baseline and fails on a regression of the median. Latency is pytest-benchmark's, taken
with ``benchmark.pedantic``: warm-up rounds first, then one call per round; on a GPU each round's setup sets
grads to None, flushes L2 (zeroes a 256 MB buffer) and synchronizes, and the timed call ends with a
synchronize. Peak memory, MACs and parameters come from the sweep harness's own measurement of the point
(``bench.measure.measure``: ``bench.flops.count`` and its memory measurement), stored in ``extra_info``
with the point's configuration; FLOPs are ``2 * macs``.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from attnbench.bench.measure import Settings, build_workload, measure
from attnbench.bench.points import Point
from perf_points import CUDA, THREADS, case_id, points

POINTS = points()

# Rounds: enough calls to fill about TARGET_S of timing, within [MIN_ROUNDS, MAX_ROUNDS].
TARGET_S = 0.2 if CUDA else 0.4
MIN_ROUNDS, MAX_ROUNDS = (20, 1000) if CUDA else (10, 1000)
WARMUP_ROUNDS = 10 if CUDA else 5
L2_FLUSH_BYTES = 256 * 1024 * 1024

# Only the harness's memory and MAC count are wanted; its own timing is cut to a minimum.
HARNESS = Settings(cpu_min_run_time=0.0, cuda_warmup_ms=1.0, cuda_rep_ms=1.0, min_samples=1, threads=THREADS)
EXTRA_FIELDS = (
    "peak_bytes",
    "baseline_bytes",
    "reserved_bytes",
    "memory_method",
    "macs",
    "analytic_macs",
    "counted_macs",
    "backward_macs",
    "macs_uncovered",
    "params",
    "device_name",
    "threads",
)


@pytest.fixture(scope="session")
def l2_flush() -> Any:
    """A buffer larger than any L2; zeroing it evicts the previous call's data (None on the CPU)."""
    if not CUDA:
        return None
    return torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")


@pytest.mark.perf
@pytest.mark.parametrize("point", POINTS, ids=[case_id(p) for p in POINTS])
def test_attention(benchmark: Any, point: Point, l2_flush: Any) -> None:
    torch.set_num_threads(THREADS)
    record = measure(point, HARNESS)
    if record["status"] == "skipped":
        pytest.skip(f"{point.label()}: {record['reason']}")
    assert record["status"] == "ok", f"{point.label()}: {record['status']}: {record['reason']}"

    work = build_workload(point)
    step, zero_grads = work.step, work.zero_grads

    def setup() -> None:
        zero_grads()
        if CUDA:
            l2_flush.zero_()
            torch.cuda.synchronize()

    def call() -> None:
        step()  # fwd, or fwd+bwd
        if CUDA:
            torch.cuda.synchronize()

    # Warm before choosing the number of rounds (first-call work such as tables, masks and autotune is not a
    # round's cost); the median of the warm-up calls sets it, so one slow call on a busy machine does not.
    times = []
    for _ in range(WARMUP_ROUNDS):
        setup()
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    per_call_s = max(sorted(times)[len(times) // 2], 1e-6)
    rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, int(TARGET_S / per_call_s)))

    # every impl of a point in one group, so the table puts fast beside reference
    benchmark.group = f"{point.mechanism} {point.pass_} {point.height}x{point.width}"
    benchmark.extra_info.update(
        point_id=point.point_id,
        point=point.label(),
        config=point.config(),
        flops=2 * record["macs"],
        timer="perf_counter around one call; setup: grads None"
        + (", L2 flushed, cuda synchronized; the call ends with a synchronize" if CUDA else ""),
        **{k: record.get(k) for k in EXTRA_FIELDS},
    )
    benchmark.pedantic(call, setup=setup, rounds=rounds, warmup_rounds=WARMUP_ROUNDS, iterations=1)
