"""A small LoFTR-style coarse matcher that trains on the CPU (the network; the task is studies/matching*.py).

Stem: three stride-2 3x3 convolutions (BatchNorm, ReLU) take a greyscale image to
a ``dim``-channel map at 1/8 resolution, plus a fixed 2-D sine position encoding
(as LoFTR's). Stack: ``layers`` of ``"self"`` and ``"cross"`` blocks built from
one registered mechanism (pre-norm attention and MLP, each residual); a cross
block runs in both directions with the same weights, image 0 reading image 1
and image 1 reading image 0, as in LoFTR. Matching: dual softmax of the
similarity ``<f0_i, f1_j> / (dim * temperature)``; matches are the mutual
nearest neighbours of the confidence with confidence above ``threshold``.

The loss, the metrics and the image pairs are the matching task's
(``attnbench.studies.matching_metrics``, ``attnbench.studies.matching_data``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attnbench import attentions
from attnbench.errors import AttnbenchError

from .layers import Mlp

LAYER_KINDS = ("self", "cross")
STEMS = ("conv", "patch")
STRIDE = 8  # the stem's stride: one coarse cell (token) per 8 x 8 pixels
# The largest image side: a 128 x 128 coarse map, 16,384 tokens (full attention's scores: 1 GiB per head and pair).
MAX_RESOLUTION = 1024


class MatchError(AttnbenchError, ValueError):
    """A matcher cannot be built as asked."""


@dataclasses.dataclass(frozen=True)
class MatcherConfig:
    mechanism: str
    resolution: int = 96  # image side in px; the attention runs on resolution/8 squared
    dim: int = 64
    heads: int = 4
    layers: tuple[str, ...] = ("self", "cross", "self", "cross")
    knobs: tuple[tuple[str, Any], ...] = ()  # the mechanism's knobs, (name, value) pairs
    temperature: float = 0.1
    threshold: float = 0.2
    # "conv": three stride-2 3x3 convolutions and a 3x3 one (each token sees 31 x 31 px, its neighbours' cells
    # too); "patch": one 8 x 8 stride-8 convolution and a 1 x 1 one (each token sees its own 8 x 8 cell only, so
    # whatever it learns of its surroundings comes through the attention stack)
    stem: str = "conv"
    # The positive control of the matching task: every block's attention lets a token read only itself
    # (OwnToken), so nothing mixes tokens, within an image or across the pair
    isolated: bool = False

    @property
    def coarse_hw(self) -> tuple[int, int]:
        return (self.resolution // STRIDE, self.resolution // STRIDE)


def check_config(cfg: MatcherConfig) -> None:
    """Refuse a matcher that cannot be built (before any training), naming what to change."""
    try:
        cls = attentions.get(cfg.mechanism)
    except KeyError as exc:
        raise MatchError(str(exc.args[0])) from None
    crossing = [n for n in attentions.available() if _can_match(attentions.get(n))]
    if not _can_match(cls):
        why = "has no cross attention" if not cls.supports_cross else "attends from its prefix (CLS) tokens only"
        raise MatchError(
            f"{cfg.mechanism} {why}, and the matcher needs cross attention from every pixel: "
            f"use one of {', '.join(crossing)}"
        )
    problem = resolution_problem(cfg.resolution)
    if problem:
        raise MatchError(problem)
    if cfg.stem not in STEMS:
        raise MatchError(f"stem must be one of {', '.join(STEMS)}, got {cfg.stem!r}")
    bad = [k for k in cfg.layers if k not in LAYER_KINDS]
    if bad or not cfg.layers:
        raise MatchError(f"layers must be a non-empty list of {' and '.join(LAYER_KINDS)}, got {list(cfg.layers)}")
    attn = build_attention(cfg)
    hw = cfg.coarse_hw
    reasons = []
    if "self" in cfg.layers:
        reasons += attn.unsupported(1, hw)
    if "cross" in cfg.layers:
        reasons += [r for r in attn.unsupported(1, hw, hw) if r not in reasons]
    if reasons:
        raise MatchError(
            f"{cfg.mechanism} cannot run on the {hw[0]}x{hw[1]} coarse map of {cfg.resolution} px images: "
            + "; ".join(reasons)
        )


def resolution_problem(resolution: int) -> str | None:
    """Why the matcher cannot take square images of this side (None if it can): a multiple of the stem's
    stride of at least 32 px."""
    if not isinstance(resolution, int) or resolution < 32 or resolution % STRIDE or resolution > MAX_RESOLUTION:
        fit = min(MAX_RESOLUTION, max(32, (int(resolution) // STRIDE) * STRIDE))
        return (
            f"the matcher takes square images whose side is a multiple of {STRIDE} from 32 to {MAX_RESOLUTION} px "
            f"(a coarse map of 4x4 to {MAX_RESOLUTION // STRIDE}x{MAX_RESOLUTION // STRIDE}), got {resolution!r}; "
            f"try {fit}"
        )
    return None


def _can_match(cls: type[attentions.Attention]) -> bool:
    """Cross attention between two maps of tokens, one output per pixel (no prefix tokens)."""
    return cls.supports_cross and not cls.requires_context and cls.prefix_tokens == 0


def build_attention(cfg: MatcherConfig) -> attentions.Attention:
    try:
        return attentions.build(cfg.mechanism, dim=cfg.dim, heads=cfg.heads, **dict(cfg.knobs))
    except (attentions.KnobError, KeyError) as exc:
        raise MatchError(str(exc)) from None


def sine_encoding(dim: int, hw: tuple[int, int]) -> torch.Tensor:
    """LoFTR-style 2-D sine position encoding (1, dim, H, W): sin/cos of x and y at dim/4 frequencies."""
    h, w = hw
    freqs = torch.exp(torch.arange(0, dim // 2, 2).float() * (-math.log(10000.0) / (dim // 2)))  # (dim/4,)
    ys = torch.arange(h).float()[:, None, None] * freqs  # (H, 1, dim/4)
    xs = torch.arange(w).float()[None, :, None] * freqs  # (1, W, dim/4)
    parts = [xs.sin().expand(h, w, -1), xs.cos().expand(h, w, -1), ys.sin().expand(h, w, -1), ys.cos().expand(h, w, -1)]
    pe = torch.cat(parts, dim=-1)  # (H, W, dim)
    return pe.permute(2, 0, 1)[None]


class OwnToken(nn.Module):
    """Attention whose every query has one key, its own token (weight 1): ``proj(v(x))``, the value and output
    projections of each token on its own. Whatever map a block hands it (its own image or the other), nothing
    mixes tokens: the matching task's positive control (``MatcherConfig.isolated``)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, hw: tuple[int, int], context: torch.Tensor | None = None, context_hw: Any = None
    ) -> torch.Tensor:
        return self.proj(self.v(x))

    def footprint(
        self, x: torch.Tensor, hw: tuple[int, int], query: tuple[int, int], context: Any = None, context_hw: Any = None
    ) -> torch.Tensor:
        """(heads, H, W) over the token's own map: 1 at the query, 0 elsewhere."""
        out = torch.zeros(self.heads, *hw)
        out[:, query[0], query[1]] = 1.0
        return out

    def keys_per_query(self, hw: tuple[int, int], context_hw: Any = None) -> int:
        return 1

    def macs(self, batch: int, hw: tuple[int, int], context_hw: Any = None) -> int:
        """The two projections of every token (attention over one key adds no product)."""
        dim = self.v.in_features
        return 2 * batch * hw[0] * hw[1] * dim * dim


