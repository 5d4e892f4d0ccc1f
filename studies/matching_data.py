"""Image pairs for the matching task, with exact ground truth.

A pair is an image and its warp by a random homography ``H`` (pixel coordinates
of image 0 to image 1, pixel centres at integers, kornia's ``align_corners=True``
frame), then a photometric change of image 1 (gain, bias, noise). Everything is
drawn from (seed, split, index), so the same pair comes back at any time.

Sources: ``"skimage"`` crops the photographs of scikit-image's wheel, split by
source photograph (``matching_images``); ``"synthetic"`` renders a textured scene (random ellipses, rectangles
and stripes of random grey levels over smooth shading and fine noise), so that
every 8 x 8 cell has structure to match; an image folder warps real images
(greyscale, centre-cropped square and resized) the same way.

Ground truth at the coarse cell (stride 8): cell ``i`` of image 0 matches cell
``j`` of image 1 when ``H`` takes the centre of ``i`` into ``j`` and ``H^-1``
takes the centre of ``j`` back into ``i`` (mutual, as LoFTR's supervision);
``-1`` where there is none (the centre leaves image 1, or the warp squeezes
two cells into one).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from attnbench.models.matching import STRIDE, resolution_problem
from torch.utils.data import Dataset

from .data import IMAGE_SUFFIXES, SPLITS, DataError, is_image, refuse_unreadable


def cell_centres(hw: tuple[int, int], stride: int = STRIDE) -> torch.Tensor:
    """(h*w, 2) pixel coordinates (x, y) of the centres of the stride x stride cells, row-major."""
    h, w = hw[0] // stride, hw[1] // stride
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    centre = (stride - 1) / 2
    return torch.stack((xs * stride + centre, ys * stride + centre), dim=-1).reshape(-1, 2).double()


def apply_h(h: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """Points (N, 2) through a 3x3 homography, in float64."""
    ph = torch.cat([pts.double(), torch.ones_like(pts[:, :1], dtype=torch.float64)], dim=1) @ h.double().T  # (N, 3)
    return ph[:, :2] / ph[:, 2:]


def _cell_of(pts: torch.Tensor, hw: tuple[int, int], stride: int) -> torch.Tensor:
    """Row-major cell index of each point (N,), -1 outside the cell grid."""
    h, w = hw[0] // stride, hw[1] // stride
    cx, cy = torch.floor((pts[:, 0] + 0.5) / stride), torch.floor((pts[:, 1] + 0.5) / stride)
    inside = (cx >= 0) & (cx < w) & (cy >= 0) & (cy < h)
    return torch.where(inside, (cy * w + cx).long(), torch.full_like(cx, -1).long())


def coarse_matches(h01: torch.Tensor, hw: tuple[int, int], stride: int = STRIDE) -> torch.Tensor:
    """Ground truth (h*w,): the cell of image 1 that each cell of image 0 matches, -1 for none."""
    centres = cell_centres(hw, stride)
    fwd = _cell_of(apply_h(h01, centres), hw, stride)  # cell of image 1 hit by each centre
    safe = fwd.clamp(min=0)
    back = _cell_of(apply_h(torch.linalg.inv(h01.double()), centres[safe]), hw, stride)
    mutual = (fwd >= 0) & (back == torch.arange(len(centres)))
    return torch.where(mutual, fwd, torch.full_like(fwd, -1))


def random_homography(rng: np.random.Generator, size: int, distortion: float) -> torch.Tensor:
    """A homography moving each corner of a size x size image by up to ``distortion * size`` px, with a rotation."""
    from kornia.geometry.transform import get_perspective_transform

    s = size - 1
    corners = np.array([[0, 0], [s, 0], [s, s], [0, s]], dtype=np.float64)
    angle = rng.uniform(-0.35, 0.35)  # radians, about +-20 degrees
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre = np.array([s / 2, s / 2])
    scale = rng.uniform(0.85, 1.15)
    dst = (corners - centre) @ rot.T * scale + centre
    dst = dst + rng.uniform(-distortion, distortion, size=(4, 2)) * size
    src_t = torch.from_numpy(corners)[None]  # (1, 4, 2)
    dst_t = torch.from_numpy(dst)[None]
    return get_perspective_transform(src_t, dst_t)[0]  # (3, 3) float64


def render_scene(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured grey scene (size, size) in [0, 1]: shading, shapes of many sizes, fine noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    img = 0.5 + 0.15 * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * xx + rng.uniform(0.5, 2) * yy + rng.uniform()))
    for _ in range(int(rng.integers(25, 40))):
        cx, cy = rng.uniform(0, 1, size=2)
        r = rng.uniform(0.02, 0.15)
        level = rng.uniform(0, 1)
        kind = rng.integers(0, 3)
        if kind == 0:  # ellipse
            e = rng.uniform(0.5, 2)
            mask = ((xx - cx) * e) ** 2 + ((yy - cy) / e) ** 2 < r * r
        elif kind == 1:  # rectangle
            mask = (np.abs(xx - cx) < r) & (np.abs(yy - cy) < r * rng.uniform(0.3, 1.5))
        else:  # stripes inside a disc
            f = rng.uniform(15, 40)
            mask = (((xx - cx) ** 2 + (yy - cy) ** 2) < r * r) & (np.sin(f * (xx + rng.uniform() * yy)) > 0)
        img[mask] = level
    img += rng.normal(0, 0.03, size=img.shape)
    return np.clip(img, 0, 1)


def scan_folder(root: str | Path) -> list[Path]:
    """Every image file under ``root`` (sorted); refuses a missing or empty folder and non-images."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a directory; pass a folder of images")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DataError(f"image folder {root} is empty; put image files ({', '.join(IMAGE_SUFFIXES[:3])}, ...) in it")
    refuse_unreadable(root, [str(f.relative_to(root)) for f in files if not is_image(f)])
    return files


