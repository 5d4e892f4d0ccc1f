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

Clips: a ``(T, H, W)`` map pools over time as well, as MViTv2's video model
(facebookresearch/SlowFast, ``MultiScaleAttention``) does: ``kernel_t`` (odd,
padding ``kernel_t // 2``), ``stride_q_t`` and ``stride_kv_t`` are the temporal
kernel and strides (Kinetics MViTv2-S: kernel 3x3x3, temporal strides 1). Any of
them above 1 makes the pooling a ``Conv3d`` (``AvgPool3d``/``MaxPool3d``) with
kernel ``(kernel_t, kernel, kernel)``; at their defaults (1) the 2-D pooling runs
on every frame, so a ``(1, H, W)`` map gives exactly the ``(H, W)`` output.
``rel_pos_frames`` (0: none) adds the temporal term ``q . R_t[t_q - t_k]`` of the
decomposed relative position, its table sized for a clip of that many frames
(``2 * max(q_t, kv_t) - 1`` rows, SlowFast's ``2 * T - 1`` at temporal stride 1)
and resized by linear interpolation like the spatial ones. Windows (``window``)
and the flex path are 2-D: refused on clips.

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

from .base import HW, Attention, KnobError, Knobs, TimeAxis, map_tokens, register
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
from .relpos import mvit_attend, mvit_bias, mvit_bias_3d, mvit_table

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
    # Clips (T, H, W): temporal kernel (odd; padding kernel_t // 2) and strides of the pooling (MViTv2 video:
    # kernel 3, strides 1); 1, 1, 1 pools every frame with the 2-D pooling.
    kernel_t: int = 1
    stride_q_t: int = 1
    stride_kv_t: int = 1
    # Frames of the clip at which the temporal relative-position table needs no resizing (0: no temporal term).
    rel_pos_frames: int = 0

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
        for knob in ("stride_q_t", "stride_kv_t"):
            value = getattr(self, knob)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise KnobError(f"pooling knob {knob!r} must be a positive integer (1: none), got {value!r}")
        kt = self.kernel_t
        if isinstance(kt, bool) or not isinstance(kt, int) or kt < 1 or kt % 2 == 0:
            raise KnobError(f"pooling knob 'kernel_t' must be an odd positive integer (MViTv2 video: 3), got {kt!r}")
        rf = self.rel_pos_frames
        if isinstance(rf, bool) or not isinstance(rf, int) or rf < 0:
            raise KnobError(f"pooling knob 'rel_pos_frames' must be 0 (no temporal term) or a clip length, got {rf!r}")
        if self.mode == "none" and (self.stride_q_t, self.stride_kv_t, self.kernel_t) != (1, 1, 1):
            raise KnobError("pooling mode 'none' cannot pool over time; set kernel_t, stride_q_t and stride_kv_t to 1")
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
    clip_footprint = True
    time = TimeAxis(
        True,
        "MViTv2 video: q, k, v pooled over (t, h, w) (kernel_t, stride_q_t, stride_kv_t), relative position "
        "decomposed over t (rel_pos_frames), h and w, residual pooling",
    )
    # "flex": FlexAttention with the decomposed relative position read by a score_mod from the two
    # (Nq, kh) and (Nq, kw) terms, never summed into an (Nq, Nk) bias; CUDA only (attentions/kernels/flex.py)
    impls = ("reference", "fast", "flex")
    impl_requires = {"flex": flex.REQUIRES}
    # MViTv2's stage transition (widening); a wider pooling kernel
    examples = (
        {"stride_q": 2, "stride_kv": 2, "dim_out": 64},
        {"kernel": 5, "stride_kv": 2},
        {"kernel_t": 3, "stride_q_t": 2, "stride_kv_t": 2, "rel_pos_frames": 4},
    )

    def __init__(self, dim: int, heads: int, knobs: PoolingKnobs, impl: str | None = None):
        # The base splits the widened channels into heads: head_dim = dim_out // heads (dim need not divide).
        super().__init__(dim, heads, knobs, impl)
        self.proj = Projections(dim, heads, bias=knobs.qkv_bias, out_dim=self.output_dim)
        d = self.head_dim
        self.pool_q, self.norm_q = self._pooling(knobs.stride_q, stride_t=knobs.stride_q_t)
        self.pool_k, self.norm_k = self._pooling(knobs.stride_kv, keys=True, stride_t=knobs.stride_kv_t)
        self.pool_v, self.norm_v = self._pooling(knobs.stride_kv, stride_t=knobs.stride_kv_t)
        if knobs.rel_pos:
            size = knobs.window or knobs.rel_pos_size  # windowed: positions within one window
            length = 2 * max(self._pooled(size, knobs.stride_q), self._pooled(size, knobs.stride_kv)) - 1
            self.rel_pos_h = mvit_table(length, d)  # (L, d)
            self.rel_pos_w = mvit_table(length, d)  # (L, d)
        if knobs.rel_pos and knobs.rel_pos_frames:
            frames = knobs.rel_pos_frames
            length_t = 2 * max(self._pooled_t(frames, knobs.stride_q_t), self._pooled_t(frames, knobs.stride_kv_t)) - 1
            self.rel_pos_t = mvit_table(length_t, d)  # (L_t, d)

    @property
    def video(self) -> bool:
        """Whether the pooling runs over time (Conv3d/Pool3d) rather than frame by frame."""
        kn = self.knobs
        return (kn.kernel_t, kn.stride_q_t, kn.stride_kv_t) != (1, 1, 1)

    def _pooling(self, stride: int, keys: bool = False, stride_t: int = 1) -> tuple[nn.Module | None, nn.Module | None]:
        d, mode, k = self.head_dim, self.knobs.mode, self.knobs.kernel
        if self.video and mode != "none":
            kt = self.knobs.kernel_t
            size, step, pad = (kt, k, k), (stride_t, stride, stride), (kt // 2, k // 2, k // 2)
            if mode == "conv":
                conv3 = nn.Conv3d(d, d, size, stride=step, padding=pad, groups=d, bias=False)
                return conv3, nn.LayerNorm(d, eps=1e-6, bias=not keys)
            pool = nn.AvgPool3d if mode == "avg" else nn.MaxPool3d
            return pool(size, stride=step, padding=pad), None
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

    def _pooled_t(self, frames: int, stride: int) -> int:
        kt = self.knobs.kernel_t
        return frames if self.knobs.mode == "none" else conv_out(frames, kt, stride, kt // 2)

    def output_hw(self, hw: HW) -> HW:
        if len(hw) == 3:
            return (self._pooled_t(hw[0], self.knobs.stride_q_t), *self.output_hw(hw[1:]))  # type: ignore[return-value]
        return (self._pooled(hw[0], self.knobs.stride_q), self._pooled(hw[1], self.knobs.stride_q))

    @property
    def output_dim(self) -> int:
        return self.knobs.dim_out or self.dim

    def kv_hw(self, hw: HW) -> HW:
        """Token map of the pooled keys and values."""
        if len(hw) == 3:
            return (self._pooled_t(hw[0], self.knobs.stride_kv_t), *self.kv_hw(hw[1:]))  # type: ignore[return-value]
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

    def _pool_clip(
        self, t: torch.Tensor, thw: tuple[int, int, int], op: nn.Module | None, norm: nn.Module | None
    ) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Pool each head's (T, H, W) map: (B, h, T*H*W, d) -> (B, h, T'*H'*W', d); a 2-D op runs per frame."""
        if op is None:
            return t, thw
        b, heads, _, d = t.shape
        frames, h, w = thw
        m = t.transpose(-2, -1).reshape(b * heads, d, frames, h, w)  # (B*h, d, T, H, W)
        if self.video:
            m = op(m)  # (B*h, d, T', H', W')
        else:
            m = op(m.transpose(1, 2).reshape(b * heads * frames, d, h, w))  # (B*h*T, d, H', W')
            m = m.reshape(b * heads, frames, d, m.shape[-2], m.shape[-1]).transpose(1, 2)  # (B*h, d, T, H', W')
        out = (int(m.shape[-3]), int(m.shape[-2]), int(m.shape[-1]))
        t = m.reshape(b, heads, d, out[0] * out[1] * out[2]).transpose(-2, -1)  # (B, h, T'*H'*W', d)
        return (t if norm is None else norm(t)), out

    def _forward_clip(self, x: torch.Tensor, thw: tuple[int, int, int]) -> torch.Tensor:
        """The (T, H, W) path: pooling over time too, relative position decomposed over t, h and w."""
        q = self.proj.queries(x)  # (B, h, N, d)
        k, v = self.proj.keys_values(x)  # (B, h, N, d) each
        q, q_thw = self._pool_clip(q, thw, self.pool_q, self.norm_q)  # (B, h, Nq, d)
        k, k_thw = self._pool_clip(k, thw, self.pool_k, self.norm_k)  # (B, h, Nk, d)
        v, _ = self._pool_clip(v, thw, self.pool_v, self.norm_v)  # (B, h, Nk, d)
        table_t = self.rel_pos_t if self.knobs.rel_pos_frames else None
        if q_thw[0] == k_thw[0] == 1 and table_t is None:  # one frame, no time table: the image's attention
            o = self._attend_map(q, k, v, q_thw[1:], k_thw[1:])  # (B, h, Nq, d)
        else:
            bias = None
            if self.knobs.rel_pos:
                bias = mvit_bias_3d(q, q_thw, k_thw, self.rel_pos_h, self.rel_pos_w, table_t)  # (B, h, Nq, Nk)
            o = attend(q, k, v, bias, math=self.math)  # (B, h, Nq, d)
        if self.knobs.residual_pooling:
            o = o + q
        return self.proj.output(o)  # (B, Nq, C_out)

    def _forward(self, x: torch.Tensor, hw: HW, context: torch.Tensor | None, context_hw: HW | None) -> torch.Tensor:
        if len(hw) == 3 or self.video:  # a module that pools over time reads an image as a one-frame clip
            return self._forward_clip(x, hw if len(hw) == 3 else (1, *hw))  # type: ignore[arg-type]
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
        attend_map = self._attend_flex if self.impl == "flex" else self._attend_map
        o = attend_map(q, k, v, q_hw, k_hw)  # (B, h, Nq, d)
        if self.knobs.residual_pooling:
            o = o + q
        if self.knobs.window:
            o = _merge(o, q_hw_all, grid)  # (B, h, Nq, d)
        return self.proj.output(o)  # (B, Nq, C_out)

    def _attend_map(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_hw: HW, k_hw: HW) -> torch.Tensor:
        """Attention over (H, W) maps with the decomposed relative position: (B, h, Nq, d)."""
        if self._decomposed(q):
            return mvit_attend(q, k, v, q_hw, k_hw, self.rel_pos_h, self.rel_pos_w)
        bias = mvit_bias(q, q_hw, k_hw, self.rel_pos_h, self.rel_pos_w) if self.knobs.rel_pos else None
        return attend(q, k, v, bias, math=self.math)

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
        if len(hw) == 3 or self.video:
            if w:
                reasons.append("pooling: hybrid windows (window > 0) are 2-D; set window=0 on a (T, H, W) map")
            if self.impl == "flex":
                reasons.append("pooling: the flex path is 2-D; use impl fast or reference on a (T, H, W) map")
            frames = hw[0] if len(hw) == 3 else 1
            if self.video and self.knobs.mode in ("avg", "max") and frames < self.knobs.kernel_t:
                reasons.append(
                    f"pooling: torch's {self.knobs.mode} pool3d needs at least kernel_t={self.knobs.kernel_t} frames "
                    f"(padding not counted), the clip has {frames}; use mode conv or a smaller kernel_t"
                )
            return reasons
        if w and (hw[0] % w or hw[1] % w or w % sq or w % skv):
            reasons.append(
                f"pooling: window {w} must divide H={hw[0]} and W={hw[1]} and be a multiple of stride_q={sq} "
                f"and stride_kv={skv} (windows are not padded); choose another window, or 0 for global attention"
            )
        return reasons

    def _macs_clip(self, batch: int, thw: tuple[int, int, int]) -> int:
        """The (T, H, W) count: as for images with T'*H'*W' tokens, kernel volumes and a temporal term."""
        c, o, d, heads, kn = self.dim, self.output_dim, self.head_dim, self.heads, self.knobs
        q_thw, k_thw = self.output_hw(thw), self.kv_hw(thw)
        n, nq, nk = map_tokens(thw), map_tokens(q_thw), map_tokens(k_thw)
        total = batch * (linear_macs(n, c, o) + linear_macs(n, c, 2 * o) + linear_macs(nq, o, o))
        maps = batch * heads
        volume = (kn.kernel_t if self.video else 1) * kn.kernel**2
        if kn.mode == "conv":  # depthwise: one product per output element and kernel tap, then LayerNorm
            total += maps * ((nq + 2 * nk) * d * volume + norm_macs(nq, d) + 2 * norm_macs(nk, d))
        elif kn.mode in ("avg", "max"):
            total += maps * volume * (nq + 2 * nk) * d
        total += attention_macs(batch, heads, nq, nk, d)
        if kn.rel_pos:  # q . R_h over (Nq, kh), q . R_w over (Nq, kw) and, with a temporal table, q . R_t over kt
            total += maps * nq * (k_thw[1] + k_thw[2] + (k_thw[0] if kn.rel_pos_frames else 0)) * d
        return total

    def macs(self, batch: int, hw: HW, context_hw: HW | None = None) -> int:
        if len(hw) == 3 or self.video:
            return self._macs_clip(batch, hw if len(hw) == 3 else (1, *hw))  # type: ignore[arg-type]
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
        self, x: torch.Tensor, hw: HW, query: tuple[int, ...], context: torch.Tensor | None, context_hw: HW | None
    ) -> torch.Tensor:
        """Softmax weights of the pooled query holding pixel (i // stride_q, j // stride_q) (on a clip frame
        t // stride_q_t too) over the pooled keys, each spread over the window of pixels its value pools
        (kernel_t x kernel x kernel on a clip that pools over time, one frame's kernel x kernel otherwise): by
        AvgPool's 1 / volume (padding counted) in ``avg`` mode, evenly over the window's pixels inside the
        map otherwise. The residual pooling term (+ q) is no key's weight."""
        from .footprint import flat_index, reference_probs, spread_clip, windows

        kn, clip = self.knobs, len(hw) == 3
        thw = tuple(hw) if clip else (1, *hw)  # an image is a one-frame clip here
        q_thw: tuple[int, ...] = self.output_hw(thw)  # type: ignore[arg-type]
        k_thw: tuple[int, ...] = self.kv_hw(thw)  # type: ignore[arg-type]
        probs = reference_probs(self, x, hw, None, None)  # (1, h, Nq, Nk)
        none = kn.mode == "none"
        steps = (1, 1, 1) if none else (kn.stride_q_t, kn.stride_q, kn.stride_q)
        t, i, j = query if clip else (0, *query)
        pooled = tuple(min(a // s, side - 1) for a, s, side in zip((t, i, j), steps, q_thw, strict=True))
        w = probs[0, :, flat_index(pooled, q_thw)].reshape(self.heads, *k_thw)  # (h, kt, kh, kw)
        if not none:
            avg, k, kt = kn.mode == "avg", kn.kernel, kn.kernel_t  # kernel_t is 1 unless the pooling runs over time
            frames = windows(thw[0], k_thw[0], kn.stride_kv_t, kt, kt // 2, include_pad=avg)
            rows = windows(thw[1], k_thw[1], kn.stride_kv, k, k // 2, include_pad=avg)
            cols = windows(thw[2], k_thw[2], kn.stride_kv, k, k // 2, include_pad=avg)
            w = spread_clip(w, frames, rows, cols)  # (h, T, H, W)
        return w if clip else w[:, 0]

    def keys_per_query(self, hw: HW, context_hw: HW | None = None) -> int:
        return map_tokens(self.kv_hw(hw))


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
