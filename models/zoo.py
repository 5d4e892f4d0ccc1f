"""The published configurations, the pyramid_<mechanism> family and their tiny variants.

Every entry builds a full-size model (the published configuration, at its native
resolution) and a tiny one (same layout and mechanisms, narrow, at 32 px, to
train on a CPU in seconds; its stage maps are 8, 4, 2 and 1 tokens wide).
Published numbers are the papers' "FLOPs", which count a multiply-add once: they
are multiply-adds (GMACs), so they are compared with our ``macs`` (FLOPs = 2 * MACs).

Sources (facts only: depths, widths, heads, window, ratios, strides):
- Swin-T: Liu et al., ICCV 2021, microsoft/Swin-Transformer: 28.3M, 4.5 GMACs at 224.
- PVTv2-b0: Wang et al., CVMJ 2022, whai362/PVT: 3.7M, 0.6 GMACs at 224.
- QuadTree-B-b0: Tang et al., ICLR 2022, Tangshitao/QuadTreeAttention (classification/quadtree.py,
  quadtree_b0: the PVTv2-b0 layout with QuadTree-B, levels 4, 3, 2, 1, top-K 8, conv values, LePE): 0.6 GMACs.
- DAT-T: Xia et al., CVPR 2022, LeapLabTHU/DAT (configs/dat_tiny.yaml of the CVPR release): 29M, 4.6 GMACs.
- MViTv2-T: Li et al., CVPR 2022, facebookresearch/mvit (configs/MVITv2_T.yaml): 24M, 4.7 GMACs.
- CrossViT-9: Chen et al., ICCV 2021, IBM/CrossViT (crossvit_9_224): 8.6M, 1.8 GMACs at 240/224.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from typing import Any

from torch import nn

from attnbench import attentions
from attnbench.errors import UnknownName

from .backbone import Backbone, BackboneConfig, StageConfig
from .crossvit import CrossViT, CrossViTConfig

TINY_RESOLUTION = 32
# The tiny variants run at 32 px and at their other resolution: their knobs must fit the stage maps of both.
TINY_OTHER_RESOLUTION = 64

Config = BackboneConfig | CrossViTConfig


@dataclasses.dataclass(frozen=True)
class Published:
    params: float  # parameters
    gmacs: float  # the paper's "GFLOPs" (multiply-adds) at the native resolution
    source: str


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    summary: str
    config: Callable[[bool], Config]  # tiny -> configuration
    published: Published | None = None
    # Resolutions other than the native one, in order of preference: the first at which the full-size
    # model runs is its other resolution; the tiny model runs at tiny_other_resolution.
    other_resolutions: tuple[int, ...] = (448,)
    tiny_other_resolution: int = TINY_OTHER_RESOLUTION

    @property
    def other_resolution(self) -> int:
        """The first of ``other_resolutions`` at which every block of the full-size model runs (the last if none)."""
        *first, last = self.other_resolutions
        for res in first:
            model = create(self.name)
            if not getattr(model, "unsupported", lambda r: [])(res):
                return res
        return last


_ZOO: dict[str, Entry] = {}


def _add(entry: Entry) -> Entry:
    _ZOO[entry.name] = entry
    return entry


def _stages(dims, depths, heads, mlp, attention, knobs) -> tuple[StageConfig, ...]:
    """Four StageConfigs; ``attention[i]`` and ``knobs[i]`` are the (cycled) tuples of stage i."""
    return tuple(
        StageConfig(dim=d, depth=n, heads=h, mlp_ratio=m, attention=a, knobs=k)
        for d, n, h, m, a, k in zip(dims, depths, heads, mlp, attention, knobs, strict=True)
    )


def _swin_knobs(window: int, shift_size: int = 0) -> tuple[dict[str, Any], ...]:
    """Local then shifted windows; shift_size 0 rolls by window // 2 (Swin)."""
    shifted = {"window": window, "shift": True} | ({"shift_size": shift_size} if shift_size else {})
    return ({"window": window}, shifted)


