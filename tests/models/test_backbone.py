"""The backbone's pieces do what they say."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from attnbench.models.backbone import Block, pool_residual
from attnbench.models.layers import DropPath, Merge

from attnbench import models


def test_block_is_pre_norm_attention_then_mlp():
    torch.manual_seed(0)
    blk = Block(8, 8, 2, "full", {}, 2.0, conv_mlp=False, drop_path=0.0, eps=1e-6).eval()
    x, hw = torch.randn(2, 12, 8), (3, 4)
    y = x + blk.attn(blk.norm1(x), hw)
    m = blk.mlp
    y = y + m.fc2(F.gelu(m.fc1(blk.norm2(y))))
    out, out_hw = blk(x, hw)
    assert out_hw == hw
    torch.testing.assert_close(out, y)


def test_prefix_tokens_skip_a_mechanism_without_prefix():
    torch.manual_seed(0)
    blk = Block(8, 8, 2, "full", {}, 2.0, conv_mlp=True, drop_path=0.0, eps=1e-6).eval()
    x, hw = torch.randn(2, 1 + 12, 8), (3, 4)
    out, _ = blk(x, hw, prefix=1)
    cls_attn = x[:, :1]  # the attention leaves the CLS token alone ...
    expected_cls = cls_attn + blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(cls_attn))))  # ... the MLP does not
    torch.testing.assert_close(out[:, :1], expected_cls)
    body, _ = blk(x[:, 1:], hw)  # and the map is computed as without the prefix
    torch.testing.assert_close(out[:, 1:], body)


def test_stage_transition_block_widens_inside_pooling_attention():
    # MViTv2's first block of a stage: qkv from dim_in to dim, skip Linear(dim_in, dim) of LN(x), pooled.
    torch.manual_seed(0)
    knobs = {"stride_q": 2, "stride_kv": 2, "rel_pos_size": 6}
    blk = Block(8, 16, 2, "pooling", knobs, 2.0, conv_mlp=False, drop_path=0.0, eps=1e-6).eval()
    assert blk.widens and blk.attn.dim == 8 and blk.attn.output_dim == 16
    assert blk.attn.proj.q.weight.shape == (16, 8) and blk.skip.weight.shape == (16, 8)
    x, hw = torch.randn(2, 36, 8), (6, 6)
    y = blk.norm1(x)
    h = pool_residual(blk.skip(y), hw, (3, 3)) + blk.attn(y, hw)
    expected = h + blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(h))))
    out, out_hw = blk(x, hw)
    assert out_hw == (3, 3)
    torch.testing.assert_close(out, expected)
    # the zoo may name the width itself; a different one is refused
    assert Block(8, 16, 2, "pooling", {**knobs, "dim_out": 16}, 2.0, False, 0.0, 1e-6).attn.output_dim == 16
    with pytest.raises(ValueError, match="dim_out=32 conflicts with the block's width 16"):
        Block(8, 16, 2, "pooling", {**knobs, "dim_out": 32}, 2.0, False, 0.0, 1e-6)
    with pytest.raises(ValueError, match="widens only in the first block"):
        Block(16, 16, 2, "pooling", {**knobs, "dim_out": 32}, 2.0, False, 0.0, 1e-6)


def test_a_mechanism_without_dim_out_is_fed_the_projected_tokens():
    torch.manual_seed(0)
    blk = Block(8, 16, 2, "full", {}, 2.0, conv_mlp=False, drop_path=0.0, eps=1e-6).eval()
    assert not blk.widens and blk.attn.dim == 16
    x, hw = torch.randn(2, 12, 8), (3, 4)
    s = blk.skip(blk.norm1(x))
    h = s + blk.attn(s, hw)
    out, _ = blk(x, hw)
    torch.testing.assert_close(out, h + blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(h)))))


def test_pooled_residual_is_mvit_max_pooling():
    t = torch.randn(2, 7 * 7, 4)
    out = pool_residual(t, (7, 7), (4, 4))
    m = t.transpose(1, 2).reshape(2, 4, 7, 7)
    torch.testing.assert_close(out, F.max_pool2d(m, 3, 2, 1).flatten(2).transpose(1, 2))


def test_swin_merge_order_and_odd_maps():
    merge = Merge("linear", 1, 4, 1e-5)
    x = torch.arange(16.0).view(1, 16, 1)  # a 4x4 map, one channel, value = row * 4 + col
    seen = {}
    merge.norm.register_forward_hook(lambda mod, inp, out: seen.setdefault("x", inp[0]))
    _, hw = merge(x, (4, 4))
    assert hw == (2, 2)
    assert seen["x"][0, 0].tolist() == [0.0, 4.0, 1.0, 5.0]  # (even, even), (odd, even), (even, odd), (odd, odd)
    _, hw = merge(torch.randn(1, 15, 1), (5, 3))  # odd sides are zero-padded
    assert hw == (3, 2)


def test_drop_path_drops_whole_samples_and_keeps_the_mean():
    torch.manual_seed(0)
    dp = DropPath(0.5).train()
    out = dp(torch.ones(4000, 3, 2))
    per_sample = out.flatten(1)
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}
    assert (per_sample == per_sample[:, :1]).all()
    assert out.mean().item() == pytest.approx(1.0, abs=0.05)
    assert torch.equal(dp.eval()(torch.ones(3, 2)), torch.ones(3, 2))


def test_one_model_many_resolutions_and_the_reasons_for_others():
    model = models.create("pyramid_pvt", tiny=True, num_classes=3).eval()
    for res in (32, 48, 64):
        assert model(torch.randn(1, 3, res, res)).shape == (1, 3)
    reasons = models.create("pyramid_swin", tiny=True).unsupported(40)
    assert reasons and reasons[0].startswith("at 40x40 px, stage 1 block 1 (swin) sees a 10x10 map: ")
    assert "pass pad=True" in reasons[0]
    assert "multiple of 4" in models.create("crossvit_9", tiny=True).unsupported(30)[0]


def test_absolute_position_table_is_learned_and_resized():
    from attnbench.bench.flops import count

    model = models.create("mvitv2_t", tiny=True, abs_pos=True, num_classes=4)
    assert model.pos_embed is not None and model.pos_embed.shape == (1, 8 * 8, 16)  # the stem's 8x8 map at 32 px
    for res in (32, 64):
        x = torch.randn(2, 3, res, res)
        model(x).sum().backward()
        assert model.pos_embed.grad is not None and model.pos_embed.grad.abs().sum() > 0
        model.zero_grad()
    plain = models.create("mvitv2_t", tiny=True, num_classes=4)
    extra = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == 8 * 8 * 16
    traced = count(model.eval(), (torch.zeros(1, 3, 32, 32),), flop_counter=False, backward=False)
    assert traced.macs == model.macs(1, 32)
