"""Deformable attention (DAT, Xia et al., CVPR 2022).

Every query attends to the same small set of keys and values, sampled from the
input map at learned positions: a reference grid over the map, ``stride`` times
coarser than the queries, moved by offsets that a small network predicts from
the queries. Channels (and heads) are split into ``groups``; each group has its
own sampling positions. A continuous relative-position bias is read from a
learnable table at the query-to-sample displacements.

Coordinates. All positions live in ``grid_sample``'s ``align_corners=True``
frame of the query map: -1 and +1 are the centres of the first and last pixel,
so one pixel is ``2 / (H - 1)``. The query projection feeding the offset
network, the offset network itself, positions, bilinear weights and the bias
table lookup are computed in float32 whatever the input dtype (float64 inputs
stay float64; autocast off);
the queries used for attention and the sampled features are cast back to the
input dtype.

Why float32: the gradient of a bilinear sample with respect to its position
jumps when the position crosses a pixel boundary. Positions computed from bf16
queries move by ~0.01 pixel, enough to cross one on many samples, and the
offset network's and query projection's gradients then differ from float32 by
far more than rounding. In float32 the positions match and so do the gradients.

Geometry (knob ``geometry``): where the ``Hk x Wk`` reference points sit, where
the queries sit for the bias lookup, and what bounds the offsets. With
``j = 0 .. Hk-1`` and ``i = 0 .. H-1`` (columns alike), in normalised units:

- ``cvpr2022`` (default; the CVPR 2022 release of LeapLabTHU/DAT, whose DAT-T
  ``dat_t`` reproduces): reference ``(j + 1/2) / Hk * 2 - 1``, query
  ``(i + 1/2) / H * 2 - 1`` (the same formula at (H, W)), offsets
  ``tanh(raw) * offset_range_factor / Hk``. Factor 0 leaves the raw offsets
  unbounded, and -1 takes ``tanh`` of the position, as that release does. The
  offset network's depthwise conv pads ``kernel // 2`` at every kernel and
  stride, ``kernel == stride`` included, as that release does.
- ``datpp`` (DAT++, the repository's current head): reference
  ``(j + 1/2) / (Hk - 1) * 2 - 1`` (half a cell off, the last row outside the
  map), query ``i / (H - 1) * 2 - 1`` (the pixel centres), offsets
  ``tanh(raw) * offset_range_factor / (Hk - 1)``; -1 clamps the position to the
  map. Undefined for a key grid or map one pixel high or wide, so refused there.
  The offset conv pads 0 where ``kernel == stride`` (a patchify conv), ``kernel // 2``
  otherwise (``centres`` likewise).
- ``centres`` (ours): the centres of ``Hk x Wk`` equal cells,
  ``(j + 1/2) * H / Hk - 1/2`` in pixels; the queries at the pixel centres;
  offsets as ``cvpr2022``; -1 clamps. Kept because it is the one placement that
  is exactly the pixel grid at stride 1 and the cell means at ``kernel ==
  stride`` (zero offsets sample x itself, or its average pool), and is defined
  for every map size including a single row.

Offset channel 0 is the horizontal (x) offset, channel 1 the vertical (y), the
order ``grid_sample`` reads; the official code predicts (y, x) and swaps, the
same function up to the order of the 1x1 conv's two output rows.

Samples that fall outside the map read zeros (``padding_mode="zeros"``), and so
do bias lookups beyond the table, as in DAT.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .base import HW, Attention, KnobError, Knobs, MapRule, TimeAxis, register
from .common import (
    Projections,
    attend,
    attention_macs,
    conv_macs,
    conv_out,
    norm_macs,
    split_heads,
    to_map,
    to_tokens,
    widen,
)
from .relpos import DeformableBiasTable


@dataclasses.dataclass(frozen=True)
class DeformableKnobs(Knobs):
    # Reference grid is `stride` times coarser than the query map (DAT++: 8, 4, 2, 1 per stage).
    stride: int = 2
    # Depthwise kernel of the offset network (DAT++: 9, 7, 5, 3 per stage); padding kernel // 2
    # unless kernel == stride, then 0.
    kernel: int = 5
    # Channel groups, each with its own sampling positions; must divide dim and heads.
    groups: int = 1
    # Offsets bounded by tanh * factor / (Wk, Hk); -1 for unbounded (DAT v1 uses 2, DAT++ -1).
    offset_range_factor: float = 2.0
    # Deformable relative position bias.
    use_pe: bool = True
    # (Ht, Wt): the bias table is heads x (2Ht-1) x (2Wt-1); a map of this size reads it at whole
    # entries, other sizes interpolate it (DAT sizes it to the stage's map, 14x14 at stage 3).
    table_hw: tuple[int, ...] = (14, 14)
    qkv_bias: bool = True
    # Where reference points and queries sit, what bounds the offsets: the CVPR 2022 release, DAT++, or
    # the centres of equal cells (see the module docstring).
    geometry: Literal["cvpr2022", "datpp", "centres"] = "cvpr2022"

    def check(self) -> None:
        for knob in ("stride", "kernel", "groups"):
            value = getattr(self, knob)
            if value < 1:
                raise KnobError(f"deformable knob {knob!r} must be at least 1, got {value}")
        if not (self.offset_range_factor >= 0 or self.offset_range_factor == -1):
            raise KnobError(
                "deformable knob 'offset_range_factor' must be >= 0 (offsets bounded by factor / key grid size) "
                f"or -1 (unbounded), got {self.offset_range_factor}"
            )
        if len(self.table_hw) != 2 or any(t < 1 for t in self.table_hw):
            raise KnobError(
                f"deformable knob 'table_hw' must be two positive integers (Ht, Wt), e.g. 14,14; got {self.table_hw}"
            )


def normalise(p: torch.Tensor, size: int) -> torch.Tensor:
    """Pixel coordinates -> grid_sample's align_corners=True frame (-1, +1: first, last pixel centre)."""
    if size == 1:
        return torch.zeros_like(p)
    return p * (2.0 / (size - 1)) - 1.0


