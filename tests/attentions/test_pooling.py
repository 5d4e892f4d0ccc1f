"""MViTv2 pooling attention: no pooling is full attention, the decomposed bias pair by
pair, the table resizing by hand, pooled shapes, residual pooling, the analytic
count and the knobs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from attnbench.attentions.common import attend, merge_heads
from attnbench.attentions.relpos import mvit_bias, mvit_index, resize_table
from attnbench.attentions.testing import assert_parity, rel_error

from attnbench import attentions

IMPLS = ["reference", "fast"]


MECHANISM = "pooling"


def prepare(module: attentions.Attention) -> None:
    """Relative-position tables large enough to matter (the init has std 0.02)."""
    if module.knobs.rel_pos:
        module.rel_pos_h.normal_()
        module.rel_pos_w.normal_()


def row(q: int, k: int, hq: int, hk: int) -> int:
    """MViTv2's table row for query coordinate hq and key coordinate hk on one axis."""
    q_ratio, k_ratio = max(k / q, 1.0), max(q / k, 1.0)
    return int(hq * q_ratio - hk * k_ratio + (k - 1) * k_ratio)


def resize_by_hand(table: torch.Tensor, length: int) -> torch.Tensor:
    """1-D linear interpolation with half-pixel centres (align_corners=False), row by row."""
    old = table.shape[0]
    out = torch.empty(length, table.shape[1])
    for i in range(length):
        src = max((i + 0.5) * old / length - 0.5, 0.0)
        lo = min(int(src), old - 1)
        hi = min(lo + 1, old - 1)
        frac = src - lo
        out[i] = (1 - frac) * table[lo] + frac * table[hi]
    return out


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("hw", [(6, 6), (5, 7)])
def test_no_pooling_no_rel_pos_no_residual_is_full_attention(build, impl, hw):
    module = build(mode="none", stride_q=1, stride_kv=1, rel_pos=False, residual_pooling=False, impl=impl)
    full = attentions.build("full", dim=16, heads=2, impl="reference")
    full.load_state_dict(module.state_dict())  # the same projections, nothing else
    x, _ = module.example_inputs(2, hw)
    assert rel_error(module(x, hw), full(x, hw)) < 1e-5


