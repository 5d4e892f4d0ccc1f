"""Triton kernels for QuadTree's fine levels, as differentiable custom ops.

At a fine level every query is one of the 4 children of a parent query, and it
attends to the ``C = 4K`` candidate keys its parent selected (the children of
the parent's top-K keys). :func:`refine` is the drop-in replacement of
``attentions.quadtree.refine``; nothing of shape ``(B, h, N, 4K, d)`` is ever
written to memory, the kernels gather keys and values straight from the
``(B, h, M, d)`` tensors.

Layout (every kernel): a program owns 4 parents of one (batch, head), i.e. 16
child queries, and steps through their candidates; the 16 queries against the
4 parents' candidates are one ``tl.dot`` on tensor cores (bf16/fp16 inputs,
float32 accumulation; float32 inputs as TF32 when torch's matmul precision
allows it, else exact), masked to the block diagonal, so each candidate key and
value is loaded once per parent. The head dim is a ``constexpr`` and strides
are passed in units of it, so loads vectorise by construction; q, k, v and the
indices are read where they lie (no copies, no flattened index).

QuadTree-B (a softmax over the 4K candidates), ``attnbench::quadtree_refine``:

- forward: scores, online softmax and the weighted sum of the values in one
  pass; it stores the output, the log-sum-exp of each query's scores and, when
  the level selects keys for the level below, each query's top-K keys, chosen
  in the kernel (up to ``FUSED_TOPK_MAX_C`` candidates; beyond, a scores pass
  and ``torch.topk``).
- backward: recomputes the probabilities from the log-sum-exp (as flash
  attention does), computes rowsum(dO * O) in the kernel, accumulates dQ in
  registers, and forms dK and dV of each parent's candidates with a dot that
  sums the 4 siblings (dS^T Q, P^T dO) before one float32 atomic add per
  (parent, candidate, channel): a quarter of the adds of a per-child scatter,
  none between siblings (candidates of neighbouring parents still overlap).

QuadTree-A (a softmax over each key's 4 children times the key's parent score,
the kept candidates left out of the message) needs the whole row of scores
before it can weight any value, so it runs in two passes:
``attnbench::quadtree_scores`` writes the ``(B, h, N, 4K)`` scores, PyTorch forms
the weights (no head dimension, autograd as usual), ``attnbench::quadtree_aggregate``
takes the weighted sum; their backwards are the same gather-dot, gather-sum and
sibling-summed scatter kernels.

On a GPU every launch is autotuned over ``CONFIGS`` keyed by (candidates, head
dim, candidate step, dtypes); ``attnbench kernels`` compiles every kernel and
config offline for sm_90a and sm_80 and reports registers, spills, shared
memory, tensor-core and vectorised-load instructions (docs/kernels.md).

Inputs may be float32, float16 or bfloat16; scores, softmax and accumulation are
float32. Every op has a fake (meta) implementation, so it works under
``torch.compile``, and a FLOP formula for FlopCounterMode and ``bench.flops``.
On the CPU the kernels run only under ``TRITON_INTERPRET=1`` (set before triton
is first imported), which is how the tests run them.

Multiply-adds: forward ``pairs * 2d`` (scores and weighted sum, like every
attention in attnbench). Backward: B's fused kernel ``pairs * 5d`` (scores
recomputed, dP, dQ, dK, dV), 2.5x the forward as for fused SDPA; A's ops twice
their forward.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import triton
import triton.language as tl

from . import register_flop_rule

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def unsupported(device: torch.device | str | None) -> list[str]:
    """Why the kernels cannot run on this device (empty when they can)."""
    reasons = []
    kind = torch.device(device).type if device is not None else "cpu"
    if kind == "cpu" and not INTERPRET:
        reasons.append(
            "the quadtree triton kernel needs a CUDA device, or TRITON_INTERPRET=1 set before triton is imported "
            "to run it on the CPU in the interpreter (slow, for tests)"
        )
    elif kind not in ("cpu", "cuda"):
        reasons.append(f"the quadtree triton kernel runs on CUDA (or the CPU interpreter), not on {kind}")
    return reasons


# ---------------------------------------------------------------------- kernels
# Tiling shared by every kernel. A program owns PARENTS = BLOCK_P = 4 consecutive parents of one (batch, head):
# their ROWS = 16 child queries (the smallest M of a tensor-core dot) against COLS = 4 * BLOCK_C candidate columns,
# BLOCK_C of each parent's C candidates per step. The (ROWS, COLS) scores come from one tl.dot and are masked
# to the block diagonal (a row sees only its own parent's columns): 4x the products of a per-parent product,
# but on tensor cores, and every candidate key and value is loaded once per parent, not once per child.
# Strides of q, k, v are passed in units of HEAD_DIM (a constexpr), so every row starts at a multiple of the
# head dim by construction and the loads along d vectorise without the launcher's divisibility guesses.
# The interpreter runs a program's tile as numpy operations: there 16 parents per program (64 x 16 * BLOCK_C
# tiles) launch a sixteenth of the programs; the masked products cost it little.
BLOCK_P = 16 if INTERPRET else 4


@triton.jit
def _tile(
    row_p,
    pid_p,
    P,
    C: tl.constexpr,
    c0,
    IDX,
    s_ib,
    s_ih,
    s_ip,
    b,
    h,
    BLOCK_C: tl.constexpr,
    COLS: tl.constexpr,
    SMALL: tl.constexpr,
):
    """Columns of one step: candidate positions (COLS,), their keys, validity and the (ROWS, COLS) block diagonal."""
    p0 = pid_p * (COLS // BLOCK_C)
    cols = tl.arange(0, COLS)
    col_p = p0 + cols // BLOCK_C  # (COLS,) parent of each candidate column
    cand = c0 + cols % BLOCK_C  # (COLS,) position among the parent's C candidates
    col_ok = (col_p < P) & (cand < C)
    key = tl.load(IDX + b * s_ib + h * s_ih + col_p * s_ip + cand, mask=col_ok, other=0)
    if SMALL:
        key = key.to(tl.int32)  # every offset fits in 32 bits: cheaper address arithmetic
    diag = (row_p[:, None] == col_p[None, :]) & col_ok[None, :]  # (ROWS, COLS) own parent's candidates
    return cand, col_ok, key, diag


# Triton 3.9's interpreter multiplies bf16 tiles wrongly in tl.dot: there, 16-bit tiles are widened first.
_WIDEN_DOT = tl.constexpr(INTERPRET)


@triton.jit
def _own_tile(W, o_row, row_ok, c0, diag, C: tl.constexpr, BLOCK_C: tl.constexpr):
    """W[row, c0:c0+BLOCK_C] of a contiguous (rows, C) float32 tensor, spread over the (ROWS, 4 * BLOCK_C) block
    diagonal: loaded as contiguous rows (vectorised), widened in registers."""
    cand = c0 + tl.arange(0, BLOCK_C)
    w = tl.load(W + o_row[:, None] * C + cand[None, :], mask=row_ok[:, None] & (cand < C)[None, :], other=0.0)
    ROWS: tl.constexpr = w.shape[0]
    wide = tl.reshape(tl.broadcast_to(w[:, None, :], (ROWS, ROWS // 4, BLOCK_C)), (ROWS, ROWS // 4 * BLOCK_C))
    return tl.where(diag, wide, 0.0)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """a @ b on tensor cores with float32 accumulation; float32 inputs as TF32 or exactly (PRECISION)."""
    if _WIDEN_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision=PRECISION)
    return tl.dot(a, b)


@triton.jit
def _refine_fwd(
    Q,  # (B, h, P, 4, d), strides s_q* in units of d
    K,  # (B, h, M, d), strides s_k* in units of d (V shares them)
    V,
    IDX,  # (B, h, P, C) integer keys of each parent's candidates, last stride 1
    O,  # (B, h, P, 4, d) contiguous
    LSE,  # (B, h, P, 4) float32
    TOP,  # (B, h, P, 4, KEEP) int64: keys of each query's KEEP best candidates (KEEP > 0)
    H,
    P,
    C: tl.constexpr,
    s_qb,
    s_qh,
    s_qp,
    s_qc,
    s_kb,
    s_kh,
    s_km,
    s_ib,
    s_ih,
    s_ip,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
    KEEP: tl.constexpr,
    PRECISION: tl.constexpr,
    SMALL: tl.constexpr,
    PARENTS: tl.constexpr,
):
    ROWS: tl.constexpr = 4 * PARENTS
    COLS: tl.constexpr = PARENTS * BLOCK_C
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    rows = tl.arange(0, ROWS)
    row_p = tl.program_id(0) * PARENTS + rows // 4
    row_ok = row_p < P
    dcol = tl.arange(0, BLOCK_D)
    d_ok = dcol < HEAD_DIM
    q_off = (b * s_qb + h * s_qh + row_p * s_qp + (rows % 4) * s_qc) * HEAD_DIM
    q = tl.load(Q + q_off[:, None] + dcol[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    kv = K + (b * s_kb + h * s_kh) * HEAD_DIM
    vv = V + (b * s_kb + h * s_kh) * HEAD_DIM
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cand, col_ok, key, diag = _tile(
            row_p, tl.program_id(0), P, C, c0, IDX, s_ib, s_ih, s_ip, b, h, BLOCK_C, COLS, SMALL
        )
        kd = (key * s_km * HEAD_DIM)[:, None] + dcol[None, :]  # (COLS, BLOCK_D) offsets of the candidates
        kd_ok = col_ok[:, None] & d_ok[None, :]
        k = tl.load(kv + kd, mask=kd_ok, other=0.0)
        s = _dot(q, tl.trans(k), PRECISION) * scale  # (ROWS, COLS)
        s = tl.where(diag, s, float("-inf"))
        if KEEP > 0:  # the whole row is in this one step (BLOCK_C >= C): pick the best KEEP here
            t = s
            top_off = (((b * H + h) * P + row_p) * 4 + rows % 4) * KEEP  # (ROWS,) row of TOP
            i_row = IDX + b * s_ib + h * s_ih + row_p * s_ip  # (ROWS,) the row's parent's candidates
            for j in tl.static_range(KEEP):
                first = tl.argmax(t, axis=1, tie_break_left=True)  # (ROWS,) best remaining column
                chosen = tl.load(i_row + first % BLOCK_C, mask=row_ok, other=0)  # its key, from the cached row
                tl.store(TOP + top_off + j, chosen.to(tl.int64), mask=row_ok)
                t = tl.where(tl.arange(0, COLS)[None, :] == first[:, None], float("-inf"), t)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_new = tl.where(row_ok, m_new, 0.0)  # rows past the end stay finite
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])  # (ROWS, COLS), 0 off the diagonal
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(vv + kd, mask=kd_ok, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION)
        m_i = m_new
    l_safe = tl.where(row_ok, l_i, 1.0)
    o_off = ((b * H + h) * P + row_p) * 4 + rows % 4  # (ROWS,) row of the contiguous output
    out = (acc / l_safe[:, None]).to(O.dtype.element_ty)
    tl.store(O + o_off[:, None] * HEAD_DIM + dcol[None, :], out, mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + o_off, m_i + tl.log(l_safe), mask=row_ok)


@triton.jit
def _refine_bwd(
    Q,
    K,
    V,
    IDX,
    O,  # (B, h, P, 4, d) contiguous forward output
    DO,  # (B, h, P, 4, d) contiguous gradient of the output
    LSE,  # (B, h, P, 4) float32
    DQ,  # (B, h, P, 4, d) contiguous, the dtype of Q
    DK,  # (B, h, M, d) float32 contiguous: one atomic add per (parent, candidate, channel)
    DV,
    H,
    P,
    C: tl.constexpr,
    M,
    s_qb,
    s_qh,
    s_qp,
    s_qc,
    s_kb,
    s_kh,
    s_km,
    s_ib,
    s_ih,
    s_ip,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr,
    SMALL: tl.constexpr,
    PARENTS: tl.constexpr,
):
    ROWS: tl.constexpr = 4 * PARENTS
    COLS: tl.constexpr = PARENTS * BLOCK_C
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    rows = tl.arange(0, ROWS)
    row_p = tl.program_id(0) * PARENTS + rows // 4
    row_ok = row_p < P
    dcol = tl.arange(0, BLOCK_D)
    d_ok = dcol < HEAD_DIM
    rd_ok = row_ok[:, None] & d_ok[None, :]
    q_off = (b * s_qb + h * s_qh + row_p * s_qp + (rows % 4) * s_qc) * HEAD_DIM
    q = tl.load(Q + q_off[:, None] + dcol[None, :], mask=rd_ok, other=0.0)
    o_off = ((b * H + h) * P + row_p) * 4 + rows % 4  # (ROWS,) row of the contiguous O, dO, dQ, LSE
    od = o_off[:, None] * HEAD_DIM + dcol[None, :]
    do = tl.load(DO + od, mask=rd_ok, other=0.0)
    delta = tl.sum(do.to(tl.float32) * tl.load(O + od, mask=rd_ok, other=0.0).to(tl.float32), axis=1)  # (ROWS,)
    lse = tl.load(LSE + o_off, mask=row_ok, other=0.0)
    kv = K + (b * s_kb + h * s_kh) * HEAD_DIM
    vv = V + (b * s_kb + h * s_kh) * HEAD_DIM
    g_base = bh * M * HEAD_DIM  # DK and DV are contiguous
    dq = tl.zeros([ROWS, BLOCK_D], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cand, col_ok, key, diag = _tile(
            row_p, tl.program_id(0), P, C, c0, IDX, s_ib, s_ih, s_ip, b, h, BLOCK_C, COLS, SMALL
        )
        kd = (key * s_km * HEAD_DIM)[:, None] + dcol[None, :]  # (COLS, BLOCK_D)
        kd_ok = col_ok[:, None] & d_ok[None, :]
        k = tl.load(kv + kd, mask=kd_ok, other=0.0)
        v = tl.load(vv + kd, mask=kd_ok, other=0.0)
        s = _dot(q, tl.trans(k), PRECISION) * scale  # (ROWS, COLS)
        p = tl.where(diag, tl.exp(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), PRECISION)  # (ROWS, COLS)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, PRECISION)
        # siblings summed by the dot (off-diagonal entries are 0): one add per parent's candidate and channel
        dk = _dot(tl.trans(ds.to(q.dtype)), q, PRECISION) * scale  # (COLS, BLOCK_D)
        dv = _dot(tl.trans(p.to(do.dtype)), do, PRECISION)
        gd = g_base + (key * HEAD_DIM)[:, None] + dcol[None, :]
        tl.atomic_add(DK + gd, dk, mask=kd_ok, sem="relaxed")
        tl.atomic_add(DV + gd, dv, mask=kd_ok, sem="relaxed")
    tl.store(DQ + od, (dq * scale).to(DQ.dtype.element_ty), mask=rd_ok)


@triton.jit
def _gather_dot(
    X,  # (B, h, P, 4, d), strides s_x* in units of d
    T,  # (B, h, M, d), strides s_t* in units of d
    IDX,  # (B, h, P, C)
    OUT,  # (B, h, P, 4, C) float32 contiguous: scale * X[row] . T[idx[parent, c]]
    H,
    P,
    C: tl.constexpr,
    s_xb,
    s_xh,
    s_xp,
    s_xc,
    s_tb,
    s_th,
    s_tm,
    s_ib,
    s_ih,
    s_ip,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr,
    SMALL: tl.constexpr,
    PARENTS: tl.constexpr,
):
    ROWS: tl.constexpr = 4 * PARENTS
    COLS: tl.constexpr = PARENTS * BLOCK_C
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    rows = tl.arange(0, ROWS)
    row_p = tl.program_id(0) * PARENTS + rows // 4
    row_ok = row_p < P
    dcol = tl.arange(0, BLOCK_D)
    d_ok = dcol < HEAD_DIM
    x_off = (b * s_xb + h * s_xh + row_p * s_xp + (rows % 4) * s_xc) * HEAD_DIM
    x = tl.load(X + x_off[:, None] + dcol[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    tv = T + (b * s_tb + h * s_th) * HEAD_DIM
    o_row = ((b * H + h) * P + row_p) * 4 + rows % 4  # (ROWS,)
    for c0 in range(0, C, BLOCK_C):
        cand, col_ok, key, diag = _tile(
            row_p, tl.program_id(0), P, C, c0, IDX, s_ib, s_ih, s_ip, b, h, BLOCK_C, COLS, SMALL
        )
        t = tl.load(tv + (key * s_tm * HEAD_DIM)[:, None] + dcol[None, :], mask=col_ok[:, None] & d_ok[None, :])
        s = _dot(x.to(t.dtype), tl.trans(t), PRECISION) * scale  # (ROWS, COLS)
        tl.store(OUT + o_row[:, None] * C + cand[None, :], s, mask=diag & row_ok[:, None])


@triton.jit
def _gather_sum(
    W,  # (B, h, P, 4, C) float32 contiguous
    T,  # (B, h, M, d), strides s_t* in units of d
    IDX,  # (B, h, P, C)
    OUT,  # (B, h, P, 4, d) contiguous: scale * sum_c W[row, c] T[idx[parent, c]]
    H,
    P,
    C: tl.constexpr,
    s_tb,
    s_th,
    s_tm,
    s_ib,
    s_ih,
    s_ip,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr,
    SMALL: tl.constexpr,
    PARENTS: tl.constexpr,
):
    ROWS: tl.constexpr = 4 * PARENTS
    COLS: tl.constexpr = PARENTS * BLOCK_C
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    rows = tl.arange(0, ROWS)
    row_p = tl.program_id(0) * PARENTS + rows // 4
    row_ok = row_p < P
    dcol = tl.arange(0, BLOCK_D)
    d_ok = dcol < HEAD_DIM
    tv = T + (b * s_tb + h * s_th) * HEAD_DIM
    o_row = ((b * H + h) * P + row_p) * 4 + rows % 4  # (ROWS,)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cand, col_ok, key, diag = _tile(
            row_p, tl.program_id(0), P, C, c0, IDX, s_ib, s_ih, s_ip, b, h, BLOCK_C, COLS, SMALL
        )
        w = _own_tile(W, o_row, row_ok, c0, diag, C, BLOCK_C)  # (ROWS, COLS)
        t = tl.load(tv + (key * s_tm * HEAD_DIM)[:, None] + dcol[None, :], mask=col_ok[:, None] & d_ok[None, :])
        acc += _dot(w.to(t.dtype), t, PRECISION)
    out = (acc * scale).to(OUT.dtype.element_ty)
    tl.store(OUT + o_row[:, None] * HEAD_DIM + dcol[None, :], out, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _scatter_outer(
    W,  # (B, h, P, 4, C) float32 contiguous
    X,  # (B, h, P, 4, d), strides s_x* in units of d
    IDX,  # (B, h, P, C)
    G,  # (B, h, M, d) float32 contiguous: G[idx[parent, c]] += scale * sum_children W[row, c] X[row]
    H,
    P,
    C: tl.constexpr,
    M,
    s_xb,
    s_xh,
    s_xp,
    s_xc,
    s_ib,
    s_ih,
    s_ip,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr,
    SMALL: tl.constexpr,
    PARENTS: tl.constexpr,
):
    ROWS: tl.constexpr = 4 * PARENTS
    COLS: tl.constexpr = PARENTS * BLOCK_C
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    rows = tl.arange(0, ROWS)
    row_p = tl.program_id(0) * PARENTS + rows // 4
    row_ok = row_p < P
    dcol = tl.arange(0, BLOCK_D)
    d_ok = dcol < HEAD_DIM
    x_off = (b * s_xb + h * s_xh + row_p * s_xp + (rows % 4) * s_xc) * HEAD_DIM
    x = tl.load(X + x_off[:, None] + dcol[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    o_row = ((b * H + h) * P + row_p) * 4 + rows % 4  # (ROWS,)
    g_base = bh * M * HEAD_DIM
    for c0 in range(0, C, BLOCK_C):
        cand, col_ok, key, diag = _tile(
            row_p, tl.program_id(0), P, C, c0, IDX, s_ib, s_ih, s_ip, b, h, BLOCK_C, COLS, SMALL
        )
        w = _own_tile(W, o_row, row_ok, c0, diag, C, BLOCK_C)  # (ROWS, COLS)
        g = _dot(tl.trans(w.to(x.dtype)), x, PRECISION) * scale  # (COLS, BLOCK_D) siblings summed by the dot
        gd = g_base + (key * HEAD_DIM)[:, None] + dcol[None, :]
        tl.atomic_add(G + gd, g, mask=col_ok[:, None] & d_ok[None, :], sem="relaxed")


# ---------------------------------------------------------------------- launch
# Autotuned on a GPU over these (num_warps, num_stages), keyed by (candidates, head dim, candidate step) and,
# as triton always adds, the tensors' dtypes. `attnbench kernels` compiles every one of them offline and the
# kernel-quality test requires that none spills. The interpreter runs the first.
CONFIGS = ((4, 2), (4, 3), (8, 2))
FUSED_TOPK_MAX_C = 64  # top-K in the forward kernel up to 64 candidates (one step); beyond, scores + torch.topk
_TUNED: dict[Any, Any] = {}


def _launch(kernel: Any, grid: tuple[int, int], args: tuple, zero: tuple[str, ...] = (), **constexprs: Any) -> None:
    """Launch ``kernel`` with ``constexprs``: autotuned over CONFIGS on a GPU, the first config in the interpreter."""
    if INTERPRET:
        kernel[grid](*args, **constexprs, num_warps=CONFIGS[0][0], num_stages=CONFIGS[0][1])
        return
    tuned = _TUNED.get(kernel)
    if tuned is None:
        configs = [triton.Config({}, num_warps=w, num_stages=s) for w, s in CONFIGS]
        key = ["C", "HEAD_DIM", "BLOCK_C"]
        tuned = _TUNED[kernel] = triton.autotune(configs, key=key, reset_to_zero=list(zero) or None)(kernel)
    tuned[grid](*args, **constexprs)


def block_c(c: int, keep: int = 0, most: int = 32) -> int:
    """Candidates per parent and step: all of them when the step picks the top-K, else at most ``most``."""
    full = triton.next_power_of_2(max(c, 4))
    return full if keep else min(full, most)


def bwd_block_c(c: int, dtype: torch.dtype) -> int:
    """The backward's step: 16 candidates per parent for float32 inputs (32 spill on sm_80), else 32."""
    return block_c(c, most=16 if dtype == torch.float32 else 32)


