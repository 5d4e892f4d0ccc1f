"""Deformable attention (DAT): sampling geometry, the bias table, equivalences, counts and knobs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from attnbench.attentions.common import to_map, to_tokens
from attnbench.attentions.relpos import DeformableBiasTable

from attnbench import attentions

MECHANISM = "deformable"


def zero_offsets(m) -> None:
    with torch.no_grad():
        m.offset_out.weight.zero_()


def constant_raw_offsets(m, raw_x: float, raw_y: float) -> None:
    """Make the offset network output the same raw (x, y) everywhere.

    LayerNorm with weight 0 and bias 1 outputs 1 whatever its input, GELU makes
    that gelu(1) in every channel, and the 1x1 conv sums its weights times that.
    """
    cg = m.group_channels
    g1 = F.gelu(torch.tensor(1.0)).item()
    with torch.no_grad():
        m.offset_norm.weight.zero_()
        m.offset_norm.bias.fill_(1.0)
        m.offset_out.weight[0].fill_(raw_x / (cg * g1))
        m.offset_out.weight[1].fill_(raw_y / (cg * g1))


def sampled_of(m, x, hw):
    """The module's sampling positions and the features it samples there."""
    b, g = x.shape[0], m.knobs.groups
    q_map = to_map(m.proj.q(x), hw).reshape(b * g, m.group_channels, *hw)  # (B*g, Cg, H, W)
    pos = m.positions(m.offsets(q_map), hw)  # (B*g, Hk, Wk, 2)
    return pos, m.sample(to_map(x, hw), pos)  # (B, Ns, C)


# ---------------------------------------------------------------------------- zero offsets


def test_zero_offsets_with_stride_1_sample_x_itself(build):
    m = build(stride=1, kernel=3, groups=2, geometry="centres")
    zero_offsets(m)
    hw = (5, 7)
    x = torch.randn(2, 35, 16)
    pos, sampled = sampled_of(m, x, hw)
    assert m.key_hw(hw) == hw
    # positions are exactly the pixel centres, in align_corners=True coordinates
    ys = torch.linspace(-1, 1, 5)
    xs = torch.linspace(-1, 1, 7)
    torch.testing.assert_close(pos[0, :, :, 0], xs.expand(5, 7), rtol=0, atol=1e-6)
    torch.testing.assert_close(pos[3, :, :, 1], ys[:, None].expand(5, 7), rtol=0, atol=1e-6)
    torch.testing.assert_close(sampled, x, rtol=1e-5, atol=1e-5)


def test_zero_offsets_with_stride_1_and_no_bias_is_full_attention(build):
    m = build(stride=1, kernel=3, groups=2, use_pe=False, impl="reference", geometry="centres")
    zero_offsets(m)
    full = attentions.build("full", dim=16, heads=2, impl="reference")
    full.proj.load_state_dict(m.proj.state_dict())
    x = torch.randn(2, 5 * 7, 16)
    torch.testing.assert_close(m(x, (5, 7)), full(x, (5, 7)), rtol=1e-5, atol=1e-5)


