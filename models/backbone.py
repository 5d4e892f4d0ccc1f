"""A hierarchical vision backbone whose attention per stage is any registered mechanism.

Image -> stem (patch embedding) -> four stages of pre-norm blocks
``x + DropPath(Attn(LN(x)))`` then ``x + DropPath(MLP(LN(x)))``, with the token
map halved between stages by a merge layer (or, as in MViTv2, by an attention
that pools its queries) -> LayerNorm -> mean of the tokens (or the CLS token
when a mechanism needs one) -> linear classifier.

The attention of every block is built only through ``attentions.build(name,
dim=, heads=, **knobs)`` and called as ``attn(x, hw)``; the map size is carried
through the network and passed to every block, so one model runs at any input
resolution its mechanisms accept (``Backbone.unsupported`` says which do not).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from attnbench.attentions.common import to_map, to_tokens
from torch import nn

from attnbench import attentions

from .layers import HW, DropPath, Merge, Mlp, Stem, init_linear


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One stage: ``depth`` blocks at width ``dim`` with ``heads`` heads.

    ``attention`` and ``knobs`` are cycled over the blocks: ``("swin",)`` with
    ``({"window": 7}, {"window": 7, "shift": True})`` alternates shifted windows;
    a tuple as long as ``depth`` sets every block on its own.
    """

    dim: int
    depth: int
    heads: int
    mlp_ratio: float = 4.0
    attention: tuple[str, ...] = ("full",)
    knobs: tuple[Mapping[str, Any], ...] = ({},)

    def block(self, j: int) -> tuple[str, dict[str, Any]]:
        return self.attention[j % len(self.attention)], dict(self.knobs[j % len(self.knobs)])


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
    stages: tuple[StageConfig, ...]
    # overlap: Conv(7, s4, p3)+LN (PVTv2); patch: Conv(4, s4)+LN (Swin, DAT); conv: Conv(7, s4, p3) (MViTv2).
    stem: str = "overlap"
    # overlap: Conv(3, s2, p1)+LN (PVTv2); linear: Swin patch merging; conv: Conv(2, s2)+LN (DAT);
    # none: no merge layer, the first block of a stage widens the tokens and its attention pools them (MViTv2).
    merge: str = "overlap"
    conv_mlp: bool = False  # PVTv2's depthwise 3x3 conv inside the MLP
    stage_norm: bool = False  # a LayerNorm at the end of every stage (PVTv2), not only the last
    norm_eps: float = 1e-5
    # eps of the stem's and merges' LayerNorms; None: norm_eps (PVTv2: 1e-5 there, 1e-6 in blocks and stage norms)
    embed_eps: float | None = None
    drop_path: float = 0.0
    num_classes: int = 1000
    in_chans: int = 3
    # A learned absolute position embedding added after the stem (MViTv2's "absolute" variant), sized for the
    # stem's map at ``resolution`` and resized bicubically at other resolutions.
    abs_pos: bool = False
    # The resolution the configuration was published at (any other that the mechanisms accept works too).
    resolution: int = 224


