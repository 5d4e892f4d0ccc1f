"""Pieces written once and shared by the mechanisms.

Projections, head split/merge, token <-> map reshapes, the one SDPA helper and
the multiply-add counts of the parts they build from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, h*d) -> (B, h, N, d)."""
    b, n, c = t.shape
    return t.view(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """(B, h, N, d) -> (B, N, h*d)."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def to_map(t: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W)."""
    b, n, c = t.shape
    return t.transpose(1, 2).reshape(b, c, hw[0], hw[1])


def to_tokens(m: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C)."""
    return m.flatten(2).transpose(1, 2)


# Callables handed the (..., Nq, Nk) softmax weights of every plain-path ``attend`` call (footprints).
PROBES: list = []


# Whether SDPA's fused kernels take an additive bias that needs a gradient, per device type. Where they do
# not (the CPU, torch 2.11-2.13), SDPA runs its unfused math kernel, slower than the explicit path of
# attend() (scores, add, softmax, weighted sum): the fast path takes the explicit one there.
SDPA_FUSES_BIAS_GRAD: dict[str, bool] = {"cuda": True, "cpu": False}


def explicit_is_faster(q: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether attend()'s explicit path beats SDPA at this point (device, dtype, grad): see SDPA_FUSES_BIAS_GRAD."""
    needs_grad = bias is not None and bias.requires_grad and torch.is_grad_enabled()
    return needs_grad and not SDPA_FUSES_BIAS_GRAD.get(q.device.type, False)


def widen(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or in float64 when it is: the precision the sensitive steps compute in."""
    return t if t.dtype == torch.float64 else t.float()


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    math: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v, the one place that calls SDPA.

    q: (..., Nq, d), k: (..., Nk, d), v: (..., Nk, dv); bias is additive and
    broadcastable to (..., Nq, Nk) (-inf masks a pair). ``math=True`` forces the
    plain PyTorch path, which is the reference every fast path must match;
    otherwise SDPA, unless the explicit path is the faster one (explicit_is_faster).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if math or explicit_is_faster(q, bias):
        scores = (q @ k.transpose(-2, -1)) * scale  # (..., Nq, Nk)
        if bias is not None:
            scores = scores + bias
        # softmax in float32 at least: float64 inputs stay float64, so the reference is exact there
        probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(v.dtype)
        for probe in PROBES:  # attentions/footprint.py reads the reference path's weights here
            probe(probs)
        return probs @ v
    if bias is not None:
        bias = bias.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


class Projections(nn.Module):
    """Query, key/value and output projections of multi-head attention.

    Keys and values are projected from ``source`` (x itself, a reduced map, or a
    second image's tokens in cross attention), so self and cross attention share
    the same weights and code.
    """

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None, bias: bool = True, out_dim: int | None = None):
        super().__init__()
        self.heads = heads
        # out_dim widens the heads (MViTv2's qkv projecting from dim to dim_out): q, k, v and the output
        # are out_dim wide, split into heads of out_dim // heads.
        out_dim = out_dim or dim
        self.q = nn.Linear(dim, out_dim, bias=bias)
        self.kv = nn.Linear(kv_dim or dim, 2 * out_dim, bias=bias)
        self.out = nn.Linear(out_dim, out_dim)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, h, N, d)."""
        return split_heads(self.q(x), self.heads)

    def keys_values(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, M, C') -> two (B, h, M, d)."""
        k, v = self.kv(source).chunk(2, dim=-1)  # each (B, M, C)
        return split_heads(k, self.heads), split_heads(v, self.heads)

    def output(self, o: torch.Tensor) -> torch.Tensor:
        """(B, h, N, d) -> (B, N, C_out)."""
        return self.out(merge_heads(o))

    def macs(self, batch: int, nq: int, nkv: int) -> int:
        """Multiply-adds of the q, kv and output projections."""
        c, o = self.q.in_features, self.q.out_features
        return batch * (nq * c * o + nkv * self.kv.in_features * 2 * o + nq * o * o)


def attention_macs(batch: int, heads: int, nq: int, nk: int, head_dim: int) -> int:
    """Multiply-adds of q k^T and of probs @ v for ``nq`` x ``nk`` pairs per head."""
    return 2 * batch * heads * nq * nk * head_dim


def linear_macs(tokens: int, c_in: int, c_out: int) -> int:
    return tokens * c_in * c_out


def conv_macs(out_hw: tuple[int, int], c_in: int, c_out: int, kernel: int, groups: int = 1) -> int:
    """Multiply-adds of a 2-D convolution per image."""
    return out_hw[0] * out_hw[1] * c_out * (c_in // groups) * kernel * kernel


def norm_macs(tokens: int, channels: int) -> int:
    """LayerNorm/GroupNorm with affine, counted the way fvcore does (5 per element with affine)."""
    return 5 * tokens * channels


def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1
