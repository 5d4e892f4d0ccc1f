"""Multiply-add accounting that is never silently wrong.

``count(module, args)`` counts one forward call three ways and says what it could
not count:

- ``macs``: fvcore's ``FlopCountAnalysis`` (a jit trace) with the handles of this
  file added for every op fvcore does not count (SDPA, grid_sample, pooling,
  interpolation, baddbmm, our own custom ops);
- ``analytic_macs``: the mechanism's own ``macs(batch, hw, context_hw)``;
- ``flop_counter_macs``: ``torch.utils.flop_counter.FlopCounterMode`` (a dispatch
  mode, so it sees the kernels after decomposition), with formulas of this file
  for the kernels torch's registry lacks.

Units: everything stored is a multiply-add count (``macs``); FLOPs are ``2 * macs``
wherever they are shown (fvcore itself counts multiply-adds, FlopCounterMode
counts FLOPs; both are converted to MACs here).

Coverage: every op a counter sees is either counted by a rule, zero on purpose
(``ZERO_OPS``: elementwise, softmax, reductions, top-k, gathers and data
movement, see attentions/README.md) or *uncovered*. Uncovered ops are reported by
name and number of calls and make a count incomplete; it is never shown as
complete.

Backward rule: the backward pass of every counted op costs twice its forward
MACs (one product for the input gradient, one for the weight gradient; norms,
pooling, interpolation and grid_sample follow the same convention). It is
measured separately by FlopCounterMode where that covers the ops; fused SDPA
kernels recompute the scores and so measure 2.5x their forward MACs.

Custom ops written later are counted by ``register_op(op, rule)``: the same rule
serves fvcore and, registered globally, every ``FlopCounterMode``.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from attnbench.attentions import kernels
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

__all__ = [
    "ZERO_OPS",
    "FlopCount",
    "Shape",
    "count",
    "flex_attention_macs",
    "op_base_name",
    "register_op",
]


class Shape(tuple):
    """The shape of a tensor argument, as a rule sees it (a tuple of ints)."""

    @property
    def numel(self) -> int:
        return math.prod(self)


# A rule: (args, outputs, kwargs) -> multiply-adds. Tensor arguments and outputs
# arrive as ``Shape``; other arguments as Python values (None when unknown).
Rule = Callable[[list, list, dict], int]


# ---------------------------------------------------------------------- zero on purpose
# Ops that cost zero MACs by design (attentions/README.md, "Counting
# multiply-adds"): elementwise arithmetic and activations, softmax, reductions,
# comparisons, top-k, sorting, gathers/scatters, creation, data movement and
# tracer bookkeeping, plus the backward kernels of the elementwise ones. Names
# are base names: no namespace, no overload, no trailing "_" of in-place ops.
ZERO_OPS: frozenset[str] = frozenset(
    """
    abs add addcdiv addcmul atan2 ceil clamp clamp_max clamp_min cos div erf exp expm1 fill floor floor_divide
    fmod lerp log log1p log2 maximum minimum mul neg pow reciprocal remainder round rsqrt sign sin sqrt square
    sub true_divide trunc where masked_fill masked_scatter rsub zero relu relu6 gelu silu elu sigmoid tanh
    hardtanh hardswish hardsigmoid leaky_relu mish softplus glu softmax _softmax log_softmax _log_softmax
    _safe_softmax sum mean amax amin max min argmax argmin cumsum cumprod prod var std var_mean std_mean
    logsumexp linalg_vector_norm norm frobenius_norm any all eq ne lt le gt ge logical_and logical_or
    logical_not logical_xor bitwise_and bitwise_or bitwise_not bitwise_xor __and__ __or__ __xor__ isnan isinf
    isfinite topk sort argsort kthvalue gather scatter scatter_add scatter_reduce index index_select
    _unsafe_index index_put _index_put_impl index_add index_copy index_fill masked_select take_along_dim
    embedding one_hot nonzero _unsafe_index_put view _unsafe_view reshape view_as reshape_as permute transpose t
    contiguous clone copy _to_copy to type_as expand expand_as repeat repeat_interleave flatten unflatten
    squeeze unsqueeze select slice narrow cat stack split split_with_sizes chunk unbind roll flip pad
    constant_pad_nd reflection_pad1d reflection_pad2d replication_pad1d replication_pad2d tril triu diagonal
    diag_embed as_strided movedim im2col col2im unfold _reshape_alias alias lift_fresh detach resolve_conj
    resolve_neg view_as_real view_as_complex slice_scatter select_scatter as_strided_scatter upsample_nearest1d
    upsample_nearest2d upsample_nearest3d _upsample_nearest_exact2d zeros ones full empty empty_like
    empty_strided zeros_like ones_like full_like new_zeros new_ones new_full new_empty arange linspace meshgrid
    eye scalar_tensor randn rand randint randn_like rand_like bernoulli normal uniform tensor dropout
    native_dropout feature_dropout alpha_dropout size numel dim stride Int Float Bool ScalarImplicit item
    _local_scalar_dense sym_size sym_numel sym_stride is_contiguous threshold_backward gelu_backward
    silu_backward sigmoid_backward tanh_backward elu_backward hardtanh_backward leaky_relu_backward
    native_dropout_backward _softmax_backward_data _log_softmax_backward_data embedding_dense_backward
    mish_backward hardswish_backward slice_backward select_backward new_empty_strided index_select_backward
    unfold_backward diagonal_backward as_strided_backward expand_backward roll_backward
    """.split()  # noqa: SIM905  (one name per word reads better than 250 quoted strings)
)


def op_base_name(op: Any) -> str:
    """``aten::add_`` / ``torch.ops.aten.add.Tensor`` / ``aten.add`` -> ``add``; custom ops keep their namespace."""
    if isinstance(op, torch._ops.OpOverload):
        op = op.overloadpacket
    name = op if isinstance(op, str) else getattr(op, "_qualified_op_name", None) or str(op)
    name = name.replace(".", "::", 1) if "::" not in name and "." in name else name
    namespace, _, rest = name.rpartition("::")
    rest = rest.split(".")[0]  # drop an overload (add.Tensor)
    if rest.endswith("_") and not rest.endswith("__"):
        rest = rest[:-1]  # in-place variant
    if namespace in ("aten", "prim", ""):
        return rest
    return f"{namespace}::{rest}"


# ---------------------------------------------------------------------- the rule book
def _numel(shape: Any) -> int:
    return math.prod(shape) if shape is not None else 0


def _norm_rule(weight_index: int) -> Rule:
    """LayerNorm/GroupNorm/BatchNorm: 5 MACs per element with an affine transform, 4 without."""

    def rule(args: list, outs: list, kwargs: dict) -> int:
        weight = args[weight_index] if len(args) > weight_index else kwargs.get("weight")
        return _numel(args[0]) * (5 if isinstance(weight, Shape) else 4)

    return rule


def _per_output(scale: int) -> Rule:
    def rule(args: list, outs: list, kwargs: dict) -> int:
        return scale * _numel(outs[0])

    return rule


def _per_input(scale: int) -> Rule:
    def rule(args: list, outs: list, kwargs: dict) -> int:
        return scale * _numel(args[0])

    return rule


def _pool_rule(args: list, outs: list, kwargs: dict) -> int:
    """avg/max pooling with kernel k: k*k per output element (k from the kernel_size argument)."""
    kernel = args[1] if len(args) > 1 else kwargs.get("kernel_size")
    if isinstance(kernel, int):
        kernel = [kernel, kernel]
    if not kernel or any(not isinstance(k, int) for k in kernel):
        raise ValueError(f"pooling without a readable kernel_size ({kernel!r}); cannot count it")
    if len(kernel) == 1:
        kernel = [kernel[0]] * (len(outs[0]) - 2)
    return math.prod(kernel) * _numel(outs[0])


_GRID_SAMPLE_MACS = {0: 4, 1: 0, 2: 16}  # bilinear, nearest, bicubic (interpolation_mode of aten::grid_sampler)


def _grid_sample_rule(args: list, outs: list, kwargs: dict) -> int:
    mode = args[2] if len(args) > 2 else kwargs.get("interpolation_mode", 0)
    if mode not in _GRID_SAMPLE_MACS:
        raise ValueError(f"grid_sample with interpolation_mode={mode!r} has no counting rule")
    return _GRID_SAMPLE_MACS[mode] * _numel(outs[0])


def _batched_matmul(a: Shape, b: Shape) -> int:
    return _numel(a) * b[-1]


def _baddbmm_rule(args: list, outs: list, kwargs: dict) -> int:
    return _batched_matmul(args[1], args[2])


def _einsum_rule(args: list, outs: list, kwargs: dict) -> int:
    """Exact MACs of an einsum, contracting the operands left to right (fvcore's numpy estimate is off by a few).

    Contracting two operands costs the product of the sizes of every letter either one carries.
    """
    equation, shapes = str(args[0]).replace(" ", ""), list(args[1])
    if "..." in equation or "->" not in equation:
        raise ValueError(f"einsum {equation!r}: write the output and no ellipsis to have it counted")
    inputs, output = equation.split("->")
    terms = inputs.split(",")
    size: dict[str, int] = {}
    for term, shape in zip(terms, shapes, strict=True):
        for letter, n in zip(term, shape, strict=True):
            size[letter] = max(size.get(letter, 1), int(n))
    if len(terms) == 1:
        return 0  # a transpose, trace or sum: no products
    macs, current = 0, terms[0]
    for i, term in enumerate(terms[1:], start=1):
        union = set(current) | set(term)
        macs += math.prod(size[c] for c in union)
        needed = set(output).union(*terms[i + 1 :])
        current = "".join(c for c in sorted(union) if c in needed)
    return macs


def _attention_pairs(nq: int, nk: int, causal: bool) -> int:
    """Query-key pairs a kernel computes: all of them, or the lower triangle (top-left aligned) when causal."""
    if not causal:
        return nq * nk
    return sum(min(i + 1, nk) for i in range(nq))


def _sdpa_macs(q: Shape, k: Shape, v: Shape, causal: bool) -> int:
    """scores q k^T and the weighted sum of v: pairs * (d_qk + d_v) per batch and head."""
    batch = math.prod(torch.broadcast_shapes(tuple(q[:-2]), tuple(k[:-2])))
    return batch * _attention_pairs(q[-2], k[-2], causal) * (q[-1] + v[-1])


def _sdpa_rule(causal_index: int) -> Rule:
    def rule(args: list, outs: list, kwargs: dict) -> int:
        causal = args[causal_index] if len(args) > causal_index else kwargs.get("is_causal", False)
        return _sdpa_macs(args[0], args[1], args[2], bool(causal))

    return rule


def _sdpa_backward_rule(args: list, outs: list, kwargs: dict) -> int:
    """CPU flash SDPA backward: recomputes the scores and takes four products (2.5x the forward)."""
    grad_out, q, k, v = args[:4]
    causal = args[7] if len(args) > 7 else kwargs.get("is_causal", False)
    batch = math.prod(torch.broadcast_shapes(tuple(q[:-2]), tuple(k[:-2])))
    pairs = _attention_pairs(q[-2], k[-2], bool(causal))
    return batch * pairs * (q[-1] + v[-1] + v[-1] + q[-1] + q[-1])


def _backward_of(rule: Rule, input_index: int) -> Rule:
    """Backward rule of a non-matmul op: twice the forward MACs, computed on the forward input's shape."""

    def backward(args: list, outs: list, kwargs: dict) -> int:
        grad_out = args[0]
        fwd_args = [args[input_index], *args[input_index + 1 :]]
        return 2 * rule(fwd_args, [grad_out], kwargs)

    return backward


# fvcore side: jit op name -> rule, for the ops fvcore does not count or counts
# against the rule book (upsample_nearest is data movement; norms are 5/4 in
# every mode, where fvcore counts batch_norm in eval as 2/1). Matmuls and
# convolutions keep fvcore's own handles.
JIT_RULES: dict[str, Rule] = {
    "aten::scaled_dot_product_attention": _sdpa_rule(5),
    "aten::baddbmm": _baddbmm_rule,
    "aten::einsum": _einsum_rule,
    "aten::layer_norm": _norm_rule(2),
    "aten::group_norm": _norm_rule(2),
    "aten::batch_norm": _norm_rule(1),
    "aten::instance_norm": _norm_rule(1),
    "aten::grid_sampler": _grid_sample_rule,
    "aten::adaptive_avg_pool1d": _per_input(1),
    "aten::adaptive_avg_pool2d": _per_input(1),
    "aten::adaptive_avg_pool3d": _per_input(1),
    "aten::avg_pool1d": _pool_rule,
    "aten::avg_pool2d": _pool_rule,
    "aten::avg_pool3d": _pool_rule,
    "aten::max_pool1d": _pool_rule,
    "aten::max_pool2d": _pool_rule,
    "aten::max_pool3d": _pool_rule,
    "aten::upsample_linear1d": _per_output(2),
    "aten::upsample_bilinear2d": _per_output(4),
    "aten::upsample_bicubic2d": _per_output(4),
}

# FlopCounterMode side: kernels torch's flop registry lacks (matmuls, convs and
# the CUDA SDPA kernels are torch's own formulas).
_aten = torch.ops.aten
DISPATCH_RULES: dict[Any, Rule] = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_rule(4),
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward_rule,
    _aten.native_layer_norm: _norm_rule(2),
    _aten.native_group_norm: _norm_rule(1),
    _aten.native_batch_norm: _norm_rule(1),
    _aten._native_batch_norm_legit: _norm_rule(1),
    _aten._native_batch_norm_legit_no_training: _norm_rule(1),
    _aten.grid_sampler_2d: _grid_sample_rule,
    _aten._adaptive_avg_pool2d: _per_input(1),
    _aten.avg_pool2d: _pool_rule,
    _aten.max_pool2d_with_indices: _pool_rule,
    # 3-D (clips): the same rules over kernel volumes
    _aten._adaptive_avg_pool3d: _per_input(1),
    _aten.avg_pool3d: _pool_rule,
    _aten.max_pool3d_with_indices: _pool_rule,
    _aten.upsample_linear1d: _per_output(2),
    _aten.upsample_bilinear2d: _per_output(4),
    _aten.upsample_bicubic2d: _per_output(4),
    # backward kernels: twice the forward rule
    _aten.native_layer_norm_backward: lambda a, o, k: 2 * _norm_rule(4)(a[1:], o, k),
    _aten.native_group_norm_backward: lambda a, o, k: 2 * _norm_rule(3)(a[1:], o, k),
    _aten.native_batch_norm_backward: lambda a, o, k: 2 * _norm_rule(1)(a[1:], o, k),
    _aten.grid_sampler_2d_backward: lambda a, o, k: 2 * _GRID_SAMPLE_MACS.get(a[3], 0) * _numel(a[0]),
    _aten._adaptive_avg_pool2d_backward: lambda a, o, k: 2 * _numel(a[1]),
    _aten.avg_pool2d_backward: _backward_of(_pool_rule, 1),
    _aten.max_pool2d_with_indices_backward: _backward_of(_pool_rule, 1),
    _aten._adaptive_avg_pool3d_backward: lambda a, o, k: 2 * _numel(a[1]),
    _aten.avg_pool3d_backward: _backward_of(_pool_rule, 1),
    _aten.max_pool3d_with_indices_backward: _backward_of(_pool_rule, 1),
    _aten.upsample_linear1d_backward: lambda a, o, k: 2 * 2 * _numel(a[0]),
    _aten.upsample_bilinear2d_backward: lambda a, o, k: 2 * 4 * _numel(a[0]),
    _aten.upsample_bicubic2d_backward: lambda a, o, k: 2 * 4 * _numel(a[0]),
}


