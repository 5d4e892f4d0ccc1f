"""pytest-benchmark cases: full attention with a relative-position bias table against plain full attention at
64x64 tokens, both warm (the second call on; the first is a warm-up round). The bias path gathers its (h, N, N)
bias from per-axis offsets made once per map, so its warm call should cost a small multiple of the plain one;
read the two cases side by side in the ``full-bias-64x64`` group (no timing is asserted)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from perf_points import CUDA, DEVICE, THREADS

from attnbench import attentions

HW = (64, 64)
DIM, HEADS = (128, 4) if CUDA else (32, 2)
DTYPE = torch.bfloat16 if CUDA else torch.float32


@pytest.mark.perf
@pytest.mark.parametrize("bias_table", [0, 64], ids=["plain", "bias_table64"])
def test_full_bias_warm_call(benchmark: Any, bias_table: int) -> None:
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    module = attentions.build("full", dim=DIM, heads=HEADS, bias_table=bias_table, impl="fast")
    module = module.to(device=DEVICE, dtype=DTYPE).eval()
    x, hw = module.example_inputs(1, HW, device=DEVICE, dtype=DTYPE)

    def call() -> None:
        with torch.no_grad():
            module(x, hw)
        if CUDA:
            torch.cuda.synchronize()

    benchmark.group = f"full-bias-{HW[0]}x{HW[1]}"
    benchmark.extra_info.update(bias_table=bias_table, dim=DIM, heads=HEADS, dtype=str(DTYPE), device=DEVICE)
    benchmark.pedantic(call, rounds=10, warmup_rounds=1, iterations=1)
