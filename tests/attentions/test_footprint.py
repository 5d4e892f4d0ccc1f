"""Footprints of all eight mechanisms: exact against the forward pass and the full attention matrix,
with the support of each mechanism checked exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from attnbench.attentions.common import split_heads
from attnbench.attentions.footprint import splat

from attnbench import attentions

HW = (16, 16)
QUERY = (5, 9)


def build(name: str, seed: int = 0, dim: int = 32, heads: int = 4, **knobs) -> attentions.Attention:
    torch.manual_seed(seed)
    module = attentions.build(name, dim=dim, heads=heads, impl="reference", **knobs)
    with torch.no_grad():  # tables and offsets large enough to matter (their inits are near zero)
        for pname, p in module.named_parameters():
            if "table" in pname or "rel_pos" in pname or "offset_out" in pname or "level_weight" in pname:
                p.normal_()
    return module


def inputs(module: attentions.Attention, hw=HW, cross: bool = False, seed: int = 1) -> tuple:
    return module.example_inputs(1, hw, cross=cross, seed=seed)


def pre_projection(module: attentions.Attention, args: tuple) -> torch.Tensor:
    """The input of the output projection (1, Nq, C) in the forward pass."""
    seen = []
    handle = module.proj.out.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    with torch.no_grad():
        module(*args)
    handle.remove()
    return seen[-1]


def pixel_values(module: attentions.Attention, source: torch.Tensor) -> torch.Tensor:
    """Values of every source pixel, (h, M, d): the kv projection's value half, split into heads."""
    _, v = module.proj.kv(source).chunk(2, dim=-1)
    return split_heads(v, module.heads)[0]


# Configurations whose values are a fixed linear function of the source pixels' projected values, so the
# footprint applied to them must give back the forward's pre-projection output of the query exactly.
LINEAR_IN_VALUES = [
    ("full", {}, False),
    ("full", {}, True),
    ("full", {"bias_table": 16}, False),
    ("linear", {}, False),
    ("linear", {}, True),
    ("pvt", {"sr_ratio": 1}, False),
    ("pvt", {"sr_ratio": 1}, True),
    ("swin", {"window": 4}, False),
    ("swin", {"window": 4, "shift": True}, False),
    ("swin", {"window": 6, "shift": True, "pad": True}, False),
    ("quadtree", {"topk": 4}, False),
    ("quadtree", {"topk": 4}, True),
    ("quadtree", {"topk": 4, "variant": "A"}, False),
    ("quadtree", {"topk": (4, 6, 5), "variant": "A"}, True),
    ("deformable", {"qkv_bias": False}, False),
    ("deformable", {"qkv_bias": False, "stride": 1, "kernel": 3}, False),
    ("pooling", {"mode": "avg", "residual_pooling": False}, False),
    ("pooling", {"mode": "avg", "residual_pooling": False, "stride_q": 2, "stride_kv": 2}, False),
    ("pooling", {"mode": "none", "stride_kv": 1, "residual_pooling": False}, False),
]


