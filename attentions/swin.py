"""Swin window attention (Liu et al., ICCV 2021).

Tokens attend only within non-overlapping M x M windows, with a learnable
relative position bias per head read from a ((2M-1)^2, heads) table through a
precomputed index. With ``shift=True`` the map is rolled by -S before
partitioning (and back after), S = ``shift_size`` (M // 2 by default, as Swin;
DAT uses ceil(M / 2)), and a region mask keeps tokens from attending across the
wrap-around: masked pairs get -100 added to their scores, as in the
official code, so that no softmax row is ever empty (a padded query's row may
hold only masked keys; it is cropped away, and -inf would turn its gradient
into NaN).

Small maps: as in the official code, when min(H, W) <= M the window shrinks to
m = min(H, W) and the shift is switched off; the bias then reads the central
(2m-1)^2 rows of the table. H and W must be multiples of the window; with
``pad=True`` the map is zero-padded below and to the right up to the next
multiples, the padded keys are masked (-100) and the padded queries cropped.

Clips (Video Swin, Liu et al., CVPR 2022): on a ``(T, H, W)`` map the windows are
``window_t x M x M`` (Video Swin-T: 8x7x7), shifted by ``(window_t // 2, S, S)``
with the 27-region mask, and the bias table has ``(2 window_t - 1)(2M - 1)^2``
rows read through the 3-D index ``((dt + Wt - 1)(2M - 1) + dh + M - 1)(2M - 1)
+ dw + M - 1`` (the official ``relative_position_index``). As there, an axis no
longer than its window gets one window of its length and no shift (time); the
spatial axes keep the image rule above, the same on square maps. ``pad`` pads T
too. An ``(H, W)`` map is a one-frame clip: its windows read the table's time-offset-0
slice (the (2M-1)^2 rows from ``(Wt - 1)(2M - 1)^2``; the whole table when ``window_t``
is 1) in every impl, so it gives exactly the ``(1, H, W)`` output for any ``window_t``
(the flex path, images only, to float32 rounding).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F

from .base import HW, Attention, KnobError, Knobs, MapRule, TimeAxis, map_tokens, register
from .common import Projections, attend, attention_macs
from .kernels import flex
from .relpos import swin_bias, swin_index, swin_index_3d, swin_table

# Added to the score of a masked pair (the official Swin value).
MASKED = -100.0
# The fast path's value: exp(-100) = 3.7e-44 is a float32 denormal, and the probabilities of masked pairs held
# there make every product with them (probs @ v and the backward's matmuls) run at the CPU's slow denormal
# speed: a shifted window's fwd+bwd took 4x its unshifted time on the CPU (timm's too). At -1e4 they are 0;
# against -100 a probability moves by at most 4e-44 of its row (the same softmax where every key is masked).
MASKED_FAST = -1e4


@dataclasses.dataclass(frozen=True)
class SwinKnobs(Knobs):
    # Side M of the square window (Swin-T/S/B use 7 at 224 px).
    window: int = 7
    # Shift the windows (Swin alternates False and True between blocks).
    shift: bool = False
    # Rows and columns a shifted window rolls by, 0 < S < M; 0 means M // 2 (Swin). DAT uses ceil(M / 2).
    shift_size: int = 0
    # Zero-pad H and W up to multiples of the window and mask the padding.
    pad: bool = False
    qkv_bias: bool = True
    # Frames of a window on (T, H, W) maps (Video Swin-T: 8); shifted windows roll time by window_t // 2.
    window_t: int = 1

    def check(self) -> None:
        wt = self.window_t
        if isinstance(wt, bool) or not isinstance(wt, int) or wt < 1:
            raise KnobError(f"swin knob 'window_t' must be a positive integer (Video Swin-T uses 8), got {wt!r}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise KnobError(f"swin knob 'window' must be a positive integer (Swin uses 7), got {self.window!r}")
        if self.shift_size and not 0 < self.shift_size < self.window:
            raise KnobError(
                f"swin knob 'shift_size' must be 0 (window // 2) or between 1 and window - 1 = {self.window - 1}, "
                f"got {self.shift_size}"
            )


@dataclasses.dataclass(frozen=True)
class WindowLayout:
    """How a map is cut into windows: window side m, shift s, padded map (hp, wp)."""

    window: int
    shift: int
    padded_hw: HW

    @property
    def grid(self) -> HW:
        return (self.padded_hw[0] // self.window, self.padded_hw[1] // self.window)

    @property
    def windows(self) -> int:
        return self.grid[0] * self.grid[1]


def window_layout(hw: HW, window: int, shift: bool, shift_size: int = 0) -> WindowLayout:
    """The official rule: a map no larger than the window gets one window of min(H, W) and no shift."""
    h, w = hw
    if min(h, w) <= window:
        m, s = min(h, w), 0
    else:
        m, s = window, ((shift_size or window // 2) if shift else 0)
    return WindowLayout(m, s, (math.ceil(h / m) * m, math.ceil(w / m) * m))


@dataclasses.dataclass(frozen=True)
class ClipLayout:
    """How a (T, H, W) map is cut into windows: window (wt, m, m), shift (st, s, s), padded map (tp, hp, wp)."""

    window: tuple[int, int, int]
    shift: tuple[int, int, int]
    padded: tuple[int, int, int]

    @property
    def grid(self) -> tuple[int, int, int]:
        return (self.padded[0] // self.window[0], self.padded[1] // self.window[1], self.padded[2] // self.window[2])

    @property
    def windows(self) -> int:
        return map_tokens(self.grid)

    @property
    def tokens(self) -> int:
        """Tokens of one window."""
        return map_tokens(self.window)


def clip_layout(thw: tuple[int, int, int], window_t: int, window: int, shift: bool, shift_size: int = 0) -> ClipLayout:
    """Video Swin's rule in time (a clip no longer than window_t: one window of T frames, no shift), the image
    rule in space."""
    t = thw[0]
    space = window_layout(thw[1:], window, shift, shift_size)  # type: ignore[arg-type]
    wt, st = (t, 0) if t <= window_t else (window_t, window_t // 2 if shift else 0)
    m, s = space.window, space.shift
    return ClipLayout((wt, m, m), (st, s, s), (math.ceil(t / wt) * wt, *space.padded_hw))


def clip_mask(thw: tuple[int, int, int], layout: ClipLayout) -> torch.Tensor | None:
    """Which key each query of each 3-D window may see: (windows, Tw, Tw) bool, or None when all may.

    Per shifted axis the rolled frame has three regions (as :func:`window_regions`), 27 in all; padded keys
    are never seen."""
    if not any(layout.shift) and layout.padded == tuple(thw):
        return None
    region = torch.zeros(layout.padded, dtype=torch.long)
    axes = []
    for win, s in zip(layout.window, layout.shift, strict=True):
        axes.append(((0, -win), (-win, -s), (-s, None)) if s else ((0, None),))
    for i, ts in enumerate(axes[0]):
        for j, hs in enumerate(axes[1]):
            for k, ws in enumerate(axes[2]):
                region[slice(*ts), slice(*hs), slice(*ws)] = 9 * i + 3 * j + k
    valid = torch.zeros(layout.padded, dtype=torch.bool)
    valid[: thw[0], : thw[1], : thw[2]] = True
    valid = torch.roll(valid, shifts=tuple(-s for s in layout.shift), dims=(0, 1, 2))  # into the rolled frame
    (gt, gh, gw), (wt, m, _) = layout.grid, layout.window
    region = region.view(gt, wt, gh, m, gw, m).permute(0, 2, 4, 1, 3, 5).reshape(-1, wt * m * m)  # (nW, Tw)
    valid = valid.view(gt, wt, gh, m, gw, m).permute(0, 2, 4, 1, 3, 5).reshape(-1, wt * m * m)  # (nW, Tw)
    return (region[:, :, None] == region[:, None, :]) & valid[:, None, :]  # (nW, Tw, Tw)


def window_mask(hw: HW, layout: WindowLayout) -> torch.Tensor | None:
    """Which key each query of each window may see: (windows, T, T) bool, or None when all may.

    In the rolled frame, rows [0, hp-m), [hp-m, hp-s) and [hp-s, hp) are three
    regions (columns likewise); the last two wrapped around from the other side,
    so a query sees only keys of its own region. Padded keys are never seen.
    """
    regions = window_regions(hw, layout)
    if regions is None:
        return None
    region, valid = regions
    return (region[:, :, None] == region[:, None, :]) & valid[:, None, :]  # (nW, T, T)


def window_regions(hw: HW, layout: WindowLayout) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Region of every token of every window and whether it is a real (unpadded) token: two (nW, T).

    None when every query may see every key of its window (no shift, no padding).
    """
    h, w = hw
    m, s = layout.window, layout.shift
    hp, wp = layout.padded_hw
    if s == 0 and (hp, wp) == (h, w):
        return None
    region = torch.zeros(hp, wp, dtype=torch.long)
    if s:
        bounds = ((0, -m), (-m, -s), (-s, None))
        for i, rows in enumerate(bounds):
            for j, cols in enumerate(bounds):
                region[slice(*rows), slice(*cols)] = 3 * i + j
    valid = torch.zeros(hp, wp, dtype=torch.bool)
    valid[:h, :w] = True
    valid = torch.roll(valid, shifts=(-s, -s), dims=(0, 1))  # into the rolled frame
    gh, gw = layout.grid
    region = region.view(gh, m, gw, m).transpose(1, 2).reshape(gh * gw, m * m)  # (nW, T)
    valid = valid.view(gh, m, gw, m).transpose(1, 2).reshape(gh * gw, m * m)  # (nW, T)
    return region, valid


