"""QuadTree attention (Tang et al., "QuadTree Attention for Vision Transformers", ICLR 2022).

Queries and keys are built into pyramids by 2x2 average pooling over ``levels``
levels. The coarsest level runs full attention and keeps, per query and head,
its top-K keys; at each finer level the 4 children of a query attend only to
the 4K children of their parent's top-K keys, and again keep their own top-K
for the level below. Levels are numbered from the coarsest (0) to the finest
(``levels - 1``), which is the input map.

QuadTree-A: values are average-pooled; at every level but the finest, the
selected keys are masked out of the message (they are refined below), and a
fine score is the softmax over the 4 children of a selected key times that
key's score at the parent level, so each query's weights over all levels sum
to one. The messages of all levels are summed (coarse ones upsampled by
repetition).

QuadTree-B: each level's message is its own softmax over its candidates
(nothing masked); the levels are combined by a learned softmax weight, one per
level as in the official code. Values are average-pooled (``values="avg"``, as
LoFTR does for self and cross attention) or reduced by
GroupNorm-GELU-Conv(k2, s2)-GroupNorm-GELU-Conv1x1 per level (``values="conv"``,
the classification backbones, self attention only). ``lepe=True`` adds a
depthwise 3x3 conv of each level's values to that level's message (the
classification backbones; self attention only).

Defaults follow LoFTR's QuadTree-B (3 levels, average-pooled values, no LePE)
with the classification backbones' top-K of 8 at every level. Published
settings: classification backbones ``levels`` 4, 3, 2, 1 for the 1/4 ... 1/32
stages, ``topk=8``, ``values="conv"``, ``lepe=True``; LoFTR ``levels=3``,
``topk=(16, 8, 8)`` outdoor and ``(32, 16, 16)`` indoor.

The fine-level step "gather the candidates, score, softmax, aggregate" is one
function, :func:`refine` (with :func:`refine_reference` as its definition), so a
kernel can replace it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .base import HW, Attention, KnobError, Knobs, MapRule, Requires, TimeAxis, register
from .common import (
    Projections,
    attend,
    attention_macs,
    conv_macs,
    norm_macs,
    split_heads,
    to_map,
    to_tokens,
    widen,
)


@dataclasses.dataclass(frozen=True)
class QuadTreeKnobs(Knobs):
    """Knobs of QuadTree attention.

    ``topk`` is one number for every level or a tuple with one value per level,
    coarsest level first (LoFTR's ``(16, 8, 8)`` keeps 16 keys per query at the
    coarsest level and 8 at the next). The finest level's entry selects nothing,
    since there is no level below it; it is kept so a tuple reads level by level
    as in the official configurations.
    """

    variant: Literal["A", "B"] = "B"
    levels: int = 3
    topk: int | tuple[int, ...] = 8
    values: Literal["avg", "conv"] = "avg"
    lepe: bool = False
    qkv_bias: bool = True

    def check(self) -> None:
        if self.variant not in ("A", "B"):
            raise KnobError(f"quadtree knob 'variant' must be 'A' or 'B', got {self.variant!r}")
        if not isinstance(self.levels, int) or isinstance(self.levels, bool) or self.levels < 1:
            raise KnobError(f"quadtree knob 'levels' must be an integer >= 1 (3 in LoFTR), got {self.levels!r}")
        entries = self.topk if isinstance(self.topk, tuple) else (self.topk,)
        if not entries or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in entries):
            raise KnobError(
                f"quadtree knob 'topk' must be a positive integer or a tuple of positive integers "
                f"(one per level, coarsest first, e.g. (16, 8, 8)), got {self.topk!r}"
            )
        if self.values not in ("avg", "conv"):
            raise KnobError(f"quadtree knob 'values' must be 'avg' or 'conv', got {self.values!r}")
        if self.variant == "A" and self.values != "avg":
            raise KnobError(
                "QuadTree-A pools values by averaging: set values='avg', or variant='B' for the conv branch"
            )
        if self.variant == "A" and self.lepe:
            raise KnobError("LePE belongs to QuadTree-B: set lepe=False, or variant='B'")


# ---------------------------------------------------------------------- level steps
def coarse_level(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: int,
    *,
    variant: str,
    math: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Full attention at the coarsest level and the top-``keep`` keys of every query.

    q: (B, h, N, d), k and v: (B, h, M, d). Returns the message (B, h, N, d), the
    scores of the selected keys (B, h, N, keep) (None where unused: QuadTree-B's
    fast path) and their indices (B, h, N, keep) (None when ``keep`` is 0). In
    QuadTree-A the selected keys are left out of the message.
    """
    scale = q.shape[-1] ** -0.5
    if math:
        scores = (q @ k.transpose(-2, -1)) * scale  # (B, h, N, M)
        probs = torch.softmax(scores, dim=-1)
        if not keep:
            return probs @ v, None, None
        top_score, top_idx = probs.topk(keep, dim=-1)  # (B, h, N, keep)
        if variant == "A":
            mask = torch.ones_like(probs)
            mask.scatter_(-1, top_idx, 0.0)
            probs = probs * mask
        return probs @ v, top_score, top_idx
    if variant == "B":
        # B needs only which keys win: select on float32 logits without keeping them for backward.
        selected: torch.Tensor | None = None
        if keep:
            with torch.no_grad():
                logits = widen(q) @ widen(k).transpose(-2, -1)  # (B, h, N, M)
                selected = logits.topk(keep, dim=-1).indices  # (B, h, N, keep)
        # Contiguous copies of the (small) coarsest level: the CPU SDPA kernel returns wrong values for these
        # head-split strides under torch.compile's AOT autograd in torch 2.13 (eager is right).
        return attend(q.contiguous(), k.contiguous(), v.contiguous(), scale=scale), None, selected
    # A: scores, softmax and selection in float32 (the kept scores weight the level below).
    probs = torch.softmax((widen(q) @ widen(k).transpose(-2, -1)) * scale, dim=-1)  # (B, h, N, M)
    if not keep:
        return probs.to(v.dtype) @ v, None, None
    top_score, top_idx = probs.topk(keep, dim=-1)  # (B, h, N, keep)
    return probs.scatter(-1, top_idx, 0.0).to(v.dtype) @ v, top_score, top_idx


