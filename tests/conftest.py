"""Mechanisms named in ATTNBENCH_PLUGINS are registered before any test module is collected, so the
registry-driven tests parametrize over them too."""

from pathlib import Path

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


ONE_THREAD = ("models", "studies")  # the folders of tests/ whose tests run on one intra-op thread


@pytest.fixture(autouse=True)
def _one_thread(request):
    """One intra-op thread for the models and studies tests: their ops are small, and on a shared CPU several
    threads spend more time waiting for each other than computing. (The attention parity tests keep torch's
    count: their low-precision tolerances were set with it.)"""
    if Path(request.node.path).parent.name not in ONE_THREAD:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
