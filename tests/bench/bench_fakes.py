"""Test-only mechanisms that fail on purpose, loaded through ATTNBENCH_PLUGINS.

``fake_probe`` is a tiny linear map whose knob ``fail`` makes it raise a
simulated CUDA out-of-memory error, raise an ordinary error, return NaN, or
sleep past a time limit, or kill its own process; it refuses maps of odd height, so skipping can be
tested through the same ``unsupported`` path real mechanisms use.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from typing import Literal

import torch
from attnbench.attentions.base import _REGISTRY, HW, Attention, KnobError, Knobs, register
from torch import nn


@dataclasses.dataclass(frozen=True)
class ProbeKnobs(Knobs):
    fail: Literal["none", "oom", "error", "nan", "slow", "crash"] = "none"
    delay: float = 0.0
    width_mult: int = 1

    def check(self) -> None:
        if self.delay < 0:
            raise KnobError("fake_probe knob 'delay' must be >= 0")


class FakeProbe(Attention):
    name = "fake_probe"
    summary = "test-only linear map"
    Knobs = ProbeKnobs
    cost_knob = "width_mult"
    complexity = "O(N)"

    def __init__(self, dim: int, heads: int, knobs: ProbeKnobs, impl: str | None = None):
        super().__init__(dim, heads, knobs, impl)
        self.lin = nn.Linear(dim, dim * knobs.width_mult)
        self.back = nn.Linear(dim * knobs.width_mult, dim)

    def _unsupported(self, batch, hw, context_hw, *, dtype, device) -> list[str]:
        return [f"height {hw[0]} is odd; fake_probe needs an even height"] if hw[0] % 2 else []

    def _forward(self, x: torch.Tensor, hw: HW, context, context_hw) -> torch.Tensor:
        fail = self.knobs.fail
        if self.knobs.delay:
            time.sleep(self.knobs.delay)
        if fail == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
        if fail == "error":
            raise ValueError("simulated failure in fake_probe")
        if fail == "crash":  # a hard crash of the process (use only in a worker process)
            os.kill(os.getpid(), signal.SIGKILL)
        if fail == "slow":
            time.sleep(0.6)
        out = self.back(self.lin(x))  # (B, N, C)
        if fail == "nan":
            out = out * float("nan")
        return out

    def macs(self, batch: int, hw: HW, context_hw: HW | None = None) -> int:
        n = hw[0] * hw[1]
        return 2 * batch * n * self.dim * self.dim * self.knobs.width_mult


CLASSES = [FakeProbe]


def register_all() -> None:
    for cls in CLASSES:
        if cls.name not in _REGISTRY:
            register(cls)


def unregister_all() -> None:
    for cls in CLASSES:
        _REGISTRY.pop(cls.name, None)


register_all()
