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
from collections import Counter
from collections.abc import Callable, Generator, Iterator
from typing import Any

from .points import Point, point_reasons
from .store import MemoryMethod

CPU_MEMORY_METHOD = MemoryMethod.CPU_PROFILER
CUDA_MEMORY_METHOD = MemoryMethod.CUDA_ALLOCATOR
DEFAULT_THREADS = 1  # one thread: on a shared CPU, spinning intra-op threads make latency erratic


@dataclasses.dataclass
class Settings:
    """How points are measured (the same for every point of a sweep; not part of point_id)."""

    timeout_s: float = 120.0
    # CPU: seconds of timing per point, split over its rounds (blocks of calls timed by time.perf_counter).
    cpu_min_run_time: float = 0.2
    # CUDA: warm-up and timed milliseconds per point (as triton.testing.do_bench).
    cuda_warmup_ms: float = 25.0
    cuda_rep_ms: float = 100.0
    # CUDA: at most this many seconds of warm-up calls per point until the call time settles (an idle GPU
    # starts at low clocks); the SM clock is recorded after it (bench.gpu_timing).
    cuda_settle_s: float = 2.0
    min_samples: int = 3
    max_samples: int = 1000
    # (p80 - p20) / median above this flags the point as noisy.
    noisy_spread: float = 0.25
    # CPU threads (torch.set_num_threads), recorded: a fixed default, not the machine's core count.
    threads: int | None = DEFAULT_THREADS
    # torch.compile backend of --compile points and of compiled flex attention.
    compile_backend: str = "inductor"
    # Timing rounds per point: its samples are taken in this many slots, each between two calibration
    # probes; in-process, slots of up to ``interleave`` points (holding at most ``interleave_mib`` of
    # tensors between slots) are taken in rotation, so a load burst lands on one slot of several points
    # rather than on all of one point's samples. Compiled and flex points are timed on their own.
    rounds: int = 3
    interleave: int = 48
    interleave_mib: float = 2048.0
    # A slot is contended when its calibration probe (the slower of the two around it) is more than
    # probe_margin over the sweep's reference; its samples are left out and the slot taken again, at
    # most ``remeasure`` more slots per point. A point with fewer than half its rounds clean is stored
    # contended. Noisy: the 95% interval of the median wider than median_ci_bound of it, or the p20-p80
    # spread over noisy_spread.
    probe_margin: float = 0.15
    median_ci_bound: float = 0.1
    remeasure: int = 6
    # CUDA: launch_bound when the host time per call is at least this fraction of the device time.
    launch_bound_fraction: float = 0.5
    count_flops: bool = True
    flush_l2: bool = True
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Target:
    """How a module given to :func:`measure_module` runs: what the probes read from a sweep point."""

    device: str = "cpu"
    dtype: str = "float32"
    pass_: str = "fwd"  # "fwd" (under no_grad, eval mode) or "fwd+bwd" (train mode, parameter gradients)
    compile: bool = False
    impl: str = "module"


Runs = Point | Target  # what the probes need: device, dtype, pass_, compile, impl


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
    """A point's own time: paused while other points' slots are timed between its own."""

    def __init__(self, limit_s: float, clock: Callable[[], float]):
        self.limit_s = limit_s
        self.clock = clock
        self.start = clock()
        self.used = 0.0
        self.running = True

    def elapsed(self) -> float:
        return self.used + (self.clock() - self.start if self.running else 0.0)

    def pause(self) -> None:
        self.used, self.running = self.elapsed(), False

    def resume(self) -> None:
        self.start, self.running = self.clock(), True

    def remaining(self) -> float:
        return self.limit_s - self.elapsed()

    def check(self, what: str) -> None:
        if self.elapsed() > self.limit_s:
            raise PointTimeout(
                f"{what}: {self.elapsed():.1f} s elapsed, over the per-point limit of {self.limit_s:g} s"
            )


_FLOP_CACHE: dict[tuple, dict[str, Any]] = {}


def _count_macs(point: Point, module: Any, args: tuple) -> dict[str, Any]:
    """MACs of one forward call (and, for fwd+bwd points, of the backward) with bench.flops.

    Counted once per configuration: the pass is not part of the cache key (a
    forward's count does not depend on the pass timed), so the backward is
    counted with it and kept only in fwd+bwd records. A counter that fails leaves
    the analytic count in ``macs`` and says why in ``macs_error``; the point's
    measurements stand.
    """
    key: tuple = (point.mechanism, point.knobs, point.hw, point.batch, point.dim, point.heads, point.cross)
    key += (point.impl, point.device, point.dtype)
    if key not in _FLOP_CACHE:
        from . import flopcache

        cached = flopcache.load(key)  # counted by this code revision before (bench.flopcache)
        if cached is None:
            cached = _count_config(module, args, point)
            if cached["macs_error"] is None:  # a counter's failure is told, never remembered
                flopcache.save(key, cached)
        _FLOP_CACHE[key] = cached
    out = dict(_FLOP_CACHE[key])
    if point.pass_ != "fwd+bwd":
        out["backward_macs"] = None
    return out


