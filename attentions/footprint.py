"""Attention footprints: for one query, the weight every pixel of the key map receives, per head.

``Attention.footprint(x, hw, query, context=None, context_hw=None)`` returns
``(heads, Hk, Wk)`` (``(heads, T, Hk, Wk)`` on a clip). Most mechanisms form their weights in ``common.attend`` on
the reference path; :func:`reference_probs` runs that path once and collects
them, and each mechanism maps its rows back onto pixels with the pieces here:

- a key made from a rectangle of pixels (a PVT cell, an adaptive-pooling bin, a
  pooling window, a QuadTree region) spreads its weight over them with separable
  row and column matrices (:func:`spread`): by the pooling's own weights where the
  pooling is an average, uniformly over the pixels it reads otherwise; on a clip a
  box of frames x rows x columns, with a third matrix over time (:func:`spread_clip`);
- a bilinear sample (DAT) spreads its weight over its four pixels by the bilinear
  weights (:func:`splat`); corners off the map read zeros and receive nothing.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch

from . import common


def check_query(query: Any, hw: tuple[int, ...]) -> tuple[int, ...]:
    """(i, j) row and column of a pixel of the query map ((t, i, j) on a clip), refused when outside it."""
    what = "(t, i, j)" if len(hw) == 3 else "(i, j)"
    try:
        q = tuple(int(v) for v in query)
    except (TypeError, ValueError):
        raise ValueError(f"query must be a pixel {what} of the query map, got {query!r}") from None
    if len(q) != len(hw) or not all(0 <= a < side for a, side in zip(q, hw, strict=True)):
        bounds = ", ".join(f"0 <= {n} < {side}" for n, side in zip(what[1:-1].split(", "), hw, strict=True))
        raise ValueError(f"query {q} lies outside the {'x'.join(map(str, hw))} query map; use {bounds}")
    return q


def flat_index(query: tuple[int, ...], hw: tuple[int, ...]) -> int:
    """Row-major token index of a pixel (i, j) or (t, i, j)."""
    index = 0
    for a, side in zip(query, hw, strict=True):
        index = index * side + a
    return index


@contextlib.contextmanager
def record_probs() -> Iterator[list[torch.Tensor]]:
    """Collect the softmax weights of every plain-path ``attend`` call made inside the block."""
    found: list[torch.Tensor] = []
    common.PROBES.append(found.append)
    try:
        yield found
    finally:
        common.PROBES.remove(found.append)


def reference_probs(module: Any, x: torch.Tensor, hw: Any, context: Any, context_hw: Any) -> torch.Tensor:
    """The one (..., Nq, Nk) weight tensor of the module's reference forward on these inputs."""
    with record_probs() as found:
        module._forward(x, hw, context, context_hw)
    if len(found) != 1:
        raise RuntimeError(f"{module.name}: expected one attention call on the reference path, saw {len(found)}")
    return found[0].float()


def spread(w: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Weights of keys on a (kh, kw) grid onto pixels: w (h, kh, kw), rows (kh, H), cols (kw, W) -> (h, H, W)."""
    return torch.einsum("hab,ay,bx->hyx", w, rows.to(w), cols.to(w))


def spread_clip(w: torch.Tensor, frames: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Weights of keys on a (kt, kh, kw) grid onto a clip's pixels: w (h, kt, kh, kw), frames (kt, T), rows
    (kh, H), cols (kw, W) -> (h, T, H, W). Over time first, then :func:`spread` on every frame, so a one-frame
    clip (frames [[1]]) gives the image's numbers exactly."""
    heads, _, kh, kw = w.shape
    w = torch.einsum("htab,tz->hzab", w, frames.to(w))  # (h, T, kh, kw)
    t = w.shape[1]
    out = spread(w.reshape(heads * t, kh, kw), rows, cols)  # (h*T, H, W)
    return out.reshape(heads, t, *out.shape[1:])  # (h, T, H, W)


def blocks(size: int, cells: int, width: int) -> torch.Tensor:
    """(cells, size): cell a is pixels [a*width, (a+1)*width), each 1/width (pixels past cells*width read by none)."""
    m = torch.zeros(cells, size, dtype=torch.float64)
    for a in range(cells):
        m[a, a * width : (a + 1) * width] = 1.0 / width
    return m


def adaptive_bins(size: int, cells: int) -> torch.Tensor:
    """(cells, size): AdaptiveAvgPool's bins [floor(a*size/cells), ceil((a+1)*size/cells)), averaged."""
    m = torch.zeros(cells, size, dtype=torch.float64)
    for a in range(cells):
        lo, hi = (a * size) // cells, math.ceil((a + 1) * size / cells)
        m[a, lo:hi] = 1.0 / (hi - lo)
    return m


def windows(size: int, cells: int, stride: int, kernel: int, padding: int, include_pad: bool) -> torch.Tensor:
    """(cells, size): the pixels a strided kernel reads for each output, 1/kernel each (include_pad,
    as AvgPool's count_include_pad) or uniform over the pixels inside the map."""
    m = torch.zeros(cells, size, dtype=torch.float64)
    for a in range(cells):
        lo, hi = max(0, a * stride - padding), min(size, a * stride - padding + kernel)
        m[a, lo:hi] = 1.0 / (kernel if include_pad else hi - lo)
    return m


def splat(w: torch.Tensor, pos: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Weights of bilinear samples onto pixels: w (h, S), pos (h, S, 2) (x, y) in grid_sample's
    align_corners=True frame -> (h, H, W). Corners off the map (zeros padding) receive nothing."""
    heads = w.shape[0]
    height, width = hw
    px = (pos[..., 0].double() + 1) / 2 * (width - 1)  # (h, S) pixel coordinates
    py = (pos[..., 1].double() + 1) / 2 * (height - 1)
    x0, y0 = px.floor(), py.floor()
    out = torch.zeros(heads, height * width, dtype=torch.float64)
    for dy in (0, 1):
        for dx in (0, 1):
            xc, yc = x0 + dx, y0 + dy
            bw = (1 - (px - xc).abs()) * (1 - (py - yc).abs())  # (h, S) bilinear weight of this corner
            inside = (xc >= 0) & (xc < width) & (yc >= 0) & (yc < height)
            idx = (yc.clamp(0, height - 1) * width + xc.clamp(0, width - 1)).long()
            out.scatter_add_(1, idx, torch.where(inside, bw * w.double(), torch.zeros_like(bw)))
    return out.view(heads, height, width).to(w.dtype)