@register
class SwinAttention(Attention):
    knobs: SwinKnobs
    index: torch.Tensor
    name = "swin"
    summary = (
        "Swin window attention over M x M windows with a relative position bias table; shift=True rolls the "
        "windows by shift_size (M//2 by default) with the region mask (-100 on masked pairs); pad=True zero-pads "
        "H and W to multiples of M and masks the padded keys; maps with min(H, W) <= M use one window of "
        "min(H, W) and no shift"
    )
    Knobs = SwinKnobs
    cost_knob = "window"
    complexity = "O(N M^2)"
    supports_cross = False
    clip_footprint = True
    time = TimeAxis(
        True,
        "Video Swin: window_t x M x M windows shifted by (window_t // 2, S, S) with the 3-D region mask, "
        "a (2 window_t - 1)(2M - 1)^2 bias table",
    )
    # "flex": FlexAttention over the windows laid end to end, a block mask per window and the bias table read by a
    # score_mod (no (nW, h, T, T) bias in memory); CUDA only (see attentions/kernels/flex.py)
    impls = ("reference", "fast", "flex")
    impl_requires = {"flex": flex.REQUIRES}
    examples = (
        {"window": 3, "pad": True},
        {"window": 3, "shift": True, "pad": True},
        {"window": 3, "window_t": 2, "shift": True, "pad": True},
    )

    def __init__(self, dim: int, heads: int, knobs: SwinKnobs, impl: str | None = None):
        super().__init__(dim, heads, knobs, impl)
        self.proj = Projections(dim, heads, bias=knobs.qkv_bias)
        # ((2Wt-1)(2M-1)^2, h): the image table ((2M-1)^2, h) when window_t is 1
        self.table = swin_table(knobs.window, heads, knobs.window_t)
        m = knobs.window
        # First row of the time-offset-0 slice, the (2M-1)^2 rows an image reads: on one frame every query and
        # key are at the same time (dt = 0, the slice Wt - 1 of swin_index_3d's layout).
        self.image_row0 = (knobs.window_t - 1) * (2 * m - 1) ** 2
        index = swin_index((m, m), m, self.image_row0)  # (M*M, M*M) rows of self.table
        self.register_buffer("index", index, persistent=False)
        self._masks: dict[tuple, torch.Tensor | None] = {}
        self._flex_cache: dict[tuple, Any] = {}  # block masks and region ids of the flex path, per resolution

    def _masked(self) -> float:
        """The score added to a masked pair: the official -100 on the reference path, MASKED_FAST elsewhere."""
        return MASKED if self.impl == "reference" else MASKED_FAST

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        """q, k and v side by side: tokens (..., C) -> (..., 3C). The reference concatenates the two
        projections' outputs; the other paths run one matmul over the stacked weights (as timm's qkv Linear):
        no (..., 3C) copy in the forward, one matmul per gradient in the backward."""
        p = self.proj
        if self.impl == "reference":
            return torch.cat([p.q(x), p.kv(x)], dim=-1)
        bias = None if p.q.bias is None else torch.cat([p.q.bias, p.kv.bias])
        return F.linear(x, torch.cat([p.q.weight, p.kv.weight]), bias)

    def layout(self, hw: HW) -> WindowLayout:
        return window_layout(hw, self.knobs.window, self.knobs.shift, self.knobs.shift_size)

    @classmethod
    def stage_knobs(cls, stage: int, hw: HW) -> tuple[dict[str, Any], ...]:
        return ({"window": 7}, {"window": 7, "shift": True})  # Swin-T: local then shifted windows of 7

    def clip_layout(self, thw: tuple[int, int, int]) -> ClipLayout:
        kn = self.knobs
        return clip_layout(thw, kn.window_t, kn.window, kn.shift, kn.shift_size)

    def _unsupported(
        self, batch: int, hw: HW, context_hw: HW | None, *, dtype: torch.dtype | None, device: Any
    ) -> list[str]:
        if len(hw) != 3:
            return []
        reasons = []
        if self.impl == "flex":
            reasons.append("swin: the flex path is 2-D; use impl fast or reference on a (T, H, W) map")
        wt = self.clip_layout(hw).window[0]  # type: ignore[arg-type]
        if not self.knobs.pad and hw[0] % wt:
            reasons.append(
                f"swin: the clip's {hw[0]} frames must be a multiple of the window's {wt}; pass pad=True to pad "
                f"the clip with masked frames, or choose window_t dividing {hw[0]}"
            )
        return reasons

    def map_rules(self, hw: HW, context_hw: HW | None) -> list[MapRule]:
        if self.knobs.pad:
            return []
        hw = hw[-2:]  # the spatial rule; time is checked in _unsupported
        lay = self.layout(hw)
        h, w = hw
        fits = [d for d in range(2, min(h, w) + 1) if h % d == 0 and w % d == 0]
        hint = f"a window that divides both ({', '.join(map(str, fits[:6]))})" if fits else "another map size"
        fix = (
            f"pass pad=True to zero-pad to {lay.padded_hw[0]}x{lay.padded_hw[1]} (padded keys masked), or choose {hint}"
        )
        return [MapRule(f"the window {lay.window}", multiple=lay.window, fix=fix)]

    @property
    def image_table(self) -> torch.Tensor:
        """The ((2M-1)^2, h) rows of the table an image reads (its time-offset-0 slice), a view."""
        return self.table[self.image_row0 : self.image_row0 + (2 * self.knobs.window - 1) ** 2]

    def window_bias(self, hw: HW, device: torch.device) -> torch.Tensor:
        """Relative position bias plus the shift/pad mask: (windows or 1, h, T, T), shared by both impls."""
        lay = self.layout(hw)
        m = lay.window
        if m == self.knobs.window:
            index = self.index  # (T, T) rows of the time-offset-0 slice
        else:
            index = swin_index((m, m), self.knobs.window, self.image_row0).to(device)  # (T, T)
        bias = swin_bias(self.table, index)[None]  # (1, h, T, T)
        masked = self._masked()
        key = (tuple(hw), str(device), masked)
        if key not in self._masks:
            allowed = window_mask(hw, lay)
            self._masks[key] = None if allowed is None else (~allowed).float().mul(masked).to(device)
        mask = self._masks[key]  # (nW, T, T) of 0 and the masked value, or None
        if mask is not None:
            bias = bias + mask[:, None].to(bias.dtype)  # (nW, h, T, T)
        return bias

    def clip_bias(self, thw: tuple[int, int, int], device: torch.device) -> torch.Tensor:
        """Relative position bias plus the shift/pad mask of a clip's windows: (windows or 1, h, Tw, Tw)."""
        lay = self.clip_layout(thw)
        kn = self.knobs
        index = swin_index_3d(lay.window, (kn.window_t, kn.window)).to(device)  # (Tw, Tw)
        bias = swin_bias(self.table, index)[None]  # (1, h, Tw, Tw)
        masked = self._masked()
        key = (tuple(thw), str(device), masked)
        if key not in self._masks:
            allowed = clip_mask(thw, lay)
            self._masks[key] = None if allowed is None else (~allowed).float().mul(masked).to(device)
        mask = self._masks[key]  # (nW, Tw, Tw) of 0 and the masked value, or None
        if mask is not None:
            bias = bias + mask[:, None].to(bias.dtype)  # (nW, h, Tw, Tw)
        return bias

    def _attend_windows(self, qkv: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Attention inside every window of images or clips: qkv (3, B, nW, h, T, d), bias (g, h, T, T) with
        g = 1 or nW (windows with their own mask) -> the outputs, laid out in memory as (B, nW, h, T, d)."""
        _, b, nw, heads, t, d = qkv.shape
        g = bias.shape[0]
        if self.impl == "fast":
            # Four dimensions for SDPA's fused kernels with the windows in the batch (a view of the projection's
            # output, no copy of q, k, v); windows with their own mask repeat it per image (no copy at batch 1).
            q, k, v = qkv.reshape(3, b * nw, heads, t, d).unbind(0)  # (B*nW, h, T, d) each
            mask = bias if g == 1 else bias.expand(b, g, heads, t, t).reshape(b * g, heads, t, t)
            return attend(q, k, v, mask, math=self.math)  # (B*nW, h, T, d)
        # Four dimensions, the bias broadcast over the leading one: windows with their own mask join the heads.
        q, k, v = qkv.reshape(3, b * nw // g, g * heads, t, d).unbind(0)  # (B*nW/g, g*h, T, d) each
        return attend(q, k, v, bias.reshape(1, g * heads, t, t), math=self.math)  # (B*nW/g, g*h, T, d)

    def _forward_clip(self, x: torch.Tensor, thw: tuple[int, int, int]) -> torch.Tensor:
        """Video Swin's 3-D (shifted) window attention on a (T, H, W) map."""
        b, n, c = x.shape
        t, h, w = thw
        lay = self.clip_layout(thw)
        (wt, m, _), (st, s, _), (tp, hp, wp) = lay.window, lay.shift, lay.padded
        gt, gh, gw = lay.grid
        heads, d, tw = self.heads, self.head_dim, lay.tokens
        if self.impl == "fast" and (tp, hp, wp) == (t, h, w):  # windows first, as the image's fast path
            xw = x.view(b, t, h, w, c)  # (B, T, H, W, C)
            if st or s:
                xw = torch.roll(xw, shifts=(-st, -s, -s), dims=(1, 2, 3))
            xw = xw.view(b, gt, wt, gh, m, gw, m, c).permute(0, 1, 3, 5, 2, 4, 6, 7)  # (B, gt, gh, gw, wt, m, m, C)
            xw = xw.reshape(b * lay.windows, tw, c)  # (B*nW, Tw, C)
            qkv = self._qkv(xw).view(b, lay.windows, tw, 3, heads, d).permute(3, 0, 1, 4, 2, 5)  # (3, B, nW, h, Tw, d)
        else:
            qkv = self._qkv(x).view(b, t, h, w, 3 * c)  # (B, T, H, W, 3C)
            if (tp, hp, wp) != (t, h, w):
                qkv = F.pad(qkv, (0, 0, 0, wp - w, 0, hp - h, 0, tp - t))  # (B, Tp, Hp, Wp, 3C)
            if st or s:
                qkv = torch.roll(qkv, shifts=(-st, -s, -s), dims=(1, 2, 3))
            qkv = qkv.view(b, gt, wt, gh, m, gw, m, 3, heads, d)  # (B, gt, wt, gh, m, gw, m, 3, h, d)
            qkv = qkv.permute(7, 0, 1, 3, 5, 8, 2, 4, 6, 9).reshape(
                3, b, lay.windows, heads, tw, d
            )  # (3, B, nW, h, Tw, d)
        o = self._attend_windows(qkv, self.clip_bias(thw, x.device))  # (B, nW, h, Tw, d) in memory order
        o = o.view(b, gt, gh, gw, heads, wt, m, m, d).permute(
            0, 1, 5, 2, 6, 3, 7, 4, 8
        )  # (B, gt, wt, gh, m, gw, m, h, d)
        o = o.reshape(b, tp, hp, wp, c)  # (B, Tp, Hp, Wp, C)
        if st or s:
            o = torch.roll(o, shifts=(st, s, s), dims=(1, 2, 3))
        o = o[:, :t, :h, :w].reshape(b, n, c)  # (B, N, C)
        return self.proj.out(o)

    def _forward(self, x: torch.Tensor, hw: HW, context: torch.Tensor | None, context_hw: HW | None) -> torch.Tensor:
        if len(hw) == 3:
            return self._forward_clip(x, hw)  # type: ignore[arg-type]
        b, n, c = x.shape
        h, w = hw
        lay = self.layout(hw)
        m, s = lay.window, lay.shift
        hp, wp = lay.padded_hw
        gh, gw = lay.grid
        heads, d = self.heads, self.head_dim
        if self.impl == "fast" and (hp, wp) == (h, w):
            # Windows first, then one projection of each window's tokens (as timm's Swin block): the roll and
            # the partition move C channels, not 3C. (With padding the projection comes first, as in the
            # reference, so that padded tokens are not projected.)
            xw = x.view(b, h, w, c)  # (B, H, W, C)
            if s:
                xw = torch.roll(xw, shifts=(-s, -s), dims=(1, 2))
            xw = xw.view(b, gh, m, gw, m, c).transpose(2, 3).reshape(b * gh * gw, m * m, c)  # (B*nW, T, C)
            qkv = self._qkv(xw).view(b, gh * gw, m * m, 3, heads, d)  # (B, nW, T, 3, h, d)
            qkv = qkv.permute(3, 0, 1, 4, 2, 5)  # (3, B, nW, h, T, d)
        else:
            # q, k, v side by side: the channels are [q | k | v], each (h, d) like split_heads.
            qkv = self._qkv(x).view(b, h, w, 3 * c)  # (B, H, W, 3C)
            if (hp, wp) != (h, w):
                qkv = F.pad(qkv, (0, 0, 0, wp - w, 0, hp - h))  # (B, Hp, Wp, 3C)
            if s:
                qkv = torch.roll(qkv, shifts=(-s, -s), dims=(1, 2))
            qkv = qkv.view(b, gh, m, gw, m, 3, heads, d)  # (B, gh, m, gw, m, 3, h, d)
            qkv = qkv.permute(5, 0, 1, 3, 6, 2, 4, 7).reshape(3, b, gh * gw, heads, m * m, d)  # (3, B, nW, h, T, d)
        if self.impl == "flex":
            o = self._attend_flex(qkv, hw)  # (B, nW, h, T, d)
            o = o.reshape(b, gh, gw, heads, m, m, d).permute(0, 1, 4, 2, 5, 3, 6).reshape(b, hp, wp, c)
            if s:
                o = torch.roll(o, shifts=(s, s), dims=(1, 2))
            return self.proj.out(o[:, :h, :w].reshape(b, n, c))
        o = self._attend_windows(qkv, self.window_bias(hw, x.device))  # (B, nW, h, T, d) in memory order
        o = o.view(b, gh, gw, heads, m, m, d).permute(0, 1, 4, 2, 5, 3, 6).reshape(b, hp, wp, c)  # (B, Hp, Wp, C)
        if s:
            o = torch.roll(o, shifts=(s, s), dims=(1, 2))
        o = o[:, :h, :w].reshape(b, n, c)  # (B, N, C)
        return self.proj.out(o)

    def _attend_flex(self, qkv: torch.Tensor, hw: HW) -> torch.Tensor:
        """Window attention through FlexAttention: qkv (3, B, nW, h, T, d) -> (B, nW, h, T, d).

        The windows are laid end to end in one sequence of nW*T tokens per image; the
        block mask keeps every query in its window, the score_mod adds the table's bias
        (and -100 across shifted regions or on padded keys, as the reference does).
        """
        from .kernels import flex

        _, b, nw, heads, t, d = qkv.shape
        lay = self.layout(hw)
        m, big = lay.window, self.knobs.window
        span = 2 * big - 1
        key = (tuple(hw), str(qkv.device))
        if key not in self._flex_cache:
            regions = window_regions(hw, lay)
            if regions is not None:
                region, valid = (r.reshape(-1).to(qkv.device) for r in regions)  # (nW*T,) each
                regions = (region, torch.where(valid, region, -1))  # a padded key matches no query
            self._flex_cache[key] = (flex.window_block_mask(nw, t, qkv.device), regions)
        block_mask, regions = self._flex_cache[key]
        table, row0 = self.table, self.image_row0  # ((2Wt-1)(2M-1)^2, h); an image reads rows row0 on (dt = 0)

        def score_mod(score, bi, hi, qi, ki):
            tq, tk = qi % t, ki % t  # positions inside the window
            row = row0 + (tq // m - tk // m + big - 1) * span + (tq % m - tk % m + big - 1)
            score = score + table[row, hi]
            if regions is not None:
                score = score + (regions[0][qi] != regions[1][ki]) * MASKED
            return score

        q, k, v = qkv.transpose(2, 3).reshape(3, b, heads, nw * t, d).unbind(0)  # (B, h, nW*T, d) each
        o = flex.attention(q, k, v, score_mod, block_mask)  # (B, h, nW*T, d)
        return o.view(b, heads, nw, t, d).transpose(1, 2)  # (B, nW, h, T, d)

    def macs(self, batch: int, hw: HW, context_hw: HW | None = None) -> int:
        # Projections of the H*W real tokens; scores and weighted sum over every
        # pair inside each (padded) window, masked pairs included since they are computed.
        # The flex path computes every pair of the 128x128 blocks its block mask visits.
        if len(hw) == 3:
            clip = self.clip_layout(hw)  # type: ignore[arg-type]
            n, t = map_tokens(hw), clip.tokens
            return self.proj.macs(batch, n, n) + attention_macs(batch * clip.windows, self.heads, t, t, self.head_dim)
        lay = self.layout(hw)
        n = hw[0] * hw[1]
        t = lay.window**2
        if self.impl == "flex":
            from .kernels.flex import window_block_pairs

            pairs = window_block_pairs(lay.windows, t)
            return self.proj.macs(batch, n, n) + attention_macs(batch, self.heads, pairs, 1, self.head_dim)
        return self.proj.macs(batch, n, n) + attention_macs(batch * lay.windows, self.heads, t, t, self.head_dim)

    # ------------------------------------------------------------------ footprint
    def _footprint(
        self, x: torch.Tensor, hw: HW, query: tuple[int, ...], context: torch.Tensor | None, context_hw: HW | None
    ) -> torch.Tensor:
        """The query's softmax row inside its (shifted) window, put back on the unrolled, unpadded map; on a
        clip the window is window_t x M x M, shifted in time too.

        Keys of the window in another region of the shifted map keep the weight exp(-100) relative
        to the others that the mask gives them, as in the forward pass; nothing outside the window."""
        from .footprint import flat_index, reference_probs

        if len(hw) == 3:
            clip = self.clip_layout(hw)  # type: ignore[arg-type]
            win, shift, padded, grid = clip.window, clip.shift, clip.padded, clip.grid
        else:
            lay = self.layout(hw)
            win, shift, padded, grid = (lay.window,) * 2, (lay.shift,) * 2, lay.padded_hw, lay.grid
        tw, nw = map_tokens(win), map_tokens(grid)
        probs = reference_probs(self, x, hw, None, None)  # (nW/g, g*h, Tw, Tw), g = 1 or nW
        g = probs.shape[1] // self.heads
        rolled = [(a - s) % p for a, s, p in zip(query, shift, padded, strict=True)]  # the query in the rolled frame
        win_at = [r // m for r, m in zip(rolled, win, strict=True)]  # its window on the grid
        n = flat_index(tuple(win_at), grid)
        at = flat_index(tuple(r % m for r, m in zip(rolled, win, strict=True)), win)  # its token in the window
        row = probs.reshape(nw // g, g, self.heads, tw, tw)[n // g, n % g, :, at]  # (h, Tw)
        out = torch.zeros(self.heads, *padded, dtype=row.dtype, device=row.device)  # (h, [Tp,] Hp, Wp)
        box = tuple(slice(c * m, (c + 1) * m) for c, m in zip(win_at, win, strict=True))
        out[(slice(None), *box)] = row.reshape(self.heads, *win)  # rolled frame
        out = torch.roll(out, shifts=tuple(shift), dims=tuple(range(1, len(hw) + 1)))
        return out[(slice(None), *(slice(0, side) for side in hw))]  # (h, [T,] H, W)

    def keys_per_query(self, hw: HW, context_hw: HW | None = None) -> int:
        if len(hw) == 3:
            return self.clip_layout(hw).tokens  # type: ignore[arg-type]
        return self.layout(hw).window ** 2
