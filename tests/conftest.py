"""Mechanisms named in ATTNBENCH_PLUGINS are registered before any test module is collected, so the
registry-driven tests parametrize over them too."""

import pytest
import torch
from attnbench.bench.points import load_plugins

load_plugins()


@pytest.fixture(scope="session", autouse=True)
def _flop_cache(tmp_path_factory):
    """The sweep's MAC counts (bench.flopcache) go to a folder of this session, never the user's cache."""
    import os

    saved = os.environ.get("ATTNBENCH_CACHE")
    os.environ["ATTNBENCH_CACHE"] = str(tmp_path_factory.mktemp("attnbench-cache"))
    yield
    if saved is None:
        os.environ.pop("ATTNBENCH_CACHE", None)
    else:
        os.environ["ATTNBENCH_CACHE"] = saved


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread per test: the ops are small, and on a shared CPU several threads spend more time
    waiting for each other than computing (a test that sets its own count gets it back afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