def refine_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    parent_score: torch.Tensor | None,
    keep: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One finer level in plain PyTorch: the definition :func:`refine` must match.

    q: (B, h, P, 4, d), the 4 children of each of P parent queries.
    k, v: (B, h, M, d), this level's keys and values.
    idx: (B, h, P, 4K), indices into M of the candidates, in groups of 4: the
    children of the parent's K selected keys.
    parent_score: (B, h, P, K), QuadTree-A's scores of those K keys at the
    parent level; None for QuadTree-B.
    keep: how many candidates each query passes to the level below (0 at the finest).

    QuadTree-B: softmax over the 4K candidates. QuadTree-A: softmax over the 4
    children of each selected key, times that key's parent score; the kept
    candidates are left out of the message.

    Returns the message (B, h, P, 4, d) and, when ``keep`` > 0, the scores and
    indices of the kept candidates, each (B, h, P, 4, keep).
    """
    b, h, p, _, d = q.shape
    c = idx.shape[-1]
    scale = d**-0.5
    idx_q = idx.unsqueeze(3).expand(b, h, p, 4, c)  # (B, h, P, 4, 4K): every child its own copy
    flat = idx_q.reshape(b, h, p * 4 * c, 1).expand(b, h, p * 4 * c, d)
    kg = torch.gather(k, 2, flat).view(b, h, p, 4, c, d)  # (B, h, P, 4, 4K, d)
    vg = torch.gather(v, 2, flat).view(b, h, p, 4, c, d)
    scores = (q.unsqueeze(-2) @ kg.transpose(-2, -1)).squeeze(-2) * scale  # (B, h, P, 4, 4K)
    if parent_score is None:
        probs = torch.softmax(scores, dim=-1)
    else:
        kp = c // 4
        probs = torch.softmax(scores.view(b, h, p, 4, kp, 4), dim=-1)  # over the 4 children of each key
        probs = (probs * parent_score.view(b, h, p, 1, kp, 1)).view(b, h, p, 4, c)
    top_score = top_idx = None
    if keep:
        top_score, pos = probs.topk(keep, dim=-1)  # (B, h, P, 4, keep)
        top_idx = torch.gather(idx_q, -1, pos)
        if parent_score is not None:
            mask = torch.ones_like(probs)
            mask.scatter_(-1, pos, 0.0)
            probs = probs * mask
    message = (probs.unsqueeze(-2) @ vg).squeeze(-2)  # (B, h, P, 4, d)
    return message, top_score, top_idx


def refine(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    parent_score: torch.Tensor | None,
    keep: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Fast path of :func:`refine_reference`, same arguments and results.

    The candidates are gathered once per parent and shared by its 4 children
    (the reference gathers them for every child); scores, softmax and selection
    run in float32, the aggregation in the input dtype.
    """
    b, h, p, _, d = q.shape
    c = idx.shape[-1]
    m = k.shape[2]
    scale = d**-0.5
    offset = (torch.arange(b * h, device=idx.device) * m).view(b, h, 1, 1)
    flat = (idx + offset).reshape(-1)  # (B*h*P*4K,) rows of the flattened keys
    kg = k.reshape(b * h * m, d).index_select(0, flat).view(b, h, p, c, d)  # (B, h, P, 4K, d)
    vg = v.reshape(b * h * m, d).index_select(0, flat).view(b, h, p, c, d)
    scores = (widen(q) @ widen(kg).transpose(-2, -1)) * scale  # (B, h, P, 4, 4K)
    if parent_score is None:
        probs = torch.softmax(scores, dim=-1)
    else:
        kp = c // 4
        probs = torch.softmax(scores.view(b, h, p, 4, kp, 4), dim=-1)  # over the 4 children of each key
        probs = (probs * parent_score.view(b, h, p, 1, kp, 1)).view(b, h, p, 4, c)
    top_score = top_idx = None
    if keep:
        top_score, pos = probs.topk(keep, dim=-1)  # (B, h, P, 4, keep)
        top_idx = torch.gather(idx.unsqueeze(3).expand(b, h, p, 4, c), -1, pos)
        if parent_score is not None:
            probs = probs.scatter(-1, pos, 0.0)
        else:
            top_score = None  # B does not use the kept scores
    return probs.to(v.dtype) @ vg, top_score, top_idx  # message (B, h, P, 4, d)


