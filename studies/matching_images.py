"""Real photographs for the matching task, from scikit-image's wheel (the optional extra ``images``).

``--data skimage`` draws pairs from the photographs that ship inside scikit-image's
wheel (``skimage/data``; nothing is downloaded): each pair is a random square crop
(half to all of the shorter side, anywhere in the photograph) of one photograph,
greyscale, resized to the matcher's side, then warped by a random homography with a
photometric change exactly as the synthetic scenes are (``matching_data``), so the
coarse ground truth is exact. Train and validation are split by source photograph:
no validation pair comes from a photograph seen in training.

The stereo pair ``motorcycle_left.png`` / ``motorcycle_right.png`` with its
ground-truth disparity ``motorcycle_disp.npz`` (Middlebury 2014, rectified: a pixel at
(x, y) of the left image is at (x - d(x, y), y) of the right one) is an extra
evaluation, never trained on: the same square window of both images is resized to the
matcher's side (the disparity scales with it), and the coarse matches' end-point error
is the distance from the matched right cell's centre to where the left cell's centre
truly lands.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from .data import DataError

# Photographs of the wheel (0.26), split by source. Left out: drawings and synthetic images (logo, color,
# chessboards, phantom, horse, binary blobs), the 102 px microaneurysms, and the stereo pair (evaluation only).
SKIMAGE_TRAIN = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "coins.png", "grass.png",
    "hubble_deep_field.jpg", "ihc.png", "moon.png", "page.png", "retina.jpg", "text.png",
)  # fmt: skip
SKIMAGE_VAL = ("clock_motion.png", "coffee.png", "gravel.png", "rocket.jpg")
STEREO = ("motorcycle_left.png", "motorcycle_right.png", "motorcycle_disp.npz")
INSTALL = "pip install 'attnbench[images]' (scikit-image, whose wheel holds the photographs)"


def skimage_dir() -> Path:
    """The folder of scikit-image's bundled images; DataError naming the extra when it is missing."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"--data skimage needs scikit-image: {INSTALL}")
    root = Path(next(iter(spec.submodule_search_locations))) / "data"
    missing = [n for n in (*SKIMAGE_TRAIN, *SKIMAGE_VAL, *STEREO) if not (root / n).is_file()]
    if missing:
        raise DataError(f"scikit-image at {root.parent} lacks {', '.join(missing)}; {INSTALL}")
    return root


def skimage_files(split: str) -> list[Path]:
    root = skimage_dir()
    return [root / n for n in (SKIMAGE_TRAIN if split == "train" else SKIMAGE_VAL)]


def crop_grey(path: Path, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random square crop (half to all of the shorter side) of a photograph, greyscale, resized to
    ``size``; (size, size) in [0, 1]."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("L")
        short = min(im.size)
        side = int(round(short * rng.uniform(0.5, 1.0)))
        left = int(rng.integers(0, im.size[0] - side + 1))
        top = int(rng.integers(0, im.size[1] - side + 1))
        im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(im, dtype=np.float64) / 255.0


def stereo_pair(resolution: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(left (1, R, R), right (1, R, R), disparity (R, R) in px at R, NaN where unknown): the central square
    window (the shorter side) of both images, resized to R."""
    from PIL import Image

    root = skimage_dir()
    imgs = []
    for name in STEREO[:2]:
        with Image.open(root / name) as im:
            imgs.append(im.convert("L"))
    w, h = imgs[0].size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    box = (left, top, left + side, top + side)
    out = [
        torch.from_numpy(np.array(im.crop(box).resize((resolution, resolution), Image.Resampling.BILINEAR)))
        .float()[None]
        .div(255.0)
        for im in imgs
    ]
    disp = np.load(root / STEREO[2])["arr_0"].astype(np.float64)[top : top + side, left : left + side]
    scale = resolution / side
    # the disparity at each pixel of the resized window: nearest source pixel, scaled with the image
    idx = np.clip(np.floor((np.arange(resolution) + 0.5) / scale).astype(int), 0, side - 1)
    d = disp[np.ix_(idx, idx)] * scale
    d[~np.isfinite(d)] = np.nan
    return out[0], out[1], d


def stereo_errors(p0: torch.Tensor, p1: torch.Tensor, disp: np.ndarray) -> torch.Tensor:
    """End-point error (px) of matches p0 (N, 2) left -> p1 (N, 2) right, (x, y): the distance from p1 to
    (x - d, y), d the disparity at the pixel nearest p0; NaN where the disparity is unknown."""
    if len(p0) == 0:
        return torch.zeros(0, dtype=torch.float64)
    h, w = disp.shape
    xi = np.clip(np.rint(p0[:, 0].double().numpy()).astype(int), 0, w - 1)
    yi = np.clip(np.rint(p0[:, 1].double().numpy()).astype(int), 0, h - 1)
    d = torch.from_numpy(disp[yi, xi])
    truth = torch.stack((p0[:, 0].double() - d, p0[:, 1].double()), dim=1)
    return (p1.double() - truth).norm(dim=1)


@torch.no_grad()
def evaluate_stereo(model: torch.nn.Module) -> dict[str, float | int | None]:
    """The coarse matches of a trained matcher on the stereo pair: mean end-point error (px at the matcher's
    side), the fraction within one cell (8 px), and the number of matches with a known disparity."""
    from attnbench.models.matching import STRIDE

    from .matching_data import cell_centres
    from .matching_metrics import mutual_nearest

    model.eval()
    res = model.cfg.resolution
    left, right, disp = stereo_pair(res)
    conf = model(left[None], right[None])
    [(i, j)] = mutual_nearest(conf, model.cfg.threshold)
    centres = cell_centres((res, res))
    err = stereo_errors(centres[i], centres[j], disp)
    err = err[torch.isfinite(err)]
    if len(err) == 0:
        return {"stereo_epe": None, "stereo_within_cell": None, "stereo_matches": 0}
    return {
        "stereo_epe": float(err.mean()),
        "stereo_within_cell": float((err <= STRIDE).double().mean()),
        "stereo_matches": len(err),
    }
