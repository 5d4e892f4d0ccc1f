"""CrossViT (Chen et al., ICCV 2021): a dual-branch ViT fused by CLS-token cross attention.

Two ViT branches see the image at two patch sizes (CrossViT-9: 12 px patches of
the 240 px image and 16 px patches of the image resized to 224 px). Each
multi-scale block runs ``depths[b]`` plain ViT blocks in branch ``b``, then
fuses: each branch's CLS token, projected to the other branch's width, attends
to the other branch's patch tokens and is projected back (the registry's
``cross`` mechanism does all of that). Each branch ends with LayerNorm on its
CLS token and a linear head; the logits of the two heads are averaged.

``fusion`` chooses one of the four strategies of the paper's Fig. 3 (each branch b
fuses with the other branch o; ``proj`` is LayerNorm-GELU-Linear from o's width to b's):

- ``cross-attention`` (the paper's choice, above): only the CLS tokens change;
- ``all-attention`` (the paper's Eq. 2): ``y = [f^l(x^l) || f^s(x^s)]``, ``o = y + MSA(LN(y))``,
  ``z^i = g^i(o^i)``: one self-attention per multi-scale block over every token of both
  branches, CLS tokens included, at one common width; each branch keeps the outputs of
  its own tokens. The paper does not name that width (and the official code has no
  all-attention): ours is the large (wider) branch's, with its heads. ``f^i`` / ``g^i``
  are ``proj`` to and from that width for both branches, as the equation writes them
  (also for the branch already at that width); the residual is taken at the common width;
- ``class-token``: ``cls_b + proj(cls_o)``; patch tokens pass unchanged;
- ``pairwise``: the CLS tokens as in class-token, and each patch token of b adds the
  token of o at the same place (o's projected patch map resized bilinearly to b's grid);
- ``none`` (the paper's Table 6 baseline): the branches never exchange anything; only their
  heads' logits are averaged.

``patch_mixing=False`` (not in the paper) lets every patch token of a ViT block see only itself, while
the CLS token still reads every token of its branch: the CLS tokens become read-outs of tokens that
never saw each other, and a read-out followed by an MLP can still compare them.

``isolated=True`` (not in the paper; the positive control of ``experiments/crossvit_fusion.yaml``) takes
every exchange away: in every ViT block each token, the CLS included, sees only itself, the branches do
not fuse (it needs ``fusion="none"``), and each head reads the mean of its branch's normalised patch
tokens instead of the CLS token. The logits are then a sum of one term per token, as with the backbones'
window-1 control and mean-pool head.

Position embeddings are learned for the native grids and resized (bicubic) to
the current grids, so other resolutions run without rebuilding.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from attnbench.attentions.cross import branch_projection
from torch import nn

from attnbench import attentions

from .layers import HW, DropPath, Mlp, init_linear

EPS = 1e-6  # CrossViT's LayerNorm eps
FUSIONS = ("cross-attention", "all-attention", "class-token", "pairwise", "none")
MIXING = ("all", "cls", "none")  # who a ViT block's tokens see: all, only the CLS reads, each only itself


@dataclasses.dataclass(frozen=True)
class CrossViTConfig:
    dims: tuple[int, int] = (128, 256)
    patches: tuple[int, int] = (12, 16)
    # Native image side of each branch: branch 1 sees the image resized by resolutions[1] / resolutions[0].
    resolutions: tuple[int, int] = (240, 224)
    heads: tuple[int, int] = (4, 4)
    depths: tuple[int, int] = (1, 3)  # ViT blocks per branch in each multi-scale block
    fusions: int = 3  # multi-scale blocks
    mlp_ratio: float = 3.0
    drop_path: float = 0.0
    num_classes: int = 1000
    in_chans: int = 3
    fusion: str = "cross-attention"  # one of FUSIONS (the paper's Fig. 3)
    patch_mixing: bool = True  # False: a patch token sees only itself in the ViT blocks (the CLS reads all)
    isolated: bool = False  # True: every token sees only itself, no fusion, heads read the mean patch token

    @property
    def resolution(self) -> int:
        return self.resolutions[0]


class ViTBlock(nn.Module):
    """Pre-norm ViT block; the CLS token takes part in the attention like any token."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, drop_path: float, mixing: str = "all"):
        super().__init__()
        if mixing not in MIXING:
            raise ValueError(f"ViTBlock mixing must be one of {', '.join(MIXING)}, got {mixing!r}")
        self.mixing = mixing
        self.norm1 = nn.LayerNorm(dim, eps=EPS)
        self.attn = attentions.build("full", dim=dim, heads=heads, qkv_bias=True)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def macs(self, batch: int, tokens: int) -> int:
        c = self.norm1.normalized_shape[0]
        own = 2 * 5 * tokens * c + self.mlp.macs((1, tokens))
        if self.mixing == "none":  # every token on its own
            return batch * own + self.attn.macs(batch * tokens, (1, 1))
        mixing = self.attn.macs(batch, (1, tokens))
        if self.mixing == "cls":  # the whole row for the CLS's output, then each patch token on its own
            mixing += self.attn.macs(batch * (tokens - 1), (1, 1))
        return batch * own + mixing

    def _attend(self, h: torch.Tensor) -> torch.Tensor:
        b, n, c = h.shape
        if self.mixing == "none":
            return self.attn(h.reshape(b * n, 1, c), (1, 1)).reshape(b, n, c)  # (B * (1 + H*W), 1, C): one key each
        # Full attention ignores the layout, so CLS + H*W tokens are passed as one 1 x (1 + H*W) row.
        out = self.attn(h, (1, n))  # (B, 1 + H*W, C)
        if self.mixing == "all":
            return out
        alone = self.attn(h[:, 1:].reshape(b * (n - 1), 1, c), (1, 1))  # (B * H*W, 1, C): one key each
        return torch.cat([out[:, :1], alone.reshape(b, n - 1, c)], dim=1)  # (B, 1 + H*W, C)

    def forward(self, x: torch.Tensor, hw: HW) -> torch.Tensor:
        x = x + self.drop_path(self._attend(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x), hw))