# ---------------------------------------------------------------------- custom ops
_CUSTOM: dict[str, Rule] = {}
_CUSTOM_LOCK = threading.Lock()


def register_op(op: Any, rule: Rule) -> None:
    """Count a custom op (``torch.ops.ns.name`` or ``torch.library.custom_op``) by ``rule``.

    ``rule(args, outputs, kwargs) -> MACs`` sees tensors as ``Shape`` tuples. The op is
    then counted by ``count`` (fvcore) and by every ``FlopCounterMode`` (registered
    globally, as ``2 * MACs`` FLOPs).
    """
    packet = getattr(op, "_opoverload", op)  # a torch.library.custom_op object -> its OpOverload
    if isinstance(packet, torch._ops.OpOverload):
        packet = packet.overloadpacket
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        raise TypeError(f"register_op needs a torch op (torch.ops.namespace.name or a custom_op), got {op!r}")
    qualname = packet._qualified_op_name  # "ns::name"
    with _CUSTOM_LOCK:
        if qualname in _CUSTOM:
            raise ValueError(f"{qualname} is already registered with bench.flops")
        _CUSTOM[qualname] = rule
        from torch.utils.flop_counter import register_flop_formula

        register_flop_formula(packet, get_raw=True)(_flop_counter_formula(rule))


