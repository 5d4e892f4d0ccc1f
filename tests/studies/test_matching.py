"""The matching task: pairs warped exactly by their homography, exact coarse ground truth, the metrics,
a tiny matcher that learns above chance in seconds, resumption, and bad input refused before training."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from attnbench.models.matching import Matcher, MatcherConfig, MatchError, check_config
from attnbench.studies import matching as matching_run
from attnbench.studies.data import DataError
from attnbench.studies.matching_data import MatchingPairs, cell_centres, coarse_matches
from attnbench.studies.matching_metrics import corner_error, error_auc, estimate_homography, mutual_nearest
from typer.testing import CliRunner


def _project(h: np.ndarray, pts: np.ndarray) -> np.ndarray:
    ph = np.c_[pts, np.ones(len(pts))] @ h.T
    return ph[:, :2] / ph[:, 2:]


def test_image_1_is_image_0_warped_by_the_homography():
    ds = MatchingPairs(3, 64, photometric=False)
    for index in range(3):
        img0, img1, h01 = ds.pair(index)
        ys, xs = np.mgrid[0:64, 0:64]
        q = np.c_[xs.ravel(), ys.ravel()].astype(np.float64)
        p = _project(np.linalg.inv(h01.numpy()), q)  # where each pixel of image 1 comes from in image 0
        inside = (p[:, 0] >= 0) & (p[:, 0] <= 63) & (p[:, 1] >= 0) & (p[:, 1] <= 63)
        grid = torch.from_numpy(p / 63 * 2 - 1).float().view(1, 64, 64, 2)  # align_corners=True frame
        sampled = F.grid_sample(img0[None], grid, mode="bilinear", align_corners=True)[0, 0].flatten()
        assert inside.mean() > 0.5
        assert torch.allclose(img1[0].flatten()[inside], sampled[inside], atol=1e-4)


def test_coarse_ground_truth_is_exact_under_the_homography():
    ds = MatchingPairs(4, 96)
    centres = cell_centres((96, 96)).numpy()
    for index in range(4):
        _, _, h01, gt = ds[index]
        h = h01.numpy()
        fwd = _project(h, centres)
        cells = np.floor((fwd + 0.5) / 8)  # (x, y) cell of each projected centre
        for i, j in enumerate(gt.tolist()):
            inside = (cells[i] >= 0).all() and (cells[i] < 12).all()
            if j >= 0:
                assert inside and cells[i][1] * 12 + cells[i][0] == j
                back = np.floor((_project(np.linalg.inv(h), centres[j : j + 1])[0] + 0.5) / 8)
                assert back[1] * 12 + back[0] == i  # mutual
            else:
                back_ok = False
                if inside:
                    jj = int(cells[i][1] * 12 + cells[i][0])
                    back = np.floor((_project(np.linalg.inv(h), centres[jj : jj + 1])[0] + 0.5) / 8)
                    back_ok = back[1] * 12 + back[0] == i
                assert not back_ok
        assert (gt >= 0).sum() > 40


def test_a_translation_by_one_cell_shifts_every_match_by_one_cell():
    h = torch.tensor([[1.0, 0, 8], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)
    gt = coarse_matches(h, (64, 64)).view(8, 8)
    assert (gt[:, :7] == torch.arange(64).view(8, 8)[:, 1:]).all() and (gt[:, 7] == -1).all()


def test_pairs_are_deterministic_per_seed_split_and_index():
    a, b = MatchingPairs(2, 64, seed=3), MatchingPairs(2, 64, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a[1], b[1], strict=True))
    assert not torch.equal(a[1][0], MatchingPairs(2, 64, "val", seed=3)[1][0])
    assert not torch.equal(a[1][2], a[0][2])


def test_image_folder_mode_and_its_refusals(tmp_path):
    from PIL import Image

    root = tmp_path / "imgs"
    root.mkdir()
    for k in range(2):
        Image.fromarray((np.random.default_rng(k).random((50, 70)) * 255).astype(np.uint8)).save(root / f"{k}.png")
    img0, img1, h01, gt = MatchingPairs(3, 64, source=str(root))[2]
    assert img0.shape == (1, 64, 64) and (gt >= 0).any()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty"):
        MatchingPairs(1, 64, source=str(empty))
    (root / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="notes.txt"):
        MatchingPairs(1, 64, source=str(root))


def test_error_auc_and_corner_error():
    auc = error_auc([0.0, 1.0, math.inf], (3,))["auc@3"]
    assert auc == pytest.approx((1 * (1 / 3) + 2 * (2 / 3)) / 3)  # the step curve integrated by hand
    h = torch.tensor([[1.1, 0.05, 3], [-0.02, 0.95, -2], [1e-4, 2e-4, 1]], dtype=torch.float64)
    assert corner_error(h, h, 96) == 0 and corner_error(None, h, 96) == math.inf
    pts = torch.rand(30, 2, generator=torch.Generator().manual_seed(0)).double() * 95
    ph = torch.cat([pts, torch.ones(30, 1, dtype=torch.float64)], 1) @ h.T
    est = estimate_homography(pts, ph[:, :2] / ph[:, 2:])
    assert corner_error(est, h, 96) < 0.05


def test_mutual_nearest_keeps_only_mutual_confident_pairs():
    conf = torch.tensor([[[0.9, 0.05], [0.6, 0.1]]])  # row 1's best is column 0, whose best is row 0
    (i, j), = mutual_nearest(conf, 0.2)  # fmt: skip
    assert i.tolist() == [0] and j.tolist() == [0]


def _tiny(tmp_path, **over):
    settings = {"epochs": 6, "train_size": 48, "val_size": 12, "dim": 16, "layers": ("self", "cross")}
    settings.update(over)
    return matching_run.MatchRunConfig(
        mechanisms=("full",), out=str(tmp_path / "run"), seeds=1, preset="smoke", resolution=64,
        overrides=tuple(settings.items()), lr=5e-3,
    )  # fmt: skip


def test_a_tiny_matcher_learns_above_chance(tmp_path):
    torch.set_num_threads(1)
    (row,) = matching_run.run(_tiny(tmp_path), log=lambda s: None)
    assert row["precision"] > 10 * row["chance_precision"]  # chance: 1 cell in 64
    assert row["matches_per_pair"] > 3
    assert row["params"] > row["stack_params"] > 0  # the matcher's parameters: the stem's and the stack's
    store = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in store] == ["match"] and store[0]["analytic_macs"] > 0
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_killed_run_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    cfg = _tiny(tmp_path, epochs=2, train_size=8, val_size=4)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(matching_run, "evaluate", killed)
    with pytest.raises(KeyboardInterrupt):
        matching_run.run(cfg, log=lambda s: None)
    assert len(list((tmp_path / "run" / "checkpoints").iterdir())) == 1
    monkeypatch.undo()
    said: list[str] = []
    matching_run.run(cfg, log=said.append)
    assert any("training (resumed)" in s for s in said)
    matching_run.run(cfg, log=said.append)
    assert "already recorded" in said[-1]


def test_the_matcher_refuses_what_it_cannot_take():
    with pytest.raises(MatchError, match="no cross attention.*use one of full, linear, pvt, quadtree"):
        check_config(MatcherConfig("swin"))
    with pytest.raises(MatchError, match="multiple of 8"):
        check_config(MatcherConfig("full", resolution=100))
    with pytest.raises(DataError, match="multiple of 8"):
        MatchingPairs(1, 100)
    with pytest.raises(MatchError, match="top-K"):
        check_config(MatcherConfig("quadtree", resolution=64))
    model = Matcher(MatcherConfig("linear", resolution=32, dim=16, layers=("cross",)))
    assert model(torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)).shape == (2, 16, 16)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["-m", "full,swin"], "swin has no cross attention"),
        (["-m", "full", "-r", "100"], "multiple of 8"),
        (["-m", "full", "--data", "EMPTY"], "is empty"),
        (["-m", "pvt", "-k", "topk=4"], "belong to none"),
    ],
)
def test_cli_refuses_bad_input_before_training(tmp_path, args, says):
    from attnbench.cli import app

    (tmp_path / "empty").mkdir()
    args = [str(tmp_path / "empty") if a == "EMPTY" else a for a in args]
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["match", "--smoke", *args, "--out", str(out)])
    assert result.exit_code == 2 and says in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not out.exists()


def test_cli_footprint_draws_a_page(tmp_path):
    from attnbench.cli import app

    page = tmp_path / "fp.html"
    result = CliRunner().invoke(app, ["footprint", "-m", "swin,pvt", "-r", "14", "-q", "3,4", "--out", str(page)])
    assert result.exit_code == 0, result.output
    text = page.read_text()
    assert "swin (self): 49 keys\\u002fquery" in text and "pvt (self): 9 keys\\u002fquery" in text
    bad = CliRunner().invoke(app, ["footprint", "-m", "swin", "--cross", "--out", str(page)])
    assert bad.exit_code == 2 and "no cross attention" in bad.output


def test_cli_footprint_draws_a_clip_as_frames_and_refuses_what_takes_no_time(tmp_path):
    import json

    from attnbench.cli import app

    page = tmp_path / "clip.html"
    for clip in (["-r", "14", "--frames", "3"], ["-r", "3x14x14"]):
        args = ["footprint", "-m", "swin,pvt,pooling", *clip, "-k", "window_t=3", "-q", "2,3,4", "--out", str(page)]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        text = page.read_text()
        call = text[text.index("Plotly.newPlot(") :]
        data = json.JSONDecoder().raw_decode(call[call.index("[") :])[0]
        names = [t["name"] for t in data if t["type"] == "heatmap"]
        assert names == [f"{m} t={t}" for m in ("swin", "pvt", "pooling") for t in range(3)]
        assert "query (2, 3, 4) on 3x14x14" in text
    refusals = {
        ("-m", "swin,quadtree", "--frames", "2"): "quadtree take(s) no time axis",
        ("-m", "swin", "--frames", "2", "-q", "3,4"): "--query takes T,I,J",
        ("-m", "swin", "-r", "2x14x14", "--frames", "2"): "already a clip",
        ("-m", "swin", "--frames", "2", "-q", "2,0,0"): "lies outside the 2x28x28 map",
    }
    for args, says in refusals.items():
        bad = CliRunner().invoke(app, ["footprint", *args, "--out", str(tmp_path / "no.html")])
        assert bad.exit_code == 2 and says in bad.output, bad.output
    assert not (tmp_path / "no.html").exists()


def test_the_matcher_controls_are_parsed_and_built_as_named():
    cfg = matching_run.MatchRunConfig(mechanisms=("full",), out="unused", preset="smoke")
    assert matching_run.split_control("full.isolated") == ("full", "isolated")
    assert matching_run.split_control("pvt") == ("pvt", None)
    with pytest.raises(MatchError, match="unknown control 'lonely'.*isolated"):
        matching_run.split_control("full.lonely")
    isolated, self_only, plain = (cfg.matcher(m) for m in ("full.isolated", "full.self-only", "full"))
    assert isolated.isolated and set(isolated.layers) == {"self"}
    assert not self_only.isolated and set(self_only.layers) == {"self"}
    assert not plain.isolated and "cross" in plain.layers
    assert matching_run.train_seed("full.twin", 2) == 1002 and matching_run.train_seed("full.isolated", 2) == 2


def _stack_outputs(cfg: MatcherConfig, f0: torch.Tensor, f1: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(0)
    stack = Matcher(cfg).stack.eval()
    with torch.no_grad():
        return torch.cat(stack(f0, f1), dim=1)  # (1, N0 + N1, dim)


@pytest.mark.parametrize("isolated", [True, False])
def test_an_isolated_stack_mixes_no_tokens(isolated):
    # Change one token of image 0 and every token of image 1: with isolated attention only that token's own
    # output moves; with the mechanism's attention (the same stack otherwise) the others move too.
    cfg = MatcherConfig("full", resolution=32, dim=16, heads=2, isolated=isolated)
    n = cfg.coarse_hw[0] * cfg.coarse_hw[1]
    gen = torch.Generator().manual_seed(1)
    f0, f1 = torch.randn(1, n, 16, generator=gen), torch.randn(1, n, 16, generator=gen)
    g0, g1 = f0.clone(), torch.randn(1, n, 16, generator=gen)
    g0[0, 5] += 1.0
    moved = (_stack_outputs(cfg, f0, f1) - _stack_outputs(cfg, g0, g1)).abs().amax(-1)[0]  # (N0 + N1,)
    others = torch.cat([moved[:5], moved[6:n]])
    assert moved[5] > 1e-3
    if isolated:
        assert float(others.max()) == 0.0 and bool((moved[n:] > 0).all())  # image 1's own tokens changed
    else:
        assert float(others.min()) > 1e-4


def test_an_isolated_block_looks_at_its_own_token_only():
    model = Matcher(MatcherConfig("full", resolution=32, dim=16, heads=2, isolated=True))
    pair = MatchingPairs(1, 32, "val", 0)[0]
    rows = matching_run.footprint_rows(model, pair, query=(1, 2))
    for row in rows:
        weights = torch.tensor(row["weights"])
        assert row["keys_per_query"] == 1 and weights[1, 2] == 1.0 and weights.sum() == 1.0


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_a_token_of_the_patch_stem_sees_its_own_cell_only(stem):
    # The receptive field of coarse token (1, 1): the pixels whose change moves it (eval mode: BatchNorm per pixel).
    model = Matcher(MatcherConfig("full", resolution=32, dim=16, stem=stem)).eval()
    img = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    base = model.features(img)[0, 1 * 4 + 1]
    rows = set()
    for r in range(32):
        bumped = img.clone()
        bumped[..., r, :] += 0.5
        if (model.features(bumped)[0, 1 * 4 + 1] - base).abs().max() > 1e-6:
            rows.add(r)
    cell = set(range(8, 16))  # the pixel rows of coarse row 1
    assert rows == cell if stem == "patch" else rows > cell


def test_every_seed_and_twin_is_evaluated_on_the_same_held_out_pairs(tmp_path, monkeypatch):
    seen, trained_on = [], []
    real_evaluate, real_pairs = matching_run.evaluate, matching_run.pairs

    def evaluate(model, pairs, **kw):
        seen.append(torch.stack([p[0] for p in pairs]))
        return real_evaluate(model, pairs, **kw)

    def pairs(size, resolution, split, seed, source):
        if split == "train":
            trained_on.append(seed)
        return real_pairs(size, resolution, split, seed, source)

    monkeypatch.setattr(matching_run, "evaluate", evaluate)
    monkeypatch.setattr(matching_run, "pairs", pairs)
    cfg = dataclasses.replace(_tiny(tmp_path, epochs=1, train_size=4, val_size=3), mechanisms=("full", "full.twin"))
    matching_run.run(dataclasses.replace(cfg, seeds=2), log=lambda s: None)
    assert len(seen) == 4 and all(torch.equal(s, seen[0]) for s in seen)
    assert trained_on == [0, 1, 1000, 1001]  # the training pairs are each seed's own


def test_a_run_made_with_other_preset_settings_is_refused(tmp_path, monkeypatch):
    # The same command line after the preset's contents changed (another version of attnbench) must not add
    # rows of other settings to the directory.
    cfg = _tiny(tmp_path, epochs=1, train_size=4, val_size=2)
    matching_run.run(cfg, log=lambda s: None)
    monkeypatch.setitem(matching_run.PRESETS, "smoke", {**matching_run.PRESETS["smoke"], "stem": "patch"})
    with pytest.raises(MatchError, match=r"other settings \(stem: 'conv' there, 'patch' now\)"):
        matching_run.run(cfg, log=lambda s: None)
