"""Training augmentation as the papers used it, on whole batches on the training device, with kornia's
augmentation module (no torchvision); mixup and cutmix are written here in torch (timm's rule).

``RECIPES["deit"]`` is DeiT's ImageNet recipe (Touvron et al. 2021, Table 9), which PVT, PVTv2, Swin,
QuadTree, DAT and MViTv2 follow: random resized crop (scale 0.08 to 1, ratio 3/4 to 4/3) and horizontal
flip, RandAugment (2 operations at magnitude 9), then per batch either mixup (alpha 0.8) or cutmix
(alpha 1.0), one of the two at even odds, targets smoothed by 0.1, and random erasing with
probability 0.25. For evaluation: resize to ``resolution / 0.875`` and centre crop to ``resolution``
(224 from 256). ``RECIPES["none"]`` trains on the images as they are (hard labels, no smoothing).

Images enter in the datasets' range (``(x - 0.5) / 0.5``); the colour operations see them in [0, 1].
Random draws come from torch's global generator, which the loop's checkpoint holds per rank, so a
resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    crop_scale: tuple[float, float] | None = None  # random resized crop; None: none
    flip: float = 0.0
    randaugment: tuple[int, int] | None = None  # (operations, magnitude)
    mixup: float = 0.0  # Beta(alpha, alpha); 0: off
    cutmix: float = 0.0
    switch: float = 0.5  # the chance of cutmix when both are on
    label_smoothing: float = 0.0
    erasing: float = 0.0

    @property
    def augments(self) -> bool:
        return self.name != "none"


RECIPES = {
    "none": Recipe("none"),
    "deit": Recipe(
        "deit",
        crop_scale=(0.08, 1.0),
        flip=0.5,
        randaugment=(2, 9),
        mixup=0.8,
        cutmix=1.0,
        label_smoothing=0.1,
        erasing=0.25,
    ),  # fmt: skip
}


def _to01(x: torch.Tensor) -> torch.Tensor:
    return (x * 0.5 + 0.5).clamp(0, 1)


def _from01(x: torch.Tensor) -> torch.Tensor:
    return (x - 0.5) / 0.5


class TrainAugment(nn.Module):
    """A recipe's training transforms of a batch: ``(x, y, classes) -> (x', soft targets or None)``."""

    def __init__(self, recipe: Recipe, resolution: int):
        import kornia.augmentation as K

        super().__init__()
        self.recipe = recipe
        spatial: list[nn.Module] = []
        if recipe.crop_scale is not None:
            spatial.append(K.RandomResizedCrop((resolution, resolution), scale=recipe.crop_scale))
        if recipe.flip:
            spatial.append(K.RandomHorizontalFlip(p=recipe.flip))
        self.spatial = nn.Sequential(*spatial)
        self.randaugment: nn.Module | None = None
        if recipe.randaugment is not None:
            from kornia.augmentation.auto import RandAugment

            self.randaugment = RandAugment(*recipe.randaugment)
        self.erasing = K.RandomErasing(p=recipe.erasing) if recipe.erasing else None

    @torch.no_grad()
    def forward(self, x: torch.Tensor, y: torch.Tensor, classes: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        with torch.autocast(x.device.type, enabled=False):  # crops and colours in float32 under --amp too
            return self._forward(x, y, classes)

    def _forward(self, x: torch.Tensor, y: torch.Tensor, classes: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        dtype = x.dtype
        x = _to01(x.float())
        x = self.spatial(x)
        if self.randaugment is not None:
            x = self.randaugment(x).clamp(0, 1)
        x = _from01(x)
        target = None
        if self.recipe.mixup or self.recipe.cutmix:
            x, target = mix(x, y, classes, self.recipe)
        elif self.recipe.label_smoothing:
            target = smooth(y, classes, self.recipe.label_smoothing)
        if self.erasing is not None:
            x = self.erasing(x)
        return x.to(dtype), target


def smooth(y: torch.Tensor, classes: int, smoothing: float) -> torch.Tensor:
    """One-hot targets with ``smoothing`` spread over all classes (each row sums to 1)."""
    off = smoothing / classes
    return torch.full((len(y), classes), off, device=y.device).scatter_(1, y[:, None], 1 - smoothing + off)


def mix(x: torch.Tensor, y: torch.Tensor, classes: int, recipe: Recipe) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or cutmix of the batch with itself reversed (timm's pairing), one lambda per batch: cutmix
    with chance ``recipe.switch`` when both are on. Targets: lambda of the own smoothed label and 1 - lambda
    of the partner's, lambda corrected to the pasted box's true area under cutmix; each row sums to 1."""
    use_cutmix = recipe.cutmix > 0 and (recipe.mixup <= 0 or torch.rand(()).item() < recipe.switch)
    alpha = recipe.cutmix if use_cutmix else recipe.mixup
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    partner = x.flip(0)
    if use_cutmix:
        h, w = x.shape[-2:]
        y0, y1, x0, x1 = cutmix_box(h, w, lam)
        x = x.clone()
        x[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        x = x * lam + partner * (1 - lam)
    soft = smooth(y, classes, recipe.label_smoothing)
    return x, soft * lam + soft.flip(0) * (1 - lam)


def cutmix_box(h: int, w: int, lam: float) -> tuple[int, int, int, int]:
    """A box of about (1 - lam) of the image, its centre uniform, clipped to the image: (y0, y1, x0, x1)."""
    cut = (1 - lam) ** 0.5
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(torch.randint(0, h, ()).item()), int(torch.randint(0, w, ()).item())
    return max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


def eval_transform(resolution: int, crop_pct: float = 0.875) -> nn.Module:
    """Resize to ``resolution / crop_pct`` and centre crop ``resolution`` (DeiT's 256 then 224): deterministic."""
    import kornia.augmentation as K

    side = int(round(resolution / crop_pct))
    return nn.Sequential(K.Resize((side, side)), K.CenterCrop((resolution, resolution)))
