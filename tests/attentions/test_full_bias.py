"""full with ``bias_table``: the bias is gathered from per-axis offsets made once per map and device, never from
an (N, N) index rebuilt at every call."""

from __future__ import annotations

import attnbench.attentions.full as full_module
import pytest
import torch
from attnbench.attentions.relpos import map_bias, map_offsets, swin_bias, swin_index, swin_table
from attnbench.bench.measure import cpu_peak_bytes

from attnbench import attentions

DIM, HEADS = 16, 2


@pytest.mark.parametrize(("hw", "table"), [((3, 5), 5), ((6, 6), 6), ((4, 7), 9), ((1, 1), 2)])
def test_map_bias_equals_the_gather_through_the_full_index(hw, table):
    t = swin_table(table, HEADS).detach().normal_()
    expected = swin_bias(t, swin_index(hw, table))
    got = map_bias(t, map_offsets(hw, table))
    assert got.shape == (HEADS, hw[0] * hw[1], hw[0] * hw[1])
    assert torch.equal(got, expected)


def test_map_offsets_refuse_a_map_larger_than_the_table():
    with pytest.raises(ValueError, match="larger than the table"):
        map_offsets((5, 7), 6)


def counting_offsets(monkeypatch):
    calls = []
    real = full_module.map_offsets

    def counted(hw, table_window, device=None):
        calls.append(tuple(hw))
        return real(hw, table_window, device)

    monkeypatch.setattr(full_module, "map_offsets", counted)
    return calls


def test_offsets_are_made_once_per_map_and_replaced_on_a_new_one(monkeypatch):
    calls = counting_offsets(monkeypatch)
    full = attentions.build("full", dim=DIM, heads=HEADS, bias_table=8, impl="fast")
    x, hw = full.example_inputs(1, (6, 8))
    for _ in range(4):
        full(x, hw)
    assert calls == [(6, 8)]  # made at the first call, reused by the next three
    y, hw2 = full.example_inputs(1, (4, 4))
    full(y, hw2)
    full(y, hw2)
    full(x, hw)
    assert calls == [(6, 8), (4, 4), (6, 8)]  # one entry: a new map replaces the old one
    key, offsets = full._offsets
    assert key == ((6, 8), torch.device("cpu"))
    assert offsets.rows.shape == (6, 6) and offsets.cols.shape == (8, 8)


def test_the_bias_path_keeps_constant_memory_across_calls():
    """What a call allocates does not grow with the number of calls, and the cache holds O(H^2 + W^2) longs."""
    torch.manual_seed(0)
    full = attentions.build("full", dim=DIM, heads=HEADS, bias_table=16, impl="fast").eval()
    x, hw = full.example_inputs(1, (16, 16))
    with torch.no_grad():
        full(x, hw)
        peaks = [cpu_peak_bytes(lambda: full(x, hw)) for _ in range(3)]
        for _ in range(20):
            full(x, hw)
        peaks.append(cpu_peak_bytes(lambda: full(x, hw)))
    assert len(set(peaks)) == 1, peaks
    _, offsets = full._offsets
    cached = sum(t.numel() * t.element_size() for t in offsets)
    assert cached == (16 * 16 + 16 * 16) * 8
    n = hw[0] * hw[1]
    assert cached < n * n * 8 // 100  # the (N, N) int64 index it replaces would be 256x larger here


def test_the_bias_path_still_agrees_after_a_dtype_change():
    full = attentions.build("full", dim=DIM, heads=HEADS, bias_table=4, impl="reference")
    x, hw = full.example_inputs(1, (4, 4))
    ref = full(x, hw)
    full = full.to(torch.float64)
    out = full(x.double(), hw)
    torch.testing.assert_close(out.float(), ref, rtol=1e-5, atol=1e-5)
    assert full._offsets[1].rows.device == x.device
