"""Kernels of our own, each beside the PyTorch reference it must match.

Each custom op declares its multiply-add count here with ``register_flop_rule``:
torch's FlopCounterMode counts it from then on, and ``bench.flops`` reads
``FLOP_RULES`` to count it under fvcore too (bench depends on attentions, never
the reverse).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
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


@contextlib.contextmanager
def strict_dynamo(recompile_limit: int | None = None) -> Iterator[None]:
    """Dynamo raises instead of silently running eager when a frame hits its recompile limit
    (``recompile_limit`` replaces the limit where given). Names as in torch 2.5 .. 2.13; plain
    attribute swaps (``config.patch`` costs half a millisecond, too much per call)."""
    import torch._dynamo

    cfg = torch._dynamo.config
    changes: dict[str, Any] = {}
    fail = "fail_on_recompile_limit_hit" if hasattr(cfg, "fail_on_recompile_limit_hit") else "fail_on_cache_limit_hit"
    changes[fail] = True
    if recompile_limit is not None:
        changes["recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"] = recompile_limit
    saved = {name: getattr(cfg, name) for name in changes}
    for name, value in changes.items():
        setattr(cfg, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(cfg, name, value)


def recompile_limit_error() -> type[BaseException]:
    """The exception Dynamo raises in :func:`strict_dynamo` when a frame hits its limit."""
    from torch._dynamo import exc

    for name in ("FailOnRecompileLimitHit", "FailOnCacheLimitHit"):  # renamed in torch 2.6
        if hasattr(exc, name):
            error: type[BaseException] = getattr(exc, name)
            return error
    raise ImportError(f"torch {torch.__version__} has no Dynamo recompile-limit exception")
