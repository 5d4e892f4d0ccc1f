"""CrossViT's fusion strategies (Fig. 3 of the paper, and Table 6's none): what mixes with what, and their cost at
CrossViT-S's published configuration."""

from __future__ import annotations

import pytest
import torch
from attnbench.bench.flops import count
from attnbench.models.crossvit import FUSIONS, CrossViT, CrossViTConfig
from attnbench.studies import experiments

TINY = dict(dims=(16, 32), patches=(4, 8), resolutions=(32, 24), heads=(2, 2), depths=(1, 1), fusions=1)


def _fuse(fusion: str, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Branch 0's fusion with branch 1 (8x8 and 3x3 patch maps plus CLS)."""
    torch.manual_seed(0)
    model = CrossViT(CrossViTConfig(**TINY, fusion=fusion)).eval()
    with torch.no_grad():
        if fusion == "all-attention":  # one module fuses both branches
            return model.fusers[0]([x, other], [(8, 8), (3, 3)])[0]
        fuser = model.fusers[0][0]
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
    # and the other way: one patch of branch 0 moves every token of branch 1, through the one shared attention
    torch.manual_seed(0)
    fuser = CrossViT(CrossViTConfig(**TINY, fusion="all-attention")).eval().fusers[0]
    x, other = torch.randn(1, 65, 16), torch.randn(1, 10, 32)
    moved = x.clone()
    moved[:, 7] += torch.randn(16)  # not a constant shift, which proj's LayerNorm would remove
    with torch.no_grad():
        a, b = (fuser([t, other], [(8, 8), (3, 3)])[1] for t in (x, moved))
    assert ((a - b).abs().amax(-1)[0] > 1e-6).all()


@pytest.mark.parametrize("fusion", ["none", "class-token"])
def test_no_fusion_lets_nothing_of_one_branch_reach_the_other(fusion):
    torch.manual_seed(0)
    model = CrossViT(CrossViTConfig(**TINY, fusion=fusion, num_classes=4)).eval()
    embed, cls = model._embed, []
    model.norms[0].register_forward_hook(lambda m, args, out: cls.append(args[0]))  # branch 0's final CLS
    img = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model(img)
        # branch 1's tokens replaced by others: branch 0's CLS must not move without fusion (and must with it)
        model._embed = lambda b, im: (lambda x, hw: (torch.randn_like(x) if b else x, hw))(*embed(b, im))
        model(img)
    assert torch.equal(cls[0], cls[1]) == (fusion == "none")


def test_without_patch_mixing_a_patch_token_sees_only_itself_and_the_cls_reads_all():
    torch.manual_seed(0)
    for mixing in (False, True):
        blk = CrossViT(CrossViTConfig(**TINY, patch_mixing=mixing)).eval().branches[0][0][0]
        x = torch.randn(1, 10, 16)
        moved = x.clone()
        moved[:, 5] = torch.randn(16)  # one patch token changed (not by a constant LayerNorm would remove)
        with torch.no_grad():
            changed = ((blk(x, (3, 3)) - blk(moved, (3, 3))).abs().amax(-1)[0] > 1e-6).tolist()
        expected = [True] * 10 if mixing else [True, False, False, False, False, True, False, False, False, False]
        assert changed == expected


def _corner_edits(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x with its top-left 4 x 4 px changed, its bottom-right ones changed, and both: regions that share no token
    of either branch (the large branch's bicubic resize spreads a pixel over about 2 px of its 24)."""
    a, b = x.clone(), x.clone()
    a[..., :4, :4] += torch.randn_like(a[..., :4, :4])
    b[..., -4:, -4:] += torch.randn_like(b[..., -4:, -4:])
    both = a.clone()
    both[..., -4:, -4:] = b[..., -4:, -4:]
    return a, b, both


@pytest.mark.parametrize("isolated", [True, False])
def test_an_isolated_model_scores_each_token_on_its_own(isolated):
    # Isolated: the logits are a sum of one term per token, so two edits far apart add up exactly; the same
    # model with its blocks mixing (fusion none too) does not add them up.
    torch.manual_seed(0)
    model = CrossViT(CrossViTConfig(**TINY, fusion="none", num_classes=3, isolated=isolated)).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    a, b, both = _corner_edits(x)
    with torch.no_grad():
        gap = (model(both) - model(a) - model(b) + model(x)).abs().max().item()
        moved = (model(a) - model(x)).abs().max().item()
    assert moved > 1e-3  # each edit does change the logits
    assert (gap < 1e-12) == isolated, gap


def test_an_isolated_model_has_no_fusion():
    with pytest.raises(ValueError, match="fusion='none'"):
        CrossViT(CrossViTConfig(**TINY, fusion="cross-attention", isolated=True))


@pytest.mark.parametrize(
    "fusion,patch_mixing,isolated",
    [(f, True, False) for f in FUSIONS] + [("class-token", False, False), ("none", True, True)],
)
def test_every_fusion_trains_tiny_and_its_analytic_count_matches_the_traced_one(fusion, patch_mixing, isolated):
    model = CrossViT(CrossViTConfig(**TINY, fusion=fusion, num_classes=4, patch_mixing=patch_mixing, isolated=isolated))
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    traced = count(model.eval(), (x[:1],), flop_counter=False, backward=False)
    assert traced.uncovered == {} and traced.macs == model.macs(1, 32)


# Table 6 of the paper rounds params to 0.1M and FLOPs to 0.1 G: a count within half a unit rounds to the entry.
HALF_UNIT = 0.05 + 1e-9
# Where ours differs from the paper beyond rounding, and why (see the notes of experiments/crossvit_fusion.yaml).
DEVIATIONS = {
    ("cross-attention", "params_m"): "ours has the official code's modules exactly (26.86M, as timm's card of the "
    "official weights: 26.9M); the paper prints 26.7M",
    ("all-attention", "params_m"): "ours is the paper's Eq. 2 at the large branch's width, f^i and g^i for both "
    "branches (26.85M; its MACs agree); no layout read from the text gives the paper's 27.7M",
    ("none", "gmacs"): "ours 5.36 G, as class-token's (which adds under 0.001 G to it); the paper's 5.3 (none) and "
    "5.4 (class-token) cannot both round from counts that close",
}


@pytest.fixture(scope="module")
def crossvit_s() -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Each variant of experiments/crossvit_fusion.yaml built at its --full configuration (CrossViT-S), counted
    by bench.flops at the full resolution: ({variant: {params_m, gmacs}}, {variant: its published numbers})."""
    exp = experiments.load("crossvit_fusion")
    res = exp.mode("full")["resolution"]
    ours, published = {}, {}
    for v in exp.variants:
        model = experiments.model_fn(exp, v, "full")(1000).eval()  # ImageNet-1K's 1000 classes, as the paper
        traced = count(model, (torch.zeros(1, 3, res, res),), flop_counter=False, backward=False)
        assert traced.uncovered == {}, v.name
        ours[v.name] = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6, "gmacs": traced.macs / 1e9}
        published[v.name] = v.published
    return ours, published


def _case(fusion: str, key: str):
    reason = DEVIATIONS.get((fusion, key))
    return pytest.param(
        fusion, key, marks=pytest.mark.xfail(raises=AssertionError, strict=True, reason=reason) if reason else ()
    )


@pytest.mark.slow
@pytest.mark.parametrize(("fusion", "key"), [_case(f, k) for f in FUSIONS for k in ("params_m", "gmacs")])
def test_crossvit_s_cost_rounds_to_the_papers_fusion_table(crossvit_s, fusion, key):
    """CrossViT-S (dims 192/384, heads 6/6, depths 1/4, three multi-scale blocks, MLP ratio 4; 12 px patches of
    240 px and 16 px patches of 224 px, as the official code) with each fusion, against Table 6 of the paper
    (the paper's FLOPs count a multiply-add once, so they are compared with our MACs)."""
    ours, published = crossvit_s
    assert published[fusion][key] is not None, f"{fusion}: no published {key} in the experiment file"
    assert abs(ours[fusion][key] - published[fusion][key]) <= HALF_UNIT, (
        f"{fusion}: {key} {ours[fusion][key]:.3f} against the paper's {published[fusion][key]}"
    )


@pytest.mark.slow
def test_crossvit_s_fusion_costs_order(crossvit_s):
    """What each strategy must cost relative to the others, whatever the table says."""
    ours, _ = crossvit_s
    params = {f: c["params_m"] for f, c in ours.items()}
    macs = {f: c["gmacs"] for f, c in ours.items()}
    # all-attention attends over both branches' 401 + 197 tokens: quadratic, by far the most MACs
    assert macs["all-attention"] > 1.3 * macs["cross-attention"]
    # class-token and pairwise share their parameters (one projection per branch); pairwise also projects and
    # resizes every patch token, class-token only the CLS
    assert params["class-token"] == params["pairwise"] < params["cross-attention"]
    assert macs["class-token"] < macs["pairwise"] < macs["cross-attention"]