def test_zero_offsets_with_stride_2_sample_cell_centres(build):
    # kernel == stride: no padding, a 3x4 grid of 2x2 cells; bilinear at a cell centre is the cell's mean
    m = build(stride=2, kernel=2, geometry="centres")
    zero_offsets(m)
    hw = (6, 8)
    x = torch.randn(1, 48, 16)
    _, sampled = sampled_of(m, x, hw)
    assert m.key_hw(hw) == (3, 4)
    expected = to_tokens(F.avg_pool2d(to_map(x, hw), 2))  # (1, 12, 16)
    torch.testing.assert_close(sampled, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- offsets


def test_an_offset_moves_the_sample_bilinearly(build):
    # stride 1 on a 6x9 map: the reference point of key (2, 3) is pixel (y=2, x=3).
    # Raw offsets chosen so that tanh(raw) * 2 / (Wk, Hk) is +1/4 pixel in x and -1/2 pixel in y:
    # one pixel is 2/(W-1) = 1/4 (x) and 2/(H-1) = 2/5 (y) in normalised units.
    m = build(stride=1, kernel=3, offset_range_factor=2.0, geometry="centres")
    hw = (6, 9)
    raw_x = math.atanh(0.25 * (2 / 8) * 9 / 2)  # tanh = 0.28125
    raw_y = math.atanh(-0.5 * (2 / 5) * 6 / 2)  # tanh = -0.6
    constant_raw_offsets(m, raw_x, raw_y)
    x = torch.randn(1, 54, 16)
    pos, sampled = sampled_of(m, x, hw)
    xm = to_map(x, hw)[0]  # (C, H, W)
    # sample at (y=1.5, x=3.25): half of rows 1 and 2, three quarters of column 3 and a quarter of column 4
    by_hand = 0.5 * (0.75 * xm[:, 1, 3] + 0.25 * xm[:, 1, 4]) + 0.5 * (0.75 * xm[:, 2, 3] + 0.25 * xm[:, 2, 4])
    torch.testing.assert_close(sampled[0, 2 * 9 + 3], by_hand, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(sampled[0, 2 * 9 + 3], xm[:, 2, 3])
    # every sample moved by the same amount
    ref = m.reference_points(hw, hw, "cpu")
    torch.testing.assert_close(pos[0] - ref, torch.tensor([0.0625, -0.2]).expand(6, 9, 2), rtol=0, atol=1e-6)


def test_bounded_offsets_stay_within_the_range(build):
    m = build(stride=2, kernel=3, offset_range_factor=1.0)
    constant_raw_offsets(m, 50.0, -50.0)  # saturate tanh
    hw = (6, 10)
    pos, _ = sampled_of(m, torch.randn(1, 60, 16), hw)
    hk, wk = m.key_hw(hw)
    moved = pos[0] - m.reference_points(hw, (hk, wk), "cpu")
    torch.testing.assert_close(moved, torch.tensor([1.0 / wk, -1.0 / hk]).expand(hk, wk, 2), rtol=0, atol=1e-6)


def test_unbounded_offsets_are_clamped_to_the_map(build):
    m = build(stride=2, kernel=3, offset_range_factor=-1, geometry="centres")
    constant_raw_offsets(m, 5.0, -0.25)  # raw offsets used as they are
    hw = (6, 10)
    pos, _ = sampled_of(m, torch.randn(1, 60, 16), hw)
    ref = m.reference_points(hw, m.key_hw(hw), "cpu")
    assert (pos[0, ..., 0] == 1.0).all()  # pushed past the right edge, clamped
    torch.testing.assert_close(pos[0, ..., 1], (ref[..., 1] - 0.25).clamp(-1, 1), rtol=0, atol=1e-6)


def grid_by_hand(geometry: str, size: int, cells: int) -> list[float]:
    """The official formulas, written out per point (normalised, align_corners=True)."""
    if geometry == "cvpr2022":  # linspace(0.5, Hk - 0.5, Hk) / Hk * 2 - 1
        return [(j + 0.5) / cells * 2 - 1 for j in range(cells)]
    if geometry == "datpp":  # linspace(0.5, Hk - 0.5, Hk) / (Hk - 1) * 2 - 1
        return [(j + 0.5) / (cells - 1) * 2 - 1 for j in range(cells)]
    # centres of equal cells, (j + 1/2) * H / Hk - 1/2 pixels, in the align_corners=True frame
    return [((j + 0.5) * size / cells - 0.5) * 2 / (size - 1) - 1 for j in range(cells)]


def query_by_hand(geometry: str, size: int) -> list[float]:
    if geometry == "cvpr2022":  # the reference formula at (H, W)
        return [(i + 0.5) / size * 2 - 1 for i in range(size)]
    return [i / (size - 1) * 2 - 1 for i in range(size)]  # DAT++'s q grid: arange(H) / (H - 1) * 2 - 1


GEOMETRY_CASES = [
    # (stride, kernel, map): kernel == stride (no padding) or kernel stride+1 (padding kernel // 2)
    (1, 3, (6, 6)),
    (1, 3, (5, 8)),
    (2, 2, (8, 8)),
    (2, 3, (6, 10)),
    (4, 4, (16, 16)),
    (4, 5, (12, 20)),
]


@pytest.mark.parametrize("geometry", ["cvpr2022", "datpp", "centres"])
@pytest.mark.parametrize(("stride", "kernel", "hw"), GEOMETRY_CASES, ids=lambda v: str(v))
def test_zero_offset_positions_are_the_official_grids(build, geometry, stride, kernel, hw):
    m = build(stride=stride, kernel=kernel, geometry=geometry)
    zero_offsets(m)
    hk, wk = m.key_hw(hw)
    pos, sampled = sampled_of(m, torch.randn(2, hw[0] * hw[1], 16), hw)
    ys, xs = torch.tensor(grid_by_hand(geometry, hw[0], hk)), torch.tensor(grid_by_hand(geometry, hw[1], wk))
    for g in range(pos.shape[0]):
        torch.testing.assert_close(pos[g, ..., 0], xs.expand(hk, wk), rtol=0, atol=1e-6)
        torch.testing.assert_close(pos[g, ..., 1], ys[:, None].expand(hk, wk), rtol=0, atol=1e-6)
    qy, qx = torch.tensor(query_by_hand(geometry, hw[0])), torch.tensor(query_by_hand(geometry, hw[1]))
    q = m.query_points(hw, "cpu").reshape(hw[0], hw[1], 2)
    torch.testing.assert_close(q[..., 0], qx.expand(*hw), rtol=0, atol=1e-6)
    torch.testing.assert_close(q[..., 1], qy[:, None].expand(*hw), rtol=0, atol=1e-6)


def test_the_geometries_sample_different_points(build):
    # at stride 2 on a 6x10 map the three placements differ, and so do the sampled features
    hw, x = (6, 10), torch.randn(1, 60, 16)
    samples = []
    for geometry in ("cvpr2022", "datpp", "centres"):
        m = build(stride=2, kernel=3, geometry=geometry)
        zero_offsets(m)
        samples.append(sampled_of(m, x, hw)[1])
    for i in range(3):
        for j in range(i):
            assert not torch.allclose(samples[i], samples[j], atol=1e-3)


@pytest.mark.parametrize(("geometry", "cells"), [("cvpr2022", lambda n: n), ("datpp", lambda n: n - 1)])
def test_bounded_offsets_are_divided_as_in_the_release(build, geometry, cells):
    m = build(stride=2, kernel=3, offset_range_factor=2.0, geometry=geometry)
    constant_raw_offsets(m, 50.0, -50.0)  # tanh saturates at +-1
    hw = (8, 12)
    pos, _ = sampled_of(m, torch.randn(1, 96, 16), hw)
    hk, wk = m.key_hw(hw)
    moved = pos[0] - m.reference_points(hw, (hk, wk), "cpu")
    torch.testing.assert_close(moved, torch.tensor([2.0 / cells(wk), -2.0 / cells(hk)]).expand(hk, wk, 2))


def test_unbounded_offsets_follow_the_release(build):
    # CVPR 2022: tanh of the position; DAT++: the position clamped to the map
    hw = (6, 10)
    for geometry, squash in (("cvpr2022", torch.tanh), ("datpp", lambda p: p.clamp(-1, 1))):
        m = build(stride=2, kernel=3, offset_range_factor=-1, geometry=geometry)
        constant_raw_offsets(m, 1.5, -0.25)
        pos, _ = sampled_of(m, torch.randn(1, 60, 16), hw)
        ref = m.reference_points(hw, m.key_hw(hw), "cpu")
        torch.testing.assert_close(pos[0], squash(ref + torch.tensor([1.5, -0.25])), rtol=0, atol=1e-5)


def test_datpp_refuses_a_one_row_key_grid(build):
    m = build(stride=4, kernel=4, geometry="datpp")
    assert "datpp" in m.unsupported(1, (4, 8))[0]  # a 1x2 key grid: Hk - 1 = 0
    assert not m.unsupported(1, (8, 8))
    assert not build(stride=4, kernel=4).unsupported(1, (4, 8))  # cvpr2022 is defined there


# ---------------------------------------------------------------------------- bias table


def test_bias_at_zero_displacement_reads_the_table_centre():
    torch.manual_seed(0)
    table = DeformableBiasTable(heads=3, table_hw=(4, 5))
    pos = (torch.rand(6, 2) * 2 - 1).expand(2, 6, 2)  # (B*g, Ns, 2), the same in both images
    bias = table(pos[0], pos, groups=1)  # queries at the samples' own positions
    centre = table.table[:, 3, 4]  # (heads,)
    for i in range(6):
        torch.testing.assert_close(bias[:, :, i, i], centre.expand(2, 3), rtol=1e-6, atol=1e-7)


def test_bias_reads_whole_entries_on_a_map_of_the_table_size():
    # a 4x5 map: query pixel (y=1, x=1), sample pixel (y=2, x=3): displacement (-1, -2) -> entry (3-1, 4-2)
    torch.manual_seed(0)
    table = DeformableBiasTable(heads=2, table_hw=(4, 5))
    q = torch.tensor([[2 * 1 / 4 - 1, 2 * 1 / 3 - 1]])  # (x, y) normalised
    s = torch.tensor([[[2 * 3 / 4 - 1, 2 * 2 / 3 - 1]]])
    torch.testing.assert_close(table(q, s)[0, :, 0, 0], table.table[:, 2, 2], rtol=1e-5, atol=1e-6)


def test_bias_interpolates_the_table_on_other_maps():
    # a 5x5 map with a 3x3 table: one pixel to the right of the query is half an entry
    torch.manual_seed(0)
    table = DeformableBiasTable(heads=2, table_hw=(3, 3))
    q = torch.tensor([[0.0, 0.0]])  # pixel (2, 2)
    s = torch.tensor([[[0.5, 0.0]]])  # pixel (2, 3): displacement -1 pixel in x
    expected = 0.5 * (table.table[:, 2, 2] + table.table[:, 2, 1])
    torch.testing.assert_close(table(q, s)[0, :, 0, 0], expected, rtol=1e-5, atol=1e-6)


def test_bias_groups_serve_their_own_heads():
    torch.manual_seed(0)
    table = DeformableBiasTable(heads=4, table_hw=(3, 3))
    q = torch.zeros(1, 2)
    s = torch.tensor([[[0.0, 0.0]], [[1.0, 1.0]]])  # group 0 at the query, group 1 far away
    bias = table(q, s, groups=2)  # (1, 4, 1, 1)
    torch.testing.assert_close(bias[0, :2, 0, 0], table.table[:2, 2, 2])  # heads of group 0: zero displacement
    torch.testing.assert_close(bias[0, 2:, 0, 0], table.table[2:, 1, 1])  # group 1: (-1, -1)/2 -> corner (1, 1)


def test_use_pe_adds_the_bias(build):
    hw = (4, 6)
    x = torch.randn(1, 24, 16)
    with_pe = build(impl="reference")
    with torch.no_grad():
        with_pe.rpe.table.fill_(0.0)
    without = build(use_pe=False, impl="reference")
    without.load_state_dict({k: v for k, v in with_pe.state_dict().items() if not k.startswith("rpe")})
    torch.testing.assert_close(with_pe(x, hw), without(x, hw))
    with torch.no_grad():
        with_pe.rpe.table.normal_()
    assert not torch.allclose(with_pe(x, hw), without(x, hw))


# ---------------------------------------------------------------------------- maps, paths, counts


@pytest.mark.parametrize(
    ("hw", "knobs"),
    [
        ((5, 7), dict(stride=1, kernel=3, groups=2)),
        ((9, 6), dict(stride=3, kernel=3, groups=2, offset_range_factor=-1)),
        ((7, 10), dict(stride=2, kernel=5, groups=1, use_pe=False)),
        ((3, 11), dict(stride=3, kernel=4)),
    ],
)
def test_non_square_maps_fast_matches_reference(build, hw, knobs):
    m = build(**knobs)
    x = torch.randn(2, hw[0] * hw[1], 16, requires_grad=True)
    ref = build(**knobs)
    ref.impl = "reference"
    out_fast, out_ref = m(x, hw), ref(x, hw)
    assert out_fast.shape == x.shape
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-5, atol=1e-5)
    (g_fast,) = torch.autograd.grad(out_fast.square().sum(), x)
    (g_ref,) = torch.autograd.grad(out_ref.square().sum(), x)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-5)


