"""A small LoFTR-style coarse matcher that trains on the CPU, and its evaluation.

Stem: three stride-2 3x3 convolutions (BatchNorm, ReLU) take a greyscale image to
a ``dim``-channel map at 1/8 resolution, plus a fixed 2-D sine position encoding
(as LoFTR's). Stack: ``layers`` of ``"self"`` and ``"cross"`` blocks built from
one registered mechanism (pre-norm attention and MLP, each residual); a cross
block runs in both directions with the same weights, image 0 reading image 1
and image 1 reading image 0, as in LoFTR. Matching: dual softmax of the
similarity ``<f0_i, f1_j> / (dim * temperature)``; matches are the mutual
nearest neighbours of the confidence with confidence above ``threshold``.

Loss: ``-log`` confidence at the ground-truth pairs (models/matching_data.py).
Metrics: match precision at the coarse cell (a match is right when ``H`` takes
the centre of its cell in image 0 into its cell in image 1) and the AUC of the
mean corner error at 3, 5 and 10 px of the homography kornia's RANSAC fits to
the matched cell centres (an estimate that fails counts as an infinite error).
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
from .matching_data import STRIDE, DataError, apply_h, cell_centres

LAYER_KINDS = ("self", "cross")
AUC_THRESHOLDS = (3, 5, 10)


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

    @property
    def coarse_hw(self) -> tuple[int, int]:
        return (self.resolution // STRIDE, self.resolution // STRIDE)


def check_config(cfg: MatcherConfig) -> None:
    """Refuse a matcher that cannot be built (before any training), naming what to change."""
    from .matching_data import check_resolution

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
    check_resolution(cfg.resolution)
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


class Block(nn.Module):
    """Pre-norm attention block: x + attn(norm(x), [norm(source)]), then x + mlp(norm(x))."""

    def __init__(self, cfg: MatcherConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = build_attention(cfg)
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
        chans = (1, c // 4, c // 2, c)
        stem: list[nn.Module] = []
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


def loss_fn(conf: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Mean -log confidence at the ground-truth pairs. gt: (B, N0) cell of image 1 or -1."""
    valid = gt >= 0
    picked = conf.gather(2, gt.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, N0)
    return -(picked.clamp_min(1e-6).log() * valid).sum() / valid.sum().clamp_min(1)


def mutual_nearest(conf: torch.Tensor, threshold: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per pair, (i, j) index tensors of the mutual nearest neighbours with confidence above threshold."""
    out = []
    for c in conf:
        j = c.argmax(1)  # best j for each i
        i_back = c.argmax(0)  # best i for each j
        i = torch.arange(c.shape[0])
        keep = (i_back[j] == i) & (c[i, j] > threshold)
        out.append((i[keep], j[keep]))
    return out


def corner_error(h_est: torch.Tensor | None, h_gt: torch.Tensor, size: int) -> float:
    """Mean distance (px) of the four image corners mapped by the estimate and by the truth; inf without one."""
    if h_est is None or not torch.isfinite(h_est).all():
        return math.inf
    s = size - 1
    corners = torch.tensor([[0, 0], [s, 0], [s, s], [0, s]], dtype=torch.float64)
    err = (apply_h(h_est, corners) - apply_h(h_gt, corners)).norm(dim=1).mean()
    return float(err) if torch.isfinite(err) else math.inf


def error_auc(errors: list[float], thresholds: tuple[int, ...] = AUC_THRESHOLDS) -> dict[str, float]:
    """Area under the cumulative curve of the errors up to each threshold, over the threshold (0..1)."""
    errs = sorted(errors)
    n = len(errs)
    out = {}
    for t in thresholds:
        # the curve steps to (k+1)/n at each error; integrate the step function from 0 to t
        xs = [0.0] + [e for e in errs if e < t] + [float(t)]
        ys = [0.0] + [(k + 1) / n for k in range(len(xs) - 2)]
        area = sum((xs[k + 1] - xs[k]) * ys[k] for k in range(len(ys)))
        out[f"auc@{t}"] = area / t
    return out


def estimate_homography(p0: torch.Tensor, p1: torch.Tensor, seed: int = 0) -> torch.Tensor | None:
    """kornia RANSAC homography from matched points (N, 2); None with fewer than 4 matches or on failure."""
    from kornia.geometry.ransac import RANSAC

    if len(p0) < 4:
        return None
    ransac = RANSAC("homography", inl_th=float(STRIDE) / 2, max_iter=20, seed=seed)
    try:
        h, _ = ransac(p0.float(), p1.float())
    except (RuntimeError, ValueError):
        return None
    return h.double()


@torch.no_grad()
def evaluate(model: Matcher, pairs: list[tuple[torch.Tensor, ...]], batch: int = 16) -> dict[str, Any]:
    """Precision, recall, matches per pair and the homography AUCs over ``pairs`` (img0, img1, H, gt)."""
    model.eval()
    res = model.cfg.resolution
    centres = cell_centres((res, res))
    hw = model.cfg.coarse_hw
    correct = predicted = positives = hits = 0
    errors: list[float] = []
    loss_sum = 0.0
    for start in range(0, len(pairs), batch):
        chunk = pairs[start : start + batch]
        img0 = torch.stack([p[0] for p in chunk])
        img1 = torch.stack([p[1] for p in chunk])
        gt = torch.stack([p[3] for p in chunk])
        conf = model(img0, img1)
        loss_sum += float(loss_fn(conf, gt)) * len(chunk)
        for (i, j), (_, _, h01, g) in zip(mutual_nearest(conf, model.cfg.threshold), chunk, strict=True):
            right = cell_hit(h01, centres[i], j, hw)
            correct += int(right.sum())
            predicted += len(i)
            positives += int((g >= 0).sum())
            hits += int((g[i] == j).sum())
            errors.append(corner_error(estimate_homography(centres[i], centres[j]), h01, res))
    aucs = error_auc(errors)
    return {
        "precision": correct / predicted if predicted else 0.0,
        "recall": hits / positives if positives else 0.0,
        "matches_per_pair": predicted / len(pairs),
        "val_loss": loss_sum / len(pairs),
        **aucs,
    }


def cell_hit(h01: torch.Tensor, p0: torch.Tensor, j: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Whether H takes each point p0 (cell centres of image 0) into cell j of image 1."""
    p1 = apply_h(h01, p0)
    cx, cy = torch.floor((p1[:, 0] + 0.5) / STRIDE), torch.floor((p1[:, 1] + 0.5) / STRIDE)
    return (cy * hw[1] + cx == j.double()) & (cx >= 0) & (cx < hw[1]) & (cy >= 0) & (cy < hw[0])


def chance_precision(hw: tuple[int, int]) -> float:
    """Precision of a match drawn at random: one cell right out of H*W."""
    return 1.0 / (hw[0] * hw[1])


__all__ = [
    "AUC_THRESHOLDS",
    "AttentionStack",
    "DataError",
    "MatchError",
    "Matcher",
    "MatcherConfig",
    "check_config",
    "chance_precision",
    "error_auc",
    "evaluate",
    "loss_fn",
]
