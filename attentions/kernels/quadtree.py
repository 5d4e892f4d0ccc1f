"""Triton kernels for QuadTree's fine levels, as differentiable custom ops.

At a fine level every query is one of the 4 children of a parent query, and it
attends to the ``C = 4K`` candidate keys its parent selected (the children of
the parent's top-K keys). :func:`refine` is the drop-in replacement of
``attentions.quadtree.refine``; nothing of shape ``(B, h, N, 4K, d)`` is ever
written to memory, the kernels gather keys and values straight from the
``(B, h, M, d)`` tensors.

QuadTree-B (a softmax over the 4K candidates), ``attnbench::quadtree_refine``:

- forward: one program per block of queries gathers each query's candidate keys
  and values, computes the scores, an online softmax and the weighted sum of the
  values in one pass. It stores the output, the log-sum-exp of each query's
  scores and, when the level must select keys for the level below, the
  ``(B, h, N, 4K)`` scores (a top-K over logits picks the same keys as over
  probabilities).
- backward: recomputes the probabilities from the log-sum-exp (as flash
  attention does), accumulates the query gradient in registers and adds the key
  and value gradients into float32 buffers with atomics (candidates of
  neighbouring queries overlap).

QuadTree-A (a softmax over each key's 4 children times the key's parent score,
the kept candidates left out of the message) needs the whole row of scores
before it can weight any value, so it runs in two passes:
``attnbench::quadtree_scores`` writes the ``(B, h, N, 4K)`` scores, PyTorch forms
the weights (no head dimension, autograd as usual), ``attnbench::quadtree_aggregate``
takes the weighted sum; each has a backward of gathers and atomic scatters.

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
@triton.jit
def _refine_fwd(
    Q,  # (R, D): R = B*h*P*4 queries, the 4 children of each parent consecutive
    K,  # (B*h*M, D)
    V,  # (B*h*M, D)
    IDX,  # (R // 4, C): row of K/V of each candidate of each parent
    O,  # (R, D)
    LSE,  # (R,) float32
    S,  # (R, C) float32 scores, written when STORE_S
    R,
    C,
    D,
    scale,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    STORE_S: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    dcol = tl.arange(0, BLOCK_D)
    d_ok = dcol < D
    q = tl.load(Q + rows[:, None] * D + dcol[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q = q.to(tl.float32)
    parent = rows // 4
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cand = c0 + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cand < C)[None, :]  # (BLOCK_R, BLOCK_C)
        key = tl.load(IDX + parent[:, None] * C + cand[None, :], mask=ok, other=0).to(tl.int64)
        ptr = key[:, :, None] * D + dcol[None, None, :]  # (BLOCK_R, BLOCK_C, BLOCK_D)
        ok3 = ok[:, :, None] & d_ok[None, None, :]
        k = tl.load(K + ptr, mask=ok3, other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * k, axis=2) * scale  # (BLOCK_R, BLOCK_C)
        s = tl.where(ok, s, float("-inf"))
        if STORE_S:
            tl.store(S + rows[:, None] * C + cand[None, :], s, mask=ok)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_new = tl.where(row_ok, m_new, 0.0)  # rows past the end stay finite
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])  # (BLOCK_R, BLOCK_C), 0 where masked
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + ptr, mask=ok3, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v, axis=1)
        m_i = m_new
    l_safe = tl.where(row_ok, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(O + rows[:, None] * D + dcol[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + rows, m_i + tl.log(l_safe), mask=row_ok)


@triton.jit
def _refine_bwd(
    Q,
    K,
    V,
    IDX,
    DO,  # (R, D) gradient of the output
    LSE,  # (R,) float32
    DELTA,  # (R,) float32: rowsum(dO * O)
    DQ,  # (R, D), the dtype of Q
    DK,  # (B*h*M, D) float32, accumulated with atomics
    DV,  # (B*h*M, D) float32, accumulated with atomics
    R,
    C,
    D,
    scale,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    dcol = tl.arange(0, BLOCK_D)
    d_ok = dcol < D
    rd = rows[:, None] * D + dcol[None, :]
    rd_ok = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + rd, mask=rd_ok, other=0.0).to(tl.float32)
    do = tl.load(DO + rd, mask=rd_ok, other=0.0).to(tl.float32)
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
    parent = rows // 4
    dq = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cand = c0 + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cand < C)[None, :]
        key = tl.load(IDX + parent[:, None] * C + cand[None, :], mask=ok, other=0).to(tl.int64)
        ptr = key[:, :, None] * D + dcol[None, None, :]
        ok3 = ok[:, :, None] & d_ok[None, None, :]
        k = tl.load(K + ptr, mask=ok3, other=0.0).to(tl.float32)
        v = tl.load(V + ptr, mask=ok3, other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * k, axis=2) * scale
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)  # (BLOCK_R, BLOCK_C)
        dp = tl.sum(do[:, None, :] * v, axis=2)
        ds = p * (dp - delta[:, None])
        dq += tl.sum(ds[:, :, None] * k, axis=1)
        tl.atomic_add(DK + ptr, ds[:, :, None] * q[:, None, :] * scale, mask=ok3)
        tl.atomic_add(DV + ptr, p[:, :, None] * do[:, None, :], mask=ok3)
    tl.store(DQ + rd, (dq * scale).to(DQ.dtype.element_ty), mask=rd_ok)


@triton.jit
def _gather_dot(
    X,  # (R, D)
    T,  # (B*h*M, D)
    IDX,  # (R // 4, C)
    OUT,  # (R, C) float32: scale * X[r] . T[idx[r // 4, c]]
    R,
    C,
    D,
    scale,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    dcol = tl.arange(0, BLOCK_D)
    d_ok = dcol < D
    x = tl.load(X + rows[:, None] * D + dcol[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    x = x.to(tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cand = c0 + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cand < C)[None, :]
        key = tl.load(IDX + (rows // 4)[:, None] * C + cand[None, :], mask=ok, other=0).to(tl.int64)
        ok3 = ok[:, :, None] & d_ok[None, None, :]
        t = tl.load(T + key[:, :, None] * D + dcol[None, None, :], mask=ok3, other=0.0).to(tl.float32)
        tl.store(OUT + rows[:, None] * C + cand[None, :], tl.sum(x[:, None, :] * t, axis=2) * scale, mask=ok)


@triton.jit
def _gather_sum(
    W,  # (R, C) float32
    T,  # (B*h*M, D)
    IDX,  # (R // 4, C)
    OUT,  # (R, D): scale * sum_c W[r, c] T[idx[r // 4, c]]
    R,
    C,
    D,
    scale,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    dcol = tl.arange(0, BLOCK_D)
    d_ok = dcol < D
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cand = c0 + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cand < C)[None, :]
        w = tl.load(W + rows[:, None] * C + cand[None, :], mask=ok, other=0.0)
        key = tl.load(IDX + (rows // 4)[:, None] * C + cand[None, :], mask=ok, other=0).to(tl.int64)
        ok3 = ok[:, :, None] & d_ok[None, None, :]
        t = tl.load(T + key[:, :, None] * D + dcol[None, None, :], mask=ok3, other=0.0).to(tl.float32)
        acc += tl.sum(w[:, :, None] * t, axis=1)
    out = (acc * scale).to(OUT.dtype.element_ty)
    tl.store(OUT + rows[:, None] * D + dcol[None, :], out, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _scatter_outer(
    W,  # (R, C) float32
    X,  # (R, D)
    IDX,  # (R // 4, C)
    G,  # (B*h*M, D) float32: G[idx[r // 4, c]] += scale * W[r, c] X[r], with atomics
    R,
    C,
    D,
    scale,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    dcol = tl.arange(0, BLOCK_D)
    d_ok = dcol < D
    x = tl.load(X + rows[:, None] * D + dcol[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    x = x.to(tl.float32) * scale
    for c0 in range(0, C, BLOCK_C):
        cand = c0 + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cand < C)[None, :]
        w = tl.load(W + rows[:, None] * C + cand[None, :], mask=ok, other=0.0)
        key = tl.load(IDX + (rows // 4)[:, None] * C + cand[None, :], mask=ok, other=0).to(tl.int64)
        ok3 = ok[:, :, None] & d_ok[None, None, :]
        tl.atomic_add(G + key[:, :, None] * D + dcol[None, None, :], w[:, :, None] * x[:, None, :], mask=ok3)


# ---------------------------------------------------------------------- launch
def _blocks(c: int, d: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, BLOCK_D): the (rows x candidates x d) tile of one program.

    ~8K elements on a GPU (registers); the interpreter runs a tile as one numpy
    operation, so it takes tiles 16 times larger and launches fewer programs.
    """
    block_d = triton.next_power_of_2(d)
    tile, most_c, most_r = (1 << 17, 64, 256) if INTERPRET else (1 << 13, 16, 32)
    block_c = min(triton.next_power_of_2(c), most_c)
    block_r = max(4, min(most_r, triton.next_power_of_2(max(1, tile // (block_c * block_d)))))
    return block_r, block_c, block_d


def _flat_index(idx: torch.Tensor, m: int) -> torch.Tensor:
    """(B, h, P, C) indices into each (b, head)'s M keys -> (B*h*P, C) rows of the flattened (B*h*M, d) keys."""
    b, h, p, c = idx.shape
    offset = (torch.arange(b * h, device=idx.device) * m).view(b, h, 1, 1)
    flat = (idx + offset).reshape(b * h * p, c)
    return flat.to(torch.int32) if b * h * m < 2**31 else flat


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
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, with_scores: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """QuadTree-B fine level: each child query's softmax over its parent's 4K candidates.

    q (B, h, P, 4, d); k, v (B, h, M, d); idx (B, h, P, C) integer indices into M.
    Returns the message (B, h, P, 4, d) in q's dtype, the log-sum-exp of the
    scaled scores (B, h, P, 4) in float32 and, with ``with_scores``, the scaled
    scores (B, h, P, 4, C) in float32 (else an empty tensor). Only the message is
    differentiable.
    """
    _check(q, k, v, idx)
    b, h, p, _, d = q.shape
    c, m = idx.shape[-1], k.shape[2]
    rows = b * h * p * 4
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty(b, h, p, 4, device=q.device, dtype=torch.float32)
    scores = torch.empty((b, h, p, 4, c) if with_scores else (0,), device=q.device, dtype=torch.float32)
    if rows == 0:
        return out, lse, scores
    block_r, block_c, block_d = _blocks(c, d)
    _refine_fwd[(triton.cdiv(rows, block_r),)](
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        _flat_index(idx, m),
        out,
        lse,
        scores,
        rows,
        c,
        d,
        d**-0.5,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        BLOCK_D=block_d,
        STORE_S=with_scores,
    )
    return out, lse, scores


@quadtree_refine.register_fake
def _(q, k, v, idx, with_scores):
    b, h, p, _, _ = q.shape
    lse = q.new_empty((b, h, p, 4), dtype=torch.float32)
    scores = q.new_empty((b, h, p, 4, idx.shape[-1]) if with_scores else (0,), dtype=torch.float32)
    return q.new_empty(q.shape), lse, scores  # contiguous, like the real outputs


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
    rows = b * h * p * 4
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
    dv = torch.zeros(v.shape, device=v.device, dtype=torch.float32)
    if rows:
        delta = (grad_out.float() * out.float()).sum(-1)  # (B, h, P, 4)
        block_r, block_c, block_d = _blocks(c, d)
        _refine_bwd[(triton.cdiv(rows, block_r),)](
            q.contiguous(),
            k.contiguous(),
            v.contiguous(),
            _flat_index(idx, m),
            grad_out.contiguous(),
            lse.contiguous(),
            delta,
            dq,
            dk,
            dv,
            rows,
            c,
            d,
            d**-0.5,
            BLOCK_R=block_r,
            BLOCK_C=block_c,
            BLOCK_D=block_d,
        )
    else:
        dq.zero_()
    return dq, dk.to(k.dtype), dv.to(v.dtype)


@quadtree_refine_backward.register_fake
def _(grad_out, q, k, v, idx, out, lse):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous, like the real ones


def _setup_context(ctx, inputs, output):
    q, k, v, idx, _ = inputs
    out, lse, _ = output
    ctx.save_for_backward(q, k, v, idx, out, lse)


def _backward(ctx, grad_out, grad_lse, grad_scores):
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
def _launch(kernel, rows: int, c: int, d: int, scale: float, *tensors: torch.Tensor) -> None:
    block_r, block_c, block_d = _blocks(c, d)
    grid = (triton.cdiv(rows, block_r),)
    kernel[grid](*tensors, rows, c, d, scale, BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_D=block_d)


def _rows(t: torch.Tensor) -> int:
    return math.prod(t.shape[:4])


@torch.library.custom_op("attnbench::quadtree_scores", mutates_args=())
def quadtree_scores(q: torch.Tensor, k: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Scaled scores of each child query with its parent's candidates: (B, h, P, 4, C) float32."""
    _check(q, k, k, idx)
    d, c = q.shape[-1], idx.shape[-1]
    out = torch.empty((*q.shape[:4], c), device=q.device, dtype=torch.float32)
    if out.numel():
        _launch(_gather_dot, _rows(q), c, d, d**-0.5, q.contiguous(), k.contiguous(), _flat_index(idx, k.shape[2]), out)
    return out


@quadtree_scores.register_fake
def _(q, k, idx):
    return q.new_empty((*q.shape[:4], idx.shape[-1]), dtype=torch.float32)


@torch.library.custom_op("attnbench::quadtree_scores_backward", mutates_args=())
def quadtree_scores_backward(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    d, c = q.shape[-1], idx.shape[-1]
    dq = torch.zeros(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
    if grad.numel():
        flat, grad = _flat_index(idx, k.shape[2]), grad.float().contiguous()
        _launch(_gather_sum, _rows(q), c, d, d**-0.5, grad, k.contiguous(), flat, dq)
        _launch(_scatter_outer, _rows(q), c, d, d**-0.5, grad, q.contiguous(), flat, dk)
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
    d, c = v.shape[-1], idx.shape[-1]
    _check(v.new_empty((*w.shape[:4], d)), v, v, idx)
    out = torch.empty((*w.shape[:4], d), device=v.device, dtype=v.dtype)
    if out.numel():
        _launch(
            _gather_sum, _rows(w), c, d, 1.0, w.float().contiguous(), v.contiguous(), _flat_index(idx, v.shape[2]), out
        )
    return out


@quadtree_aggregate.register_fake
def _(w, v, idx):
    return v.new_empty((*w.shape[:4], v.shape[-1]))


@torch.library.custom_op("attnbench::quadtree_aggregate_backward", mutates_args=())
def quadtree_aggregate_backward(
    grad: torch.Tensor, w: torch.Tensor, v: torch.Tensor, idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    d, c = v.shape[-1], idx.shape[-1]
    dw = torch.zeros(w.shape, device=w.device, dtype=torch.float32)
    dv = torch.zeros(v.shape, device=v.device, dtype=torch.float32)
    if grad.numel():
        flat, grad = _flat_index(idx, v.shape[2]), grad.contiguous()
        _launch(_gather_dot, _rows(w), c, d, 1.0, grad, v.contiguous(), flat, dw)
        _launch(_scatter_outer, _rows(w), c, d, 1.0, w.float().contiguous(), grad, flat, dv)
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
    message, _, scores = quadtree_refine(q, k, v, idx, bool(keep))
    top_idx = None
    if keep:
        b, h, p, _, _ = q.shape
        pos = scores.topk(keep, dim=-1).indices  # (B, h, P, 4, keep)
        top_idx = torch.gather(idx.unsqueeze(3).expand(b, h, p, 4, idx.shape[-1]), -1, pos)
    return message, None, top_idx


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
