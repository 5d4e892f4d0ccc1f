"""Mechanisms named in ATTNBENCH_PLUGINS are registered before any test module is collected, so the
registry-driven tests parametrize over them too."""

import pytest
import torch
from attnbench.bench.points import load_plugins

load_plugins()


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread per test: the ops are small, and on a shared CPU several threads spend more time
    waiting for each other than computing (a test that sets its own count gets it back afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