# ---------------------------------------------------------------------- flex attention
def flex_attention_macs(q_shape: Sequence[int], v_shape: Sequence[int], block_mask: Any) -> int:
    """MACs of ``flex_attention(q, k, v, block_mask=...)``: the pairs of the blocks the kernel visits.

    Partial and full blocks both cost ``rows * cols * (d_qk + d_v)``; blocks at the
    end of a sequence are clipped to its length. ``block_mask`` is a ``BlockMask``
    (None means dense).
    """
    b, h, nq, d = (int(s) for s in q_shape)
    dv = int(v_shape[-1])
    nk = int(v_shape[-2])
    if block_mask is None:
        return b * h * nq * nk * (d + dv)
    bq, bk = block_mask.BLOCK_SIZE
    pairs = 0
    for num, idx in (
        (block_mask.kv_num_blocks, block_mask.kv_indices),
        (block_mask.full_kv_num_blocks, block_mask.full_kv_indices),
    ):
        if num is None:
            continue
        # idx: (Bm, Hm, q_blocks, kv_blocks); the first num[..., i] entries of row i are visited
        q_blocks = idx.shape[-2]
        rows = torch.clamp(nq - torch.arange(q_blocks) * bq, 0, bq)  # (q_blocks,)
        cols = torch.clamp(nk - idx.long() * bk, 0, bk)  # (Bm, Hm, q_blocks, kv_blocks)
        visited = torch.arange(idx.shape[-1]) < num.long().unsqueeze(-1)  # (Bm, Hm, q_blocks, kv_blocks)
        per_bh = (cols * visited).sum(-1) * rows  # (Bm, Hm, q_blocks)
        per_bh = per_bh.sum(-1).expand(
            b if idx.shape[0] == 1 else idx.shape[0], h if idx.shape[1] == 1 else idx.shape[1]
        )
        pairs += int(per_bh.sum())
    return pairs * (d + dv)


