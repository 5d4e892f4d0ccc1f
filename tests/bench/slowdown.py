"""Test plugin (ATTNBENCH_PLUGINS=slowdown): one mechanism made 2x slower, for the noise check.

``ATTNBENCH_SLOWDOWN`` names the mechanism (default ``linear``). Its forward runs
twice and returns the mean of the two outputs, so forward and backward both
cost twice as much and the output is unchanged.
"""

from __future__ import annotations

import os

import attentions

NAME = os.environ.get("ATTNBENCH_SLOWDOWN", "linear")
_cls = attentions.get(NAME)
_forward = _cls.forward


def _twice(self, *args, **kwargs):
    return 0.5 * (_forward(self, *args, **kwargs) + _forward(self, *args, **kwargs))


_cls.forward = _twice
