"""The one builder of the mechanism tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from attnbench import attentions


@pytest.fixture
def build(request: pytest.FixtureRequest) -> Callable[..., attentions.Attention]:
    """``build(**knobs)``: the test module's ``MECHANISM`` (``build(name, **knobs)`` where it names none),
    seeded by ``seed`` (0), with the module's ``BUILD`` defaults (dim, heads, impl) under the arguments,
    then passed to the module's ``prepare(module)`` if it has one (tables drawn large enough to matter)."""
    mod = request.module
    defaults: dict[str, Any] = {"dim": 16, "heads": 2, **getattr(mod, "BUILD", {})}
    prepare = getattr(mod, "prepare", None)

    def make(*name: str, seed: int = 0, **kwargs: Any) -> attentions.Attention:
        (mechanism,) = name or (mod.MECHANISM,)
        torch.manual_seed(seed)
        module = attentions.build(mechanism, **{**defaults, **kwargs})
        if prepare is not None:
            with torch.no_grad():
                prepare(module)
        return module

    return make
