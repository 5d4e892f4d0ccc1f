"""Mechanisms named in ATTNBENCH_PLUGINS are registered before any test module is collected, so the
registry-driven tests parametrize over them too."""

from attnbench.bench.points import load_plugins

load_plugins()
