"""Building blocks of the backbones: patch embeddings, merging, MLPs, drop-path.

Tokens are ``(B, prefix + H*W, C)`` in row-major order, as the attention
contract wants them; the prefix (a CLS token, when a mechanism declares one) is
carried in front and skipped by every spatial operation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from attnbench.attentions.common import to_map, to_tokens
from torch import nn

HW = tuple[int, int]


def init_linear(m: nn.Module) -> None:
    """Truncated-normal (std 0.02) weights and zero biases, the ViT/Swin/PVT initialisation."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability ``p``."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)  # (B, 1, 1)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """Linear -> [depthwise 3x3 conv] -> GELU -> Linear.

    ``conv=True`` is PVTv2's convolutional feed-forward (the depthwise conv runs on
    the H x W map only; prefix tokens skip it)."""

    def __init__(self, dim: int, hidden: int, out_dim: int | None = None, conv: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden) if conv else None
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_dim or dim)
        self.apply(init_linear)

    def macs(self, hw: HW, prefix: int = 0) -> int:
        """Multiply-adds per image (biases and GELU free, as bench.flops counts)."""
        n = hw[0] * hw[1]
        c, hidden, c_out = self.fc1.in_features, self.fc1.out_features, self.fc2.out_features
        conv = n * hidden * 9 if self.dwconv is not None else 0
        return (prefix + n) * (c * hidden + hidden * c_out) + conv

    def forward(self, x: torch.Tensor, hw: HW, prefix: int = 0) -> torch.Tensor:
        x = self.fc1(x)
        if self.dwconv is not None:
            head, body = x[:, :prefix], x[:, prefix:]
            body = to_tokens(self.dwconv(to_map(body, hw)))  # (B, H*W, hidden)
            x = torch.cat([head, body], dim=1) if prefix else body
        return self.fc2(self.act(x))


class Stem(nn.Module):
    """Image -> tokens.

    - ``overlap``: Conv(k7, s4, p3) + LayerNorm (PVTv2's overlapping patch embedding);
    - ``patch``: Conv(k4, s4) + LayerNorm (Swin, DAT);
    - ``conv``: Conv(k7, s4, p3) without a norm (MViTv2).
    """

    KINDS = ("overlap", "patch", "conv")

    def __init__(self, kind: str, in_chans: int, dim: int, eps: float):
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"stem must be one of {', '.join(self.KINDS)}, got {kind!r}")
        self.kind = kind
        k, s, p = (4, 4, 0) if kind == "patch" else (7, 4, 3)
        self.geometry = (k, s, p)
        self.proj = nn.Conv2d(in_chans, dim, k, stride=s, padding=p)
        self.norm = nn.LayerNorm(dim, eps=eps) if kind != "conv" else None

    def output_hw(self, hw: HW) -> HW:
        k, s, p = self.geometry
        return (conv_out(hw[0], k, s, p), conv_out(hw[1], k, s, p))

    def macs(self, hw: HW) -> int:
        """Multiply-adds per image: the convolution, then LayerNorm (5 per element)."""
        out = self.output_hw(hw)
        n, k = out[0] * out[1], self.geometry[0]
        c_in, c = self.proj.in_channels, self.proj.out_channels
        return n * c * c_in * k * k + (5 * n * c if self.norm is not None else 0)

    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, HW]:
        m = self.proj(img)  # (B, C, H/4, W/4)
        hw = (int(m.shape[-2]), int(m.shape[-1]))
        x = to_tokens(m)  # (B, H*W, C)
        return (self.norm(x) if self.norm is not None else x), hw


class Merge(nn.Module):
    """Halve the token map and change the width between stages.

    - ``overlap``: Conv(k3, s2, p1) + LayerNorm (PVTv2);
    - ``linear``: Swin's patch merging, 2x2 neighbours concatenated -> LayerNorm(4C) -> Linear(4C, C', no bias);
      an odd H or W is zero-padded below/right first;
    - ``conv``: Conv(k2, s2, no bias) + LayerNorm (DAT).

    Prefix tokens go through a Linear(C, C') of their own.
    """

    KINDS = ("overlap", "linear", "conv")

    def __init__(self, kind: str, dim_in: int, dim_out: int, eps: float, prefix: int = 0):
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"merge must be one of {', '.join(self.KINDS)} or 'none', got {kind!r}")
        self.kind = kind
        if kind == "linear":
            self.norm = nn.LayerNorm(4 * dim_in, eps=eps)
            self.reduction = nn.Linear(4 * dim_in, dim_out, bias=False)
        elif kind == "overlap":
            self.proj = nn.Conv2d(dim_in, dim_out, 3, stride=2, padding=1)
            self.norm = nn.LayerNorm(dim_out, eps=eps)
        else:
            self.proj = nn.Conv2d(dim_in, dim_out, 2, stride=2, bias=False)
            self.norm = nn.LayerNorm(dim_out, eps=eps)
        self.prefix_proj = nn.Linear(dim_in, dim_out) if prefix else None
        self.apply(init_linear)

    def output_hw(self, hw: HW) -> HW:
        if self.kind == "overlap":
            return (conv_out(hw[0], 3, 2, 1), conv_out(hw[1], 3, 2, 1))
        if self.kind == "linear":
            return ((hw[0] + 1) // 2, (hw[1] + 1) // 2)
        return (hw[0] // 2, hw[1] // 2)

    def macs(self, hw: HW, prefix: int = 0) -> int:
        """Multiply-adds per image."""
        out = self.output_hw(hw)
        n = out[0] * out[1]
        if self.kind == "linear":
            c4, c_out = self.reduction.in_features, self.reduction.out_features
            total = 5 * n * c4 + n * c4 * c_out
        else:
            c_in, c_out, k = self.proj.in_channels, self.proj.out_channels, self.proj.kernel_size[0]
            total = n * c_out * c_in * k * k + 5 * n * c_out
        if prefix and self.prefix_proj is not None:
            total += prefix * self.prefix_proj.in_features * self.prefix_proj.out_features
        return total

    def forward(self, x: torch.Tensor, hw: HW, prefix: int = 0) -> tuple[torch.Tensor, HW]:
        head, body = x[:, :prefix], x[:, prefix:]
        m = to_map(body, hw)  # (B, C, H, W)
        if self.kind == "linear":
            if hw[0] % 2 or hw[1] % 2:
                m = F.pad(m, (0, hw[1] % 2, 0, hw[0] % 2))
            # Swin's order: (even row, even col), (odd, even), (even, odd), (odd, odd).
            parts = [m[..., 0::2, 0::2], m[..., 1::2, 0::2], m[..., 0::2, 1::2], m[..., 1::2, 1::2]]
            m = torch.cat(parts, dim=1)  # (B, 4C, H/2, W/2)
            out_hw = (int(m.shape[-2]), int(m.shape[-1]))
            body = self.reduction(self.norm(to_tokens(m)))  # (B, H*W/4, C')
        else:
            m = self.proj(m)  # (B, C', H/2, W/2)
            out_hw = (int(m.shape[-2]), int(m.shape[-1]))
            body = self.norm(to_tokens(m))
        if prefix:
            assert self.prefix_proj is not None
            body = torch.cat([self.prefix_proj(head), body], dim=1)
        return body, out_hw
