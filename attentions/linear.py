"""Linear attention (Katharopoulos et al., ICML 2020), as LoFTR uses it.

With the feature map ``phi(x) = elu(x) + 1`` (positive everywhere), per head

    out_i = sum_j (phi(q_i) . phi(k_j)) v_j / (sum_j phi(q_i) . phi(k_j) + eps)
          = phi(q_i) (phi(K)^T V) / (phi(q_i) . sum_j phi(k_j) + eps)

The first line is the ``reference`` (an explicit N x M kernel matrix, quadratic);
the second, by associativity, is ``fast`` and linear in the number of tokens.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from .base import HW, Attention, KnobError, Knobs, TimeAxis, map_tokens, register
from .common import Projections, widen


def feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1, the positive feature map of the linear transformer."""
    return F.elu(x) + 1


@dataclasses.dataclass(frozen=True)
class LinearKnobs(Knobs):
    # Added to the normaliser phi(q) . sum phi(k) (LoFTR: 1e-6).
    eps: float = 1e-6
    # Bias of the q and kv projections (LoFTR uses none; attnbench's other mechanisms use one).
    qkv_bias: bool = True

    def check(self) -> None:
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not 0 <= self.eps < 1:
            raise KnobError(f"linear knob 'eps' must be a number in [0, 1) (LoFTR uses 1e-6), got {self.eps!r}")


def linear_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """The quadratic definition. q: (..., N, d), k: (..., M, d), v: (..., M, dv) -> (..., N, dv)."""
    kernel = feature_map(q) @ feature_map(k).transpose(-2, -1)  # (..., N, M), phi(q_i) . phi(k_j)
    kernel = widen(kernel)
    # Normalise each row before the weighted sum, in float32 like attend's softmax: the same
    # (A v) / (A 1 + eps), but a row sum over M keys cannot overflow a half-precision type.
    weights = kernel / (kernel.sum(dim=-1, keepdim=True) + eps)  # (..., N, M)
    return weights.to(v.dtype) @ v


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """The associative form, O(N + M). Same shapes as :func:`linear_attention_reference`.

    Half-precision safe as in LoFTR: V is scaled by 1/M before the sum over the M keys and
    the factor M is restored in the normaliser, which is formed in float32.
    """
    m = k.shape[-2]
    phi_q, phi_k = feature_map(q), feature_map(k)  # (..., N, d), (..., M, d)
    kv = phi_k.transpose(-2, -1) @ (v / m)  # (..., d, dv): the mean of phi(k_j) v_j^T, never near the fp16 limit
    k_mean = phi_k.mean(dim=-2, keepdim=True)  # (..., 1, d): sum_j phi(k_j) / M
    num = phi_q @ kv  # (..., N, dv): (1/M) sum_j A_ij v_j
    den = phi_q @ k_mean.transpose(-2, -1)  # (..., N, 1): (1/M) sum_j A_ij
    # M / (phi(q) . sum_j phi(k_j) + eps), i.e. LoFTR's normaliser times M, in float32.
    z = m / (widen(den) * m + eps)
    if num.dtype not in (torch.float32, torch.float64):
        # Only a query whose features all underflow to 0 (num = 0 too) can reach the clamp.
        z = z.clamp(max=torch.finfo(num.dtype).max).to(num.dtype)
    return num * z


@register
class LinearAttention(Attention):
    name = "linear"
    summary = "linear attention, elu+1 feature map (Katharopoulos et al. 2020, LoFTR); eps=1e-6"
    Knobs = LinearKnobs
    cost_knob = None
    complexity = "O(N)"
    supports_cross = True
    clip_footprint = True
    time = TimeAxis(True, "any map: the kernel sums run over every token of every frame")

    knobs: LinearKnobs

    def __init__(self, dim: int, heads: int, knobs: LinearKnobs, impl: str | None = None):
        super().__init__(dim, heads, knobs, impl)
        self.eps = float(knobs.eps)
        self.proj = Projections(dim, heads, bias=knobs.qkv_bias)

    def _forward(self, x: torch.Tensor, hw: HW, context: torch.Tensor | None, context_hw: HW | None) -> torch.Tensor:
        q = self.proj.queries(x)  # (B, h, N, d)
        k, v = self.proj.keys_values(x if context is None else context)  # (B, h, M, d)
        fn = linear_attention_reference if self.math else linear_attention
        o = fn(q, k, v, self.eps)  # (B, h, N, d)
        return self.proj.output(o)

    def macs(self, batch: int, hw: HW, context_hw: HW | None = None) -> int:
        """Projections plus the products of the path that runs (``impl``).

        fast: phi(K)^T V (M d d), phi(Q) KV (N d d) and phi(Q) . mean phi(K) (N d) per head.
        reference: the N x M kernel matrix (N M d) and its weighted sum (N M d) per head.
        """
        n = map_tokens(hw)
        m = n if context_hw is None else map_tokens(context_hw)
        d = self.head_dim
        per_head = 2 * n * m * d if self.math else m * d * d + n * d * d + n * d
        return self.proj.macs(batch, n, m) + batch * self.heads * per_head

    # ------------------------------------------------------------------ footprint
    def _footprint(
        self, x: torch.Tensor, hw: HW, query: tuple[int, int], context: torch.Tensor | None, context_hw: HW | None
    ) -> torch.Tensor:
        """The normalised kernel weights phi(q_i) . phi(k_j) / (sum_j phi(q_i) . phi(k_j) + eps) of the query."""
        from .footprint import flat_index

        q = self.proj.queries(x)[0, :, flat_index(query, hw)]  # (h, d)
        k, _ = self.proj.keys_values(x if context is None else context)  # (1, h, M, d)
        kernel = (feature_map(k[0]).float() @ feature_map(q).float().unsqueeze(-1)).squeeze(-1)  # (h, M)
        weights = kernel / (kernel.sum(dim=-1, keepdim=True) + self.eps)
        return weights.reshape(self.heads, *(context_hw or hw))

    def keys_per_query(self, hw: HW, context_hw: HW | None = None) -> int:
        return map_tokens(context_hw or hw)
