"""What actually ran at a point: SDPA backends, custom kernels, torch.compile graphs, flex paths.

Each probe returns a JSON-able part of the record's ``provenance`` object and is
taken once per point, outside the timed loop:

- :func:`profile_ops` runs one step under the profiler (CPU activity only; the
  op names are recorded on the host whatever the device) and counts the ops;
  :func:`ops_provenance` turns the counts into the SDPA backends that served the
  attention calls and the custom kernel ops (Triton) that ran.
- :class:`CompileWatch` compiles a module for one point on a fresh Dynamo cache
  and says how many frames and graphs were compiled, the recompiles and graph
  breaks, and whether a compiled region ran in the profiled step.
- flex attention counts its own calls by path (``attentions.kernels.flex.PATHS``).

A point whose label would lie raises :class:`LabelMismatch`; the measurement
stores it as ``error`` with a reason that says what ran instead.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

# Profiler op name of each SDPA kernel (the forward), as torch's dispatcher names them.
SDPA_BACKENDS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "cpu_flash",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_attention_math_for_mps": "math",
}
SDPA_ENTRY = "aten::scaled_dot_product_attention"
# Namespace of attnbench's custom ops (the Triton kernels of attentions/kernels).
KERNEL_NAMESPACE = "attnbench::"
COMPILED_REGION = "Torch-Compiled Region"


class LabelMismatch(RuntimeError):
    """What ran differs from what the point's label says."""


def profile_ops(step: Callable[[], Any], *, memory: bool = False) -> tuple[Counter[str], int]:
    """Op-name counts of one call of ``step`` and, with ``memory``, the peak of the running
    sum of CPU allocator events during it (the CPU memory probe shares this profile).

    The Kineto profiler is entered through ``torch.autograd.profiler.profile``, the object that
    ``torch.profiler.profile`` wraps, with the same CPU activity and memory events: the wrapper asks
    ``hasattr(torch, "_inductor")`` on every start, which imports inductor and Dynamo (about 1 s) in
    a process that compiles nothing."""
    from torch.autograd.profiler import profile

    from .measure import _quiet_stderr

    with _quiet_stderr(), profile(use_cpu=True, use_kineto=True, profile_memory=memory) as prof:
        step()
    names: Counter[str] = Counter()
    running = peak = 0
    events = prof.kineto_results.events()  # type: ignore[union-attr]
    if memory:
        mem = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
        for e in mem:
            running += e.nbytes()
            peak = max(peak, running)
    for e in events:
        name = e.name()
        if name != "[memory]":
            names[name.split(":")[0].strip() if name.startswith(COMPILED_REGION) else name] += 1
    return names, peak


def ops_provenance(names: Counter[str]) -> dict[str, Any]:
    """``sdpa``: calls per SDPA backend in one step ({} where no SDPA ran; under torch.compile
    a backend is seen only where the compiled code calls the kernel); ``kernels``: calls of
    attnbench's custom kernel ops."""
    sdpa: Counter[str] = Counter()
    for op, backend in SDPA_BACKENDS.items():
        if names.get(op):
            sdpa[backend] += names[op]
    calls = names.get(SDPA_ENTRY, 0)
    if calls > sum(sdpa.values()):  # an entry whose kernel the profiler did not name
        sdpa["unnamed"] = calls - sum(sdpa.values())
    kernels = {n: c for n, c in sorted(names.items()) if n.startswith(KERNEL_NAMESPACE)}
    return {"sdpa": dict(sdpa), "kernels": kernels}


def _dynamo_counts() -> dict[str, int]:
    if "torch._dynamo" not in sys.modules:  # nothing compiled yet: its counters would start at zero
        return {"frames": 0, "graphs": 0, "graph_breaks": 0}
    from torch._dynamo.utils import counters

    return {
        "frames": int(counters["frames"]["ok"]),
        "graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }


class CompileWatch:
    """torch.compile for one point, on an empty Dynamo cache (``reset``), with what it compiled counted.

    Every mechanism shares the frame ``Attention.forward``; without the reset,
    the ninth (mechanism, pass, shape) of a process would hit Dynamo's recompile
    limit and run eager. ``checkpoint(name)`` snapshots Dynamo's counters.
    """

    def __init__(self, backend: str, reset: bool = True):
        # A --compile point resets Dynamo; other points keep what is compiled (flex attention's kernels). Dynamo
        # not imported: nothing was compiled, and an eager point needs none.
        if reset and "torch._dynamo" in sys.modules:
            sys.modules["torch._dynamo"].reset()
        self.backend = backend
        self.marks: dict[str, dict[str, int]] = {"start": _dynamo_counts()}

    def compile(self, module: Any) -> Any:
        import torch

        return torch.compile(module, backend=self.backend)

    def checkpoint(self, name: str) -> None:
        self.marks[name] = _dynamo_counts()

    def _since(self, a: str, b: str, key: str) -> int:
        return self.marks[b][key] - self.marks[a][key]

    def provenance(self, names: Counter[str], warm: str, end: str) -> dict[str, Any]:
        """The record's ``provenance.compile``; raises LabelMismatch when no compiled region ran in the
        profiled step, or when it recompiled after the warm-up call (the timed calls would hold compilation).
        ``frames_compiled`` and ``graphs`` count the first and warm-up calls (a first call that fills
        a module's cache may make the second recompile once)."""
        out = {
            "backend": self.backend,
            "frames_compiled": self._since("start", warm, "frames"),
            "graphs": self._since("start", warm, "graphs"),
            "graph_breaks": self._since("start", end, "graph_breaks"),
            "recompiles": self._since(warm, end, "frames"),
            "compiled_regions_per_step": int(names.get(COMPILED_REGION, 0)),
        }
        if out["compiled_regions_per_step"] == 0:
            raise LabelMismatch(
                f"torch.compile produced no graph that ran for this point (frames compiled {out['frames_compiled']}, "
                f"graphs {out['graphs']}, compiled regions in a step {out['compiled_regions_per_step']}): it ran eager"
            )
        if out["recompiles"]:
            raise LabelMismatch(
                f"torch.compile recompiled {out['recompiles']} frame(s) after the warm-up call, so the timed calls "
                "include compilation"
            )
        return out


def flex_provenance(before: Counter[str], after: Counter[str]) -> dict[str, Any] | None:
    """``provenance.flex``: calls per path of one step (None where no flex attention ran).

    Paths: ``fused`` (compiled by inductor into one kernel), ``compiled`` (a Dynamo
    graph run by another backend, e.g. the eager backend of the CPU tests: unfused
    math), ``unfused`` (torch's eager reference, which materialises every score).
    """
    diff = {k: after[k] - before.get(k, 0) for k in after if after[k] - before.get(k, 0)}
    return diff or None
