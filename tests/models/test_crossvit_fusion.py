"""CrossViT's four fusion strategies (Fig. 3 of the paper): what mixes with what, and their cost at
CrossViT-S's published configuration."""

from __future__ import annotations

import pytest
import torch

from bench.flops import count
from models.crossvit import FUSIONS, CrossViT, CrossViTConfig

TINY = dict(dims=(16, 32), patches=(4, 8), resolutions=(32, 24), heads=(2, 2), depths=(1, 1), fusions=1)
# CrossViT-S (Chen et al., ICCV 2021): small branch 192 wide, large 384, 6 heads each, depths 1 and 4,
# three multi-scale blocks, MLP ratio 4, 12 px patches of 240 px and 16 px patches of 224 px.
CROSSVIT_S = dict(dims=(192, 384), heads=(6, 6), depths=(1, 4), fusions=3, mlp_ratio=4.0)


def _fuse(fusion: str, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Branch 0's fusion with branch 1 (8x8 and 3x3 patch maps plus CLS)."""
    torch.manual_seed(0)
    model = CrossViT(CrossViTConfig(**TINY, fusion=fusion)).eval()
    fuser = model.fusers[0][0]
    with torch.no_grad():
        if fusion == "cross-attention":
            return fuser(x, (8, 8), context=other, context_hw=(3, 3))
        return fuser(x, (8, 8), other, (3, 3))


def _changed(fusion: str, which: slice) -> torch.Tensor:
    """Which of branch 0's tokens change when the other branch's tokens ``which`` change: (1 + 64,) bools."""
    g = torch.Generator().manual_seed(1)
    x, other = torch.randn(1, 65, 16, generator=g), torch.randn(1, 10, 32, generator=g)
    moved = other.clone()
    moved[:, which] += torch.randn(moved[:, which].shape, generator=g)
    return (_fuse(fusion, x, other) - _fuse(fusion, x, moved)).abs().amax(-1)[0] > 1e-6


def test_cross_attention_changes_only_the_cls_and_reads_the_other_patches():
    changed = _changed("cross-attention", slice(1, 10))
    assert changed[0] and not changed[1:].any()
    # the other branch's CLS is not a key (CrossViT uses this branch's projected CLS in its place)
    assert not _changed("cross-attention", slice(0, 1)).any()


def test_class_token_fusion_passes_only_the_other_cls():
    assert not _changed("class-token", slice(1, 10)).any()  # the other branch's patches never reach
    changed = _changed("class-token", slice(0, 1))
    assert changed[0] and not changed[1:].any()


def test_pairwise_fusion_adds_the_token_at_the_same_place():
    changed = _changed("pairwise", slice(0, 1))
    assert changed[0] and not changed[1:].any()  # CLS with CLS
    # the other branch's top-left patch (3x3 grid) reaches only the top-left of this branch's 8x8 map
    changed = _changed("pairwise", slice(1, 2))[1:].reshape(8, 8)
    assert not _changed("pairwise", slice(1, 2))[0]
    assert changed[0, 0] and not changed[4:, :].any() and not changed[:, 4:].any()


def test_all_attention_mixes_every_token_of_both_branches():
    assert _changed("all-attention", slice(5, 6)).all()  # one patch of the other branch moves every token
    assert _changed("all-attention", slice(0, 1)).all()


@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_fusion_trains_tiny_and_its_analytic_count_matches_the_traced_one(fusion):
    model = CrossViT(CrossViTConfig(**TINY, fusion=fusion, num_classes=4))
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    traced = count(model.eval(), (x[:1],), flop_counter=False, backward=False)
    assert traced.uncovered == {} and traced.macs == model.macs(1, 32)


@pytest.mark.slow
def test_crossvit_s_fusion_costs():
    """CrossViT-S with each fusion at 240 px. Cross-attention has the published CrossViT-S size (26.7M
    parameters, the count of the PaddleViT port's README; the paper's own fusion table could not be read for
    this test, so the other rows are checked by what each strategy must cost relative to the others)."""
    params, macs = {}, {}
    for fusion in FUSIONS:
        model = CrossViT(CrossViTConfig(**CROSSVIT_S, fusion=fusion)).eval()
        params[fusion] = sum(p.numel() for p in model.parameters())
        macs[fusion] = count(model, (torch.zeros(1, 3, 240, 240),), flop_counter=False, backward=False).macs
    assert params["cross-attention"] == pytest.approx(26.7e6, rel=0.01)
    # all-attention attends over both branches' 401 + 197 tokens: quadratic, by far the most MACs
    assert macs["all-attention"] > 1.3 * macs["cross-attention"]
    # class-token and pairwise share their parameters (one projection per branch); pairwise also projects and
    # resizes every patch token, class-token only the CLS
    assert params["class-token"] == params["pairwise"] < params["cross-attention"]
    assert macs["class-token"] < macs["pairwise"] < macs["cross-attention"]