class Block(nn.Module):
    """Pre-norm transformer block around one registered attention mechanism.

    When ``dim_in != dim`` (the first block of an MViTv2 stage), the skip connection is
    ``Linear(dim_in, dim)`` of LN(x), MViTv2's residual projection. A mechanism with a
    ``dim_out`` knob (pooling) widens inside the attention, as MViTv2 does (its qkv
    projects from dim_in to dim): it is built at ``dim_in`` with ``dim_out=dim``. Any
    other mechanism works at one width, so the projected LN(x) also feeds it. When the
    attention returns a smaller map (pooled queries), the residual is max-pooled with
    kernel s+1, stride s, padding (s+1)//2, as in MViTv2.
    """

    def __init__(
        self,
        dim_in: int,
        dim: int,
        heads: int,
        attention: str,
        knobs: dict[str, Any],
        mlp_ratio: float,
        conv_mlp: bool,
        drop_path: float,
        eps: float,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim_in, eps=eps)
        self.skip = nn.Linear(dim_in, dim) if dim_in != dim else None
        # True when the attention takes dim_in channels and returns dim (its own dim_out knob).
        self.widens = self.skip is not None and "dim_out" in attentions.get(attention).knob_types()
        if self.widens:
            if knobs.get("dim_out", dim) != dim:
                raise ValueError(
                    f"{attention} knob dim_out={knobs['dim_out']} conflicts with the block's width {dim}: "
                    "leave dim_out out, the block sets it to the stage's width"
                )
            self.attn = attentions.build(attention, dim=dim_in, heads=heads, **{**knobs, "dim_out": dim})
        else:
            self.attn = attentions.build(attention, dim=dim, heads=heads, **knobs)
        if self.attn.output_dim != dim:
            raise ValueError(
                f"{attention} returns {self.attn.output_dim} channels in a block of width {dim}; "
                "a mechanism widens only in the first block of a stage (dim_in != dim)"
            )
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), conv=conv_mlp)
        if self.skip is not None:
            init_linear(self.skip)

    def context_hw(self, hw: HW) -> HW | None:
        return hw if self.attn.requires_context else None

    def forward(self, x: torch.Tensor, hw: HW, prefix: int = 0) -> tuple[torch.Tensor, HW]:
        y = self.norm1(x)
        shortcut = x
        if self.skip is not None:
            shortcut = self.skip(y)  # (B, prefix + H*W, dim): MViTv2 projects the normed input
            if not self.widens:
                y = shortcut  # the attention works at dim only
        ap = self.attn.prefix_tokens
        a_in = y if ap == prefix else y[:, prefix:]  # a mechanism without prefix sees the map only
        # A mechanism that requires a context gets the block's own tokens (cross attention as self attention).
        context = dict(context=a_in, context_hw=hw) if self.attn.requires_context else {}
        out = self.attn(a_in, hw, **context)
        out_hw = self.attn.output_hw(hw)
        if out_hw != tuple(hw):
            shortcut = torch.cat([shortcut[:, :prefix], pool_residual(shortcut[:, prefix:], hw, out_hw)], dim=1)
        if ap == prefix:
            x = shortcut + self.drop_path(out)
        else:  # prefix tokens pass the attention unchanged
            x = torch.cat([shortcut[:, :prefix], shortcut[:, prefix:] + self.drop_path(out)], dim=1)
        x = x + self.drop_path(self.mlp(self.norm2(x), out_hw, prefix))
        return x, out_hw

    def macs(self, batch: int, hw: HW, prefix: int = 0) -> int:
        """Analytic multiply-adds (LayerNorm 5 per element; biases, GELU, additions free)."""
        n, dim_in, dim = hw[0] * hw[1], self.norm1.normalized_shape[0], self.norm2.normalized_shape[0]
        out_hw = self.attn.output_hw(hw)
        n_out = out_hw[0] * out_hw[1]
        per_image = 5 * (prefix + n) * dim_in
        if self.skip is not None:
            per_image += (prefix + n) * dim_in * dim
        if out_hw != tuple(hw):
            kh, kw = _skip_kernel(hw, out_hw)
            per_image += n_out * dim * kh * kw  # max pooling: k*k per output element
        per_image += 5 * (prefix + n_out) * dim + self.mlp.macs(out_hw, prefix)
        return batch * per_image + self.attn.macs(batch, hw, self.context_hw(hw))


def _skip_kernel(hw: HW, out_hw: HW) -> tuple[int, int]:
    stride = tuple(max(1, round(a / b)) for a, b in zip(hw, out_hw, strict=True))
    return tuple(s + 1 if s > 1 else 1 for s in stride)  # type: ignore[return-value]