def _count_config(module: Any, args: tuple, point: Point) -> dict[str, Any]:
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

        r = count(module, args, backward=True)
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
    return out


def measure(point: Point, settings: Settings | None = None, clock: Callable[[], float] = time.perf_counter) -> dict:
    """Measure one point, its timing rounds back to back, and return its full record (never raises
    for a failing point). ``bench.interleave`` takes several points' rounds in rotation instead."""
    steps = measure_steps(point, settings, clock)
    while True:
        try:
            with strict(point):
                next(steps)
        except StopIteration as done:
            record: dict[str, Any] = done.value
            return record


@contextlib.contextmanager
def strict(point: Point | None = None) -> Iterator[None]:
    """Dynamo raises on a recompile limit hit (the point becomes an error) instead of running eager
    silently. Entered by whoever advances ``measure_steps``, around each step, so that points whose
    steps are interleaved never restore each other's settings out of order. Given an eager point
    (neither compiled nor flex) while Dynamo is not imported, it imports nothing: such a point never
    compiles, and importing Dynamo costs about 1.5 s."""
    if point is not None and not timed_alone(point) and "torch._dynamo" not in sys.modules:
        yield
        return
    from attnbench.attentions.kernels import strict_dynamo

    with strict_dynamo():
        yield


def measure_steps(
    point: Point, settings: Settings | None = None, clock: Callable[[], float] = time.perf_counter
) -> Generator[int, None, dict]:
    """Measure one point in steps: the set-up (module, first call, memory, MACs) up to the first
    yield, then one timing slot per step. Each yield gives the bytes of tensors the point holds
    while it waits; its time budget is paused meanwhile. Returns the record (never raises for a
    failing point). Advance it inside :func:`strict`."""

    def body(settings: Settings, budget: _Budget, record: dict, state: dict) -> Generator[int, None, None]:
        reasons = precheck(point)
        if reasons:
            record.update(status="skipped", reason="; ".join(reasons))
            return
        yield from _run_point(point, settings, budget, record, state)

    return (yield from _steps(point, {**point.to_json(), "status": "ok", "reason": None}, body, settings, clock))


def measure_module(
    module: Any,
    inputs: tuple,
    settings: Settings | None = None,
    *,
    pass_: str = "fwd",
    macs: int | None = None,
    timing: bool = True,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Any]:
    """Measure any module on its inputs with the sweep's probes: the one public way to time a module or
    read its peak memory (sweep points, experiment cost rows, the matcher's stack, training rows).

    ``module`` and the tensors of ``inputs`` are on the device to measure and in the dtype to measure.
    ``pass_``: ``"fwd"`` runs ``module(*inputs)`` under no_grad in eval mode; ``"fwd+bwd"`` runs it in
    train mode and back-propagates a fixed random output gradient into the parameters (as a training
    step does; the inputs get no gradient). ``macs``: the call's multiply-adds if the caller knows them,
    else they are counted by ``bench.flops`` (``macs_error`` says why when that fails). ``timing``:
    False keeps the first call, memory and MACs and leaves the timing rounds out.

    Returns the measurement fields of a record, as a sweep point has them: ``status`` (ok, oom, error,
    timeout: never raises for a module that fails), latency samples in rounds between calibration
    probes with their summary, ``contended`` and ``noisy``, peak memory with its ``memory_method``,
    first-call time, provenance, host time, overhead, threads, load average, wall time.
    """
    import torch

    if pass_ not in ("fwd", "fwd+bwd"):
        raise ValueError(f"pass_ must be 'fwd' or 'fwd+bwd', got {pass_!r}")
    tensors = [a for a in inputs if isinstance(a, torch.Tensor)]
    floats = [t for t in [*tensors, *module.parameters()] if t.is_floating_point()]
    device = str(tensors[0].device) if tensors else "cpu"
    dtype = str(floats[0].dtype).removeprefix("torch.") if floats else "float32"
    target = Target(device=device, dtype=dtype, pass_=pass_)
    train = pass_ == "fwd+bwd"
    module.train(train)
    step, grad_out = _make_step(module, tuple(inputs), train)
    params = [p for p in module.parameters() if p.requires_grad]

    def zero_grads() -> None:
        for t in params:
            t.grad = None

    work = Workload(module, tuple(inputs), step, zero_grads, grad_out)

    def counted() -> dict[str, Any]:
        out: dict[str, Any] = {"macs": macs, "macs_uncovered": None, "macs_error": None}
        if macs is None and (settings is None or settings.count_flops):
            try:
                from .flops import count

                r = count(module, tuple(inputs), flop_counter=False, backward=False)
                out.update(macs=int(r.macs), macs_uncovered=dict(r.uncovered or {}))
            except Exception as exc:  # a count that fails leaves the measurement standing
                out["macs_error"] = f"{type(exc).__name__}: {exc}"[:500]
        return out

    def body(settings: Settings, budget: _Budget, record: dict, state: dict) -> Generator[int, None, None]:
        from .provenance import CompileWatch

        _warm_device(device)
        watch = CompileWatch(settings.compile_backend, reset=False)
        yield from _probes(target, work, settings, budget, record, watch, counted, timing_rounds=timing)

    record = {"status": "ok", "reason": None, "device": device, "dtype": dtype, "pass": pass_}
    steps = _steps(target, record, body, settings, clock)
    while True:
        try:
            with strict():
                next(steps)
        except StopIteration as done:
            work.zero_grads()
            result: dict[str, Any] = done.value
            return result


