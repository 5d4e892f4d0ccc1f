"""FlexAttention helpers shared by the ``impl="flex"`` paths (swin, pooling).

``torch.nn.attention.flex_attention`` computes ``softmax(score_mod(q k^T * scale)) v``
over the blocks a ``BlockMask`` visits. On CUDA it is compiled into one fused
kernel (this module compiles it once per process); elsewhere it runs torch's
unfused reference, which materialises every score, and in torch 2.13 it refuses
a backward pass on the CPU. So the flex paths declare the CPU unsupported (the
reason names the fix) and their CPU parity tests run torch's dense backward
directly (see tests/attentions/test_flex.py).

Never a silent fallback: Dynamo keeps one cache entry per shape and grad mode
of the compiled ``flex_attention``; past its recompile limit torch would run
the unfused path without a word. Here the compiled call runs with
``fullgraph=True`` under a limit that fits a sweep (``CONFIG.recompile_limit``),
so hitting it raises an error that says so.
``PATHS`` counts the calls of each path (``fused``, ``compiled`` by a backend
other than inductor, ``unfused``) for the benchmark's provenance.

Counting: flex attention computes every pair of every block it visits (a
partial block evaluates the mask on all of its pairs), so the analytic counts of
the flex paths count the pairs of the visited blocks, as
``bench.flops.flex_attention_macs`` does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..base import Requires
from . import recompile_limit_error

BLOCK = 128  # flex attention's default block size, in queries and in keys


@dataclasses.dataclass
class CompileConfig:
    """How flex attention is compiled: the torch.compile backend, the device types
    compiled (the others run torch's unfused reference), Dynamo's recompile limit."""

    backend: str = "inductor"
    devices: tuple[str, ...] = ("cuda",)
    recompile_limit: int = 64


CONFIG = CompileConfig()
PATHS: Counter[str] = Counter()  # calls per path since import: "fused", "compiled", "unfused"


@contextlib.contextmanager
def compile_config(**changes: Any) -> Iterator[CompileConfig]:
    """Change ``CONFIG`` for the duration (e.g. the CPU tests compile with the eager backend)."""
    unknown = set(changes) - {f.name for f in dataclasses.fields(CONFIG)}
    if unknown:
        raise TypeError(f"unknown flex compile setting(s) {sorted(unknown)}")
    saved = dataclasses.replace(CONFIG)
    for key, value in changes.items():
        setattr(CONFIG, key, value)
    try:
        yield CONFIG
    finally:
        for f in dataclasses.fields(CONFIG):
            setattr(CONFIG, f.name, getattr(saved, f.name))


def _flex_module() -> Any:
    try:
        import torch.nn.attention.flex_attention as flex
    except ImportError:
        return None
    return flex


def unsupported(device: Any) -> list[str]:
    """Why impl="flex" cannot run on ``device`` (None: wherever the module would run)."""
    flex = _flex_module()
    if flex is None:
        return [f"impl='flex' needs torch.nn.attention.flex_attention (torch >= 2.5), not torch {torch.__version__}"]
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cpu" and not cpu_backward():
        return [
            f"impl='flex' runs fused only on CUDA; on the CPU torch {torch.__version__}'s flex_attention materialises "
            "every score and has no backward pass: use impl='fast' or 'reference' on the CPU"
        ]
    if kind not in ("cpu", "cuda"):
        return [f"impl='flex' is built and tested for CUDA, not {kind}"]
    return []


# What impl="flex" needs, wherever it is offered: the module, and fused CUDA or a CPU backward (see unsupported).
REQUIRES = Requires(probe=lambda kind: unsupported(kind))


def cpu_backward() -> bool:
    """Whether this torch's flex_attention accepts CPU inputs that require grad."""
    flex = _flex_module()
    probe = torch.zeros(1, requires_grad=True)
    try:
        flex._validate_device(probe, probe, probe)
    except NotImplementedError:
        return False
    except AttributeError:  # the check moved: assume the public entry decides at call time
        return True
    return True


@functools.cache
def _compiled(backend: str) -> Callable[..., torch.Tensor]:
    """The compiled flex_attention. fullgraph=True: past the recompile limit Dynamo raises
    instead of running the function eagerly; the limit is raised (never lowered) to
    ``CONFIG.recompile_limit`` here, once, not per call (swapping Dynamo's config costs
    tens of microseconds)."""
    import torch._dynamo

    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), CONFIG.recompile_limit))
    flex = _flex_module()
    return torch.compile(flex.flex_attention, dynamic=False, fullgraph=True, backend=backend)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    score_mod: Callable | None = None,
    block_mask: Any = None,
    scale: float | None = None,
) -> torch.Tensor:
    """flex_attention, compiled into one fused kernel on CUDA. q (B, h, Nq, d), k and v (B, h, Nk, d)."""
    flex = _flex_module()
    if q.device.type not in CONFIG.devices:
        PATHS["unfused"] += 1
        return flex.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)
    try:
        out = _compiled(CONFIG.backend)(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)
    except recompile_limit_error() as exc:
        import torch._dynamo

        limit = getattr(torch._dynamo.config, "recompile_limit", None)
        raise RuntimeError(
            f"compiled flex_attention hit Dynamo's recompile limit ({limit} shapes and grad modes); "
            "torch would have run its unfused fallback, which materialises every score, so the call is refused: "
            "raise attentions.kernels.flex.CONFIG.recompile_limit or reset Dynamo (torch._dynamo.reset())"
        ) from exc
    PATHS["fused" if CONFIG.backend == "inductor" else "compiled"] += 1
    return out