def test_macs_by_hand():
    # dim 8, 2 heads of 4, 2 groups of 4 channels, stride 2, kernel 3 (padding 1) on a 4x6 map:
    # a 2x3 key grid, N = 24 queries, Ns = 6 samples.
    m = attentions.build("deformable", dim=8, heads=2, groups=2, stride=2, kernel=3)
    assert m.key_hw((4, 6)) == (2, 3)
    projections = 24 * 8 * 8 + 6 * 8 * 16 + 24 * 8 * 8  # q, kv from the samples, out
    offset_net = 2 * (6 * 4 * 9 + 5 * 6 * 4 + 6 * 4 * 2)  # per group: depthwise 3x3, LayerNorm, 1x1 to 2
    sampling = 4 * 8 * 6  # grid_sample of x: 4 per output element
    bias = 4 * 2 * 24 * 6  # grid_sample of the table: heads x N x Ns outputs
    attention = 2 * 2 * 24 * 6 * 4  # scores and weighted sum
    assert m.macs(1, (4, 6)) == projections + offset_net + sampling + bias + attention == 8256
    assert m.macs(3, (4, 6)) == 3 * 8256
    no_pe = attentions.build("deformable", dim=8, heads=2, groups=2, stride=2, kernel=3, use_pe=False)
    assert no_pe.macs(1, (4, 6)) == 8256 - bias