def _steps(
    target: Runs,
    record: dict[str, Any],
    body: Callable[[Settings, _Budget, dict, dict], Generator[int, None, None]],
    settings: Settings | None,
    clock: Callable[[], float],
) -> Generator[int, None, dict]:
    """Run ``body`` (the probes, yielding before each timing slot) for one target: threads set and
    recorded, the time budget, the device's name; every failure becomes the record's status (a failed
    record keeps no number), and the load average, wall time and finishing time are added."""
    import torch

    settings = settings or Settings()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    record["threads"] = torch.get_num_threads()
    budget = _Budget(settings.timeout_s, clock)
    device = target.device
    state: dict[str, Any] = {}
    try:
        if device.startswith("cuda") and torch.cuda.is_available():
            record["device_name"] = torch.cuda.get_device_name(device)
        else:
            from .env import cpu_model

            record["device_name"] = cpu_model()
        from attnbench.attentions.kernels import recompile_limit_error

        from .provenance import LabelMismatch

        state["record_keys"] = set(record)
        try:
            yield from body(settings, budget, record, state)
        except recompile_limit_error() as exc:
            raise LabelMismatch(
                "torch.compile hit Dynamo's recompile limit; torch would have run this point eager under the "
                f"compiled label ({exc})"
            ) from exc
    except PointTimeout as exc:
        record.update(status="timeout", reason=str(exc))
    except Exception as exc:
        status = "oom" if is_oom(exc) else "error"
        record.update(status=status, reason=f"{type(exc).__name__}: {exc}".strip()[:2000])
    finally:
        if record["status"] != "ok" and "record_keys" in state:  # no number is stored under a failed label
            for key in set(record) - state["record_keys"]:
                del record[key]
        state.clear()
        if device.startswith("cuda") and torch.cuda.is_available():
            gc.collect()
            torch.cuda.empty_cache()
        record["load_avg"] = _load_avg()
        record["wall_s"] = round(budget.elapsed(), 4)
        record["finished_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return record


def timed_alone(point: Point) -> bool:
    """Points whose rounds are never interleaved with other points': a compiled point (Dynamo is
    reset for each) and flex attention (one compiled kernel per process, its cache limited)."""
    return bool(point.compile) or point.impl == "flex"


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
    flex_paths: tuple = ()  # flex attention's path counts before and after the profiled step


def _make_step(run: Callable[..., Any], args: tuple, train: bool) -> tuple[Callable[[], Any], list]:
    """One call of a pass: ``fwd`` under no_grad; ``fwd+bwd`` backward from a fixed random
    output gradient, made on the first call. Returns the step and the gradient's holder."""
    import torch

    grad_out: list[Any] = []

    def step() -> Any:
        if not train:
            with torch.no_grad():
                return run(*args)
        out = run(*args)
        outs = _tensors(out)  # a module may return several tensors (a matcher's two maps)
        if not grad_out:  # built on the first call only (its cost is part of first_call_ms)
            grad_out.extend(torch.randn_like(t) for t in outs)
        backward_from(outs, grad_out)
        return out

    return step, grad_out


def backward_from(outs: tuple | list, grads: list) -> None:
    """``torch.autograd.backward(outs, grads)`` without its Python checks of each gradient against its output
    (shape, dtype, device: they hold by construction here, every gradient being ``randn_like`` its output),
    by the engine call that ``backward`` ends in. Those checks cost a few microseconds inside every timed
    fwd+bwd call, and their first use imports sympy (0.4 s of a sweep). A torch without that private entry
    point takes ``torch.autograd.backward``."""
    import torch

    run = getattr(torch.autograd.graph, "_engine_run_backward", None)
    if run is None or len(outs) != len(grads):
        torch.autograd.backward(outs, grads)
        return
    # retain_graph, create_graph, inputs, allow_unreachable, accumulate_grad: as backward() passes them
    run(tuple(outs), tuple(grads), False, False, (), allow_unreachable=True, accumulate_grad=True)


def _tensors(out: Any) -> list[Any]:
    """The tensors of a module's output: itself, or those of a tuple or list."""
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for t in out if isinstance(t, torch.Tensor)]
    raise TypeError(f"a measured module must return a tensor or a tuple of tensors, not {type(out).__name__}")


