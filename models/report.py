"""Rows describing the zoo: native resolution, parameters and counted multiply-adds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from . import zoo


def zoo_row(name: str, tiny: bool = False) -> dict[str, Any]:
    """One model's row: params and MACs (bench.flops, batch 1, native resolution); FLOPs = 2 * MACs."""
    from attnbench.bench.flops import count

    entry = zoo.entry(name)
    model = zoo.create(name, tiny=tiny)
    res = model.config.resolution
    result = count(model, (torch.zeros(1, 3, res, res),), flop_counter=False, backward=False)
    pub = entry.published
    return {
        "model": name,
        "tiny": tiny,
        "summary": entry.summary,
        "resolution": res,
        "params": sum(p.numel() for p in model.parameters()),
        "macs": int(result.macs),
        "flops": 2 * int(result.macs),
        "uncovered": dict(result.uncovered),
        "published_params": pub.params if pub else None,
        "published_gmacs": pub.gmacs if pub else None,
        "published_source": pub.source if pub else None,
    }


def zoo_rows(
    names: list[str], tiny: bool = False, on_row: Callable[[str, int, int], None] | None = None
) -> list[dict[str, Any]]:
    """Every model's row; ``on_row(name, i, n)`` is told before model i of n is built and counted."""
    rows = []
    for i, name in enumerate(names):
        if on_row is not None:
            on_row(name, i, len(names))
        rows.append(zoo_row(name, tiny))
    return rows
