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

Clips: on a ``(T, H, W)`` map the reduction runs frame by frame (the image
module on every frame; keys and values are the reduced tokens of all frames,
``T * (H/r) * (W/r)`` of them, or ``T * P^2`` for v2), and every query attends to
all of them. ``sr_ratio_t > 1`` (v1) reduces time as well, by a
``Conv3d(C, C, (sr_ratio_t, r, r))`` of the same stride: space-time reduction of
keys and values as MViT (Fan et al., ICCV 2021) pools them over t (its
``stride_kv`` over time). The default, 1, is frame-wise reduction: the choice
that keeps one set of weights for images and clips.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from torch import nn

from .base import HW, Attention, KnobError, Knobs, MapRule, TimeAxis, map_tokens, register
from .common import Projections, attend, attention_macs, norm_macs, to_map, to_tokens

VERSIONS = ("v1", "v2")


@dataclasses.dataclass(frozen=True)
class PVTKnobs(Knobs):
    version: Literal["v1", "v2"] = "v1"
    # v1: kernel and stride of the reduction conv (PVT stages use 8, 4, 2, 1); 1 = no reduction.
    sr_ratio: int = 4
    # v2: side of the pooled key/value map (7 in PVTv2).
    pool_size: int = 7
    qkv_bias: bool = True
    # v1 on (T, H, W) maps: frames reduced together (Conv3d of kernel and stride (sr_ratio_t, r, r)); 1: per frame.
    sr_ratio_t: int = 1

    def check(self) -> None:
        if self.version not in VERSIONS:
            raise KnobError(f"pvt knob 'version' must be one of {', '.join(map(repr, VERSIONS))}, got {self.version!r}")
        for knob, hint in (("sr_ratio", "1 means no reduction"), ("pool_size", "PVTv2 uses 7")):
            value = getattr(self, knob)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise KnobError(f"pvt knob {knob!r} must be an integer >= 1 ({hint}), got {value!r}")
        rt = self.sr_ratio_t
        if isinstance(rt, bool) or not isinstance(rt, int) or rt < 1:
            raise KnobError(f"pvt knob 'sr_ratio_t' must be an integer >= 1 (1: per frame), got {rt!r}")
        if rt > 1 and self.version != "v1":
            raise KnobError("pvt knob 'sr_ratio_t' reduces time with v1's conv; v2 pools each frame: set it to 1")


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
    clip_footprint = True
    time = TimeAxis(
        True,
        "spatial reduction per frame (keys of every frame), or over time too with sr_ratio_t (v1's Conv3d)",
    )

    knobs: PVTKnobs

    def __init__(self, dim: int, heads: int, knobs: PVTKnobs, impl: str | None = None):
        super().__init__(dim, heads, knobs, impl)
        self.version = knobs.version
        self.sr_ratio = knobs.sr_ratio
        self.pool_size = knobs.pool_size
        self.proj = Projections(dim, heads, bias=knobs.qkv_bias)
        if self.version == "v1":
            if knobs.sr_ratio_t > 1:
                size = (knobs.sr_ratio_t, self.sr_ratio, self.sr_ratio)
                self.sr = nn.Conv3d(dim, dim, kernel_size=size, stride=size)
                self.norm = nn.LayerNorm(dim)
            elif self.sr_ratio > 1:
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
        return self.version == "v2" or self.sr_ratio > 1 or self.knobs.sr_ratio_t > 1

    def kv_hw(self, source_hw: HW) -> HW:
        """Size of the key/value map made from a source map of ``source_hw``."""
        if len(source_hw) == 3:
            return (source_hw[0] // self.knobs.sr_ratio_t, *self.kv_hw(source_hw[1:]))  # type: ignore[return-value]
        if self.version == "v2":
            return (self.pool_size, self.pool_size)
        return (source_hw[0] // self.sr_ratio, source_hw[1] // self.sr_ratio)

    def reduce(self, source: torch.Tensor, source_hw: HW) -> torch.Tensor:
        """(B, H*W, C) -> (B, h*w, C), the tokens keys and values are projected from."""
        if not self.reduces:
            return source
        if len(source_hw) == 3:
            return self._reduce_clip(source, source_hw)  # type: ignore[arg-type]
        m = to_map(source, source_hw)  # (B, C, H, W)
        if self.version == "v2":
            m = self.pool(m)  # (B, C, P, P)
        m = to_tokens(self.sr(m))  # (B, h*w, C)
        m = self.norm(m)
        return self.act(m) if self.version == "v2" else m

    def _reduce_clip(self, source: torch.Tensor, thw: tuple[int, int, int]) -> torch.Tensor:
        """(B, T*H*W, C) -> (B, T'*h*w, C): per frame, or by the Conv3d when sr_ratio_t > 1."""
        b, _, c = source.shape
        t, h, w = thw
        if self.knobs.sr_ratio_t > 1:
            m = self.sr(source.transpose(1, 2).reshape(b, c, t, h, w))  # (B, C, T', h, w)
            return self.norm(m.flatten(2).transpose(1, 2))  # (B, T'*h*w, C)
        frames = source.reshape(b * t, h * w, c)  # (B*T, H*W, C)
        m = to_map(frames, (h, w))  # (B*T, C, H, W)
        if self.version == "v2":
            m = self.pool(m)  # (B*T, C, P, P)
        m = to_tokens(self.sr(m))  # (B*T, h*w, C)
        m = self.norm(m).reshape(b, -1, c)  # (B, T*h*w, C)
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

    def _unsupported(
        self, batch: int, hw: HW, context_hw: HW | None, *, dtype: torch.dtype | None, device: Any
    ) -> list[str]:
        rt, source = self.knobs.sr_ratio_t, context_hw or hw
        if rt > 1 and len(source) != 3:
            return [f"pvt: sr_ratio_t={rt} reduces time; on an (H, W) map set it to 1"]
        if rt > 1 and source[0] < rt:
            return [
                f"pvt: sr_ratio_t={rt} leaves no key frame of a {source[0]}-frame clip; use sr_ratio_t <= {source[0]}"
            ]
        return []

    def map_rules(self, hw: HW, context_hw: HW | None) -> list[MapRule]:
        if self.version != "v1" or self.sr_ratio == 1:
            return []
        hw = hw[-2:]
        context_hw = None if context_hw is None else context_hw[-2:]
        source_hw, which = (hw, "hw") if context_hw is None else (context_hw, "context_hw")
        fix = f"no key would remain; use sr_ratio <= {min(source_hw)} or a larger map"
        return [MapRule(f"sr_ratio={self.sr_ratio}", at_least=self.sr_ratio, fix=fix, which=which)]

    def macs(self, batch: int, hw: HW, context_hw: HW | None = None) -> int:
        source_hw = hw if context_hw is None else context_hw
        n = map_tokens(hw)
        c = self.dim
        if self.reduces:
            kv_hw = self.kv_hw(source_hw)
            m = map_tokens(kv_hw)
            kernel = 1 if self.version == "v2" else self.sr_ratio
            # every key token costs c * c * kernel volume (the Conv3d's volume has sr_ratio_t frames)
            volume = kernel * kernel * (self.knobs.sr_ratio_t if len(kv_hw) == 3 else 1)
            reduce = m * c * c * volume + norm_macs(m, c)
            if self.version == "v2":
                reduce += c * map_tokens(source_hw)  # adaptive average pooling: 1 per input element
            reduce *= batch
        else:
            m = map_tokens(source_hw)
            reduce = 0
        return reduce + self.proj.macs(batch, n, m) + attention_macs(batch, self.heads, n, m, self.head_dim)

    # ------------------------------------------------------------------ footprint
    def _footprint(
        self, x: torch.Tensor, hw: HW, query: tuple[int, ...], context: torch.Tensor | None, context_hw: HW | None
    ) -> torch.Tensor:
        """Softmax weights over the reduced keys, each spread evenly over the pixels it is reduced from:
        v1 its r x r cell (the rows and columns past the last whole cell feed no key), v2 its adaptive bin.
        On a clip a key is made from one frame's cell, or with sr_ratio_t > 1 from that cell in sr_ratio_t
        frames (the frames past the last whole group feed no key)."""
        from .footprint import adaptive_bins, blocks, flat_index, reference_probs, spread, spread_clip

        source_hw = context_hw or hw
        k_map = self.kv_hw(source_hw) if self.reduces else source_hw  # ([T',] kh, kw)
        probs = reference_probs(self, x, hw, context, context_hw)  # (1, h, N, M')
        w = probs[0, :, flat_index(query, hw)].reshape(self.heads, *k_map)  # (h, [T',] kh, kw)
        (height, width), (kh, kw) = source_hw[-2:], k_map[-2:]
        if self.version == "v2":
            rows, cols = adaptive_bins(height, kh), adaptive_bins(width, kw)
        else:
            rows, cols = blocks(height, kh, self.sr_ratio), blocks(width, kw, self.sr_ratio)
        if len(source_hw) == 2:
            return spread(w, rows, cols)
        frames = blocks(source_hw[0], k_map[0], self.knobs.sr_ratio_t)  # (T', T): identity per frame
        return spread_clip(w, frames, rows, cols)  # (h, T, H, W)

    def keys_per_query(self, hw: HW, context_hw: HW | None = None) -> int:
        source_hw = context_hw or hw
        return map_tokens(self.kv_hw(source_hw) if self.reduces else source_hw)