def build_workload(point: Point, seed: int = 0, compile_backend: str = "inductor") -> Workload:
    """Build a point's module (compiled if asked) and inputs on its device, in its dtype.

    ``step()`` runs the pass once (``fwd`` under no_grad; ``fwd+bwd`` backward from a
    fixed random output gradient, made on the first call) and returns the output;
    ``zero_grads()`` sets every gradient to None, as between repetitions.
    """
    import torch

    from attnbench import attentions

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
    run = torch.compile(module, backend=compile_backend) if point.compile else module
    leaves = [p for p in module.parameters() if p.requires_grad] + [
        a for a in args if isinstance(a, torch.Tensor) and a.requires_grad
    ]

    def zero_grads() -> None:
        for t in leaves:
            t.grad = None

    step, grad_out = _make_step(run, args, train)
    return Workload(module, args, step, zero_grads, grad_out)


def _run_point(
    point: Point, settings: Settings, budget: _Budget, record: dict, state: dict
) -> Generator[int, None, None]:
    """The point's probes in order; each fills its part of the record. Yields before each timing slot."""
    from .provenance import CompileWatch

    _warm_device(point.device)
    # Dynamo is reset only where --compile asks for a fresh graph: compiled flex kernels are kept across points
    watch = CompileWatch(settings.compile_backend, reset=bool(point.compile))
    work = build_workload(point, settings.seed, settings.compile_backend)
    state["module"], state["args"] = work.module, work.args
    if len(work.args) > 3:
        record["context_height"], record["context_width"] = work.args[3]
    yield from _probes(point, work, settings, budget, record, watch, lambda: _macs(point, work, settings))


def _probes(
    point: Runs,
    work: Workload,
    settings: Settings,
    budget: _Budget,
    record: dict,
    watch: Any,
    macs: Callable[[], dict[str, Any]],
    timing_rounds: bool = True,
) -> Generator[int, None, None]:
    """The probes of one workload in order, each filling its part of the record: parameters, first call,
    warm call, memory (with the profiled step's ops), MACs, the timing slots (yielding before each),
    provenance, host time and the empty call's overhead. Shared by sweep points and measure_module."""
    from . import gpu_timing

    device = point.device
    record["params"] = sum(p.numel() for p in work.module.parameters())
    if point.impl == "flex":  # its compile in a column of its own, outside the per-point limit
        record.update(gpu_timing.first_call_outside_budget(lambda: _first_call(work, device), budget))
    else:
        record["first_call_ms"] = _first_call(work, device)
    budget.check("first call")
    watch.checkpoint("first call")
    per_call_s = _warm_call(work, device, settings, budget)
    watch.checkpoint("warm call")
    record.update(gpu_timing.settle_column(point, work, settings.cuda_settle_s))
    names, memory = _ops_and_memory(work, device)
    record.update(memory)
    budget.check("memory measurement")
    record.update(macs())
    work.zero_grads()  # no gradients held while other points' slots run
    if not timing_rounds:
        record["provenance"] = _provenance(point, watch, names, work.flex_paths)
        return
    timing = _Timing(point, work, per_call_s, settings, budget)
    while timing.wants_more():
        budget.pause()
        yield int(memory["baseline_bytes"] or 0)
        budget.resume()
        timing.slot()
        work.zero_grads()
        budget.check("timing")
    record.update(timing.result())
    watch.checkpoint("end")
    record["provenance"] = _provenance(point, watch, names, work.flex_paths)
    record.update(_host(point, work, record, settings))
    record.update(gpu_timing.graph_column(point, work, record["launch_bound"]))  # CUDA-graph replay time
    record["overhead_ms"] = _overhead_ms(point, settings, budget)


