"""Measure one sweep point: latency, first-call time, peak memory, MACs, parameters.

Never prints. Every outcome is a record: ``ok``, ``skipped`` (the mechanism's
reasons), ``oom``, ``error`` (the exception's message; NaN/Inf outputs too) or
``timeout``. The per-point time limit is enforced in process as a budget: after
the first call and after a warm call, a point whose elapsed time is over the
limit, or whose remaining budget cannot hold the minimum number of samples,
becomes ``timeout``; the number of timed repetitions is capped to fit the
budget. A single call that never returns cannot be interrupted in process; the
subprocess executor (``--isolate``) adds a hard kill for that case.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from .points import Point, point_reasons

CPU_MEMORY_METHOD = "torch.profiler memory events (CPU allocator), peak of the running sum"
CUDA_MEMORY_METHOD = "torch.cuda max_memory_allocated"


@dataclasses.dataclass
class Settings:
    """How points are measured (the same for every point of a sweep; not part of point_id)."""

    timeout_s: float = 120.0
    # CPU: seconds of timing per point (torch.utils.benchmark blocked_autorange).
    cpu_min_run_time: float = 0.2
    # CUDA: warm-up and timed milliseconds per point (as triton.testing.do_bench).
    cuda_warmup_ms: float = 25.0
    cuda_rep_ms: float = 100.0
    min_samples: int = 3
    max_samples: int = 1000
    # (p80 - p20) / median above this flags the point as noisy.
    noisy_spread: float = 0.25
    threads: int | None = None
    count_flops: bool = True
    flush_l2: bool = True
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class PointTimeout(Exception):
    """The point ran past its time budget."""


def is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text.lower() or "can't allocate memory" in text or "DefaultCPUAllocator" in text
    )


def _dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def precheck(point: Point) -> list[str]:
    """Reasons the point cannot run: the registry's one answer (bench.points.point_reasons)."""
    return point_reasons(point)


def _quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default) of a non-empty list."""
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak of the running sum of CPU allocator events during one call of fn."""
    from torch.profiler import ProfilerActivity, profile

    # The profiler's C++ side logs start/stop lines on stderr; keep them off the terminal.
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]  # type: ignore[union-attr]
    events.sort(key=lambda e: e.start_ns())
    running = peak = 0
    for e in events:
        running += e.nbytes()
        peak = max(peak, running)
    return peak


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for the duration (C++ logging bypasses sys.stderr)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (embedded interpreters)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _tensor_bytes(tensors: list[Any]) -> int:
    seen: set[int] = set()
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


class _Budget:
    def __init__(self, limit_s: float, clock: Callable[[], float]):
        self.limit_s = limit_s
        self.clock = clock
        self.start = clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def remaining(self) -> float:
        return self.limit_s - self.elapsed()

    def check(self, what: str) -> None:
        if self.elapsed() > self.limit_s:
            raise PointTimeout(
                f"{what}: {self.elapsed():.1f} s elapsed, over the per-point limit of {self.limit_s:g} s"
            )


_FLOP_CACHE: dict[tuple, dict[str, Any]] = {}


def _count_macs(point: Point, module: Any, args: tuple) -> dict[str, Any]:
    """MACs of one forward call (and of the backward for fwd+bwd points) with bench.flops.

    A counter that fails leaves the analytic count in ``macs`` and says why in
    ``macs_error``; the point's measurements stand.
    """
    backward = point.pass_ == "fwd+bwd"
    key: tuple = (point.mechanism, point.knobs, point.hw, point.batch, point.dim, point.heads, point.cross)
    key += (point.impl, point.device, backward)
    if key in _FLOP_CACHE:
        return _FLOP_CACHE[key]
    context_hw = args[3] if len(args) > 3 else None
    analytic = int(module.macs(point.batch, point.hw, context_hw))
    out: dict[str, Any] = {
        "macs": analytic,
        "analytic_macs": analytic,
        "counted_macs": None,
        "backward_macs": None,
        "macs_uncovered": None,
        "macs_error": None,
    }
    try:
        from .flops import count

        r = count(module, args, backward=backward)
    except Exception as exc:  # counting is secondary to the measurement: record why it failed
        out["macs_error"] = f"{type(exc).__name__}: {exc}"[:500]
    else:
        bwd = getattr(r, "backward_macs_measured", None)
        out.update(
            macs=int(r.macs),
            analytic_macs=None if r.analytic_macs is None else int(r.analytic_macs),
            counted_macs=None if r.flop_counter_macs is None else int(r.flop_counter_macs),
            backward_macs=None if bwd is None else int(bwd),
            macs_uncovered=dict(r.uncovered or {}),
            macs_error=getattr(r, "flop_counter_error", None),
        )
    _FLOP_CACHE[key] = out
    return out