# ---------------------------------------------------------------------- map helpers
def group_children(t: torch.Tensor, parent_hw: HW) -> torch.Tensor:
    """(B, h, 4*Hp*Wp, ...) in row-major order of the 2Hp x 2Wp map -> (B, h, Hp*Wp, 4, ...)."""
    b, h, _, *rest = t.shape
    hp, wp = parent_hw
    t = t.reshape(b, h, hp, 2, wp, 2, *rest)  # (B, h, Hp, 2, Wp, 2, ...)
    return t.transpose(3, 4).reshape(b, h, hp * wp, 4, *rest)


def ungroup_children(t: torch.Tensor, parent_hw: HW) -> torch.Tensor:
    """Inverse of :func:`group_children`: (B, h, Hp*Wp, 4, ...) -> (B, h, 4*Hp*Wp, ...)."""
    b, h, _, _, *rest = t.shape
    hp, wp = parent_hw
    t = t.reshape(b, h, hp, wp, 2, 2, *rest)  # (B, h, Hp, Wp, 2, 2, ...)
    return t.transpose(3, 4).reshape(b, h, 4 * hp * wp, *rest)


def child_indices(top_idx: torch.Tensor, parent_w: int) -> torch.Tensor:
    """Indices of the 4 children of each selected key, one level finer.

    top_idx: (..., K) row-major indices on a map of width ``parent_w``.
    Returns (..., 4K): the children of each key together, in row-major order.
    """
    y, x = top_idx // parent_w, top_idx % parent_w
    w = 2 * parent_w
    children = [(2 * y + a) * w + 2 * x + c for a in (0, 1) for c in (0, 1)]
    return torch.stack(children, dim=-1).flatten(-2)  # (..., K, 4) -> (..., 4K)


def upsample(t: torch.Tensor, hw: HW) -> torch.Tensor:
    """Nearest 2x upsampling of tokens: (B, h, H*W, d) -> (B, h, 4*H*W, d)."""
    return ungroup_children(t.unsqueeze(3).expand(-1, -1, -1, 4, -1), hw)