def reference_axis(geometry: str, size: int, cells: int, device: Any, dtype: Any = torch.float32) -> torch.Tensor:
    """Normalised positions of ``cells`` reference points along a side of ``size`` pixels."""
    j = torch.arange(cells, device=device, dtype=dtype) + 0.5
    if geometry == "cvpr2022":
        return j / cells * 2.0 - 1.0
    if geometry == "datpp":
        return j / (cells - 1) * 2.0 - 1.0
    return normalise(j * (size / cells) - 0.5, size)


def query_axis(geometry: str, size: int, device: Any, dtype: Any = torch.float32) -> torch.Tensor:
    """Normalised positions of the ``size`` queries along a side, as the bias lookup sees them."""
    if geometry == "cvpr2022":
        return reference_axis(geometry, size, size, device, dtype)
    return normalise(torch.arange(size, device=device, dtype=dtype), size)


def offset_padding(geometry: str, kernel: int, stride: int) -> int:
    """Padding of the offset network's depthwise conv: the CVPR release always pads kernel // 2; DAT++ (and the
    ``centres`` placement, which follows it) pads 0 where kernel == stride, a patchify conv."""
    if geometry == "cvpr2022":
        return kernel // 2
    return 0 if kernel == stride else kernel // 2


def offset_cells(geometry: str, cells: int) -> int:
    """What a bounded offset is divided by along a side of ``cells`` reference points."""
    return cells - 1 if geometry == "datpp" else cells


