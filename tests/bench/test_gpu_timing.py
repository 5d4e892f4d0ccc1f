"""Flex attention compiled once per shape and kept across points, its compile time in its own column outside the
per-point limit; the settling warm-up; the CUDA-graph column only where a CUDA point is launch bound.

Flex runs on the CPU here through Dynamo's ``eager`` backend (graphs captured and counted, no code generation).
"""

from __future__ import annotations

import time
import warnings

import pytest
import torch
import torch.nn.attention.flex_attention as flex_api
from attnbench.attentions.kernels import flex
from attnbench.bench import gpu_timing
from attnbench.bench import measure as m
from attnbench.bench.points import Grid, expand

FAST = dict(cpu_min_run_time=0.005, min_samples=3, remeasure=0, count_flops=False, compile_backend="eager")


@pytest.fixture
def cpu_flex(monkeypatch):
    """Flex attention compiled (eager backend) on the CPU, its CPU refusal lifted, Dynamo empty at the start."""
    monkeypatch.setattr(flex_api, "_validate_device", lambda *tensors: None)
    torch._dynamo.reset()
    with warnings.catch_warnings(), flex.compile_config(devices=("cpu",), backend="eager"):
        warnings.simplefilter("ignore")
        yield
    torch._dynamo.reset()


def _flex_point(resolution: str = "8"):
    grid = {"mechanisms": ["swin"], "resolutions": [resolution], "dims": [16], "heads": [2], "impls": ["flex"]}
    grid.update(passes=["fwd"], devices=["cpu"], cost_knob_values={"window": [4]})
    (point,) = expand(Grid.from_dict(grid)).points
    return point


def test_two_flex_points_of_one_shape_compile_flex_once(cpu_flex):
    point = _flex_point()
    first = m.measure(point, m.Settings(**FAST))
    second = m.measure(point, m.Settings(**FAST))
    assert first["status"] == second["status"] == "ok", (first["reason"], second["reason"])
    assert first["provenance"]["flex"] and second["provenance"]["flex"]  # the compiled path ran in both
    assert first["compile_graphs"] >= 1 and first["compile_ms"] > 0
    assert second["compile_graphs"] == 0 and second["compile_ms"] == 0.0  # kept from the first point
    other = m.measure(_flex_point("12"), m.Settings(**FAST))  # a new shape compiles again
    assert other["status"] == "ok" and other["compile_graphs"] >= 1


def test_a_compile_longer_than_the_point_limit_is_stored_with_its_time(cpu_flex, monkeypatch):
    slow_s = 1.5
    original = m._first_call

    def slow_first_call(work, device):
        time.sleep(slow_s)  # a cold compile past the limit, inside the first call's time
        return original(work, device) + slow_s * 1e3

    monkeypatch.setattr(m, "_first_call", slow_first_call)
    record = m.measure(_flex_point(), m.Settings(**{**FAST, "timeout_s": 1.0}))
    assert record["status"] == "ok", record["reason"]
    assert record["compile_ms"] >= slow_s * 1e3 and record["first_call_ms"] == record["compile_ms"]
    assert record["latency_ms_median"] > 0


def test_a_non_flex_point_past_its_limit_on_the_first_call_is_still_a_timeout(monkeypatch):
    original = m._first_call
    monkeypatch.setattr(m, "_first_call", lambda work, device: (time.sleep(1.2), original(work, device))[1])
    grid = {"mechanisms": ["full"], "resolutions": ["8"], "dims": [16], "heads": [2], "impls": ["fast"]}
    (point,) = expand(Grid.from_dict({**grid, "passes": ["fwd"], "devices": ["cpu"]})).points
    record = m.measure(point, m.Settings(**{**FAST, "timeout_s": 1.0}))
    assert record["status"] == "timeout" and "compile_ms" not in record


def test_warm_up_runs_until_the_call_time_settles():
    # clocks ramping up: the call time falls, then holds
    times = iter([5.0, 4.0, 3.0, 2.5, 2.0, 1.6, 1.3, 1.1] + [1.0] * 100)
    out = gpu_timing.warm_until_settled(lambda: next(times), max_s=60.0)
    assert out["warmup_settled"] and 10 <= out["warmup_calls"] < 30
    assert not gpu_timing.settled([3.0] * 5 + [2.0] * 5) and gpu_timing.settled([2.0] * 5 + [2.02] * 5)
    ticks = iter(range(1000))
    capped = gpu_timing.warm_until_settled(lambda: float(next(ticks) % 7 + 1), max_s=0.0)  # never settles: capped
    assert capped["warmup_calls"] == 1 and not capped["warmup_settled"]


def test_cuda_only_columns_stay_out_of_cpu_records():
    point = _flex_point()
    assert gpu_timing.graph_column(point, None, True) == {} and gpu_timing.settle_column(point, None, 1.0) == {}
