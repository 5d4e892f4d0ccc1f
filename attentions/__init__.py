"""The eight attention mechanisms behind one interface.

>>> from attnbench import attentions
>>> attn = attentions.build("swin", dim=96, heads=3, window=7)
>>> x, hw = attn.example_inputs(batch=2, hw=(56, 56))
>>> attn(x, hw).shape
torch.Size([2, 3136, 96])
"""

import importlib

from .base import (
    HW,
    Attention,
    KnobError,
    Knobs,
    MapRule,
    Requires,
    TimeAxis,
    UnsupportedPoint,
    available,
    build,
    fit_knobs,
    fitting_values,
    get,
    map_tokens,
    not_supported_reasons,
    register,
)

# Registration order is the order of listings and reports: dense first, then by family.
MECHANISMS = ("full", "linear", "pvt", "swin", "quadtree", "deformable", "pooling", "cross")
for _name in MECHANISMS:
    importlib.import_module(f"{__name__}.{_name}")

__all__ = [
    "MECHANISMS",
    "HW",
    "Attention",
    "KnobError",
    "Knobs",
    "MapRule",
    "Requires",
    "TimeAxis",
    "UnsupportedPoint",
    "available",
    "build",
    "fit_knobs",
    "fitting_values",
    "get",
    "map_tokens",
    "not_supported_reasons",
    "register",
]
