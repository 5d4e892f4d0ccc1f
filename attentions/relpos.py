"""Relative-position tables, written once: Swin's windowed bias table,
MViTv2's decomposed tables and DAT's continuous bias table."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------- Swin
# Liu et al., ICCV 2021: one learnable bias per head for every relative offset
# (dh, dw) inside an M x M window, a table of (2M-1)^2 rows, read through a
# precomputed index.


def swin_table(window: int, heads: int, window_t: int = 1) -> nn.Parameter:
    """Learnable Swin bias table, ((2M-1)^2, heads), truncated normal with std 0.02 as in Swin; Video Swin's
    ((2Wt-1)(2M-1)^2, heads) for windows of ``window_t`` frames (the image table when it is 1)."""
    table = torch.empty((2 * window_t - 1) * (2 * window - 1) ** 2, heads)
    nn.init.trunc_normal_(table, std=0.02)
    return nn.Parameter(table)


def swin_index(window_hw: tuple[int, int], table_window: int, first_row: int = 0) -> torch.Tensor:
    """Row of a table built for ``table_window`` (M) for each token pair of a window.

    ``window_hw`` (wh, ww) may be smaller than M (a window shrunk to a small map);
    it then reads only the offsets it has. Entry [i, j] is
    ``(dh + M - 1) * (2M - 1) + (dw + M - 1)`` with (dh, dw) the position of
    token i minus that of token j (tokens row-major in the window).
    ``first_row`` is added to every entry (a slice of a larger table, e.g. one time offset of Video Swin's).
    Returns a (wh*ww, wh*ww) long tensor.
    """
    wh, ww = window_hw
    if wh > table_window or ww > table_window:
        raise ValueError(f"window {window_hw} is larger than the table's window {table_window}")
    # Computed on the CPU whatever the default device: arithmetic on meta tensors (a probe module is built on the
    # meta device) runs torch's Python decompositions, whose first use imports torch._dynamo (about 1.5 s).
    cpu = torch.device("cpu")
    rows, cols = torch.meshgrid(torch.arange(wh, device=cpu), torch.arange(ww, device=cpu), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()  # (T,) each
    dh = rows[:, None] - rows[None, :] + table_window - 1  # (T, T), in [0, 2M-2]
    dw = cols[:, None] - cols[None, :] + table_window - 1  # (T, T)
    return (dh * (2 * table_window - 1) + dw + first_row).to(torch.get_default_device())


def swin_index_3d(window_thw: tuple[int, int, int], table_window: tuple[int, int]) -> torch.Tensor:
    """Video Swin's ``relative_position_index`` of a (wt, wh, ww) window in a table built for windows of
    ``table_window = (Wt, M)``: entry [i, j] is ``((dt + Wt-1)(2M-1) + dh + M-1)(2M-1) + dw + M-1`` with
    (dt, dh, dw) the position of token i minus that of token j (tokens row-major (t, h, w) in the window).
    A window smaller than the table's reads only the offsets it has. Returns (wt*wh*ww, wt*wh*ww) long."""
    (wt, wh, ww), (big_t, big) = window_thw, table_window
    if wt > big_t or wh > big or ww > big:
        raise ValueError(f"window {window_thw} is larger than the table's window {(big_t, big, big)}")
    grid = torch.meshgrid(torch.arange(wt), torch.arange(wh), torch.arange(ww), indexing="ij")
    ts, hs, ws = (g.flatten() for g in grid)  # (Tw,) each
    dt = ts[:, None] - ts[None, :] + big_t - 1  # (Tw, Tw), in [0, 2Wt-2]
    dh = hs[:, None] - hs[None, :] + big - 1
    dw = ws[:, None] - ws[None, :] + big - 1
    span = 2 * big - 1
    return (dt * span + dh) * span + dw


def swin_bias(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather the per-head bias of every token pair: (rows, heads) x (T, T) -> (heads, T, T), contiguous.

    Gathered from the transposed table, so the result is laid out heads first: a (T, T, heads) gather
    permuted to (heads, T, T) would make every sum with a mask heads-last in memory, and SDPA copy it."""
    return table.t()[:, index]


class AxisOffsets(NamedTuple):
    rows: torch.Tensor  # (H, H)
    cols: torch.Tensor  # (W, W)


def map_offsets(hw: tuple[int, int], table_window: int, device: torch.device | str | None = None) -> AxisOffsets:
    """Per-axis offsets of an H x W map into a table built for ``table_window`` (M), made on ``device``.

    ``rows[i, j] = i - j + M - 1`` over the H rows and ``cols`` likewise over the
    W columns: (H, H) and (W, W) longs, O(H^2 + W^2) memory where
    :func:`swin_index` of the whole map would take (HW)^2.
    """
    h, w = hw
    if h > table_window or w > table_window:
        raise ValueError(f"map {hw} is larger than the table's window {table_window}")
    ar_h = torch.arange(h, device=device)
    ar_w = torch.arange(w, device=device)
    return AxisOffsets(
        ar_h[:, None] - ar_h[None, :] + table_window - 1, ar_w[:, None] - ar_w[None, :] + table_window - 1
    )


def map_bias(table: torch.Tensor, offsets: AxisOffsets) -> torch.Tensor:
    """The (heads, N, N) bias of an H x W map from a ((2M-1)^2, heads) Swin table, equal to
    ``swin_bias(table, swin_index(hw, M))`` without its (N, N) index.

    The table is read as a (2M-1) x (2M-1) grid per head. Along a row offset the
    bias over (query column, key column) is a W x W Toeplitz slab; the slabs of
    all row offsets are gathered first (small), then one per (query row, key row).
    """
    h, w = offsets.rows.shape[0], offsets.cols.shape[0]
    span = math.isqrt(table.shape[0])
    grid = table.t().reshape(-1, span, span)  # (heads, 2M-1, 2M-1): [head, row offset, column offset]
    slabs = grid[:, :, offsets.cols]  # (heads, 2M-1, W, W): [head, row offset, query col, key col]
    bias = slabs[:, offsets.rows]  # (heads, H, H, W, W): [head, query row, key row, query col, key col]
    return bias.permute(0, 1, 3, 2, 4).reshape(-1, h * w, h * w)  # (heads, N, N), tokens row-major


# ---------------------------------------------------------------------------- MViTv2
# Li et al., CVPR 2022: decomposed relative position, bias[q, k] = q . R_h[h_q - h_k]
# + q . R_w[w_q - w_k], one table per axis of head_dim columns, resized to the
# length the current resolution needs by 1-D linear interpolation.


def mvit_table(length: int, head_dim: int) -> nn.Parameter:
    """One axis of MViTv2's decomposed table, (length, head_dim), truncated normal with std 0.02."""
    table = torch.empty(length, head_dim)
    nn.init.trunc_normal_(table, std=0.02)
    return nn.Parameter(table)


def resize_table(table: torch.Tensor, length: int) -> torch.Tensor:
    """(L, d) -> (length, d) by 1-D linear interpolation (align_corners=False, as MViTv2); as is when L == length."""
    if table.shape[0] == length:
        return table
    resized = F.interpolate(table.t()[None], size=length, mode="linear")  # (1, d, length)
    return resized[0].t()


def mvit_index(q_size: int, k_size: int) -> torch.Tensor:
    """(q_size, k_size) long: table row of each (query, key) pair along one axis.

    When queries and keys have different strides, the coordinates of the shorter
    axis are stretched to the longer one (MViTv2): q * max(k/q, 1) - k * max(q/k, 1),
    shifted by (k_size - 1) * max(q/k, 1) to be non-negative and truncated to an
    integer row, in [0, 2 * max(q_size, k_size) - 2].
    """
    q_ratio = max(k_size / q_size, 1.0)
    k_ratio = max(q_size / k_size, 1.0)
    dist = torch.arange(q_size)[:, None] * q_ratio - torch.arange(k_size)[None, :] * k_ratio  # (q, k)
    dist = dist + (k_size - 1) * k_ratio
    return dist.long()


def mvit_terms(
    q: torch.Tensor, q_hw: tuple[int, int], k_hw: tuple[int, int], table_h: torch.Tensor, table_w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """MViTv2's two decomposed terms: ``q . R_h`` (B, h, qh, qw, kh) and ``q . R_w`` (B, h, qh, qw, kw).

    q: (B, h, qh*qw, d) pooled queries (unscaled); tables (L, d), each resized to
    2 * max(q, k) - 1 rows of its axis. The bias of (query (i, j), key (y, x)) is
    ``rel_h[.., i, j, y] + rel_w[.., i, j, x]``.
    """
    (qh, qw), (kh, kw) = q_hw, k_hw
    b, heads, _, d = q.shape
    rh = resize_table(table_h, 2 * max(qh, kh) - 1)[mvit_index(qh, kh).to(q.device)]  # (qh, kh, d)
    rw = resize_table(table_w, 2 * max(qw, kw) - 1)[mvit_index(qw, kw).to(q.device)]  # (qw, kw, d)
    qm = q.reshape(b, heads, qh, qw, d)  # (B, h, qh, qw, d)
    bias_h = torch.einsum("bnyxd,ykd->bnyxk", qm, rh.to(q.dtype))  # (B, h, qh, qw, kh)
    bias_w = torch.einsum("bnyxd,xkd->bnyxk", qm, rw.to(q.dtype))  # (B, h, qh, qw, kw)
    return bias_h, bias_w


def mvit_bias(
    q: torch.Tensor, q_hw: tuple[int, int], k_hw: tuple[int, int], table_h: torch.Tensor, table_w: torch.Tensor
) -> torch.Tensor:
    """Decomposed relative position bias of MViTv2.

    q: (B, h, qh*qw, d) pooled queries (unscaled); tables (L, d). Each table is
    resized to 2 * max(q, k) - 1 rows of its axis. Returns (B, h, qh*qw, kh*kw).
    """
    (qh, qw), (kh, kw) = q_hw, k_hw
    bias_h, bias_w = mvit_terms(q, q_hw, k_hw, table_h, table_w)
    bias = bias_h[..., :, None] + bias_w[..., None, :]  # (B, h, qh, qw, kh, kw)
    return bias.reshape(q.shape[0], q.shape[1], qh * qw, kh * kw)


class _DecomposedAttention(torch.autograd.Function):
    """softmax(q k^T * scale + rel_h (+) rel_w) v with the two decomposed terms added in place to the
    scores, never summed into a bias tensor of their own; the backward written out (the softmax's
    gradient once, each term's gradient one reduction of it). Fewer passes over the (Nq, Nk)
    scores than autograd through the explicit path: no bias tensor, no scaling of the scores."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rel_h: torch.Tensor,
        rel_w: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        # q (B, h, Nq, d), k (B, h, Nk, d), v (B, h, Nk, dv), rel_h (B, h, Nq, kh), rel_w (B, h, Nq, kw)
        kh, kw = rel_h.shape[-1], rel_w.shape[-1]
        qs = q * scale
        scores = qs @ k.transpose(-2, -1)  # (B, h, Nq, Nk)
        grid = scores.view(*scores.shape[:-1], kh, kw)
        grid.add_(rel_h[..., :, None]).add_(rel_w[..., None, :])
        probs = torch.softmax(scores, dim=-1)
        ctx.save_for_backward(qs, k, v, probs)
        ctx.scale, ctx.kh, ctx.kw = scale, kh, kw  # type: ignore[attr-defined]
        return probs @ v

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple:  # type: ignore[override]
        qs, k, v, probs = ctx.saved_tensors  # type: ignore[attr-defined]
        scale, kh, kw = ctx.scale, ctx.kh, ctx.kw  # type: ignore[attr-defined]
        grad_v = probs.transpose(-2, -1) @ grad
        grad_probs = grad @ v.transpose(-2, -1)  # (B, h, Nq, Nk)
        grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
        grid = grad_scores.view(*grad_scores.shape[:-1], kh, kw)
        grad_h, grad_w = grid.sum(-1), grid.sum(-2)
        grad_q = (grad_scores @ k) * scale
        grad_k = grad_scores.transpose(-2, -1) @ qs
        return grad_q, grad_k, grad_v, grad_h, grad_w, None


def mvit_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_hw: tuple[int, int],
    k_hw: tuple[int, int],
    table_h: torch.Tensor,
    table_w: torch.Tensor,
) -> torch.Tensor:
    """``attend(q, k, v, mvit_bias(q, q_hw, k_hw, table_h, table_w))`` without the (Nq, Nk) bias: the
    fast path of pooling attention's backward on the CPU, where SDPA cannot take a bias that needs a
    gradient. float32 and float64 only (the reference's softmax precision); (B, h, Nq, dv)."""
    b, heads, nq, d = q.shape
    rel_h, rel_w = mvit_terms(q, q_hw, k_hw, table_h, table_w)
    rel_h, rel_w = rel_h.reshape(b, heads, nq, k_hw[0]), rel_w.reshape(b, heads, nq, k_hw[1])
    out: torch.Tensor = _DecomposedAttention.apply(q, k, v, rel_h, rel_w, d**-0.5)
    return out


def mvit_bias_3d(
    q: torch.Tensor,
    q_thw: tuple[int, int, int],
    k_thw: tuple[int, int, int],
    table_h: torch.Tensor,
    table_w: torch.Tensor,
    table_t: torch.Tensor | None = None,
) -> torch.Tensor:
    """MViTv2's video bias ``q . R_t[t_q - t_k] + q . R_h[h_q - h_k] + q . R_w[w_q - w_k]`` (SlowFast).

    q: (B, h, qt*qh*qw, d) pooled queries (unscaled); tables (L, d), each resized to
    ``2 * max(q, k) - 1`` rows of its axis; ``table_t`` None: no temporal term (every
    frame pair shares the spatial bias). Returns (B, h, qt*qh*qw, kt*kh*kw). With one
    frame and no temporal table it computes exactly what :func:`mvit_bias` does.
    """
    (qt, qh, qw), (kt, kh, kw) = q_thw, k_thw
    b, heads, _, d = q.shape
    rh = resize_table(table_h, 2 * max(qh, kh) - 1)[mvit_index(qh, kh).to(q.device)]  # (qh, kh, d)
    rw = resize_table(table_w, 2 * max(qw, kw) - 1)[mvit_index(qw, kw).to(q.device)]  # (qw, kw, d)
    qm = q.reshape(b, heads * qt, qh, qw, d)  # frames joined to the heads: (B, h*qt, qh, qw, d)
    bias_h = torch.einsum("bnyxd,ykd->bnyxk", qm, rh.to(q.dtype))  # (B, h*qt, qh, qw, kh)
    bias_w = torch.einsum("bnyxd,xkd->bnyxk", qm, rw.to(q.dtype))  # (B, h*qt, qh, qw, kw)
    bias_h = bias_h.reshape(b, heads, qt, qh, qw, 1, kh, 1)
    bias_w = bias_w.reshape(b, heads, qt, qh, qw, 1, 1, kw)
    bias = bias_h + bias_w  # (B, h, qt, qh, qw, 1, kh, kw)
    if table_t is not None:
        rt = resize_table(table_t, 2 * max(qt, kt) - 1)[mvit_index(qt, kt).to(q.device)]  # (qt, kt, d)
        qf = q.reshape(b, heads, qt, qh * qw, d)  # (B, h, qt, qh*qw, d)
        bias_t = torch.einsum("bntpd,tkd->bntpk", qf, rt.to(q.dtype))  # (B, h, qt, qh*qw, kt)
        bias = bias + bias_t.reshape(b, heads, qt, qh, qw, kt, 1, 1)  # (B, h, qt, qh, qw, kt, kh, kw)
    else:
        bias = bias.expand(b, heads, qt, qh, qw, kt, kh, kw)
    return bias.reshape(b, heads, qt * qh * qw, kt * kh * kw)


# ---------------------------------------------------------------------------- DAT
# Xia et al., CVPR 2022: a learnable (heads, 2Ht-1, 2Wt-1) table read by bilinear
# interpolation at the continuous displacement between each query and each
# sampled key, so it works for keys anywhere and at any resolution.


class DeformableBiasTable(nn.Module):
    """DAT's deformable relative position bias.

    Positions are (x, y) in grid_sample's align_corners=True frame of the query
    map ([-1, 1] from the first to the last pixel centre). A displacement
    ``query - sample`` spans [-2, 2]; halved, it spans the table, whose centre
    entry (Ht-1, Wt-1) is zero displacement. On a map of exactly Ht x Wt a whole
    pixel of displacement moves one entry where a pixel is 2/(H-1) (deformable's
    ``datpp`` and ``centres`` geometries; ``cvpr2022``'s query grid steps by 2/H, as
    that release does); other sizes stretch the table.
    Lookups beyond the table read zero. Computed in float32.
    """

    def __init__(self, heads: int, table_hw: tuple[int, int]):
        super().__init__()
        self.heads = heads
        self.table = nn.Parameter(torch.empty(heads, 2 * table_hw[0] - 1, 2 * table_hw[1] - 1))
        nn.init.trunc_normal_(self.table, std=0.01)

    def forward(
        self, query_pos: torch.Tensor, sample_pos: torch.Tensor, groups: int = 1, fast: bool = False
    ) -> torch.Tensor:
        """query_pos (Nq, 2), sample_pos (B*g, Ns, 2) -> bias (B, heads, Nq, Ns) in float32.

        Group i's samples serve heads [i*h/g, (i+1)*h/g). ``fast``: the displacements are made as
        one complex subtraction (x + iy), whose innermost axis is the samples', instead of a broadcast
        over a trailing axis of 2 (2.2x faster on the CPU); the same values, bit for bit.
        """
        bg, ns, _ = sample_pos.shape
        batch, hg = bg // groups, self.heads // groups
        wide = torch.promote_types(sample_pos.dtype, torch.float32)  # float32, or float64 for float64 inputs
        if fast:
            qc = torch.view_as_complex((query_pos.to(wide) * 0.5).contiguous())  # (Nq,)
            sc = torch.view_as_complex((sample_pos.to(wide) * 0.5).contiguous())  # (B*g, Ns)
            disp = torch.view_as_real(qc[None, :, None] - sc[:, None, :])  # (B*g, Nq, Ns, 2)
        else:
            disp = (query_pos[None, :, None, :].to(wide) - sample_pos[:, None, :, :].to(wide)) * 0.5
        table = self.table.to(wide).reshape(1, groups, hg, *self.table.shape[1:])  # (1, g, h/g, 2Ht-1, 2Wt-1)
        table = table.expand(batch, -1, -1, -1, -1).reshape(bg, hg, *self.table.shape[1:])  # (B*g, h/g, ., .)
        # (B*g, h/g, Nq, Ns)
        bias = F.grid_sample(table, disp, mode="bilinear", padding_mode="zeros", align_corners=True)
        return bias.reshape(batch, self.heads, query_pos.shape[0], ns)

    def macs(self, batch: int, nq: int, ns: int) -> int:
        """grid_sample: 4 multiply-adds per output element."""
        return 4 * batch * self.heads * nq * ns
