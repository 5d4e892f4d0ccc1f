"""Linear attention: the definition by hand, associative form against the quadratic one,
half-precision safety at many keys, cross attention, the analytic count and the knobs."""

from __future__ import annotations

import math

import pytest
import torch
from attnbench.attentions.linear import feature_map, linear_attention, linear_attention_reference
from attnbench.attentions.testing import TOLERANCE, parity, rel_error

from attnbench import attentions

BOTH = [linear_attention_reference, linear_attention]


MECHANISM = "linear"


def set_identity_projections(module: attentions.Attention) -> None:
    """q = x, k = v = x, out = identity: the module reduces to the bare formula."""
    c = module.dim
    with torch.no_grad():
        module.proj.q.weight.copy_(torch.eye(c))
        module.proj.kv.weight.copy_(torch.cat([torch.eye(c), torch.eye(c)]))
        module.proj.out.weight.copy_(torch.eye(c))
        for lin in (module.proj.q, module.proj.kv, module.proj.out):
            lin.bias.zero_()


@pytest.mark.parametrize("fn", BOTH, ids=["reference", "fast"])
def test_formula_by_hand(fn):
    # One query, phi(q) = (exp(log 0.5), 0 + 1) = (0.5, 1).
    q = torch.tensor([[[math.log(0.5), 0.0]]])  # (1, 1, d=2)
    # phi(k1) = (1, 1), phi(k2) = (2, 3): kernel values 0.5 + 1 = 1.5 and 1 + 3 = 4.
    k = torch.tensor([[[0.0, 0.0], [1.0, 2.0]]])  # (1, M=2, 2)
    v = torch.tensor([[[11.0, -2.0], [0.0, 9.0]]])  # (1, 2, dv=2)
    expected = torch.tensor([[[1.5 * 11 / 5.5, (1.5 * -2 + 4 * 9) / 5.5]]])
    torch.testing.assert_close(fn(q, k, v, eps=0.0), expected)
    # eps enters the normaliser only: 1.5 * 11 / (5.5 + 0.5)
    assert fn(q, k, v, eps=0.5)[0, 0, 0].item() == pytest.approx(1.5 * 11 / 6.0)