def test_cost_falls_with_the_stride():
    costs = [
        attentions.build("deformable", dim=16, heads=2, stride=s, kernel=s + 1).macs(1, (16, 16)) for s in (1, 2, 4)
    ]
    assert costs[0] > costs[1] > costs[2]


# ---------------------------------------------------------------------------- knobs and refusals


@pytest.mark.parametrize(
    ("knobs", "match"),
    [
        (dict(stride=0), "stride"),
        (dict(kernel=0), "kernel"),
        (dict(groups=0), "groups"),
        (dict(offset_range_factor=-0.5), "offset_range_factor"),
        (dict(table_hw=(7,)), "table_hw"),
        (dict(table_hw=(7, 0)), "table_hw"),
        (dict(groups=4), "must divide"),  # 4 does not divide heads=2
        (dict(stride="two"), "integer"),
    ],
)
def test_bad_knobs_say_what_to_change(knobs, match):
    with pytest.raises(attentions.KnobError, match=match):
        attentions.build("deformable", dim=16, heads=2, **knobs)


def test_table_hw_accepts_a_cli_string():
    m = attentions.build("deformable", dim=16, heads=2, table_hw="3,5")
    assert m.rpe.table.shape == (2, 5, 9)


def test_map_smaller_than_the_stride_is_refused(build):
    m = build(stride=4, kernel=5)
    reasons = m.unsupported(1, (3, 8))
    assert reasons and "stride" in reasons[0]
    assert not m.unsupported(1, (4, 8))
    with pytest.raises(attentions.UnsupportedPoint, match="stride"):
        m(torch.randn(1, 24, 16), (3, 8))


