"""Swin window attention: one window is full attention with the table's bias, the
shifted-window region mask by hand, a per-query brute force of shifted and padded
windows, small maps, the analytic count and the knobs."""

from __future__ import annotations

import pytest
import torch
from attnbench.attentions.common import attend
from attnbench.attentions.relpos import swin_bias, swin_index
from attnbench.attentions.swin import MASKED_FAST, window_layout, window_mask
from attnbench.attentions.testing import assert_parity, rel_error

from attnbench import attentions

IMPLS = ["reference", "fast"]


MECHANISM = "swin"


def prepare(module: attentions.Attention) -> None:
    """A bias large enough to matter (the init has std 0.02)."""
    module.table.normal_()


def full_with_bias(module: attentions.Attention, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Full attention with the window module's weights and an additive (h, N, N) bias."""
    full = attentions.build("full", dim=module.dim, heads=module.heads)
    full.proj.load_state_dict(module.proj.state_dict())
    q = full.proj.queries(x)  # (B, h, N, d)
    k, v = full.proj.keys_values(x)
    return full.proj.output(attend(q, k, v, bias[None], math=True))


def table_bias_by_hand(table: torch.Tensor, window: int, hw: tuple[int, int]) -> torch.Tensor:
    """(h, N, N): table row (dh + M - 1) * (2M - 1) + (dw + M - 1) for every pair of an H x W map."""
    h, w = hw
    n = h * w
    out = torch.empty(table.shape[1], n, n)
    for i in range(n):
        for j in range(n):
            dh, dw = i // w - j // w, i % w - j % w
            out[:, i, j] = table[(dh + window - 1) * (2 * window - 1) + (dw + window - 1)]
    return out


def brute_force(module: attentions.Attention, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Each query softmaxes over the real keys of its own cell, cells drawn in the unrolled frame.

    Window m and shift s follow the documented rule; with a shift the cells are
    [0, s), [s, s + m), ... along each axis (the roll only moves the first s rows
    and columns to the end, where the mask keeps them apart).
    """
    h, w = hw
    big = module.knobs.window
    shift = module.knobs.shift_size or big // 2
    m, s = (min(h, w), 0) if min(h, w) <= big else (big, shift if module.knobs.shift else 0)
    q = module.proj.queries(x)  # (B, h, N, d)
    k, v = module.proj.keys_values(x)
    rows = torch.arange(h * w) // w
    cols = torch.arange(h * w) % w
    cell = ((rows + m - s) // m) * 10_000 + (cols + m - s) // m  # (N,)
    scale = module.head_dim**-0.5
    out = torch.empty_like(q)
    for i in range(h * w):
        keys = (cell == cell[i]).nonzero().flatten()
        dh, dw = rows[i] - rows[keys], cols[i] - cols[keys]
        bias = module.table[(dh + big - 1) * (2 * big - 1) + dw + big - 1].t()  # (h, keys)
        scores = (q[:, :, i : i + 1] @ k[:, :, keys].transpose(-2, -1))[:, :, 0] * scale + bias  # (B, h, keys)
        out[:, :, i] = (scores.softmax(-1)[..., None] * v[:, :, keys]).sum(-2)
    return module.proj.output(out)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("hw", [(6, 6), (5, 5)])
def test_one_window_over_the_whole_map_is_full_attention_with_its_bias(build, impl, hw):
    window = hw[0]
    module = build(window=window, impl=impl)
    x, _ = module.example_inputs(2, hw)
    bias = swin_bias(module.table, swin_index(hw, window))  # (h, N, N)
    expected = full_with_bias(module, x, bias)
    got = module(x, hw)
    assert rel_error(got, expected) < 1e-5
    # and the bias matters: without it the outputs differ
    assert rel_error(full_with_bias(module, x, torch.zeros_like(bias)), expected) > 1e-3


@pytest.mark.parametrize("impl", IMPLS)
def test_map_smaller_than_the_window_is_one_window_on_the_table_centre(build, impl):
    # window 7 on a 5x5 map: one 5x5 window, no shift, offsets read from the 13x13 table's centre.
    hw = (5, 5)
    module = build(window=7, shift=True, impl=impl)
    lay = window_layout(hw, 7, True)
    assert (lay.window, lay.shift, lay.padded_hw) == (5, 0, (5, 5))
    x, _ = module.example_inputs(1, hw)
    expected = full_with_bias(module, x, table_bias_by_hand(module.table.detach(), 7, hw))
    assert rel_error(module(x, hw), expected) < 1e-5


def test_non_square_map_smaller_than_the_window_pads_or_says_so(build):
    # min(4, 6) = 4 <= 7: windows of 4, so W = 6 needs padding to 8.
    module = build(window=7)
    (reason,) = module.unsupported(1, (4, 6))
    assert "pad=True" in reason and "4x8" in reason and "window 4" in reason
    padded = build(window=7, pad=True)
    x, _ = padded.example_inputs(1, (4, 6))
    torch.testing.assert_close(padded(x, (4, 6)), brute_force(padded, x, (4, 6)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shift_size", [0, 1, 3])
def test_shift_size_is_the_roll_of_the_windows(build, impl, shift_size):
    # window 4 on an 8x12 map: the brute force draws cells [0, s), [s, s + 4), ... with s = shift_size (0: 2)
    module = build(window=4, shift=True, shift_size=shift_size, impl=impl)
    assert module.layout((8, 12)).shift == (shift_size or 2)
    x, _ = module.example_inputs(2, (8, 12))
    torch.testing.assert_close(module(x, (8, 12)), brute_force(module, x, (8, 12)), rtol=1e-5, atol=1e-5)
    other = build(window=4, shift=True, shift_size=(shift_size or 2) % 3 + 1, impl=impl)
    assert not torch.allclose(other(x, (8, 12)), module(x, (8, 12)), atol=1e-4)


def test_dat_t_shifted_blocks_roll_by_4(build):
    from attnbench import models

    cfg = models.config("dat_t")
    shifted = [
        (stage, knobs)
        for stage in cfg.stages
        for j, knobs in enumerate(stage.knobs)  # attention and knobs cycle over a stage's blocks
        if stage.attention[j % len(stage.attention)] == "swin" and knobs.get("shift")
    ]
    assert len(shifted) == 2  # stages 1 and 2 alternate local and shifted windows; 3 and 4 use deformable
    for i, (stage, knobs) in enumerate(shifted):
        attn = attentions.build("swin", dim=stage.dim, heads=stage.heads, **knobs)
        assert attn.layout((56 // 2**i, 56 // 2**i)).shift == 4  # DAT: ceil(7 / 2)
    # the same knobs on a small module roll the windows by 4, checked against the brute force
    module = build(**shifted[0][1])
    x, _ = module.example_inputs(1, (14, 21))
    torch.testing.assert_close(module(x, (14, 21)), brute_force(module, x, (14, 21)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shift_size", [-1, 7, 9])
def test_shift_size_outside_the_window_is_refused(shift_size):
    with pytest.raises(attentions.KnobError, match="shift_size"):
        attentions.build("swin", dim=16, heads=2, window=7, shift_size=shift_size)


def test_shifted_window_region_mask_by_hand():
    # 4x4 map, window 2, shift 1. In the rolled frame rows 0-1 are region 0, row 2 region 1,
    # row 3 region 2 (columns alike). Tokens of a window are numbered row-major: 0 1 / 2 3.
    allowed = window_mask((4, 4), window_layout((4, 4), 2, True))
    assert allowed is not None
    t, f = True, False
    expected = torch.tensor(
        [
            # window (0, 0): one region, nothing masked
            [[t, t, t, t], [t, t, t, t], [t, t, t, t], [t, t, t, t]],
            # window (0, 1): column 2 and column 3 are different regions
            [[t, f, t, f], [f, t, f, t], [t, f, t, f], [f, t, f, t]],
            # window (1, 0): row 2 and row 3 are different regions
            [[t, t, f, f], [t, t, f, f], [f, f, t, t], [f, f, t, t]],
            # window (1, 1): four regions, each token sees only itself
            [[t, f, f, f], [f, t, f, f], [f, f, t, f], [f, f, f, t]],
        ]
    )
    assert torch.equal(allowed, expected)


def test_unshifted_unpadded_windows_need_no_mask():
    assert window_mask((8, 12), window_layout((8, 12), 4, False)) is None


@pytest.mark.parametrize(("impl", "masked"), [("reference", -100.0), ("fast", MASKED_FAST)])
def test_masked_pairs_get_minus_100_added_to_the_bias(build, impl, masked):
    # The reference adds the official -100; the fast path a value whose probabilities are 0 rather than float32
    # denormals (exp(-100) = 3.7e-44), whose products run at the CPU's slow denormal speed.
    module = build(window=2, shift=True, impl=impl)
    bias = module.window_bias((4, 4), torch.device("cpu"))  # (nW, h, T, T)
    rel = swin_bias(module.table, module.index)  # (h, T, T)
    allowed = window_mask((4, 4), window_layout((4, 4), 2, True))
    diff = (bias - rel).detach()
    assert torch.equal(diff[:, 0], torch.where(allowed, 0.0, masked))
    assert torch.equal(diff[:, 1], diff[:, 0])
    assert masked == -100.0 or torch.exp(torch.tensor(masked + 100.0)) == 0  # beside a kept pair's: exactly 0


def test_the_fast_path_switched_to_the_reference_adds_minus_100(build):
    module = build(window=2, shift=True, impl="fast")
    module.window_bias((4, 4), torch.device("cpu"))  # the fast path's mask, cached
    module.impl = "reference"
    rel = swin_bias(module.table, module.index)
    assert (module.window_bias((4, 4), torch.device("cpu")) - rel).detach().min() == -100.0


@pytest.mark.parametrize(
    ("hw", "knobs"),
    [
        ((8, 8), {"window": 4, "shift": True}),  # square
        ((6, 10), {"window": 2, "shift": True}),  # non-square
        ((9, 15), {"window": 3, "shift": True}),  # odd, not powers of two
        ((7, 10), {"window": 3, "shift": True, "pad": True}),  # padded and shifted
        ((10, 6), {"window": 4, "pad": True}),  # padded, no shift
    ],
)
@pytest.mark.parametrize("impl", IMPLS)
def test_windows_match_a_per_query_brute_force(build, hw, knobs, impl):
    module = build(impl=impl, **knobs)
    x, _ = module.example_inputs(2, hw)
    torch.testing.assert_close(module(x, hw), brute_force(module, x, hw), rtol=1e-5, atol=1e-5)


def test_the_shift_changes_the_output(build):
    a, b = build(window=3), build(window=3, shift=True)
    x, hw = a.example_inputs(1, (9, 12))
    assert rel_error(a(x, hw), b(x, hw)) > 1e-3


def test_fast_matches_reference_shifted_and_padded_with_gradients(build):
    module = build(window=3, shift=True, pad=True)
    args = module.example_inputs(2, (7, 10))
    assert_parity(module, "fast", torch.float32, args)
    assert_parity(module, "fast", torch.bfloat16, args)


def test_padded_queries_leave_no_nan_in_gradients(build):
    module = build(window=4, shift=True, pad=True)
    x, hw = module.example_inputs(1, (9, 11))
    x.requires_grad_(True)
    module(x, hw).square().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(module.table.grad).all()


def test_macs_by_hand():
    # dim 32, 2 heads of 16, 8x12 map, window 4 shifted: 2x3 = 6 windows of 16 tokens.
    module = attentions.build("swin", dim=32, heads=2, window=4, shift=True)
    projections = 4 * 96 * 32 * 32  # q, k, v and output of 96 tokens
    windows = 2 * 6 * 2 * 16 * 16 * 16  # scores and weighted sum: 6 windows x 2 heads x 16 x 16 pairs x 16
    assert module.macs(1, (8, 12)) == projections + windows == 491_520
    # padded 9x12 -> 12x12: 9 windows, the projections still of the 108 real tokens
    padded = attentions.build("swin", dim=32, heads=2, window=4, pad=True)
    assert padded.macs(1, (9, 12)) == 4 * 108 * 32 * 32 + 2 * 9 * 2 * 16 * 16 * 16
    # one 5x5 window on a 5x5 map (window 7 shrinks)
    small = attentions.build("swin", dim=32, heads=2, window=7)
    assert small.macs(3, (5, 5)) == 3 * (4 * 25 * 32 * 32 + 2 * 2 * 25 * 25 * 16)


def test_window_that_does_not_divide_says_what_to_change():
    module = attentions.build("swin", dim=16, heads=2, window=4)
    (reason,) = module.unsupported(2, (14, 21))
    assert "pad=True" in reason and "16x24" in reason and "(7)" in reason
    x, hw = module.example_inputs(1, (14, 21))
    with pytest.raises(attentions.UnsupportedPoint, match="multiples of the window 4"):
        module(x, hw)
    assert attentions.build("swin", dim=16, heads=2, window=4, pad=True).unsupported(2, (14, 21)) == []


@pytest.mark.parametrize(
    ("knobs", "match"),
    [({"window": 0}, "window"), ({"window": "seven"}, "window"), ({"shift": "sometimes"}, "shift")],
)
def test_bad_knobs_say_what_to_change(knobs, match):
    with pytest.raises(attentions.KnobError, match=match):
        attentions.build("swin", dim=16, heads=2, **knobs)


def test_table_and_index_shapes():
    module = attentions.build("swin", dim=24, heads=3, window=7)
    assert module.table.shape == (13 * 13, 3)
    assert module.index.shape == (49, 49) and module.index.dtype == torch.long
    assert int(module.index.min()) == 0 and int(module.index.max()) == 13 * 13 - 1
    assert "index" not in module.state_dict()  # rebuilt from the window, never stored


@pytest.mark.parametrize("shift", [False, True])
def test_the_window_bias_is_laid_out_heads_first(shift):
    # A heads-last bias (a gather permuted to (h, T, T)) would make the sum with the shift mask heads-last in
    # memory too, and SDPA copy it on every call; the bias must come out contiguous as (windows, h, T, T).
    module = attentions.build("swin", dim=32, heads=4, window=4, shift=shift)
    bias = module.window_bias((8, 8), torch.device("cpu"))
    assert bias.is_contiguous() and bias.shape == ((4 if shift else 1), 4, 16, 16)
    by_hand = module.table[module.index.flatten()].view(16, 16, 4).permute(2, 0, 1)  # (h, T, T)
    assert torch.equal(bias[0], by_hand)  # the first window holds one region: no mask in it