def _macs(point: Point, work: Workload, settings: Settings) -> dict[str, Any]:
    """The MAC fields: counted (once per configuration) with ``count_flops``, else the analytic count."""
    if settings.count_flops:
        return _count_macs(point, work.module, work.args)
    context_hw = work.args[3] if len(work.args) > 3 else None
    analytic = int(work.module.macs(point.batch, point.hw, context_hw))
    return {
        "macs": analytic,
        "analytic_macs": analytic,
        "counted_macs": None,
        "macs_uncovered": None,
        "backward_macs": None,
        "macs_error": None,
    }


def _first_call(work: Workload, device: str) -> float:
    """Milliseconds of the first call: compile, autotune, mask and table building all land here."""
    import torch

    _sync(device)
    t0 = time.perf_counter()
    out = work.step()
    _sync(device)
    ms = (time.perf_counter() - t0) * 1e3
    if not all(bool(torch.isfinite(t.detach()).all()) for t in _tensors(out)):
        raise FloatingPointError("output has NaN or Inf values")
    return ms


def _warm_call(work: Workload, device: str, settings: Settings, budget: _Budget) -> float:
    """Seconds of one warm call: the per-call estimate for the budget and the repetition count."""
    work.zero_grads()
    _sync(device)
    t0 = time.perf_counter()
    work.step()
    _sync(device)
    per_call_s = time.perf_counter() - t0
    budget.check("warm call")
    if per_call_s * (settings.min_samples + 1) > budget.remaining():
        raise PointTimeout(
            f"one call takes {per_call_s:.2f} s; {settings.min_samples} samples do not fit the "
            f"{budget.remaining():.1f} s left of the {budget.limit_s:g} s per-point limit"
        )
    return per_call_s


def cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak of the running sum of CPU allocator events during one call of ``fn`` (the CPU memory probe)."""
    from .provenance import profile_ops

    return profile_ops(fn, memory=True)[1]


def _ops_and_memory(work: Workload, device: str) -> tuple[Any, dict[str, Any]]:
    """One profiled step (its op names feed the provenance) and the peak memory above the
    baseline: module, inputs and upstream gradient built, grads None. On the CPU the
    profiled step is the memory probe; on CUDA the allocator's peak counter is."""
    import torch
    from attnbench.attentions.kernels import flex

    from .provenance import profile_ops

    work.zero_grads()
    cuda = device.startswith("cuda")
    if cuda:
        gc.collect()  # cycles holding device memory would move the baseline
    tensors = list(work.module.parameters()) + list(work.module.buffers())
    tensors += [a for a in work.args if isinstance(a, torch.Tensor)] + work.grad_out
    paths = Counter(flex.PATHS)
    names, cpu_peak = profile_ops(work.step, memory=not cuda)
    work.flex_paths = (paths, Counter(flex.PATHS))
    if not cuda:
        return names, {
            "peak_bytes": int(cpu_peak),
            "baseline_bytes": _tensor_bytes(tensors),
            "reserved_bytes": None,
            "memory_method": CPU_MEMORY_METHOD,
        }
    work.zero_grads()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    work.step()
    torch.cuda.synchronize(device)
    return names, {
        "peak_bytes": int(torch.cuda.max_memory_allocated(device) - baseline),
        "baseline_bytes": int(baseline),
        "reserved_bytes": int(torch.cuda.max_memory_reserved(device)),
        "memory_method": CUDA_MEMORY_METHOD,
    }


def _provenance(point: Runs, watch: Any, names: Any, flex_paths: tuple) -> dict[str, Any]:
    """The record's ``provenance``: SDPA backends and kernels of the profiled step, the
    compile counts of a --compile point, the flex paths; raises LabelMismatch where the
    label would lie."""
    from .provenance import flex_provenance, ops_provenance

    out = ops_provenance(names)
    out["compile"] = watch.provenance(names, "warm call", "end") if point.compile else None
    out["flex"] = flex_provenance(*flex_paths)
    return out


