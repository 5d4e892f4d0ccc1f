"""Real photographs for matching (--data skimage) and the stereo evaluation: pairs exact under their
homography, split by source photograph, and the end-point error against a hand-computed disparity."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from attnbench.studies import matching_images as MI
from attnbench.studies.data import DataError
from attnbench.studies.matching_data import MatchingPairs, cell_centres, coarse_matches

HAVE_SKIMAGE = importlib.util.find_spec("skimage") is not None
needs_skimage = pytest.mark.skipif(not HAVE_SKIMAGE, reason="scikit-image (the images extra) is not installed")


def _project(h: np.ndarray, pts: np.ndarray) -> np.ndarray:
    ph = np.c_[pts, np.ones(len(pts))] @ h.T
    return ph[:, :2] / ph[:, 2:]


@needs_skimage
def test_photograph_pairs_are_exact_under_their_homography_and_split_by_source():
    assert not set(MI.skimage_files("train")) & set(MI.skimage_files("val"))
    for split in ("train", "val"):
        ds = MatchingPairs(3, 64, split, seed=1, source="skimage", photometric=False)
        for index in range(3):
            img0, img1, h01 = ds.pair(index)
            assert img0.std() > 0.02  # a photograph, not a flat crop
            ys, xs = np.mgrid[0:64, 0:64]
            q = np.c_[xs.ravel(), ys.ravel()].astype(np.float64)
            p = _project(np.linalg.inv(h01.numpy()), q)  # where each pixel of image 1 comes from in image 0
            inside = (p[:, 0] >= 0) & (p[:, 0] <= 63) & (p[:, 1] >= 0) & (p[:, 1] <= 63)
            grid = torch.from_numpy(p / 63 * 2 - 1).float().view(1, 64, 64, 2)
            sampled = F.grid_sample(img0[None], grid, mode="bilinear", align_corners=True)[0, 0].flatten()
            assert torch.allclose(img1[0].flatten()[inside], sampled[inside], atol=1e-4)
            gt = ds[index][3]
            assert torch.equal(gt, coarse_matches(h01, (64, 64)))
            centres = cell_centres((64, 64)).numpy()
            for i, j in enumerate(gt.tolist()):
                if j >= 0:  # the centre of cell i lands in cell j, and j's centre comes back to i
                    cx, cy = np.floor((_project(h01.numpy(), centres[i : i + 1])[0] + 0.5) / 8)
                    assert cy * 8 + cx == j
                    bx, by = np.floor((_project(np.linalg.inv(h01.numpy()), centres[j : j + 1])[0] + 0.5) / 8)
                    assert by * 8 + bx == i
    a, b = MatchingPairs(2, 64, "train", 3, "skimage"), MatchingPairs(2, 64, "train", 3, "skimage")
    assert torch.equal(a[1][0], b[1][0]) and torch.equal(a[1][2], b[1][2])  # deterministic


@needs_skimage
def test_the_stereo_pair_loads_with_its_disparity_scaled():
    left, right, disp = MI.stereo_pair(64)
    assert left.shape == right.shape == (1, 64, 64) and disp.shape == (64, 64)
    known = disp[np.isfinite(disp)]
    assert np.isfinite(disp).mean() > 0.9 and known.min() > 0 and known.max() < 64


def test_missing_scikit_image_is_refused_naming_the_extra(monkeypatch):
    monkeypatch.setattr(MI.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"attnbench\[images\]"):
        MatchingPairs(1, 64, source="skimage")


def _shifted_pair(shift: int = 8, side: int = 32):
    """A textured left image and the right one it would be under a constant disparity: x_r = x_l - shift."""
    rng = np.random.default_rng(0)
    left = rng.random((side, side))
    right = np.zeros_like(left)
    right[:, : side - shift] = left[:, shift:]
    disp = np.full((side, side), float(shift))
    disp[:, :shift] = np.nan  # these left pixels leave the right image
    return torch.from_numpy(left).float()[None], torch.from_numpy(right).float()[None], disp


def test_end_point_error_against_a_hand_computed_disparity():
    _, _, disp = _shifted_pair()
    p0 = torch.tensor([[11.5, 3.5], [27.5, 19.5], [11.5, 3.5], [3.5, 3.5]])
    p1 = torch.tensor([[3.5, 3.5], [19.5, 19.5], [7.5, 6.5], [3.5, 3.5]])
    err = MI.stereo_errors(p0, p1, disp)
    # (11.5, 3.5) lands at (3.5, 3.5): 0; off by (4, 3): 5; a pixel without disparity: unknown
    assert err[:3].tolist() == pytest.approx([0.0, 0.0, 5.0]) and torch.isnan(err[3])


class _Matcher(torch.nn.Module):
    """Confidence one-hot at chosen cells: cell i of the left image to cell match[i] of the right one."""

    def __init__(self, match):
        super().__init__()
        self.cfg = SimpleNamespace(resolution=32, threshold=0.2)
        self.match = match

    def forward(self, img0, img1):
        conf = torch.zeros(1, 16, 16)
        for i, j in self.match.items():
            conf[0, i, j] = 1.0
        return conf


def test_stereo_evaluation_of_coarse_matches(monkeypatch):
    monkeypatch.setattr(MI, "stereo_pair", lambda res: _shifted_pair(8, res))
    # cells of a 4x4 grid (8 px): cell (row r, col c) = 4r + c; the true match is one column left
    right = {4 * r + c: 4 * r + c - 1 for r in range(4) for c in range(1, 4)}
    assert MI.evaluate_stereo(_Matcher(right)) == {"stereo_epe": 0.0, "stereo_within_cell": 1.0, "stereo_matches": 12}
    # two wrong matches, to cells of column 3 that no true match takes: cell 5 (centre (11.5, 11.5), truly
    # at (3.5, 11.5)) to cell 3 (27.5, 3.5): 24 and 8 px off; cell 6 (truly at (11.5, 11.5)) to cell 15
    # (27.5, 27.5): 16 and 16 px off
    got = MI.evaluate_stereo(_Matcher({**right, 5: 3, 6: 15}))
    assert got["stereo_matches"] == 12
    assert got["stereo_epe"] == pytest.approx(((24**2 + 8**2) ** 0.5 + (16**2 + 16**2) ** 0.5) / 12)
    assert got["stereo_within_cell"] == pytest.approx(10 / 12)