# ---------------------------------------------------------------------- adapters
def _jit_value(value: Any) -> Any:
    """A torch._C.Value of a traced graph -> Shape for a tensor, the Python value for a constant."""
    node = value.node()
    if node.kind() == "prim::ListConstruct":
        return [_jit_value(v) for v in node.inputs()]
    vtype = value.type()
    if isinstance(vtype, torch._C.TensorType):
        sizes = vtype.sizes() if value.isCompleteTensor() else None
        return Shape(sizes) if sizes is not None else None
    try:
        return value.toIValue()
    except RuntimeError:
        return None


def _to_rule_view(x: Any) -> Any:
    return Shape(x.shape) if isinstance(x, torch.Tensor) else x


def _flop_counter_formula(rule: Rule) -> Callable[..., int]:
    """A rule as a raw FlopCounterMode formula (FLOPs = 2 * MACs)."""

    def formula(*args: Any, out_val: Any = None, **kwargs: Any) -> int:
        outs = [o for o in tree_flatten(out_val)[0] if isinstance(o, torch.Tensor)]
        view_args = tree_map(_to_rule_view, list(args))
        view_kwargs = tree_map(_to_rule_view, kwargs)
        return 2 * int(rule(view_args, [Shape(o.shape) for o in outs], view_kwargs))

    formula._get_raw = True  # type: ignore[attr-defined]
    return formula