@dataclasses.dataclass
class Pyramid:
    """Per-level tensors of one forward call, coarsest level first."""

    q_hw: list[HW]  # query map of each level
    k_hw: list[HW]  # key/value map of each level
    queries: list[torch.Tensor]  # (B, h, N_l, d)
    keys: list[torch.Tensor]  # (B, h, M_l, d)
    values: list[torch.Tensor]  # (B, h, M_l, d)
    value_maps: list[torch.Tensor]  # (B, C, H_l, W_l)
    messages: list[torch.Tensor] = dataclasses.field(default_factory=list)  # (B, h, N_l, d)
    selected: list[torch.Tensor] = dataclasses.field(default_factory=list)  # (B, h, N_l, K_l), levels but finest


def _triton_probe(kind: str) -> list[str]:
    """Why impl="triton" cannot run on a device type: triton missing, or no CUDA nor interpreter."""
    try:
        from .kernels import quadtree as kernel
    except ImportError as exc:
        return [f"impl='triton' needs triton ({exc}); install triton or use impl='fast'"]
    return kernel.unsupported(kind)


TRITON = Requires(dtypes=("float32", "float16", "bfloat16"), probe=_triton_probe, fix="use impl='fast'")


def _largest_levels(*sizes: int) -> int:
    levels = 1
    while all(s % (2**levels) == 0 for s in sizes):
        levels += 1
    return levels


