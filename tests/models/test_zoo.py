"""The zoo: every entry builds, runs forward and backward at two resolutions, and
the published configurations reproduce the papers' parameter counts (2%) and
multiply-adds (5%) under bench.flops with nothing uncovered."""

from __future__ import annotations

import pytest
import torch
from attnbench.bench.flops import count

from attnbench import attentions, models

PUBLISHED = [n for n in models.available() if models.entry(n).published is not None]

# Where the build cannot match the paper, and why. strict: a fix makes these tests fail until the entry is removed.
KNOWN_GAPS = {
    # LeapLabTHU/DAT's CVPR release (configs/dat_tiny.yaml, models/dat.py, dat_blocks.py) has no layer scale, local
    # perception unit, conv stem or dwc position encoding; counted from that code, its learnable parameters are
    # exactly ours, 28,319,138. The paper's 29M follows the Swin paper, which gives Swin-T (28.29M) as 29M;
    # with the registered buffers (relative_position_index, shift masks: +0.21M) DAT-T would count 28.53M, "29M".
    ("dat_t", "params"): "the official CVPR DAT-T counts 28.32M learnable parameters, as ours; the paper's 29M "
    "(like the Swin paper's 29M for a 28.29M Swin-T) is not reached by any learnable parameter of that code",
    ("quadtree_b_b0", "params"): "3.59M against the paper's 3.5M (only the FLOPs are to be reproduced)",
}


def _mark(name: str, what: str):
    reason = KNOWN_GAPS.get((name, what))
    return [pytest.mark.xfail(strict=True, reason=reason)] if reason else []


def _grads_all(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


def test_available_holds_the_published_and_one_pyramid_per_mechanism():
    names = models.available()
    for n in ("swin_t", "pvt_v2_b0", "quadtree_b_b0", "dat_t", "mvitv2_t", "crossvit_9"):
        assert n in names
    for m in attentions.available():
        assert f"pyramid_{m}" in names


@pytest.mark.parametrize("name", models.available())
def test_tiny_runs_at_native_and_other_resolution(name):
    torch.manual_seed(0)
    model = models.create(name, tiny=True, num_classes=5)
    n_params = sum(p.numel() for p in model.parameters())
    assert 1_000 < n_params < 600_000, f"{name} tiny has {n_params} parameters"
    for res in (model.config.resolution, models.entry(name).tiny_other_resolution):
        assert model.unsupported(res) == [], res
        model.zero_grad(set_to_none=True)
        x = torch.randn(2, 3, res, res)
        out = model(x)
        assert out.shape == (2, 5)
        assert torch.isfinite(out).all()
        out.square().mean().backward()
        missing = _grads_all(model)
        assert not missing, f"{name} at {res} px: no gradient reached {missing[:5]}"
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", models.available())
def test_full_size_runs_at_native_and_other_resolution(name):
    torch.manual_seed(0)
    model = models.create(name, num_classes=10)
    assert model.config.resolution in (224, 240)
    for res in (model.config.resolution, models.entry(name).other_resolution):
        assert model.unsupported(res) == [], res
        model.zero_grad(set_to_none=True)
        out = model(torch.randn(1, 3, res, res))
        assert out.shape == (1, 10) and torch.isfinite(out).all()
        out.square().sum().backward()
        missing = _grads_all(model)
        assert not missing, f"{name} at {res} px: no gradient reached {missing[:5]}"


def _published_cases(what: str):
    return [pytest.param(n, marks=_mark(n, what)) for n in PUBLISHED]


@pytest.mark.parametrize("name", _published_cases("params"))
def test_published_parameter_count_within_2_percent(name):
    pub = models.entry(name).published
    n = sum(p.numel() for p in models.create(name).parameters())
    assert abs(n / pub.params - 1) <= 0.02, f"{name}: {n / 1e6:.3f}M against {pub.params / 1e6}M"


@pytest.mark.parametrize("name", _published_cases("macs"))
def test_published_macs_within_5_percent_and_fully_counted(name):
    # The papers' "GFLOPs" count a multiply-add once: they are GMACs, compared with our macs (FLOPs = 2 * MACs).
    pub = models.entry(name).published
    model = models.create(name)
    res = model.config.resolution
    result = count(model, (torch.zeros(1, 3, res, res),), flop_counter=False, backward=False)
    assert result.uncovered == {}, f"{name}: uncounted ops {result.uncovered}"
    assert model.macs(1, res) == pytest.approx(result.macs, rel=1e-3)  # the analytic sum agrees with the trace
    assert abs(result.macs / 1e9 / pub.gmacs - 1) <= 0.05, f"{name}: {result.macs / 1e9:.3f} GMACs vs {pub.gmacs}"


def test_unknown_model_and_override_are_clear_errors():
    with pytest.raises(KeyError, match="unknown model 'resnet50'; available: swin_t"):
        models.create("resnet50")
    with pytest.raises(ValueError, match="unknown override.*depth.*valid: .*num_classes"):
        models.create("swin_t", tiny=True, depth=3)


@pytest.mark.parametrize("name", models.available())
def test_analytic_macs_agree_with_the_counter(name):
    # Every model's macs() (its layers' sums plus each attention's own macs()) against bench.flops' trace.
    # At the non-native resolution, where tables are resized (the native one is checked at full size below).
    model = models.create(name, tiny=True)
    res = models.entry(name).tiny_other_resolution
    result = count(model, (torch.zeros(2, 3, res, res),), flop_counter=False, backward=False)
    assert result.uncovered == {}
    assert model.macs(2, res) == pytest.approx(result.macs, rel=1e-3)


@pytest.mark.parametrize("name", ["pvt_v2_b0", "quadtree_b_b0"])
def test_patch_embedding_norms_at_1e5_and_block_norms_at_1e6(name):
    # the official overlapping patch embedding keeps LayerNorm's default eps; blocks and stage norms use 1e-6
    net = models.create(name, tiny=True)
    embed = [net.stem, *(m for m in net.merges if not isinstance(m, torch.nn.Identity))]
    embed_eps = {m.eps for e in embed for m in e.modules() if isinstance(m, torch.nn.LayerNorm)}
    block_eps = {m.eps for stage in net.stages for blk in stage for m in (blk.norm1, blk.norm2)}
    stage_eps = {n.eps for n in net.stage_norms if n is not None} | {net.norm.eps}
    assert embed_eps == {1e-5} and block_eps == {1e-6} and stage_eps == {1e-6}