# ---------------------------------------------------------------------- result
@dataclasses.dataclass
class FlopCount:
    """Counts of one forward call, in multiply-adds (MACs); FLOPs = 2 * MACs.

    ``uncovered`` lists the ops (name -> calls) that fvcore saw and nothing counted;
    a count with uncovered ops is incomplete. ``zero_ops`` are the ops counted as
    zero on purpose. The ``flop_counter_*`` fields are the same for FlopCounterMode
    (None where it did not run).
    """

    macs: int
    analytic_macs: int | None
    flop_counter_macs: int | None
    uncovered: dict[str, int]
    zero_ops: dict[str, int] = dataclasses.field(default_factory=dict)
    by_op: dict[str, int] = dataclasses.field(default_factory=dict)
    calls: dict[str, int] = dataclasses.field(default_factory=dict)
    flop_counter_uncovered: dict[str, int] | None = None
    flop_counter_error: str | None = None
    backward_macs_measured: int | None = None
    backward_uncovered: dict[str, int] | None = None
    backward_error: str | None = None

    @property
    def flops(self) -> int:
        return 2 * self.macs

    @property
    def complete(self) -> bool:
        return not self.uncovered

    @property
    def backward_macs_rule(self) -> int:
        """The stated backward rule: twice the forward MACs."""
        return 2 * self.macs

    def relative_error(self) -> float | None:
        """|macs - analytic_macs| / analytic_macs (None without an analytic count)."""
        if self.analytic_macs is None:
            return None
        return abs(self.macs - self.analytic_macs) / max(self.analytic_macs, 1)

    def status(self) -> str:
        return (
            "complete" if self.complete else "INCOMPLETE: " + ", ".join(f"{k} x{v}" for k, v in self.uncovered.items())
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, with the unit in every key (``*_macs`` multiply-adds, ``*_flops`` = 2 * MACs)."""

        def flops(m: int | None) -> int | None:
            return None if m is None else 2 * m

        return {
            "units": "macs = multiply-adds; flops = 2 * macs",
            "fvcore_macs": self.macs,
            "fvcore_flops": self.flops,
            "analytic_macs": self.analytic_macs,
            "analytic_flops": flops(self.analytic_macs),
            "flop_counter_macs": self.flop_counter_macs,
            "flop_counter_flops": flops(self.flop_counter_macs),
            "complete": self.complete,
            "uncovered": dict(self.uncovered),
            "zero_ops": dict(self.zero_ops),
            "by_op_macs": dict(self.by_op),
            "flop_counter_uncovered": self.flop_counter_uncovered,
            "flop_counter_error": self.flop_counter_error,
            "relative_error_vs_analytic": self.relative_error(),
            "backward_rule": "backward_macs = 2 * forward_macs",
            "backward_macs_rule": self.backward_macs_rule,
            "backward_macs_measured": self.backward_macs_measured,
            "backward_flops_measured": flops(self.backward_macs_measured),
            "backward_uncovered": self.backward_uncovered,
            "backward_error": self.backward_error,
        }


# ---------------------------------------------------------------------- counting
class _TensorsOnly(nn.Module):
    """Wraps a module so that jit tracing sees only tensor inputs; the others are fixed."""

    def __init__(self, module: nn.Module, args: tuple):
        super().__init__()
        self.module = module
        self._template = args
        self._slots = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(self._template[i] for i in self._slots)

    def forward(self, *tensors: torch.Tensor) -> Any:
        args = list(self._template)
        for i, t in zip(self._slots, tensors, strict=True):
            args[i] = t
        return self.module(*args)


def _fvcore_handle(name: str, handle: Callable, calls: Counter) -> Callable:
    base = op_base_name(name)

    def counted(inputs: list, outputs: list) -> Counter:
        calls[base] += 1
        result = handle(inputs, outputs)
        total = sum(result.values()) if isinstance(result, Counter) else result
        return Counter({base: int(round(float(total)))})

    return counted


def _rule_handle(name: str, rule: Rule, calls: Counter) -> Callable:
    def handle(inputs: list, outputs: list) -> int:
        return int(rule([_jit_value(v) for v in inputs], [_jit_value(v) for v in outputs], {}))

    return _fvcore_handle(name, handle, calls)


def _fvcore_count(module: nn.Module, args: tuple) -> tuple[int, dict, dict, dict, dict]:
    from fvcore.nn import FlopCountAnalysis

    wrapped = _TensorsOnly(module, args)
    analysis = FlopCountAnalysis(wrapped, wrapped.tensors())
    if not hasattr(analysis, "_ignored_ops"):
        raise RuntimeError("this fvcore version hides its ignored ops differently; bench.flops cannot see coverage")
    analysis._ignored_ops = set()  # nothing is ignored silently: every op is counted, zero on purpose or uncovered
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    calls: Counter = Counter()
    # fvcore's own handles, except for ops the rule book counts as zero (upsample_nearest2d is data movement)
    analysis._op_handles = {k: h for k, h in analysis._op_handles.items() if op_base_name(k) not in ZERO_OPS}
    handles = {name: _fvcore_handle(name, h, calls) for name, h in analysis._op_handles.items()}
    handles.update({name: _rule_handle(name, rule, calls) for name, rule in JIT_RULES.items()})
    custom = {**kernels.FLOP_RULES, **_CUSTOM}  # our kernels' ops, then ops registered here
    handles.update({name: _rule_handle(name, rule, calls) for name, rule in custom.items()})
    analysis.set_op_handle(**handles)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        by_op = {k: int(v) for k, v in analysis.by_operator().items()}
        seen = analysis.unsupported_ops()
    zero: Counter = Counter()
    uncovered: Counter = Counter()
    for kind, n in seen.items():
        (zero if op_base_name(kind) in ZERO_OPS else uncovered)[kind] += n
    return sum(by_op.values()), by_op, dict(calls), dict(zero), dict(uncovered)


def _flop_counter_mode_class() -> type:
    from torch.utils.flop_counter import FlopCounterMode

    class _Counting(FlopCounterMode):
        """FlopCounterMode that also records the ops it saw but could not count."""

        def __init__(self, **kwargs: Any):
            super().__init__(**kwargs)
            self.uncovered: Counter = Counter()

        def _count_flops(self, func_packet: Any, out: Any, args: Any, kwargs: Any) -> Any:
            if func_packet not in self.flop_registry and op_base_name(func_packet) not in ZERO_OPS:
                self.uncovered[op_base_name(func_packet)] += 1
            return super()._count_flops(func_packet, out, args, kwargs)

    return _Counting


def _flop_counter_count(module: nn.Module, args: tuple, backward: bool, result: FlopCount) -> None:
    """Forward (and backward) MACs and uncovered ops, measured by FlopCounterMode, into ``result``."""
    mode_class = _flop_counter_mode_class()
    mapping = {op: _flop_counter_formula(rule) for op, rule in DISPATCH_RULES.items()}
    if backward:
        args = tuple(
            a.detach().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in args
        )
    try:
        with (
            torch.enable_grad() if backward else torch.no_grad(),
            mode_class(display=False, custom_mapping=mapping) as fwd,
        ):
            out = module(*args)
    except Exception as exc:  # noqa: BLE001  (recorded and shown, never hidden)
        result.flop_counter_error = f"{type(exc).__name__}: {exc}"
        return
    result.flop_counter_macs = fwd.get_total_flops() // 2
    result.flop_counter_uncovered = dict(fwd.uncovered)
    if not backward:
        return
    leaves = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor) and o.requires_grad]
    if not leaves:
        result.backward_error = "the output does not require grad"
        return
    try:
        loss = sum(o.float().sum() for o in leaves)
        with mode_class(display=False, custom_mapping=mapping) as bwd:
            loss.backward()  # type: ignore[union-attr]
    except Exception as exc:  # noqa: BLE001
        result.backward_error = f"{type(exc).__name__}: {exc}"
        return
    result.backward_macs_measured = bwd.get_total_flops() // 2
    result.backward_uncovered = dict(bwd.uncovered)


def _analytic(module: nn.Module, args: tuple) -> int | None:
    """The mechanism's own count where the module declares one (attentions.Attention.macs)."""
    from attnbench.attentions.base import Attention

    if isinstance(module, Attention):
        x, hw = args[0], args[1]
        context_hw = args[3] if len(args) > 3 else None
        return int(module.macs(x.shape[0], tuple(hw), None if context_hw is None else tuple(context_hw)))
    return None


def count(
    module: nn.Module,
    args: tuple,
    *,
    analytic: int | Callable[[nn.Module, tuple], int | None] | None = None,
    flop_counter: bool = True,
    backward: bool = True,
    on_stage: Callable[[str], None] | None = None,
) -> FlopCount:
    """Count one forward call of ``module(*args)`` in multiply-adds.

    ``analytic`` overrides the analytic count (an int, or a function of module
    and args); by default an attention mechanism's ``macs()`` is used.
    ``flop_counter=False`` skips FlopCounterMode; ``backward=False`` skips the
    measured backward pass. ``on_stage(name)`` is told when each counter starts
    (``fvcore``, ``FlopCounterMode``), for a caller that shows progress; nothing
    here prints.
    """
    if not isinstance(args, tuple):
        args = (args,)
    stage = on_stage or (lambda name: None)
    was_training = module.training
    module.eval()  # counts do not depend on the mode, and batch-norm statistics must not move
    try:
        stage("fvcore")
        macs, by_op, calls, zero, uncovered = _fvcore_count(module, args)
        if callable(analytic):
            analytic_macs = analytic(module, args)
        elif analytic is not None:
            analytic_macs = int(analytic)
        else:
            analytic_macs = _analytic(module, args)
        result = FlopCount(
            macs=macs,
            analytic_macs=analytic_macs,
            flop_counter_macs=None,
            uncovered=uncovered,
            zero_ops=zero,
            by_op=by_op,
            calls=calls,
        )
        if flop_counter:
            stage("FlopCounterMode" + (", forward and backward" if backward else ""))
            _flop_counter_count(module, args, backward, result)
        return result
    finally:
        module.train(was_training)
