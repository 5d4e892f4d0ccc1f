"""Full multi-head attention (Vaswani et al., 2017; ViT): every query sees every key.

``bias_table=S`` (0: none) adds a learned relative-position bias, one value per
head for every 2-D offset between two tokens, read from a Swin-style table of
``(2S-1)^2`` rows: maps up to S x S. ``fast`` materialises the ``(h, N, N)``
bias and hands it to SDPA; ``flex`` (CUDA) reads the table inside a FlexAttention
``score_mod`` and never builds it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .base import HW, Attention, KnobError, Knobs, MapRule, TimeAxis, map_tokens, register
from .common import Projections, attend, attention_macs, merge_heads
from .kernels import flex
from .relpos import AxisOffsets, map_bias, map_offsets, swin_table


@dataclasses.dataclass(frozen=True)
class FullKnobs(Knobs):
    qkv_bias: bool = True
    # Side S of the largest map the relative-position bias table covers; 0 for no bias.
    bias_table: int = 0

    def check(self) -> None:
        if self.bias_table < 0:
            raise KnobError(f"full knob 'bias_table' must be 0 (no bias) or a map side >= 1, got {self.bias_table}")


@register
class FullAttention(Attention):
    name = "full"
    summary = "multi-head self attention over all tokens (optionally with a 2-D relative-position bias)"
    Knobs = FullKnobs
    complexity = "O(N^2)"
    supports_cross = True
    clip_footprint = True
    time = TimeAxis(True, "any map: every query sees every token of every frame (bias_table is 2-D: 0 on clips)")
    # "flex": FlexAttention, the bias table read by a score_mod (CUDA; see attentions/kernels/flex.py)
    impls = ("reference", "fast", "flex")
    impl_requires = {"flex": flex.REQUIRES}
    examples = ({"bias_table": 16},)

    knobs: FullKnobs

    def __init__(self, dim: int, heads: int, knobs: FullKnobs, impl: str | None = None):
        super().__init__(dim, heads, knobs, impl)
        self.proj = Projections(dim, heads, bias=knobs.qkv_bias)
        self.table = swin_table(knobs.bias_table, heads) if knobs.bias_table else None
        # The table offsets of the last map and device seen: one entry, O(H^2 + W^2) longs, replaced on a new key.
        self._offsets: tuple[tuple[HW, torch.device], AxisOffsets] | None = None

    def _unsupported(
        self, batch: int, hw: HW, context_hw: HW | None, *, dtype: torch.dtype | None, device: Any
    ) -> list[str]:
        if self.knobs.bias_table and context_hw is not None:
            return ["the relative-position bias is for self attention: set bias_table=0 for cross attention"]
        if self.knobs.bias_table and len(hw) == 3:
            return ["the relative-position bias table is 2-D (H, W offsets): set bias_table=0 on a (T, H, W) map"]
        return []

    def map_rules(self, hw: HW, context_hw: HW | None) -> list[MapRule]:
        s = self.knobs.bias_table
        if not s:
            return []
        fix = f"set bias_table >= {max(hw)}"
        return [MapRule(f"the {s}x{s} maps the bias table covers", at_most=s, fix=fix)]

    def bias(self, hw: HW, device: Any) -> torch.Tensor | None:
        """The (h, N, N) relative-position bias of an H x W map (None without a table)."""
        if self.table is None:
            return None
        return map_bias(self.table, self.offsets(hw, device))

    def offsets(self, hw: HW, device: Any) -> AxisOffsets:
        """The per-axis table offsets of an H x W map, made on ``device`` once and kept until the map or device
        changes (under torch.compile made in the graph, which folds them)."""
        if torch.compiler.is_compiling():
            return map_offsets(hw, self.knobs.bias_table, device)
        key = ((hw[0], hw[1]), torch.device(device))
        cached = self._offsets
        if cached is None or cached[0] != key:
            cached = self._offsets = (key, map_offsets(hw, self.knobs.bias_table, device))
        return cached[1]

    def _forward(self, x: torch.Tensor, hw: HW, context: torch.Tensor | None, context_hw: HW | None) -> torch.Tensor:
        q = self.proj.queries(x)  # (B, h, N, d)
        k, v = self.proj.keys_values(x if context is None else context)  # (B, h, M, d)
        if self.impl == "flex":
            return self.proj.out(merge_heads(self._attend_flex(q, k, v, hw)))
        bias = self.bias(hw, x.device)
        # (1, h, N, N): a 4-D mask keeps SDPA on its fused CPU kernel (a 3-D one sends it to the math path)
        o = attend(q, k, v, None if bias is None else bias[None], math=self.math)  # (B, h, N, d)
        return self.proj.output(o)

    def _attend_flex(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hw: HW) -> torch.Tensor:
        from .kernels import flex

        if self.table is None:
            return flex.attention(q, k, v)
        table, w, span, off = self.table, hw[1], 2 * self.knobs.bias_table - 1, self.knobs.bias_table - 1

        def score_mod(score, bi, hi, qi, ki):
            row = (qi // w - ki // w + off) * span + (qi % w - ki % w + off)  # the table row of the pair's offset
            return score + table[row, hi]

        return flex.attention(q, k, v, score_mod)

    def macs(self, batch: int, hw: HW, context_hw: HW | None = None) -> int:
        n = map_tokens(hw)
        m = n if context_hw is None else map_tokens(context_hw)
        return self.proj.macs(batch, n, m) + attention_macs(batch, self.heads, n, m, self.head_dim)

    # ------------------------------------------------------------------ footprint
    def _footprint(
        self, x: torch.Tensor, hw: HW, query: tuple[int, int], context: torch.Tensor | None, context_hw: HW | None
    ) -> torch.Tensor:
        from .footprint import flat_index, reference_probs

        probs = reference_probs(self, x, hw, context, context_hw)  # (1, h, N, M)
        return probs[0, :, flat_index(query, hw)].reshape(self.heads, *(context_hw or hw))

    def keys_per_query(self, hw: HW, context_hw: HW | None = None) -> int:
        return map_tokens(context_hw or hw)