class _Fusion(nn.Module):
    """One branch's fusion with the other branch (class-token or pairwise; see the module doc)."""

    def __init__(self, kind: str, dim: int, other_dim: int):
        super().__init__()
        self.kind = kind
        self.proj = branch_projection(other_dim, dim)
        self.proj.apply(init_linear)

    def forward(self, x: torch.Tensor, hw: HW, other: torch.Tensor, other_hw: HW) -> torch.Tensor:
        if self.kind == "class-token":
            return torch.cat([x[:, :1] + self.proj(other[:, :1]), x[:, 1:]], dim=1)  # (B, 1 + H*W, C)
        o = self.proj(other)  # (B, 1 + Ho*Wo, C)
        grid = o[:, 1:].transpose(1, 2).reshape(o.shape[0], -1, *other_hw)  # (B, C, Ho, Wo)
        if tuple(other_hw) != tuple(hw):
            grid = F.interpolate(grid, size=hw, mode="bilinear", align_corners=False)  # (B, C, H, W)
        return x + torch.cat([o[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)  # (B, 1 + H*W, C)

    def macs(self, batch: int, hw: HW, other_hw: HW) -> int:
        c, co = self.proj[2].out_features, self.proj[2].in_features
        n, no = hw[0] * hw[1], other_hw[0] * other_hw[1]
        projected = 1 if self.kind == "class-token" else 1 + no
        total = batch * projected * (5 * co + co * c)
        if self.kind == "pairwise" and tuple(hw) != tuple(other_hw):
            total += batch * 4 * n * c  # bilinear resize: 4 per output element
        return total


class _AllAttention(nn.Module):
    """Both branches' all-attention fusion (the paper's Eq. 2): one self-attention over the tokens of both, at
    the wider branch's width and heads; ``f^i`` and ``g^i`` are ``proj`` to and from it for each branch i."""

    def __init__(self, dims: tuple[int, int], heads: tuple[int, int]):
        super().__init__()
        wide = int(dims[1] >= dims[0])
        self.width = c = dims[wide]
        self.to_common = nn.ModuleList(branch_projection(d, c) for d in dims)  # f^i
        self.from_common = nn.ModuleList(branch_projection(c, d) for d in dims)  # g^i
        self.to_common.apply(init_linear)
        self.from_common.apply(init_linear)
        self.norm = nn.LayerNorm(c, eps=EPS)
        self.attn = attentions.build("full", dim=c, heads=heads[wide], qkv_bias=True)

    def forward(self, xs: list[torch.Tensor], hws: list[HW]) -> list[torch.Tensor]:
        n0 = xs[0].shape[1]
        y = torch.cat([f(x) for f, x in zip(self.to_common, xs, strict=True)], dim=1)  # (B, N0 + N1, C)
        o = y + self.attn(self.norm(y), (1, y.shape[1]))  # (B, N0 + N1, C); full attention ignores the layout
        return [self.from_common[0](o[:, :n0]), self.from_common[1](o[:, n0:])]  # (B, N0, C0), (B, N1, C1)

    def macs(self, batch: int, hws: list[HW]) -> int:
        c = self.width
        ns = [1 + h * w for h, w in hws]
        total = 0
        for f, n in zip(self.to_common, ns, strict=True):
            d = f[2].in_features
            total += n * (5 * d + d * c) + n * (5 * c + c * d)  # LayerNorm + Linear, each way
        tokens = sum(ns)
        return batch * (total + 5 * tokens * c) + self.attn.macs(batch, (1, tokens))


def _fuser(kind: str, cfg: CrossViTConfig, b: int, grids: list[int]) -> nn.Module:
    if kind == "cross-attention":
        return attentions.build(
            "cross",
            dim=cfg.dims[b],
            heads=cfg.heads[1 - b],  # the fusion runs at the other branch's width, with its heads
            context_dim=cfg.dims[1 - b],
            context_scale=grids[1 - b] / grids[b],
        )
    return _Fusion(kind, cfg.dims[b], cfg.dims[1 - b])


class CrossViT(nn.Module):
    def __init__(self, config: CrossViTConfig):
        super().__init__()
        if config.fusion not in FUSIONS:
            raise ValueError(f"CrossViT fusion must be one of {', '.join(FUSIONS)}, got {config.fusion!r}")
        if config.isolated and config.fusion != "none":
            raise ValueError(
                f"an isolated CrossViT has no fusion (its branches exchange nothing): set fusion='none', "
                f"got {config.fusion!r}"
            )
        mixing = "none" if config.isolated else "all" if config.patch_mixing else "cls"
        self.config = cfg = config
        self.prefix = 1
        self.native_grids = [r // p for r, p in zip(cfg.resolutions, cfg.patches, strict=True)]
        self.embeds = nn.ModuleList(
            nn.Conv2d(cfg.in_chans, d, p, stride=p) for d, p in zip(cfg.dims, cfg.patches, strict=True)
        )
        self.cls_tokens = nn.ParameterList(nn.Parameter(torch.zeros(1, 1, d)) for d in cfg.dims)
        self.pos_embeds = nn.ParameterList(
            nn.Parameter(torch.zeros(1, 1 + g * g, d)) for g, d in zip(self.native_grids, cfg.dims, strict=True)
        )
        for p in [*self.cls_tokens, *self.pos_embeds]:
            nn.init.trunc_normal_(p, std=0.02)
        per_fusion = max(cfg.depths)
        rates = torch.linspace(0, cfg.drop_path, cfg.fusions * per_fusion).tolist()
        self.branches = nn.ModuleList()
        self.fusers = nn.ModuleList()
        for f in range(cfg.fusions):
            self.branches.append(
                nn.ModuleList(
                    nn.ModuleList(
                        ViTBlock(cfg.dims[b], cfg.heads[b], cfg.mlp_ratio, rates[f * per_fusion + j], mixing)
                        for j in range(cfg.depths[b])
                    )
                    for b in range(2)
                )
            )
            if cfg.fusion == "all-attention":  # one module fuses both branches at once
                self.fusers.append(_AllAttention(cfg.dims, cfg.heads))
            elif cfg.fusion == "none":
                self.fusers.append(nn.ModuleList())
            else:
                self.fusers.append(nn.ModuleList(_fuser(cfg.fusion, cfg, b, self.native_grids) for b in range(2)))
        self.norms = nn.ModuleList(nn.LayerNorm(d, eps=EPS) for d in cfg.dims)
        self.heads = nn.ModuleList(nn.Linear(d, cfg.num_classes) for d in cfg.dims)
        self.heads.apply(init_linear)

    # ------------------------------------------------------------------ resolution
    def branch_sizes(self, resolution: int | HW) -> list[HW]:
        """Image size each branch sees: branch 1 is resized to a multiple of its patch."""
        h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
        cfg = self.config
        scale = cfg.resolutions[1] / cfg.resolutions[0]
        p1 = cfg.patches[1]
        return [(h, w), (max(p1, round(h * scale / p1) * p1), max(p1, round(w * scale / p1) * p1))]

    def unsupported(self, resolution: int | HW, batch: int = 1) -> list[str]:
        h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
        p0 = self.config.patches[0]
        if h % p0 or w % p0 or min(h, w) < p0:
            return [
                f"CrossViT's small branch cuts {p0} px patches, so the image side must be a positive multiple of "
                f"{p0}, got {h}x{w}; native is {self.config.resolution}"
            ]
        return []

    def macs(self, batch: int, resolution: int | HW) -> int:
        """Analytic multiply-adds of one forward pass (FLOPs = 2 * MACs); interpolation counts 4 per output."""
        sizes = self.branch_sizes(resolution)
        cfg = self.config
        total = 4 * cfg.in_chans * sizes[1][0] * sizes[1][1] if sizes[1] != sizes[0] else 0  # bicubic resize
        hws, tables = [], 0
        for b in range(2):
            p, d, g = cfg.patches[b], cfg.dims[b], self.native_grids[b]
            hw = (sizes[b][0] // p, sizes[b][1] // p)
            hws.append(hw)
            total += hw[0] * hw[1] * d * cfg.in_chans * p * p
            if hw != (g, g):
                tables += 4 * d * hw[0] * hw[1]  # the position table resized: once per call, not per image
        total = total * batch + tables
        for blocks, fusers in zip(self.branches, self.fusers, strict=True):
            for b in range(2):
                total += sum(blk.macs(batch, 1 + hws[b][0] * hws[b][1]) for blk in blocks[b])
            if isinstance(fusers, _AllAttention):
                total += fusers.macs(batch, hws)
            elif len(fusers):
                total += sum(fusers[b].macs(batch, hws[b], hws[1 - b]) for b in range(2))
        if cfg.isolated:  # LayerNorm on every patch token, then the head on their mean (a mean counts none)
            read = sum(5 * d * hw[0] * hw[1] + d * cfg.num_classes for d, hw in zip(cfg.dims, hws, strict=True))
        else:
            read = sum(5 * d + d * cfg.num_classes for d in cfg.dims)
        return total + batch * read

    # ------------------------------------------------------------------ forward
    def _embed(self, b: int, img: torch.Tensor) -> tuple[torch.Tensor, HW]:
        m = self.embeds[b](img)  # (B, C, H/p, W/p)
        hw = (int(m.shape[-2]), int(m.shape[-1]))
        x = m.flatten(2).transpose(1, 2)  # (B, H*W, C)
        cls = self.cls_tokens[b].expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self._pos(b, hw), hw  # (B, 1 + H*W, C)

    def _pos(self, b: int, hw: HW) -> torch.Tensor:
        pos = self.pos_embeds[b]
        g = self.native_grids[b]
        if tuple(hw) == (g, g):
            return pos
        grid = pos[:, 1:].transpose(1, 2).reshape(1, -1, g, g)  # (1, C, g, g)
        grid = F.interpolate(grid, size=hw, mode="bicubic", align_corners=False)  # (1, C, H, W)
        return torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        sizes = self.branch_sizes((int(img.shape[-2]), int(img.shape[-1])))
        imgs = [img, img]
        if sizes[1] != sizes[0]:
            imgs[1] = F.interpolate(img, size=sizes[1], mode="bicubic", align_corners=False)
        xs, hws = zip(*(self._embed(b, imgs[b]) for b in range(2)), strict=True)
        xs = list(xs)
        for blocks, fusers in zip(self.branches, self.fusers, strict=True):
            for b in range(2):
                for blk in blocks[b]:
                    xs[b] = blk(xs[b], hws[b])
            if isinstance(fusers, _AllAttention):
                xs = fusers(xs, list(hws))
            elif self.config.fusion == "none":
                continue
            elif self.config.fusion == "cross-attention":
                xs = [fusers[b](xs[b], hws[b], context=xs[1 - b], context_hw=hws[1 - b]) for b in range(2)]
            else:
                xs = [fusers[b](xs[b], hws[b], xs[1 - b], hws[1 - b]) for b in range(2)]
        # isolated: the mean of each branch's normalised patch tokens (one term per token); else its CLS token
        iso = self.config.isolated
        read = [norm(x[:, 1:]).mean(dim=1) if iso else norm(x[:, 0]) for x, norm in zip(xs, self.norms, strict=True)]
        logits = [head(r) for r, head in zip(read, self.heads, strict=True)]
        return torch.stack(logits).mean(dim=0)