def _times(
    point: Runs,
    step: Callable[[], Any],
    zero_grads: Callable[[], None],
    per_call_s: float,
    settings: Settings,
    budget: _Budget,
    share: float = 1.0,
    timed: list[float] | None = None,
) -> list[float]:
    """Timing samples (ms per call) of ``share`` of the point's timing (one slot of its rounds);
    the seconds its timed regions took are appended to ``timed``."""
    if point.device.startswith("cuda"):
        return _cuda_times(step, zero_grads, point.device, per_call_s, settings, budget, share, timed)
    return _cpu_times(step, zero_grads, per_call_s, settings, budget, share, timed)


@dataclasses.dataclass
class _Slot:
    times: list[float]
    probe_ms: tuple[float, float]  # before and after the slot


class _Timing:
    """A point's timing in ``rounds`` slots, each between two calibration probes.

    A slot is contended when its probe (the slower of the two) is more than
    ``probe_margin`` over the sweep's reference (the lowest probe seen, judged
    when the point is done); it is taken again, at most ``remeasure`` more slots
    per point, while the time budget allows. The samples of the clean slots are
    kept; a point with fewer than half its rounds clean is stored ``contended``
    with every slot's samples and the evidence. ``noisy``: the kept samples'
    median 95% interval is wider than ``median_ci_bound`` of it, or their p20-p80
    spread is over ``noisy_spread``.
    """

    def __init__(self, point: Runs, work: Workload, per_call_s: float, settings: Settings, budget: _Budget):
        self.point, self.work, self.per_call_s = point, work, per_call_s
        self.settings, self.budget = settings, budget
        self.rounds = max(1, settings.rounds)
        self.slots: list[_Slot] = []
        self.slot_s = 0.0  # the longest slot so far, to tell whether another fits the budget
        self.timed: list[float] = []  # seconds of each timed region (block of calls) of every slot
        _reference(point.device, float("inf"))  # measured before the first slot on first use

    def _contended(self, slot: _Slot) -> bool:
        return max(slot.probe_ms) > _REFERENCE[_probe_key(self.point.device)] * (1 + self.settings.probe_margin)

    def wants_more(self) -> bool:
        taken = len(self.slots)
        if taken < self.rounds:
            return True
        clean = sum(not self._contended(s) for s in self.slots)
        if clean >= self.rounds or taken >= self.rounds + self.settings.remeasure:
            return False
        return self.budget.remaining() > 2 * self.slot_s

    def slot(self) -> None:
        device, work = self.point.device, self.work
        started = time.perf_counter()
        before = _recent_probe(device)
        per_call_s = self.per_call_s
        warm = WARM_CALLS if per_call_s < WARM_CALL_UNDER_S else 0
        for _ in range(warm):  # the probe and other points evicted this point's data: bring it back
            work.zero_grads()
            _sync(device)
            t0 = time.perf_counter()
            work.step()
            _sync(device)
            per_call_s = min(per_call_s, time.perf_counter() - t0)  # the slot's plan: one call can be slow
        share = 1 / self.rounds
        times = _times(
            self.point, work.step, work.zero_grads, per_call_s, self.settings, self.budget, share, self.timed
        )
        after = probe_ms(device)
        _LAST_PROBE[device] = (after, time.perf_counter())
        _reference(device, min(before, after))
        self.slots.append(_Slot(times, (before, after)))
        self.slot_s = max(self.slot_s, time.perf_counter() - started)

    def result(self) -> dict[str, Any]:
        import torch

        from . import samples

        flags = [self._contended(s) for s in self.slots]
        clean = [s for s, c in zip(self.slots, flags, strict=True) if not c]
        contended = len(clean) < math.ceil(self.rounds / 2)
        kept = self.slots if contended else clean
        times = [t for s in kept for t in s.times]
        spread, ci = samples.spread(times), samples.median_ci_width(times)
        wide = ci > self.settings.median_ci_bound
        reference = _REFERENCE[_probe_key(self.point.device)]
        if self.point.device.startswith("cuda"):
            method = "cuda events, L2 flushed and grads set to None before each repetition"
        else:
            method = f"time.perf_counter around blocks of calls, {torch.get_num_threads()} threads"
        method += f"; {len(kept)} round(s) between calibration probes"
        return {
            "latency_samples_ms": samples.compact(times),
            "latency_rounds": [len(s.times) for s in kept],
            **samples.summary(times),
            "noisy": spread > self.settings.noisy_spread or wide,
            "timing_method": method,
            "probe_ms": round(samples.quantile([max(s.probe_ms) for s in kept], 0.5), 4),
            # Seconds the timed regions of every slot took (contended slots' too): the part of the point's
            # wall time that measured anything; the sweep reports their sum as a share of its wall time.
            "timed_s": round(sum(self.timed), 6),
            "contended": contended,
            # The evidence wherever a slot was contended or the samples wide: the reference, the bounds
            # and every slot's probes and sample count.
            "contention": None
            if not (any(flags) or wide)
            else {
                "reference_ms": round(reference, 4),
                "probe_margin": self.settings.probe_margin,
                "median_ci_bound": self.settings.median_ci_bound,
                "median_ci": round(ci, 3),
                "slots": [
                    {"probe_ms": [round(v, 4) for v in s.probe_ms], "samples": len(s.times), "contended": c}
                    for s, c in zip(self.slots, flags, strict=True)
                ],
                "kept": [i for i, s in enumerate(self.slots) if s in kept],
            },
        }