def test_feature_map_is_elu_plus_one():
    x = torch.tensor([-2.0, 0.0, 3.0])
    torch.testing.assert_close(feature_map(x), torch.tensor([math.exp(-2.0), 1.0, 4.0]))


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_module_with_identity_projections_is_the_formula(build, impl):
    module = build(dim=4, heads=1, impl=impl)
    set_identity_projections(module)
    x = torch.randn(1, 6, 4)
    expected = linear_attention_reference(x[:, None], x[:, None], x[:, None], 1e-6)[:, 0]  # (1, 6, 4)
    torch.testing.assert_close(module(x, (2, 3)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("hw", "context_hw"), [((5, 7), None), ((6, 10), None), ((5, 7), (3, 11)), ((4, 4), (9, 6))])
def test_fast_matches_reference_in_float32(build, hw, context_hw):
    module = build()
    args = module.example_inputs(2, hw, cross=context_hw is not None, context_hw=context_hw)
    errors = parity(module, "fast", torch.float32, args)
    assert "grad input[0]" in errors and "grad proj.kv.weight" in errors
    assert max(errors.values()) <= 1e-5, errors
    ref, fast = build(impl="reference"), build(impl="fast")
    torch.testing.assert_close(fast(*args), ref(*args), rtol=1e-5, atol=1e-5)


# A context of 300 x 300 = 90,000 keys: the plain sum over the keys of phi(k) passes
# float16's maximum (65,504), so the unscaled form would overflow.
LARGE_HW, LARGE_CONTEXT_HW = (3, 5), (300, 300)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_many_keys_in_half_precision_stay_finite_and_close(build, dtype):
    module = build()
    x, hw, ctx, chw = module.example_inputs(1, LARGE_HW, cross=True, context_hw=LARGE_CONTEXT_HW)
    ctx = ctx + 2.0  # values with a nonzero mean, so that sum_j phi(k_j) v_j grows with M too

    # The case really is out of float16's range without the 1/M scaling.
    with torch.no_grad():
        k, v = build().half().proj.keys_values(ctx.half())  # (1, h, M, d)
    assert torch.isinf(feature_map(k).sum(dim=-2)).any()
    assert torch.isinf(feature_map(k).transpose(-2, -1) @ v).any()

    expected = build(impl="reference")(x, hw, ctx, chw)
    low = build().to(dtype)
    x_low = x.to(dtype).requires_grad_(True)
    out = low(x_low, hw, ctx.to(dtype), chw)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    assert rel_error(out, expected) <= TOLERANCE[dtype]
    out.float().square().mean().backward()
    assert torch.isfinite(x_low.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in low.parameters())


def test_cross_takes_keys_and_values_from_the_context(build):
    module = build(impl="reference")
    x, hw, ctx, chw = module.example_inputs(2, (3, 4), cross=True, context_hw=(5, 2))
    out = module(x, hw, ctx, chw)
    assert out.shape == x.shape
    # By hand from the projections: queries from x, keys and values from the context.
    q = module.proj.queries(x)
    k, v = module.proj.keys_values(ctx)
    torch.testing.assert_close(out, module.proj.output(linear_attention_reference(q, k, v, 1e-6)))
    # Each query sees only the context: changing another query token leaves it alone.
    x2 = x.clone()
    x2[:, 0] += 1.0
    out2 = module(x2, hw, ctx, chw)
    torch.testing.assert_close(out2[:, 1:], out[:, 1:])
    assert not torch.allclose(out2[:, 0], out[:, 0])
    assert not torch.allclose(module(x, hw, ctx.flip(1), chw), out)


def test_macs_by_hand(build):
    # dim 8, 2 heads of d=4, a 2x3 map: N = M = 6.
    fast, ref = build(dim=8, impl="fast"), build(dim=8, impl="reference")
    projections = 6 * 8 * 8 + 6 * 8 * 16 + 6 * 8 * 8  # q, kv, out = 1536
    # fast per head: phi(K)^T V (6*4*4) + phi(Q) KV (6*4*4) + phi(Q) . mean phi(K) (6*4)
    assert fast.macs(1, (2, 3)) == projections + 2 * (96 + 96 + 24) == 1968
    # reference per head: kernel matrix 6*6*4 and weighted sum 6*6*4
    assert ref.macs(1, (2, 3)) == projections + 2 * (144 + 144) == 2112
    # cross with a 4x5 context: M = 20
    assert fast.macs(1, (2, 3), (4, 5)) == (384 + 20 * 128 + 384) + 2 * (20 * 16 + 6 * 16 + 6 * 4) == 4208
    assert fast.macs(3, (2, 3)) == 3 * 1968


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fvcore traces with torch.jit
@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("context_hw", [None, (3, 4)])
def test_macs_match_fvcore(build, impl, context_hw):
    module = build(dim=8, impl=impl)
    args = module.example_inputs(2, (5, 7), cross=context_hw is not None, context_hw=context_hw)
    from fvcore.nn import FlopCountAnalysis  # imported here: it warns about torch.jit on import

    count = FlopCountAnalysis(module, args)
    count.unsupported_ops_warnings(False)
    count.uncalled_modules_warnings(False)
    assert count.total() == module.macs(2, (5, 7), context_hw)


@pytest.mark.parametrize("bad", [-1e-3, 1.0, "tiny", True])
def test_bad_eps_says_what_to_change(build, bad):
    with pytest.raises(attentions.KnobError, match="eps"):
        build(eps=bad)


def test_knobs_and_declarations(build):
    module = build(eps=1e-4, qkv_bias=False)
    assert module.eps == 1e-4 and module.proj.q.bias is None
    cls = attentions.get("linear")
    assert cls.cost_knob is None and cls.complexity == "O(N)" and cls.supports_cross
    assert set(cls.impls) == {"reference", "fast"}
    assert build(eps="1e-5").eps == 1e-5  # as the CLI passes it
