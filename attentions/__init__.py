"""The eight attention mechanisms behind one interface.

>>> import attentions
>>> attn = attentions.build("swin", dim=96, heads=3, window=7)
>>> x, hw = attn.example_inputs(batch=2, hw=(56, 56))
>>> attn(x, hw).shape
torch.Size([2, 3136, 96])
"""

from . import cross, deformable, full, linear, pooling, pvt, quadtree, swin  # noqa: F401  (registers them)
from .base import HW, Attention, KnobError, Knobs, UnsupportedPoint, available, build, get, register

__all__ = [
    "HW",
    "Attention",
    "KnobError",
    "Knobs",
    "UnsupportedPoint",
    "available",
    "build",
    "get",
    "register",
]