@pytest.mark.parametrize(("name", "knobs", "cross"), LINEAR_IN_VALUES, ids=lambda v: str(v))
def test_footprint_reproduces_the_forward(name, knobs, cross):
    module = build(name, **knobs)
    args = inputs(module, cross=cross)
    x, hw = args[0], args[1]
    fp = module.footprint(*args[:2], QUERY, *args[2:])  # (h, Hk, Wk)
    khw = args[3] if cross else hw
    assert fp.shape == (module.heads, *khw)
    source = args[2] if cross else x
    v = pixel_values(module, source)  # (h, M, d)
    if name == "pooling":  # values are pooled per head after the projection; the footprint reads those pixels
        _, v_tok = module.proj.kv(x).chunk(2, dim=-1)
        v = split_heads(v_tok, module.heads)[0]
    expected = torch.einsum("hm,hmd->hd", fp.reshape(module.heads, -1), v)  # (h, d)
    out = pre_projection(module, args)[0]  # (Nq, C)
    sq = module.knobs.stride_q if name == "pooling" else 1
    qhw = module.output_hw(hw)
    row = out[min(QUERY[0] // sq, qhw[0] - 1) * qhw[1] + min(QUERY[1] // sq, qhw[1] - 1)]
    assert torch.allclose(row.view(module.heads, -1), expected, atol=1e-5, rtol=1e-4)


def test_cross_footprint_with_its_cls_reproduces_the_forward():
    module = build("cross")
    x, hw, ctx, chw = inputs(module, cross=True)
    fp = module.footprint(x, hw, QUERY, ctx, chw)  # (h, Hc, Wc): the CLS over the other branch's patches
    assert fp.shape == (module.heads, *chw)
    t = module.norm(torch.cat([module.to_context(x[:, :1]), ctx[:, 1:]], dim=1))
    v = pixel_values(module, t)  # (h, 1 + M, d): the projected CLS first
    cls_weight = 1 - fp.sum((1, 2))  # the rest of the softmax is on the CLS key
    expected = cls_weight[:, None] * v[:, 0] + torch.einsum("hm,hmd->hd", fp.reshape(module.heads, -1), v[:, 1:])
    assert torch.allclose(pre_projection(module, (x, hw, ctx, chw))[0, 0].view(module.heads, -1), expected, atol=1e-5)
    assert (cls_weight > 0).all()


@pytest.mark.parametrize("cross", [False, True])
def test_full_matches_the_attention_matrix(cross):
    module = build("full")
    args = inputs(module, cross=cross)
    q = module.proj.queries(args[0])
    k, _ = module.proj.keys_values(args[2] if cross else args[0])
    matrix = torch.softmax(q @ k.transpose(-2, -1) * module.head_dim**-0.5, dim=-1)[0]  # (h, N, M)
    fp = module.footprint(*args[:2], QUERY, *args[2:])
    assert torch.allclose(fp.flatten(1), matrix[:, QUERY[0] * HW[1] + QUERY[1]], atol=1e-6)


@pytest.mark.parametrize(("knobs", "cross", "hw"), [({"sr_ratio": 4}, False, (18, 16)), ({"sr_ratio": 2}, True, HW),
                                                     ({"version": "v2", "pool_size": 5}, False, (17, 13))])  # fmt: skip
def test_pvt_matches_the_reduced_attention_matrix_spread_over_whole_cells(knobs, cross, hw):
    module = build("pvt", **knobs)
    args = inputs(module, hw=hw, cross=cross)
    src, shw = (args[2], args[3]) if cross else (args[0], hw)
    q = module.proj.queries(args[0])
    k, _ = module.proj.keys_values(module.reduce(src, shw))
    matrix = torch.softmax(q @ k.transpose(-2, -1) * module.head_dim**-0.5, dim=-1)[0]  # (h, N, M')
    row = matrix[:, QUERY[0] * hw[1] + QUERY[1]]
    fp = module.footprint(*args[:2], QUERY, *args[2:]).double()
    kh, kw = module.kv_hw(shw)
    if knobs.get("version") == "v2":
        # each pixel gets the sum over the adaptive bins holding it of bin weight / bin size
        from attnbench.attentions.footprint import adaptive_bins

        rows, cols = adaptive_bins(shw[0], kh), adaptive_bins(shw[1], kw)
        assert torch.allclose(fp, torch.einsum("hab,ay,bx->hyx", row.view(-1, kh, kw).double(), rows, cols), atol=1e-7)
        assert torch.allclose(fp.sum((1, 2)), torch.ones(module.heads, dtype=torch.float64), atol=1e-5)
        return
    r = module.sr_ratio
    cells = fp[:, : kh * r, : kw * r].reshape(module.heads, kh, r, kw, r)
    assert torch.allclose(cells.sum((2, 4)).flatten(1), row.double(), atol=1e-6)  # whole r x r cells
    assert (cells.amax((2, 4)) == cells.amin((2, 4))).all()  # spread evenly within a cell
    assert (fp[:, kh * r :] == 0).all() and (fp[:, :, kw * r :] == 0).all()  # rows/cols the conv drops
    assert (fp[:, : kh * r, : kw * r] > 0).all()


def test_swin_one_window_matches_full_attention_with_the_same_bias_table():
    swin = build("swin", window=16)  # one window covers the 16x16 map
    full = attentions.build("full", dim=32, heads=4, bias_table=16, impl="reference")
    full.proj.load_state_dict(swin.proj.state_dict())
    with torch.no_grad():
        full.table.copy_(swin.table)
    x, hw = inputs(swin)
    for query in (QUERY, (0, 0), (15, 3)):
        assert torch.allclose(swin.footprint(x, hw, query), full.footprint(x, hw, query), atol=1e-6)


def _swin_expected_support(hw, m, shift, query):
    """Pixels a query may see, from the Swin definition: same window of the rolled map, same region."""
    h, w = hw
    s = m // 2 if shift else 0
    hp, wp = -(-h // m) * m, -(-w // m) * m

    def rolled(i, j):
        return (i - s) % hp, (j - s) % wp

    def region(a, size):  # rows [0, size-m), [size-m, size-s), [size-s, size) of the rolled frame
        return 0 if a < size - m else (1 if a < size - s else 2)

    qa, qb = rolled(*query)
    out = torch.zeros(h, w, dtype=torch.bool)
    for i in range(h):
        for j in range(w):
            a, b = rolled(i, j)
            same_window = (a // m, b // m) == (qa // m, qb // m)
            same_region = not s or (region(a, hp), region(b, wp)) == (region(qa, hp), region(qb, wp))
            out[i, j] = same_window and same_region
    return out, s


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("query", [(5, 9), (15, 15), (0, 14)])
def test_swin_support_is_its_window(shift, query):
    module = build("swin", window=4, shift=shift)
    fp = module.footprint(*inputs(module), query)
    support, s = _swin_expected_support(HW, 4, shift, query)
    assert torch.equal((fp > 1e-30).all(0), support) and torch.equal((fp > 1e-30).any(0), support)
    # other regions of the shifted window hold at most exp(-100) of the weight, as the forward's mask gives them
    assert fp[:, ~support].max() < 1e-38


def test_quadtree_b_levels_cover_exactly_the_top_k_regions():
    module = build("quadtree", topk=3)
    args = inputs(module, hw=(16, 16))
    levels = module.footprint_levels(args[0], args[1], QUERY, None, None)  # coarsest first
    assert torch.allclose(torch.stack(levels).sum((2, 3)), torch.ones(3, module.heads), atol=1e-5)
    assert (levels[0] > 0).all()  # the coarsest level reads every key
    for level in range(1, 3):
        side = 2 ** (3 - level)  # pixels per key side at the parent level
        parent = levels[level - 1][:, ::side, ::side] * side * side  # (h, kh, kw) weights of the parent's keys
        top = parent.flatten(1).topk(3, dim=-1).indices  # the parent's top-K, recomputed here
        expected = torch.zeros(module.heads, parent.shape[1] * parent.shape[2], dtype=torch.bool)
        expected.scatter_(1, top, True)
        expected = expected.view(module.heads, *parent.shape[1:])
        expected = expected.repeat_interleave(side, 1).repeat_interleave(side, 2)  # the selected regions on pixels
        assert torch.equal(levels[level] > 0, expected)
    fp = module.footprint(args[0], args[1], QUERY)
    mix = torch.softmax(module.level_weight.detach(), 0)
    assert torch.allclose(fp, sum(m * lv for m, lv in zip(mix, levels, strict=True)), atol=1e-7)


def test_quadtree_a_moves_the_selected_regions_down_a_level():
    module = build("quadtree", topk=2, variant="A")
    x, hw, ctx, chw = inputs(module, cross=True)
    levels = module.footprint_levels(x, hw, QUERY, ctx, chw)
    assert torch.allclose(torch.stack(levels).sum((0, 2, 3)), torch.ones(module.heads), atol=1e-5)
    for level in range(1, 3):
        side = 2 ** (3 - level)
        refined = (levels[level] > 0).view(module.heads, 16 // side, side, 16 // side, side).any(4).any(2)
        coarse = levels[level - 1][:, ::side, ::side]
        assert refined.flatten(1).sum(1).eq(2).all()  # the children of exactly K keys
        assert (coarse[refined] == 0).all()  # left out of the coarse level, refined below


def test_splat_is_the_adjoint_of_bilinear_sampling():
    gen = torch.Generator().manual_seed(0)
    hw, samples = (7, 9), 20
    pos = torch.rand(1, samples, 2, generator=gen) * 2.4 - 1.2  # some samples partly off the map
    w = torch.rand(1, samples, generator=gen)
    img = torch.zeros(1, 1, *hw, dtype=torch.float64, requires_grad=True)
    s = F.grid_sample(img, pos.double()[:, None], mode="bilinear", padding_mode="zeros", align_corners=True)
    (s[0, 0, 0] * w[0].double()).sum().backward()
    assert torch.allclose(splat(w, pos, hw)[0].double(), img.grad[0, 0], atol=1e-6)


def test_deformable_footprint_lies_on_the_sample_neighbourhoods():
    module = build("deformable", groups=2)
    x, hw = inputs(module)
    fp = module.footprint(x, hw, QUERY)
    lin = module.proj.q
    q_map = (x @ lin.weight.T + lin.bias).transpose(1, 2).reshape(2, 16, *hw)
    pos = module.positions(module.offsets(q_map), hw).detach()  # (g, Hk, Wk, 2)
    p = pos.reshape(-1, 2)  # both groups' positions: each head reads channels of both
    px, py = (p[:, 0] + 1) / 2 * (hw[1] - 1), (p[:, 1] + 1) / 2 * (hw[0] - 1)
    near = torch.zeros(hw, dtype=torch.bool)
    for dy in (0, 1):
        for dx in (0, 1):
            yy, xx = (py.floor() + dy).long(), (px.floor() + dx).long()
            ok = (yy >= 0) & (yy < hw[0]) & (xx >= 0) & (xx < hw[1])
            near[yy[ok], xx[ok]] = True
    assert not (fp[:, ~near] > 0).any() and (fp[:, near].sum(1) > 0.5).all()


def test_pooling_conv_spreads_each_key_over_its_window():
    module = build("pooling")  # conv pooling, stride_kv 4
    x, hw = inputs(module)
    fp = module.footprint(x, hw, QUERY)
    assert torch.allclose(fp.sum((1, 2)), torch.ones(module.heads), atol=1e-5)
    read = torch.zeros(hw, dtype=torch.bool)  # pixels of the 3x3 windows at stride 4, padding 1
    for a in range(4):
        read[max(0, 4 * a - 1) : 4 * a + 2, :] |= True
    cols = torch.zeros(hw, dtype=torch.bool)
    for b in range(4):
        cols[:, max(0, 4 * b - 1) : 4 * b + 2] = True
    assert torch.equal((fp > 0).any(0), read & cols)


@pytest.mark.parametrize("name", attentions.MECHANISMS)
def test_every_mechanism_has_a_footprint_and_counts_its_keys(name):
    module = build(name, **({"window": 8} if name == "swin" else {}))
    args = inputs(module, cross=module.requires_context)
    fp = module.footprint(*args[:2], QUERY, *args[2:])
    assert (fp >= 0).all() and (fp.sum((1, 2)) <= 1 + 1e-5).all()
    keys = module.keys_per_query(args[1], args[3] if len(args) > 3 else None)
    assert 0 < keys <= 1 + (args[3][0] * args[3][1] if len(args) > 3 else HW[0] * HW[1])


def test_footprint_refuses_a_query_off_the_map_and_a_batch():
    module = build("full")
    x, hw = module.example_inputs(2, HW)
    with pytest.raises(ValueError, match="batch"):
        module.footprint(x, hw, QUERY)
    with pytest.raises(ValueError, match="outside"):
        module.footprint(x[:1], hw, (16, 0))
