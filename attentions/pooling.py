"""Pooling attention of MViTv2 (Li et al., CVPR 2022).

Queries, keys and values are projected, split into heads and pooled per head
on the token map: ``mode="conv"`` is a depthwise ``kernel x kernel`` convolution
(default 3, MViTv2's; odd, padding ``kernel // 2``; channels = head_dim, one set
of weights shared by all heads, no bias) followed by LayerNorm(head_dim);
``"avg"`` and ``"max"`` pool with the same kernel,
stride and padding and no norm; ``"none"`` does not pool. As in MViTv2 the
queries pass through the pooling even at stride 1. Queries pool with stride
``stride_q`` (the output then has fewer tokens, see ``output_hw``), keys and
values with ``stride_kv`` (default 4: MViTv2's first stage, 56x56 -> 14x14).

``rel_pos=True`` adds MViTv2's decomposed relative position bias
``q . R_h[h_q - h_k] + q . R_w[w_q - w_k]`` (unscaled pooled q; coordinates of
the map with the larger stride stretched to the other). The two learnable
tables have ``2 * max(q, kv) - 1`` rows for a ``rel_pos_size`` square map
(default 56, MViTv2's first stage at 224 px) and are resized per axis by 1-D
linear interpolation to the length the current map needs, as MViTv2 does.
``residual_pooling=True`` adds the pooled queries to the attention output.

``dim_out`` (0: the same as ``dim``) widens the tokens inside the attention, as
MViTv2 does where a stage begins (``dim_mul_in_att``): q, k and v are projected
from ``dim`` to ``dim_out`` channels, split into heads of ``dim_out // heads``
(the pooling convolutions, norms and relative-position tables work at that
width), the residual pooling adds the ``dim_out``-wide pooled queries and the
output projection is ``dim_out -> dim_out`` (see ``output_dim``). The block's
skip connection then needs its own ``Linear(dim, dim_out)``.

``window`` (0: global) is MViTv2's hybrid window attention (HWin, as its
detection backbones use it): the input map is cut into ``window x window``
windows and, after pooling, each window's queries attend only to the pooled keys
of the same window (pooled windows of ``window / stride``; relative positions
within the window, tables sized to it). H and W must be multiples of ``window``
and ``window`` a multiple of both strides; nothing is padded.

One deliberate difference from the official code: the LayerNorm after the key
pooling has a scale but no additive bias. A vector added to every key shifts
each query's scores by a constant, which softmax ignores, so that bias would
never change an output and its gradient is identically zero (head_dim fewer
parameters per block).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from torch import nn

from .base import HW, Attention, KnobError, Knobs, register
from .common import (
    SDPA_FUSES_BIAS_GRAD,
    Projections,
    attend,
    attention_macs,
    conv_macs,
    conv_out,
    linear_macs,
    norm_macs,
)
from .kernels import flex
from .relpos import mvit_attend, mvit_bias, mvit_table

KERNEL = 3  # MViTv2's POOL_KVQ_KERNEL, the default of the kernel knob
MODES = ("conv", "avg", "max", "none")


@dataclasses.dataclass(frozen=True)
class PoolingKnobs(Knobs):
    mode: Literal["conv", "avg", "max", "none"] = "conv"
    stride_q: int = 1
    # MViTv2 pools keys and values to 14x14 in every stage: stride 4 at 56x56.
    stride_kv: int = 4
    rel_pos: bool = True
    # Side of the square map at which the relative-position tables need no resizing.
    rel_pos_size: int = 56
    residual_pooling: bool = True
    qkv_bias: bool = True
    # Channels of q, k, v and the output (0: dim); MViTv2's first block of a stage widens here.
    dim_out: int = 0
    # Hybrid window attention (HWin): side of the windows on the input map (0: one global window).
    window: int = 0
    # Side of the pooling kernel of q, k and v (odd; padding kernel // 2): MViTv2's POOL_KVQ_KERNEL.
    kernel: int = KERNEL

    def check(self) -> None:
        if self.mode not in MODES:
            raise KnobError(f"pooling knob 'mode' must be one of {', '.join(map(repr, MODES))}, got {self.mode!r}")
        for knob in ("stride_q", "stride_kv", "rel_pos_size"):
            value = getattr(self, knob)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise KnobError(f"pooling knob {knob!r} must be a positive integer, got {value!r}")
        if isinstance(self.dim_out, bool) or not isinstance(self.dim_out, int) or self.dim_out < 0:
            raise KnobError(
                f"pooling knob 'dim_out' must be a non-negative integer (0 keeps dim), got {self.dim_out!r}"
            )
        if isinstance(self.kernel, bool) or not isinstance(self.kernel, int) or self.kernel < 1 or self.kernel % 2 == 0:
            raise KnobError(
                f"pooling knob 'kernel' must be an odd positive integer (padding kernel // 2 keeps the map's "
                f"centre), got {self.kernel!r}"
            )
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 0:
            raise KnobError(f"pooling knob 'window' must be a non-negative integer (0: global), got {self.window!r}")
        if self.mode == "none" and (self.stride_q, self.stride_kv) != (1, 1):
            raise KnobError(
                f"pooling mode 'none' cannot stride (got stride_q={self.stride_q}, stride_kv={self.stride_kv}); "
                "set stride_q=1 and stride_kv=1, or choose mode 'conv', 'avg' or 'max'"
            )


@register
class PoolingAttention(Attention):
    knobs: PoolingKnobs
    name = "pooling"
    summary = (
        "MViTv2 pooling attention: q, k, v pooled per head (depthwise kernel x kernel conv + LayerNorm, or avg/max) "
        "with strides stride_q and stride_kv; decomposed relative position bias with tables linearly resized to the "
        "map; residual pooling connection"
    )
    Knobs = PoolingKnobs
    cost_knob = "stride_kv"
    complexity = "O(N^2 / (s_q^2 s_kv^2))"
    supports_cross = False
    # "flex": FlexAttention with the decomposed relative position read by a score_mod from the two
    # (Nq, kh) and (Nq, kw) terms, never summed into an (Nq, Nk) bias; CUDA only (attentions/kernels/flex.py)
    impls = ("reference", "fast", "flex")
    impl_requires = {"flex": flex.REQUIRES}
    # MViTv2's stage transition (widening); a wider pooling kernel
    examples = ({"stride_q": 2, "stride_kv": 2, "dim_out": 64}, {"kernel": 5, "stride_kv": 2})

    def __init__(self, dim: int, heads: int, knobs: PoolingKnobs, impl: str | None = None):
        # The base splits the widened channels into heads: head_dim = dim_out // heads (dim need not divide).
        super().__init__(dim, heads, knobs, impl)
        self.proj = Projections(dim, heads, bias=knobs.qkv_bias, out_dim=self.output_dim)
        d = self.head_dim
        self.pool_q, self.norm_q = self._pooling(knobs.stride_q)
        self.pool_k, self.norm_k = self._pooling(knobs.stride_kv, keys=True)
        self.pool_v, self.norm_v = self._pooling(knobs.stride_kv)
        if knobs.rel_pos:
            size = knobs.window or knobs.rel_pos_size  # windowed: positions within one window
            length = 2 * max(self._pooled(size, knobs.stride_q), self._pooled(size, knobs.stride_kv)) - 1
            self.rel_pos_h = mvit_table(length, d)  # (L, d)
            self.rel_pos_w = mvit_table(length, d)  # (L, d)

    def _pooling(self, stride: int, keys: bool = False) -> tuple[nn.Module | None, nn.Module | None]:
        d, mode, k = self.head_dim, self.knobs.mode, self.knobs.kernel
        if mode == "conv":
            conv = nn.Conv2d(d, d, k, stride=stride, padding=k // 2, groups=d, bias=False)
            # The keys' norm has no additive bias: one vector added to every key shifts each query's scores
            # by a constant, which softmax ignores, so that parameter would have an identically zero gradient.
            return conv, nn.LayerNorm(d, eps=1e-6, bias=not keys)
        if mode == "avg":
            return nn.AvgPool2d(k, stride=stride, padding=k // 2), None
        if mode == "max":
            return nn.MaxPool2d(k, stride=stride, padding=k // 2), None
        return None, None

    def _pooled(self, size: int, stride: int) -> int:
        k = self.knobs.kernel
        return size if self.knobs.mode == "none" else conv_out(size, k, stride, k // 2)

    def output_hw(self, hw: HW) -> HW:
        return (self._pooled(hw[0], self.knobs.stride_q), self._pooled(hw[1], self.knobs.stride_q))

    @property
    def output_dim(self) -> int:
        return self.knobs.dim_out or self.dim

    def kv_hw(self, hw: HW) -> HW:
        """Token map of the pooled keys and values."""
        return (self._pooled(hw[0], self.knobs.stride_kv), self._pooled(hw[1], self.knobs.stride_kv))

    @staticmethod
    def _pool(t: torch.Tensor, hw: HW, op: nn.Module | None, norm: nn.Module | None) -> tuple[torch.Tensor, HW]:
        """Pool each head's (H, W) map: (B, h, H*W, d) -> (B, h, H'*W', d)."""
        if op is None:
            return t, hw
        b, heads, _, d = t.shape
        m = op(t.transpose(-2, -1).reshape(b * heads, d, *hw))  # (B*h, d, H', W')
        out_hw = (m.shape[-2], m.shape[-1])
        t = m.reshape(b, heads, d, out_hw[0] * out_hw[1]).transpose(-2, -1)  # (B, h, H'*W', d)
        return (t if norm is None else norm(t)), out_hw

    def _forward(self, x: torch.Tensor, hw: HW, context: torch.Tensor | None, context_hw: HW | None) -> torch.Tensor:
        q = self.proj.queries(x)  # (B, h, N, d)
        k, v = self.proj.keys_values(x)  # (B, h, N, d) each
        q, q_hw = self._pool(q, hw, self.pool_q, self.norm_q)  # (B, h, Nq, d)
        k, k_hw = self._pool(k, hw, self.pool_k, self.norm_k)  # (B, h, Nk, d)
        v, _ = self._pool(v, hw, self.pool_v, self.norm_v)  # (B, h, Nk, d)
        if self.knobs.window:
            grid = (hw[0] // self.knobs.window, hw[1] // self.knobs.window)
            q_hw_all = q_hw
            q, q_hw = _partition(q, q_hw, grid)  # (B*nW, h, Nq/nW, d)
            k, k_hw = _partition(k, k_hw, grid)  # (B*nW, h, Nk/nW, d)
            v, _ = _partition(v, self.kv_hw(hw), grid)  # (B*nW, h, Nk/nW, d)
        if self.impl == "flex":
            o = self._attend_flex(q, k, v, q_hw, k_hw)  # (B, h, Nq, d)
        elif self._decomposed(q):
            o = mvit_attend(q, k, v, q_hw, k_hw, self.rel_pos_h, self.rel_pos_w)  # (B, h, Nq, d)
        else:
            bias = mvit_bias(q, q_hw, k_hw, self.rel_pos_h, self.rel_pos_w) if self.knobs.rel_pos else None
            o = attend(q, k, v, bias, math=self.math)  # (B, h, Nq, d)
        if self.knobs.residual_pooling:
            o = o + q
        if self.knobs.window:
            o = _merge(o, q_hw_all, grid)  # (B, h, Nq, d)
        return self.proj.output(o)  # (B, Nq, C_out)

    def _decomposed(self, q: torch.Tensor) -> bool:
        """The fast path where SDPA cannot take the bias: a gradient wanted on a device whose SDPA does
        not fuse a bias gradient (the CPU), float32 or float64 (relpos.mvit_attend)."""
        return (
            not self.math
            and self.knobs.rel_pos
            and q.dtype in (torch.float32, torch.float64)
            and torch.is_grad_enabled()
            and q.requires_grad
            and not SDPA_FUSES_BIAS_GRAD.get(q.device.type, False)
            and not torch.jit.is_tracing()  # fvcore's trace counts the explicit path's ops, not a Python op
        )

    def _attend_flex(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_hw: HW, k_hw: HW) -> torch.Tensor:
        """Attention through FlexAttention, the relative position added by a score_mod: (B, h, Nq, d)."""
        from .kernels import flex

        score_mod = None
        if self.knobs.rel_pos:
            rel_h, rel_w = flex.mvit_terms(q, q_hw, k_hw, self.rel_pos_h, self.rel_pos_w)  # (B, h, Nq, kh), (.., kw)
            kw = k_hw[1]

            def score_mod(score, b, h, qi, ki):
                return score + rel_h[b, h, qi, ki // kw] + rel_w[b, h, qi, ki % kw]

        return flex.attention(q, k, v, score_mod)

    @classmethod
    def stage_knobs(cls, stage: int, hw: HW) -> tuple[dict[str, Any], ...]:
        # MViTv2's keys/values pooled to a quarter of the first stage's side (stride 4, 2, 1, 1), queries not
        return ({"stride_q": 1, "stride_kv": (4, 2, 1, 1)[stage - 1], "rel_pos_size": hw[0]},)

    @classmethod
    def attention_width(cls, dim: int, knobs: Any) -> int:
        return knobs.dim_out or dim

    def _unsupported(
        self, batch: int, hw: HW, context_hw: HW | None, *, dtype: torch.dtype | None, device: Any
    ) -> list[str]:
        reasons = []
        w, sq, skv = self.knobs.window, self.knobs.stride_q, self.knobs.stride_kv
        if w and (hw[0] % w or hw[1] % w or w % sq or w % skv):
            reasons.append(
                f"pooling: window {w} must divide H={hw[0]} and W={hw[1]} and be a multiple of stride_q={sq} "
                f"and stride_kv={skv} (windows are not padded); choose another window, or 0 for global attention"
            )
        return reasons

    def macs(self, batch: int, hw: HW, context_hw: HW | None = None) -> int:
        # The flex path computes the same pairs (no block mask: every query sees every pooled key) and the
        # same two relative-position products.
        c, o, d, heads = self.dim, self.output_dim, self.head_dim, self.heads
        (qh, qw), (kh, kw) = self.output_hw(hw), self.kv_hw(hw)
        n, nq, nk = hw[0] * hw[1], qh * qw, kh * kw
        # q and kv projections (C -> C_out) of all N tokens, output projection (C_out -> C_out) of the Nq pooled ones.
        total = batch * (linear_macs(n, c, o) + linear_macs(n, c, 2 * o) + linear_macs(nq, o, o))
        maps = batch * heads  # pooling runs on every head's map
        if self.knobs.mode == "conv":
            for out_hw, copies in (((qh, qw), 1), ((kh, kw), 2)):
                tokens = out_hw[0] * out_hw[1]
                total += copies * maps * (conv_macs(out_hw, d, d, self.knobs.kernel, groups=d) + norm_macs(tokens, d))
        elif self.knobs.mode in ("avg", "max"):
            total += maps * self.knobs.kernel**2 * (nq + 2 * nk) * d
        windows = 1
        if self.knobs.window:  # each query sees its window's pooled keys only
            windows = (hw[0] // self.knobs.window) * (hw[1] // self.knobs.window)
            kh, kw = kh * self.knobs.window // hw[0], kw * self.knobs.window // hw[1]
        total += attention_macs(batch * windows, heads, nq // windows, nk // windows, d)
        if self.knobs.rel_pos:
            # q . R_h over (Nq, kh) and q . R_w over (Nq, kw); resizing the tables is batch-independent (0).
            total += maps * nq * (kh + kw) * d
        return total

    # ------------------------------------------------------------------ footprint
    def _footprint(
        self, x: torch.Tensor, hw: HW, query: tuple[int, int], context: torch.Tensor | None, context_hw: HW | None
    ) -> torch.Tensor:
        """Softmax weights of the pooled query holding pixel (i // stride_q, j // stride_q) over the
        pooled keys, each spread over the kernel x kernel window of pixels its value pools: by AvgPool's
        1 / kernel^2 (padding counted) in ``avg`` mode, evenly over the window's pixels inside the map otherwise.
        The residual pooling term (+ q) is no key's weight."""
        from .footprint import reference_probs, spread, windows

        (qh, qw), (kh, kw) = self.output_hw(hw), self.kv_hw(hw)
        probs = reference_probs(self, x, hw, None, None)  # (1, h, Nq, Nk)
        sq = 1 if self.knobs.mode == "none" else self.knobs.stride_q
        qi, qj = min(query[0] // sq, qh - 1), min(query[1] // sq, qw - 1)
        w = probs[0, :, qi * qw + qj].reshape(self.heads, kh, kw)
        if self.knobs.mode == "none":
            return w
        avg, s = self.knobs.mode == "avg", self.knobs.stride_kv
        k = self.knobs.kernel
        rows = windows(hw[0], kh, s, k, k // 2, include_pad=avg)
        cols = windows(hw[1], kw, s, k, k // 2, include_pad=avg)
        return spread(w, rows, cols)

    def keys_per_query(self, hw: HW, context_hw: HW | None = None) -> int:
        kh, kw = self.kv_hw(hw)
        return kh * kw


def _partition(t: torch.Tensor, hw: HW, grid: HW) -> tuple[torch.Tensor, HW]:
    """Cut each head's map into a grid of windows: (B, h, H*W, d) -> (B*gh*gw, h, (H/gh)*(W/gw), d)."""
    b, heads, _, d = t.shape
    (gh, gw), (a, c) = grid, (hw[0] // grid[0], hw[1] // grid[1])
    t = t.reshape(b, heads, gh, a, gw, c, d).permute(0, 2, 4, 1, 3, 5, 6)  # (B, gh, gw, h, a, c, d)
    return t.reshape(b * gh * gw, heads, a * c, d), (a, c)


def _merge(t: torch.Tensor, hw: HW, grid: HW) -> torch.Tensor:
    """Inverse of ``_partition``: (B*gh*gw, h, a*c, d) -> (B, h, H*W, d)."""
    (gh, gw), (a, c) = grid, (hw[0] // grid[0], hw[1] // grid[1])
    heads, d = t.shape[1], t.shape[-1]
    t = t.reshape(-1, gh, gw, heads, a, c, d).permute(0, 3, 1, 4, 2, 5, 6)  # (B, h, gh, a, gw, c, d)
    return t.reshape(-1, heads, hw[0] * hw[1], d)