def block_d(d: int) -> int:
    """The head dim padded to a power of 2 of at least 16 (a tensor-core dot's smallest K)."""
    return max(16, triton.next_power_of_2(d))


def precision() -> str:
    """float32 dots as TF32 when torch allows it for matmuls, else exact ("ieee")."""
    return "ieee" if INTERPRET or torch.get_float32_matmul_precision() == "highest" else "tf32"


def _extent(t: torch.Tensor) -> int:
    return 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))


def _in_units(t: torch.Tensor, d: int) -> tuple[torch.Tensor, list[int]]:
    """``t`` and its strides but the last in units of ``d``; copied only where a row starts off a multiple of d."""
    if t.stride(-1) != 1 or any(s % d for n, s in zip(t.shape[:-1], t.stride()[:-1], strict=True) if n > 1):
        t = t.contiguous()
    return t, [s // d if n > 1 else 0 for n, s in zip(t.shape[:-1], t.stride()[:-1], strict=True)]


def _index(idx: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The candidate indices as they are (int32 or int64), copied only when the candidates are not contiguous."""
    if idx.stride(-1) != 1:
        idx = idx.contiguous()
    return idx, list(idx.stride()[:3])


def _common(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor) -> dict[str, Any]:
    """Launch arguments shared by the kernels: strides in units of d, grid, constexprs."""
    b, h, p, _, d = q.shape
    q, sq = _in_units(q, d)
    k, sk = _in_units(k, d)
    v, sv = _in_units(v, d)
    if sv != sk:  # the kernels read k and v at the same offsets
        k, sk = _in_units(k.contiguous(), d)
        v, sv = _in_units(v.contiguous(), d)
    idx, si = _index(idx)
    small = max(_extent(q), _extent(k), _extent(v), b * h * k.shape[2] * d, q.numel() * idx.shape[-1]) < 2**31
    return dict(
        q=q,
        k=k,
        v=v,
        idx=idx,
        sq=sq,
        sk=sk,
        si=si,
        grid=(triton.cdiv(p, BLOCK_P), b * h),
        constexprs=dict(HEAD_DIM=d, BLOCK_D=block_d(d), PRECISION=precision(), SMALL=small, PARENTS=BLOCK_P),
    )


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor) -> None:
    if q.dim() != 5 or q.shape[3] != 4:
        raise ValueError(f"quadtree_refine: q must be (B, h, P, 4, d), got {tuple(q.shape)}")
    b, h, p, _, d = q.shape
    if k.shape[:2] != (b, h) or k.shape[-1] != d or v.shape != k.shape:
        raise ValueError(f"quadtree_refine: k and v must be (B, h, M, {d}), got {tuple(k.shape)}, {tuple(v.shape)}")
    if idx.shape[:3] != (b, h, p) or idx.dim() != 4:
        raise ValueError(f"quadtree_refine: idx must be ({b}, {h}, {p}, 4K), got {tuple(idx.shape)}")
    if q.dtype != k.dtype or k.dtype != v.dtype:
        raise ValueError(f"quadtree_refine: q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"quadtree_refine: float32, float16 or bfloat16 only, got {q.dtype}")
    reasons = unsupported(q.device)
    if reasons:
        raise RuntimeError(reasons[0])


@torch.library.custom_op("attnbench::quadtree_refine", mutates_args=())
def quadtree_refine(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, keep: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """QuadTree-B fine level: each child query's softmax over its parent's 4K candidates.

    q (B, h, P, 4, d); k, v (B, h, M, d); idx (B, h, P, C) integer indices into M.
    Returns the message (B, h, P, 4, d) in q's dtype, the log-sum-exp of the
    scaled scores (B, h, P, 4) in float32 and the keys (indices into M) of each
    query's ``keep`` best candidates, (B, h, P, 4, keep) int64, best first,
    chosen inside the kernel up to FUSED_TOPK_MAX_C candidates. Only the message
    is differentiable.
    """
    _check(q, k, v, idx)
    b, h, p, _, d = q.shape
    c = idx.shape[-1]
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty(b, h, p, 4, device=q.device, dtype=torch.float32)
    top = torch.empty(b, h, p, 4, keep, device=q.device, dtype=torch.int64)
    if out.numel() == 0:
        return out, lse, top
    fused = keep if c <= FUSED_TOPK_MAX_C else 0
    a = _common(q, k, v, idx)
    args = (a["q"], a["k"], a["v"], a["idx"], out, lse, top, h, p, c, *a["sq"], *a["sk"], *a["si"], d**-0.5)
    _launch(_refine_fwd, a["grid"], args, BLOCK_C=block_c(c, fused), KEEP=fused, **a["constexprs"])
    if keep and not fused:  # many candidates: the scores once more, torch picks
        pos = quadtree_scores(q, k, idx).topk(keep, dim=-1).indices  # (B, h, P, 4, keep)
        top = torch.gather(idx.unsqueeze(3).expand(b, h, p, 4, c), -1, pos).long()
    return out, lse, top


@quadtree_refine.register_fake
def _(q, k, v, idx, keep):
    b, h, p, _, _ = q.shape
    lse = q.new_empty((b, h, p, 4), dtype=torch.float32)
    return q.new_empty(q.shape), lse, q.new_empty((b, h, p, 4, keep), dtype=torch.int64)  # contiguous, like the real


@torch.library.custom_op("attnbench::quadtree_refine_backward", mutates_args=())
def quadtree_refine_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`quadtree_refine`'s message with respect to q, k and v."""
    b, h, p, _, d = q.shape
    c, m = idx.shape[-1], k.shape[2]
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
    dv = torch.zeros(v.shape, device=v.device, dtype=torch.float32)
    if dq.numel():
        a = _common(q, k, v, idx)
        grad_out = grad_out.contiguous()  # (B, h, P, 4, d) like out; a no-op for the usual gradient
        args = (a["q"], a["k"], a["v"], a["idx"], out, grad_out, lse, dq, dk, dv, h, p, c, m)
        args += (*a["sq"], *a["sk"], *a["si"], d**-0.5)
        _launch(_refine_bwd, a["grid"], args, zero=("DK", "DV"), BLOCK_C=bwd_block_c(c, q.dtype), **a["constexprs"])
    return dq, dk.to(k.dtype), dv.to(v.dtype)


@quadtree_refine_backward.register_fake
def _(grad_out, q, k, v, idx, out, lse):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous, like the real ones


def _setup_context(ctx, inputs, output):
    q, k, v, idx, _ = inputs
    out, lse, _ = output
    ctx.save_for_backward(q, k, v, idx, out, lse)


def _backward(ctx, grad_out, grad_lse, grad_top):
    q, k, v, idx, out, lse = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None, None
    dq, dk, dv = quadtree_refine_backward(grad_out, q, k, v, idx, out, lse)
    return dq, dk, dv, None, None


quadtree_refine.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------- QuadTree-A: scores and aggregation
# A weights each candidate by a softmax over the 4 children of its parent key times that key's parent
# score, and leaves the kept candidates out of the message; both depend on the whole row of scores, so A
# runs in two passes: the (B, h, N, 4K) scores, weights in PyTorch (no head dimension), the weighted sum.
def _scores(x: torch.Tensor, t: torch.Tensor, idx: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * x[row] . t[idx[parent, c]]: x (B, h, P, 4, d), t (B, h, M, d) -> (B, h, P, 4, C) float32."""
    b, h, p, _, d = x.shape
    c = idx.shape[-1]
    out = torch.empty((b, h, p, 4, c), device=x.device, dtype=torch.float32)
    if out.numel():
        a = _common(x, t, t, idx)
        args = (a["q"], a["k"], a["idx"], out, h, p, c, *a["sq"], *a["sk"], *a["si"], scale)
        _launch(_gather_dot, a["grid"], args, BLOCK_C=block_c(c), **a["constexprs"])
    return out


def _weighted_sum(w: torch.Tensor, t: torch.Tensor, idx: torch.Tensor, scale: float, dtype) -> torch.Tensor:
    """scale * sum_c w[row, c] t[idx[parent, c]]: w (B, h, P, 4, C) -> (B, h, P, 4, d) in ``dtype``."""
    b, h, p, _, c = w.shape
    d = t.shape[-1]
    out = torch.empty((b, h, p, 4, d), device=t.device, dtype=dtype)
    if out.numel():
        a = _common(out, t, t, idx)
        w = w.float().contiguous()  # (B, h, P, 4, C) float32, as the kernel reads it
        args = (w, a["k"], a["idx"], out, h, p, c, *a["sk"], *a["si"], scale)
        _launch(_gather_sum, a["grid"], args, BLOCK_C=block_c(c), **a["constexprs"])
    return out


def _scatter(w: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, m: int, scale: float) -> torch.Tensor:
    """g[idx[parent, c]] += scale * sum_children w[row, c] x[row]: -> (B, h, M, d) float32."""
    b, h, p, _, d = x.shape
    c = idx.shape[-1]
    g = torch.zeros((b, h, m, d), device=x.device, dtype=torch.float32)
    if x.numel():
        a = _common(x, g, g, idx)
        w = w.float().contiguous()
        args = (w, a["q"], a["idx"], g, h, p, c, m, *a["sq"], *a["si"], scale)
        _launch(_scatter_outer, a["grid"], args, zero=("G",), BLOCK_C=block_c(c), **a["constexprs"])
    return g


@torch.library.custom_op("attnbench::quadtree_scores", mutates_args=())
def quadtree_scores(q: torch.Tensor, k: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Scaled scores of each child query with its parent's candidates: (B, h, P, 4, C) float32."""
    _check(q, k, k, idx)
    return _scores(q, k, idx, q.shape[-1] ** -0.5)


@quadtree_scores.register_fake
def _(q, k, idx):
    return q.new_empty((*q.shape[:4], idx.shape[-1]), dtype=torch.float32)


@torch.library.custom_op("attnbench::quadtree_scores_backward", mutates_args=())
def quadtree_scores_backward(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    scale = q.shape[-1] ** -0.5
    dq = _weighted_sum(grad, k, idx, scale, q.dtype)
    dk = _scatter(grad, q, idx, k.shape[2], scale)
    return dq, dk.to(k.dtype)


def _pair_autograd(op: Any, backward_op: Any) -> None:
    """Autograd and fake of an op of ``(a, b, idx)`` whose ``backward_op(grad, a, b, idx)`` gives ``(da, db)``."""

    def fake(grad, a, b, idx):
        return a.new_empty(a.shape), b.new_empty(b.shape)

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)  # a, b, idx

    def backward(ctx, grad):
        a, b, idx = ctx.saved_tensors
        return (*backward_op(grad, a, b, idx), None)  # no gradient for the indices

    backward_op.register_fake(fake)
    op.register_autograd(backward, setup_context=setup)


_pair_autograd(quadtree_scores, quadtree_scores_backward)


@torch.library.custom_op("attnbench::quadtree_aggregate", mutates_args=())
def quadtree_aggregate(w: torch.Tensor, v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """sum_c w[..., c] v[idx[..., c]]: w (B, h, P, 4, C) float32, v (B, h, M, d) -> (B, h, P, 4, d) in v's dtype."""
    _check(v.new_empty((*w.shape[:4], v.shape[-1])), v, v, idx)
    return _weighted_sum(w, v, idx, 1.0, v.dtype)


@quadtree_aggregate.register_fake
def _(w, v, idx):
    return v.new_empty((*w.shape[:4], v.shape[-1]))


@torch.library.custom_op("attnbench::quadtree_aggregate_backward", mutates_args=())
def quadtree_aggregate_backward(
    grad: torch.Tensor, w: torch.Tensor, v: torch.Tensor, idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    dw = _scores(grad, v, idx, 1.0)  # (B, h, P, 4, C) float32
    dv = _scatter(w, grad, idx, v.shape[2], 1.0)
    return dw.to(w.dtype), dv.to(v.dtype)


_pair_autograd(quadtree_aggregate, quadtree_aggregate_backward)


# ---------------------------------------------------------------------- counting
def forward_macs(q_shape, idx_shape) -> int:
    """Scores and weighted sum: every (query, candidate) pair costs 2d multiply-adds."""
    return math.prod(q_shape) * idx_shape[-1] * 2


def _fwd_rule(args, outs, kwargs) -> int:
    return forward_macs(args[0], args[3])


def _bwd_rule(args, outs, kwargs) -> int:
    # scores recomputed, dP = dO V^T, dQ, dK and dV: 5d per pair, 2.5x the forward
    return forward_macs(args[1], args[4]) * 5 // 2


def _pairs_d(shape, idx_shape, d: int) -> int:
    """(query, candidate) pairs times d: one product per pair and channel."""
    return math.prod(shape[:4]) * idx_shape[-1] * d


RULES = (
    (quadtree_refine, _fwd_rule),
    (quadtree_refine_backward, _bwd_rule),
    # A: scores (pairs * d) and weighted sum (pairs * d); each backward two products per forward one
    (quadtree_scores, lambda a, o, kw: _pairs_d(a[0], a[2], a[0][-1])),
    (quadtree_scores_backward, lambda a, o, kw: 2 * _pairs_d(a[1], a[3], a[1][-1])),
    (quadtree_aggregate, lambda a, o, kw: _pairs_d(a[0], a[2], a[1][-1])),
    (quadtree_aggregate_backward, lambda a, o, kw: 2 * _pairs_d(a[1], a[3], a[2][-1])),
)


def _register_counting() -> None:
    """Count the ops in FlopCounterMode, and in bench.flops through attentions.kernels.FLOP_RULES."""
    for op, rule in RULES:
        register_flop_rule(op, rule)


_register_counting()


# ---------------------------------------------------------------------- drop-in step
def refine(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    parent_score: torch.Tensor | None,
    keep: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``attentions.quadtree.refine`` on the kernels: same arguments and results.

    q (B, h, P, 4, d), k and v (B, h, M, d), idx (B, h, P, 4K), parent_score
    (B, h, P, K) for QuadTree-A, None for B. Returns the message (B, h, P, 4, d),
    the kept scores (A only; None for B, which does not use them) and, when
    ``keep`` > 0, the indices (B, h, P, 4, keep) of each query's best candidates.
    """
    if parent_score is not None:
        return _refine_a(q, k, v, idx, parent_score, keep)
    message, _, top_idx = quadtree_refine(q, k, v, idx, keep)  # top-K chosen in the kernel
    return message, None, top_idx if keep else None


def _refine_a(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, parent_score: torch.Tensor, keep: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """QuadTree-A's fine level: a softmax over each key's 4 children times the key's parent score."""
    b, h, p, _, _ = q.shape
    c = idx.shape[-1]
    kp = c // 4
    scores = quadtree_scores(q, k, idx)  # (B, h, P, 4, 4K) float32
    probs = torch.softmax(scores.view(b, h, p, 4, kp, 4), dim=-1)  # over the 4 children of each key
    probs = (probs * parent_score.float().view(b, h, p, 1, kp, 1)).view(b, h, p, 4, c)
    top_score = top_idx = None
    if keep:
        top_score, pos = probs.topk(keep, dim=-1)  # (B, h, P, 4, keep)
        top_idx = torch.gather(idx.unsqueeze(3).expand(b, h, p, 4, c), -1, pos)
        probs = probs.scatter(-1, pos, 0.0)  # the kept candidates are refined below, not messaged here
    return quadtree_aggregate(probs, v, idx), top_score, top_idx
