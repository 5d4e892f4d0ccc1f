"""Kernels of our own, each beside the PyTorch reference it must match.

Each custom op declares its multiply-add count here with ``register_flop_rule``:
torch's FlopCounterMode counts it from then on, and ``bench.flops`` reads
``FLOP_RULES`` to count it under fvcore too (bench depends on attentions, never
the reverse).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

# rule(arg_shapes, out_shapes, kwargs) -> MACs; tensors are seen as shape tuples.
Rule = Callable[[list, list, dict], int]
FLOP_RULES: dict[str, Rule] = {}


def _shape_view(a: Any) -> Any:
    return tuple(a.shape) if isinstance(a, torch.Tensor) else a


def register_flop_rule(op: Any, rule: Rule) -> None:
    """Count the custom op ``op`` (a ``torch.library.custom_op``) by ``rule``, in MACs."""
    overload = getattr(op, "_opoverload", op)
    qualname = overload.overloadpacket._qualified_op_name  # "ns::name"
    if qualname in FLOP_RULES:  # module reloaded
        return
    FLOP_RULES[qualname] = rule
    from torch.utils.flop_counter import register_flop_formula

    def formula(*args: Any, out_val: Any = None, **kwargs: Any) -> int:
        return 2 * int(rule([_shape_view(a) for a in args], [], kwargs))  # FlopCounterMode counts FLOPs

    register_flop_formula(overload.overloadpacket, get_raw=True)(formula)