@register
class QuadTreeAttention(Attention):
    name = "quadtree"
    summary = "coarse-to-fine attention on Q/K pyramids: full at the coarsest level, top-K regions refined below"
    Knobs = QuadTreeKnobs
    cost_knob = "topk"
    complexity = "O(N^2 / 16^(L-1) + N K)"
    supports_cross = True
    time = TimeAxis(
        why_not="its pyramid halves H and W per level (2x2 children per token); a clip would need an octree "
        "over t too, which QuadTree attention does not define"
    )

    # softmax over levels whose messages are nearly equal on unstructured input
    cancelling_grads = ("level_weight",)
    # "triton": QuadTree-B's fine levels on the fused kernel of attentions/kernels/quadtree.py
    impls = ("reference", "fast", "triton")
    impl_requires = {"triton": TRITON}
    examples = ({"levels": 3, "topk": (4, 2, 2)}, {"levels": 2, "topk": 2, "values": "conv", "lepe": True})

    knobs: QuadTreeKnobs

    def __init__(self, dim: int, heads: int, knobs: QuadTreeKnobs, impl: str | None = None):
        super().__init__(dim, heads, knobs, impl)
        self.proj = Projections(dim, heads, bias=knobs.qkv_bias)
        levels = knobs.levels
        if knobs.values == "conv":
            self.value_branch = nn.ModuleList(
                nn.Sequential(
                    nn.GroupNorm(1, dim),
                    nn.GELU(),
                    nn.Conv2d(dim, dim, kernel_size=2, stride=2),
                    nn.GroupNorm(1, dim),
                    nn.GELU(),
                    nn.Conv2d(dim, dim, kernel_size=1),
                )
                for _ in range(levels - 1)
            )
        if knobs.lepe:
            # value_branch[i] halves the map i times pooled already; lepe[l] acts on level l, coarsest first.
            self.lepe = nn.ModuleList(nn.Conv2d(dim, dim, 3, padding=1, groups=dim) for _ in range(levels))
        if knobs.variant == "B":
            # softmax over levels, coarsest first; drawn on the CPU and moved: on the meta device of probe modules
            # randn runs torch's Python reference, whose first use imports Dynamo and sympy (about 1.5 s)
            self.level_weight = nn.Parameter(torch.randn(levels, device="cpu").to(torch.get_default_device()))

    # ------------------------------------------------------------------ knobs
    def topks(self) -> tuple[int, ...]:
        """Top-K per level, coarsest first."""
        topk, levels = self.knobs.topk, self.knobs.levels
        if not isinstance(topk, tuple):
            return (topk,) * levels
        if len(topk) != levels:
            raise ValueError(self._length_reason())
        return topk

    def _length_reason(self) -> str:
        topk, levels = self.knobs.topk, self.knobs.levels
        return (
            f"topk {topk} has {len(topk) if isinstance(topk, tuple) else 1} entries but levels={levels}: "
            "give one per level, coarsest first, "
            f"or a single integer for every level"
        )

    @classmethod
    def stage_knobs(cls, stage: int, hw: HW) -> tuple[dict[str, Any], ...]:
        # QuadTree-B-b0 (classification/quadtree.py): levels 4, 3, 2, 1, top-K 8, conv values, LePE
        return ({"variant": "B", "levels": 5 - stage, "topk": 8, "values": "conv", "lepe": True},)

    def map_rules(self, hw: HW, context_hw: HW | None) -> list[MapRule]:
        f = 2 ** (self.knobs.levels - 1)
        most = _largest_levels(*hw, *(context_hw or ()))
        fix = f"choose a map whose H and W are multiples of {f}, or use levels <= {most}"
        rules = [MapRule(f"2^(levels-1) = {f}", multiple=f, fix=fix)]
        return rules + ([MapRule(f"2^(levels-1) = {f}", multiple=f, fix=fix, which="context_hw")] if context_hw else [])

    def _unsupported(
        self, batch: int, hw: HW, context_hw: HW | None, *, dtype: torch.dtype | None, device: Any
    ) -> list[str]:
        kn = self.knobs
        reasons: list[str] = []
        f = 2 ** (kn.levels - 1)
        # a map the pyramid cannot cut: its map rule says why, and the top-K checks below do not apply
        cut = all(
            rule.fits(context_hw or hw if rule.which == "context_hw" else hw) for rule in self.map_rules(hw, context_hw)
        )
        if context_hw is not None and kn.lepe:
            reasons.append(
                "lepe adds a conv of the values at the query positions, so it needs self attention: "
                "set lepe=False for cross attention (LoFTR does)"
            )
        if context_hw is not None and kn.values == "conv":
            reasons.append(
                "the conv value branch is for self attention (the classification backbones): "
                "set values='avg' for cross attention, as LoFTR does"
            )
        if isinstance(kn.topk, tuple) and len(kn.topk) != kn.levels:
            reasons.append(self._length_reason())
            return reasons
        if kn.levels == 1 or reasons or not cut:
            return reasons
        topks = self.topks()
        ch, cw = context_hw or hw
        coarse = (ch // f) * (cw // f)
        if topks[0] > coarse:
            reasons.append(
                f"top-K {topks[0]} is larger than the {coarse} keys at the coarsest level ({ch // f}x{cw // f}): "
                f"use topk <= {coarse}, a larger map or fewer levels"
            )
        for level in range(1, kn.levels):
            if topks[level] > 4 * topks[level - 1]:
                reasons.append(
                    f"topk[{level}] = {topks[level]} is larger than the {4 * topks[level - 1]} candidates at "
                    f"level {level} (4 x topk[{level - 1}]): use topk[{level}] <= {4 * topks[level - 1]}"
                )
        return reasons

    # ------------------------------------------------------------------ forward
    def pyramid(
        self, x: torch.Tensor, hw: HW, context: torch.Tensor | None = None, context_hw: HW | None = None
    ) -> Pyramid:
        """Pyramids, per-level messages and selections (no output projection, no level mixing)."""
        kn = self.knobs
        src, khw = (x, hw) if context is None else (context, context_hw)
        assert khw is not None
        q_map = to_map(self.proj.q(x), hw)  # (B, C, H, W)
        k_tok, v_tok = self.proj.kv(src).chunk(2, dim=-1)  # (B, M, C) each
        k_map, v_map = to_map(k_tok, khw), to_map(v_tok, khw)
        qs, ks, vs = [q_map], [k_map], [v_map]  # finest first while building
        for i in range(kn.levels - 1):
            qs.append(F.avg_pool2d(qs[-1], 2))
            ks.append(F.avg_pool2d(ks[-1], 2))
            vs.append(self.value_branch[i](vs[-1]) if kn.values == "conv" else F.avg_pool2d(vs[-1], 2))
        qs, ks, vs = qs[::-1], ks[::-1], vs[::-1]  # coarsest first

        def heads(m: torch.Tensor) -> torch.Tensor:
            return split_heads(to_tokens(m), self.heads)  # (B, C, H, W) -> (B, h, H*W, d)

        pyr = Pyramid(
            q_hw=[(t.shape[2], t.shape[3]) for t in qs],
            k_hw=[(t.shape[2], t.shape[3]) for t in ks],
            queries=[heads(t) for t in qs],
            keys=[heads(t) for t in ks],
            values=[heads(t) for t in vs],
            value_maps=vs,
        )
        topks = self.topks()
        last = kn.levels - 1
        parent_score: torch.Tensor | None
        message, parent_score, sel = coarse_level(
            pyr.queries[0],
            pyr.keys[0],
            pyr.values[0],
            topks[0] if last > 0 else 0,
            variant=kn.variant,
            math=self.math,
        )
        pyr.messages.append(message)
        step = refine_reference if self.math else refine
        if self.impl == "triton":
            from .kernels.quadtree import refine as refine_triton

            step = refine_triton
        for level in range(1, kn.levels):
            assert sel is not None
            phw, pkhw = pyr.q_hw[level - 1], pyr.k_hw[level - 1]
            pyr.selected.append(sel)
            idx = child_indices(sel, pkhw[1])  # (B, h, N_{l-1}, 4K)
            q = group_children(pyr.queries[level], phw)  # (B, h, N_{l-1}, 4, d)
            keep = topks[level] if level < last else 0
            message, parent_score, sel = step(
                q,
                pyr.keys[level],
                pyr.values[level],
                idx,
                parent_score if kn.variant == "A" else None,
                keep,
            )
            pyr.messages.append(ungroup_children(message, phw))  # (B, h, N_l, d)
            if keep:
                assert sel is not None
                sel = ungroup_children(sel, phw)  # (B, h, N_l, keep)
                parent_score = ungroup_children(parent_score, phw) if parent_score is not None else None
        return pyr

    def _forward(self, x: torch.Tensor, hw: HW, context: torch.Tensor | None, context_hw: HW | None) -> torch.Tensor:
        pyr = self.pyramid(x, hw, context, context_hw)
        if self.knobs.variant == "A":
            out = pyr.messages[0]
            for level in range(1, self.knobs.levels):
                out = upsample(out, pyr.q_hw[level - 1]) + pyr.messages[level]  # (B, h, N_l, d)
            return self.proj.output(out)
        # Mixed in float32: the gradient of the level weights is a small difference of large sums.
        weight = torch.softmax(widen(self.level_weight), dim=0)
        mixed: torch.Tensor | None = None
        for level, message in enumerate(pyr.messages):
            if self.knobs.lepe:
                message = message + split_heads(to_tokens(self.lepe[level](pyr.value_maps[level])), self.heads)
            term = weight[level] * widen(message)  # (B, h, N_l, d)
            mixed = term if mixed is None else upsample(mixed, pyr.q_hw[level - 1]) + term
        assert mixed is not None
        return self.proj.output(mixed.to(x.dtype))

    def tie_free_knobs(self, hw: HW, context_hw: HW | None = None) -> dict[str, Any] | None:
        """Top-K covering every candidate at every level: nothing is left out, so no near-tie can flip."""
        khw = context_hw or hw
        coarsest = (khw[0] >> (self.knobs.levels - 1)) * (khw[1] >> (self.knobs.levels - 1))
        return {"topk": tuple(coarsest * 4**level for level in range(self.knobs.levels))}

    # ------------------------------------------------------------------ cost
    def macs(self, batch: int, hw: HW, context_hw: HW | None = None) -> int:
        kn = self.knobs
        c, levels = self.dim, kn.levels
        khw = context_hw or hw
        q_hw = [(hw[0] >> i, hw[1] >> i) for i in range(levels)][::-1]  # coarsest first
        k_hw = [(khw[0] >> i, khw[1] >> i) for i in range(levels)][::-1]
        n = [a * b for a, b in q_hw]
        m = [a * b for a, b in k_hw]
        total = self.proj.macs(1, n[-1], m[-1])
        for level in range(levels - 1):  # pooling into the coarser level `level`
            total += 4 * c * n[level] + 4 * c * m[level]  # 2x2 average pooling of q and k
            if kn.values == "conv":
                total += norm_macs(m[level + 1], c) + conv_macs(k_hw[level], c, c, 2)
                total += norm_macs(m[level], c) + conv_macs(k_hw[level], c, c, 1)
            else:
                total += 4 * c * m[level]
        if kn.lepe:
            total += sum(conv_macs(s, c, c, 3, groups=c) for s in k_hw)
        total += attention_macs(1, self.heads, n[0], m[0], self.head_dim)
        topks = self.topks()
        if kn.variant == "B" and not self.math and levels > 1:
            total += self.heads * n[0] * m[0] * self.head_dim  # fast B's selection logits, outside SDPA
        for level in range(1, levels):
            total += attention_macs(1, self.heads, n[level], 4 * topks[level - 1], self.head_dim)
        return batch * total

    # ------------------------------------------------------------------ footprint
    def footprint_levels(
        self, x: torch.Tensor, hw: HW, query: tuple[int, int], context: torch.Tensor | None, context_hw: HW | None
    ) -> list[torch.Tensor]:
        """Per level, coarsest first, the query's weights over that level's keys spread over the pixels
        each key pools (a 2^(L-1-l) square): (heads, Hk, Wk) each, on the reference path.

        Level 0 is the softmax over every coarse key; level l > 0 covers only the 4 children of the
        keys its parent query selected at level l - 1. B: each level's softmax (sums to 1). A: the
        selected keys' weight moved down a level (their children's softmax times their score), so
        the levels together sum to 1."""
        from .footprint import blocks, spread

        kn, levels = self.knobs, self.knobs.levels
        pyr = self.pyramid(x, hw, context, context_hw)  # on the reference path: the forward's selections
        scale = self.head_dim**-0.5
        fine_khw = pyr.k_hw[-1]
        out: list[torch.Tensor] = []
        parent: torch.Tensor | None = None  # (h, K) scores of the parent's selected keys (A)
        for level in range(levels):
            shift = levels - 1 - level
            qhw, khw = pyr.q_hw[level], pyr.k_hw[level]
            n = (query[0] >> shift) * qhw[1] + (query[1] >> shift)  # the query's ancestor at this level
            q = pyr.queries[level][0, :, n].float()  # (h, d)
            k = pyr.keys[level][0].float()  # (h, M_l, d)
            if level == 0:
                cand = torch.arange(k.shape[1], device=k.device).expand(self.heads, -1)  # (h, M_0)
            else:
                pn = (query[0] >> (shift + 1)) * pyr.q_hw[level - 1][1] + (query[1] >> (shift + 1))
                cand = child_indices(pyr.selected[level - 1][0, :, pn], pyr.k_hw[level - 1][1])  # (h, 4K)
            scores = (torch.gather(k, 1, cand[..., None].expand(-1, -1, k.shape[-1])) @ q[..., None])[..., 0] * scale
            if kn.variant == "B" or level == 0:
                probs = torch.softmax(scores, dim=-1)  # (h, C)
            else:
                assert parent is not None
                kp = cand.shape[1] // 4
                probs = (torch.softmax(scores.view(self.heads, kp, 4), dim=-1) * parent[..., None]).view(self.heads, -1)
            if kn.variant == "A" and level < levels - 1:
                sel = pyr.selected[level][0, :, n]  # (h, K) key indices this query refines below
                hit = cand[..., None] == sel[:, None, :]  # (h, C, K)
                parent = (probs[..., None] * hit).sum(1)  # (h, K) their scores
                probs = probs * ~hit.any(-1)  # moved to the level below
            weights = torch.zeros(self.heads, khw[0] * khw[1], dtype=probs.dtype, device=probs.device)
            weights.scatter_add_(1, cand, probs)
            side = 2**shift
            grid = weights.view(self.heads, *khw)
            out.append(spread(grid, blocks(fine_khw[0], khw[0], side), blocks(fine_khw[1], khw[1], side)))
        return out

    def _footprint(
        self, x: torch.Tensor, hw: HW, query: tuple[int, int], context: torch.Tensor | None, context_hw: HW | None
    ) -> torch.Tensor:
        """A: the levels' weights summed; B: mixed by the softmax of ``level_weight``. LePE, a convolution
        of the values added outside the softmax, gives no key a weight and is left out."""
        levels = self.footprint_levels(x, hw, query, context, context_hw)
        if self.knobs.variant == "A":
            return torch.stack(levels).sum(0)
        mix = torch.softmax(self.level_weight.float(), dim=0)
        return sum(m * lv for m, lv in zip(mix, levels, strict=True))  # type: ignore[return-value]

    def keys_per_query(self, hw: HW, context_hw: HW | None = None) -> int:
        khw = context_hw or hw
        f = 2 ** (self.knobs.levels - 1)
        topks = self.topks()
        return (khw[0] // f) * (khw[1] // f) + sum(4 * topks[level - 1] for level in range(1, self.knobs.levels))
