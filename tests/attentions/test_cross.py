"""CLS-token cross attention (CrossViT): the steps, what changes, the link to full attention, counts and knobs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnbench import attentions

EPS = 1e-6


MECHANISM = "cross"
BUILD = dict(impl="reference")


def prepare(module: attentions.Attention) -> None:
    """Move the LayerNorms off their identity initialisation."""
    for p in module.parameters():
        if p.dim() == 1:
            p.add_(0.1 * torch.randn_like(p))


def inputs(m, hw, context_hw, batch=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1 + hw[0] * hw[1], m.dim, generator=gen)
    ctx = torch.randn(batch, 1 + context_hw[0] * context_hw[1], m.context_dim, generator=gen)
    return x, ctx


def by_hand(m, x, ctx):
    """CrossViT's fusion of x's CLS with ctx, written out step by step from the module's weights."""
    heads, cd = m.heads, m.context_dim
    d = cd // heads
    ln0, lin0 = m.to_context[0], m.to_context[2]
    c = F.linear(F.gelu(F.layer_norm(x[:, :1], (m.dim,), ln0.weight, ln0.bias, EPS)), lin0.weight, lin0.bias)
    t = F.layer_norm(torch.cat([c, ctx[:, 1:]], 1), (cd,), m.norm.weight, m.norm.bias, EPS)  # (B, 1 + M, Cc)
    q = F.linear(t[:, 0], m.proj.q.weight, m.proj.q.bias)  # (B, Cc)
    kv = F.linear(t, m.proj.kv.weight, m.proj.kv.bias)  # (B, 1 + M, 2Cc)
    k, v = kv[..., :cd], kv[..., cd:]
    heads_out = []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        scores = torch.einsum("bc,bmc->bm", q[:, sl], k[..., sl]) / d**0.5  # (B, 1 + M)
        heads_out.append(torch.einsum("bm,bmc->bc", scores.softmax(-1), v[..., sl]))  # (B, d)
    fused = c[:, 0] + F.linear(torch.cat(heads_out, -1), m.proj.out.weight, m.proj.out.bias)  # (B, Cc)
    ln1, lin1 = m.from_context[0], m.from_context[2]
    cls = F.linear(F.gelu(F.layer_norm(fused, (cd,), ln1.weight, ln1.bias, EPS)), lin1.weight, lin1.bias)
    return torch.cat([cls[:, None], x[:, 1:]], 1)


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize(
    ("dim", "context_dim", "heads", "hw", "context_hw"),
    [(16, 24, 2, (3, 5), (2, 7)), (24, 16, 4, (7, 3), (5, 5)), (16, 0, 2, (1, 1), (1, 1))],
)
def test_output_is_the_step_by_step_computation(build, impl, dim, context_dim, heads, hw, context_hw):
    m = build(dim=dim, heads=heads, impl=impl, context_dim=context_dim)
    x, ctx = inputs(m, hw, context_hw)
    torch.testing.assert_close(m(x, hw, ctx, context_hw), by_hand(m, x, ctx), rtol=1e-5, atol=1e-5)


def test_only_the_cls_row_changes(build):
    m = build(context_dim=24)
    hw, chw = (3, 5), (2, 7)
    x, ctx = inputs(m, hw, chw)
    out = m(x, hw, ctx, chw)
    assert out.shape == x.shape
    assert torch.equal(out[:, 1:], x[:, 1:])
    assert not torch.allclose(out[:, 0], x[:, 0])
    # and the patches get no gradient through the attention: theirs is the identity
    x.requires_grad_(True)
    (g,) = torch.autograd.grad(m(x, hw, ctx, chw)[:, 1:].sum(), x)
    assert torch.equal(g[:, 1:], torch.ones_like(g[:, 1:])) and torch.equal(g[:, 0], torch.zeros_like(g[:, 0]))


def test_the_context_cls_is_not_used_and_its_patches_are(build):
    m = build(context_dim=24)
    hw, chw = (3, 5), (2, 7)
    x, ctx = inputs(m, hw, chw)
    out = m(x, hw, ctx, chw)
    other_cls = ctx.clone()
    other_cls[:, 0] += 5.0
    torch.testing.assert_close(m(x, hw, other_cls, chw), out, rtol=0, atol=0)
    other_patch = ctx.clone()
    other_patch[:, 3] += 5.0
    assert not torch.allclose(m(x, hw, other_patch, chw)[:, 0], out[:, 0])


