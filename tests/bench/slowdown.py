"""Test plugin (ATTNBENCH_PLUGINS=slowdown): one mechanism made 2x slower, for the noise check.

``ATTNBENCH_SLOWDOWN`` names the mechanism (default ``linear``). Each call first
does its pass once more on the side and throws the result away: a forward
without grad; with grad, a forward and a backward to the input and parameters
through ``torch.autograd.grad`` (nothing accumulates into ``.grad``). Time
doubles; outputs, gradients and the peak memory are unchanged (the side pass is
freed before the real one starts).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from attnbench import attentions

NAME = os.environ.get("ATTNBENCH_SLOWDOWN", "linear")
_cls = attentions.get(NAME)
_forward = _cls.forward


def _slowed(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        side_x = x.detach().requires_grad_(True)
        side = _forward(self, side_x, *args, **kwargs)
        leaves = [side_x] + [p for p in self.parameters() if p.requires_grad]
        torch.autograd.grad(side, leaves, grad_outputs=torch.ones_like(side), allow_unused=True)
        del side
    else:
        _forward(self, x, *args, **kwargs)
    return _forward(self, x, *args, **kwargs)


_cls.forward = _slowed