# ---------------------------------------------------------------------- Swin-T
def swin_t(tiny: bool) -> BackboneConfig:
    dims, heads, window, res = (
        ((16, 32, 48, 64), (1, 2, 3, 4), 2, TINY_RESOLUTION) if tiny else ((96, 192, 384, 768), (3, 6, 12, 24), 7, 224)
    )
    return BackboneConfig(
        stages=_stages(dims, (2, 2, 6, 2) if not tiny else (2, 2, 2, 2), heads, (4,) * 4, [("swin",)] * 4,
                       [_swin_knobs(window)] * 4),
        stem="patch",
        merge="linear",
        drop_path=0.0 if tiny else 0.2,
        resolution=res,
    )  # fmt: skip


# ---------------------------------------------------------------------- PVTv2-b0 layout
B0_DIMS, B0_HEADS, B0_MLP = (32, 64, 160, 256), (1, 2, 5, 8), (8, 8, 4, 4)
TINY_DIMS, TINY_HEADS = (16, 32, 48, 64), (1, 2, 3, 4)


def _b0(tiny: bool, attention: list[tuple[str, ...]], knobs: list[tuple[dict[str, Any], ...]]) -> BackboneConfig:
    dims, heads = (TINY_DIMS, TINY_HEADS) if tiny else (B0_DIMS, B0_HEADS)
    return BackboneConfig(
        stages=_stages(dims, (2, 2, 2, 2), heads, B0_MLP, attention, knobs),
        stem="overlap",
        merge="overlap",
        conv_mlp=True,
        stage_norm=True,
        norm_eps=1e-6,
        embed_eps=1e-5,  # the overlapping patch embedding's LayerNorm keeps torch's default
        drop_path=0.0 if tiny else 0.1,
        resolution=TINY_RESOLUTION if tiny else 224,
    )