def pool_residual(t: torch.Tensor, hw: HW, out_hw: HW) -> torch.Tensor:
    """MViTv2's pooled skip connection: (B, H*W, C) -> (B, H'*W', C) by max pooling."""
    stride = tuple(max(1, round(a / b)) for a, b in zip(hw, out_hw, strict=True))
    kernel = _skip_kernel(hw, out_hw)
    m = F.max_pool2d(to_map(t, hw), kernel, stride, tuple(k // 2 for k in kernel))  # (B, C, H', W')
    if tuple(m.shape[-2:]) != tuple(out_hw):
        m = F.adaptive_max_pool2d(to_map(t, hw), out_hw)
    return to_tokens(m)


class Backbone(nn.Module):
    def __init__(self, config: BackboneConfig):
        super().__init__()
        self.config = config
        cfg = config
        if len(cfg.stages) < 1:
            raise ValueError("a backbone needs at least one stage")
        if cfg.merge not in (*Merge.KINDS, "none"):
            raise ValueError(f"merge must be one of {', '.join(Merge.KINDS)} or 'none', got {cfg.merge!r}")
        names = [st.block(j)[0] for st in cfg.stages for j in range(st.depth)]
        self.prefix = max(attentions.get(n).prefix_tokens for n in names)
        dims = [st.dim for st in cfg.stages]
        embed_eps = cfg.norm_eps if cfg.embed_eps is None else cfg.embed_eps
        self.stem = Stem(cfg.stem, cfg.in_chans, dims[0], embed_eps)
        if self.prefix:
            self.cls_token = nn.Parameter(torch.zeros(1, self.prefix, dims[0]))
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.pos_embed = None
        if cfg.abs_pos:
            g = self.stem.output_hw((cfg.resolution, cfg.resolution))
            self.pos_grid = g
            self.pos_embed = nn.Parameter(torch.zeros(1, g[0] * g[1], dims[0]))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        rates = torch.linspace(0, cfg.drop_path, sum(st.depth for st in cfg.stages)).tolist()
        self.merges = nn.ModuleList()
        self.stages = nn.ModuleList()
        self.stage_norms = nn.ModuleList()
        k = 0
        for i, st in enumerate(cfg.stages):
            if i > 0 and cfg.merge != "none":
                self.merges.append(Merge(cfg.merge, dims[i - 1], st.dim, embed_eps, self.prefix))
            else:
                self.merges.append(nn.Identity())
            blocks = []
            for j in range(st.depth):
                name, knobs = st.block(j)
                dim_in = dims[i - 1] if (i > 0 and j == 0 and cfg.merge == "none") else st.dim
                blocks.append(
                    Block(dim_in, st.dim, st.heads, name, knobs, st.mlp_ratio, cfg.conv_mlp, rates[k], cfg.norm_eps)
                )
                k += 1
            self.stages.append(nn.ModuleList(blocks))
            last = i == len(cfg.stages) - 1
            self.stage_norms.append(nn.LayerNorm(st.dim, eps=cfg.norm_eps) if cfg.stage_norm and not last else None)
        self.norm = nn.LayerNorm(dims[-1], eps=cfg.norm_eps)
        self.head = nn.Linear(dims[-1], cfg.num_classes)
        init_linear(self.head)

    # ------------------------------------------------------------------ resolution
    def stage_hws(self, resolution: int | HW) -> list[list[HW]]:
        """The token map each block of each stage sees at an input of ``resolution``."""
        hw = _as_hw(resolution)
        out: list[list[HW]] = []
        hw = self.stem.output_hw(hw)
        for merge, blocks in zip(self.merges, self.stages, strict=True):
            if isinstance(merge, Merge):
                hw = merge.output_hw(hw)
            stage = []
            for blk in blocks:
                stage.append(hw)
                hw = blk.attn.output_hw(hw) if min(hw) >= 1 else hw
            out.append(stage)
        return out

    def unsupported(self, resolution: int | HW, batch: int = 1) -> list[str]:
        """Why this model cannot run at ``resolution`` (empty when it can)."""
        hw0 = _as_hw(resolution)
        reasons: list[str] = []
        for i, stage in enumerate(self.stage_hws(hw0)):
            for j, (hw, blk) in enumerate(zip(stage, self.stages[i], strict=True)):
                where = (
                    f"at {hw0[0]}x{hw0[1]} px, stage {i + 1} block {j + 1} ({blk.attn.name}) sees a {hw[0]}x{hw[1]} map"
                )
                if min(hw) < 1:
                    return reasons + [f"{where}: the image is too small for this model"]
                found = blk.attn.unsupported(batch, hw, blk.context_hw(hw))
                if found:  # the first block of a stage that cannot run says why; the others would repeat it
                    reasons.append(f"{where}: " + "; ".join(found))
                    break
        return reasons

    def macs(self, batch: int, resolution: int | HW) -> int:
        """Analytic multiply-adds of one forward pass (FLOPs = 2 * MACs), the sum of every layer's and every
        attention's own ``macs()``; ``bench.flops`` counts the same by tracing (see tests/models)."""
        hw = _as_hw(resolution)
        p = self.prefix
        total = batch * self.stem.macs(hw)
        hw = self.stem.output_hw(hw)
        if self.pos_embed is not None and tuple(hw) != tuple(self.pos_grid):
            total += 4 * hw[0] * hw[1] * self.pos_embed.shape[-1]  # the table resized, once per call

        for merge, blocks, snorm in zip(self.merges, self.stages, self.stage_norms, strict=True):
            if isinstance(merge, Merge):
                total += batch * merge.macs(hw, p)
                hw = merge.output_hw(hw)
            for blk in blocks:
                total += blk.macs(batch, hw, p)
                hw = blk.attn.output_hw(hw)
            if snorm is not None:
                total += batch * 5 * (p + hw[0] * hw[1]) * snorm.normalized_shape[0]
        c = self.norm.normalized_shape[0]
        return total + batch * (5 * (p + hw[0] * hw[1]) * c + c * self.head.out_features)

    # ------------------------------------------------------------------ forward
    def forward_features(self, img: torch.Tensor) -> torch.Tensor:
        x, hw = self.stem(img)  # (B, H*W, C)
        if self.pos_embed is not None:
            x = x + self._pos(hw)
        p = self.prefix
        if p:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, p + H*W, C)
        for merge, blocks, snorm in zip(self.merges, self.stages, self.stage_norms, strict=True):
            if isinstance(merge, Merge):
                x, hw = merge(x, hw, p)
            for blk in blocks:
                x, hw = blk(x, hw, p)
            if snorm is not None:
                x = snorm(x)
        x = self.norm(x)
        return x[:, 0] if p else x.mean(dim=1)  # (B, C)

    def _pos(self, hw: HW) -> torch.Tensor:
        """The absolute position table for an (H, W) stem map: (1, H*W, C)."""
        assert self.pos_embed is not None
        if tuple(hw) == tuple(self.pos_grid):
            return self.pos_embed
        grid = self.pos_embed.transpose(1, 2).reshape(1, -1, *self.pos_grid)  # (1, C, g_h, g_w)
        grid = F.interpolate(grid, size=hw, mode="bicubic", align_corners=False)  # (1, C, H, W)
        return grid.flatten(2).transpose(1, 2)  # (1, H*W, C)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(img))


def _as_hw(resolution: int | HW) -> HW:
    if isinstance(resolution, int):
        return (resolution, resolution)
    h, w = resolution
    return (int(h), int(w))