def _grid(ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")  # each (len(ys), len(xs))
    return torch.stack((gx, gy), dim=-1)  # (len(ys), len(xs), 2): (x, y)


@register
class DeformableAttention(Attention):
    name = "deformable"
    summary = "DAT: keys/values sampled at learned offsets from a strided grid, continuous relative-position bias"
    Knobs = DeformableKnobs
    cost_knob = "stride"
    examples = ({"stride": 4, "kernel": 3, "groups": 2, "offset_range_factor": -1.0},)
    complexity = "O(N^2 / stride^2)"
    time = TimeAxis(why_not="its offsets, reference grid and bilinear sampling (grid_sample) are 2-D")
    knobs: DeformableKnobs

    def __init__(self, dim: int, heads: int, knobs: DeformableKnobs, impl: str | None = None):
        super().__init__(dim, heads, knobs, impl)
        g = knobs.groups
        self.group_channels = dim // g
        cg = self.group_channels
        self.padding = offset_padding(knobs.geometry, knobs.kernel, knobs.stride)
        self.proj = Projections(dim, heads, bias=knobs.qkv_bias)
        # Offset network, shared by the groups: depthwise conv (stride) -> LayerNorm -> GELU -> 1x1 conv to 2.
        self.offset_conv = nn.Conv2d(cg, cg, knobs.kernel, knobs.stride, self.padding, groups=cg)
        self.offset_norm = nn.LayerNorm(cg)
        self.offset_act = nn.GELU()
        self.offset_out = nn.Conv2d(cg, 2, 1, bias=False)
        self.rpe = DeformableBiasTable(heads, (knobs.table_hw[0], knobs.table_hw[1])) if knobs.use_pe else None

    # ------------------------------------------------------------------ geometry
    def key_hw(self, hw: HW) -> HW:
        """Size of the reference grid (the offset network's output) for a query map ``hw``."""
        k, s = self.knobs.kernel, self.knobs.stride
        return conv_out(hw[0], k, s, self.padding), conv_out(hw[1], k, s, self.padding)

    def reference_points(self, hw: HW, key_hw: HW, device: Any, dtype: Any = torch.float32) -> torch.Tensor:
        """(Hk, Wk, 2) reference positions (x, y), normalised (float32, or float64 for float64 inputs)."""
        geo = self.knobs.geometry
        ys, xs = (reference_axis(geo, hw[i], key_hw[i], device, dtype) for i in (0, 1))
        return _grid(ys, xs)

    def query_points(self, hw: HW, device: Any, dtype: Any = torch.float32) -> torch.Tensor:
        """(H*W, 2) positions (x, y) of the queries, normalised."""
        geo = self.knobs.geometry
        return _grid(query_axis(geo, hw[0], device, dtype), query_axis(geo, hw[1], device, dtype)).reshape(-1, 2)

    def offsets(self, q_map: torch.Tensor) -> torch.Tensor:
        """Group query maps (B*g, Cg, H, W) -> offsets (B*g, Hk, Wk, 2), (x, y), normalised, float32.

        The whole offset network runs in float32 on float32 queries, whatever the
        module's dtype: its output is a position, and a position rounded to bf16
        moves samples across pixel boundaries, where bilinear sampling's gradient
        jumps (see the module docstring).
        """
        q_map = widen(q_map)
        conv, norm, wide = self.offset_conv, self.offset_norm, q_map.dtype
        bias = None if conv.bias is None else conv.bias.to(wide)
        t = F.conv2d(q_map, conv.weight.to(wide), bias, conv.stride, conv.padding, groups=conv.groups)
        t = t.permute(0, 2, 3, 1)  # (B*g, Hk, Wk, Cg)
        t = F.layer_norm(t, norm.normalized_shape, norm.weight.to(wide), norm.bias.to(wide), norm.eps)
        t = self.offset_act(t).permute(0, 3, 1, 2)  # (B*g, Cg, Hk, Wk)
        raw = F.conv2d(t, self.offset_out.weight.to(wide))  # (B*g, 2, Hk, Wk)
        raw = raw.permute(0, 2, 3, 1)  # (B*g, Hk, Wk, 2)
        factor, geo = self.knobs.offset_range_factor, self.knobs.geometry
        if factor < 0 or (factor == 0 and geo == "cvpr2022"):  # the CVPR release bounds only factor > 0
            return raw
        hk, wk = offset_cells(geo, raw.shape[1]), offset_cells(geo, raw.shape[2])
        scale = torch.tensor([factor / wk, factor / hk], device=raw.device, dtype=raw.dtype)
        return raw.tanh() * scale

    def positions(self, offsets: torch.Tensor, hw: HW) -> torch.Tensor:
        """Sampling positions (B*g, Hk, Wk, 2): reference grid + offsets; when unbounded, squashed into the map
        by tanh (cvpr2022) or clamped to it."""
        ref = self.reference_points(hw, (offsets.shape[1], offsets.shape[2]), offsets.device, offsets.dtype)
        pos = ref + offsets  # (B*g, Hk, Wk, 2)
        if self.knobs.offset_range_factor >= 0:
            return pos
        return pos.tanh() if self.knobs.geometry == "cvpr2022" else pos.clamp(-1.0, 1.0)

    def sample(self, x_map: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Bilinear samples of x (B, C, H, W) at the groups' positions (B*g, Hk, Wk, 2) -> tokens (B, Hk*Wk, C)."""
        b, c, h, w = x_map.shape
        grouped = x_map.reshape(b * self.knobs.groups, self.group_channels, h, w)  # (B*g, Cg, H, W)
        s = F.grid_sample(grouped.to(pos.dtype), pos, mode="bilinear", padding_mode="zeros", align_corners=True)
        return to_tokens(s.reshape(b, c, pos.shape[1], pos.shape[2])).to(x_map.dtype)  # (B, Hk*Wk, C)

    # ------------------------------------------------------------------ forward
    def _forward(self, x: torch.Tensor, hw: HW, context: torch.Tensor | None, context_hw: HW | None) -> torch.Tensor:
        b, g, cg = x.shape[0], self.knobs.groups, self.group_channels
        with torch.autocast(x.device.type, enabled=False):
            # Queries in float32 feed the offset network; attention gets them in x's dtype.
            lin = self.proj.q
            wide = widen(x).dtype
            q_bias = None if lin.bias is None else lin.bias.to(wide)
            q32 = F.linear(x.to(wide), lin.weight.to(wide), q_bias)  # (B, N, C)
            q_map = to_map(q32, hw).reshape(b * g, cg, hw[0], hw[1])  # (B*g, Cg, H, W)
            pos = self.positions(self.offsets(q_map), hw)  # (B*g, Hk, Wk, 2)
        q_tokens = q32.to(x.dtype)
        sampled = self.sample(to_map(x, hw), pos)  # (B, Ns, C)
        k, v = self.proj.keys_values(sampled)  # each (B, h, Ns, d)
        q = split_heads(q_tokens, self.heads)  # (B, h, N, d)
        bias = None
        if self.rpe is not None:
            # (B, h, N, Ns): table read at query - sample displacements, per group
            bias = self.rpe(self.query_points(hw, x.device, pos.dtype), pos.flatten(1, 2), groups=g, fast=not self.math)
        o = attend(q, k, v, bias, math=self.math)  # (B, h, N, d)
        return self.proj.output(o)

    # ------------------------------------------------------------------ contract
    @classmethod
    def _static_reasons(cls, dim: int, heads: int, knobs: Any) -> list[str]:
        g = knobs.groups
        if dim % g or heads % g:
            return [
                f"deformable knob 'groups' ({g}) must divide dim ({dim}) and heads ({heads}); "
                f"choose groups from {[d for d in range(1, heads + 1) if heads % d == 0 and dim % d == 0]}"
            ]
        return []

    @classmethod
    def stage_knobs(cls, stage: int, hw: HW) -> tuple[dict[str, Any], ...]:
        # DAT++'s strided reference grids (8, 4, 2, 1) and offset kernels (9, 7, 5, 3); the bias table sized
        # to the stage's map; offsets bounded as in DAT (factor 2).
        i = stage - 1
        knobs = {"stride": (8, 4, 2, 1)[i], "kernel": (9, 7, 5, 3)[i], "groups": (1, 1, 1, 2)[i]}
        return ({**knobs, "offset_range_factor": 2.0, "table_hw": hw},)

    def map_rules(self, hw: HW, context_hw: HW | None) -> list[MapRule]:
        s = self.knobs.stride
        return [MapRule(f"the sampling stride {s}", at_least=s, fix=f"use stride <= {min(hw)}")]

    def _unsupported(
        self, batch: int, hw: HW, context_hw: HW | None, *, dtype: torch.dtype | None, device: Any
    ) -> list[str]:
        s = self.knobs.stride
        if min(hw) < s:
            return []  # the map rule says why
        hk, wk = self.key_hw(hw)
        if hk < 1 or wk < 1:
            return [
                f"the offset network (kernel {self.knobs.kernel}, stride {s}) leaves no reference points on a "
                f"{hw[0]}x{hw[1]} map; use a smaller kernel or stride"
            ]
        if self.knobs.geometry == "datpp" and min(hk, wk, *hw) < 2:
            return [
                f"geometry 'datpp' divides by Hk-1 and H-1 (as DAT++ does), undefined for the {hw[0]}x{hw[1]} map "
                f"and its {hk}x{wk} key grid: use a map and key grid at least 2x2, or geometry='cvpr2022'"
            ]
        return []

    def macs(self, batch: int, hw: HW, context_hw: HW | None = None) -> int:
        n = hw[0] * hw[1]
        hk, wk = self.key_hw(hw)
        ns = hk * wk
        g, cg = self.knobs.groups, self.group_channels
        offset_net = g * (
            conv_macs((hk, wk), cg, cg, self.knobs.kernel, groups=cg)  # depthwise conv
            + norm_macs(ns, cg)  # LayerNorm
            + conv_macs((hk, wk), cg, 2, 1)  # 1x1 conv to the two offsets
        )
        sampling = 4 * self.dim * ns  # grid_sample: 4 per output element
        bias = self.rpe.macs(1, n, ns) if self.rpe is not None else 0
        per_image = offset_net + sampling + bias
        return (
            self.proj.macs(batch, n, ns) + batch * per_image + attention_macs(batch, self.heads, n, ns, self.head_dim)
        )

    # ------------------------------------------------------------------ footprint
    def _footprint(
        self, x: torch.Tensor, hw: HW, query: tuple[int, int], context: torch.Tensor | None, context_hw: HW | None
    ) -> torch.Tensor:
        """Softmax weights over the sampled keys, each spread over its four pixels by its bilinear
        weights; corners off the map read zeros and get nothing. With ``groups`` > 1 a key's channels
        are sampled at one position per group and the projection mixes them, so its weight is split
        evenly over the groups' positions (each group gives 1/groups of the channels)."""
        from .footprint import reference_probs, splat

        g, cg = self.knobs.groups, self.group_channels
        lin = self.proj.q
        q32 = F.linear(x.float(), lin.weight.float(), None if lin.bias is None else lin.bias.float())  # (1, N, C)
        pos = self.positions(self.offsets(to_map(q32, hw).reshape(g, cg, hw[0], hw[1])), hw)  # (g, Hk, Wk, 2)
        probs = reference_probs(self, x, hw, None, None)  # (1, h, N, Ns)
        w = probs[0, :, query[0] * hw[1] + query[1]]  # (h, Ns)
        maps = [splat(w / g, pos[i].flatten(0, 1).expand(self.heads, -1, -1), hw) for i in range(g)]
        return torch.stack(maps).sum(0)  # (h, H, W)

    def keys_per_query(self, hw: HW, context_hw: HW | None = None) -> int:
        hk, wk = self.key_hw(hw)
        return hk * wk
