"""PVT spatial-reduction attention: v1 conv reduction, v2 pooled reduction, the
equivalence with full attention at sr_ratio=1, cross attention, the analytic count
and the knobs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from attnbench.attentions.common import to_map, to_tokens
from attnbench.attentions.testing import parity

from attnbench import attentions

DIM, HEADS = 16, 2


MECHANISM = "pvt"
BUILD = dict(dim=DIM, heads=HEADS)


def randn(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_defaults_and_declarations(build):
    cls = attentions.get("pvt")
    assert cls.knob_defaults() == {"version": "v1", "sr_ratio": 4, "pool_size": 7, "qkv_bias": True, "sr_ratio_t": 1}
    assert cls.cost_knob == "sr_ratio" and cls.supports_cross
    module = build()
    assert isinstance(module.sr, torch.nn.Conv2d) and module.sr.kernel_size == (4, 4) and module.sr.stride == (4, 4)
    assert not hasattr(build(sr_ratio=1), "sr")  # no reduction, no parameters, like the official code
    v2 = build(version="v2")
    assert v2.pool.output_size == 7 and v2.sr.kernel_size == (1, 1) and isinstance(v2.act, torch.nn.GELU)


def test_v1_reduction_by_hand(build):
    # A conv that averages each channel over its 2x2 cell is average pooling: the keys
    # and values come from LayerNorm(avg_pool(map)), tokens in row-major order.
    module = build(sr_ratio=2)
    with torch.no_grad():
        module.sr.weight.copy_(torch.eye(DIM)[:, :, None, None].expand(DIM, DIM, 2, 2) / 4)
        module.sr.bias.zero_()
    x = randn(2, 4 * 6, DIM)
    expected = F.layer_norm(to_tokens(F.avg_pool2d(to_map(x, (4, 6)), 2)), (DIM,))  # (2, 6, C)
    torch.testing.assert_close(module.reduce(x, (4, 6)), expected)
    assert module.kv_hw((4, 6)) == (2, 3)


def test_v1_output_by_hand(build):
    # Identity q/kv/out projections and a constant reduced map: every query sees equal
    # keys, so softmax is uniform and each output token is the (single) reduced value.
    module = build(dim=4, heads=1, sr_ratio=2, impl="reference")
    with torch.no_grad():
        for lin in (module.proj.q, module.proj.out):
            lin.weight.copy_(torch.eye(4))
            lin.bias.zero_()
        module.proj.kv.weight.copy_(torch.cat([torch.eye(4), torch.eye(4)]))
        module.proj.kv.bias.zero_()
        module.sr.weight.zero_()
        module.sr.bias.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        module.norm.weight.fill_(2.0)
        module.norm.bias.fill_(0.5)
    x = randn(1, 4 * 4, 4)
    # LayerNorm of (1, 2, 3, 4): mean 2.5, variance 1.25.
    value = (torch.tensor([1.0, 2.0, 3.0, 4.0]) - 2.5) / (1.25 + 1e-5) ** 0.5 * 2.0 + 0.5
    torch.testing.assert_close(module(x, (4, 4)), value.expand(1, 16, 4))


def test_v1_floors_a_map_not_divisible_by_sr_ratio(build):
    # 5x7 with sr_ratio 2: keys from the top-left 4x6, the last row and column are dropped.
    module = build(sr_ratio=2, impl="reference")
    assert module.kv_hw((5, 7)) == (2, 3)
    assert not module.unsupported(1, (5, 7))
    x = randn(1, 35, DIM)
    out = module(x, (5, 7))
    last_row = x.clone()
    last_row[:, 4 * 7 + 2] += 1.0  # token (4, 2), in the dropped row
    changed = module(last_row, (5, 7))
    keep = [i for i in range(35) if i != 4 * 7 + 2]
    torch.testing.assert_close(changed[:, keep], out[:, keep])  # only its own query moved
    first = x.clone()
    first[:, 0] += 1.0  # token (0, 0), inside a reduced cell: every output moves
    assert not torch.allclose(module(first, (5, 7))[:, 1], out[:, 1])


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize(("hw", "context_hw"), [((5, 7), None), ((4, 6), (3, 9))])
def test_v1_sr_ratio_1_is_full_attention(build, impl, hw, context_hw):
    full = attentions.build("full", dim=DIM, heads=HEADS, impl=impl)
    pvt = build(seed=7, sr_ratio=1, impl=impl)
    pvt.load_state_dict(full.state_dict())  # the same q, kv and out weights (strict: nothing else)
    args = full.example_inputs(2, hw, cross=context_hw is not None, context_hw=context_hw)
    torch.testing.assert_close(pvt(*args), full(*args), rtol=1e-6, atol=1e-6)
    assert pvt.macs(2, hw, context_hw) == full.macs(2, hw, context_hw)


@pytest.mark.parametrize("size", [(7, 7), (5, 5)])
def test_v2_pool_size_equal_to_the_map(build, size):
    # The adaptive pool is then the identity: keys from GELU(LN(conv1x1(x))).
    module = build(version="v2", pool_size=size[0])
    x = randn(2, size[0] * size[1], DIM)
    m = F.conv2d(to_map(x, size), module.sr.weight, module.sr.bias)  # (2, C, H, W)
    expected = F.gelu(module.norm(to_tokens(m)))
    torch.testing.assert_close(module.reduce(x, size), expected)
    out = module(x, size)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_v2_pools_to_a_fixed_size(build):
    module = build(version="v2", pool_size=3, impl="reference")
    x = randn(1, 6 * 9, DIM)
    # 6x9 -> 3x3: adaptive pooling here is exact 2x3 averaging.
    m = F.conv2d(F.avg_pool2d(to_map(x, (6, 9)), (2, 3)), module.sr.weight, module.sr.bias)
    torch.testing.assert_close(module.reduce(x, (6, 9)), F.gelu(module.norm(to_tokens(m))))
    for hw in [(1, 1), (5, 9), (30, 18)]:  # smaller or larger than the pool: all run, 9 keys each
        assert module.kv_hw(hw) == (3, 3) and not module.unsupported(1, hw)
        assert torch.isfinite(module(randn(1, hw[0] * hw[1], DIM), hw)).all()


@pytest.mark.parametrize(
    ("knobs", "hw", "context_hw"),
    [
        ({"sr_ratio": 3}, (6, 10), None),
        ({"sr_ratio": 4}, (14, 21), None),
        ({"sr_ratio": 2}, (5, 7), (9, 15)),
        ({"version": "v2", "pool_size": 4}, (6, 10), None),
        ({"version": "v2"}, (5, 7), (11, 13)),
    ],
)
def test_fast_matches_reference_on_odd_maps(build, knobs, hw, context_hw):
    module = build(**knobs)
    args = module.example_inputs(2, hw, cross=context_hw is not None, context_hw=context_hw)
    errors = parity(module, "fast", torch.float32, args)
    assert "grad input[0]" in errors and "grad sr.weight" in errors and "grad norm.weight" in errors
    assert max(errors.values()) <= 1e-5, errors
    assert module(*args).shape == args[0].shape


@pytest.mark.parametrize("knobs", [{"sr_ratio": 2}, {"version": "v2", "pool_size": 3}])
def test_cross_reduces_the_context(build, knobs):
    module = build(impl="reference", **knobs)
    x, hw, ctx, chw = module.example_inputs(2, (3, 5), cross=True, context_hw=(8, 6))
    out = module(x, hw, ctx, chw)
    assert out.shape == x.shape
    q = module.proj.queries(x)  # (B, h, 15, d)
    k, v = module.proj.keys_values(module.reduce(ctx, chw))  # (B, h, M', d)
    assert k.shape[2] == (12 if knobs.get("version") != "v2" else 9)
    expected = module.proj.output(torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1) @ v)
    torch.testing.assert_close(out, expected)
    # Keys do not come from x: another query token changing leaves the rest alone.
    x2 = x.clone()
    x2[:, 0] += 1.0
    torch.testing.assert_close(module(x2, hw, ctx, chw)[:, 1:], out[:, 1:])


def test_unsupported_says_why(build):
    module = build(sr_ratio=4)
    (reason,) = module.unsupported(1, (3, 10))
    assert "sr_ratio=4" in reason and "3x10" in reason and "sr_ratio <= 3" in reason
    with pytest.raises(attentions.UnsupportedPoint, match="sr_ratio"):
        module(randn(1, 30, DIM), (3, 10))
    # In cross attention only the context is reduced: small queries are fine, a small context is not.
    assert not module.unsupported(1, (2, 2), (8, 8))
    (reason,) = module.unsupported(1, (8, 8), (8, 3))
    assert "context map 8x3" in reason
    assert not build(sr_ratio=1).unsupported(1, (1, 1))
    assert not build(version="v2").unsupported(1, (1, 1))


def test_macs_by_hand(build):
    # dim 8, 2 heads of d=4.
    v1 = build(dim=8, sr_ratio=2)
    # 4x6 map, N=24, keys 2x3 (M=6): conv 6*8*8*2*2, LayerNorm 5*6*8,
    # projections q 24*64 + kv 6*8*16 + out 24*64, attention 2 heads * 2 * 24*6*4.
    assert v1.macs(1, (4, 6)) == 1536 + 240 + (1536 + 768 + 1536) + 2304 == 7920
    # 5x7 floors to the same 2x3 keys; N=35.
    assert v1.macs(1, (5, 7)) == 1536 + 240 + (2240 + 768 + 2240) + 2 * 2 * 35 * 6 * 4 == 10384
    v2 = build(dim=8, version="v2", pool_size=3)
    # 4x6 map pooled to 3x3: pool 1 per input element 8*24, conv1x1 9*8*8, LayerNorm 5*9*8,
    # projections 1536 + 9*8*16 + 1536, attention 2 * 2 * 24*9*4.
    assert v2.macs(1, (4, 6)) == 192 + 576 + 360 + (1536 + 1152 + 1536) + 3456 == 8808
    # cross: the 4x6 queries against a 10x10 context reduced by 2 to 5x5
    assert v1.macs(1, (4, 6), (10, 10)) == 25 * 8 * 8 * 4 + 5 * 25 * 8 + (1536 + 25 * 128 + 1536) + 2 * 2 * 24 * 25 * 4
    assert v1.macs(3, (4, 6)) == 3 * 7920


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize(
    ("knobs", "context_hw"), [({"sr_ratio": 2}, None), ({"sr_ratio": 3}, (7, 10)), ({"version": "v2"}, None)]
)
def test_macs_match_fvcore_on_the_reference(build, knobs, context_hw):
    # fvcore does not count SDPA, so the plain math path is the one to compare.
    module = build(dim=8, impl="reference", **knobs)
    args = module.example_inputs(2, (5, 7), cross=context_hw is not None, context_hw=context_hw)
    from fvcore.nn import FlopCountAnalysis  # imported here: it warns about torch.jit on import

    count = FlopCountAnalysis(module, args)
    count.unsupported_ops_warnings(False)
    count.uncalled_modules_warnings(False)
    assert count.total() == module.macs(2, (5, 7), context_hw)


@pytest.mark.parametrize(
    ("knobs", "match"),
    [
        ({"sr_ratio": 0}, "sr_ratio"),
        ({"sr_ratio": -2}, "sr_ratio"),
        ({"sr_ratio": "four"}, "sr_ratio"),
        ({"pool_size": 0}, "pool_size"),
        ({"version": "v3"}, "version"),
        ({"version": 2}, "version"),
    ],
)
def test_bad_knobs_say_what_to_change(build, knobs, match):
    with pytest.raises(attentions.KnobError, match=match):
        build(**knobs)


def test_knob_dataclass_checks_directly():
    knobs_cls = attentions.get("pvt").Knobs
    with pytest.raises(attentions.KnobError, match="1 means no reduction"):
        knobs_cls(sr_ratio=0)
    with pytest.raises(attentions.KnobError, match="version"):
        knobs_cls(version="v3")  # type: ignore[arg-type]
