"""The harness on clips: the --frames axis, the T x H x W grammar, the video preset and a clip sweep whose
counted MACs equal the analytic ones."""

from __future__ import annotations

import json

import pytest
from attnbench.bench import presets
from attnbench.bench.points import Grid, GridError, Point, expand, parse_resolution


def test_the_clip_grammar():
    (r,) = parse_resolution("8x56x56")
    assert r.hw == (8, 56, 56) and r.label() == "8x56x56"
    stages = parse_resolution("32f:224px")
    assert [s.hw for s in stages] == [(16, 56, 56), (16, 28, 28), (16, 14, 14), (16, 7, 7)]
    assert [s.stage for s in stages] == [1, 2, 3, 4] and stages[0].clip == 32
    assert [s.hw for s in parse_resolution("16f:224px:s3")] == [(8, 14, 14)]
    with pytest.raises(GridError, match="8x56x56"):
        parse_resolution("8x56x")


def test_frames_axis_makes_clip_points_and_keeps_image_ids():
    image = expand(Grid(mechanisms=["full"], resolutions=["16"])).points
    clips = expand(Grid(mechanisms=["full"], resolutions=["16"], frames=[1, 4])).points
    assert [p.hw for p in clips] == [(1, 16, 16), (4, 16, 16)]
    assert [p.tokens for p in clips] == [256, 1024]
    assert "frames" not in image[0].config() and image[0].frames is None
    assert clips[0].point_id != image[0].point_id  # a one-frame clip is its own point
    assert Point.from_json(json.loads(json.dumps(clips[1].to_json()))) == clips[1]
    with pytest.raises(GridError, match="frames"):
        expand(Grid(mechanisms=["full"], resolutions=["16"], frames=[0]))


def test_the_video_preset_skips_the_mechanisms_without_time_with_their_reason():
    grid = Grid.from_dict({**presets.get("video")["grid"], "devices": ["cpu"]})
    e = expand(grid)
    maps = {p.hw for p in e.points}
    assert (8, 56, 56) in maps and (16, 7, 7) in maps
    runs = {p.mechanism for p in e.points if p not in e.refused}
    assert {"full", "linear", "pooling", "swin", "pvt"} <= runs
    for p, reasons in e.refused.items():
        if p.mechanism in ("quadtree", "deformable", "cross"):
            assert "takes no time axis" in reasons[0]
    swin = next(p for p in e.points if p.mechanism == "swin")
    assert swin.knob_dict()["window_t"] == 8


def test_a_clip_sweep_counts_what_the_mechanisms_say(tmp_path):
    from typer.testing import CliRunner

    from attnbench.cli import app

    out = tmp_path / "run"
    args = ["sweep", "-m", "full,linear,pooling,swin,deformable", "-r", "14", "--frames", "1,2", "--dim", "16"]
    args += ["--heads", "2", "--device", "cpu", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 10
    for r in rows:
        if r["mechanism"] == "deformable":
            assert r["status"] == "skipped" and "takes no time axis" in r["reason"]
            continue
        assert r["status"] == "ok" and r["frames"] in (1, 2) and r["tokens"] == 196 * r["frames"]
        assert not r["macs_uncovered"]
        assert r["macs"] == pytest.approx(r["analytic_macs"], rel=0.01)