def _load_grey(path: Path, size: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("L")
        side = min(im.size)
        left, top = (im.size[0] - side) // 2, (im.size[1] - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(im, dtype=np.float64) / 255.0


class MatchingPairs(Dataset):
    """Pairs ``(image0, image1, H_01, matches)``: two (1, R, R) images in [0, 1], the homography, the coarse truth.

    ``source`` is ``"synthetic"`` or an image folder; ``distortion`` bounds the
    corner displacement (a fraction of the side); ``photometric=False`` leaves
    image 1 an exact warp of image 0 (for tests).
    """

    def __init__(
        self,
        size: int,
        resolution: int,
        split: str = "train",
        seed: int = 0,
        source: str = "synthetic",
        distortion: float = 0.12,
        photometric: bool = True,
    ):
        if split not in SPLITS:
            raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        check_resolution(resolution)
        if size < 1:
            raise DataError(f"the matching dataset needs at least one pair, got size={size}")
        self.size, self.resolution, self.split, self.seed = size, resolution, split, seed
        self.distortion, self.photometric = distortion, photometric
        if source == "skimage":  # photographs of scikit-image's wheel, split by source (matching_images)
            from .matching_images import skimage_files

            self.files = skimage_files(split)
        else:
            self.files = None if source == "synthetic" else scan_folder(source)
        self.source = source

    def __len__(self) -> int:
        return self.size

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, SPLITS.index(self.split), index, 15])

    def homography(self, index: int) -> torch.Tensor:
        return self.pair(index)[2]

    def pair(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image0 (1, R, R), image1 (1, R, R), H_01 (3, 3) float64)."""
        from kornia.geometry.transform import warp_perspective

        rng = self._rng(index)
        r = self.resolution
        if self.files is None:
            scene = render_scene(rng, r)
        elif self.source == "skimage":  # a random crop of one photograph of the split
            from .matching_images import crop_grey

            scene = crop_grey(self.files[index % len(self.files)], r, rng)
        else:  # an image folder: train and val draw from the same files with independent homographies
            scene = _load_grey(self.files[index % len(self.files)], r)
        h01 = random_homography(rng, r, self.distortion)
        img0 = torch.from_numpy(scene).float()[None]  # (1, R, R)
        img1 = warp_perspective(img0[None], h01.float()[None], (r, r), align_corners=True)[0]  # (1, R, R)
        if self.photometric:
            gain, bias = rng.uniform(0.75, 1.25), rng.uniform(-0.1, 0.1)
            noise = torch.from_numpy(rng.normal(0, 0.02, size=(1, r, r))).float()
            img1 = (img1 * gain + bias + noise).clamp(0, 1)
        return img0, img1, h01

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        img0, img1, h01 = self.pair(index)
        return img0, img1, h01, coarse_matches(h01, (self.resolution, self.resolution))


def check_resolution(resolution: int) -> None:
    """Refuse a side the matcher cannot take (``models.matching.resolution_problem``)."""
    problem = resolution_problem(resolution)
    if problem:
        raise DataError(problem)