def _maps(tiny: bool) -> tuple[int, ...]:
    """Side of the token map of each stage at the native resolution (stride 4, 8, 16, 32)."""
    res = TINY_RESOLUTION if tiny else 224
    return tuple(res // s for s in (4, 8, 16, 32))


def _pyramid_knobs(mechanism: str, tiny: bool) -> list[tuple[dict[str, Any], ...]]:
    """The mechanism's own per-stage knobs (``stage_knobs``), fitted by the registry to every stage map the
    model runs at (the native one; for tiny variants also TINY_OTHER_RESOLUTION's)."""
    dims, heads = (TINY_DIMS, TINY_HEADS) if tiny else (B0_DIMS, B0_HEADS)
    resolutions = (TINY_RESOLUTION, TINY_OTHER_RESOLUTION) if tiny else (224,)
    cls = attentions.get(mechanism)
    out = []
    for i, side in enumerate(_maps(tiny)):
        maps = [(r // 2 ** (i + 2), r // 2 ** (i + 2)) for r in resolutions]
        blocks = []
        for knobs in cls.stage_knobs(i + 1, (side, side)):
            with contextlib.suppress(attentions.KnobError):  # nothing fits: Backbone.unsupported says why
                knobs = attentions.fit_knobs(mechanism, maps, dim=dims[i], heads=heads[i], knobs=knobs)
            blocks.append(knobs)
        out.append(tuple(blocks))
    return out


def pyramid(mechanism: str) -> Callable[[bool], BackboneConfig]:
    def config(tiny: bool) -> BackboneConfig:
        return _b0(tiny, [(mechanism,)] * 4, _pyramid_knobs(mechanism, tiny))

    return config


# PVTv2-b0 and QuadTree-B-b0 are the pyramids of their mechanisms: the knobs are the mechanisms' stage_knobs.
pvt_v2_b0 = pyramid("pvt")
quadtree_b_b0 = pyramid("quadtree")


# ---------------------------------------------------------------------- DAT-T
def dat_t(tiny: bool) -> BackboneConfig:
    if tiny:
        dims, depths, heads, window, groups = TINY_DIMS, (2, 2, 2, 2), (1, 2, 3, 4), 2, (1, 2)
    else:
        dims, depths, heads, window, groups = (96, 192, 384, 768), (2, 2, 6, 2), (3, 6, 12, 24), 7, (3, 6)
    maps = _maps(tiny)
    local = {"window": window}
    # DAT's shifted windows roll by ceil(window / 2) (4 for 7), Swin's by window // 2
    shifted = _swin_knobs(window, math.ceil(window / 2))
    deform = [
        # DAT-T: stride 1, offset range factor 2, bias table of the stage's map; offset kernel 5 at 14x14, 3 at 7x7.
        {"stride": 1, "kernel": k, "groups": g, "offset_range_factor": 2.0, "use_pe": True, "table_hw": (m, m)}
        for k, g, m in zip((5, 3), groups, maps[2:], strict=True)
    ]
    return BackboneConfig(
        stages=_stages(
            dims, depths, heads, (4,) * 4,
            [("swin",), ("swin",), ("swin", "deformable"), ("swin", "deformable")],
            [shifted, shifted, (local, deform[0]), (local, deform[1])],
        ),
        stem="patch",
        merge="conv",
        drop_path=0.0 if tiny else 0.2,
        resolution=TINY_RESOLUTION if tiny else 224,
    )  # fmt: skip


# ---------------------------------------------------------------------- MViTv2-T
def mvitv2_t(tiny: bool) -> BackboneConfig:
    dims, heads = (TINY_DIMS, TINY_HEADS) if tiny else ((96, 192, 384, 768), (1, 2, 4, 8))
    depths = (1, 2, 2, 2) if tiny else (1, 2, 5, 2)
    side = (TINY_RESOLUTION if tiny else 224) // 4
    kv = 4  # POOL_KV_STRIDE_ADAPTIVE: 4 at the first stage, divided by every query stride after
    knobs: list[tuple[dict[str, Any], ...]] = []
    for i, n in enumerate(depths):
        stage = []
        for j in range(n):
            stride_q = 2 if (i > 0 and j == 0) else 1
            kv = max(kv // stride_q, 1)
            # Relative-position tables sized for the block's input map at the native resolution.
            block = {"stride_q": stride_q, "stride_kv": kv, "rel_pos_size": side}
            if stride_q > 1:
                # DIM_MUL_IN_ATT: the stage's first block widens inside its attention (qkv: previous width ->
                # 3 x this stage's), and its skip connection is Linear(previous, this) of the normed input.
                block["dim_out"] = dims[i]
            stage.append(block)
            side = (side + 1) // stride_q if stride_q > 1 else side
        knobs.append(tuple(stage))
    return BackboneConfig(
        stages=_stages(dims, depths, heads, (4,) * 4, [("pooling",)] * 4, knobs),
        stem="conv",
        merge="none",
        norm_eps=1e-6,
        drop_path=0.0 if tiny else 0.1,
        resolution=TINY_RESOLUTION if tiny else 224,
    )


# ---------------------------------------------------------------------- CrossViT-9
def crossvit_9(tiny: bool) -> CrossViTConfig:
    if tiny:
        return CrossViTConfig(
            dims=(16, 32), patches=(4, 8), resolutions=(TINY_RESOLUTION, 24), heads=(2, 2), depths=(1, 2), fusions=2
        )
    return CrossViTConfig(drop_path=0.1)


_add(
    Entry(
        "swin_t",
        "Swin-T: shifted windows of 7, patch merging",
        swin_t,
        Published(28.3e6, 4.5, "Liu et al., ICCV 2021"),
        other_resolutions=(448,),
    )
)
_add(
    Entry(
        "pvt_v2_b0",
        "PVTv2-b0: spatial-reduction attention (sr 8, 4, 2, 1), overlapping patches, conv-FFN",
        pvt_v2_b0,
        Published(3.7e6, 0.6, "Wang et al., CVMJ 2022"),
        other_resolutions=(320,),
    )
)
_add(
    Entry(
        "quadtree_b_b0",
        "QuadTree-B-b0: PVTv2-b0 layout, QuadTree-B (levels 4, 3, 2, 1, top-K 8)",
        quadtree_b_b0,
        Published(3.5e6, 0.6, "Tang et al., ICLR 2022"),
        other_resolutions=(448,),
    )
)
_add(
    Entry(
        "dat_t",
        "DAT-T: Swin-T layout, deformable attention in stages 3 and 4",
        dat_t,
        Published(29e6, 4.6, "Xia et al., CVPR 2022"),
        other_resolutions=(448,),
    )
)
_add(
    Entry(
        "mvitv2_t",
        "MViTv2-T: pooling attention, pooled queries between stages",
        mvitv2_t,
        Published(24e6, 4.7, "Li et al., CVPR 2022"),
        other_resolutions=(256,),
    )
)
_add(
    Entry(
        "crossvit_9",
        "CrossViT-9: two branches (12 px / 16 px patches) fused by CLS cross attention",
        crossvit_9,
        Published(8.6e6, 1.8, "Chen et al., ICCV 2021"),
        other_resolutions=(384,),
        tiny_other_resolution=48,
    )
)
for _m in attentions.available():
    _add(Entry(f"pyramid_{_m}", f"PVTv2-b0 layout with {_m} attention in every stage", pyramid(_m),
               other_resolutions=(320, 448)))  # fmt: skip


# ---------------------------------------------------------------------- isotropic (one map size)
def isotropic(mechanism: str) -> Callable[[bool], BackboneConfig]:
    """One stage at one map size: a 4 px patch stem, a learned absolute position table, blocks of one
    mechanism. Tiny: 4 blocks at width 32 (2 heads, MLP ratio 2) on the 8 x 8 map of a 32 px image, where
    every block sees the whole map and what a mechanism does with long-range relations decides; no merge
    layer mixes neighbours for it (a pyramid's 1 x 1 last stage at 32 px is global whatever the mechanism).
    Full size: the same 4 blocks at width 64 on the 56 x 56 map at 224 px (the experiments' --full modes use
    the published models instead). Not a published model: the controlled setting of issue 21. The
    mechanism's knobs are its stage-1 settings fitted to the maps the model runs at."""

    def config(tiny: bool) -> BackboneConfig:
        dim, depth, heads, mlp = (32, 4, 2, 2.0) if tiny else (64, 4, 2, 4.0)
        res = TINY_RESOLUTION if tiny else 224
        maps = [(r // 4, r // 4) for r in ((TINY_RESOLUTION, TINY_OTHER_RESOLUTION) if tiny else (224, 256))]
        blocks = []
        for knobs in attentions.get(mechanism).stage_knobs(1, maps[0]):
            with contextlib.suppress(attentions.KnobError):  # nothing fits: Backbone.unsupported says why
                knobs = attentions.fit_knobs(mechanism, maps, dim=dim, heads=heads, knobs=knobs)
            blocks.append(knobs)
        stage = StageConfig(dim=dim, depth=depth, heads=heads, mlp_ratio=mlp, attention=(mechanism,),
                            knobs=tuple(blocks))  # fmt: skip
        return BackboneConfig(stages=(stage,), stem="patch", merge="linear", abs_pos=True, resolution=res)

    return config


for _m in attentions.available():
    _add(Entry(f"isotropic_{_m}", f"one stage at one map size (4 px patches) with {_m} attention", isotropic(_m),
               other_resolutions=(256,)))  # fmt: skip


# ---------------------------------------------------------------------- API
def available() -> list[str]:
    return list(_ZOO)


def entry(name: str) -> Entry:
    try:
        return _ZOO[name]
    except KeyError:
        raise UnknownName(f"unknown model {name!r}; available: {', '.join(available())}") from None


def config(name: str, tiny: bool = False, **overrides: Any) -> Config:
    cfg = entry(name).config(tiny)
    if overrides:
        fields = {f.name for f in dataclasses.fields(cfg) if f.name not in ("stages",)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"unknown override(s) {', '.join(unknown)} for {name}; valid: {', '.join(sorted(fields))}")
        cfg = dataclasses.replace(cfg, **overrides)
    return cfg


def create(name: str, tiny: bool = False, **overrides: Any) -> nn.Module:
    """Build a zoo model: ``create("swin_t")``, ``create("pyramid_linear", tiny=True, num_classes=4)``."""
    cfg = config(name, tiny, **overrides)
    return CrossViT(cfg) if isinstance(cfg, CrossViTConfig) else Backbone(cfg)
