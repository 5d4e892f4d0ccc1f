"""Spatial-reduction attention of the Pyramid Vision Transformer.

PVTv1 (Wang et al., ICCV 2021): keys and values come from the source map reduced by
``Conv2d(C, C, kernel=r, stride=r)`` + LayerNorm, ``r = sr_ratio``; ``sr_ratio=1``
skips the reduction (and its parameters), as the official code does. Like that
convolution (no padding), a map whose H or W is not a multiple of r drops its last
``H % r`` rows and ``W % r`` columns from the keys and values.

PVTv2 "linear SRA" (Wang et al., CVMJ 2022): the source map is pooled to a fixed
``pool_size`` x ``pool_size`` by AdaptiveAvgPool2d -> 1x1 Conv -> LayerNorm -> GELU,
so the cost is linear in the number of queries. ``sr_ratio`` is not used by v2.

Queries keep the full resolution. In cross attention the reduction applies to the
context map.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from torch import nn

from .base import HW, Attention, KnobError, Knobs, MapRule, register
from .common import Projections, attend, attention_macs, conv_macs, norm_macs, to_map, to_tokens

VERSIONS = ("v1", "v2")


@dataclasses.dataclass(frozen=True)
class PVTKnobs(Knobs):
    version: Literal["v1", "v2"] = "v1"
    # v1: kernel and stride of the reduction conv (PVT stages use 8, 4, 2, 1); 1 = no reduction.
    sr_ratio: int = 4
    # v2: side of the pooled key/value map (7 in PVTv2).
    pool_size: int = 7
    qkv_bias: bool = True

    def check(self) -> None:
        if self.version not in VERSIONS:
            raise KnobError(f"pvt knob 'version' must be one of {', '.join(map(repr, VERSIONS))}, got {self.version!r}")
        for knob, hint in (("sr_ratio", "1 means no reduction"), ("pool_size", "PVTv2 uses 7")):
            value = getattr(self, knob)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise KnobError(f"pvt knob {knob!r} must be an integer >= 1 ({hint}), got {value!r}")


@register
class PVTAttention(Attention):
    name = "pvt"
    summary = (
        "PVT spatial-reduction attention: v1 Conv(k=s=sr_ratio)+LayerNorm on keys/values "
        "(default sr_ratio=4, PVT stage 2), v2 linear SRA pooling to pool_size^2=7x7"
    )
    Knobs = PVTKnobs
    cost_knob = "sr_ratio"
    complexity = "O(N^2/r^2) (v1), O(N) (v2)"
    supports_cross = True

    knobs: PVTKnobs

    def __init__(self, dim: int, heads: int, knobs: PVTKnobs, impl: str | None = None):
        super().__init__(dim, heads, knobs, impl)
        self.version = knobs.version
        self.sr_ratio = knobs.sr_ratio
        self.pool_size = knobs.pool_size
        self.proj = Projections(dim, heads, bias=knobs.qkv_bias)
        if self.version == "v1":
            if self.sr_ratio > 1:
                self.sr = nn.Conv2d(dim, dim, kernel_size=self.sr_ratio, stride=self.sr_ratio)
                self.norm = nn.LayerNorm(dim)
        else:
            self.pool = nn.AdaptiveAvgPool2d(self.pool_size)
            self.sr = nn.Conv2d(dim, dim, kernel_size=1)
            self.norm = nn.LayerNorm(dim)
            self.act = nn.GELU()

    @property
    def reduces(self) -> bool:
        """Whether keys and values come from a reduced map (False only for v1 with sr_ratio=1)."""
        return self.version == "v2" or self.sr_ratio > 1

    def kv_hw(self, source_hw: HW) -> HW:
        """Size of the key/value map made from a source map of ``source_hw``."""
        if self.version == "v2":
            return (self.pool_size, self.pool_size)
        return (source_hw[0] // self.sr_ratio, source_hw[1] // self.sr_ratio)

    def reduce(self, source: torch.Tensor, source_hw: HW) -> torch.Tensor:
        """(B, H*W, C) -> (B, h*w, C), the tokens keys and values are projected from."""
        if not self.reduces:
            return source
        m = to_map(source, source_hw)  # (B, C, H, W)
        if self.version == "v2":
            m = self.pool(m)  # (B, C, P, P)
        m = to_tokens(self.sr(m))  # (B, h*w, C)
        m = self.norm(m)
        return self.act(m) if self.version == "v2" else m

    def _forward(self, x: torch.Tensor, hw: HW, context: torch.Tensor | None, context_hw: HW | None) -> torch.Tensor:
        # Keys and values from x itself, or from the second image in cross attention.
        source, source_hw = (x, hw) if context is None or context_hw is None else (context, context_hw)
        q = self.proj.queries(x)  # (B, h, N, d)
        k, v = self.proj.keys_values(self.reduce(source, source_hw))  # (B, h, M', d)
        o = attend(q, k, v, math=self.math)  # (B, h, N, d)
        return self.proj.output(o)

    @classmethod
    def stage_knobs(cls, stage: int, hw: HW) -> tuple[dict[str, Any], ...]:
        return ({"version": "v1", "sr_ratio": (8, 4, 2, 1)[stage - 1]},)  # PVTv2-b0's reductions

    def map_rules(self, hw: HW, context_hw: HW | None) -> list[MapRule]:
        if self.version != "v1" or self.sr_ratio == 1:
            return []
        source_hw, which = (hw, "hw") if context_hw is None else (context_hw, "context_hw")
        fix = f"no key would remain; use sr_ratio <= {min(source_hw)} or a larger map"
        return [MapRule(f"sr_ratio={self.sr_ratio}", at_least=self.sr_ratio, fix=fix, which=which)]

    def macs(self, batch: int, hw: HW, context_hw: HW | None = None) -> int:
        source_hw = hw if context_hw is None else context_hw
        n = hw[0] * hw[1]
        c = self.dim
        if self.reduces:
            kv_hw = self.kv_hw(source_hw)
            m = kv_hw[0] * kv_hw[1]
            kernel = 1 if self.version == "v2" else self.sr_ratio
            reduce = conv_macs(kv_hw, c, c, kernel) + norm_macs(m, c)
            if self.version == "v2":
                reduce += c * source_hw[0] * source_hw[1]  # adaptive average pooling: 1 per input element
            reduce *= batch
        else:
            m = source_hw[0] * source_hw[1]
            reduce = 0
        return reduce + self.proj.macs(batch, n, m) + attention_macs(batch, self.heads, n, m, self.head_dim)

    # ------------------------------------------------------------------ footprint
    def _footprint(
        self, x: torch.Tensor, hw: HW, query: tuple[int, int], context: torch.Tensor | None, context_hw: HW | None
    ) -> torch.Tensor:
        """Softmax weights over the reduced keys, each spread evenly over the pixels it is reduced from:
        v1 its r x r cell (the rows and columns past the last whole cell feed no key), v2 its adaptive bin."""
        from .footprint import adaptive_bins, blocks, reference_probs, spread

        source_hw = context_hw or hw
        kh, kw = self.kv_hw(source_hw) if self.reduces else source_hw
        probs = reference_probs(self, x, hw, context, context_hw)  # (1, h, N, M')
        w = probs[0, :, query[0] * hw[1] + query[1]].reshape(self.heads, kh, kw)
        if self.version == "v2":
            return spread(w, adaptive_bins(source_hw[0], kh), adaptive_bins(source_hw[1], kw))
        r = self.sr_ratio
        return spread(w, blocks(source_hw[0], kh, r), blocks(source_hw[1], kw, r))

    def keys_per_query(self, hw: HW, context_hw: HW | None = None) -> int:
        source_hw = context_hw or hw
        kh, kw = self.kv_hw(source_hw) if self.reduces else source_hw
        return kh * kw