def test_cross_is_refused(build):
    m = build()
    x = torch.randn(1, 24, 16)
    with pytest.raises(ValueError, match="cross"):
        m(x, (4, 6), x.clone(), (4, 6))


def test_cvpr2022_pads_the_offset_conv_at_kernel_equal_to_stride_as_that_release_does():
    # the CVPR release pads kernel // 2 always; DAT++ (and centres) pad 0 where kernel == stride
    kn = {"stride": 4, "kernel": 4}
    cvpr = attentions.build("deformable", dim=16, heads=2, geometry="cvpr2022", **kn)
    datpp = attentions.build("deformable", dim=16, heads=2, geometry="datpp", **kn)
    assert cvpr.padding == 2 and datpp.padding == 0
    assert cvpr.key_hw((56, 56)) == (15, 15) and datpp.key_hw((56, 56)) == (14, 14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_fast_bias_displacements_equal_the_reference(dtype):
    """The fast path's displacements (one complex subtraction) give the reference's bias and gradients,
    groups and a batch included."""
    torch.manual_seed(0)
    table = DeformableBiasTable(4, (5, 7)).to(dtype)
    query = (torch.rand(6 * 5, 2, dtype=dtype) * 2 - 1).requires_grad_(True)
    samples = (torch.rand(2 * 2, 9, 2, dtype=dtype) * 2.4 - 1.2).requires_grad_(True)  # batch 2, groups 2
    out = {}
    for fast in (False, True):
        bias = table(query, samples, groups=2, fast=fast)
        grads = torch.autograd.grad(bias.square().sum(), (query, samples, table.table))
        out[fast] = (bias, *grads)
    for ref, new in zip(out[False], out[True], strict=True):
        torch.testing.assert_close(new, ref, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-7)
