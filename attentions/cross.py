"""CLS-token cross attention (CrossViT, Chen et al., ICCV 2021).

Fuses two branches of a dual-branch ViT. ``x`` is this branch, ``(B, 1 + H*W, dim)``
with its CLS token first; ``context`` is the other branch, ``(B, 1 + Hc*Wc,
context_dim)``, CLS first too. As in the official code (IBM/CrossViT,
``MultiScaleBlock`` with one ``CrossAttentionBlock`` without MLP):

1. ``c = Linear(GELU(LayerNorm(cls)))``: x's CLS projected to ``context_dim``;
2. ``t = LayerNorm([c, context patches])``: the other branch's CLS is not used;
3. ``c' = c + out(softmax(q k^T / sqrt(d)) v)`` with the query from ``t[0]``
   only and keys/values from all of ``t`` (``heads`` heads at ``context_dim``
   width); the residual is on the un-normalised projected CLS;
4. the new CLS is ``Linear(GELU(LayerNorm(c')))`` back at ``dim`` (it replaces the
   old CLS, no residual), and x's patch tokens pass through unchanged.

One query against ``1 + Hc*Wc`` keys: the cost is linear in the context's tokens
and does not depend on x's. LayerNorms use eps 1e-6, as CrossViT's models do.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from .base import HW, Attention, KnobError, Knobs, TimeAxis, _divisors, register
from .common import Projections, attend, attention_macs, linear_macs, norm_macs

EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class CrossKnobs(Knobs):
    # Width of the other branch (0: the same as dim). CrossViT-9: 128 and 256.
    context_dim: int = 0
    # The other branch's token map side over this branch's, for the default context map.
    # CrossViT-9: 20x20 tokens (patch 12 at 240 px) against 14x14 (patch 16 at 224 px) -> 0.7.
    context_scale: float = 0.7
    qkv_bias: bool = True

    def check(self) -> None:
        if self.context_dim < 0:
            raise KnobError(
                f"cross knob 'context_dim' must be the other branch's width (or 0 for dim), got {self.context_dim}"
            )
        if not (self.context_scale > 0 and math.isfinite(self.context_scale)):
            raise KnobError(
                "cross knob 'context_scale' must be a positive number (the other branch's token map side over "
                f"this branch's, e.g. 0.7), got {self.context_scale}"
            )


def branch_projection(c_in: int, c_out: int) -> nn.Sequential:
    """CrossViT's branch-to-branch projection: LayerNorm -> GELU -> Linear."""
    return nn.Sequential(nn.LayerNorm(c_in, eps=EPS), nn.GELU(), nn.Linear(c_in, c_out))


@register
class CrossAttention(Attention):
    name = "cross"
    summary = "CrossViT: the CLS token, at the other branch's width, attends to itself and the other branch's patches"
    Knobs = CrossKnobs
    complexity = "O(N)"
    supports_cross = True
    time = TimeAxis(why_not="it fuses the CLS token of one image branch with the patch tokens of the other: no clip")
    requires_context = True
    prefix_tokens = 1
    knobs: CrossKnobs

    def __init__(self, dim: int, heads: int, knobs: CrossKnobs, impl: str | None = None):
        super().__init__(dim, heads, knobs, impl)
        cd = knobs.context_dim or dim
        self._context_dim = cd
        self.to_context = branch_projection(dim, cd)
        self.norm = nn.LayerNorm(cd, eps=EPS)
        self.proj = Projections(cd, heads, bias=knobs.qkv_bias)
        self.from_context = branch_projection(cd, dim)

    @property
    def context_dim(self) -> int:
        return self._context_dim

    @property
    def context_prefix_tokens(self) -> int:
        return 1

    def default_context_hw(self, hw: HW) -> HW:
        s = self.knobs.context_scale
        return (max(1, math.floor(hw[0] * s + 0.5)), max(1, math.floor(hw[1] * s + 0.5)))

    def fuse(self, cls: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """This branch's CLS (B, 1, dim) and the context (B, 1 + M, Cc) -> fused CLS (B, 1, Cc), before reverting."""
        c = self.to_context(cls)  # (B, 1, Cc)
        t = self.norm(torch.cat([c, context[:, 1:]], dim=1))  # (B, 1 + M, Cc)
        q = self.proj.queries(t[:, :1])  # (B, h, 1, Cc/h)
        k, v = self.proj.keys_values(t)  # each (B, h, 1 + M, Cc/h)
        return c + self.proj.output(attend(q, k, v, math=self.math))  # (B, 1, Cc)

    def _forward(self, x: torch.Tensor, hw: HW, context: torch.Tensor | None, context_hw: HW | None) -> torch.Tensor:
        assert context is not None  # the base class insists on it (requires_context)
        cls = self.from_context(self.fuse(x[:, :1], context))  # (B, 1, dim)
        return torch.cat([cls, x[:, 1:]], dim=1)  # (B, 1 + H*W, dim)

    @classmethod
    def _static_reasons(cls, dim: int, heads: int, knobs: Any) -> list[str]:
        cd = knobs.context_dim or dim
        if cd % heads:
            return [
                f"cross attention runs its {heads} heads at the other branch's width, so context_dim ({cd}) "
                f"must be divisible by heads; choose heads from {_divisors(cd)} or change context_dim"
            ]
        return []

    def macs(self, batch: int, hw: HW, context_hw: HW | None = None) -> int:
        m = context_hw or self.default_context_hw(hw)
        nk = 1 + m[0] * m[1]  # projected CLS + the context's patches
        c, cd = self.dim, self.context_dim
        per_image = (
            norm_macs(1, c) + linear_macs(1, c, cd)  # CLS to the other branch's width
            + norm_macs(nk, cd)  # LayerNorm of [CLS, patches]
            + self.proj.macs(1, 1, nk)  # q of the CLS, k and v of all, output of the CLS
            + attention_macs(1, self.heads, 1, nk, cd // self.heads)
            + norm_macs(1, cd) + linear_macs(1, cd, c)  # back to this branch's width
        )  # fmt: skip
        return batch * per_image

    # ------------------------------------------------------------------ footprint
    def _footprint(
        self, x: torch.Tensor, hw: HW, query: tuple[int, int], context: torch.Tensor | None, context_hw: HW | None
    ) -> torch.Tensor:
        """The CLS token's weights over the other branch's patches (the only query: x's patches attend to
        nothing, whichever ``query`` is given); the rest of its softmax, 1 minus the sum, is on its own
        projected CLS, which is no pixel."""
        from .footprint import reference_probs

        assert context_hw is not None
        probs = reference_probs(self, x, hw, context, context_hw)  # (1, h, 1, 1 + M)
        return probs[0, :, 0, 1:].reshape(self.heads, *context_hw)

    def keys_per_query(self, hw: HW, context_hw: HW | None = None) -> int:
        m = context_hw or self.default_context_hw(hw)
        return 1 + m[0] * m[1]
