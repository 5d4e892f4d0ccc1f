"""Video backbones on (T, H, W) token maps, the two published video models, their tiny variants and a
synthetic motion task.

Clip ``(B, 3, F, H, W)`` -> 3-D patch embedding (Conv3d) -> four stages of pre-norm blocks around any
mechanism that takes time (``attentions.get(name).time``), called as ``attn(x, (T, H, W))`` -> LayerNorm ->
mean of the tokens -> linear classifier. Between stages either Video Swin's patch merging (2x2 in space,
time kept) or, as in MViTv2, nothing: the first block of a stage pools its queries (and widens inside its
attention); the residual is then max-pooled with kernel s+1, stride s over (t, h, w).

Published configurations (facts only):
- Video Swin-T (Liu et al., CVPR 2022; SwinTransformer/Video-Swin-Transformer,
  swin_tiny_patch244_window877_kinetics400_1k): patch 2x4x4 with LayerNorm, depths 2, 2, 6, 2, widths 96-768,
  heads 3-24, windows 8x7x7 shifted by 4x3x3, patch merging, Kinetics-400 head: 28.2M parameters and
  88 GFLOPs per view at 32 x 224 x 224.
- MViTv2-S 16x4 (Li et al., CVPR 2022; facebookresearch/SlowFast, configs/Kinetics/MVITv2_S_16x4.yaml):
  patch Conv3d 3x7x7 stride 2x4x4 padding 1x3x3 (no norm), 16 blocks (1, 2, 11, 2), widths 96-768 and
  heads 1-8 doubling at blocks 1, 3 and 14 inside the attention, pooling kernel 3x3x3, query strides 1x2x2
  at the stage starts, key/value strides adaptive from 1x8x8, relative position over t, h and w, residual
  pooling, no absolute position: 34.5M parameters and 64 GFLOPs per view at 16 x 224 x 224 (the SlowFast
  model table). Its class token (``CLS_EMBED_ON``) is left out: the mean of the tokens is classified, as
  the other zoo models do (96 parameters fewer).
Papers' "GFLOPs" count a multiply-add once: they are compared with our MACs (FLOPs = 2 x MACs).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attnbench import attentions
from attnbench.errors import UnknownName

from .backbone import StageConfig
from .layers import DropPath, Mlp, init_linear

THW = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class VideoConfig:
    stages: tuple[StageConfig, ...]
    # 3-D patch embedding: kernel, stride and padding over (t, h, w); norm: a LayerNorm after it (Video Swin)
    patch_kernel: THW = (2, 4, 4)
    patch_stride: THW = (2, 4, 4)
    patch_padding: THW = (0, 0, 0)
    patch_norm: bool = True
    # "linear": Video Swin's patch merging (2x2 in space); "none": the stage's first block pools (MViTv2)
    merge: str = "linear"
    norm_eps: float = 1e-5
    drop_path: float = 0.0
    num_classes: int = 400
    in_chans: int = 3
    # The published input: frames x resolution x resolution.
    frames: int = 32
    resolution: int = 224


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class VideoBlock(nn.Module):
    """Pre-norm block ``x + DropPath(Attn(LN(x)))``, ``x + DropPath(MLP(LN(x)))`` on a (T, H, W) map.

    Where the width grows (``dim_in != dim``, MViTv2's stage starts) the attention widens itself (its
    ``dim_out`` knob) and the skip is ``Linear(dim_in, dim)`` of LN(x); where the attention pools its
    queries the skip is max-pooled (kernel s+1 where s > 1, stride s, padding kernel // 2; SlowFast's
    ``pool_skip``)."""

    def __init__(
        self, dim_in: int, dim: int, heads: int, attention: str, knobs: dict[str, Any], mlp_ratio: float, dp: float
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim_in, eps=knobs.pop("eps"))
        self.skip = nn.Linear(dim_in, dim) if dim_in != dim else None
        widen = {"dim_out": dim} if dim_in != dim else {}
        self.attn = attentions.build(attention, dim=dim_in, heads=heads, **knobs, **widen)
        if self.attn.output_dim != dim:
            raise ValueError(f"{attention} returns {self.attn.output_dim} channels in a block of width {dim}")
        self.drop_path = DropPath(dp)
        self.norm2 = nn.LayerNorm(dim, eps=self.norm1.eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        if self.skip is not None:
            init_linear(self.skip)

    def skip_pool(self, thw: THW) -> tuple[THW, THW, THW] | None:
        """Kernel, stride and padding of the skip's max pooling (None where the map keeps its size)."""
        out = self.attn.output_hw(thw)
        if tuple(out) == tuple(thw):
            return None
        stride = tuple(max(1, round(a / b)) for a, b in zip(thw, out, strict=True))
        kernel = tuple(s + 1 if s > 1 else s for s in stride)
        return kernel, stride, tuple(k // 2 for k in kernel)  # type: ignore[return-value]

    def forward(self, x: torch.Tensor, thw: THW) -> tuple[torch.Tensor, THW]:
        y = self.norm1(x)
        shortcut = x if self.skip is None else self.skip(y)  # (B, N, dim)
        out = self.attn(y, thw)  # (B, N', dim)
        out_thw = self.attn.output_hw(thw)
        pool = self.skip_pool(thw)
        if pool is not None:
            b, _, c = shortcut.shape
            m = shortcut.transpose(1, 2).reshape(b, c, *thw)  # (B, C, T, H, W)
            shortcut = F.max_pool3d(m, *pool).flatten(2).transpose(1, 2)  # (B, N', C)
        x = shortcut + self.drop_path(out)
        return x + self.drop_path(self.mlp(self.norm2(x), (1, 1))), out_thw

    def macs(self, batch: int, thw: THW) -> int:
        """Analytic multiply-adds (LayerNorm 5 per element; biases, GELU and additions free)."""
        dim_in, dim = self.norm1.normalized_shape[0], self.norm2.normalized_shape[0]
        n = math.prod(thw)
        out_thw = self.attn.output_hw(thw)
        n_out = math.prod(out_thw)
        per = 5 * n * dim_in + (n * dim_in * dim if self.skip is not None else 0)
        pool = self.skip_pool(thw)
        if pool is not None:
            per += n_out * dim * math.prod(pool[0])  # max pooling: one per output element and kernel tap
        hidden = self.mlp.fc1.out_features
        per += 5 * n_out * dim + n_out * 2 * dim * hidden
        return batch * per + self.attn.macs(batch, thw)


class PatchMerging3D(nn.Module):
    """Video Swin's patch merging: 2x2 spatial neighbours concatenated (time kept) -> LayerNorm(4C) ->
    Linear(4C, C', no bias); an odd H or W is zero-padded first."""

    def __init__(self, dim_in: int, dim_out: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim_in, eps=eps)
        self.reduction = nn.Linear(4 * dim_in, dim_out, bias=False)
        init_linear(self.reduction)

    def output_hw(self, thw: THW) -> THW:
        return (thw[0], (thw[1] + 1) // 2, (thw[2] + 1) // 2)

    def forward(self, x: torch.Tensor, thw: THW) -> tuple[torch.Tensor, THW]:
        b, _, c = x.shape
        m = x.view(b, *thw, c)  # (B, T, H, W, C)
        if thw[1] % 2 or thw[2] % 2:
            m = F.pad(m, (0, 0, 0, thw[2] % 2, 0, thw[1] % 2))
        # the official order: (even row, even col), (odd, even), (even, odd), (odd, odd)
        parts = [m[:, :, 0::2, 0::2], m[:, :, 1::2, 0::2], m[:, :, 0::2, 1::2], m[:, :, 1::2, 1::2]]
        m = torch.cat(parts, dim=-1)  # (B, T, H/2, W/2, 4C)
        out = (int(m.shape[1]), int(m.shape[2]), int(m.shape[3]))
        return self.reduction(self.norm(m.reshape(b, -1, 4 * c))), out  # (B, T*H/2*W/2, C')

    def macs(self, thw: THW) -> int:
        n, c4 = math.prod(self.output_hw(thw)), self.reduction.in_features
        return 5 * n * c4 + n * c4 * self.reduction.out_features


class VideoBackbone(nn.Module):
    def __init__(self, config: VideoConfig):
        super().__init__()
        cfg = self.config = config
        if cfg.merge not in ("linear", "none"):
            raise ValueError(f"merge must be 'linear' or 'none', got {cfg.merge!r}")
        for st in cfg.stages:
            for j in range(st.depth):
                name = st.block(j)[0]
                if not attentions.get(name).time.supported:
                    raise ValueError(f"{name} takes no time axis: {attentions.get(name).time.why_not}")
        dims = [st.dim for st in cfg.stages]
        self.patch = nn.Conv3d(cfg.in_chans, dims[0], cfg.patch_kernel, cfg.patch_stride, cfg.patch_padding)
        self.patch_norm = nn.LayerNorm(dims[0], eps=cfg.norm_eps) if cfg.patch_norm else None
        depth = sum(st.depth for st in cfg.stages)
        rates = [cfg.drop_path * i / max(depth - 1, 1) for i in range(depth)]  # linear, as torch.linspace
        self.merges = nn.ModuleList()
        self.stages = nn.ModuleList()
        k = 0
        for i, st in enumerate(cfg.stages):
            linear = i > 0 and cfg.merge == "linear"
            self.merges.append(PatchMerging3D(dims[i - 1], st.dim, cfg.norm_eps) if linear else nn.Identity())
            blocks = []
            for j in range(st.depth):
                name, knobs = st.block(j)
                dim_in = dims[i - 1] if (i > 0 and j == 0 and cfg.merge == "none") else st.dim
                knobs["eps"] = cfg.norm_eps
                blocks.append(VideoBlock(dim_in, st.dim, st.heads, name, knobs, st.mlp_ratio, rates[k]))
                k += 1
            self.stages.append(nn.ModuleList(blocks))
        self.norm = nn.LayerNorm(dims[-1], eps=cfg.norm_eps)
        self.head = nn.Linear(dims[-1], cfg.num_classes)
        init_linear(self.head)

    def patch_thw(self, clip: THW) -> THW:
        cfg = self.config
        return tuple(  # type: ignore[return-value]
            _conv_out(s, k, st, p)
            for s, k, st, p in zip(clip, cfg.patch_kernel, cfg.patch_stride, cfg.patch_padding, strict=True)
        )

    def stage_thws(self, clip: THW) -> list[list[THW]]:
        """The (T, H, W) map each block of each stage sees for an input clip (frames, H, W)."""
        thw, out = self.patch_thw(clip), []
        for merge, blocks in zip(self.merges, self.stages, strict=True):
            if isinstance(merge, PatchMerging3D):
                thw = merge.output_hw(thw)
            stage = []
            for blk in blocks:
                stage.append(thw)
                thw = blk.attn.output_hw(thw)
            out.append(stage)
        return out

    def unsupported(self, clip: THW, batch: int = 1) -> list[str]:
        """Why this model cannot run on a clip of (frames, H, W) (empty when it can)."""
        reasons = []
        for i, stage in enumerate(self.stage_thws(clip)):
            for j, (thw, blk) in enumerate(zip(stage, self.stages[i], strict=True)):
                found = blk.attn.unsupported(batch, thw)
                if found:
                    where = f"stage {i + 1} block {j + 1} ({blk.attn.name}) sees {'x'.join(map(str, thw))}"
                    reasons.append(f"{where}: " + "; ".join(found))
                    break
        return reasons

    def macs(self, batch: int, clip: THW) -> int:
        """Analytic multiply-adds of one forward pass: every layer's and every attention's own ``macs()``."""
        thw = self.patch_thw(clip)
        n, c = math.prod(thw), self.patch.out_channels
        total = batch * n * c * self.patch.in_channels * math.prod(self.config.patch_kernel)
        total += batch * 5 * n * c if self.patch_norm is not None else 0
        for merge, blocks in zip(self.merges, self.stages, strict=True):
            if isinstance(merge, PatchMerging3D):
                total += batch * merge.macs(thw)
                thw = merge.output_hw(thw)
            for blk in blocks:
                total += blk.macs(batch, thw)
                thw = blk.attn.output_hw(thw)
        c = self.norm.normalized_shape[0]
        return total + batch * (5 * math.prod(thw) * c + c * self.head.out_features)

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        """(B, C, F, H, W) -> (B, classes)."""
        m = self.patch(clip)  # (B, C, T, H, W)
        thw = (int(m.shape[2]), int(m.shape[3]), int(m.shape[4]))
        x = m.flatten(2).transpose(1, 2)  # (B, T*H*W, C), row-major (t, h, w)
        if self.patch_norm is not None:
            x = self.patch_norm(x)
        for merge, blocks in zip(self.merges, self.stages, strict=True):
            if isinstance(merge, PatchMerging3D):
                x, thw = merge(x, thw)
            for blk in blocks:
                x, thw = blk(x, thw)
        return self.head(self.norm(x).mean(dim=1))


# ---------------------------------------------------------------------- the zoo's video entries
# The tiny variants: the first two stages of the layout, narrow (widths 16, 32), on 8 frames of 32 px. Four
# stages of blocks and merges initialised at std 0.02 learn the motion task far slower (chance after 250
# AdamW steps where two stages pass 90% after 50; measured on the CPU), too slow for a test of seconds.
TINY_FRAMES, TINY_RESOLUTION = 8, 32


def video_swin_t(tiny: bool) -> VideoConfig:
    dims, heads, depths, window, window_t = (
        ((16, 32), (1, 2), (2, 2), 2, 2) if tiny else ((96, 192, 384, 768), (3, 6, 12, 24),
                                                                         (2, 2, 6, 2), 7, 8)
    )  # fmt: skip
    local = {"window": window, "window_t": window_t}
    knobs = (local, {**local, "shift": True})
    return VideoConfig(
        stages=tuple(
            StageConfig(dim=d, depth=n, heads=h, mlp_ratio=4.0, attention=("swin",), knobs=knobs)
            for d, n, h in zip(dims, depths, heads, strict=True)
        ),
        merge="linear",
        drop_path=0.0 if tiny else 0.1,
        num_classes=400,
        frames=TINY_FRAMES if tiny else 32,
        resolution=TINY_RESOLUTION if tiny else 224,
    )


def mvitv2_s_16x4(tiny: bool) -> VideoConfig:
    dims, heads, depths = ((16, 32), (1, 2), (1, 2)) if tiny else (
        (96, 192, 384, 768), (1, 2, 4, 8), (1, 2, 11, 2))  # fmt: skip
    frames, res = (TINY_FRAMES, TINY_RESOLUTION) if tiny else (16, 224)
    t, side = frames // 2, res // 4  # the patch embedding's stride 2x4x4
    kv = 8 if not tiny else 4  # POOL_KV_STRIDE_ADAPTIVE (1, 8, 8): divided by every query stride after
    stages = []
    for i, n in enumerate(depths):
        blocks = []
        for j in range(n):
            stride_q = 2 if (i > 0 and j == 0) else 1
            kv = max(kv // stride_q, 1)
            # tables sized for the block's input map at the published clip; kernel 3x3x3 (POOL_KVQ_KERNEL)
            blocks.append({"stride_q": stride_q, "stride_kv": kv, "rel_pos_size": side, "kernel_t": 3,
                           "rel_pos_frames": t})  # fmt: skip
            side = (side + 1) // stride_q if stride_q > 1 else side
        stages.append(StageConfig(dim=dims[i], depth=n, heads=heads[i], mlp_ratio=4.0, attention=("pooling",),
                                  knobs=tuple(blocks)))  # fmt: skip
    return VideoConfig(
        stages=tuple(stages),
        patch_kernel=(3, 7, 7),
        patch_stride=(2, 4, 4),
        patch_padding=(1, 3, 3),
        patch_norm=False,
        merge="none",
        norm_eps=1e-6,
        drop_path=0.0 if tiny else 0.2,
        num_classes=400,
        frames=frames,
        resolution=res,
    )


@dataclasses.dataclass(frozen=True)
class VideoEntry:
    name: str
    summary: str
    config: Callable[[bool], VideoConfig]
    params: float  # published parameters
    gmacs: float  # published "GFLOPs" per view (multiply-adds) at the published clip
    source: str


VIDEO_ZOO: dict[str, VideoEntry] = {
    e.name: e
    for e in (
        VideoEntry("video_swin_t", "Video Swin-T: 3-D shifted windows 8x7x7, patch 2x4x4", video_swin_t, 28.2e6,
                   88.0, "Liu et al., CVPR 2022 (Kinetics-400, 32 x 224 x 224)"),
        VideoEntry("mvitv2_s_16x4", "MViTv2-S 16x4: 3-D pooling attention, relative position over t, h, w",
                   mvitv2_s_16x4, 34.5e6, 64.0, "Li et al., CVPR 2022; SlowFast model table (K400, 16 x 224 x 224)"),
    )
}  # fmt: skip


def video_available() -> list[str]:
    return list(VIDEO_ZOO)


def video_entry(name: str) -> VideoEntry:
    try:
        return VIDEO_ZOO[name]
    except KeyError:
        raise UnknownName(f"unknown video model {name!r}; available: {', '.join(VIDEO_ZOO)}") from None


def create_video(name: str, tiny: bool = False, num_classes: int | None = None) -> VideoBackbone:
    """Build a video zoo model: ``create_video("video_swin_t")``, ``create_video("mvitv2_s_16x4", tiny=True)``."""
    cfg = video_entry(name).config(tiny)
    if num_classes is not None:
        cfg = dataclasses.replace(cfg, num_classes=num_classes)
    return VideoBackbone(cfg)


# ---------------------------------------------------------------------- the motion task
class SyntheticMotion(torch.utils.data.Dataset):
    """Clips of ``shapes`` squares moving together in one of four directions (or two: right, left) over a
    noisy background; the label is the direction.

    Every square starts anywhere (uniformly) and wraps around the borders, so each frame alone is equally
    likely under every class: only the change between frames tells the direction. Several squares make the
    motion cover much of the clip. Clips are (3, frames, res, res) in [-1, 1], generated deterministically
    from (seed, split, index).
    """

    classes = ("right", "left", "down", "up")
    STEPS = ((0, 1), (0, -1), (1, 0), (-1, 0))  # (rows, columns) per frame

    def __init__(self, size: int, frames: int = TINY_FRAMES, resolution: int = TINY_RESOLUTION, split: str = "train",
                 seed: int = 0, directions: int = 4, shapes: int = 6):  # fmt: skip
        if split not in ("train", "val"):
            raise ValueError(f"split must be train or val, got {split!r}")
        if directions not in (2, 4):
            raise ValueError(f"directions must be 2 (right, left) or 4 (right, left, down, up), got {directions}")
        self.size, self.frames, self.resolution, self.split, self.seed = size, frames, resolution, split, seed
        self.directions, self.shapes = directions, shapes
        self.side = max(2, resolution // 5)  # of a square
        self.speed = max(1, resolution // 16)  # pixels per frame: half a 4-pixel patch at 32 px

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        rng = np.random.default_rng([self.seed, ("train", "val").index(self.split), index])
        label = int(rng.integers(self.directions))
        r, side = self.resolution, self.side
        canvas, mask = np.zeros((3, r, r)), np.zeros((r, r), dtype=bool)  # the first frame's squares
        for _ in range(self.shapes):
            y0, x0 = (int(v) for v in rng.integers(r, size=2))
            ys, xs = (y0 + np.arange(side)) % r, (x0 + np.arange(side)) % r
            canvas[:, ys[:, None], xs[None, :]] = rng.uniform(0.6, 1.0, size=3)[:, None, None]
            mask[ys[:, None], xs[None, :]] = True
        clip = rng.uniform(0.0, 0.3, size=(3, self.frames, r, r))  # background noise, new in every frame
        dy, dx = self.STEPS[label]
        for t in range(self.frames):
            shift = (t * dy * self.speed, t * dx * self.speed)
            on = np.roll(mask, shift, axis=(0, 1))  # (H, W)
            clip[:, t] = np.where(on, np.roll(canvas, shift, axis=(1, 2)), clip[:, t])
        return torch.from_numpy((clip - 0.5) / 0.5).float(), label


def train_motion(model: nn.Module, steps: int = 40, batch: int = 16, lr: float = 2e-3, seed: int = 0,
                 val_size: int = 128, directions: int = 4) -> dict[str, float]:  # fmt: skip
    """Train ``model`` on the motion task for ``steps`` AdamW steps; return its held-out accuracy and final loss."""
    torch.manual_seed(seed)
    frames, res = model.config.frames, model.config.resolution  # type: ignore[union-attr]
    train = SyntheticMotion(steps * batch, frames, res, "train", seed, directions)
    val = SyntheticMotion(val_size, frames, res, "val", seed, directions)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        xs, ys = zip(*(train[step * batch + i] for i in range(batch)), strict=True)
        loss = F.cross_entropy(model(torch.stack(xs)), torch.tensor(ys))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        xs, ys = zip(*(val[i] for i in range(val_size)), strict=True)
        pred = model(torch.stack(xs)).argmax(-1)
    return {"accuracy": float((pred == torch.tensor(ys)).float().mean()), "loss": float(loss.detach())}