def window_block_mask(windows: int, tokens: int, device: torch.device) -> Any:
    """Block mask of ``windows`` windows of ``tokens`` consecutive tokens each, every token seeing its own window."""
    flex = _flex_module()
    length = windows * tokens

    def same_window(b, h, q_idx, kv_idx):
        return q_idx // tokens == kv_idx // tokens

    return flex.create_block_mask(
        same_window, None, None, length, length, device=device, _compile=device.type == "cuda"
    )


def window_block_pairs(windows: int, tokens: int, block: int = BLOCK) -> int:
    """Query-key pairs flex attention computes for :func:`window_block_mask`, per batch and head.

    Query block i (rows [i*block, ...)) touches windows w0..w1 and so visits the
    key blocks that hold any of their keys; every pair of a visited block is
    computed, blocks at the end clipped to the sequence.
    """
    length = windows * tokens
    pairs = 0
    for start in range(0, length, block):
        stop = min(start + block, length)
        w0, w1 = start // tokens, (stop - 1) // tokens
        k0, k1 = (w0 * tokens) // block, ((w1 + 1) * tokens - 1) // block
        cols = min((k1 + 1) * block, length) - k0 * block
        pairs += (stop - start) * cols
    return pairs


def mvit_terms(
    q: torch.Tensor, q_hw: tuple[int, int], k_hw: tuple[int, int], table_h: torch.Tensor, table_w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """MViTv2's decomposed relative position terms, not summed into a (Nq, Nk) bias.

    q (B, h, qh*qw, d) unscaled pooled queries; tables (L, d). Returns
    ``q . R_h`` (B, h, Nq, kh) and ``q . R_w`` (B, h, Nq, kw); the bias of the
    pair (query i, key (y, x)) is ``rel_h[i, y] + rel_w[i, x]``, read by a score_mod.
    """
    from .. import relpos

    (qh, qw), (kh, kw) = q_hw, k_hw
    b, heads = q.shape[:2]
    rel_h, rel_w = relpos.mvit_terms(q, q_hw, k_hw, table_h, table_w)  # (B, h, qh, qw, kh), (.., kw)
    return rel_h.reshape(b, heads, qh * qw, kh), rel_w.reshape(b, heads, qh * qw, kw)
