"""The matching task's loss and metrics.

Loss: ``-log`` confidence at the ground-truth pairs (``matching_data``).
Metrics: match precision at the coarse cell (a match is right when ``H`` takes
the centre of its cell in image 0 into its cell in image 1) and the AUC of the
mean corner error at 3, 5 and 10 px of the homography kornia's RANSAC fits to
the matched cell centres (an estimate that fails counts as an infinite error).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from attnbench.models.matching import STRIDE, Matcher

from .matching_data import apply_h, cell_centres

AUC_THRESHOLDS = (3, 5, 10)


def loss_fn(conf: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Mean -log confidence at the ground-truth pairs. gt: (B, N0) cell of image 1 or -1."""
    valid = gt >= 0
    picked = conf.gather(2, gt.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, N0)
    return -(picked.clamp_min(1e-6).log() * valid).sum() / valid.sum().clamp_min(1)


def mutual_nearest(conf: torch.Tensor, threshold: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per pair, (i, j) index tensors of the mutual nearest neighbours with confidence above threshold."""
    out = []
    for c in conf:
        j = c.argmax(1)  # best j for each i
        i_back = c.argmax(0)  # best i for each j
        i = torch.arange(c.shape[0])
        keep = (i_back[j] == i) & (c[i, j] > threshold)
        out.append((i[keep], j[keep]))
    return out


def corner_error(h_est: torch.Tensor | None, h_gt: torch.Tensor, size: int) -> float:
    """Mean distance (px) of the four image corners mapped by the estimate and by the truth; inf without one."""
    if h_est is None or not torch.isfinite(h_est).all():
        return math.inf
    s = size - 1
    corners = torch.tensor([[0, 0], [s, 0], [s, s], [0, s]], dtype=torch.float64)
    err = (apply_h(h_est, corners) - apply_h(h_gt, corners)).norm(dim=1).mean()
    return float(err) if torch.isfinite(err) else math.inf


def error_auc(errors: list[float], thresholds: tuple[int, ...] = AUC_THRESHOLDS) -> dict[str, float]:
    """Area under the cumulative curve of the errors up to each threshold, over the threshold (0..1)."""
    errs = sorted(errors)
    n = len(errs)
    out = {}
    for t in thresholds:
        # the curve steps to (k+1)/n at each error; integrate the step function from 0 to t
        xs = [0.0] + [e for e in errs if e < t] + [float(t)]
        ys = [0.0] + [(k + 1) / n for k in range(len(xs) - 2)]
        area = sum((xs[k + 1] - xs[k]) * ys[k] for k in range(len(ys)))
        out[f"auc@{t}"] = area / t
    return out


def estimate_homography(p0: torch.Tensor, p1: torch.Tensor, seed: int = 0) -> torch.Tensor | None:
    """kornia RANSAC homography from matched points (N, 2); None with fewer than 4 matches or on failure."""
    from kornia.geometry.ransac import RANSAC

    if len(p0) < 4:
        return None
    ransac = RANSAC("homography", inl_th=float(STRIDE) / 2, max_iter=20, seed=seed)
    try:
        h, _ = ransac(p0.float(), p1.float())
    except (RuntimeError, ValueError):
        return None
    return h.double()


@torch.no_grad()
def evaluate(model: Matcher, pairs: list[tuple[torch.Tensor, ...]], batch: int = 16) -> dict[str, Any]:
    """Precision, recall, matches per pair and the homography AUCs over ``pairs`` (img0, img1, H, gt)."""
    model.eval()
    res = model.cfg.resolution
    centres = cell_centres((res, res))
    hw = model.cfg.coarse_hw
    correct = predicted = positives = hits = 0
    errors: list[float] = []
    loss_sum = 0.0
    for start in range(0, len(pairs), batch):
        chunk = pairs[start : start + batch]
        img0 = torch.stack([p[0] for p in chunk])
        img1 = torch.stack([p[1] for p in chunk])
        gt = torch.stack([p[3] for p in chunk])
        conf = model(img0, img1)
        loss_sum += float(loss_fn(conf, gt)) * len(chunk)
        for (i, j), (_, _, h01, g) in zip(mutual_nearest(conf, model.cfg.threshold), chunk, strict=True):
            right = cell_hit(h01, centres[i], j, hw)
            correct += int(right.sum())
            predicted += len(i)
            positives += int((g >= 0).sum())
            hits += int((g[i] == j).sum())
            errors.append(corner_error(estimate_homography(centres[i], centres[j]), h01, res))
    aucs = error_auc(errors)
    return {
        "precision": correct / predicted if predicted else 0.0,
        "recall": hits / positives if positives else 0.0,
        "matches_per_pair": predicted / len(pairs),
        "val_loss": loss_sum / len(pairs),
        **aucs,
    }


def cell_hit(h01: torch.Tensor, p0: torch.Tensor, j: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Whether H takes each point p0 (cell centres of image 0) into cell j of image 1."""
    p1 = apply_h(h01, p0)
    cx, cy = torch.floor((p1[:, 0] + 0.5) / STRIDE), torch.floor((p1[:, 1] + 0.5) / STRIDE)
    return (cy * hw[1] + cx == j.double()) & (cx >= 0) & (cx < hw[1]) & (cy >= 0) & (cy < hw[0])


def chance_precision(hw: tuple[int, int]) -> float:
    """Precision of a match drawn at random: one cell right out of H*W."""
    return 1.0 / (hw[0] * hw[1])
