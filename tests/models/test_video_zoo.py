"""The video zoo: Video Swin-T and MViTv2-S 16x4 at their published parameter counts (0.5%) and multiply-adds
(2%; the papers' "GFLOPs" count a multiply-add once), counted by bench.flops with nothing uncovered; the tiny
variants run, and learn the motion task."""

from __future__ import annotations

import math

import pytest
import torch
from attnbench.bench.flops import count
from attnbench.models.video import (
    SyntheticMotion,
    create_video,
    train_motion,
    video_available,
    video_entry,
)

NAMES = video_available()


def _clip(model) -> tuple[int, int, int]:
    cfg = model.config
    return (cfg.frames, cfg.resolution, cfg.resolution)


@pytest.mark.parametrize("name", NAMES)
def test_published_parameters_within_half_a_percent_and_analytic_macs_within_2_percent(name):
    entry = video_entry(name)
    with torch.device("meta"):  # no weights: the count is of shapes
        model = create_video(name)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / entry.params - 1) <= 0.005, f"{name}: {n / 1e6:.3f}M against {entry.params / 1e6}M"
    clip = _clip(model)
    assert model.unsupported(clip) == []
    assert abs(model.macs(1, clip) / 1e9 / entry.gmacs - 1) <= 0.02


@pytest.mark.parametrize("name", NAMES)
def test_the_counter_agrees_with_the_analytic_sum_on_a_small_clip(name):
    # the full-size widths and depths on a clip of 8 frames of 112 px (32 px for the tiny variant below)
    model = create_video(name)
    clip = (8, 112, 112)
    assert model.unsupported(clip) == []
    result = count(model, (torch.zeros(1, 3, *clip),), flop_counter=False, backward=False)
    assert result.uncovered == {}
    assert result.macs == pytest.approx(model.macs(1, clip), rel=1e-3)


@pytest.mark.slow  # the published clips: 15-35 s (Video Swin-T, 32 x 224 px) and 8-15 s (MViTv2-S) on 2 cores
@pytest.mark.parametrize("name", NAMES)
def test_published_macs_counted_by_fvcore(name):
    entry = video_entry(name)
    model = create_video(name)
    clip = _clip(model)
    result = count(model, (torch.zeros(1, 3, *clip),), flop_counter=False, backward=False)
    assert result.uncovered == {}
    assert result.macs == pytest.approx(model.macs(1, clip), rel=1e-3)
    assert abs(result.macs / 1e9 / entry.gmacs - 1) <= 0.02, f"{name}: {result.macs / 1e9:.2f} GMACs"


@pytest.mark.parametrize("name", NAMES)
def test_tiny_runs_forward_and_backward(name):
    torch.manual_seed(0)
    model = create_video(name, tiny=True, num_classes=4)
    n = sum(p.numel() for p in model.parameters())
    assert 10_000 < n < 600_000
    clip = _clip(model)
    out = model(torch.randn(2, 3, *clip))
    assert out.shape == (2, 4) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    result = count(model, (torch.zeros(2, 3, *clip),), flop_counter=False, backward=False)
    assert result.uncovered == {} and result.macs == pytest.approx(model.macs(2, clip), rel=1e-3)


def test_the_motion_task_is_deterministic_and_no_single_frame_tells_the_class():
    a, b = SyntheticMotion(8, seed=3), SyntheticMotion(8, seed=3)
    assert all(torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1] for i in range(8))
    assert not torch.equal(a[0][0], SyntheticMotion(8, split="val", seed=3)[0][0])
    clip, label = a[0]
    assert clip.shape == (3, 8, 32, 32) and label in range(4)
    # the squares start anywhere and wrap around: a frame alone is as likely under every direction, while
    # consecutive frames differ by the step of the label's direction
    bright = clip.mean(0) > 0.5  # (frames, H, W): the squares (the background stays below 0.3 -> -0.4)
    dy, dx = SyntheticMotion.STEPS[label]
    speed = a.speed
    assert torch.equal(torch.roll(bright[0], shifts=(dy * speed, dx * speed), dims=(0, 1)), bright[1])
    assert math.isclose(bright[0].float().mean().item(), bright[-1].float().mean().item())


@pytest.mark.parametrize("name", NAMES)
def test_tiny_learns_the_motion_task_in_seconds(name):
    # 4 directions, chance 25%; 50 AdamW steps of 16 clips (about 5 s for Video Swin, 8 s for MViTv2 on one
    # loaded core), scored on 128 held-out clips
    torch.set_num_threads(1)
    model = create_video(name, tiny=True, num_classes=4)
    result = train_motion(model, steps=50, batch=16, lr=3e-3, seed=0, val_size=128)
    assert result["accuracy"] > 0.4, result