# Untimed calls between a slot's first probe and its samples (the probe evicts the point's data from cache),
# for calls shorter than WARM_CALL_UNDER_S: a longer call streams its working set through the caches many
# times over, so a cold first touch is a negligible part of it, and its warm call would cost as much as a
# sample (at 64x64, fwd+bwd calls of 0.3 to 2 s made these calls a quarter of the quick sweep's wall time).
WARM_CALLS = 1
WARM_CALL_UNDER_S = 0.05
# The calibration probe: a fixed small kernel, timed around every point.
PROBE_SIZE = {"cpu": 96, "cuda": 2048}
PROBE_CALLS, PROBE_BLOCKS = 5, 5
_REFERENCE: dict[tuple, float] = {}  # the lowest probe of this process per (device, threads): the sweep's reference
_PROBE_INPUT: dict[str, Any] = {}  # the probe's matrix per device, made once


def _probe_key(device: str) -> tuple:
    import torch

    return (device, torch.get_num_threads())


def probe_ms(device: str) -> float:
    """Milliseconds of the calibration kernel (an n x n float32 matmul and softmax):
    the median of ``PROBE_BLOCKS`` blocks of ``PROBE_CALLS`` calls."""
    import torch

    if device not in _PROBE_INPUT:
        n = PROBE_SIZE["cuda" if device.startswith("cuda") else "cpu"]
        _PROBE_INPUT[device] = torch.randn(n, n, generator=torch.Generator().manual_seed(0)).to(device)
    a = _PROBE_INPUT[device]
    (a @ a).softmax(-1)
    blocks = []
    for _ in range(PROBE_BLOCKS):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(PROBE_CALLS):
            (a @ a).softmax(-1)
        _sync(device)
        blocks.append((time.perf_counter() - t0) * 1e3 / PROBE_CALLS)
    from .samples import quantile

    return quantile(blocks, 0.5)


# A probe taken at most this many seconds ago, with nothing run since (the interleaved rotation goes
# from one point's slot straight to the next one's), stands as the next slot's first probe.
PROBE_REUSE_S = 2e-3
_LAST_PROBE: dict[str, tuple[float, float]] = {}  # device: (the last slot's closing probe in ms, when it ended)


def _recent_probe(device: str) -> float:
    """The slot's opening probe: the previous slot's closing probe if it ended within
    ``PROBE_REUSE_S`` (back to back: the same state of the machine), else a new one."""
    last = _LAST_PROBE.pop(device, None)
    if last is not None and time.perf_counter() - last[1] <= PROBE_REUSE_S:
        return last[0]
    return probe_ms(device)


def _reference(device: str, latest: float) -> float:
    """The sweep's reference probe: on first use the lowest of three probes, then the lowest seen."""
    key = _probe_key(device)
    if key not in _REFERENCE:
        _REFERENCE[key] = min(probe_ms(device) for _ in range(3))
    _REFERENCE[key] = min(_REFERENCE[key], latest)
    return _REFERENCE[key]


