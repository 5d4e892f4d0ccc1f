"""One intra-op thread for the models tests: their ops are small, and on a shared
CPU several threads spend more time waiting for each other than computing."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