def test_cls_cross_attention_over_x_own_patches_is_full_attention(build):
    # context_dim == dim and a context whose patches are x's: the attention step is full
    # self attention over [projected CLS, patches], read at the CLS row (full attention of
    # the CLS query), with the same projection weights.
    m = build(dim=16, heads=2)
    full = attentions.build("full", dim=16, heads=2, impl="reference")
    full.proj.load_state_dict(m.proj.state_dict())
    hw = (4, 3)
    x, _ = inputs(m, hw, hw)
    ctx = torch.cat([torch.randn(2, 1, 16), x[:, 1:]], 1)  # a different CLS, x's patches
    c = m.to_context(x[:, :1])  # (B, 1, C)
    t = m.norm(torch.cat([c, x[:, 1:]], 1))  # (B, 1 + N, C)
    expected = c + full(t, (1, 1 + hw[0] * hw[1]))[:, :1]  # CLS row of full attention, plus the residual
    torch.testing.assert_close(m.fuse(x[:, :1], ctx), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m(x, hw, ctx, hw)[:, :1], m.from_context(expected), rtol=1e-5, atol=1e-5)


def test_macs_by_hand():
    # dim 8, context_dim 16, 2 heads of 8 at the context width; context 2x3 -> 1 + 6 = 7 keys
    m = attentions.build("cross", dim=8, heads=2, context_dim=16)
    to_context = 5 * 8 + 8 * 16  # LayerNorm and Linear of the CLS
    norm = 5 * 7 * 16  # LayerNorm of [CLS, 6 patches]
    projections = 16 * 16 + 7 * 16 * 32 + 16 * 16  # q of the CLS, k and v of 7 tokens, output of the CLS
    attention = 2 * 2 * 1 * 7 * 8  # one query against 7 keys, scores and weighted sum, 2 heads of 8
    back = 5 * 16 + 16 * 8
    expected = to_context + norm + projections + attention + back
    assert expected == 5256
    assert m.macs(1, (3, 4), (2, 3)) == expected
    assert m.macs(4, (3, 4), (2, 3)) == 4 * expected
    # x's own map does not change the cost; each context token adds 5 * 16 + 16 * 32 + 2 * 2 * 8
    assert m.macs(1, (30, 40), (2, 3)) == expected
    assert m.macs(1, (3, 4), (2, 4)) - expected == 2 * (5 * 16 + 16 * 32 + 2 * 2 * 8)
    # the default context map is used when none is given: (10, 10) * 0.7 -> (7, 7)
    assert m.macs(1, (10, 10)) == m.macs(1, (10, 10), (7, 7))


@pytest.mark.parametrize(
    ("hw", "scale", "expected"),
    [
        ((20, 20), 0.7, (14, 14)),
        ((14, 14), 20 / 14, (20, 20)),
        ((12, 20), 0.7, (8, 14)),
        ((4, 6), 0.7, (3, 4)),
        ((1, 1), 0.5, (1, 1)),
    ],
)
def test_default_context_map(hw, scale, expected):
    m = attentions.build("cross", dim=16, heads=2, context_scale=scale)
    assert m.default_context_hw(hw) == expected


def test_example_inputs_follow_the_other_branch():
    m = attentions.build("cross", dim=16, heads=2, context_dim=32, context_scale=0.5)
    assert (m.context_dim, m.context_prefix_tokens, m.prefix_tokens) == (32, 1, 1)
    x, hw, ctx, chw = m.example_inputs(3, (6, 10))
    assert x.shape == (3, 61, 16) and chw == (3, 5) and ctx.shape == (3, 16, 32)
    assert m(x, hw, ctx, chw).shape == x.shape


def test_context_is_required_and_checked():
    m = attentions.build("cross", dim=16, heads=2, context_dim=32)
    x, hw, ctx, chw = m.example_inputs(1, (3, 5))
    with pytest.raises(ValueError, match="context"):
        m(x, hw)
    with pytest.raises(ValueError, match="shape"):
        m(x, hw, torch.randn(1, ctx.shape[1], 16), chw)  # the context at this branch's width
    with pytest.raises(ValueError, match="shape"):
        m(x, hw, ctx[:, 1:], chw)  # the context without its CLS


@pytest.mark.parametrize(
    ("knobs", "heads", "match"),
    [
        (dict(context_dim=-8), 2, "context_dim"),
        (dict(context_scale=0.0), 2, "context_scale"),
        (dict(context_scale=float("nan")), 2, "context_scale"),
        (dict(context_dim=30), 4, "context_dim .*divisible by heads"),
        (dict(qkv_bias="maybe"), 2, "true or false"),
    ],
)
def test_bad_knobs_say_what_to_change(knobs, heads, match):
    with pytest.raises(attentions.KnobError, match=match):
        attentions.build("cross", dim=16, heads=heads, **knobs)