def measure(point: Point, settings: Settings | None = None, clock: Callable[[], float] = time.perf_counter) -> dict:
    """Measure one point and return its full record (never raises for a failing point)."""
    import torch

    settings = settings or Settings()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    record: dict[str, Any] = {**point.to_json(), "status": "ok", "reason": None}
    record["threads"] = torch.get_num_threads()
    budget = _Budget(settings.timeout_s, clock)
    device = point.device
    state: dict[str, Any] = {}
    try:
        if device.startswith("cuda") and torch.cuda.is_available():
            record["device_name"] = torch.cuda.get_device_name(device)
        else:
            from .env import cpu_model

            record["device_name"] = cpu_model()
        reasons = precheck(point)
        if reasons:
            record.update(status="skipped", reason="; ".join(reasons))
            return record
        _run_point(point, settings, budget, record, state)
    except PointTimeout as exc:
        record.update(status="timeout", reason=str(exc))
    except Exception as exc:
        status = "oom" if is_oom(exc) else "error"
        record.update(status=status, reason=f"{type(exc).__name__}: {exc}".strip()[:2000])
    finally:
        state.clear()
        if device.startswith("cuda") and torch.cuda.is_available():
            gc.collect()
            torch.cuda.empty_cache()
        record["wall_s"] = round(budget.elapsed(), 4)
        record["finished_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return record


_WARM_DEVICES: set[str] = set()


def _warm_device(device: str) -> None:
    """Once per process and device: create the BLAS handles and thread pools, so that
    the first point's first_call_ms does not carry the process's start-up."""
    import torch

    if device in _WARM_DEVICES:
        return
    a = torch.randn(64, 64, device=device, requires_grad=True)
    (a @ a).softmax(-1).sum().backward()
    _sync(device)
    _WARM_DEVICES.add(device)


@dataclasses.dataclass
class Workload:
    """What one point runs: its module and inputs, one call of its pass, and a reset of its gradients."""

    module: Any
    args: tuple
    step: Callable[[], Any]
    zero_grads: Callable[[], None]
    grad_out: list  # the output gradient of fwd+bwd, once the first step has made it


def build_workload(point: Point, seed: int = 0) -> Workload:
    """Build a point's module (compiled if asked) and inputs on its device, in its dtype.

    ``step()`` runs the pass once (``fwd`` under no_grad; ``fwd+bwd`` backward from a
    fixed random output gradient, made on the first call) and returns the output;
    ``zero_grads()`` sets every gradient to None, as between repetitions.
    """
    import torch

    import attentions

    device, dtype = point.device, _dtype(point.dtype)
    torch.manual_seed(seed)
    module = attentions.build(point.mechanism, dim=point.dim, heads=point.heads, impl=point.impl, **point.knob_dict())
    module = module.to(device=device, dtype=dtype)
    args = module.example_inputs(point.batch, point.hw, device=device, dtype=dtype, cross=point.cross, seed=seed)
    train = point.pass_ == "fwd+bwd"
    if train:
        for a in args:
            if isinstance(a, torch.Tensor):
                a.requires_grad_(True)
    else:
        module.eval()
    run = torch.compile(module) if point.compile else module
    leaves = [p for p in module.parameters() if p.requires_grad] + [
        a for a in args if isinstance(a, torch.Tensor) and a.requires_grad
    ]

    def zero_grads() -> None:
        for t in leaves:
            t.grad = None

    grad_out: list[Any] = []

    def step() -> Any:
        if not train:
            with torch.no_grad():
                return run(*args)
        out = run(*args)
        if not grad_out:  # built on the first call only (its cost is part of first_call_ms)
            grad_out.append(torch.randn_like(out))
        out.backward(grad_out[0])
        return out

    return Workload(module, args, step, zero_grads, grad_out)


def _run_point(point: Point, settings: Settings, budget: _Budget, record: dict, state: dict) -> None:
    import torch

    device = point.device
    _warm_device(device)
    work = build_workload(point, settings.seed)
    module, args, step, zero_grads, grad_out = work.module, work.args, work.step, work.zero_grads, work.grad_out
    state["module"], state["args"] = module, args
    if len(args) > 3:
        record["context_height"], record["context_width"] = args[3]
    record["params"] = sum(p.numel() for p in module.parameters())

    # First call: compile, autotune, mask and table building all land here.
    _sync(device)
    t0 = time.perf_counter()
    out = step()
    _sync(device)
    record["first_call_ms"] = (time.perf_counter() - t0) * 1e3
    if not bool(torch.isfinite(out.detach()).all()):
        raise FloatingPointError("output has NaN or Inf values")
    del out
    budget.check("first call")

    # A warm call estimates the per-call cost for the budget and the repetition count.
    zero_grads()
    _sync(device)
    t0 = time.perf_counter()
    step()
    _sync(device)
    per_call_s = time.perf_counter() - t0
    budget.check("warm call")
    if per_call_s * (settings.min_samples + 1) > budget.remaining():
        raise PointTimeout(
            f"one call takes {per_call_s:.2f} s; {settings.min_samples} samples do not fit the "
            f"{budget.remaining():.1f} s left of the {budget.limit_s:g} s per-point limit"
        )

    # Peak memory above the baseline: module, inputs and upstream gradient built, grads None.
    zero_grads()
    if device.startswith("cuda"):
        gc.collect()  # cycles holding device memory would move the baseline
    tensors = list(module.parameters()) + list(module.buffers()) + [a for a in args if isinstance(a, torch.Tensor)]
    tensors += grad_out
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        record["peak_bytes"] = int(torch.cuda.max_memory_allocated(device) - baseline)
        record["baseline_bytes"] = int(baseline)
        record["reserved_bytes"] = int(torch.cuda.max_memory_reserved(device))
        record["memory_method"] = CUDA_MEMORY_METHOD
    else:
        record["peak_bytes"] = int(_cpu_peak_bytes(step))
        record["baseline_bytes"] = _tensor_bytes(tensors)
        record["reserved_bytes"] = None
        record["memory_method"] = CPU_MEMORY_METHOD
    budget.check("memory measurement")

    # Latency.
    zero_grads()
    if device.startswith("cuda"):
        times_ms = _cuda_times(step, zero_grads, device, per_call_s, settings, budget)
        record["timing_method"] = "cuda events, L2 flushed and grads set to None before each repetition"
    else:
        times_ms = _cpu_times(step, zero_grads, per_call_s, settings, budget)
        record["timing_method"] = f"torch.utils.benchmark.Timer.blocked_autorange, {torch.get_num_threads()} threads"
    med = _quantile(times_ms, 0.5)
    record["latency_ms_median"] = med
    record["latency_ms_p20"] = _quantile(times_ms, 0.2)
    record["latency_ms_p80"] = _quantile(times_ms, 0.8)
    record["samples"] = len(times_ms)
    record["noisy"] = bool(
        med > 0 and (record["latency_ms_p80"] - record["latency_ms_p20"]) / med > settings.noisy_spread
    )
    budget.check("timing")

    if settings.count_flops:
        record.update(_count_macs(point, module, args))
    else:
        context_hw = args[3] if len(args) > 3 else None
        analytic = int(module.macs(point.batch, point.hw, context_hw))
        record.update(
            macs=analytic,
            analytic_macs=analytic,
            counted_macs=None,
            macs_uncovered=None,
            backward_macs=None,
            macs_error=None,
        )


def _cpu_times(
    step: Callable[[], Any], zero_grads: Callable[[], None], per_call_s: float, settings: Settings, budget: _Budget
) -> list[float]:
    import torch
    from torch.utils.benchmark import Timer

    def rep() -> None:
        zero_grads()
        step()

    run_time = max(per_call_s * settings.min_samples, min(settings.cpu_min_run_time, budget.remaining() * 0.5))
    timer = Timer(stmt="rep()", globals={"rep": rep}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=run_time)
    times = [t * 1e3 for t in m.times]
    while len(times) < settings.min_samples and budget.remaining() > 2 * per_call_s:
        times.append(timer.timeit(1).median * 1e3)
    return times


def _cuda_times(
    step: Callable[[], Any],
    zero_grads: Callable[[], None],
    device: str,
    per_call_s: float,
    settings: Settings,
    budget: _Budget,
) -> list[float]:
    """CUDA-event timing as triton.testing.do_bench does it, with the sample count kept."""
    import torch

    per_call_ms = max(per_call_s * 1e3, 1e-3)
    fit = int(budget.remaining() * 0.5 * 1e3 / per_call_ms)
    n_rep = max(settings.min_samples, min(settings.max_samples, int(settings.cuda_rep_ms / per_call_ms), fit))
    n_warm = max(1, min(int(settings.cuda_warmup_ms / per_call_ms), fit // 4))
    # A buffer larger than any L2 (256 MB); zeroing it evicts the previous call's data.
    cache = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device) if settings.flush_l2 else None
    for _ in range(n_warm):
        zero_grads()
        step()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for i in range(n_rep):
        zero_grads()
        if cache is not None:
            cache.zero_()
        starts[i].record()
        step()
        ends[i].record()
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
