"""Helpers of a point's measurement that concern compiling and the GPU's state, kept out of bench/measure.py.

- :func:`first_call_outside_budget`: the first call of a point that compiles (flex
  attention) with the point's time budget paused, its compile time in its own
  column (``compile_ms``), so that a cold compile longer than the per-point limit
  is stored with its time instead of as ``timeout``.
- :func:`warm_until_settled`: warm-up calls until the call time stops falling (an
  idle GPU starts at low clocks), bounded in time, with the SM clock read where
  NVML or ``nvidia-smi`` gives it.
- :func:`cuda_graph_ms`: a step captured once in a CUDA graph and replayed, as
  ``triton.testing.do_bench_cudagraph`` times it: the device time without Python's
  launch overhead, for the maps where ``launch_bound`` is true.
"""

from __future__ import annotations

import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any


def first_call_outside_budget(first_call: Callable[[], float], budget: Any) -> dict[str, Any]:
    """Run ``first_call`` (returns its milliseconds) with ``budget`` paused; the fields it gives the record.

    ``compile_graphs`` counts the graphs Dynamo captured during the call; where it
    is 0 (this shape, dtype and pass were compiled by an earlier point of the
    process and kept), ``compile_ms`` is 0.
    """
    from .provenance import _dynamo_counts

    before = _dynamo_counts()
    budget.pause()
    try:
        ms = first_call()
    finally:
        budget.resume()
    after = _dynamo_counts()
    graphs = max(after["graphs"] - before["graphs"], after["frames"] - before["frames"])
    return {"first_call_ms": ms, "compile_ms": ms if graphs else 0.0, "compile_graphs": graphs}


def settled(times: list[float], window: int = 5, tolerance: float = 0.02) -> bool:
    """Whether the median of the last ``window`` call times is within ``tolerance`` of the window before."""
    if len(times) < 2 * window:
        return False
    last = statistics.median(times[-window:])
    before = statistics.median(times[-2 * window : -window])
    return abs(last - before) <= tolerance * before


def warm_until_settled(
    call: Callable[[], float], max_s: float, min_calls: int = 10, clock: Callable[[], float] = time.perf_counter
) -> dict[str, Any]:
    """Call ``call`` (returns one call's milliseconds) until :func:`settled` or ``max_s`` seconds have passed.

    Returns ``warmup_calls``, ``warmup_ms`` (wall time spent) and ``warmup_settled``.
    """
    times: list[float] = []
    start = clock()
    while True:
        times.append(call())
        elapsed = clock() - start
        if (len(times) >= min_calls and settled(times)) or elapsed >= max_s:
            break
    return {"warmup_calls": len(times), "warmup_ms": elapsed * 1e3, "warmup_settled": settled(times)}


def sm_clock_mhz(device_index: int = 0) -> float | None:
    """The SM clock now, from NVML (pynvml) or ``nvidia-smi``; None where neither answers."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        return float(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM))
    except Exception:  # noqa: BLE001 - any failure means no reading
        pass
    try:
        out = subprocess.run(
            ["nvidia-smi", "-i", str(device_index), "--query-gpu=clocks.sm", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout
        return float(out.strip().splitlines()[0])
    except Exception:  # noqa: BLE001
        return None


def timed_call_ms(step: Callable[[], Any], zero_grads: Callable[[], None], device: str) -> Callable[[], float]:
    """One call of ``step`` timed by CUDA events (milliseconds), for :func:`warm_until_settled`."""
    import torch

    def call() -> float:
        zero_grads()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)

    return call


def cuda_graph_ms(step: Callable[[], Any], zero_grads: Callable[[], None], device: str, reps: int = 20) -> float:
    """Median milliseconds of one replay of ``step`` captured in a CUDA graph (gradients reset before capture)."""
    import torch

    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):  # warm on a side stream, as capture requires
        for _ in range(3):
            zero_grads()
            step()
    torch.cuda.current_stream(device).wait_stream(stream)
    zero_grads()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times)


def graph_column(point: Any, work: Any, launch_bound: bool | None) -> dict[str, Any]:
    """``cuda_graph_ms`` (and ``cuda_graph_error`` when capture fails) for a launch-bound CUDA point; {} else."""
    if not (launch_bound and point.device.startswith("cuda")):
        return {}
    try:
        return {"cuda_graph_ms": cuda_graph_ms(work.step, work.zero_grads, point.device), "cuda_graph_error": None}
    except Exception as exc:  # noqa: BLE001 - a step that cannot be captured keeps its other numbers
        return {"cuda_graph_ms": None, "cuda_graph_error": f"{type(exc).__name__}: {exc}"[:500]}


def settle_column(point: Any, work: Any, max_s: float) -> dict[str, Any]:
    """The settled warm-up of a CUDA point and the SM clock after it; {} on the CPU."""
    if not point.device.startswith("cuda"):
        return {}
    out = warm_until_settled(timed_call_ms(work.step, work.zero_grads, point.device), max_s)
    index = int(point.device.split(":")[1]) if ":" in point.device else 0
    out["sm_clock_mhz"] = sm_clock_mhz(index)
    return out