class Block(nn.Module):
    """Pre-norm attention block: x + attn(norm(x), [norm(source)]), then x + mlp(norm(x))."""

    def __init__(self, cfg: MatcherConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = OwnToken(cfg.dim, cfg.heads) if cfg.isolated else build_attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.mlp = Mlp(cfg.dim, 2 * cfg.dim)

    def inputs(
        self, x: torch.Tensor, source: torch.Tensor, hw: tuple[int, int]
    ) -> tuple[torch.Tensor, tuple[int, int], torch.Tensor | None, tuple[int, int] | None]:
        """The attention's arguments (x, hw, context, context_hw) for this block."""
        if self.kind == "self":
            return self.norm1(x), hw, None, None
        return self.norm1(x), hw, self.norm1(source), hw

    def forward(self, x: torch.Tensor, source: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        x = x + self.attn(*self.inputs(x, source, hw))
        return x + self.mlp(self.norm2(x), hw)


class AttentionStack(nn.Module):
    """The self/cross layers over the two coarse maps: (f0, f1) (B, N, dim) each -> the same."""

    def __init__(self, cfg: MatcherConfig):
        super().__init__()
        self.hw = cfg.coarse_hw
        self.blocks = nn.ModuleList(Block(cfg, kind) for kind in cfg.layers)

    def forward(self, f0: torch.Tensor, f1: torch.Tensor, record: list | None = None) -> tuple[torch.Tensor, ...]:
        for i, block in enumerate(self.blocks):
            if record is not None:
                record.append((i, block.kind, block.inputs(f0, f1, self.hw), block.inputs(f1, f0, self.hw)))
            f0, f1 = block(f0, f1, self.hw), block(f1, f0, self.hw)
        return f0, f1

    def attention_macs(self, batch: int = 1) -> int:
        """The mechanisms' analytic multiply-adds over both images (FLOPs = 2 * MACs)."""
        hw = self.hw
        return sum(2 * b.attn.macs(batch, hw, None if b.kind == "self" else hw) for b in self.blocks)


class Matcher(nn.Module):
    def __init__(self, cfg: MatcherConfig):
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        c = cfg.dim
        stem: list[nn.Module] = []
        if cfg.stem == "patch":
            stem += [nn.Conv2d(1, c, STRIDE, stride=STRIDE, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            stem.append(nn.Conv2d(c, c, 1))
        else:
            chans = (1, c // 4, c // 2, c)
            for a, b in zip(chans[:-1], chans[1:], strict=True):
                stem += [nn.Conv2d(a, b, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True)]
            stem.append(nn.Conv2d(c, c, 3, padding=1))
        self.stem = nn.Sequential(*stem)
        self.register_buffer("pe", sine_encoding(c, cfg.coarse_hw), persistent=False)
        self.stack = AttentionStack(cfg)

    def features(self, img: torch.Tensor) -> torch.Tensor:
        """(B, 1, R, R) in [0, 1] -> (B, N, dim) coarse tokens, row-major."""
        m = self.stem(img * 2 - 1) + self.pe  # (B, dim, R/8, R/8)
        return m.flatten(2).transpose(1, 2)

    def forward(self, img0: torch.Tensor, img1: torch.Tensor, record: list | None = None) -> torch.Tensor:
        """Confidence matrix (B, N0, N1) of the dual softmax."""
        f0, f1 = self.stack(self.features(img0), self.features(img1), record)
        return dual_softmax(f0, f1, self.cfg.temperature)


def dual_softmax(f0: torch.Tensor, f1: torch.Tensor, temperature: float) -> torch.Tensor:
    d = f0.shape[-1]
    sim = (f0 @ f1.transpose(1, 2)) / (d * temperature)  # (B, N0, N1): <f0/sqrt d, f1/sqrt d> / T
    return F.softmax(sim, dim=1) * F.softmax(sim, dim=2)


__all__ = [
    "STRIDE",
    "AttentionStack",
    "MatchError",
    "Matcher",
    "MatcherConfig",
    "build_attention",
    "check_config",
    "dual_softmax",
    "resolution_problem",
]