def _host(point: Runs, work: Workload, record: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Host time per call next to the device time. CUDA: calls issued back to back, timed on
    the host before the final synchronize; launch_bound when that is at least
    ``launch_bound_fraction`` of the device median. CPU: host and device are one, so the
    host time is the latency and launch_bound does not apply (None)."""
    median = record["latency_ms_median"]
    if not point.device.startswith("cuda"):
        return {"host_ms_per_call": median, "launch_bound": None}
    n = max(1, min(20, int(record["samples"])))
    _sync(point.device)
    t0 = time.perf_counter()
    for _ in range(n):
        work.zero_grads()
        work.step()
    host = (time.perf_counter() - t0) * 1e3 / n
    _sync(point.device)
    return {"host_ms_per_call": host, "launch_bound": bool(host >= settings.launch_bound_fraction * median)}


_OVERHEAD: dict[tuple, float] = {}


def _overhead_ms(point: Runs, settings: Settings, budget: _Budget) -> float:
    """Median latency of an empty module's call (one view of a tiny input), with the point's
    timer, device, dtype and pass; measured once per process and (device, dtype, pass, threads)."""
    import torch

    from .samples import quantile

    key = (*_probe_key(point.device), point.dtype, point.pass_)
    if key not in _OVERHEAD:
        train = point.pass_ == "fwd+bwd"
        x = torch.zeros(1, 8, device=point.device, dtype=_dtype(point.dtype), requires_grad=train)
        step, _ = _make_step(lambda t: t.view_as(t), (x,), train)

        def zero() -> None:
            x.grad = None

        step()
        _sync(point.device)
        t0 = time.perf_counter()
        step()
        _sync(point.device)
        per_call_s = max(time.perf_counter() - t0, 1e-7)
        _OVERHEAD[key] = quantile(_times(point, step, zero, per_call_s, settings, budget), 0.5)
    return _OVERHEAD[key]


def _load_avg() -> list[float] | None:
    """The OS's 1, 5 and 15 minute load averages, where it gives them."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


# Samples on the CPU are blocks of calls at least this long (one call where a call is longer): short, so
# that a time slice lost to another process lands on few samples and leaves the median alone.
CPU_SAMPLE_S = 2e-4


def block_seconds(step: Callable[[], Any], zero_grads: Callable[[], None], number: int) -> float:
    """The CPU timer: seconds of one block of ``number`` calls (gradients set to None before each), read
    with ``time.perf_counter`` around a plain loop. Every CPU sample of the harness is one such block;
    ``scripts/fast_ratios.py`` times its interleaved A/B blocks with it too."""
    t0 = time.perf_counter()
    for _ in range(number):
        zero_grads()
        step()
    return time.perf_counter() - t0


def _cpu_times(
    step: Callable[[], Any],
    zero_grads: Callable[[], None],
    per_call_s: float,
    settings: Settings,
    budget: _Budget,
    share: float = 1.0,
    timed: list[float] | None = None,
) -> list[float]:
    """Milliseconds per call, one sample per block of calls, about ``share`` of ``cpu_min_run_time``
    (the count planned from ``per_call_s``, the loop stopped at that much wall time), at least
    ``share`` of ``min_samples``. Each block is timed with ``time.perf_counter`` around a plain loop
    of calls (each call after setting the gradients to None); no untimed call runs here (the slot's
    one warm call precedes the samples). The seconds of the timed blocks are appended to ``timed``."""
    per_call_s = max(per_call_s, 1e-7)
    least = max(1, math.ceil(settings.min_samples * share))
    run_time = max(per_call_s * least, min(settings.cpu_min_run_time * share, budget.remaining() * 0.5))
    number = max(1, int(CPU_SAMPLE_S / per_call_s))
    n = max(least, min(settings.max_samples, int(run_time / (number * per_call_s))))
    times: list[float] = []
    clock = time.perf_counter
    total = 0.0
    deadline = clock() + run_time  # wall-bounded too: a loaded machine stretches every call
    for _ in range(n):
        block = block_seconds(step, zero_grads, number)
        total += block
        times.append(block * 1e3 / number)  # one block: its time per call
        if len(times) >= least and (clock() > deadline or budget.remaining() < 2 * per_call_s * number):
            break
    if timed is not None:
        timed.append(total)
    return times


def _cuda_times(
    step: Callable[[], Any],
    zero_grads: Callable[[], None],
    device: str,
    per_call_s: float,
    settings: Settings,
    budget: _Budget,
    share: float = 1.0,
    timed: list[float] | None = None,
) -> list[float]:
    """CUDA-event timing as triton.testing.do_bench does it, with the sample count kept: ``share``
    of the warm-up and of the repetitions (one slot of the point's rounds)."""
    import torch

    per_call_ms = max(per_call_s * 1e3, 1e-3)
    fit = int(budget.remaining() * 0.5 * 1e3 / per_call_ms)
    least = max(1, math.ceil(settings.min_samples * share))
    n_rep = max(least, min(settings.max_samples, int(settings.cuda_rep_ms * share / per_call_ms), fit))
    n_warm = max(1, min(int(settings.cuda_warmup_ms * share / per_call_ms), fit // 4))
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
    times = [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
    if timed is not None:
        timed.append(sum(times) / 1e3)
    return times
