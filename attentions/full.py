"""Full multi-head attention (Vaswani et al., 2017; ViT): every query sees every key."""

from __future__ import annotations

import dataclasses

import torch

from .base import HW, Attention, Knobs, register
from .common import Projections, attend, attention_macs


@dataclasses.dataclass(frozen=True)
class FullKnobs(Knobs):
    qkv_bias: bool = True


@register
class FullAttention(Attention):
    name = "full"
    summary = "multi-head self attention over all tokens"
    Knobs = FullKnobs
    complexity = "O(N^2)"
    supports_cross = True

    knobs: FullKnobs

    def __init__(self, dim: int, heads: int, knobs: FullKnobs, impl: str | None = None):
        super().__init__(dim, heads, knobs, impl)
        self.proj = Projections(dim, heads, bias=knobs.qkv_bias)

    def _forward(self, x: torch.Tensor, hw: HW, context: torch.Tensor | None, context_hw: HW | None) -> torch.Tensor:
        q = self.proj.queries(x)  # (B, h, N, d)
        k, v = self.proj.keys_values(x if context is None else context)  # (B, h, M, d)
        o = attend(q, k, v, math=self.math)  # (B, h, N, d)
        return self.proj.output(o)

    def macs(self, batch: int, hw: HW, context_hw: HW | None = None) -> int:
        n = hw[0] * hw[1]
        m = n if context_hw is None else context_hw[0] * context_hw[1]
        return self.proj.macs(batch, n, m) + attention_macs(batch, self.heads, n, m, self.head_dim)