@pytest.mark.parametrize(("q_hw", "k_hw"), [((4, 6), (2, 3)), ((3, 5), (3, 5)), ((2, 3), (4, 7))])
@pytest.mark.parametrize("resize", [False, True])
def test_decomposed_bias_pair_by_pair(q_hw, k_hw, resize):
    torch.manual_seed(0)
    (qh, qw), (kh, kw), d = q_hw, k_hw, 3
    need_h, need_w = 2 * max(qh, kh) - 1, 2 * max(qw, kw) - 1
    table_h = torch.randn(5 if resize else need_h, d)
    table_w = torch.randn(5 if resize else need_w, d)
    q = torch.randn(2, 2, qh * qw, d)  # (B, h, Nq, d)
    got = mvit_bias(q, q_hw, k_hw, table_h, table_w)  # (B, h, Nq, Nk)
    rh = resize_by_hand(table_h, need_h) if resize else table_h
    rw = resize_by_hand(table_w, need_w) if resize else table_w
    expected = torch.empty(2, 2, qh * qw, kh * kw)
    for i in range(qh * qw):
        for j in range(kh * kw):
            r_h = rh[row(qh, kh, i // qw, j // kw)]
            r_w = rw[row(qw, kw, i % qw, j % kw)]
            expected[:, :, i, j] = q[:, :, i] @ r_h + q[:, :, i] @ r_w
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_table_rows_with_different_strides():
    # 8 queries against 4 keys: key coordinates stretched by 2, rows 0..14 of a 15-row table
    idx = mvit_index(8, 4)
    assert idx[0].tolist() == [6, 4, 2, 0]
    assert idx[7].tolist() == [13, 11, 9, 7]
    assert mvit_index(4, 8)[0].tolist() == [7, 6, 5, 4, 3, 2, 1, 0]


def test_tables_are_sized_for_rel_pos_size_and_not_resized_there(build):
    module = build(stride_kv=4, rel_pos_size=56)
    # 56x56 queries, 14x14 keys: 2 * 56 - 1 rows, as MViTv2's first stage
    assert module.rel_pos_h.shape == module.rel_pos_w.shape == (111, 8)
    assert resize_table(module.rel_pos_h, 111) is module.rel_pos_h
    small = build(stride_q=2, stride_kv=4, rel_pos_size=14)  # 7x7 queries, 4x4 keys
    assert small.rel_pos_h.shape == (13, 8)


def test_resize_table_matches_linear_interpolation_by_hand():
    table = torch.randn(7, 4)
    torch.testing.assert_close(resize_table(table, 13), resize_by_hand(table, 13))
    torch.testing.assert_close(resize_table(table, 3), resize_by_hand(table, 3))


@pytest.mark.parametrize(
    ("hw", "stride_q", "stride_kv", "q_hw", "kv_hw"),
    [
        ((8, 8), 2, 4, (4, 4), (2, 2)),
        ((7, 10), 2, 2, (4, 5), (4, 5)),  # odd and non-square: ceil(H / s)
        ((13, 9), 1, 4, (13, 9), (4, 3)),
        ((2, 3), 2, 4, (1, 2), (1, 1)),  # map smaller than the kernel and the stride
        ((1, 1), 2, 4, (1, 1), (1, 1)),
    ],
)
def test_pooled_shapes(build, hw, stride_q, stride_kv, q_hw, kv_hw):
    module = build(stride_q=stride_q, stride_kv=stride_kv)
    assert module.output_hw(hw) == q_hw and module.kv_hw(hw) == kv_hw
    x, _ = module.example_inputs(2, hw)
    out = module(x, hw)
    assert out.shape == (2, q_hw[0] * q_hw[1], 16)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("mode", ["conv", "avg", "max"])
def test_fast_matches_reference_with_query_stride(build, mode):
    module = build(mode=mode, stride_q=2, stride_kv=2)
    args = module.example_inputs(2, (7, 10))
    assert_parity(module, "fast", torch.float32, args)


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_avg_and_max_pool_each_head_map(build, mode):
    module = build(mode=mode, stride_q=2, stride_kv=3, rel_pos=False, impl="reference")
    x, hw = module.example_inputs(1, (7, 9))
    pool = F.avg_pool2d if mode == "avg" else F.max_pool2d
    q = module.proj.queries(x)  # (1, h, N, d)
    k, v = module.proj.keys_values(x)

    def pooled(t: torch.Tensor, stride: int) -> torch.Tensor:
        maps = [pool(t[0, i].t().reshape(1, -1, *hw), 3, stride, 1) for i in range(module.heads)]  # (1, d, h', w')
        return torch.stack([m.flatten(2)[0].t() for m in maps])[None]  # (1, h, N', d)

    q, k, v = pooled(q, 2), pooled(k, 3), pooled(v, 3)
    expected = module.proj.output(attend(q, k, v, math=True) + q)
    torch.testing.assert_close(module(x, hw), expected, rtol=1e-5, atol=1e-5)


def test_conv_pooling_is_depthwise_shared_across_heads_then_layernorm(build):
    module = build(heads=2, stride_q=2)
    assert module.pool_q.weight.shape == (8, 1, 3, 3) and module.pool_q.stride == (2, 2)
    assert module.pool_k.stride == module.pool_v.stride == (4, 4)
    assert module.norm_q.normalized_shape == (8,)
    # the key norm has no additive bias (softmax ignores it)
    assert module.norm_k.bias is None and module.norm_v.bias is not None


@pytest.mark.parametrize("dim_out", [0, 24])
def test_residual_pooling_adds_the_pooled_queries(build, dim_out):
    with_res = build(stride_q=2, stride_kv=2, dim_out=dim_out)
    without = build(stride_q=2, stride_kv=2, residual_pooling=False, dim_out=dim_out)
    without.load_state_dict(with_res.state_dict())
    x, hw = with_res.example_inputs(1, (6, 8))
    q, _ = with_res._pool(with_res.proj.queries(x), hw, with_res.pool_q, with_res.norm_q)  # (1, h, 12, d)
    diff = with_res(x, hw) - without(x, hw)
    torch.testing.assert_close(diff, merge_heads(q) @ with_res.proj.out.weight.t(), rtol=1e-5, atol=1e-5)


def test_rel_pos_changes_the_output_and_trains_its_tables(build):
    with_rel = build(stride_kv=2)
    without = build(stride_kv=2, rel_pos=False)
    without.load_state_dict(with_rel.state_dict(), strict=False)
    x, hw = with_rel.example_inputs(1, (6, 10))
    out = with_rel(x, hw)
    assert rel_error(out, without(x, hw)) > 1e-3
    out.square().sum().backward()  # through the resizing (6x10 is not the 56x56 reference)
    assert with_rel.rel_pos_h.grad.abs().sum() > 0 and with_rel.rel_pos_w.grad.abs().sum() > 0


def test_macs_by_hand():
    # dim 32, 2 heads of 16, 8x8 map, stride_kv 2: 64 queries, 4x4 = 16 keys.
    module = attentions.build("pooling", dim=32, heads=2, stride_kv=2)
    projections = 64 * 32 * 32 + 64 * 32 * 64 + 64 * 32 * 32
    pool_q = 2 * (64 * 16 * 9 + 5 * 64 * 16)  # per head: depthwise 3x3 conv + LayerNorm of 64 x 16
    pool_kv = 2 * 2 * (16 * 16 * 9 + 5 * 16 * 16)  # keys and values, 16 tokens each
    attention = 2 * 2 * 64 * 16 * 16  # scores and weighted sum
    rel_pos = 2 * 64 * (4 + 4) * 16  # q . R_h over 4 key rows, q . R_w over 4 key columns
    assert module.macs(1, (8, 8)) == projections + pool_q + pool_kv + attention + rel_pos == 387_072
    # stride_q 2, avg pooling, no rel_pos: 16 queries, output projection of 16 tokens
    avg = attentions.build("pooling", dim=32, heads=2, mode="avg", stride_q=2, stride_kv=2, rel_pos=False)
    expected = 64 * 32 * 32 + 64 * 32 * 64 + 16 * 32 * 32 + 2 * 9 * (16 + 2 * 16) * 16 + 2 * 2 * 16 * 16 * 16
    assert avg.macs(3, (8, 8)) == 3 * expected


@pytest.mark.parametrize("mode", ["conv", "max"])
def test_dim_out_widens_q_k_v_heads_and_output(build, mode):
    # dim 16 in, dim_out 48 with 2 heads of 24: MViTv2's qkv Linear(dim, 3 * dim_out), pooling at head_dim 24.
    module = build(dim=16, heads=2, dim_out=48, mode=mode, stride_q=2, stride_kv=2, rel_pos_size=8)
    assert module.output_dim == 48 and module.head_dim == 24 and module.dim == 16
    assert module.proj.q.weight.shape == (48, 16)
    assert module.proj.kv.weight.shape == (96, 16)
    assert module.proj.out.weight.shape == (48, 48)
    assert module.rel_pos_h.shape == module.rel_pos_w.shape == (2 * 4 - 1, 24)  # 8x8 map, 4x4 pooled
    if mode == "conv":
        assert module.pool_q.weight.shape == module.pool_k.weight.shape == (24, 1, 3, 3)
        assert module.norm_q.normalized_shape == module.norm_k.normalized_shape == (24,)
    x, hw = module.example_inputs(2, (8, 8))
    assert x.shape == (2, 64, 16)  # the input stays dim wide
    out = module(x, hw)
    assert out.shape == (2, 16, 48)
    out.square().sum().backward()
    assert all(p.grad is not None for p in module.parameters())


def test_dim_out_equal_to_dim_is_the_default(build):
    plain = build(stride_q=2, stride_kv=2)
    same = build(stride_q=2, stride_kv=2, dim_out=16)
    same.load_state_dict(plain.state_dict())  # the same parameters, shape for shape
    x, hw = plain.example_inputs(1, (6, 6))
    torch.testing.assert_close(same(x, hw), plain(x, hw))
    assert same.macs(1, hw) == plain.macs(1, hw)


@pytest.mark.parametrize("mode", ["conv", "avg"])
def test_fast_matches_reference_with_dim_out(build, mode):
    module = build(dim=16, heads=2, dim_out=32, mode=mode, stride_q=2, stride_kv=2)
    args = module.example_inputs(2, (7, 10))
    assert_parity(module, "fast", torch.float32, args)


def test_dim_out_by_hand(build):
    # The same heads computed from the widened projections, one head at a time, by hand.
    module = build(dim=8, heads=2, dim_out=12, mode="avg", stride_q=2, stride_kv=2, rel_pos=False, impl="reference")
    x, hw = module.example_inputs(1, (4, 6))
    qkv_w = torch.cat([module.proj.q.weight, module.proj.kv.weight])  # (3 * 12, 8)
    qkv_b = torch.cat([module.proj.q.bias, module.proj.kv.bias])
    q, k, v = (x[0] @ qkv_w.t() + qkv_b).split(12, dim=-1)  # (24, 12) each
    heads = []
    for i in range(2):
        cols = slice(6 * i, 6 * (i + 1))

        def pooled(t: torch.Tensor, cols: slice = cols) -> torch.Tensor:
            return F.avg_pool2d(t[:, cols].t().reshape(1, 6, *hw), 3, 2, 1).flatten(2)[0].t()  # (6 tokens, 6)

        qi, ki, vi = pooled(q), pooled(k), pooled(v)
        probs = torch.softmax(qi @ ki.t() / 6**0.5, dim=-1)
        heads.append(probs @ vi + qi)
    expected = torch.cat(heads, dim=-1) @ module.proj.out.weight.t() + module.proj.out.bias  # (6, 12)
    torch.testing.assert_close(module(x, hw)[0], expected, rtol=1e-5, atol=1e-5)


def test_macs_by_hand_with_dim_out():
    # dim 32 -> dim_out 64, 2 heads of 32, 8x8 map, stride_q 2 (16 queries), stride_kv 2 (16 keys).
    module = attentions.build("pooling", dim=32, heads=2, dim_out=64, stride_q=2, stride_kv=2)
    projections = 64 * 32 * 64 + 64 * 32 * 128 + 16 * 64 * 64  # q, kv of the 64 tokens; output of the 16
    pool = 3 * 2 * (16 * 32 * 9 + 5 * 16 * 32)  # q, k, v: per head a depthwise 3x3 conv + LayerNorm, 16 x 32
    attention = 2 * 2 * 16 * 16 * 32
    rel_pos = 2 * 16 * (4 + 4) * 32
    assert module.macs(1, (8, 8)) == projections + pool + attention + rel_pos == 542_720
    assert module.proj.macs(1, 64, 64) == 64 * 32 * 64 + 64 * 32 * 128 + 64 * 64 * 64


def test_heads_split_dim_out_so_dim_need_not_divide(build):
    # 32 -> 48 channels in 3 heads of 16 (32 is not a multiple of 3; MViTv2's qkv projects from it)
    module = build(dim=32, heads=3, dim_out=48, stride_q=2, stride_kv=2)
    assert module.head_dim == 16
    x, hw = module.example_inputs(1, (4, 4))
    assert module(x, hw).shape == (1, 4, 48)
    with pytest.raises(attentions.KnobError, match=r"dim \(32\) must be divisible by heads \(3\)"):
        attentions.build("pooling", dim=32, heads=3)


def test_dim_out_from_the_command_line_string():
    assert attentions.build("pooling", dim=16, heads=2, dim_out="32").output_dim == 32
    assert attentions.build("pooling", dim=16, heads=2).output_dim == 16


@pytest.mark.parametrize(
    ("knobs", "match"),
    [
        ({"dim_out": 33}, r"output_dim \(33\) must be divisible by heads \(2\); choose heads from \[1, 3, 11, 33\]"),
        ({"dim_out": -16}, "dim_out.*non-negative"),
        ({"mode": "none"}, "stride_kv=1"),  # the default stride_kv is 4
        ({"mode": "median"}, "'conv', 'avg', 'max', 'none'"),
        ({"stride_q": 0}, "stride_q"),
        ({"stride_kv": "two"}, "stride_kv"),
        ({"rel_pos_size": -1}, "rel_pos_size"),
    ],
)
def test_bad_knobs_say_what_to_change(knobs, match):
    with pytest.raises(attentions.KnobError, match=match):
        attentions.build("pooling", dim=16, heads=2, **knobs)


def test_knobs_checked_when_built_directly():
    from attnbench.attentions.pooling import PoolingKnobs

    with pytest.raises(attentions.KnobError, match="mode"):
        PoolingKnobs(mode="median")  # type: ignore[arg-type]


def test_window_over_the_whole_map_is_global_and_windows_do_not_mix():
    """HWin: a window as large as the map is global attention; smaller windows keep queries in theirs."""
    torch.manual_seed(0)
    knobs = dict(stride_q=2, stride_kv=2, rel_pos_size=8)
    glob = attentions.build("pooling", dim=32, heads=2, **knobs)
    whole = attentions.build("pooling", dim=32, heads=2, window=8, **knobs)
    whole.load_state_dict(glob.state_dict())
    x, hw = glob.example_inputs(2, (8, 8))
    torch.testing.assert_close(whole(x, hw), glob(x, hw))
    win = attentions.build("pooling", dim=32, heads=2, window=4, **knobs).eval()
    moved = x.clone()
    moved[:, 0] += 1.0  # a token of the top-left 4x4 window
    with torch.no_grad():
        diff = (win(x, hw) - win(moved, hw)).abs().amax(-1)[0].reshape(4, 4)  # output map 4x4, windows of 2x2
    assert diff[:2, :2].gt(0).any() and not diff[2:, :].gt(0).any() and not diff[:, 2:].gt(0).any()
    assert win.macs(2, (8, 8)) < glob.macs(2, (8, 8))
    assert win.unsupported(1, (6, 6)) and "window 4" in win.unsupported(1, (6, 6))[0]
    assert not win.unsupported(1, (8, 8))


@pytest.mark.parametrize(
    ("kernel", "stride", "hw", "pooled"),
    [(1, 2, (7, 10), (4, 5)), (5, 2, (7, 10), (4, 5)), (5, 1, (6, 6), (6, 6)), (7, 4, (9, 9), (3, 3))],
)
def test_pooling_kernel_sets_the_window_and_keeps_the_stride(build, kernel, stride, hw, pooled):
    module = build(kernel=kernel, stride_q=stride, stride_kv=stride)
    assert module.pool_k.kernel_size == (kernel, kernel) and module.pool_k.padding == (kernel // 2, kernel // 2)
    assert module.output_hw(hw) == pooled and module.kv_hw(hw) == pooled  # padding kernel // 2: ceil(H / s)
    x, _ = module.example_inputs(1, hw)
    assert module(x, hw).shape == (1, pooled[0] * pooled[1], 16)


def test_a_wider_kernel_pools_further_neighbours(build):
    # key pooling at stride 1 without position bias: a change at pixel (0, 0) reaches the pooled key of pixel (0, 2)
    # through a 5x5 kernel and not through a 3x3 one; the queries' pooling is a 1x1 kernel in neither
    def moved(kernel: int) -> bool:
        torch.manual_seed(0)
        m = build(kernel=kernel, stride_q=1, stride_kv=1, rel_pos=False)
        x, _ = m.example_inputs(1, (6, 6))
        k0 = m._pool(m.proj.keys_values(x)[0], (6, 6), m.pool_k, None)[0]
        x2 = x.clone()
        x2[0, 0] += 1.0
        k1 = m._pool(m.proj.keys_values(x2)[0], (6, 6), m.pool_k, None)[0]
        return not torch.allclose(k0[:, :, 2], k1[:, :, 2])  # token (0, 2)

    assert moved(5) and not moved(3)


@pytest.mark.parametrize("kernel", [0, 2, -3, True, 1.5])
def test_a_kernel_that_is_not_odd_and_positive_is_refused(kernel):
    with pytest.raises(attentions.KnobError, match="kernel"):
        attentions.build("pooling", dim=16, heads=2, kernel=kernel)


def test_kernel_macs_match_the_counted_ones():
    from attnbench.bench.flops import count

    for kernel in (1, 5):
        for mode in ("conv", "avg"):
            # without the position tables, whose resizing the analytic count leaves out (batch-independent)
            m = attentions.build("pooling", dim=16, heads=2, kernel=kernel, mode=mode, stride_kv=2, rel_pos=False)
            m = m.eval()
            x, hw = m.example_inputs(1, (8, 8))
            assert count(m, (x, hw), flop_counter=False, backward=False).macs == m.macs(1, (8, 8))


@pytest.mark.parametrize(
    "knobs,hw",
    [
        ({}, (16, 12)),
        ({"stride_q": 2, "stride_kv": 2}, (12, 16)),
        ({"window": 8, "stride_kv": 2}, (16, 16)),
        ({"mode": "avg", "stride_kv": 1, "residual_pooling": False}, (6, 10)),
    ],
    ids=["default", "strided-q", "window", "avg-stride1"],
)
def test_decomposed_fast_path_matches_the_reference_in_float64(knobs, hw):
    """The fast path's backward on the CPU (relpos.mvit_attend: the decomposed terms added in place,
    the backward written out) equals the reference's output and every gradient to float64 precision."""
    torch.manual_seed(0)
    ref = attentions.build("pooling", dim=24, heads=3, impl="reference", **knobs).double()
    fast = copy.deepcopy(ref)
    fast.impl = "fast"
    x = torch.randn(2, hw[0] * hw[1], 24, dtype=torch.float64)
    results = []
    for module in (ref, fast):
        xi = x.clone().requires_grad_(True)
        out = module(xi, hw)
        out.backward(torch.ones_like(out).normal_(generator=torch.Generator().manual_seed(1)))
        grads = {n: p.grad for n, p in module.named_parameters()}
        results.append((out.detach(), xi.grad, grads))
    (o_ref, x_ref, g_ref), (o_fast, x_fast, g_fast) = results
    assert fast._decomposed(torch.zeros(1, dtype=torch.float64, requires_grad=True))
    torch.testing.assert_close(o_fast, o_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x_fast, x_ref, rtol=1e-10, atol=1e-12)
    for name, g in g_ref.items():
        torch.testing.assert_close(g_fast[name], g, rtol=1e-10, atol=1e-12, msg=name)
