"""A mechanism registered from the tests only: attention inside t x t tiles, t must divide the map.

Load it with ``ATTNBENCH_PLUGINS=tiles`` (and ``tests/plugins`` on the path): the
registry, the harness, the presets, ``flops``, the report and the registry-driven
tests then cover it, with no other file naming it.
"""

from __future__ import annotations

import dataclasses

import torch
from attnbench.attentions import HW, Attention, KnobError, Knobs, MapRule, register
from attnbench.attentions.common import Projections, attend, attention_macs


@dataclasses.dataclass(frozen=True)
class TilesKnobs(Knobs):
    tile: int = 6  # side of the square tiles; must divide H and W

    def check(self) -> None:
        if self.tile < 1:
            raise KnobError(f"tiles knob 'tile' must be a positive integer, got {self.tile}")


if "tiles" not in __import__("attentions").available():

    @register
    class TileAttention(Attention):
        name = "tiles"
        summary = "attention inside non-overlapping t x t tiles (a test plugin)"
        Knobs = TilesKnobs
        cost_knob = "tile"
        complexity = "O(N t^2)"
        knobs: TilesKnobs

        def __init__(self, dim: int, heads: int, knobs: TilesKnobs, impl: str | None = None):
            super().__init__(dim, heads, knobs, impl)
            self.proj = Projections(dim, heads)

        def map_rules(self, hw: HW, context_hw: HW | None) -> list[MapRule]:
            return [
                MapRule(f"the tile {self.knobs.tile}", multiple=self.knobs.tile, fix="choose a tile that divides both")
            ]

        def _forward(
            self, x: torch.Tensor, hw: HW, context: torch.Tensor | None, context_hw: HW | None
        ) -> torch.Tensor:
            b, n, c = x.shape
            t, (h, w) = self.knobs.tile, hw
            tiles = x.view(b, h // t, t, w // t, t, c).permute(0, 1, 3, 2, 4, 5)  # (B, h/t, w/t, t, t, C)
            tiles = tiles.reshape(b * (h // t) * (w // t), t * t, c)  # (B*T, t*t, C)
            q = self.proj.queries(tiles)  # (B*T, heads, t*t, d)
            k, v = self.proj.keys_values(tiles)
            o = self.proj.output(attend(q, k, v, math=self.math))  # (B*T, t*t, C)
            o = o.view(b, h // t, w // t, t, t, c).permute(0, 1, 3, 2, 4, 5)  # (B, h/t, t, w/t, t, C)
            return o.reshape(b, n, c)

        def macs(self, batch: int, hw: HW, context_hw: HW | None = None) -> int:
            n, t = hw[0] * hw[1], self.knobs.tile
            tiles = n // (t * t)
            return self.proj.macs(batch, n, n) + attention_macs(batch * tiles, self.heads, t * t, t * t, self.head_dim)
